"""Storing DICOM files from disk in Orthanc, as ``workbench orthanc load`` does.

Each file is read with :func:`workbench.dicomio.to_upload_bytes`, which adds a file
meta header to a dataset written without one. A file that is not usable DICOM (not
DICOM at all, truncated, or unreadable) is reported and never sent. The others are
uploaded by a small thread pool, and Orthanc's response for each is recorded: stored,
already stored, or rejected with Orthanc's reason.

Logs contain counts only. File paths can contain patient names, so they appear only
in the returned :class:`UploadReport`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from tqdm import tqdm

from workbench.dicomio import to_upload_bytes
from workbench.errors import (
    ConfigurationError,
    DicomReadError,
    OrthancAuthError,
    OrthancConnectionError,
    OrthancError,
)
from workbench.orthanc.client import OrthancClient

__all__ = [
    "UploadOutcome",
    "UploadReport",
    "UploadStatus",
    "find_files",
    "upload_paths",
]

log = logging.getLogger(__name__)


class UploadStatus(StrEnum):
    """Outcome of one file's upload."""

    UPLOADED = "uploaded"
    ALREADY_STORED = "already-stored"
    REJECTED = "rejected"
    NOT_DICOM = "not-dicom"
    UNREADABLE = "unreadable"


@dataclass(frozen=True)
class UploadOutcome:
    """The result for one file.

    ``reason`` is empty for stored files. For files that were not sent it starts
    with the :class:`~workbench.errors.DicomReadError` reason code (``not-dicom``,
    ``truncated``, ``unreadable``) or ``os-error``. For rejected files it is
    Orthanc's error message. ``instance_id`` is the Orthanc id of a stored file.
    """

    path: Path
    status: UploadStatus
    reason: str = ""
    instance_id: str | None = None


@dataclass(frozen=True)
class UploadReport:
    """The outcomes of one upload, in the order the files were found."""

    outcomes: list[UploadOutcome]
    seconds: float

    def count(self, status: UploadStatus) -> int:
        """Return how many files ended with ``status``."""
        return sum(1 for outcome in self.outcomes if outcome.status == status)

    @property
    def uploaded(self) -> int:
        """Number of files Orthanc stored."""
        return self.count(UploadStatus.UPLOADED)

    @property
    def already_stored(self) -> int:
        """Number of files whose instance Orthanc already had."""
        return self.count(UploadStatus.ALREADY_STORED)

    @property
    def rejected(self) -> int:
        """Number of files Orthanc rejected."""
        return self.count(UploadStatus.REJECTED)

    @property
    def not_dicom(self) -> int:
        """Number of files that are not DICOM and were not sent."""
        return self.count(UploadStatus.NOT_DICOM)

    @property
    def unreadable(self) -> int:
        """Number of DICOM files that are truncated or unreadable and were not sent."""
        return self.count(UploadStatus.UNREADABLE)

    @property
    def ok(self) -> bool:
        """Whether every file is now stored in Orthanc."""
        return self.uploaded + self.already_stored == len(self.outcomes)

    def problems(self) -> list[UploadOutcome]:
        """Return the outcomes of files that are not stored in Orthanc."""
        stored = (UploadStatus.UPLOADED, UploadStatus.ALREADY_STORED)
        return [outcome for outcome in self.outcomes if outcome.status not in stored]

    def summary(self) -> str:
        """Return a one-line summary with the count for each status."""
        files = "file" if len(self.outcomes) == 1 else "files"
        return (
            f"{len(self.outcomes)} {files}: {self.uploaded} uploaded,"
            f" {self.already_stored} already stored, {self.rejected} rejected by"
            f" Orthanc, {self.not_dicom} not DICOM, {self.unreadable} unreadable"
            f" ({self.seconds:.1f} s)"
        )


def find_files(paths: Iterable[Path]) -> list[Path]:
    """Return the files in ``paths``, walking folders recursively.

    Files are listed once each, folders in sorted order.

    Raises
    ------
    ConfigurationError
        When a path does not exist.
    """
    files: list[Path] = []
    seen: set[Path] = set()
    for path in paths:
        for file in _walk(Path(path)):
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                files.append(file)
    return files


