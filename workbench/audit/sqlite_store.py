"""The audit log in a SQLite file, the default store of a single workstation.

The file uses write-ahead logging (WAL), so readers do not block the appending
process. Appends from several processes serialise on ``BEGIN IMMEDIATE``, which takes
the database's write lock at the start of the transaction. A process that finds the
lock taken waits up to the busy timeout before it fails. ``synchronous=FULL`` syncs
the log to disk at each commit, so a committed append survives a power failure as
long as the disk honours fsync.

WAL needs shared memory between the processes, so the file must be on a local disk,
not on a network file system.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from workbench.audit.store import CREATE_TABLES, SqlAuditStore
from workbench.errors import AuditError

__all__ = ["DEFAULT_BUSY_TIMEOUT_S", "SqliteAuditStore"]

log = logging.getLogger(__name__)

DEFAULT_BUSY_TIMEOUT_S = 30.0

CREATE_TRIGGERS = (
    """
    CREATE TRIGGER audit_record_no_update BEFORE UPDATE ON audit_record
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END
    """,
    """
    CREATE TRIGGER audit_record_no_delete BEFORE DELETE ON audit_record
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END
    """,
    """
    CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_head
    BEGIN SELECT RAISE(ABORT, 'the audit head anchor cannot be deleted'); END
    """,
)


class SqliteAuditStore(SqlAuditStore):
    """Audit store in the SQLite file ``path``, created with its schema if missing.

    Parameters
    ----------
    path
        The database file. Its folder must exist. A new file is created readable
        by its owner only.
    busy_timeout_s
        Maximum time in seconds to wait for another process's write lock.

    Raises
    ------
    AuditError
        When the folder is missing or the file cannot be opened as a database.
    """

    placeholder = "?"
    database_errors = (sqlite3.Error,)

    def __init__(
        self, path: Path, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S
    ) -> None:
        path = Path(path).expanduser().absolute()
        self.path = path
        self.location = str(path)
        self.busy_timeout_s = busy_timeout_s
        if not path.parent.is_dir():
            raise AuditError(
                f"cannot create audit log {path}: folder {path.parent} does not"
                " exist; create it, or run `workbench init` for the default location"
            )
        self._create_private_file(path)
        try:
            self._connection = sqlite3.connect(
                path,
                timeout=busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise AuditError(f"cannot open audit log {path}: {exc}") from exc
        try:
            self._configure()
            self._ensure_schema()
        except sqlite3.Error as exc:
            self._connection.close()
            raise AuditError(
                f"cannot open audit log {path}: {exc}; check that it is an audit log"
                " database on a local disk"
            ) from exc
        log.debug("opened SQLite audit log %s", path)

    @staticmethod
    def _create_private_file(path: Path) -> None:
        # SQLite gives its -wal and -shm files the database file's permissions, so
        # creating the file with mode 0600 keeps all three private.
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        except OSError as exc:
            raise AuditError(f"cannot create audit log {path}: {exc}") from exc
        os.close(descriptor)

    def _configure(self) -> None:
        connection = self._connection
        mode = self._set_wal_mode()
        if mode != "wal":
            raise AuditError(
                f"audit log {self.path} cannot use write-ahead logging (journal mode"
                f" is {mode}); keep the file on a local disk"
            )
        connection.execute("PRAGMA synchronous=FULL")

    def _set_wal_mode(self) -> str:
        """Switch the file to WAL mode, retrying while other processes hold it.

        Switching takes an exclusive lock and can fail with "database is locked"
        without waiting on the busy timeout, for example while several processes
        open a new log at once. Retrying until the busy timeout is used up covers
        that case.
        """
        deadline = time.monotonic() + self.busy_timeout_s
        delay_s = 0.005
        while True:
            try:
                row = self._connection.execute("PRAGMA journal_mode=WAL").fetchone()
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay_s)
                delay_s = min(delay_s * 2, 0.1)
                continue
            return str(row[0]).lower()

    def _ensure_schema(self) -> None:
        with self.write_transaction():
            cursor = self._connection.execute(
                "SELECT count(*) FROM sqlite_master"
                " WHERE type = 'table' AND name IN ('audit_record', 'audit_head')"
            )
            existing = cursor.fetchone()[0]
            if existing == 2:
                return
            if existing == 1:
                raise AuditError(
                    f"audit log {self.path} has only one of the tables audit_record"
                    " and audit_head; a table was dropped outside the audit log"
                )
            for statement in (*CREATE_TABLES, *CREATE_TRIGGERS):
                self._connection.execute(statement)
            log.info("created audit log schema in %s", self.path)

    @contextmanager
    def write_transaction(self) -> Iterator[None]:
        """Open a transaction with ``BEGIN IMMEDIATE``, which takes the write lock."""
        self._connection.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._connection.rollback()
            raise
        self._connection.commit()

    @contextmanager
    def read_transaction(self) -> Iterator[None]:
        """Open a deferred transaction; in WAL mode its first read fixes a snapshot."""
        self._connection.execute("BEGIN")
        try:
            yield
        finally:
            self._connection.rollback()

    def close(self) -> None:
        """Close the connection."""
        self._connection.close()

    def _cursor(self) -> Any:
        return self._connection.cursor()

    def _scan_cursor(self) -> Any:
        return self._connection.cursor()
