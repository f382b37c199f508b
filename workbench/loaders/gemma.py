"""Examples for a vision-language model: one windowed image, a prompt and a target per
series.

:func:`gemma_examples` turns each pixel stack of a de-identified dataset into a
:class:`GemmaExample`: one or more representative slices, windowed into 8-bit RGB
images, a prompt filled in from the series' DICOM attributes, and, for
fine-tuning, a target text taken from a column or from a reports table::

    examples = gemma_examples(
        "datasets/demo",
        purpose="describe chest CT",
        prompt_template="Modality: {Modality}. Body part: {BodyPartExamined}."
        " Describe the image.",
        window="lung",
    )

CT windows are given as (center, width) in Hounsfield units, as in DICOM
WindowCenter and WindowWidth: display values run from ``center - width / 2``
(black) to ``center + width / 2`` (white).
"""

from __future__ import annotations

import logging
import os
import string
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from workbench.audit import AuditEvent, open_audit_log
from workbench.dataset.reader import DatasetView
from workbench.errors import ConfigurationError, DatasetError

__all__ = [
    "NAMED_WINDOWS",
    "GemmaExample",
    "gemma_examples",
    "representative_slices",
    "window_to_uint8",
]

log = logging.getLogger(__name__)

# (center, width) in HU of common CT display windows.
NAMED_WINDOWS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "soft-tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}
# Percentiles of the pixel values that bound the display range when a series has
# no WindowCenter and WindowWidth.
AUTO_PERCENTILES = (0.5, 99.5)
# Column of a reports table holding the target text unless target_column names one.
DEFAULT_REPORT_COLUMN = "report"
# Fields a prompt template can use besides the dataset's DICOM columns.
STACK_FIELDS = ("slices",)

Window = str | tuple[float, float]


@dataclass
class GemmaExample:
    """One pixel stack of a series, as images, a prompt and an optional target.

    Attributes
    ----------
    SeriesInstanceUID
        The series' (de-identified) SeriesInstanceUID.
    volume_path
        The stack in the dataset's Zarr store (``<SeriesInstanceUID>/<stack>``).
    images
        The representative slices as RGB ``PIL.Image.Image`` objects, in slice
        order.
    slice_indices
        Index along ``z`` of each image's slice.
    prompt
        The prompt text, without image tokens.
    target
        The text the model should produce, or ``None`` when there is none.
    metadata
        The values the prompt template used, by column name.
    """

    SeriesInstanceUID: str
    volume_path: str
    images: list[Any]
    slice_indices: list[int]
    prompt: str
    target: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def representative_slices(count: int, slices: int) -> list[int]:
    """Return ``slices`` evenly spaced slice indices of a stack of ``count``.

    Each index is the middle slice of one of ``slices`` equal parts of the stack,
    so one slice is the middle slice. A stack with fewer slices than requested
    gives each of its slices once.
    """
    if slices < 1:
        raise ConfigurationError(f"slices must be 1 or more, got {slices}")
    wanted = min(slices, count)
    positions = (np.arange(wanted) + 0.5) * count / wanted
    return sorted({min(int(p), count - 1) for p in positions})


def window_to_uint8(
    pixels: np.ndarray, center: float, width: float, *, invert: bool = False
) -> np.ndarray:
    """Map values from ``center - width / 2`` (0) to ``center + width / 2`` (255).

    Values outside the window are clipped. ``invert`` flips the result, for
    MONOCHROME1 images where low values are white.
    """
    if not width > 0:
        raise ConfigurationError(f"window width must be positive, got {width}")
    low = center - width / 2.0
    scaled = (np.asarray(pixels, dtype=np.float64) - low) / width
    levels = np.round(np.clip(scaled, 0.0, 1.0) * 255.0).astype(np.uint8)
    return 255 - levels if invert else levels


def _resolve_window(window: Window) -> tuple[float, float] | None:
    """Return (center, width) for a named or explicit window, ``None`` for auto."""
    if isinstance(window, str):
        if window == "auto":
            return None
        if window not in NAMED_WINDOWS:
            names = ", ".join(["auto", *NAMED_WINDOWS])
            raise ConfigurationError(
                f"unknown window {window!r}; expected one of {names} or a"
                " (center, width) pair"
            )
        return NAMED_WINDOWS[window]
    try:
        center, width = (float(value) for value in window)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"invalid window {window!r}; expected a name or a (center, width) pair"
        ) from exc
    if not width > 0:
        raise ConfigurationError(f"window width must be positive, got {width}")
    return center, width


