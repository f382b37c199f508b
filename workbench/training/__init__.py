"""Training jobs: MONAI networks fitted to de-identified datasets from a TOML config.

- :func:`run_training` (:mod:`workbench.training.job`): train, validate, checkpoint
  and resume.
- :class:`TrainingConfig`, :func:`load_config` (:mod:`workbench.training.config`):
  the settings and their TOML form.

Names are imported on first use, so ``import workbench.training`` does not import
PyTorch or MONAI.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["TrainingConfig", "load_config", "run_training"]

# Public name to the module that defines it.
_MODULES = {
    "run_training": "workbench.training.job",
    "TrainingConfig": "workbench.training.config",
    "load_config": "workbench.training.config",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULES])
