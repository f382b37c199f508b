"""Pictures of job results in a notebook: loss curves, confusion matrices, answers.

Each function reads what a job left in its output folder and draws it:

- :func:`plot_loss`: the losses by epoch and the validation metric of a training
  run (``metrics.csv``), or the loss by step of a Gemma 3n fine-tune
  (``loss.csv``);
- :func:`confusion_matrix` and :func:`plot_confusion_matrix`: predicted against
  true classes, from ``predictions.parquet`` joined with a labels table;
- :func:`show_generations`: each series' image beside Gemma 3n's answers
  (``generations.parquet``), the image windowed as the Gemma loader windows it.

Figures are :class:`matplotlib.figure.Figure` objects made without pyplot, so
Jupyter shows each once, as the value of the cell.
"""

from __future__ import annotations

import logging
import os
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeAlias

import numpy as np
import pandas as pd

from workbench.errors import ConfigurationError, DatasetError
from workbench.notebook.dataset import AuditedDataset
from workbench.notebook.display import register_png_display

__all__ = [
    "confusion_matrix",
    "plot_confusion_matrix",
    "plot_loss",
    "show_generations",
]

log = logging.getLogger(__name__)

# Columns of a predictions table that identify an item; labels join on one of them.
KEY_COLUMNS = ("SOPInstanceUID", "SeriesInstanceUID")
PREDICTED_COLUMN = "predicted_label"
# Characters per line of an answer beside its image.
ANSWER_WIDTH = 48
# Share of the fine-tuning steps averaged for the smoothed loss curve.
SMOOTHING_SHARE = 0.1

Table: TypeAlias = pd.DataFrame | str | os.PathLike[str]


# Loss curves


def plot_loss(run: str | os.PathLike[str]) -> Any:
    """Draw the loss curves of a training run or of a Gemma 3n fine-tune.

    Parameters
    ----------
    run
        The output folder of :func:`~workbench.notebook.train` (its
        ``metrics.csv`` and ``run.json``) or of
        :func:`~workbench.notebook.finetune_gemma` (its ``loss.csv``).

    Returns
    -------
    matplotlib.figure.Figure
        For a training run, the training and validation losses by epoch, and the
        validation metric with the best epoch marked. For a fine-tune, the loss
        by step and its moving average.

    Raises
    ------
    ConfigurationError
        When the folder contains neither file.
    """
    from workbench.gemma.finetune import LOSS_FILE
    from workbench.training.records import METRICS_CSV

    folder = Path(run).expanduser()
    if (folder / METRICS_CSV).is_file():
        return _training_curves(folder, folder / METRICS_CSV)
    if (folder / LOSS_FILE).is_file():
        return _finetune_curve(folder / LOSS_FILE)
    raise ConfigurationError(
        f"{folder} has neither {METRICS_CSV} (a training run) nor {LOSS_FILE} (a"
        " Gemma 3n fine-tune); pass the out folder of wb.train or"
        " wb.finetune_gemma"
    )


def _training_curves(folder: Path, metrics_csv: Path) -> Any:
    from matplotlib.figure import Figure

    from workbench.training.records import read_run

    history = pd.read_csv(metrics_csv)
    if history.empty:
        raise ConfigurationError(
            f"{metrics_csv} has no epochs yet; run the training job first"
        )
    metric = str((read_run(folder) or {}).get("metric", "metric"))
    figure = Figure(figsize=(9, 3.2), layout="constrained")
    losses, scores = figure.subplots(1, 2)
    losses.plot(history["epoch"], history["train_loss"], "o-", label="training")
    losses.plot(history["epoch"], history["val_loss"], "o-", label="validation")
    losses.set(xlabel="epoch", ylabel="loss", title="loss")
    losses.legend()
    scores.plot(history["epoch"], history["val_metric"], "s-", color="tab:green")
    if history["val_metric"].notna().any():
        best = history.loc[history["val_metric"].idxmax()]
        scores.plot(
            [best["epoch"]],
            [best["val_metric"]],
            "*",
            markersize=14,
            color="tab:red",
            label=f"best: {best['val_metric']:.3f} at epoch {int(best['epoch'])}",
        )
        scores.legend(loc="lower right")
        scores.set_ylim(0, 1.05)
    scores.set(xlabel="epoch", ylabel=metric, title=f"validation {metric}")
    for axes in (losses, scores):
        axes.xaxis.get_major_locator().set_params(integer=True)
    figure.suptitle(f"training run {folder.name}", fontsize=10)
    register_png_display()
    return figure


