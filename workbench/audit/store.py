"""The SQL tables that hold the audit log, and the operations both databases share.

Two tables hold a log. ``audit_record`` has one row per record, keyed by sequence
number, with ``details`` as canonical JSON text so that the stored bytes are the
hashed bytes. ``audit_head`` has one row, the head anchor: the sequence number and
hash of the newest record, which every append updates in the same transaction as its
inserts. Triggers reject UPDATE and DELETE on records, and DELETE on the anchor, so
a mistaken statement fails loudly. Anyone who can drop the triggers can still change
the tables, and the hash chain is what detects that.

:class:`SqlAuditStore` runs the statements; the SQLite and PostgreSQL subclasses open
the connection, create the schema and decide how a transaction takes the append lock.
"""

from __future__ import annotations

import abc
from collections.abc import Generator, Sequence
from contextlib import AbstractContextManager, closing
from typing import Any, ClassVar

from workbench.audit.chain import GENESIS_HASH, RecordRow

__all__ = ["RECORD_COLUMNS", "SqlAuditStore"]

RECORD_COLUMNS = (
    "sequence",
    "timestamp",
    "actor",
    "action",
    "resource",
    "purpose",
    "outcome",
    "details",
    "previous_hash",
    "hash",
)

# Column types are spelled so that SQLite and PostgreSQL both accept them.
CREATE_TABLES = (
    """
    CREATE TABLE audit_record (
        sequence BIGINT PRIMARY KEY,
        timestamp TEXT NOT NULL,
        actor TEXT NOT NULL,
        action TEXT NOT NULL,
        resource TEXT NOT NULL,
        purpose TEXT NOT NULL,
        outcome TEXT NOT NULL,
        details TEXT NOT NULL,
        previous_hash TEXT NOT NULL,
        hash TEXT NOT NULL
    )
    """,
    "CREATE INDEX audit_record_action ON audit_record (action)",
    "CREATE INDEX audit_record_timestamp ON audit_record (timestamp)",
    """
    CREATE TABLE audit_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        sequence BIGINT NOT NULL,
        hash TEXT NOT NULL
    )
    """,
    # The anchor of an empty log names record 0 with the genesis hash.
    f"INSERT INTO audit_head (id, sequence, hash) VALUES (1, 0, '{GENESIS_HASH}')",  # noqa: S608 (constant)
)

_COLUMN_LIST = ", ".join(RECORD_COLUMNS)


class SqlAuditStore(abc.ABC):
    """Reads and writes audit rows through a DB-API connection.

    The caller wraps each operation in :meth:`write_transaction` or
    :meth:`read_transaction`. Subclasses set :attr:`placeholder`,
    :attr:`database_errors` and :attr:`location`.
    """

    #: Parameter marker of the driver: ``?`` for sqlite3, ``%s`` for psycopg.
    placeholder: ClassVar[str]
    #: Exception classes of the driver that mean the store failed.
    database_errors: tuple[type[Exception], ...]
    #: Location of the store, safe to show: a file path, or a URL without password.
    location: str

    @abc.abstractmethod
    def write_transaction(self) -> AbstractContextManager[None]:
        """Open a transaction that holds the append lock until it ends.

        The transaction commits when the block ends normally and rolls back when it
        raises. Only one write transaction runs at a time across all processes.
        """

    @abc.abstractmethod
    def read_transaction(self) -> AbstractContextManager[None]:
        """Open a read-only transaction that reads one consistent snapshot."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection."""

    @abc.abstractmethod
    def _cursor(self) -> Any:
        """Return a cursor of the open connection."""

    @abc.abstractmethod
    def _scan_cursor(self) -> Any:
        """Return a cursor that fetches a large result in batches."""

    def read_head(self) -> tuple[int, str] | None:
        """Return the head anchor as ``(sequence, hash)``, or None if it is missing."""
        with closing(self._cursor()) as cursor:
            cursor.execute("SELECT sequence, hash FROM audit_head WHERE id = 1")
            row = cursor.fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def read_last_row(self) -> RecordRow | None:
        """Return the row with the highest sequence number, or None if none exists."""
        with closing(self._cursor()) as cursor:
            cursor.execute(
                f"SELECT {_COLUMN_LIST} FROM audit_record"  # noqa: S608 (fixed columns)
                " ORDER BY sequence DESC LIMIT 1"
            )
            row = cursor.fetchone()
        return None if row is None else RecordRow(*row)

    def insert_rows(self, rows: Sequence[RecordRow]) -> None:
        """Insert ``rows`` into the record table."""
        markers = ", ".join([self.placeholder] * len(RECORD_COLUMNS))
        with closing(self._cursor()) as cursor:
            cursor.executemany(
                f"INSERT INTO audit_record ({_COLUMN_LIST}) VALUES ({markers})",  # noqa: S608 (fixed columns)
                [tuple(row) for row in rows],
            )

    def write_head(self, sequence: int, record_hash: str) -> None:
        """Point the head anchor at the record ``sequence`` hashed ``record_hash``."""
        marker = self.placeholder
        with closing(self._cursor()) as cursor:
            cursor.execute(
                f"UPDATE audit_head SET sequence = {marker}, hash = {marker}"  # noqa: S608 (markers)
                " WHERE id = 1",
                (sequence, record_hash),
            )

    def scan_rows(self) -> Generator[RecordRow, None, None]:
        """Yield every row in ascending sequence order, fetching in batches.

        Close the generator before the transaction ends, so that its cursor is
        closed while the transaction still exists.
        """
        with closing(self._scan_cursor()) as cursor:
            cursor.execute(
                f"SELECT {_COLUMN_LIST} FROM audit_record ORDER BY sequence"  # noqa: S608 (fixed columns)
            )
            while batch := cursor.fetchmany(1000):
                for row in batch:
                    yield RecordRow(*row)

    def select_rows(
        self, where: str, parameters: Sequence[Any], limit: int | None
    ) -> list[RecordRow]:
        """Return rows matching ``where``, the newest ``limit`` ones, oldest first.

        ``where`` is an SQL condition that uses :attr:`placeholder` for each of
        ``parameters``, or an empty string for all rows.
        """
        sql = f"SELECT {_COLUMN_LIST} FROM audit_record"  # noqa: S608 (fixed columns)
        if where:
            sql += f" WHERE {where}"
        sql += " ORDER BY sequence DESC"
        bound = list(parameters)
        if limit is not None:
            sql += f" LIMIT {self.placeholder}"
            bound.append(limit)
        with closing(self._cursor()) as cursor:
            cursor.execute(sql, bound)
            rows = [RecordRow(*row) for row in cursor.fetchall()]
        rows.reverse()
        return rows
