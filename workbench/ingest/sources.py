"""Where instances come from: an Orthanc server or a folder of files.

The driver turns a source into :class:`SeriesTask` objects, one per series, that
carry only references (Orthanc instance ids, file paths) and the series' new UID.
Workers fetch the bytes and parse them there: pydicom datasets are never shipped
between processes.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections import defaultdict, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from itertools import islice
from pathlib import Path
from typing import Any

from workbench.deidentify.pseudonyms import Pseudonymizer
from workbench.dicomio import read_instance
from workbench.errors import ConfigurationError, DicomReadError

__all__ = [
    "SeriesTask",
    "fetch_instances",
    "folder_tasks",
    "hashed_source_ids",
    "orthanc_tasks",
    "source_fingerprint",
]

log = logging.getLogger(__name__)

ORTHANC = "orthanc"
FOLDER = "folder"
UNGROUPED_PREFIX = "ungrouped-"


@dataclass(frozen=True)
class SeriesTask:
    """One series to ingest, as references the workers can fetch.

    Attributes
    ----------
    source
        ``"orthanc"`` or ``"folder"``.
    key
        The series' new SeriesInstanceUID, or ``ungrouped-<hash>`` for files of a
        folder that could not be read.
    instance_refs
        Orthanc instance ids, or file paths.
    source_ids
        For each reference, the id written to reports: the Orthanc id, or
        ``file:`` and a SHA-256 prefix of the file's path relative to the folder
        (paths can name patients).
    orthanc_series
        The Orthanc series ids merged into this task (empty for folders).
    assign_series_uid
        The instance has no SeriesInstanceUID (a Type 1 attribute); the worker
        gives it ``key`` as one, so the instance is kept, alone in its series.
    fingerprint
        A hash of the references and of the settings that shape the output, to
        tell whether a finished series is current; set by the driver.
    """

    source: str
    key: str
    instance_refs: tuple[str, ...]
    source_ids: tuple[str, ...]
    orthanc_series: tuple[str, ...] = ()
    assign_series_uid: bool = False
    fingerprint: str = ""

    @property
    def readable(self) -> bool:
        """False for the folder files that could not be read; all are quarantined."""
        return not self.key.startswith(UNGROUPED_PREFIX)


def hashed_source_ids(source_ids: Sequence[str], key: bytes) -> list[str]:
    """Return keyed hashes of source ids, to store with a series.

    Orthanc ids are plain SHA-1 hashes of the source's patient, study, series and
    instance UIDs; whoever holds the source archive could link a dataset back to it
    through them. Keyed hashes still tell whether two runs saw the same instances.
    """
    return [
        hmac.new(
            key, b"source id\x00" + source_id.encode(), hashlib.sha256
        ).hexdigest()[:32]
        for source_id in source_ids
    ]


def source_fingerprint(refs: Sequence[str], extra: str = "") -> str:
    """Return a hash of a series' instance references and settings."""
    digest = hashlib.sha256(extra.encode())
    for ref in sorted(refs):
        digest.update(b"\x00" + ref.encode())
    return digest.hexdigest()


def orthanc_tasks(
    series: Sequence[dict[str, Any]], pseudonymizer: Pseudonymizer
) -> list[SeriesTask]:
    """Build tasks from Orthanc ``/tools/find`` answers at series level (expanded).

    Orthanc series that share a SeriesInstanceUID (one series filed under two
    patient IDs) become one task, so one process writes each output series.
    """
    merged: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in series:
        uid = entry.get("MainDicomTags", {}).get("SeriesInstanceUID", "")
        if not uid:
            log.warning(
                "Orthanc series %s has no SeriesInstanceUID; skipped", entry.get("ID")
            )
            continue
        merged[pseudonymizer.uid(uid)].append(entry)

    tasks = []
    for key, entries in merged.items():
        refs = tuple(sorted(i for entry in entries for i in entry.get("Instances", [])))
        tasks.append(
            SeriesTask(
                source=ORTHANC,
                key=key,
                instance_refs=refs,
                source_ids=refs,
                orthanc_series=tuple(entry["ID"] for entry in entries),
            )
        )
    return sorted(tasks, key=lambda task: task.key)


def folder_tasks(folder: Path, pseudonymizer: Pseudonymizer) -> list[SeriesTask]:
    """Group the files under ``folder`` into series by reading their headers.

    An instance without a SeriesInstanceUID becomes a series of its own. Files
    that cannot be read form one more task, so the workers quarantine them with
    the reason.
    """
    folder = Path(folder)
    groups: dict[str, list[str]] = defaultdict(list)
    lone: dict[str, str] = {}
    unreadable: list[str] = []
    for path in sorted(_files(folder)):
        try:
            ds = read_instance(path.read_bytes(), stop_before_pixels=True)
        except (DicomReadError, OSError):
            unreadable.append(str(path))
            continue
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        instance_uid = str(ds.get("SOPInstanceUID", "") or "")
        if series_uid:
            groups[pseudonymizer.uid(series_uid)].append(str(path))
        elif instance_uid:
            lone[pseudonymizer.uid(f"series of {instance_uid}")] = str(path)
        else:
            unreadable.append(str(path))

    tasks = [_folder_task(folder, key, paths) for key, paths in groups.items()]
    tasks.extend(
        replace(_folder_task(folder, key, [path]), assign_series_uid=True)
        for key, path in lone.items()
    )
    if unreadable:
        digest = source_fingerprint([_path_id(folder, p) for p in unreadable])
        key = f"{UNGROUPED_PREFIX}{digest[:16]}"
        tasks.append(_folder_task(folder, key, unreadable))
    log.info(
        "found %d files in %d series (%d without a SeriesInstanceUID, %d unreadable)",
        sum(len(t.instance_refs) for t in tasks),
        len(tasks),
        len(lone),
        len(unreadable),
    )
    return sorted(tasks, key=lambda task: task.key)


def fetch_instances(
    task: SeriesTask,
    fetch: Callable[[str], bytes],
    threads: int,
) -> Iterator[tuple[int, bytes | None, Exception | None]]:
    """Yield ``(index, bytes, error)`` for each reference of ``task``, in order.

    Up to ``threads`` downloads run at once, and at most twice that many results
    wait in memory, so a worker's memory stays bounded by the series, not by the
    download speed.
    """
    indices = iter(range(len(task.instance_refs)))
    with ThreadPoolExecutor(max_workers=threads) as pool:
        pending: deque[tuple[int, Future[bytes]]] = deque()

        def submit(count: int) -> None:
            for index in islice(indices, count):
                pending.append((index, pool.submit(fetch, task.instance_refs[index])))

        submit(threads * 2)
        while pending:
            index, future = pending.popleft()
            submit(1)
            try:
                yield index, future.result(), None
            except Exception as exc:
                yield index, None, exc


def _folder_task(folder: Path, key: str, paths: list[str]) -> SeriesTask:
    ids = tuple(_path_id(folder, path) for path in paths)
    return SeriesTask(
        source=FOLDER, key=key, instance_refs=tuple(paths), source_ids=ids
    )


def _path_id(folder: Path, path: str) -> str:
    relative = os.path.relpath(path, folder)
    return "file:" + hashlib.sha256(relative.encode("utf-8")).hexdigest()[:40]


def _files(folder: Path) -> Iterator[Path]:
    if not folder.is_dir():
        raise ConfigurationError(f"--folder {folder} is not a folder")
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if not name.startswith("."):
                yield Path(root) / name
