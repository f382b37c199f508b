"""The inference job: apply a trained model to a dataset and write its predictions.

:func:`run_inference` loads the settings (``run.json``) and a checkpoint from a
training job's output folder. It reads the dataset's items as the training did:
the same level and row filter, and the transforms without the ``train_only``
ones. It writes ``predictions.parquet``, one row per item keyed by the dataset's
new UIDs: ``SeriesInstanceUID``, ``SOPInstanceUID`` for slice items,
``StudyInstanceUID``, ``PatientID``, ``volume_path`` and, for slices,
``volume_index``.

- Classification adds ``probability_<class>`` per class and ``predicted_label``,
  the label value of the most probable class.
- Segmentation writes each predicted mask to ``masks/<n>.npy`` in the Zarr
  stack's order ((z, y, x) for volumes, (y, x) for slices) after undoing the
  invertible transforms (resizing, padding, cropping), and adds ``mask_path`` and
  ``foreground_fraction``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from workbench.dataset.reader import DatasetView
from workbench.errors import ConfigurationError
from workbench.loaders.items import build_items
from workbench.loaders.monai import (
    build_transform,
    check_purpose,
    open_view,
    raise_transform_cause,
    record_read,
    wrap_items,
)
from workbench.training.config import TrainingConfig, build_network, build_transforms
from workbench.training.job import (
    as_plain_tensor,
    audit_job_event,
    network_output,
    select_device,
)
from workbench.training.records import (
    BEST_CHECKPOINT,
    LAST_CHECKPOINT,
    load_checkpoint,
    read_run,
)

__all__ = ["PREDICTIONS_FILE", "run_inference"]

log = logging.getLogger(__name__)

PREDICTIONS_FILE = "predictions.parquet"
MASKS_DIR = "masks"
CHECKPOINTS = {"best": BEST_CHECKPOINT, "last": LAST_CHECKPOINT}
KEY_COLUMNS = (
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "PatientID",
    "volume_path",
    "volume_index",
)


def run_inference(
    dataset: str | Path | DatasetView,
    model: str | Path,
    out: str | Path,
    *,
    purpose: str,
    checkpoint: str = "best",
    batch_size: int | None = None,
    where: Any = "training",
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Predict every item of ``dataset`` with a trained model.

    Parameters
    ----------
    dataset
        The dataset folder (or view) to predict.
    model
        The output folder of a training job (``run.json`` and checkpoints).
    out
        Output folder for ``predictions.parquet`` (and ``masks/``); created if
        missing.
    purpose
        Why the data is read; recorded in the audit log.
    checkpoint
        ``best`` (highest validation metric) or ``last``.
    batch_size
        Items per forward pass; default the training batch size.
    where
        Rows to predict: ``"training"`` reuses the training job's filter, ``None``
        takes every row, or give a filter as for
        :func:`~workbench.loaders.monai_dataset`.
    device
        ``auto``, ``cpu`` or ``cuda``.
    progress
        Show a progress bar on standard error.

    Returns
    -------
    dict
        ``predictions`` (the Parquet path), ``items``, ``dataset``,
        ``dataset_version``, ``model``, ``checkpoint_epoch``, ``task`` and
        ``seconds``.

    Raises
    ------
    ConfigurationError
        When ``model`` is not a training output folder, or an option is invalid.
    DatasetError
        When the dataset cannot be read or has no matching items.
    """
    import torch
    from monai.data import DataLoader
    from tqdm import tqdm

    started = time.perf_counter()
    check_purpose(purpose)
    if checkpoint not in CHECKPOINTS:
        raise ConfigurationError(
            f"checkpoint {checkpoint!r} is not supported; use 'best' or 'last'"
        )
    model = Path(model).expanduser().resolve()
    run = read_run(model)
    if run is None:
        raise ConfigurationError(
            f"{model} has no run.json; pass the output folder of a training job"
        )
    settings = TrainingConfig.from_dict(run["config"])
    view = open_view(dataset)
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)

    # 1. The network, as trained.
    torch_device = select_device(device)
    saved = load_checkpoint(model / CHECKPOINTS[checkpoint], torch_device)
    network = build_network(settings.model_name, settings.model_args)
    network.load_state_dict(saved["model"])
    network.to(torch_device).eval()

    # 2. The items and the transforms of validation.
    items = build_items(
        view,
        settings.level,
        where=settings.where if where == "training" else where,
    )
    transforms = build_transforms(settings.transforms, train=False)
    for step in transforms:
        # Items have no masks here; transforms that also handle the mask skip it.
        if hasattr(step, "allow_missing_keys"):
            step.allow_missing_keys = True
    transform = build_transform(view, settings.level, transforms)
    data = wrap_items(view, items, transform, settings.level)
    record_read(
        view,
        purpose,
        {"level": settings.level, "items": len(items), "job": "inference"},
    )

    # 3. Predict, batch by batch.
    audit_job_event("inference.start", view, purpose, {"model": model.name})
    segmentation = settings.task == "segmentation"
    writer = (
        _MaskWriter(out, transform) if segmentation else _ClassWriter(run["classes"])
    )
    loader = DataLoader(data, batch_size=batch_size or settings.batch_size)
    rows: list[dict[str, Any]] = []
    try:
        with torch.no_grad():
            for batch in tqdm(loader, desc="inference", disable=not progress):
                inputs = as_plain_tensor(batch["image"]).to(torch_device)
                output = network_output(network(inputs)).float().cpu()
                rows.extend(writer.rows(batch, output))
    except BaseException as exc:
        audit_job_event(
            "inference.end",
            view,
            purpose,
            {"model": model.name, "error": type(exc).__name__},
            outcome="error",
        )
        raise_transform_cause(exc)
        raise

    # 4. Write the table.
    predictions = out / PREDICTIONS_FILE
    _write_table(predictions, rows, settings.level)
    seconds = round(time.perf_counter() - started, 2)
    audit_job_event(
        "inference.end", view, purpose, {"model": model.name, "items": len(rows)}
    )
    log.info(
        "predicted %d %s items of dataset %s in %.1f s",
        len(rows),
        settings.level,
        view.name,
        seconds,
    )
    return {
        "predictions": str(predictions),
        "items": len(rows),
        "dataset": view.name,
        "dataset_version": view.version,
        "model": str(model),
        "checkpoint_epoch": int(saved["epoch"]),
        "task": settings.task,
        "seconds": seconds,
    }


