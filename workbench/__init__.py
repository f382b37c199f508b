"""Medical imaging research workbench.

De-identified Parquet and Zarr datasets from an Orthanc DICOM server, loaders for
MONAI and Gemma 3n, and federated training with Flower. Every data access goes to a
hash-chained audit log.
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
