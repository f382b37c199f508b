"""Filters for reading audit records back, translated into one SQL condition.

The condition uses only SQL that SQLite and PostgreSQL share, so both stores run
the same text with their own parameter marker.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from workbench.audit.chain import format_timestamp
from workbench.errors import ConfigurationError

__all__ = ["RecordFilter", "parse_time"]


def parse_time(value: datetime | str) -> datetime:
    """Return ``value`` as an aware datetime; naive values are taken to be in UTC.

    Strings are ISO 8601 (``2026-01-05``, ``2026-01-05T14:00``,
    ``2026-01-05T14:00:00+01:00``, a trailing ``Z``).

    Raises
    ------
    ConfigurationError
        When a string is not an ISO 8601 date or time.
    """
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError as exc:
            raise ConfigurationError(
                f"time {value!r} is not ISO 8601; use a form such as 2026-01-05 or"
                " 2026-01-05T14:00:00+00:00"
            ) from exc
    if not isinstance(value, datetime):
        raise ConfigurationError(
            f"time filter must be a datetime or ISO 8601 string, got"
            f" {type(value).__name__}"
        )
    return value


@dataclass(frozen=True)
class RecordFilter:
    """Filter of :meth:`AuditLog.records`, where ``None`` matches any value.

    Attributes
    ----------
    action, actor, outcome
        Exact values to match.
    resource_prefix
        Records whose resource starts with this text (case-sensitive).
    since, until
        Records with ``since <= timestamp < until``.
    limit
        Maximum number of records: the newest ones that match.
    """

    action: str | None = None
    actor: str | None = None
    outcome: str | None = None
    resource_prefix: str | None = None
    since: datetime | str | None = None
    until: datetime | str | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        limit = self.limit
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 1
        ):
            raise ConfigurationError(
                f"record limit {limit!r} is invalid; pass a positive integer or None"
            )

    def to_sql(self, placeholder: str) -> tuple[str, list[Any]]:
        """Return the SQL condition and its parameters, marked with ``placeholder``.

        The condition is an empty string when nothing is filtered.
        """
        conditions: list[str] = []
        parameters: list[Any] = []
        for column, value in (
            ("action", self.action),
            ("actor", self.actor),
            ("outcome", self.outcome),
        ):
            if value is not None:
                conditions.append(f"{column} = {placeholder}")
                parameters.append(value)

        # substr, unlike LIKE, is case-sensitive in SQLite and needs no escaping.
        if self.resource_prefix:
            conditions.append(f"substr(resource, 1, {placeholder}) = {placeholder}")
            parameters.extend([len(self.resource_prefix), self.resource_prefix])

        # Stored timestamps have a fixed width, so text order is time order.
        if self.since is not None:
            conditions.append(f"timestamp >= {placeholder}")
            parameters.append(format_timestamp(parse_time(self.since)))
        if self.until is not None:
            conditions.append(f"timestamp < {placeholder}")
            parameters.append(format_timestamp(parse_time(self.until)))
        return " AND ".join(conditions), parameters
