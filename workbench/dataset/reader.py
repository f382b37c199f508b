"""Reading a de-identified dataset folder: rows from Parquet, volumes from Zarr.

:class:`DatasetView` is what loaders, notebooks and jobs read a dataset through. It
opens only de-identified, verified datasets (the manifest says so), reads Parquet
columns on demand, and opens the Zarr store lazily and once per process, so a view
created before PyTorch forks its data-loader workers never shares an open store
with them::

    view = DatasetView.open("datasets/demo")
    rows = view.instances(columns=["SOPInstanceUID", "Modality"])   # pyarrow Table
    stacks = view.volumes()                 # pandas DataFrame, one row per stack
    volume = view.volume(stacks.volume_path[0])   # xarray Dataset, lazy
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as pads

from workbench.dataset.manifest import require_deidentified
from workbench.dataset.store import INSTANCES_DIR, VOLUMES_STORE
from workbench.errors import DatasetError

__all__ = ["VOLUME_COLUMNS", "DatasetView"]

# Columns describing each stack in :meth:`DatasetView.volumes`.
VOLUME_COLUMNS = (
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "BodyPartExamined",
    "SeriesNumber",
    "StudyDate",
)


@dataclass
class DatasetView:
    """A de-identified dataset folder, opened for reading.

    Attributes
    ----------
    root
        The dataset folder.
    manifest
        Its manifest.
    """

    root: Path
    manifest: dict[str, Any]
    _stores: dict[int, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, root: Path | str) -> DatasetView:
        """Open a dataset folder written by ``workbench ingest``.

        Raises
        ------
        DatasetError
            When the folder is not a workbench dataset, or its manifest does not
            say it was de-identified and verified.
        """
        root = Path(root).expanduser().resolve()
        if not root.is_dir():
            raise DatasetError(f"dataset folder {root} does not exist")
        manifest = require_deidentified(root)
        if not list((root / INSTANCES_DIR).glob("*.parquet")):
            raise DatasetError(f"dataset {root} holds no instances yet")
        return cls(root=root, manifest=manifest)

    @property
    def version(self) -> str:
        """The dataset version: changes whenever the content does."""
        return str(self.manifest.get("dataset_version", ""))

    @property
    def name(self) -> str:
        """The dataset folder's name."""
        return self.root.name

    def __getstate__(self) -> dict[str, Any]:
        # Open stores never travel to another process.
        return {"root": self.root, "manifest": self.manifest, "_stores": {}}

    # Rows

    def instances(
        self, columns: Sequence[str] | None = None, filter: Any = None
    ) -> pa.Table:
        """Return Parquet rows, one per instance, optionally some columns only.

        Parameters
        ----------
        columns
            Column names (DICOM keywords); columns a dataset lacks are returned as
            nulls of type string, so callers can ask for optional attributes.
        filter
            A ``pyarrow.compute`` expression, such as
            ``pc.field("Modality") == "CT"``.
        """
        dataset = self._parquet()
        if columns is None:
            return dataset.to_table(filter=filter)
        present = [c for c in columns if c in dataset.schema.names]
        table = dataset.to_table(columns=present, filter=filter)
        for name in columns:
            if name not in present:
                table = table.append_column(name, pa.nulls(table.num_rows, pa.string()))
        return table.select(list(columns))

    def volumes(self, extra_columns: Sequence[str] = ()) -> Any:
        """Return one row per pixel stack: its path, slice count and series facts.

        Returns
        -------
        pandas.DataFrame
            ``volume_path``, ``slices`` and the columns of :data:`VOLUME_COLUMNS`
            plus ``extra_columns`` (the first instance's value), sorted by path.
        """
        wanted = ["volume_path", *VOLUME_COLUMNS, *extra_columns]
        frame = self.instances(columns=list(dict.fromkeys(wanted))).to_pandas()
        frame = frame[frame["volume_path"].notna()]
        grouped = frame.groupby("volume_path", sort=True)
        stacks = grouped.first()
        stacks.insert(0, "slices", grouped.size())
        return stacks.reset_index()

    # Volumes

    def volume(self, volume_path: str) -> Any:
        """Return one stack as a lazy ``xarray.Dataset`` (dims ``z, y, x``)."""
        import xarray as xr

        store = self._store()
        try:
            return xr.open_zarr(
                store, group=volume_path, zarr_format=3, consolidated=False
            )
        except (FileNotFoundError, KeyError) as exc:
            raise DatasetError(
                f"dataset {self.name} has no volume {volume_path!r}; take paths from"
                " the volume_path column"
            ) from exc

    def pixel_array(self, volume_path: str) -> Any:
        """Return a stack's pixels as a ``zarr.Array``: fast slice-wise reads.

        Index it like NumPy (``array[k]`` reads slice ``k``, one chunk); the values
        are rescaled already (see :mod:`workbench.dataset.volumes`).
        """
        import zarr

        try:
            return zarr.open_array(
                self._store(), path=f"{volume_path}/pixels", mode="r", zarr_format=3
            )
        except (FileNotFoundError, KeyError) as exc:
            raise DatasetError(
                f"dataset {self.name} has no volume {volume_path!r}; take paths from"
                " the volume_path column"
            ) from exc

    def _store(self) -> Any:
        """Open the Zarr store read-only, once per process (never before a fork)."""
        pid = os.getpid()
        store = self._stores.get(pid)
        if store is None:
            from zarr.storage import LocalStore

            store = LocalStore(self.root / VOLUMES_STORE, read_only=True)
            self._stores = {pid: store}
        return store

    def _parquet(self) -> pads.Dataset:
        parts = sorted((self.root / INSTANCES_DIR).glob("*.parquet"))
        return pads.dataset([str(p) for p in parts], format="parquet")
