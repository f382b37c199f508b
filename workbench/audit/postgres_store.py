"""The audit log in a PostgreSQL database, for sites where several machines append.

Appends from any number of connections serialise on a transaction-level advisory
lock, which PostgreSQL releases at commit or rollback, so a crashed client never
leaves the log locked. Verification reads in a REPEATABLE READ transaction, so records
appended while it runs do not disturb it.

The connection URL may carry a password. It never appears in a log line or an error
message: messages show the URL with the password replaced by ``***``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit, urlunsplit

from workbench.audit.store import CREATE_TABLES, SqlAuditStore
from workbench.errors import AuditError

if TYPE_CHECKING:
    import psycopg

__all__ = ["PostgresAuditStore", "redact_url"]

log = logging.getLogger(__name__)

# Key of the advisory lock that serialises appends: the bytes of "wbaudit1" read as a
# big-endian integer. Other applications in the same database must not use it.
APPEND_LOCK_KEY = int.from_bytes(b"wbaudit1", "big")

CONNECT_TIMEOUT_S = 10

CREATE_TRIGGERS = (
    """
    CREATE OR REPLACE FUNCTION audit_reject_change()
    RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        RAISE EXCEPTION 'audit records are append-only (% on %)', TG_OP, TG_TABLE_NAME;
    END
    $$
    """,
    """
    CREATE TRIGGER audit_record_append_only BEFORE UPDATE OR DELETE ON audit_record
    FOR EACH ROW EXECUTE FUNCTION audit_reject_change()
    """,
    """
    CREATE TRIGGER audit_record_no_truncate BEFORE TRUNCATE ON audit_record
    FOR EACH STATEMENT EXECUTE FUNCTION audit_reject_change()
    """,
    """
    CREATE TRIGGER audit_head_no_delete BEFORE DELETE ON audit_head
    FOR EACH ROW EXECUTE FUNCTION audit_reject_change()
    """,
    """
    CREATE TRIGGER audit_head_no_truncate BEFORE TRUNCATE ON audit_head
    FOR EACH STATEMENT EXECUTE FUNCTION audit_reject_change()
    """,
)


def _password_texts(url: str) -> list[str]:
    """Return every spelling of the password in ``url``: raw and percent-decoded."""
    try:
        parts = urlsplit(url)
        netloc_password = parts.password
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return []
    texts = []
    if netloc_password:
        texts.append(netloc_password)
        userinfo = parts.netloc.rpartition("@")[0]
        texts.append(userinfo.partition(":")[2])
    texts.extend(value for key, value in query if key == "password" and value)
    texts.extend([quote(text, safe="") for text in texts])
    texts.extend([unquote(text) for text in texts])
    return sorted({text for text in texts if text}, key=len, reverse=True)


def redact_url(url: str) -> str:
    """Return ``url`` with its password, in user info or query, replaced by ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "postgresql://***"
    netloc = parts.netloc
    if password is not None:
        userinfo, _, hostinfo = netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        netloc = f"{user}:***@{hostinfo}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode(
            [(key, "***" if key == "password" else value) for key, value in pairs],
            safe="*",
        )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def scrub_password(message: str, url: str) -> str:
    """Return ``message`` with every spelling of the password of ``url`` removed."""
    for text in _password_texts(url):
        message = message.replace(text, "***")
    return message


class PostgresAuditStore(SqlAuditStore):
    """Audit store in the PostgreSQL database at ``url``, created if missing.

    The tables go into the first schema of the connection's ``search_path``
    (normally ``public``).

    Parameters
    ----------
    url
        A libpq connection URL, ``postgresql://user:password@host:port/database``.

    Raises
    ------
    AuditError
        When the server cannot be reached, rejects the login, or the schema cannot
        be created.
    """

    placeholder = "%s"

    def __init__(self, url: str) -> None:
        import psycopg

        self.database_errors = (psycopg.Error,)
        self.location = redact_url(url)
        options: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in url:
            options["connect_timeout"] = CONNECT_TIMEOUT_S
        try:
            self._connection: psycopg.Connection[Any] = psycopg.connect(url, **options)
        except psycopg.Error as exc:
            message = f"cannot connect to audit log {self.location}: {exc}"
            safe_message = scrub_password(message, url)
            if safe_message != message:
                # The driver's message quoted the password, so its cause must go too.
                raise AuditError(safe_message) from None
            raise AuditError(safe_message) from exc
        try:
            self._ensure_schema()
        except psycopg.Error as exc:
            self._connection.close()
            raise AuditError(
                f"cannot create the audit log schema in {self.location}: {exc}; the"
                " user needs the CREATE privilege on the database's first schema"
            ) from exc
        log.debug("opened PostgreSQL audit log %s", self.location)

    def _ensure_schema(self) -> None:
        # Taking the append lock first keeps two processes from both creating it.
        with self.write_transaction():
            row = self._connection.execute(
                "SELECT to_regclass('audit_record') IS NOT NULL,"
                " to_regclass('audit_head') IS NOT NULL"
            ).fetchone()
            assert row is not None
            has_records, has_head = row
            if has_records and has_head:
                return
            if has_records or has_head:
                raise AuditError(
                    f"audit log {self.location} has only one of the tables"
                    " audit_record and audit_head; a table was dropped outside the"
                    " audit log"
                )
            for statement in (*CREATE_TABLES, *CREATE_TRIGGERS):
                self._connection.execute(statement)
            log.info("created audit log schema in %s", self.location)

    @contextmanager
    def write_transaction(self) -> Iterator[None]:
        """Open a transaction that first takes the advisory append lock."""
        with self._connection.transaction():
            self._connection.execute(
                "SELECT pg_advisory_xact_lock(%s)", (APPEND_LOCK_KEY,)
            )
            yield

    @contextmanager
    def read_transaction(self) -> Iterator[None]:
        """Open a REPEATABLE READ, READ ONLY transaction."""
        with self._connection.transaction():
            self._connection.execute(
                "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY"
            )
            yield

    def close(self) -> None:
        """Close the connection."""
        self._connection.close()

    def _cursor(self) -> psycopg.Cursor[Any]:
        return self._connection.cursor()

    def _scan_cursor(self) -> psycopg.ServerCursor[Any]:
        # A server-side cursor fetches rows in batches instead of all at once; it
        # exists only inside the surrounding transaction.
        return self._connection.cursor(name="audit_scan")
