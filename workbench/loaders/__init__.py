"""Loaders that feed de-identified datasets to training frameworks.

- :func:`monai_dataset`: a MONAI dataset of volumes or slices read from Zarr, with
  labels from Parquet or a labels table (:mod:`workbench.loaders.monai`).
- :class:`LoadZarrd`, :class:`LoadMaskd`: the MONAI transforms that read pixels and
  masks (:mod:`workbench.loaders.transforms`).
- :func:`gemma_examples`: one Gemma 3n example per series, a windowed slice and a
  prompt from metadata (:mod:`workbench.loaders.gemma`).

Names are imported on first use, so ``import workbench.loaders`` does not import
PyTorch, MONAI or transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["GemmaExample", "LoadMaskd", "LoadZarrd", "gemma_examples", "monai_dataset"]

# Public name to the module that defines it.
_MODULES = {
    "monai_dataset": "workbench.loaders.monai",
    "LoadZarrd": "workbench.loaders.transforms",
    "LoadMaskd": "workbench.loaders.transforms",
    "gemma_examples": "workbench.loaders.gemma",
    "GemmaExample": "workbench.loaders.gemma",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULES])
