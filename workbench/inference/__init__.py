"""Inference jobs: apply a trained MONAI model to a dataset and write predictions.

- :func:`run_inference` (:mod:`workbench.inference.job`).

Imported on first use, so ``import workbench.inference`` does not import PyTorch or
MONAI.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["run_inference"]


def __getattr__(name: str) -> Any:
    if name != "run_inference":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return importlib.import_module("workbench.inference.job").run_inference


def __dir__() -> list[str]:
    return sorted([*globals(), "run_inference"])
