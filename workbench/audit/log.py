"""The audit log: append events, read them back, and verify the hash chain.

:class:`AuditLog` implements the backend-neutral rules (numbering, chaining, the head
anchor, verification, filters) and leaves SQL to a store. :func:`open_audit_log`
picks the store from a URL.
"""

from __future__ import annotations

import getpass
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote, urlsplit

from workbench.audit.chain import (
    GENESIS_HASH,
    AuditEvent,
    AuditRecord,
    ChainVerifier,
    RecordRow,
    VerificationReport,
    chain_record,
    format_timestamp,
    validate_head_hash,
)
from workbench.audit.query import RecordFilter
from workbench.audit.store import SqlAuditStore
from workbench.errors import AuditChainError, AuditError, ConfigurationError

__all__ = [
    "AUDIT_FILENAME",
    "AUDIT_RELAY_FD_ENV",
    "AUDIT_URL_ENV",
    "AuditLog",
    "current_user",
    "open_audit_log",
]

log = logging.getLogger(__name__)

AUDIT_URL_ENV = "WORKBENCH_AUDIT_URL"
# Set by the isolated job runner: the pipe through which a job sends its events.
AUDIT_RELAY_FD_ENV = "WORKBENCH_AUDIT_RELAY_FD"
AUDIT_FILENAME = "audit.sqlite"


def current_user() -> str:
    """Return the actor recorded for events without one.

    This is ``WORKBENCH_USER`` if set, else the login name, else ``uid:<number>``
    when the user id has no name (as in some containers).
    """
    name = os.environ.get("WORKBENCH_USER")
    if name:
        return name
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


class AuditLog:
    """A tamper-evident, append-only log of data accesses.

    Open one with :func:`open_audit_log`. The object is safe to share between the
    threads of a process, but not across ``fork``: each process opens its own.

    Parameters
    ----------
    store
        The SQLite or PostgreSQL store that contains the records.
    """

    def __init__(self, store: SqlAuditStore) -> None:
        self._store = store
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._closed = False

    @property
    def location(self) -> str:
        """Where the log is stored: a file path, or a URL without its password."""
        return self._store.location

    def __repr__(self) -> str:
        return f"AuditLog({self.location!r})"

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection to the store. Closing twice does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._pid == os.getpid():
                self._store.close()

    @contextmanager
    def _using_store(self, operation: str) -> Iterator[SqlAuditStore]:
        """Hold the thread lock and turn the driver's errors into AuditError."""
        if self._pid != os.getpid():
            raise AuditError(
                f"audit log {self.location} was opened in process {self._pid} and"
                f" cannot be used in process {os.getpid()}; call open_audit_log in"
                " each process"
            )
        with self._lock:
            if self._closed:
                raise AuditError(
                    f"audit log {self.location} is closed; open it again with"
                    " open_audit_log"
                )
            try:
                yield self._store
            except self._store.database_errors as exc:
                raise AuditError(
                    f"audit log {self.location}: {operation} failed: {exc}"
                ) from exc

    def append(self, event: AuditEvent) -> AuditRecord:
        """Append ``event`` and return the stored record.

        Raises
        ------
        AuditChainError
            When the newest record and the head anchor disagree: the log was
            changed outside the workbench, and appends stop until it is examined.
        AuditError
            When the store cannot be written.
        """
        return self.append_many([event])[0]

    def append_many(self, events: Iterable[AuditEvent]) -> list[AuditRecord]:
        """Append ``events`` in one transaction, as consecutive records.

        Either every event is stored or none is. All records of one call share
        one timestamp, taken after the append lock is held, so timestamps never
        decrease along the chain unless the system clock is set back.

        Returns
        -------
        list[AuditRecord]
            The stored records, in order.

        Raises
        ------
        AuditChainError
            When the newest record and the head anchor disagree.
        AuditError
            When an item is not an :class:`AuditEvent` or the store cannot be
            written.
        """
        events = list(events)
        for event in events:
            if not isinstance(event, AuditEvent):
                raise AuditError(
                    f"append expects AuditEvent objects, got {type(event).__name__}"
                )
        if not events:
            return []
        actor = current_user()
        started = time.monotonic()

        with self._using_store("append") as store, store.write_transaction():
            sequence, previous_hash = self._head_for_append(store)
            timestamp = format_timestamp(datetime.now(UTC))
            records = []
            for event in events:
                sequence += 1
                record = chain_record(
                    event,
                    sequence=sequence,
                    timestamp=timestamp,
                    actor=actor,
                    previous_hash=previous_hash,
                )
                records.append(record)
                previous_hash = record.hash
            store.insert_rows([RecordRow.from_record(record) for record in records])
            store.write_head(sequence, previous_hash)

        log.debug(
            "appended %d audit records up to sequence %d in %.3f s",
            len(records),
            sequence,
            time.monotonic() - started,
        )
        return records

    def _head_for_append(self, store: SqlAuditStore) -> tuple[int, str]:
        """Return the head anchor after checking it against the newest record."""
        anchor = store.read_head()
        if anchor is None:
            raise AuditChainError(
                f"audit log {self.location} has no head anchor, so records may have"
                " been deleted; appends are rejected until the log is examined with"
                " `workbench audit verify`",
                sequence=None,
            )
        last = store.read_last_row()
        newest = (0, GENESIS_HASH) if last is None else (last.sequence, last.hash)
        if newest != anchor:
            # The first bad record: the anchor's record when only hashes differ,
            # else the first record present on one side only.
            if newest[0] == anchor[0]:
                bad_sequence = anchor[0]
            else:
                bad_sequence = min(newest[0], anchor[0]) + 1
            raise AuditChainError(
                f"audit log {self.location} was changed outside the workbench: the"
                f" newest record is {newest[0]} but the head anchor names record"
                f" {anchor[0]}; appends are rejected until the log is examined with"
                " `workbench audit verify`",
                sequence=bad_sequence,
            )
        return anchor

    def verify(self, expected_head: str | None = None) -> VerificationReport:
        """Check every record's number, link and hash, and the head anchor.

        Reads one consistent snapshot, so appends running at the same time do not
        disturb it.

        Parameters
        ----------
        expected_head
            A head hash kept outside the store from an earlier verification. The
            log passes only if some record has this hash, which detects deletion
            of the newest records together with the head anchor.

        Returns
        -------
        VerificationReport
            Record count, head sequence and head hash.

        Raises
        ------
        AuditChainError
            At the first record that was edited, deleted, inserted or moved, with
            its sequence number in ``sequence``.
        ConfigurationError
            When ``expected_head`` is not a 64-digit hex hash.
        AuditError
            When the store cannot be read.
        """
        if expected_head is not None:
            expected_head = validate_head_hash(expected_head)
        started = time.monotonic()

        with self._using_store("verify") as store, store.read_transaction():
            verifier = ChainVerifier(store.read_head(), expected_head)
            with closing(store.scan_rows()) as rows:
                for row in rows:
                    verifier.check(row)
            report = verifier.finish()

        log.info(
            "verified %d audit records in %.3f s",
            report.record_count,
            time.monotonic() - started,
        )
        return report

    def records(
        self,
        action: str | None = None,
        actor: str | None = None,
        outcome: str | None = None,
        resource_prefix: str | None = None,
        since: datetime | str | None = None,
        until: datetime | str | None = None,
        limit: int | None = None,
    ) -> list[AuditRecord]:
        """Return the stored records that match every filter given, oldest first.

        This reads records without verifying them; call :meth:`verify` for that.

        Parameters
        ----------
        action, actor, outcome
            Exact values to match.
        resource_prefix
            Keep records whose resource starts with this text (case-sensitive).
        since, until
            Keep records with ``since <= timestamp < until``. Either is a datetime
            or an ISO 8601 string; naive values are taken to be in UTC.
        limit
            Keep only the newest ``limit`` matching records.

        Raises
        ------
        ConfigurationError
            When a time is not ISO 8601 or ``limit`` is not a positive integer.
        AuditError
            When the store cannot be read.
        """
        record_filter = RecordFilter(
            action=action,
            actor=actor,
            outcome=outcome,
            resource_prefix=resource_prefix,
            since=since,
            until=until,
            limit=limit,
        )
        with self._using_store("read") as store, store.read_transaction():
            where, parameters = record_filter.to_sql(store.placeholder)
            rows = store.select_rows(where, parameters, record_filter.limit)
        return [row.to_record() for row in rows]


