"""The dataset folder: layout, atomic writes, resumption and finalisation.

A dataset folder holds::

    manifest.json            what was ingested, how, by which software (manifest.py)
    instances/<series>.parquet   one row per instance, one file per series
    volumes.zarr/<series>/<stack>   pixel volumes (volumes.py)
    quarantine/<series>.json     instances of a series that were not written, and why
    quarantine.csv           all of those, one row per instance, for people to read

Every file is written under a temporary name in the same folder and renamed into
place, so a reader (or a run killed with SIGKILL) never sees half a file. A series is
done when its Parquet file exists: the Zarr group and the quarantine list are
written before it, and the Parquet file's metadata records a fingerprint of the
source instances, so a re-run skips a series whose source has not changed and
redoes one whose source has. One process at a time writes a dataset folder: the
driver holds an exclusive lock on ``.lock`` for the whole run.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from workbench.dataset.schema import schema_for_columns
from workbench.errors import DatasetError

__all__ = [
    "INSTANCES_DIR",
    "MANIFEST_FILE",
    "QUARANTINE_REPORT",
    "VOLUMES_STORE",
    "DatasetFolder",
    "QuarantineRecord",
    "SeriesRecord",
    "atomic_write_bytes",
    "atomic_write_text",
]

log = logging.getLogger(__name__)

INSTANCES_DIR = "instances"
VOLUMES_STORE = "volumes.zarr"
QUARANTINE_DIR = "quarantine"
QUARANTINE_REPORT = "quarantine.csv"
MANIFEST_FILE = "manifest.json"
LOCK_FILE = ".lock"
FINGERPRINT_KEY = b"workbench.source_fingerprint"
SOURCE_IDS_KEY = b"workbench.source_ids"
QUARANTINE_FIELDS = ("series", "source", "source_id", "stage", "reason_code", "reason")


@dataclass(frozen=True)
class SeriesRecord:
    """What a finished series' Parquet file says about itself."""

    series_uid: str
    fingerprint: str
    rows: int
    quarantined: int
    source_ids: frozenset[str]


@dataclass(frozen=True)
class QuarantineRecord:
    """A series' quarantine list as stored, with the run's fingerprint and row count."""

    fingerprint: str
    written: int
    entries: list[dict[str, str]]


