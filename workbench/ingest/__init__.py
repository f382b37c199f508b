"""The ingest job: Orthanc (or a folder) to a de-identified Parquet and Zarr dataset.

Run it with :func:`run_ingest` and an :class:`IngestConfig`, or from the command
line with ``workbench ingest``.
"""

from workbench.ingest.config import IngestConfig, load_dataset_definition
from workbench.ingest.pipeline import IngestSummary, run_ingest

__all__ = ["IngestConfig", "IngestSummary", "load_dataset_definition", "run_ingest"]
