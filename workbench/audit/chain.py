"""Audit events, audit records, and the hash chain that links the records.

An audit event states who accessed which resource, how, why, and with what outcome: an
Orthanc query, an instance fetched, a dataset written or read, a training job started
or ended. The log stores each event as a record numbered 1, 2, 3, ... without gaps.
Each record carries the hash of the record before it, so editing, deleting, inserting
or reordering a stored record breaks the chain at that record.

A record's hash is the lowercase hex SHA-256 digest of the UTF-8 encoding of a JSON
object that contains every other field of the record (``action``, ``actor``,
``details``, ``outcome``, ``previous_hash``, ``purpose``, ``resource``, ``sequence``,
``timestamp``). The JSON is written with sorted keys, no whitespace, non-ASCII
characters unescaped and no NaN or infinity, which is what :func:`canonical_json`
returns. The first record's ``previous_hash`` is :data:`GENESIS_HASH`, 64 zeros. Anyone
can recompute the chain from these rules without this package.

The chain has no secret key. Someone who can write to the store can rewrite a record
and recompute every hash after it, so the chain alone proves integrity only together
with a head hash kept somewhere that person cannot write to.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from workbench.errors import AuditChainError, AuditError, ConfigurationError

__all__ = [
    "GENESIS_HASH",
    "AuditEvent",
    "AuditRecord",
    "ChainVerifier",
    "RecordRow",
    "VerificationReport",
    "canonical_json",
    "chain_record",
    "format_timestamp",
    "record_hash",
    "validate_head_hash",
]

GENESIS_HASH = "0" * 64

# Actions are dotted lowercase verbs (``orthanc.query``, ``job.start``); outcomes are
# single lowercase words (``ok``, ``denied``). Fixed spellings keep filters exact.
ACTION_PATTERN = re.compile(r"[a-z][a-z0-9_-]*(?:\.[a-z][a-z0-9_-]*)*")
OUTCOME_PATTERN = re.compile(r"[a-z][a-z0-9_-]*")
HASH_PATTERN = re.compile(r"[0-9a-f]{64}")

# Number of hex digits of a hash shown in messages.
SHORT_HASH = 16


def canonical_json(value: Any) -> str:
    """Encode ``value`` as the canonical JSON text that record hashes are computed on.

    Raises
    ------
    TypeError
        When ``value`` contains an object that JSON cannot represent.
    ValueError
        When ``value`` contains NaN or an infinite float.
    """
    return json.dumps(
        value,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=False,
    )


def format_timestamp(moment: datetime) -> str:
    """Format ``moment`` as a record timestamp: UTC, ISO 8601, with microseconds.

    A naive ``moment`` is taken to be in UTC. Timestamps in this format have a fixed
    width, so comparing them as text orders them in time.
    """
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def record_hash(
    *,
    sequence: int,
    timestamp: str,
    actor: str,
    action: str,
    resource: str,
    purpose: str,
    outcome: str,
    details: Mapping[str, Any],
    previous_hash: str,
) -> str:
    """Return the hex SHA-256 hash of a record's fields in canonical JSON."""
    fields = {
        "sequence": sequence,
        "timestamp": timestamp,
        "actor": actor,
        "action": action,
        "resource": resource,
        "purpose": purpose,
        "outcome": outcome,
        "details": details,
        "previous_hash": previous_hash,
    }
    return hashlib.sha256(canonical_json(fields).encode("utf-8")).hexdigest()


def _check_text(name: str, value: object, *, pattern: re.Pattern[str] | None) -> None:
    if not isinstance(value, str):
        raise AuditError(
            f"audit event field {name} must be a string, got {type(value).__name__}"
        )
    if "\x00" in value:
        raise AuditError(
            f"audit event field {name} contains a NUL character, which PostgreSQL"
            " text cannot store; remove it"
        )
    if pattern is not None and not pattern.fullmatch(value):
        raise AuditError(
            f"audit event field {name} is {value!r}; expected lowercase words of"
            f" letters, digits, '_' or '-' matching {pattern.pattern}"
        )