class _ClassWriter:
    """Rows of class probabilities and the predicted label."""

    def __init__(self, classes: list[Any]) -> None:
        self.classes = classes

    def rows(self, batch: dict[str, Any], output: Any) -> list[dict[str, Any]]:
        import torch

        probabilities = torch.softmax(output, 1).numpy()
        rows = []
        for position in range(len(probabilities)):
            row = _keys(batch, position)
            for index, value in enumerate(self.classes):
                row[f"probability_{value}"] = float(probabilities[position, index])
            row["predicted_label"] = self.classes[int(probabilities[position].argmax())]
            rows.append(row)
        return rows


class _MaskWriter:
    """Predicted masks in the stack's geometry, one ``.npy`` file per item."""

    def __init__(self, out: Path, transform: Any) -> None:
        from monai.transforms import Invertd

        self.folder = out / MASKS_DIR
        self.folder.mkdir(exist_ok=True)
        self.invert = Invertd(
            keys="pred", transform=transform, orig_keys="image", nearest_interp=True
        )
        self.count = 0

    def rows(self, batch: dict[str, Any], output: Any) -> list[dict[str, Any]]:
        from monai.data import MetaTensor, decollate_batch

        # Invertd reads the applied transforms from the image; the prediction
        # must be a MetaTensor for it to do so.
        predicted = MetaTensor(output.argmax(1, keepdim=True).float())
        items = decollate_batch({"image": batch["image"], "pred": predicted})
        rows = []
        for position, item in enumerate(items):
            restored = self.invert(item)["pred"]
            mask = np.asarray(restored.detach().cpu().numpy()[0]).round()
            # Back from (x, y[, z]) to the Zarr stack's (z, y, x) order.
            mask = np.ascontiguousarray(mask.T).astype(np.uint8)
            self.count += 1
            path = self.folder / f"{self.count:06d}.npy"
            np.save(path, mask)
            row = _keys(batch, position)
            row["mask_path"] = str(path)
            row["foreground_fraction"] = float((mask > 0).mean())
            rows.append(row)
        return rows


def _keys(batch: dict[str, Any], position: int) -> dict[str, Any]:
    row = {}
    for name in KEY_COLUMNS:
        key = "image" if name == "volume_path" else name
        if name == "volume_path":
            value = batch["image"].meta["volume_path"][position]
        elif key in batch:
            value = batch[key][position]
        else:
            continue
        row[name] = value.item() if hasattr(value, "item") else value
    return row


def _write_table(path: Path, rows: list[dict[str, Any]], level: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pylist(rows)
    if level == "volume" and "volume_index" in table.column_names:
        table = table.drop_columns(["volume_index"])
    temporary = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, temporary)
    temporary.replace(path)