class DatasetFolder:
    """One dataset folder on disk.

    Parameters
    ----------
    root
        The folder; created by :meth:`prepare` when missing.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.instances = self.root / INSTANCES_DIR
        self.volumes = self.root / VOLUMES_STORE
        self.quarantine = self.root / QUARANTINE_DIR
        self.manifest_path = self.root / MANIFEST_FILE
        self._lock_handle: Any = None

    # Set-up and locking

    def prepare(self) -> None:
        """Create the layout and remove what an interrupted run left behind."""
        import zarr

        for folder in (self.root, self.instances, self.quarantine):
            folder.mkdir(parents=True, exist_ok=True)
        if not (self.volumes / "zarr.json").exists():
            zarr.open_group(self.volumes, mode="a", zarr_format=3)
        removed = 0
        for folder in (self.root, self.instances, self.quarantine, self.volumes):
            for leftover in folder.glob(".*"):
                if leftover.name in (LOCK_FILE,) or not _is_temporary(leftover.name):
                    continue
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed %d partial files left by an interrupted run", removed)

    @contextlib.contextmanager
    def locked(self) -> Iterator[DatasetFolder]:
        """Hold the folder's write lock; raise if another process holds it."""
        self.root.mkdir(parents=True, exist_ok=True)
        handle = (self.root / LOCK_FILE).open("a")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            handle.close()
            raise DatasetError(
                f"another process is writing to {self.root}; wait for it to finish"
                " or choose another --out folder"
            ) from exc
        try:
            yield self
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()

    # Series

    def part_path(self, series_uid: str) -> Path:
        """Return the Parquet file of one series."""
        return self.instances / f"{series_uid}.parquet"

    def series_record(self, series_uid: str) -> SeriesRecord | None:
        """Return what the finished series says about itself, or None if not done."""
        path = self.part_path(series_uid)
        if not path.exists():
            return None
        try:
            metadata = pq.read_metadata(path)
        except (OSError, pa.ArrowInvalid) as exc:
            log.warning(
                "series part %s is unreadable (%s); it will be redone", path.name, exc
            )
            return None
        extra = metadata.metadata or {}
        return SeriesRecord(
            series_uid=series_uid,
            fingerprint=extra.get(FINGERPRINT_KEY, b"").decode(),
            rows=metadata.num_rows,
            quarantined=int(extra.get(b"workbench.quarantined", b"0")),
            source_ids=frozenset(json.loads(extra.get(SOURCE_IDS_KEY, b"[]"))),
        )

    def write_series(
        self,
        series_uid: str,
        rows: list[dict[str, Any]],
        types: dict[str, pa.DataType],
        *,
        fingerprint: str,
        quarantined: list[dict[str, str]],
        source_ids: list[str],
    ) -> None:
        """Write a series' quarantine list, then its Parquet part, each atomically.

        The part's metadata records the source fingerprint and keyed hashes of the
        source ids of its instances, so a later run can tell whether rewriting the
        series would drop an instance. A series with no row left (every instance
        quarantined) gets no Parquet part: its quarantine list records that.
        """
        self.write_quarantine(
            series_uid, quarantined, fingerprint=fingerprint, written=len(rows)
        )
        if not rows:
            self.part_path(series_uid).unlink(missing_ok=True)
            return
        schema = schema_for_columns(types).with_metadata(
            {
                FINGERPRINT_KEY: fingerprint.encode(),
                SOURCE_IDS_KEY: json.dumps(sorted(source_ids)).encode(),
                b"workbench.quarantined": str(len(quarantined)).encode(),
            }
        )
        table = pa.Table.from_pylist(rows, schema=schema)
        _write_table(self.part_path(series_uid), table)

    def write_quarantine(
        self,
        key: str,
        entries: list[dict[str, str]],
        *,
        fingerprint: str,
        written: int = 0,
    ) -> None:
        """Record the quarantined instances of one series (or group of files).

        ``written`` is the number of rows the series' Parquet part will hold; 0
        means the series is complete without one.
        """
        document = {"fingerprint": fingerprint, "written": written, "entries": entries}
        atomic_write_text(
            self.quarantine / f"{key}.json",
            json.dumps(document, indent=1, ensure_ascii=False),
        )

    def read_quarantine(self, key: str) -> QuarantineRecord | None:
        """Return what was recorded with a series' quarantine list, or None."""
        path = self.quarantine / f"{key}.json"
        if not path.exists():
            return None
        document = json.loads(path.read_text())
        return QuarantineRecord(
            fingerprint=document.get("fingerprint", ""),
            written=int(document.get("written", -1)),
            entries=document.get("entries", []),
        )

    # Finalisation

    def unify_schemas(self) -> pa.Schema | None:
        """Give every Parquet part the same schema: the union of their columns.

        Types come from the data dictionary, so columns of one name agree; a part
        that lacks a column gets it as nulls. Only parts whose schema differs are
        rewritten.
        """
        parts = sorted(self.instances.glob("*.parquet"))
        if not parts:
            return None
        schemas = {path: pq.read_schema(path) for path in parts}
        columns: dict[str, pa.DataType] = {}
        for schema in schemas.values():
            for schema_field in schema:
                columns.setdefault(schema_field.name, schema_field.type)
        union = schema_for_columns(columns)
        rewritten = 0
        for path, schema in schemas.items():
            if schema.remove_metadata().equals(union):
                continue
            table = pq.read_table(path)
            metadata = table.schema.metadata
            arrays = [
                table.column(name)
                if name in table.column_names
                else pa.nulls(table.num_rows, union.field(name).type)
                for name in union.names
            ]
            unified = pa.Table.from_arrays(arrays, schema=union.with_metadata(metadata))
            _write_table(path, unified)
            rewritten += 1
        if rewritten:
            log.info(
                "rewrote %d of %d Parquet parts to one schema", rewritten, len(parts)
            )
        return union

    def consolidate_volumes(self) -> None:
        """Consolidate the Zarr store's metadata, once, from this process."""
        import warnings

        import zarr

        with warnings.catch_warnings():
            # zarr warns that consolidated metadata is not yet part of the v3
            # specification; xarray and zarr-python read it.
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(self.volumes)

    def write_quarantine_report(self) -> int:
        """Write ``quarantine.csv`` from the per-series lists; return its row count."""
        entries = []
        for path in sorted(self.quarantine.glob("*.json")):
            entries.extend(json.loads(path.read_text()).get("entries", []))
        buffer = io.StringIO()
        writer = csv.DictWriter(
            buffer, fieldnames=QUARANTINE_FIELDS, extrasaction="ignore"
        )
        writer.writeheader()
        writer.writerows(entries)
        atomic_write_text(self.root / QUARANTINE_REPORT, buffer.getvalue())
        return len(entries)

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        """Write ``manifest.json`` atomically."""
        atomic_write_text(
            self.manifest_path,
            json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
        )

    def read_manifest(self) -> dict[str, Any] | None:
        """Return the manifest, or None when the folder has none yet."""
        if not self.manifest_path.exists():
            return None
        return json.loads(self.manifest_path.read_text())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` as UTF-8 to ``path`` through a temporary file and a rename."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _write_table(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        pq.write_table(table, tmp, compression="zstd")
        with tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _is_temporary(name: str) -> bool:
    return name.endswith(".tmp") or name.startswith((".staging-", ".replaced-"))
