"""A de-identified dataset opened in a notebook for a stated purpose.

:func:`open_dataset` wraps :class:`~workbench.dataset.reader.DatasetView`, so it opens
only datasets whose manifest marks them de-identified and verified. Every read
through the returned :class:`AuditedDataset` appends a ``dataset.read`` record to the
audit log with the user, the purpose and what was read (row and slice counts, a
volume path, the SQL text), never a pixel or cell value::

    import workbench.notebook as wb

    ds = wb.open_dataset("datasets/demo", purpose="nodule cohort review")
    ds.instances                      # pandas DataFrame, one row per instance
    ds.sql("select Modality, count(*) from instances group by 1")
    uid = ds.series.SeriesInstanceUID.iloc[0]
    ds.volume(uid)                    # xarray.DataArray in mm coordinates
    ds.show(uid, window="lung")       # montage of windowed slices
    ds.viewer(uid)                    # slider over the slices
    ds.to_monai(level="slice")        # MONAI dataset (workbench.loaders)
    ds.to_gemma(prompt_template="Modality: {Modality}.")  # Gemma 3n examples
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from workbench.audit import AuditEvent, open_audit_log
from workbench.dataset.reader import DatasetView
from workbench.dataset.store import QUARANTINE_FIELDS, QUARANTINE_REPORT
from workbench.errors import ConfigurationError, DatasetError
from workbench.notebook import display
from workbench.notebook.windows import (
    WINDOW_PRESETS,
    Window,
    first_window_value,
    resolve_window,
)

__all__ = ["DEFAULT_MONTAGE_SLICES", "AuditedDataset", "open_dataset"]

log = logging.getLogger(__name__)

DEFAULT_MONTAGE_SLICES = 24
# Stored pixel units for which the CT window presets are meaningful.
HOUNSFIELD_UNITS = "HU"


def open_dataset(
    path: str | Path, purpose: str | None = None, *, audit_url: str | None = None
) -> AuditedDataset:
    """Open a de-identified dataset folder for reading in a notebook.

    Parameters
    ----------
    path
        The dataset folder written by ``workbench ingest``.
    purpose
        Why the data is read, in your words (``"nodule cohort review"``). The
        audit log records it with every read. Required.
    audit_url
        The audit log to record reads in (default: ``WORKBENCH_AUDIT_URL``, else
        ``audit.sqlite`` in the workbench home).

    Raises
    ------
    ConfigurationError
        When ``purpose`` is missing or blank.
    DatasetError
        When the folder does not exist, is not a workbench dataset, or its
        manifest does not say it was de-identified and verified.
    """
    if not isinstance(purpose, str) or not purpose.strip():
        raise ConfigurationError(
            f"open_dataset({str(path)!r}) needs a purpose, because every read is"
            " recorded in the audit log with it; pass, for example,"
            " purpose='nodule cohort review'"
        )
    view = DatasetView.open(path)
    log.info("opened dataset %s version %s", view.name, view.version)
    return AuditedDataset(view, purpose.strip(), audit_url=audit_url)


class AuditedDataset:
    """A dataset opened for one purpose, whose reads are recorded in the audit log.

    Create it with :func:`open_dataset`. Rows are read from Parquet once and kept
    in memory; volumes and slices are read from Zarr on each call.

    Parameters
    ----------
    view
        The opened dataset folder.
    purpose
        Why the data is read; recorded with every read.
    audit_url
        The audit log to record reads in (default: the workbench's own).
    """

    def __init__(
        self, view: DatasetView, purpose: str, *, audit_url: str | None = None
    ) -> None:
        self.view = view
        self.purpose = purpose
        self._audit_url = audit_url
        self._table: pa.Table | None = None
        self._instances: pd.DataFrame | None = None
        self._series: pd.DataFrame | None = None
        self._rows_recorded = False
        self._series_recorded = False
        self._connection: Any = None

    def __repr__(self) -> str:
        return (
            f"AuditedDataset({self.name!r}, version={self.version!r},"
            f" purpose={self.purpose!r})"
        )

    @property
    def name(self) -> str:
        """The dataset folder's name."""
        return self.view.name

    @property
    def version(self) -> str:
        """The dataset version from the manifest: changes with the content."""
        return self.view.version

    @property
    def manifest(self) -> dict[str, Any]:
        """The manifest: source, de-identification method, counts, last run."""
        return self.view.manifest

    @property
    def path(self) -> Path:
        """The dataset folder, as an absolute path."""
        return self.view.root

    # Rows

    @property
    def table(self) -> pa.Table:
        """Every Parquet row as a pyarrow Table, read once and then kept."""
        table = self._load_table()
        if not self._rows_recorded:
            self._record(
                {"read": "rows", "rows": table.num_rows, "columns": table.num_columns}
            )
            self._rows_recorded = True
        return table

    @property
    def instances(self) -> pd.DataFrame:
        """Every Parquet row as a pandas DataFrame, one row per instance.

        The DataFrame is built on first access and the same object is returned
        afterwards, so changes made to it persist; copy it before editing.
        """
        if self._instances is None:
            self._instances = self.table.to_pandas()
        return self._instances

    def sql(self, query: str) -> pd.DataFrame:
        """Run a DuckDB SQL query over the rows, available as the table ``instances``.

        The query can read only this dataset: DuckDB's file access and extension
        downloads are turned off, so ``read_csv``, ``COPY ... TO`` and ``INSTALL``
        fail. The audit log records the query text and the result's row count.

        Raises
        ------
        DatasetError
            When DuckDB rejects the query; the message carries DuckDB's reason.
        """
        import duckdb

        connection = self._duckdb()
        try:
            result = connection.execute(query).df()
        except duckdb.Error as exc:
            raise DatasetError(
                f"query on dataset {self.name} failed: {exc}; the rows are in the"
                " table named instances, with DICOM keywords as column names"
            ) from exc
        self._record({"read": "query", "query": query, "rows": len(result)})
        return result

    @property
    def series(self) -> pd.DataFrame:
        """One row per pixel stack: ``volume_path``, ``slices`` and series facts.

        A series usually has one stack; slices of other sizes or orientations go
        to further stacks (see :mod:`workbench.dataset.volumes`).
        """
        frame = self._series_frame()
        if not self._series_recorded:
            self._record({"read": "series", "stacks": len(frame)})
            self._series_recorded = True
        return frame.copy()

    @property
    def quarantine(self) -> pd.DataFrame:
        """The quarantine report: instances not written, with stage and reason."""
        report = self.view.root / QUARANTINE_REPORT
        if report.exists():
            frame = pd.read_csv(report, dtype=str, keep_default_na=False)
        else:
            frame = pd.DataFrame(columns=list(QUARANTINE_FIELDS))
        self._record({"read": "quarantine report", "rows": len(frame)})
        return frame

    # Pixels

    def volume(self, series: str) -> Any:
        """Return one stack's pixels as a lazy ``xarray.DataArray`` (dims z, y, x).

        Parameters
        ----------
        series
            A SeriesInstanceUID (its first stack) or a ``volume_path`` from
            :attr:`series`.

        Returns
        -------
        xarray.DataArray
            Pixel values after rescale (HU for CT), with ``z``, ``y`` and ``x`` in
            mm, ``SOPInstanceUID`` along ``z``, and the stack's attributes
            (``affine``, ``PixelSpacing``, ``units`` and others).

        Raises
        ------
        DatasetError
            When the dataset has no such series or volume.
        """
        path = self._volume_path(series)
        stack = self.view.volume(path)
        pixels = stack["pixels"].assign_attrs({**stack.attrs, **stack["pixels"].attrs})
        self._record(
            {"read": "volume", "volume": path, "slices": int(stack.sizes["z"])}
        )
        return pixels

    def show(
        self,
        series: str,
        window: str | Sequence[float] = "auto",
        columns: int = 6,
        slices: int | Sequence[int] = DEFAULT_MONTAGE_SLICES,
    ) -> Any:
        """Draw a montage of windowed slices of one stack.

        Parameters
        ----------
        series
            A SeriesInstanceUID (its first stack) or a ``volume_path``.
        window
            ``"auto"`` (WindowCenter and WindowWidth of the series, else the 1st
            to 99th percentile of the shown pixels), a preset (``"lung"``,
            ``"mediastinum"`` or ``"soft-tissue"``, ``"bone"``, ``"brain"``), or
            a ``(center, width)`` pair in the pixel units.
        columns
            Slices per row.
        slices
            How many slices to show, evenly spaced from first to last, or the
            0-based indices of the slices to show.

        Returns
        -------
        matplotlib.figure.Figure

        Raises
        ------
        DatasetError
            When the dataset has no such series or volume.
        ConfigurationError
            For an unknown window, or slice indices out of range.
        """
        if columns < 1:
            raise ConfigurationError(f"columns must be at least 1, not {columns}")
        path = self._volume_path(series)
        stack = self.view.volume(path)
        pixels = self.view.pixel_array(path)
        indices = _choose_slices(int(pixels.shape[0]), slices)
        images = [np.asarray(pixels[index]) for index in indices]
        chosen = self._window(path, stack.attrs, window, images)

        figure = display.montage(
            images,
            window=chosen,
            titles=[_slice_caption(stack, index) for index in indices],
            columns=columns,
            extent=_extent_mm(stack),
            invert=stack.attrs.get("PhotometricInterpretation") == "MONOCHROME1",
            title=_montage_title(stack, path, chosen),
        )
        self._record(
            {"read": "montage", "volume": path, "slices": len(indices)},
        )
        return figure

    def viewer(self, series: str, window: str | Sequence[float] = "auto") -> Any:
        """Build an interactive slice viewer: a slider and the chosen slice.

        Slices are read when the slider reaches them. The audit log records the
        viewer once, with the stack's slice count, not each slice shown.

        Parameters
        ----------
        series
            A SeriesInstanceUID (its first stack) or a ``volume_path``.
        window
            As for :meth:`show`; ``"auto"`` without a stored window uses the
            middle slice's percentiles.

        Returns
        -------
        ipywidgets.VBox
        """
        path = self._volume_path(series)
        stack = self.view.volume(path)
        pixels = self.view.pixel_array(path)
        count = int(pixels.shape[0])
        middle = np.asarray(pixels[count // 2])
        chosen = self._window(path, stack.attrs, window, [middle])

        widget = display.slice_viewer(
            lambda index: np.asarray(pixels[index]),
            count=count,
            window=chosen,
            labels=[_slice_caption(stack, index) for index in range(count)],
            aspect=_aspect_mm(stack),
            invert=stack.attrs.get("PhotometricInterpretation") == "MONOCHROME1",
            title=_montage_title(stack, path, chosen),
        )
        self._record({"read": "viewer", "volume": path, "slices": count})
        return widget

    # Loaders

    def to_monai(self, **kwargs: Any) -> Any:
        """Return a MONAI dataset of this dataset's volumes or slices.

        Calls :func:`workbench.loaders.monai_dataset` with this dataset's folder
        and purpose; ``kwargs`` are its other arguments (``level``,
        ``transforms``, ``labels``, ``label_column``, ``where``, ``cache``...).
        The loader records its read in the workbench audit log, not in the
        ``audit_url`` given to :func:`open_dataset`.

        Returns
        -------
        monai.data.Dataset
        """
        from workbench.loaders import monai_dataset

        return monai_dataset(self.path, purpose=self.purpose, **kwargs)

    def to_gemma(self, **kwargs: Any) -> list[Any]:
        """Return Gemma 3n examples: windowed images and a prompt per pixel stack.

        Calls :func:`workbench.loaders.gemma_examples` with this dataset's folder
        and purpose; ``kwargs`` are its other arguments (``prompt_template``,
        ``target_column``, ``slices``, ``window``, ``where``...). The loader
        records its read in the workbench audit log, not in the ``audit_url``
        given to :func:`open_dataset`.

        Returns
        -------
        list of workbench.loaders.GemmaExample
        """
        from workbench.loaders import gemma_examples

        return list(gemma_examples(self.path, purpose=self.purpose, **kwargs))

    # Internals

    def _record(self, details: dict[str, Any]) -> None:
        """Append one ``dataset.read`` record; raises AuditError when it fails."""
        event = AuditEvent(
            action="dataset.read",
            resource=f"dataset:{self.name}",
            purpose=self.purpose,
            details={**details, "dataset_version": self.version},
        )
        with open_audit_log(self._audit_url) as audit:
            audit.append(event)

    def _load_table(self) -> pa.Table:
        if self._table is None:
            self._table = self.view.instances()
        return self._table

    def _duckdb(self) -> Any:
        """Return a DuckDB connection that can read the rows but no file or network."""
        if self._connection is None:
            import duckdb

            connection = duckdb.connect(
                config={
                    "enable_external_access": False,
                    "autoinstall_known_extensions": False,
                    "autoload_known_extensions": False,
                }
            )
            connection.register("instances", self._load_table())
            connection.execute("SET lock_configuration = true")
            self._connection = connection
        return self._connection

    def _series_frame(self) -> pd.DataFrame:
        if self._series is None:
            self._series = self.view.volumes()
        return self._series

    def _volume_path(self, series: str) -> str:
        """Return the volume path of a SeriesInstanceUID (first stack) or a path."""
        frame = self._series_frame()
        if not isinstance(series, str) or not series:
            raise DatasetError(
                f"series must be a SeriesInstanceUID or a volume_path string, got"
                f" {series!r}"
            )
        if series in set(frame["volume_path"]):
            return series
        stacks = frame.loc[frame["SeriesInstanceUID"] == series, "volume_path"]
        if stacks.empty:
            raise DatasetError(
                f"dataset {self.name} has no series or volume {series!r}; take a"
                " SeriesInstanceUID or volume_path from ds.series"
            )
        return str(min(stacks, key=_stack_number))

    def _stored_window(self, path: str) -> tuple[float, float] | None:
        """Return the first WindowCenter and WindowWidth stored for a stack."""
        rows = self._load_table() if self._table is not None else None
        columns = ["volume_path", "WindowCenter", "WindowWidth"]
        condition = pc.field("volume_path") == path
        if rows is None or not set(columns) <= set(rows.column_names):
            rows = self.view.instances(columns=columns, filter=condition)
        else:
            rows = rows.select(columns).filter(condition)
        for center, width in zip(
            rows.column("WindowCenter").to_pylist(),
            rows.column("WindowWidth").to_pylist(),
            strict=True,
        ):
            pair = (first_window_value(center), first_window_value(width))
            if pair[0] is not None and pair[1] is not None:
                return (pair[0], pair[1])
        return None

    def _window(
        self,
        path: str,
        attrs: dict[str, Any],
        window: str | Sequence[float],
        images: list[np.ndarray],
    ) -> Window:
        stored = None
        if isinstance(window, str) and window.strip().lower() == "auto":
            stored = self._stored_window(path)
        sample = np.stack(images) if stored is None and images else None
        chosen = resolve_window(window, stored=stored, pixels=sample)
        units = str(attrs.get("units", ""))
        if chosen.source in WINDOW_PRESETS and units != HOUNSFIELD_UNITS:
            warnings.warn(
                f"window {chosen.source!r} is a CT preset in HU, but the values of"
                f" volume {path} are in {units or 'no stated unit'!r}; pass"
                " window='auto' or a (center, width) pair in those units",
                UserWarning,
                stacklevel=3,
            )
        return chosen


def _stack_number(volume_path: str) -> int:
    tail = volume_path.rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _choose_slices(count: int, slices: int | Sequence[int]) -> list[int]:
    """Return slice indices: ``slices`` evenly spaced ones, or those given."""
    if isinstance(slices, (int, np.integer)):
        if slices < 1:
            raise ConfigurationError(f"slices must be at least 1, not {slices}")
        wanted = min(int(slices), count)
        return sorted({int(i) for i in np.linspace(0, count - 1, wanted).round()})
    indices = [int(index) for index in slices]
    outside = [index for index in indices if not 0 <= index < count]
    if outside or not indices:
        raise ConfigurationError(
            f"slice indices {outside or indices} are not in 0..{count - 1}; the"
            f" stack has {count} slices"
        )
    return indices


def _slice_caption(stack: Any, index: int) -> str:
    z = float(stack["z"].values[index])
    return f"z {z:.1f} mm"


def _spacing(coordinate: np.ndarray) -> float:
    return float(coordinate[1] - coordinate[0]) if coordinate.size > 1 else 1.0


def _extent_mm(stack: Any) -> tuple[float, float, float, float]:
    """Return the image extent in mm as matplotlib's (left, right, bottom, top)."""
    x = np.asarray(stack["x"].values, dtype=float)
    y = np.asarray(stack["y"].values, dtype=float)
    dx, dy = _spacing(x), _spacing(y)
    return (
        float(x[0]) - dx / 2,
        float(x[-1]) + dx / 2,
        float(y[-1]) + dy / 2,
        float(y[0]) - dy / 2,
    )


def _aspect_mm(stack: Any) -> float:
    left, right, bottom, top = _extent_mm(stack)
    width = abs(right - left)
    return abs(bottom - top) / width if width > 0 else 1.0


def _montage_title(stack: Any, path: str, window: Window) -> str:
    modality = stack.attrs.get("Modality") or "?"
    units = " HU" if stack.attrs.get("units") == HOUNSFIELD_UNITS else ""
    return (
        f"{modality} {path}  window {window.center:g}/{window.width:g}{units}"
        f" ({window.source})"
    )
