"""The workbench from a Jupyter notebook: datasets, ingest and the audit log.

Open a de-identified dataset for a stated purpose and read its rows, volumes and
slices, each read recorded in the audit log. Run an ingest with a progress bar drawn
by the notebook. Review and verify the audit log::

    import workbench.notebook as wb

    ds = wb.open_dataset("datasets/demo", purpose="nodule cohort review")
    ds.show(ds.series.SeriesInstanceUID.iloc[0], window="lung")
    wb.ingest(out="datasets/cohort", orthanc="local", purpose="chest CT cohort")
    wb.audit_log(action="dataset.read")
    wb.verify_audit()

:func:`~workbench.notebook.runner.run_notebook` executes a notebook headless, as the
test suite does for every notebook in ``notebooks/``.
"""

from workbench.notebook.audit_review import audit_log, verify_audit
from workbench.notebook.dataset import AuditedDataset, open_dataset
from workbench.notebook.ingest_progress import ingest
from workbench.notebook.windows import WINDOW_PRESETS, Window

__all__ = [
    "WINDOW_PRESETS",
    "AuditedDataset",
    "Window",
    "audit_log",
    "ingest",
    "open_dataset",
    "verify_audit",
]
