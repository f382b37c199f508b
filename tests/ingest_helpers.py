"""Helpers for the ingest tests: run an ingest, and search everything it wrote."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pyarrow.parquet as pq
import xarray as xr
import zarr

from workbench.audit import open_audit_log


@contextlib.contextmanager
def orthanc_credentials(server: Any) -> Iterator[None]:
    """Expose a test Orthanc's credentials the way a user would: in the environment."""
    saved = {k: os.environ.get(k) for k in ("ORTHANC_USERNAME", "ORTHANC_PASSWORD")}
    os.environ["ORTHANC_USERNAME"] = server.username
    os.environ["ORTHANC_PASSWORD"] = server.password
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """Capture every record of the workbench loggers, DEBUG and up, as text."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setLevel(logging.DEBUG)
    logger = logging.getLogger("workbench")
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield buffer
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


def instances_table(out: Path) -> Any:
    """Read all Parquet parts of a dataset as one Arrow table."""
    parts = sorted((out / "instances").glob("*.parquet"))
    return pads.dataset([str(p) for p in parts], format="parquet").to_table()


def _texts_of(value: Any) -> Iterator[str]:
    if value is None:
        return
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _texts_of(item)
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _texts_of(item)
    elif isinstance(value, (dt.date, dt.datetime)):
        yield value.isoformat()
        yield value.strftime("%Y%m%d")
    else:
        yield str(value)


def written_texts(out: Path, audit_url: str | None = None) -> dict[str, str]:
    """Return, for each place an ingest writes, all of its text.

    Parquet cells (every column, dates in both ISO and DICOM form), Zarr metadata
    and string arrays, the manifest and the quarantine reports, and the audit log.
    """
    places: dict[str, str] = {}
    for part in sorted((out / "instances").glob("*.parquet")):
        table = pq.read_table(part)
        texts = []
        for column in table.column_names:
            for value in table.column(column).to_pylist():
                texts.extend(_texts_of(value))
        metadata = table.schema.metadata or {}
        texts.extend(v.decode("utf-8", "replace") for v in metadata.values())
        places[f"parquet:{part.name}"] = "\n".join(texts)
    for path in sorted(out.rglob("*")):
        if path.is_file() and (
            path.name == "zarr.json" or path.suffix in (".json", ".csv", ".toml")
        ):
            places[f"file:{path.relative_to(out)}"] = path.read_text(errors="replace")
    store = out / "volumes.zarr"
    if store.exists():
        root = zarr.open_group(store, mode="r")
        for series in root.group_keys():
            for stack in root[series].group_keys():
                volume = xr.open_zarr(
                    store, group=f"{series}/{stack}", zarr_format=3, consolidated=False
                )
                texts = [str(v) for v in volume.SOPInstanceUID.values]
                places[f"zarr:{series}/{stack}"] = "\n".join(texts)
    with open_audit_log(audit_url) as audit:
        records = [json.dumps(record.to_dict()) for record in audit.records()]
    places["audit"] = "\n".join(records)
    return places


def find_planted(places: dict[str, str], planted: set[str]) -> list[tuple[str, str]]:
    """Return (place, value) for each planted value found, ignoring case."""
    found = []
    upper = {place: text.upper() for place, text in places.items()}
    for value in planted:
        needle = value.upper()
        for place, text in upper.items():
            if needle in text:
                found.append((place, value))
    return found


def ingest_folder(folder: Path, out: Path, **options: Any) -> Any:
    """Ingest a folder of DICOM files with the real pipeline; return the summary."""
    from workbench.ingest import IngestConfig, run_ingest

    config = IngestConfig(
        out=out, folder=folder, purpose="field case test", progress=False, **options
    )
    return run_ingest(config)


def quarantine_entries(out: Path) -> list[dict[str, str]]:
    """Return the rows of a dataset's quarantine report."""
    import csv

    with (out / "quarantine.csv").open(newline="") as handle:
        return list(csv.DictReader(handle))


@contextlib.contextmanager
def fixed_deid_key(folder: Path) -> Iterator[Path]:
    """Use one constant de-identification key, so pseudonyms repeat across sessions.

    Tests whose outcome depends on pseudonyms (a split of patients into training
    and validation) need the same pseudonyms in every session.
    """
    from workbench.home import write_secret_file

    key_file = folder / "fixed-deid.key"
    write_secret_file(key_file, "5e" * 32 + "\n")
    saved = os.environ.get("WORKBENCH_DEID_KEY_FILE")
    os.environ["WORKBENCH_DEID_KEY_FILE"] = str(key_file)
    try:
        yield key_file
    finally:
        if saved is None:
            os.environ.pop("WORKBENCH_DEID_KEY_FILE", None)
        else:
            os.environ["WORKBENCH_DEID_KEY_FILE"] = saved
