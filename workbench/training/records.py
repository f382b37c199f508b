"""What a training job leaves in its output folder, and how it is read back.

::

    out/
      run.json              settings, dataset name and version, classes, split sizes
      split.json            the PatientID pseudonyms on each side of the split
      config.toml           a copy of the TOML file the job was started with
      checkpoint-last.pt    model, optimizer and history after the latest epoch
      checkpoint-best.pt    model of the epoch with the best validation metric
      metrics.csv           epoch, train_loss, val_loss, val_metric
      loss.png              losses and the validation metric by epoch

Files are written to a temporary name and renamed into place, so a killed job
leaves the previous complete file, never half of one.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from workbench.errors import ConfigurationError

__all__ = [
    "BEST_CHECKPOINT",
    "CONFIG_COPY",
    "LAST_CHECKPOINT",
    "LOSS_PLOT",
    "METRICS_CSV",
    "METRICS_FIELDS",
    "RUN_FILE",
    "SPLIT_FILE",
    "file_sha256",
    "load_checkpoint",
    "plot_history",
    "read_run",
    "save_checkpoint",
    "write_json",
    "write_metrics",
]

RUN_FILE = "run.json"
SPLIT_FILE = "split.json"
CONFIG_COPY = "config.toml"
LAST_CHECKPOINT = "checkpoint-last.pt"
BEST_CHECKPOINT = "checkpoint-best.pt"
METRICS_CSV = "metrics.csv"
LOSS_PLOT = "loss.png"
METRICS_FIELDS = ("epoch", "train_loss", "val_loss", "val_metric")


def write_json(path: Path, value: Any) -> None:
    """Write ``value`` as indented JSON, atomically."""
    _write_atomic(path, (json.dumps(value, indent=2, sort_keys=True) + "\n").encode())


def read_run(out: Path) -> dict[str, Any] | None:
    """Return the ``run.json`` of an output folder, or None when it has none."""
    path = out / RUN_FILE
    if not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"{path} is not readable JSON ({exc}); remove the folder or choose"
            " another output folder"
        ) from exc


def write_metrics(out: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """Write ``metrics.csv``: one row per epoch, floats at full precision."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRICS_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({name: repr(row[name]) for name in METRICS_FIELDS})
    _write_atomic(out / METRICS_CSV, buffer.getvalue().encode())


def plot_history(out: Path, history: Sequence[Mapping[str, Any]], metric: str) -> None:
    """Draw the training and validation losses and the metric to ``loss.png``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A Figure with its own Agg canvas: no pyplot, no global backend to set.
    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    epochs = [row["epoch"] for row in history]
    axes.plot(epochs, [row["train_loss"] for row in history], "o-", label="train loss")
    axes.plot(
        epochs, [row["val_loss"] for row in history], "o-", label="validation loss"
    )
    axes.set_xlabel("epoch")
    axes.set_ylabel("loss")
    metric_axes = axes.twinx()
    values = [row["val_metric"] for row in history]
    metric_axes.plot(
        epochs, values, "s--", color="tab:green", label=f"validation {metric}"
    )
    metric_axes.set_ylabel(f"validation {metric}")
    if any(not math.isnan(v) for v in values):
        metric_axes.set_ylim(0, 1.05)
    lines = axes.get_lines() + metric_axes.get_lines()
    axes.legend(lines, [str(line.get_label()) for line in lines], loc="center right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    _write_atomic(out / LOSS_PLOT, buffer.getvalue())


def save_checkpoint(path: Path, payload: Mapping[str, Any]) -> None:
    """Save a checkpoint with ``torch.save``, atomically."""
    import torch

    buffer = io.BytesIO()
    torch.save(dict(payload), buffer)
    _write_atomic(path, buffer.getvalue())


def load_checkpoint(path: Path, device: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors and plain data).

    Raises
    ------
    ConfigurationError
        When the file is missing or is not a checkpoint.
    """
    import torch

    if not path.is_file():
        raise ConfigurationError(
            f"checkpoint {path} not found; pass the output folder of a training job"
        )
    try:
        return dict(torch.load(path, map_location=device, weights_only=True))
    except (OSError, RuntimeError, ValueError) as exc:
        raise ConfigurationError(
            f"checkpoint {path} could not be loaded: {exc}"
        ) from exc


def file_sha256(path: Path | None) -> str | None:
    """Return the SHA-256 of a file's bytes, or None for no file."""
    if path is None:
        return None
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    temporary.write_bytes(data)
    os.replace(temporary, path)