def sqlite_path(url: str) -> Path:
    """Return the file path of a ``sqlite:///`` URL (four slashes: absolute path)."""
    prefix = "sqlite:///"
    if not url.lower().startswith(prefix):
        raise ConfigurationError(
            f"audit log URL {url!r} is not a SQLite file URL; use"
            " sqlite:////absolute/path.sqlite or sqlite:///relative/path.sqlite"
        )
    path = unquote(url[len(prefix) :])
    if not path or path == ":memory:":
        raise ConfigurationError(
            f"audit log URL {url!r} names no file; use sqlite:////absolute/path.sqlite"
            " or sqlite:///relative/path.sqlite (an audit log in memory would"
            " vanish when the process ends)"
        )
    return Path(path)


def open_audit_log(url: str | os.PathLike[str] | None = None) -> AuditLog:
    """Open the audit log at ``url``, creating its tables on first use.

    Parameters
    ----------
    url
        ``sqlite:////absolute/path.sqlite``, ``sqlite:///relative/path.sqlite``,
        ``postgresql://user:password@host:port/database`` (or ``postgres://``), or a
        plain file path for SQLite. ``None`` means ``WORKBENCH_AUDIT_URL`` if set,
        else the file ``audit.sqlite`` in the workbench home
        (:func:`workbench.home.find_home`). Inside an isolated job, where
        ``WORKBENCH_AUDIT_RELAY_FD`` is set, ``None`` means a relay that sends
        appends to the process that started the job
        (:mod:`workbench.isolation.relay`).

    Raises
    ------
    ConfigurationError
        When the URL scheme is not supported, or ``url`` is None and no workbench
        home exists.
    AuditError
        When the store cannot be opened or its schema cannot be created.
    """
    if url is None and os.environ.get(AUDIT_RELAY_FD_ENV):
        from workbench.isolation.relay import RelayAuditLog

        return RelayAuditLog.from_environment()
    if url is None:
        url = os.environ.get(AUDIT_URL_ENV) or None
    if url is None:
        from workbench.home import find_home

        return AuditLog(_open_sqlite(find_home() / AUDIT_FILENAME))
    if isinstance(url, os.PathLike):
        return AuditLog(_open_sqlite(Path(url)))

    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme == "sqlite":
        return AuditLog(_open_sqlite(sqlite_path(url)))
    if scheme in ("postgresql", "postgres"):
        from workbench.audit.postgres_store import PostgresAuditStore

        return AuditLog(PostgresAuditStore(url))
    if scheme:
        raise ConfigurationError(
            f"audit log URL scheme {scheme!r} is not supported; use sqlite:///PATH or"
            " postgresql://USER@HOST:PORT/DATABASE"
        )
    return AuditLog(_open_sqlite(Path(url)))


def _open_sqlite(path: Path) -> SqlAuditStore:
    from workbench.audit.sqlite_store import SqliteAuditStore

    return SqliteAuditStore(path)