def _resolve_image_size(
    image_size: int | tuple[int, int] | None,
) -> tuple[int, int] | None:
    """Return (width, height) for an image size given as one number or a pair."""
    if image_size is None:
        return None
    try:
        if isinstance(image_size, int):
            width, height = image_size, image_size
        else:
            width, height = (int(value) for value in image_size)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"invalid image_size {image_size!r}; expected pixels as one number or a"
            " (width, height) pair"
        ) from exc
    if width < 1 or height < 1:
        raise ConfigurationError(f"image_size must be positive, got {image_size!r}")
    return width, height


def _template_fields(template: str) -> list[str]:
    """Return the field names a ``str.format`` template uses, in order."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ConfigurationError(
            f"invalid prompt template {template!r}: {exc}; write fields as"
            " {Keyword} and double literal braces"
        ) from exc
    names = []
    for _text, name, _spec, _conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier():
            raise ConfigurationError(
                f"prompt template field {{{name}}} is not a column name; use"
                " {Keyword} fields such as {Modality}"
            )
        names.append(name)
    return list(dict.fromkeys(names))


def _format_value(value: Any) -> str:
    """Render a Parquet cell for a prompt: lists joined, missing values 'unknown'."""
    if value is None:
        return "unknown"
    if isinstance(value, float) and np.isnan(value):
        return "unknown"
    if isinstance(value, (list, tuple, np.ndarray)):
        return ", ".join(_format_value(item) for item in value)
    if hasattr(value, "isoformat"):
        return str(value.isoformat())
    return str(value)


def _first_number(value: Any) -> float | None:
    """Return the first value of a DS cell that may hold one value or a list."""
    if value is None:
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        return _first_number(value[0]) if len(value) else None
    number = float(value)
    return None if np.isnan(number) else number


def _read_reports(reports: str | os.PathLike[str] | Any, column: str) -> dict[str, str]:
    """Return the report text by SeriesInstanceUID from a CSV, Parquet or frame."""
    import pandas as pd

    if isinstance(reports, pd.DataFrame):
        table = reports
    else:
        path = Path(reports)
        if not path.is_file():
            raise ConfigurationError(
                f"reports table {path} does not exist; pass a CSV or Parquet file"
                " with SeriesInstanceUID and report columns"
            )
        if path.suffix.lower() == ".csv":
            table = pd.read_csv(path, dtype=str, keep_default_na=False)
        elif path.suffix.lower() in {".parquet", ".pq"}:
            table = pd.read_parquet(path)
        else:
            raise ConfigurationError(
                f"reports table {path} is neither .csv nor .parquet"
            )
    for needed in ("SeriesInstanceUID", column):
        if needed not in table.columns:
            raise ConfigurationError(
                f"reports table has no {needed!r} column (columns:"
                f" {', '.join(map(str, table.columns))}); it needs SeriesInstanceUID"
                f" and the text column {column!r} (set target_column)"
            )
    duplicated = int(table["SeriesInstanceUID"].duplicated().sum())
    if duplicated:
        raise ConfigurationError(
            f"reports table has {duplicated} repeated SeriesInstanceUID values;"
            " keep one report per series"
        )
    return {
        str(uid): str(text)
        for uid, text in zip(table["SeriesInstanceUID"], table[column], strict=True)
        if text is not None and str(text) != ""
    }


def _select_stacks(stacks: Any, where: Mapping[str, Any] | None) -> Any:
    """Keep the stacks whose columns equal the values of ``where``.

    A value that is a list, tuple or set matches any of its items.
    """
    if not where:
        return stacks
    keep = np.ones(len(stacks), dtype=bool)
    for column, wanted in where.items():
        values = stacks[column]
        if isinstance(wanted, (list, tuple, set, frozenset)):
            keep &= values.isin(list(wanted)).to_numpy()
        else:
            keep &= (values == wanted).fillna(False).to_numpy(dtype=bool)
    return stacks[keep].reset_index(drop=True)


class Display(NamedTuple):
    """Display settings of a stack, from its instances' attributes."""

    center: float | None
    width: float | None
    invert: bool