@dataclass(frozen=True)
class AuditEvent:
    """One access to record in the audit log, before it is numbered and chained.

    Parameters
    ----------
    action
        Dotted lowercase verb: ``orthanc.query``, ``instance.fetch``,
        ``dataset.write``, ``dataset.read``, ``job.start``, ``job.end``.
    resource
        What was accessed, such as ``orthanc:/tools/find`` or a dataset path. Never
        a patient name, id or source UID.
    purpose
        Why, in the user's words, such as ``"chest CT cohort"``.
    outcome
        ``ok``, ``denied``, ``error``, ``quarantined``, ``skipped`` or another
        lowercase word.
    details
        JSON-serialisable mapping of further facts (counts, pseudonymous ids). It
        is copied through a JSON round trip when the event is created, so tuples
        become lists and integer keys become strings, exactly as they are stored.
    actor
        Who acted. ``None`` means the user of the appending process:
        ``WORKBENCH_USER`` if set, else the login name.

    Raises
    ------
    AuditError
        When a field has the wrong type or spelling, or ``details`` cannot be
        encoded as JSON.
    """

    action: str
    resource: str = ""
    purpose: str = ""
    outcome: str = "ok"
    details: Mapping[str, Any] = field(default_factory=dict)
    actor: str | None = None

    def __post_init__(self) -> None:
        _check_text("action", self.action, pattern=ACTION_PATTERN)
        _check_text("resource", self.resource, pattern=None)
        _check_text("purpose", self.purpose, pattern=None)
        _check_text("outcome", self.outcome, pattern=OUTCOME_PATTERN)
        if self.actor is not None:
            _check_text("actor", self.actor, pattern=None)
            if not self.actor:
                raise AuditError(
                    "audit event field actor is empty; pass a user name, or None"
                    " for the current user"
                )
        if not isinstance(self.details, Mapping):
            raise AuditError(
                f"details of audit event {self.action!r} must be a mapping, got"
                f" {type(self.details).__name__}"
            )
        try:
            text = canonical_json(dict(self.details))
            text.encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise AuditError(
                f"details of audit event {self.action!r} cannot be stored as JSON:"
                f" {exc}; use only strings, numbers, booleans, None, lists and"
                " mappings with string keys"
            ) from exc
        object.__setattr__(self, "details", json.loads(text))


@dataclass(frozen=True)
class AuditRecord:
    """An audit event as stored: numbered, timestamped and chained.

    Attributes
    ----------
    sequence
        Position in the log: 1, 2, 3, ... without gaps.
    timestamp
        Time of the append in UTC, ISO 8601 with microseconds, such as
        ``2026-01-05T14:03:27.123456+00:00``.
    actor, action, resource, purpose, outcome, details
        The fields of the :class:`AuditEvent`, with the actor filled in.
    previous_hash
        Hash of the record before, or :data:`GENESIS_HASH` for record 1.
    hash
        Hex SHA-256 of every other field, see :func:`record_hash`.
    """

    sequence: int
    timestamp: str
    actor: str
    action: str
    resource: str
    purpose: str
    outcome: str
    details: dict[str, Any]
    previous_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        """Return every field as a JSON-serialisable dictionary."""
        return {
            "sequence": self.sequence,
            "timestamp": self.timestamp,
            "actor": self.actor,
            "action": self.action,
            "resource": self.resource,
            "purpose": self.purpose,
            "outcome": self.outcome,
            "details": self.details,
            "previous_hash": self.previous_hash,
            "hash": self.hash,
        }