def upload_paths(
    client: OrthancClient,
    paths: Iterable[Path],
    *,
    workers: int = 4,
    progress: bool = True,
) -> UploadReport:
    """Upload the DICOM files in ``paths`` (files or folders) to Orthanc.

    Parameters
    ----------
    client
        The Orthanc to store the files in.
    paths
        Files, and folders that are walked recursively.
    workers
        Number of files read and uploaded at the same time.
    progress
        Show a progress bar on standard error.

    Returns
    -------
    UploadReport
        One outcome per file. Files that are not usable DICOM, or that Orthanc
        rejects, are reported there and do not raise.

    Raises
    ------
    ConfigurationError
        When a path does not exist or ``workers`` is below 1.
    OrthancConnectionError, OrthancAuthError
        When Orthanc stops responding or rejects the credentials; the upload stops,
        and files already stored stay stored.
    """
    if workers < 1:
        raise ConfigurationError(f"workers must be at least 1, not {workers}")
    files = find_files(paths)
    started = time.monotonic()
    outcomes: list[UploadOutcome | None] = [None] * len(files)

    with (
        ThreadPoolExecutor(workers, thread_name_prefix="orthanc-upload") as pool,
        tqdm(
            total=len(files),
            unit="file",
            desc="upload",
            file=sys.stderr,
            disable=not progress,
        ) as bar,
    ):
        futures: dict[Future[UploadOutcome], int] = {
            pool.submit(_upload_file, client, file): index
            for index, file in enumerate(files)
        }
        try:
            for future in as_completed(futures):
                outcomes[futures[future]] = future.result()
                bar.update(1)
        except BaseException:
            for future in futures:
                future.cancel()
            raise

    report = UploadReport(
        outcomes=[outcome for outcome in outcomes if outcome is not None],
        seconds=time.monotonic() - started,
    )
    log.info(
        "upload to Orthanc: %d files, %d uploaded, %d already stored, %d rejected,"
        " %d not DICOM, %d unreadable in %.1f s",
        len(report.outcomes),
        report.uploaded,
        report.already_stored,
        report.rejected,
        report.not_dicom,
        report.unreadable,
        report.seconds,
    )
    return report


def _walk(path: Path) -> Iterator[Path]:
    if path.is_dir():
        yield from sorted(file for file in path.rglob("*") if file.is_file())
    elif path.is_file():
        yield path
    else:
        raise ConfigurationError(f"{path} does not exist; give DICOM files or folders")


def _upload_file(client: OrthancClient, path: Path) -> UploadOutcome:
    # Step 1: read the file. Bytes that are not usable DICOM are never sent.
    try:
        data = to_upload_bytes(path)
    except DicomReadError as exc:
        status = (
            UploadStatus.NOT_DICOM
            if exc.reason == "not-dicom"
            else UploadStatus.UNREADABLE
        )
        return UploadOutcome(path, status, f"{exc.reason}: {exc}")
    except OSError as exc:
        return UploadOutcome(path, UploadStatus.UNREADABLE, f"os-error: {exc.strerror}")

    # Step 2: upload. A server that is down or rejects the login stops the whole
    # upload, but a rejection of this one file is only recorded.
    try:
        answer = client.upload(data)
    except (OrthancConnectionError, OrthancAuthError):
        raise
    except OrthancError as exc:
        return UploadOutcome(path, UploadStatus.REJECTED, str(exc))

    instance_id = answer.get("ID")
    if answer.get("Status") == "Success":
        return UploadOutcome(path, UploadStatus.UPLOADED, instance_id=instance_id)
    if answer.get("Status") == "AlreadyStored":
        return UploadOutcome(path, UploadStatus.ALREADY_STORED, instance_id=instance_id)
    return UploadOutcome(
        path,
        UploadStatus.REJECTED,
        f"Orthanc answered with status {answer.get('Status')!r}",
        instance_id,
    )