def _display_settings(view: DatasetView) -> dict[str, Display]:
    """Return each stack's WindowCenter, WindowWidth and MONOCHROME1 inversion.

    The first instance with a window decides; a stack without any gets ``None``.
    """
    table = view.instances(
        columns=[
            "volume_path",
            "WindowCenter",
            "WindowWidth",
            "PhotometricInterpretation",
        ]
    ).to_pylist()
    settings: dict[str, Display] = {}
    for row in table:
        path = row["volume_path"]
        if path is None:
            continue
        display = Display(
            center=_first_number(row["WindowCenter"]),
            width=_first_number(row["WindowWidth"]),
            invert=row["PhotometricInterpretation"] == "MONOCHROME1",
        )
        known = settings.get(path)
        if known is None or (known.center is None and display.center is not None):
            settings[path] = display
    return settings


def _stack_images(
    view: DatasetView,
    volume_path: str,
    slices: int,
    window: tuple[float, float] | None,
    display: Display,
    image_size: tuple[int, int] | None,
) -> tuple[list[Any], list[int]]:
    """Read the representative slices of a stack and window them into RGB images."""
    from PIL import Image

    pixels = view.pixel_array(volume_path)
    indices = representative_slices(int(pixels.shape[0]), slices)
    chosen = np.stack([np.asarray(pixels[index]) for index in indices])
    center_width = window
    if center_width is None and display.center is not None and display.width:
        center_width = (display.center, display.width)
    if center_width is None:
        low, high = np.percentile(chosen, AUTO_PERCENTILES)
        center_width = ((low + high) / 2.0, max(float(high - low), 1.0))

    images = []
    for plane in chosen:
        if plane.ndim == 3:
            # Colour slices (channel last) are shown as stored, scaled to 8 bits.
            rgb = (
                plane
                if plane.dtype == np.uint8
                else window_to_uint8(plane, *center_width)
            )
            image = Image.fromarray(np.ascontiguousarray(rgb[..., :3]), mode="RGB")
        else:
            gray = window_to_uint8(plane, *center_width, invert=display.invert)
            image = Image.fromarray(gray, mode="L").convert("RGB")
        if image_size is not None:
            image = image.resize(image_size, Image.Resampling.BILINEAR)
        images.append(image)
    return images, indices


