"""Ingest one series, inside a Dask worker.

:func:`process_series` fetches the series' instance files, and for each instance:
parses it, quarantines it if it may show burned-in text, de-identifies it in memory,
verifies that no identifying value of the source survived (in the dataset and in
the Parquet row built from it), and decodes its pixels. It then stacks the pixels
by geometry, writes the Zarr group and the Parquet part (in that order, each
atomically), and returns a small summary for the driver's audit log and progress
bar. Nothing identifying leaves the worker: results carry Orthanc ids, hashed file
ids and new UIDs.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa

from workbench.dataset.schema import (
    INVALID_VALUES,
    VOLUME_INDEX,
    VOLUME_PATH,
    instance_row,
)
from workbench.dataset.store import DatasetFolder
from workbench.dataset.volumes import (
    DecodedInstance,
    decode_instance,
    plan_stacks,
    write_series_volumes,
)
from workbench.deidentify import (
    DeidentificationOptions,
    Deidentifier,
    Pseudonymizer,
    SourceIdentifiers,
    burned_in_reason,
    deidentify_instance,
    find_leaks_in_values,
)
from workbench.deidentify.recipe import compile_recipe
from workbench.dicomio import read_instance
from workbench.errors import DicomReadError, VerificationError, WorkbenchError
from workbench.ingest.sources import (
    FOLDER,
    SeriesTask,
    fetch_instances,
    hashed_source_ids,
)

__all__ = ["InstanceOutcome", "SeriesResult", "WorkerSettings", "process_series"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSettings:
    """What every worker needs, sent once per run.

    The key and the Orthanc password are in here: :meth:`__repr__` leaves them
    out, so they never reach a log or a Dask error report.
    """

    key: bytes
    recipe_texts: tuple[tuple[str, bytes], ...]
    options: DeidentificationOptions
    out: str
    orthanc: dict[str, Any] | None
    fetch_threads: int

    def __repr__(self) -> str:
        url = (self.orthanc or {}).get("url", "")
        return (
            f"WorkerSettings(out={self.out!r}, orthanc={url!r}, options={self.options})"
        )

    @property
    def digest(self) -> str:
        """Hash of what decides the output: key, recipe and options."""
        digest = hashlib.sha256(hashlib.sha256(self.key).digest())
        for name, text in self.recipe_texts:
            digest.update(name.encode() + b"\x00" + text)
        digest.update(repr(self.options).encode())
        return digest.hexdigest()


@dataclass(frozen=True)
class InstanceOutcome:
    """What happened to one instance: for the audit log, free of patient data."""

    source_id: str
    sop_instance_uid: str
    outcome: str
    reason_code: str = ""


@dataclass
class SeriesResult:
    """The summary a worker returns for one series."""

    key: str
    study_uid: str = ""
    written: int = 0
    quarantined: list[dict[str, str]] = field(default_factory=list)
    instances: list[InstanceOutcome] = field(default_factory=list)
    stacks: int = 0
    bytes_fetched: int = 0
    seconds: float = 0.0


# Built once per worker process and settings, not once per task.
_WORKER_STATE: dict[str, tuple[Deidentifier, Any]] = {}


def process_series(task: SeriesTask, settings: WorkerSettings) -> SeriesResult:
    """Fetch, de-identify, verify and write one series; return its summary.

    Raises
    ------
    WorkbenchError
        When the series cannot be fetched or written; nothing of it is written
        then, and a re-run tries it again.
    """
    started = time.perf_counter()
    deidentifier, fetch = _worker_state(settings, task.source)
    folder = DatasetFolder(Path(settings.out))
    result = SeriesResult(key=task.key)

    # 1. Fetch and handle each instance; the bytes are dropped as soon as parsed.
    rows: list[dict[str, Any]] = []
    types: dict[str, pa.DataType] = {}
    decoded: list[DecodedInstance] = []
    decoded_rows: list[int] = []
    series_identifiers = SourceIdentifiers()
    for index, data, error in fetch_instances(task, fetch, settings.fetch_threads):
        source_id = task.source_ids[index]
        if error is not None:
            raise WorkbenchError(
                f"could not fetch instance {source_id} of series {task.key}:"
                f" {type(error).__name__}: {error}"
            ) from error
        assert data is not None
        result.bytes_fetched += len(data)
        handled = _handle_instance(
            data, source_id, task, deidentifier, settings.options
        )
        if isinstance(handled, dict):
            result.quarantined.append(handled)
            result.instances.append(
                InstanceOutcome(source_id, "", "quarantined", handled["reason_code"])
            )
            continue
        row, row_types, instance, identifiers = handled
        _merge(series_identifiers, identifiers)
        if instance is not None:
            decoded.append(instance)
            decoded_rows.append(len(rows))
        rows.append(row)
        types.update(row_types)
        result.study_uid = result.study_uid or str(row.get("StudyInstanceUID") or "")
        result.instances.append(
            InstanceOutcome(source_id, str(row.get("SOPInstanceUID") or ""), "written")
        )

    # 2. Stack and write the pixels, then the rows: the Parquet part marks the
    #    series done, so it goes last.
    if not task.readable:
        folder.write_quarantine(
            task.key, result.quarantined, fingerprint=task.fingerprint
        )
    else:
        if decoded:
            stacks = plan_stacks(decoded)
            placement = write_series_volumes(
                decoded,
                stacks,
                store=folder.volumes,
                series_uid=task.key,
                series_attributes={
                    "SeriesInstanceUID": task.key,
                    "StudyInstanceUID": result.study_uid,
                    "Modality": str(rows[decoded_rows[0]].get("Modality") or ""),
                },
                check_attributes=lambda attrs: _check_written(
                    attrs, series_identifiers
                ),
            )
            for instance_index, row_index in enumerate(decoded_rows):
                path, z_index = placement[(instance_index, 0)]
                rows[row_index][VOLUME_PATH] = path
                rows[row_index][VOLUME_INDEX] = z_index
            result.stacks = len(stacks)
        folder.write_series(
            task.key,
            rows,
            types,
            fingerprint=task.fingerprint,
            quarantined=result.quarantined,
            source_ids=hashed_source_ids(task.source_ids, settings.key),
        )
    result.written = len(rows)
    if result.written + len(result.quarantined) != len(task.instance_refs):
        raise WorkbenchError(
            f"series {task.key}: {len(task.instance_refs)} instances in, but"
            f" {result.written} written and {len(result.quarantined)} quarantined"
        )
    result.seconds = time.perf_counter() - started
    log.info(
        "series %s: %d written, %d quarantined, %d stacks in %.2f s",
        task.key,
        result.written,
        len(result.quarantined),
        result.stacks,
        result.seconds,
    )
    return result


def _handle_instance(
    data: bytes,
    source_id: str,
    task: SeriesTask,
    deidentifier: Deidentifier,
    options: DeidentificationOptions,
) -> (
    dict[str, str]
    | tuple[
        dict[str, Any],
        dict[str, pa.DataType],
        DecodedInstance | None,
        SourceIdentifiers,
    ]
):
    """Return the row, types, pixels and identifiers, or a quarantine entry."""

    def quarantine(stage: str, code: str, reason: str) -> dict[str, str]:
        return {
            "series": task.key,
            "source": task.source,
            "source_id": source_id,
            "stage": stage,
            "reason_code": code,
            "reason": reason,
        }

    try:
        ds = read_instance(data)
    except DicomReadError as exc:
        return quarantine("read", exc.reason, str(exc))
    if not task.readable:
        # The driver could not read this file's header, nor find its SOP Instance
        # UID; it belongs to no series.
        return quarantine(
            "group",
            "unreadable",
            "the instance has no SeriesInstanceUID or SOPInstanceUID",
        )
    if options.quarantine_burned_in:
        reason = burned_in_reason(ds)
        if reason is not None:
            return quarantine("burned-in", "burned-in", reason)
    try:
        identifiers = deidentify_instance(ds, deidentifier)
    except VerificationError as exc:
        return quarantine("verify", "identifier-survived", str(exc))
    except Exception as exc:
        # A value the recipe's functions could not handle: never write it.
        log.warning(
            "de-identification failed for %s: %s", source_id, type(exc).__name__
        )
        return quarantine("deidentify", "deidentify-failed", type(exc).__name__)
    if task.assign_series_uid and not ds.get("SeriesInstanceUID"):
        ds.SeriesInstanceUID = task.key
    if str(ds.get("SeriesInstanceUID", "")) != task.key:
        return quarantine(
            "group", "series-mismatch", "instance belongs to another series"
        )
    try:
        instance = decode_instance(ds)
    except DicomReadError as exc:
        return quarantine("decode", exc.reason, str(exc))
    row, types = instance_row(ds)
    if task.assign_series_uid:
        # Flag the stand-in: the source had no SeriesInstanceUID at all.
        flagged = [*(row[INVALID_VALUES] or []), ("SeriesInstanceUID", "")]
        row[INVALID_VALUES] = flagged
    leaks = find_leaks_in_values(row, identifiers, deidentifier.added_keywords)
    if leaks:
        places = ", ".join(f"{kind} in column {column}" for kind, column in leaks[:5])
        return quarantine("verify", "identifier-survived", f"source {places}")
    return row, types, instance, identifiers


def _check_written(attributes: dict[str, Any], identifiers: SourceIdentifiers) -> None:
    leaks = find_leaks_in_values(attributes, identifiers)
    if leaks:
        places = ", ".join(f"{kind} in {key}" for kind, key in leaks[:5])
        raise VerificationError(
            f"source {places} found in Zarr attributes", findings=leaks
        )


def _merge(target: SourceIdentifiers, source: SourceIdentifiers) -> None:
    target.names |= source.names
    target.texts |= source.texts
    target.dates |= source.dates
    target.uids |= source.uids


def _worker_state(settings: WorkerSettings, source: str) -> tuple[Deidentifier, Any]:
    """Return the de-identifier and fetch function for these settings, built once."""
    cache_key = f"{settings.digest}:{source}"
    state = _WORKER_STATE.get(cache_key)
    if state is None:
        from pydicom import config

        # Values that break their VR are handled by the Parquet conversion; pydicom
        # must not warn or raise on them.
        config.settings.reading_validation_mode = config.IGNORE
        recipe = compile_recipe(list(settings.recipe_texts))
        deidentifier = Deidentifier(
            recipe=recipe,
            pseudonymizer=Pseudonymizer(settings.key),
            options=settings.options,
        )
        if source == FOLDER:
            fetch: Any = _read_file
        else:
            from workbench.orthanc.client import OrthancClient

            client = OrthancClient(**(settings.orthanc or {}))
            fetch = client.instance_file
        state = (deidentifier, fetch)
        _WORKER_STATE[cache_key] = state
    return state


def _read_file(path: str) -> bytes:
    return Path(path).read_bytes()
