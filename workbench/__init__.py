"""Medical imaging research workbench.

De-identified Parquet and Zarr datasets from an Orthanc DICOM server, loaders for
MONAI and Gemma 3n, and federated training with Flower. Every data access goes to a
hash-chained audit log.
"""

from __future__ import annotations

import logging
from typing import Any

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "audit_log",
    "confusion_matrix",
    "finetune_gemma",
    "gemma_infer",
    "infer",
    "ingest",
    "open_dataset",
    "plot_confusion_matrix",
    "plot_loss",
    "show_generations",
    "train",
    "verify_audit",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())

# The notebook API, imported on first use so that the command line starts without
# pandas, xarray and the ingest job.
_NOTEBOOK_API = frozenset(__all__) - {"__version__"}


def __getattr__(name: str) -> Any:
    if name == "federation":
        import importlib

        return importlib.import_module("workbench.federation")
    if name in _NOTEBOOK_API:
        from workbench import notebook

        return getattr(notebook, name)
    raise AttributeError(f"module 'workbench' has no attribute {name!r}")