def _finetune_curve(loss_csv: Path) -> Any:
    from matplotlib.figure import Figure

    steps = pd.read_csv(loss_csv)
    if steps.empty:
        raise ConfigurationError(f"{loss_csv} has no steps; run the fine-tune first")
    window = max(1, round(len(steps) * SMOOTHING_SHARE))
    smoothed = steps["loss"].rolling(window, min_periods=1, center=True).mean()
    figure = Figure(figsize=(6, 3.2), layout="constrained")
    axes = figure.subplots()
    axes.plot(steps["step"], steps["loss"], ".", alpha=0.4, label="step")
    axes.plot(steps["step"], smoothed, "-", label=f"mean of {window} steps")
    axes.set(
        xlabel="step", ylabel="loss", title=f"LoRA fine-tune {loss_csv.parent.name}"
    )
    axes.legend()
    register_png_display()
    return figure


# Confusion matrix


def confusion_matrix(
    predictions: Table,
    labels: Table,
    *,
    label_column: str | None = None,
    key: str | None = None,
) -> pd.DataFrame:
    """Count items by true and predicted class.

    Parameters
    ----------
    predictions
        ``predictions.parquet`` of :func:`~workbench.notebook.infer`, as a file,
        the inference's output folder, or a DataFrame with ``predicted_label``.
    labels
        The labels table (CSV or Parquet file, or DataFrame), read as the
        training job reads it.
    label_column
        The labels table's class column; default its only column besides the
        key.
    key
        The column to join on; default ``SOPInstanceUID`` when both tables have
        it (slice items), else ``SeriesInstanceUID``.

    Returns
    -------
    pandas.DataFrame
        One row per true class and one column per predicted class, each
        holding a count; every class found on either side appears on both.
        Items without a label are left out.

    Raises
    ------
    ConfigurationError
        When a column is missing, or no prediction has a label.
    """
    from workbench.loaders.items import read_labels_table

    predicted = _predictions_frame(predictions)
    truth, _ = read_labels_table(labels)
    key = key or _join_key(predicted, truth)
    label_column = label_column or _label_column(truth, key)
    for name, frame, columns in (
        ("predictions", predicted, (key, PREDICTED_COLUMN)),
        ("labels table", truth, (key, label_column)),
    ):
        missing = [column for column in columns if column not in frame.columns]
        if missing:
            raise ConfigurationError(
                f"the {name} lack column(s) {', '.join(missing)}; columns:"
                f" {', '.join(map(str, frame.columns))}"
            )
    joined = predicted[[key, PREDICTED_COLUMN]].merge(
        truth[[key, label_column]].dropna(), on=key, how="inner"
    )
    if joined.empty:
        raise ConfigurationError(
            f"no prediction has a label: the {key} values of the predictions and"
            " of the labels table do not overlap; use the labels table of the"
            " same dataset"
        )
    classes = sorted(
        set(joined[label_column]) | set(joined[PREDICTED_COLUMN]), key=_class_order
    )
    matrix = pd.crosstab(joined[label_column], joined[PREDICTED_COLUMN])
    matrix = matrix.reindex(index=classes, columns=classes, fill_value=0)
    matrix.index.name = f"true {label_column}"
    matrix.columns.name = f"predicted {label_column}"
    return matrix


