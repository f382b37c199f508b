"""The item list of a loader: one dict per stack or per slice, from Parquet alone.

An item references pixels without reading them: ``image`` is the stack's
``volume_path`` and, for slice items, ``volume_index`` is the slice's position
along z. The item also carries the new (de-identified) identifiers
``PatientID``, ``StudyInstanceUID``, ``SeriesInstanceUID`` and, for slices,
``SOPInstanceUID``. It may carry the requested metadata columns, a ``label``, and
a ``mask``: the path of a segmentation mask file.
:class:`~workbench.loaders.transforms.LoadZarrd` turns the reference into pixels
later, in the process that needs them.

Labels come from a Parquet column of the dataset, or from a labels table (CSV,
Parquet or a pandas DataFrame) joined on ``SeriesInstanceUID`` for volume items and
on ``SOPInstanceUID`` for slice items; a slice-level table without
``SOPInstanceUID`` joins on ``SeriesInstanceUID``, giving every slice its series'
label. Items without a label are left out, with a warning.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from workbench.dataset.reader import DatasetView
from workbench.dataset.schema import VOLUME_INDEX, VOLUME_PATH
from workbench.errors import ConfigurationError, DatasetError

__all__ = [
    "IDENTIFIER_COLUMNS",
    "LEVELS",
    "RESERVED_KEYS",
    "build_items",
    "check_level",
    "read_labels_table",
    "unique_values",
    "where_expression",
]

log = logging.getLogger(__name__)

LEVELS = ("volume", "slice")
IDENTIFIER_COLUMNS = ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")
# Item keys the loader sets itself; metadata columns may not use them.
RESERVED_KEYS = frozenset({"image", "label", "mask", VOLUME_INDEX})
NUMBER_OF_FRAMES = "NumberOfFrames"


def build_items(
    view: DatasetView,
    level: str,
    *,
    label_column: str | None = None,
    labels: Any = None,
    columns: Sequence[str] = (),
    where: Any = None,
    mask_column: str | None = None,
) -> list[dict[str, Any]]:
    """Build the items of a dataset from its Parquet rows, sorted by stack and slice.

    Parameters
    ----------
    view
        The dataset.
    level
        ``volume`` (one item per stack) or ``slice`` (one item per instance).
    label_column
        Column that contains the label: in ``labels`` when a table is given, else
        in the dataset's Parquet. ``None`` gives items without a label.
    labels
        A labels table: path of a CSV or Parquet file, or a pandas DataFrame.
    columns
        Parquet columns (DICOM keywords) to copy into each item. Dates and times
        become ISO 8601 text; a column the dataset lacks gives ``None``.
    where
        Rows to keep: a ``pyarrow.compute`` expression, or a mapping of column to
        a value or a list of values, such as ``{"Modality": "CT"}``.
    mask_column
        Column of the labels table that names each item's mask file.

    Raises
    ------
    ConfigurationError
        For an unknown level, a reserved or missing column, an invalid filter or
        an unreadable labels table.
    DatasetError
        When no item is left, or a labels table matches no item.
    """
    check_level(level)
    clashes = sorted(RESERVED_KEYS.intersection(columns))
    if clashes:
        raise ConfigurationError(
            f"columns {clashes} clash with item keys the loader sets; leave them out"
            " of columns"
        )
    if mask_column is not None and labels is None:
        raise ConfigurationError(
            f"mask column {mask_column!r} needs a labels table that names a mask file"
            " for each item"
        )
    table_source = read_labels_table(labels) if labels is not None else None
    parquet_label = label_column if table_source is None else None

    # 1. Read the Parquet columns the items need, filtered.
    requested = [VOLUME_PATH, VOLUME_INDEX, *IDENTIFIER_COLUMNS]
    if level == "slice":
        requested += ["SOPInstanceUID", NUMBER_OF_FRAMES]
    requested += [c for c in (*columns, parquet_label) if c is not None]
    requested = list(dict.fromkeys(requested))
    try:
        table = view.instances(columns=requested, filter=where_expression(where))
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
        raise ConfigurationError(
            f"filter {where!r} cannot be applied to dataset {view.name}: {exc}"
        ) from exc
    table = table.filter(pc.is_valid(table[VOLUME_PATH]))
    table = table.sort_by([(VOLUME_PATH, "ascending"), (VOLUME_INDEX, "ascending")])
    if parquet_label is not None:
        _check_parquet_label(view, table, parquet_label, level)
    for name in columns:
        if table.num_rows and table[name].null_count == table.num_rows:
            log.warning(
                "column %s is absent or empty in dataset %s; items carry None",
                name,
                view.name,
            )

    # 2. One item per stack or per slice.
    if level == "volume":
        table = _first_rows(table)
    else:
        table = _single_frame_rows(table, view.name)
    items = [_item(row, level, columns, parquet_label) for row in table.to_pylist()]
    if not items:
        raise DatasetError(
            f"dataset {view.name} has no {level} items with pixels that match"
            f" {where!r}; check the filter"
        )

    # 3. Labels and masks from a table, joined on the new UIDs.
    if table_source is not None:
        frame, base = table_source
        items = _join_table(
            items, frame, base, level, label_column, mask_column, view.name
        )
    if label_column is not None:
        items = _drop_unlabelled(items, label_column, view.name)
    log.debug("built %d %s items from dataset %s", len(items), level, view.name)
    return items


def check_level(level: str) -> None:
    """Raise a ConfigurationError unless ``level`` is ``volume`` or ``slice``."""
    if level not in LEVELS:
        raise ConfigurationError(
            f"level {level!r} is not supported; use 'volume' (one item per stack)"
            " or 'slice' (one item per instance)"
        )


def where_expression(where: Any) -> pc.Expression | None:
    """Turn a ``where`` argument into a ``pyarrow.compute`` expression.

    Raises
    ------
    ConfigurationError
        When ``where`` is neither an expression nor a mapping of columns.
    """
    if where is None or isinstance(where, pc.Expression):
        return where
    if not isinstance(where, Mapping) or not where:
        raise ConfigurationError(
            f"where must be a pyarrow.compute expression or a mapping such as"
            f" {{'Modality': 'CT'}}, not {where!r}"
        )
    expression = None
    for column, value in where.items():
        if isinstance(value, (list, tuple, set, frozenset)):
            condition = pc.field(column).isin(list(value))
        else:
            condition = pc.field(column) == value
        expression = condition if expression is None else expression & condition
    return expression


def read_labels_table(labels: Any) -> tuple[Any, Path]:
    """Read a labels table; return it with the folder its relative paths start from.

    Raises
    ------
    ConfigurationError
        When the file is missing, has an unknown suffix, or cannot be read.
    """
    import pandas as pd

    if isinstance(labels, pd.DataFrame):
        return labels, Path.cwd()
    path = Path(labels).expanduser()
    if not path.is_file():
        raise ConfigurationError(f"labels table {path} not found")
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            # UIDs stay text: a UID such as 1.2 would otherwise become a float.
            frame = pd.read_csv(
                path,
                dtype={"SeriesInstanceUID": str, "SOPInstanceUID": str},
            )
        elif suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(path)
        else:
            raise ConfigurationError(
                f"labels table {path} has suffix {suffix!r}; use a .csv or .parquet"
                " file, or pass a pandas DataFrame"
            )
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise ConfigurationError(
            f"labels table {path} could not be read: {exc}"
        ) from exc
    return frame, path.resolve().parent


def _check_parquet_label(
    view: DatasetView, table: pa.Table, label_column: str, level: str
) -> None:
    column = table[label_column]
    if table.num_rows and column.null_count == table.num_rows:
        raise ConfigurationError(
            f"label column {label_column!r} is missing or empty in dataset"
            f" {view.name}; name a Parquet column that holds labels, or pass a labels"
            " table (labels=...)"
        )
    if level == "volume":
        counts = table.group_by(VOLUME_PATH).aggregate(
            [(label_column, "count_distinct")]
        )
        if (
            table.num_rows
            and pc.max(counts[f"{label_column}_count_distinct"]).as_py() > 1
        ):
            raise ConfigurationError(
                f"label column {label_column!r} differs between the slices of a"
                " stack; use level='slice', or a labels table with one label per"
                " SeriesInstanceUID"
            )


def _first_rows(table: pa.Table) -> pa.Table:
    """Keep the first row (lowest volume_index) of each stack; ``table`` is sorted."""
    paths = table[VOLUME_PATH].to_pylist()
    first = [i for i, path in enumerate(paths) if i == 0 or path != paths[i - 1]]
    return table.take(pa.array(first, type=pa.int64()))


def _single_frame_rows(table: pa.Table, dataset_name: str) -> pa.Table:
    frames = table[NUMBER_OF_FRAMES]
    multi = pc.fill_null(pc.greater(frames.cast(pa.int64()), 1), False)
    count = pc.sum(multi).as_py() or 0
    if count:
        log.warning(
            "left out %d multi-frame instances of dataset %s: slice items are one per"
            " instance; read them with level='volume'",
            count,
            dataset_name,
        )
        table = table.filter(pc.invert(multi))
    return table


def _item(
    row: dict[str, Any],
    level: str,
    columns: Sequence[str],
    label_column: str | None,
) -> dict[str, Any]:
    item: dict[str, Any] = {"image": row[VOLUME_PATH]}
    if level == "slice":
        item[VOLUME_INDEX] = int(row[VOLUME_INDEX])
    for name in IDENTIFIER_COLUMNS:
        item[name] = _plain(row[name])
    if level == "slice":
        item["SOPInstanceUID"] = _plain(row["SOPInstanceUID"])
    for name in columns:
        item[name] = _plain(row[name])
    if label_column is not None:
        item["label"] = _plain(row[label_column])
    return item


def _join_table(
    items: list[dict[str, Any]],
    frame: Any,
    base: Path,
    level: str,
    label_column: str | None,
    mask_column: str | None,
    dataset_name: str,
) -> list[dict[str, Any]]:
    key = "SeriesInstanceUID"
    if level == "slice" and "SOPInstanceUID" in frame.columns:
        key = "SOPInstanceUID"
    if key not in frame.columns:
        expected = "SOPInstanceUID or SeriesInstanceUID" if level == "slice" else key
        raise ConfigurationError(
            f"labels table has no {expected} column (it has {list(frame.columns)});"
            f" {level} labels join on the dataset's new UIDs"
        )
    for name, role in ((label_column, "label"), (mask_column, "mask")):
        if name is not None and name not in frame.columns:
            raise ConfigurationError(
                f"{role} column {name!r} not found in the labels table; it has"
                f" {list(frame.columns)}"
            )
    keys = frame[key].astype(str)
    duplicated = keys[keys.duplicated()]
    if len(duplicated):
        raise ConfigurationError(
            f"labels table has {len(duplicated)} repeated {key} values (first"
            f" {duplicated.iloc[0]}); give one row per {key}"
        )

    labels = _column_values(frame, label_column)
    masks = _column_values(frame, mask_column)
    positions = {uid: i for i, uid in enumerate(keys)}
    joined = []
    for item in items:
        position = positions.get(str(item[key]))
        if position is None:
            continue
        if labels is not None:
            item["label"] = labels[position]
        if masks is not None:
            mask = masks[position]
            item["mask"] = None if mask is None else str(base / Path(str(mask)))
        joined.append(item)
    if not joined:
        raise DatasetError(
            f"labels table does not join: none of its {len(keys)} {key} values occur"
            f" among the {len(items)} {level} items of dataset {dataset_name}; labels"
            " must use the dataset's new (de-identified) UIDs, as its Parquet files"
            " hold them"
        )
    if len(joined) < len(items):
        log.warning(
            "%d of %d %s items of dataset %s have no row in the labels table; left out",
            len(items) - len(joined),
            len(items),
            level,
            dataset_name,
        )
    if mask_column is not None:
        joined = [item for item in joined if item["mask"] is not None]
    return joined


def _column_values(frame: Any, name: str | None) -> list[Any] | None:
    if name is None:
        return None
    return [_plain(value) for value in frame[name].tolist()]


def _drop_unlabelled(
    items: list[dict[str, Any]], label_column: str, dataset_name: str
) -> list[dict[str, Any]]:
    labelled = [item for item in items if item.get("label") is not None]
    if not labelled:
        raise DatasetError(
            f"no item of dataset {dataset_name} has a value in label column"
            f" {label_column!r}"
        )
    if len(labelled) < len(items):
        log.warning(
            "%d of %d items of dataset %s have no value in %s; left out",
            len(items) - len(labelled),
            len(items),
            dataset_name,
            label_column,
        )
    return labelled


def _plain(value: Any) -> Any:
    """Turn a cell into a plain Python value that collates and pickles stably."""
    if value is None:
        return None
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, (dt.date, dt.time, dt.datetime)):
        return value.isoformat()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)):
        return value
    if _is_missing(value):
        return None
    return value


def _is_missing(value: Any) -> bool:
    import pandas as pd

    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def unique_values(items: Iterable[Mapping[str, Any]], key: str) -> list[Any]:
    """Return the distinct values of ``key`` in ``items``, sorted."""
    return sorted({item[key] for item in items}, key=lambda v: (type(v).__name__, v))
