"""The workbench from a Jupyter notebook: datasets, jobs, results and the audit log.

Open a de-identified dataset for a stated purpose and read its rows, volumes and
slices, each read recorded in the audit log. Run an ingest with a progress bar drawn
by the notebook. Train, predict and run Gemma 3n in isolated jobs, as the command
line does, and draw their results. Review and verify the audit log::

    import workbench.notebook as wb

    ds = wb.open_dataset("datasets/demo", purpose="nodule cohort review")
    ds.show(ds.series.SeriesInstanceUID.iloc[0], window="lung")
    wb.ingest(out="datasets/cohort", orthanc="local", purpose="chest CT cohort")

    wb.train(ds, "sphere.toml", "runs/sphere", labels="runs/labels.csv")
    wb.plot_loss("runs/sphere")
    wb.infer(ds, "runs/sphere", "runs/sphere-predictions")
    wb.plot_confusion_matrix(
        wb.confusion_matrix("runs/sphere-predictions", "runs/labels.csv")
    )
    wb.gemma_infer(ds, "tiny", "Which modality is this?", "runs/gemma")
    wb.show_generations(ds, "runs/gemma")

    wb.audit_log(action="dataset.read")
    wb.verify_audit()

:func:`~workbench.notebook.runner.run_notebook` executes a notebook headless, as the
test suite does for every notebook in ``notebooks/``.
"""

from workbench.notebook.audit_review import audit_log, verify_audit
from workbench.notebook.dataset import AuditedDataset, open_dataset
from workbench.notebook.ingest_progress import ingest
from workbench.notebook.jobs import finetune_gemma, gemma_infer, infer, train
from workbench.notebook.results import (
    confusion_matrix,
    plot_confusion_matrix,
    plot_loss,
    show_generations,
)
from workbench.notebook.windows import WINDOW_PRESETS, Window

__all__ = [
    "WINDOW_PRESETS",
    "AuditedDataset",
    "Window",
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