class RecordRow(NamedTuple):
    """A record as a store reads and writes it, with ``details`` as JSON text."""

    sequence: int
    timestamp: str
    actor: str
    action: str
    resource: str
    purpose: str
    outcome: str
    details: str
    previous_hash: str
    hash: str

    @classmethod
    def from_record(cls, record: AuditRecord) -> RecordRow:
        """Return the row that stores ``record``."""
        return cls(
            record.sequence,
            record.timestamp,
            record.actor,
            record.action,
            record.resource,
            record.purpose,
            record.outcome,
            canonical_json(record.details),
            record.previous_hash,
            record.hash,
        )

    def to_record(self) -> AuditRecord:
        """Return the record this row stores, without checking its hash.

        Raises
        ------
        AuditChainError
            When the stored details are not JSON, which append never writes.
        """
        try:
            details = json.loads(self.details)
        except (TypeError, ValueError) as exc:
            raise AuditChainError(
                f"audit record {self.sequence} was altered: its details are not"
                " valid JSON; run `workbench audit verify`",
                sequence=self.sequence,
            ) from exc
        return AuditRecord(
            sequence=self.sequence,
            timestamp=self.timestamp,
            actor=self.actor,
            action=self.action,
            resource=self.resource,
            purpose=self.purpose,
            outcome=self.outcome,
            details=details,
            previous_hash=self.previous_hash,
            hash=self.hash,
        )


def chain_record(
    event: AuditEvent,
    *,
    sequence: int,
    timestamp: str,
    actor: str,
    previous_hash: str,
) -> AuditRecord:
    """Return ``event`` as the record that follows the one hashed ``previous_hash``."""
    fields: dict[str, Any] = {
        "sequence": sequence,
        "timestamp": timestamp,
        "actor": event.actor if event.actor is not None else actor,
        "action": event.action,
        "resource": event.resource,
        "purpose": event.purpose,
        "outcome": event.outcome,
        "details": dict(event.details),
        "previous_hash": previous_hash,
    }
    return AuditRecord(**fields, hash=record_hash(**fields))


@dataclass(frozen=True)
class VerificationReport:
    """Result of a successful :meth:`AuditLog.verify`.

    Attributes
    ----------
    record_count
        Number of records checked.
    head_sequence
        Sequence number of the newest record, 0 for an empty log.
    head_hash
        Hash of the newest record, or :data:`GENESIS_HASH` for an empty log. Keep it
        outside the store and pass it to ``verify(expected_head=...)`` later to
        detect deletion of the newest records.
    """

    record_count: int
    head_sequence: int
    head_hash: str


def _short(value: object) -> str:
    return str(value)[:SHORT_HASH]