def plot_confusion_matrix(matrix: pd.DataFrame, *, title: str = "") -> Any:
    """Draw a confusion matrix from :func:`confusion_matrix` with its counts.

    The title gives the accuracy: the share of items on the diagonal.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    counts = matrix.to_numpy()
    total = int(counts.sum())
    accuracy = float(np.trace(counts)) / total if total else float("nan")
    size = 1.2 + 0.9 * max(len(matrix.columns), 2)
    figure = Figure(figsize=(size + 1.2, size), layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(counts, cmap="Blues", vmin=0)
    figure.colorbar(image, ax=axes, shrink=0.8, label="items")
    axes.set_xticks(range(len(matrix.columns)), [str(c) for c in matrix.columns])
    axes.set_yticks(range(len(matrix.index)), [str(c) for c in matrix.index])
    axes.set(
        xlabel=matrix.columns.name or "predicted", ylabel=matrix.index.name or "true"
    )
    threshold = counts.max() / 2 if counts.size else 0
    for (row, column), count in np.ndenumerate(counts):
        colour = "white" if count > threshold else "black"
        axes.text(column, row, str(count), ha="center", va="center", color=colour)
    heading = f"accuracy {accuracy:.3f} of {total} items"
    axes.set_title(f"{title}\n{heading}" if title else heading, fontsize=10)
    register_png_display()
    return figure


def _predictions_frame(predictions: Table) -> pd.DataFrame:
    if isinstance(predictions, pd.DataFrame):
        return predictions
    path = Path(predictions).expanduser()
    if path.is_dir():
        from workbench.inference.job import PREDICTIONS_FILE

        path = path / PREDICTIONS_FILE
    if not path.is_file():
        raise ConfigurationError(
            f"predictions {path} not found; pass the out folder of wb.infer or its"
            " predictions.parquet"
        )
    return pd.read_parquet(path)


def _join_key(predicted: pd.DataFrame, truth: pd.DataFrame) -> str:
    for column in KEY_COLUMNS:
        if column in predicted.columns and column in truth.columns:
            return column
    raise ConfigurationError(
        f"the labels table has neither {' nor '.join(KEY_COLUMNS)}; key it by the"
        " dataset's UIDs, as for training"
    )


def _label_column(truth: pd.DataFrame, key: str) -> str:
    others = [c for c in truth.columns if c != key and c not in KEY_COLUMNS]
    if len(others) != 1:
        raise ConfigurationError(
            f"the labels table has columns {', '.join(map(str, others))} besides"
            f" {key}; pass label_column to name the class column"
        )
    return str(others[0])


def _class_order(value: Any) -> tuple[str, str]:
    # Sorts mixed types (booleans, numbers, text) without comparing across types.
    return (type(value).__name__, str(value))


# Gemma answers


def show_generations(
    dataset: AuditedDataset,
    answers: Table | Mapping[str, Table],
    *,
    series: Sequence[str] | None = None,
    limit: int = 4,
    window: str | Sequence[float] = "auto",
) -> Any:
    """Draw each series' image beside Gemma 3n's answers about it.

    The images come from :meth:`AuditedDataset.to_gemma`, so they are the
    slices the model saw, windowed the same way, and the read is recorded in
    the audit log.

    Parameters
    ----------
    dataset
        The dataset the answers are about, opened with
        :func:`~workbench.notebook.open_dataset`.
    answers
        ``generations.parquet`` of :func:`~workbench.notebook.gemma_infer` (the
        file, the output folder, or a DataFrame), or a mapping from a caption
        such as ``"after fine-tuning"`` to one of those, to compare answers.
    series
        SeriesInstanceUIDs or ``volume_path`` values to show, in order; default
        the first ``limit`` stacks of the first answers table.
    limit
        How many stacks to show when ``series`` is not given.
    window
        The window the inference used (its ``window``; default ``"auto"``).

    Returns
    -------
    matplotlib.figure.Figure
        One row per stack: its images, then the prompt and each answer.

    Raises
    ------
    ConfigurationError
        When an answers table is missing or lacks a shown stack, or the images
        differ from those the model saw.
    DatasetError
        When ``series`` names a stack the first answers table does not have.
    """
    from matplotlib.figure import Figure

    tables = _answer_tables(answers)
    first = next(iter(tables.values()))
    paths = _chosen_stacks(first, series, limit)
    rows = {
        caption: table.set_index("volume_path").reindex(paths)
        for caption, table in tables.items()
    }
    for caption, table in rows.items():
        missing = table.index[table["text"].isna()].tolist()
        if missing:
            raise ConfigurationError(
                f"answers {caption!r} have no row for stack(s) {', '.join(missing)}"
            )

    # Read the images the model saw: the same slices and window.
    first_table = rows[_first(rows)]
    slice_indices = {
        path: [int(index) for index in first_table.loc[path, "slice_indices"]]
        for path in paths
    }
    slices = max(len(indices) for indices in slice_indices.values())
    examples = dataset.to_gemma(
        prompt_template="",
        slices=slices,
        window=window if isinstance(window, str) else tuple(window),
        where={"volume_path": paths},
    )
    images = {example.volume_path: example for example in examples}
    for path in paths:
        loaded = images[path].slice_indices
        if loaded != slice_indices[path]:
            raise ConfigurationError(
                f"stack {path}: the answers are about slices {slice_indices[path]},"
                f" but the loader now gives slices {loaded}; has the dataset changed"
                " since the inference?"
            )

    # One row per stack: the images side by side, then the prompt and answers.
    figure = Figure(figsize=(8, 2.1 * len(paths)), layout="constrained")
    grid = figure.subplots(len(paths), 2, squeeze=False, width_ratios=[1, 2])
    for (image_axes, text_axes), path in zip(grid, paths, strict=True):
        pictures = [np.asarray(image) for image in images[path].images]
        image_axes.imshow(np.concatenate(pictures, axis=1), interpolation="nearest")
        image_axes.set_axis_off()
        image_axes.set_title(
            f"{path}\nslice {', '.join(map(str, slice_indices[path]))}", fontsize=7
        )
        text_axes.set_axis_off()
        text_axes.text(
            0.0,
            1.0,
            _answer_text(path, rows),
            va="top",
            ha="left",
            fontsize=8,
            family="monospace",
            transform=text_axes.transAxes,
        )
    register_png_display()
    return figure


def _answer_tables(answers: Table | Mapping[str, Table]) -> dict[str, pd.DataFrame]:
    if isinstance(answers, Mapping):
        if not answers:
            raise ConfigurationError("answers is an empty mapping; give one table")
        return {str(caption): _generations(table) for caption, table in answers.items()}
    return {"answer": _generations(answers)}


def _generations(table: Table) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame):
        frame = table
    else:
        from workbench.gemma.inference import GENERATIONS_FILE

        path = Path(table).expanduser()
        if path.is_dir():
            path = path / GENERATIONS_FILE
        if not path.is_file():
            raise ConfigurationError(
                f"answers {path} not found; pass the out folder of wb.gemma_infer"
                f" or its {GENERATIONS_FILE}"
            )
        frame = pd.read_parquet(path)
    needed = ("SeriesInstanceUID", "volume_path", "slice_indices", "prompt", "text")
    missing = [column for column in needed if column not in frame.columns]
    if missing:
        raise ConfigurationError(
            f"the answers table lacks column(s) {', '.join(missing)}; pass"
            " generations.parquet of wb.gemma_infer"
        )
    return frame


def _chosen_stacks(
    table: pd.DataFrame, series: Sequence[str] | None, limit: int
) -> list[str]:
    """Return the volume paths to show, from UIDs or paths, or the first ones."""
    if series is None:
        if limit < 1:
            raise ConfigurationError(f"limit must be at least 1, not {limit}")
        return [str(path) for path in table["volume_path"].head(limit)]
    if isinstance(series, str):
        series = [series]
    by_uid = table.groupby("SeriesInstanceUID")["volume_path"].first()
    paths = []
    for name in series:
        if name in set(table["volume_path"]):
            paths.append(str(name))
        elif name in by_uid.index:
            paths.append(str(by_uid[name]))
        else:
            raise DatasetError(
                f"the answers have no series or stack {name!r}; take a"
                " SeriesInstanceUID or volume_path from the answers table"
            )
    return paths


def _first(rows: Mapping[str, Any]) -> str:
    return next(iter(rows))


def _answer_text(path: str, rows: Mapping[str, pd.DataFrame]) -> str:
    """Return the prompt and each answer, wrapped; one prompt line when all agree."""
    prompts = {
        caption: str(table.loc[path, "prompt"]) for caption, table in rows.items()
    }
    same_prompt = len(set(prompts.values())) == 1
    lines = []
    if same_prompt:
        lines.extend(textwrap.wrap(f"prompt: {prompts[_first(rows)]}", ANSWER_WIDTH))
    for caption, table in rows.items():
        lines.append("")
        if not same_prompt:
            text = f"{caption} prompt: {prompts[caption]}"
            lines.extend(textwrap.wrap(text, ANSWER_WIDTH))
        answer = str(table.loc[path, "text"])
        lines.extend(textwrap.wrap(f"{caption}: {answer}", ANSWER_WIDTH))
    return "\n".join(lines).strip("\n")