def gemma_examples(
    dataset: DatasetView | str | os.PathLike[str],
    *,
    purpose: str,
    prompt_template: str,
    target_column: str | None = None,
    reports: str | os.PathLike[str] | Any | None = None,
    slices: int = 1,
    window: Window = "auto",
    image_size: int | tuple[int, int] | None = None,
    where: Mapping[str, Any] | None = None,
) -> list[GemmaExample]:
    """Build one vision-language example per pixel stack of a dataset.

    Parameters
    ----------
    dataset
        A :class:`DatasetView` or the folder of a de-identified dataset.
    purpose
        Why the data is read; recorded in the audit log.
    prompt_template
        A ``str.format`` template over the dataset's columns (DICOM keywords)
        and ``slices``, such as ``"Modality: {Modality}. Describe the image."``;
        each field takes the value of the stack's first instance, lists are
        joined with commas and missing values read ``unknown``.
    target_column
        With ``reports``, the reports table's text column (default
        ``"report"``); without, a dataset column whose value is the target.
    reports
        A CSV or Parquet file, or a pandas DataFrame, with a
        ``SeriesInstanceUID`` column and one text per series. Series without a
        report get the target ``None``.
    slices
        Number of representative slices per stack: the middle slice of each of
        ``slices`` equal parts along ``z``.
    window
        ``"auto"`` (the series' WindowCenter and WindowWidth, or else the 0.5th
        to 99.5th percentile of the chosen slices), a name of
        :data:`NAMED_WINDOWS` or a (center, width) pair in stored units (HU for
        CT).
    image_size
        Resize each image to this many pixels square, or to (width, height);
        ``None`` keeps the slice size (the processor resizes anyway).
    where
        Keep only stacks whose column equals the value (or one of a list of
        values), such as ``{"Modality": "CT"}``.

    Returns
    -------
    list of GemmaExample
        In ``volume_path`` order.

    Raises
    ------
    ConfigurationError
        When the template or ``where`` names a column the dataset lacks, or a
        window, reports table or target column is invalid.
    DatasetError
        When the dataset cannot be opened or no stack is selected.
    """
    if not isinstance(purpose, str) or not purpose.strip():
        raise ConfigurationError(
            "purpose is required: say why the dataset is read, for example"
            " purpose='modality captioning pilot'; the audit log records it"
        )
    started = time.perf_counter()
    if isinstance(dataset, DatasetView):
        view = dataset
    else:
        view = DatasetView.open(Path(dataset))
    center_width = _resolve_window(window)
    size = _resolve_image_size(image_size)

    # Check every column named by the template, the filter and the target.
    available = set(view.instances(filter=_no_rows()).schema.names) | set(STACK_FIELDS)
    fields = _template_fields(prompt_template)
    target_from_column = target_column if reports is None else None
    requested = {
        "prompt template": fields,
        "where": list(where or {}),
        "target_column": [target_from_column] if target_from_column else [],
    }
    for role, columns in requested.items():
        missing = [column for column in columns if column not in available]
        if missing:
            raise ConfigurationError(
                f"{role} names column(s) {', '.join(missing)} that dataset"
                f" {view.name} lacks; use DICOM keywords of its instances table,"
                " such as Modality, BodyPartExamined or SeriesDescription"
            )
    columns = [*fields, *requested["where"], *requested["target_column"]]
    extra_columns = [c for c in dict.fromkeys(columns) if c not in STACK_FIELDS]
    stacks = view.volumes(extra_columns=extra_columns)
    stacks = _select_stacks(stacks, where)
    if stacks.empty:
        raise DatasetError(
            f"no pixel stack of dataset {view.name} matches where={dict(where or {})}"
        )
    report_texts = (
        _read_reports(reports, target_column or DEFAULT_REPORT_COLUMN)
        if reports is not None
        else None
    )
    display = _display_settings(view)

    # Read each stack's slices and fill in the prompt and the target.
    examples = []
    for row in stacks.to_dict("records"):
        values = {name: _format_value(row.get(name)) for name in fields}
        images, indices = _stack_images(
            view,
            row["volume_path"],
            slices,
            center_width,
            display.get(row["volume_path"], Display(None, None, invert=False)),
            size,
        )
        series_uid = str(row["SeriesInstanceUID"])
        if report_texts is not None:
            target = report_texts.get(series_uid)
        elif target_from_column is not None:
            target = _target_from_value(row.get(target_from_column))
        else:
            target = None
        examples.append(
            GemmaExample(
                SeriesInstanceUID=series_uid,
                volume_path=str(row["volume_path"]),
                images=images,
                slice_indices=indices,
                prompt=prompt_template.format_map(values),
                target=target,
                metadata=values,
            )
        )

    # Record the read in the audit log.
    with_target = sum(example.target is not None for example in examples)
    if report_texts is not None and with_target < len(examples):
        log.warning(
            "%d of %d stacks have no report in the reports table",
            len(examples) - with_target,
            len(examples),
        )
    with open_audit_log() as audit:
        audit.append(
            AuditEvent(
                action="dataset.read",
                resource=f"dataset:{view.name}",
                purpose=purpose,
                details={
                    "version": view.version,
                    "loader": "gemma",
                    "examples": len(examples),
                    "series": len({e.SeriesInstanceUID for e in examples}),
                    "images": sum(len(e.images) for e in examples),
                    "targets": with_target,
                },
            )
        )
    log.info(
        "built %d Gemma examples (%d images, %d targets) from dataset %s in %.1f s",
        len(examples),
        sum(len(e.images) for e in examples),
        with_target,
        view.name,
        time.perf_counter() - started,
    )
    return examples


def _target_from_value(value: Any) -> str | None:
    text = _format_value(value)
    return None if text == "unknown" else text


def _no_rows() -> Any:
    """Return a filter that matches no row, to read a table's schema only."""
    import pyarrow.compute as pc

    return pc.scalar(False)