class ChainVerifier:
    """Check stored rows, in sequence order, against the hash chain and head anchor.

    Feed every row to :meth:`check` in ascending sequence order, then call
    :meth:`finish`. Both raise :class:`AuditChainError` at the first record that
    fails, with ``sequence`` set to that record's number.

    Parameters
    ----------
    anchor
        ``(sequence, hash)`` of the newest record as the store's head anchor
        records it, or ``None`` when the anchor row is missing.
    expected_head
        A head hash the caller kept outside the store, or ``None``.
    """

    def __init__(self, anchor: tuple[int, str] | None, expected_head: str | None):
        self.anchor = anchor
        self.expected_head = expected_head
        self.record_count = 0
        self.head_hash = GENESIS_HASH
        self.expected_head_found = expected_head in (None, GENESIS_HASH)

    def check(self, row: RecordRow) -> None:
        """Check the next row: its number, its link, its hash and the anchor."""
        sequence = self.record_count + 1

        # Gap-free numbering: a larger number means records were deleted.
        if row.sequence != sequence:
            if row.sequence > sequence:
                raise AuditChainError(
                    f"audit record {sequence} is missing: the record after"
                    f" {sequence - 1} has sequence {row.sequence}, so records were"
                    " deleted",
                    sequence=sequence,
                )
            raise AuditChainError(
                f"audit record with sequence {row.sequence} is invalid: sequences"
                " start at 1, so the record was inserted outside the audit log",
                sequence=row.sequence,
            )

        # Link to the record before.
        if row.previous_hash != self.head_hash:
            raise AuditChainError(
                f"audit record {sequence} does not link to record {sequence - 1}:"
                f" its previous_hash {_short(row.previous_hash)}... differs from"
                f" {_short(self.head_hash)}..., so a record was altered, inserted"
                " or moved here",
                sequence=sequence,
            )

        # Contents against the stored hash.
        try:
            details = json.loads(row.details)
        except (TypeError, ValueError):
            details = None
        if not isinstance(details, dict) or canonical_json(details) != row.details:
            raise AuditChainError(
                f"audit record {sequence} was altered: its details are not the"
                " canonical JSON text that append writes",
                sequence=sequence,
            )
        computed = record_hash(
            sequence=row.sequence,
            timestamp=row.timestamp,
            actor=row.actor,
            action=row.action,
            resource=row.resource,
            purpose=row.purpose,
            outcome=row.outcome,
            details=details,
            previous_hash=row.previous_hash,
        )
        if computed != row.hash:
            raise AuditChainError(
                f"audit record {sequence} was altered: its stored hash"
                f" {_short(row.hash)}... does not match the hash"
                f" {_short(computed)}... of its contents",
                sequence=sequence,
            )

        # Head anchor: no record may lie beyond it, and its record must match.
        if self.anchor is not None:
            anchor_sequence, anchor_hash = self.anchor
            if sequence > anchor_sequence:
                raise AuditChainError(
                    f"audit record {sequence} lies beyond the head anchor, which"
                    f" names record {anchor_sequence}: the record was added outside"
                    " the audit log, or the anchor was rolled back",
                    sequence=sequence,
                )
            if sequence == anchor_sequence and row.hash != anchor_hash:
                raise AuditChainError(
                    f"audit record {sequence} does not match the head anchor: its"
                    f" hash is {_short(row.hash)}..., the anchor has"
                    f" {_short(anchor_hash)}...",
                    sequence=sequence,
                )

        if row.hash == self.expected_head:
            self.expected_head_found = True
        self.record_count = sequence
        self.head_hash = row.hash

    def finish(self) -> VerificationReport:
        """Check that nothing is missing after the last row, and return the report."""
        count = self.record_count
        if self.anchor is None:
            raise AuditChainError(
                "the head anchor of the audit log is missing: it was deleted outside"
                " the audit log, so deletion of the newest records cannot be ruled"
                " out; compare with a head hash kept elsewhere",
                sequence=None,
            )
        anchor_sequence, anchor_hash = self.anchor
        if anchor_sequence > count:
            raise AuditChainError(
                f"audit record {count + 1} is missing: the head anchor names record"
                f" {anchor_sequence}, but the log ends at record {count}, so the"
                " newest records were deleted",
                sequence=count + 1,
            )
        if anchor_sequence == 0 and anchor_hash != GENESIS_HASH:
            raise AuditChainError(
                f"the head anchor of the empty audit log has hash"
                f" {_short(anchor_hash)}... instead of {GENESIS_HASH[:SHORT_HASH]}...,"
                " so it was altered",
                sequence=None,
            )
        if not self.expected_head_found:
            raise AuditChainError(
                f"no audit record has the expected head hash {self.expected_head}:"
                f" the log ends at record {count} (hash {_short(self.head_hash)}...),"
                f" so records after {count} were deleted, or a record was rewritten"
                " together with every hash after it",
                sequence=count + 1,
            )
        return VerificationReport(
            record_count=count, head_sequence=count, head_hash=self.head_hash
        )


def validate_head_hash(value: str) -> str:
    """Return ``value`` in lowercase if it is a 64-digit hex hash.

    Raises
    ------
    ConfigurationError
        When ``value`` is not a 64-digit hex string.
    """
    normalised = value.strip().lower()
    if not HASH_PATTERN.fullmatch(normalised):
        raise ConfigurationError(
            f"expected head hash {value!r} is not a SHA-256 hash; pass the 64 hex"
            " digits that `workbench audit verify` printed as head hash"
        )
    return normalised
