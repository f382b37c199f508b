"""Tests of the audit log, run once against SQLite and once against PostgreSQL.

Tamper tests change the tables directly, the way someone with database access
would, after disabling the append-only triggers, and check that verification names
the first bad record.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import multiprocessing
import re
import sqlite3
import stat
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from workbench.audit import (
    GENESIS_HASH,
    AuditEvent,
    AuditLog,
    AuditRecord,
    current_user,
    open_audit_log,
    record_hash,
)
from workbench.audit.postgres_store import redact_url
from workbench.errors import AuditChainError, AuditError, ConfigurationError

TIMESTAMP_PATTERN = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00")


@dataclass
class AuditBackend:
    """A database holding one audit log, with raw access for tampering."""

    name: str
    url: str
    sqlite_path: Path | None = None

    def open(self) -> AuditLog:
        return open_audit_log(self.url)

    def execute(self, statement: str, parameters: Sequence[Any] = ()) -> None:
        """Run one statement outside the audit log, marking parameters with ``?``."""
        if self.sqlite_path is not None:
            connection = sqlite3.connect(self.sqlite_path)
            try:
                connection.execute(statement, parameters)
                connection.commit()
            finally:
                connection.close()
        else:
            with psycopg.connect(self.url, autocommit=True) as pg_connection:
                pg_connection.execute(statement.replace("?", "%s"), parameters)

    def disable_guards(self) -> None:
        """Remove the triggers that reject UPDATE and DELETE."""
        if self.sqlite_path is not None:
            for trigger in (
                "audit_record_no_update",
                "audit_record_no_delete",
                "audit_head_no_delete",
            ):
                self.execute(f"DROP TRIGGER {trigger}")
        else:
            self.execute("ALTER TABLE audit_record DISABLE TRIGGER USER")
            self.execute("ALTER TABLE audit_head DISABLE TRIGGER USER")


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AuditBackend:
    if request.param == "sqlite":
        path = tmp_path / "audit.sqlite"
        return AuditBackend("sqlite", f"sqlite:///{path}", sqlite_path=path)
    return AuditBackend("postgres", request.getfixturevalue("fresh_postgres_url"))


@pytest.fixture
def audit(backend: AuditBackend) -> Iterator[AuditLog]:
    with backend.open() as log:
        yield log


def sample_events() -> list[AuditEvent]:
    """Five events of different kinds; ``fill`` appends them as records 1 to 5."""
    return [
        AuditEvent(
            action="orthanc.query",
            resource="orthanc:/tools/find",
            purpose="chest CT cohort",
            details={"level": "Series", "matches": 12},
        ),
        AuditEvent(
            action="instance.fetch",
            resource="orthanc:/instances/0a1b2c3d-4e5f6a7b-8c9d0e1f-2a3b4c5d-6e7f8a9b",
            purpose="chest CT cohort",
            actor="DOE^JANE-analyst",
        ),
        AuditEvent(
            action="dataset.write",
            resource="datasets/chest-ct/v1",
            purpose="chest CT cohort",
            outcome="quarantined",
            details={"instances": 40, "quarantined": 2, "reasons": ["burned-in text"]},
        ),
        AuditEvent(
            action="job.start",
            resource="runs/resnet-7",
            purpose="baseline",
            details={"nested": {"ß": "Grüße", "list": [1, 2.5, None, True]}},
        ),
        AuditEvent(
            action="job.end",
            resource="runs/resnet-7",
            purpose="baseline",
            outcome="error",
        ),
    ]


def fill(log: AuditLog) -> list[AuditRecord]:
    return [log.append(event) for event in sample_events()]


def expected_hash(record: AuditRecord) -> str:
    """Compute a record's hash from the documented rule, without the package."""
    fields = record.to_dict()
    del fields["hash"]
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# Appending and reading back


def test_append_numbers_and_chains_records(audit: AuditLog) -> None:
    records = fill(audit)

    assert [record.sequence for record in records] == [1, 2, 3, 4, 5]
    assert records[0].previous_hash == GENESIS_HASH
    for before, after in itertools.pairwise(records):
        assert after.previous_hash == before.hash
    for record in records:
        assert record.hash == expected_hash(record)
        assert TIMESTAMP_PATTERN.fullmatch(record.timestamp)


def test_records_read_back_unchanged(audit: AuditLog) -> None:
    appended = fill(audit)

    stored = audit.records()

    assert stored == appended
    assert stored[3].details == {"nested": {"ß": "Grüße", "list": [1, 2.5, None, True]}}
    assert stored[2].outcome == "quarantined"


def test_append_many_is_one_segment(audit: AuditLog) -> None:
    audit.append(AuditEvent(action="job.start"))
    events = [AuditEvent(action="instance.fetch", resource=f"r{i}") for i in range(4)]

    records = audit.append_many(events)

    assert [record.sequence for record in records] == [2, 3, 4, 5]
    assert {record.timestamp for record in records} == {records[0].timestamp}
    assert [record.resource for record in records] == ["r0", "r1", "r2", "r3"]
    assert audit.verify().head_hash == records[-1].hash


def test_append_many_empty_stores_nothing(audit: AuditLog) -> None:
    assert audit.append_many([]) == []
    assert audit.records() == []


def test_append_many_rejects_non_event(audit: AuditLog) -> None:
    with pytest.raises(AuditError, match="expects AuditEvent objects, got dict"):
        audit.append_many([AuditEvent(action="job.start"), {"action": "job.end"}])  # type: ignore[list-item]
    assert audit.records() == []


def test_timestamps_are_current_utc(audit: AuditLog) -> None:
    before = datetime.now(UTC)
    record = audit.append(AuditEvent(action="job.start"))
    after = datetime.now(UTC)

    stamp = datetime.fromisoformat(record.timestamp)
    assert stamp.utcoffset() == timedelta(0)
    assert before <= stamp <= after


def test_actor_defaults_to_workbench_user(
    audit: AuditLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKBENCH_USER", "analyst-7")
    implicit = audit.append(AuditEvent(action="dataset.read"))
    explicit = audit.append(AuditEvent(action="dataset.read", actor="DOE^JANE"))

    assert implicit.actor == "analyst-7"
    assert explicit.actor == "DOE^JANE"


def test_actor_defaults_to_login_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import getpass

    monkeypatch.delenv("WORKBENCH_USER", raising=False)
    assert current_user() == getpass.getuser()


# Filters


def test_records_filters_exact_fields(audit: AuditLog) -> None:
    fill(audit)

    assert [r.sequence for r in audit.records(action="job.end")] == [5]
    assert [r.sequence for r in audit.records(actor="DOE^JANE-analyst")] == [2]
    assert [r.sequence for r in audit.records(outcome="quarantined")] == [3]
    assert audit.records(action="job") == []


def test_records_filters_resource_prefix(audit: AuditLog) -> None:
    fill(audit)
    audit.append(AuditEvent(action="dataset.read", resource="RUNS/upper"))
    audit.append(AuditEvent(action="dataset.read", resource="runs_x/literal"))

    assert [r.sequence for r in audit.records(resource_prefix="orthanc:/")] == [1, 2]
    assert [r.sequence for r in audit.records(resource_prefix="runs/")] == [4, 5]
    # The prefix is literal text: '_' and '%' are no wildcards, case matters.
    assert [r.sequence for r in audit.records(resource_prefix="runs_")] == [7]
    assert audit.records(resource_prefix="runs%") == []
    assert [r.sequence for r in audit.records(resource_prefix="RUNS")] == [6]


def test_records_filters_time_range(audit: AuditLog) -> None:
    first = audit.append(AuditEvent(action="job.start"))
    second = audit.append(AuditEvent(action="job.end"))
    first_time = datetime.fromisoformat(first.timestamp)
    second_time = datetime.fromisoformat(second.timestamp)
    assert first_time < second_time

    assert [r.sequence for r in audit.records(since=second_time)] == [2]
    assert [r.sequence for r in audit.records(until=second_time)] == [1]
    assert [r.sequence for r in audit.records(since=first.timestamp)] == [1, 2]
    # Naive datetimes and strings without offset are UTC.
    naive = second_time.replace(tzinfo=None)
    assert [r.sequence for r in audit.records(since=naive)] == [2]
    assert [r.sequence for r in audit.records(until=naive.isoformat())] == [1]
    # An offset is converted to UTC before comparing.
    plus_two = second_time.astimezone(UTC).replace(tzinfo=None) + timedelta(hours=2)
    local = plus_two.isoformat() + "+02:00"
    assert [r.sequence for r in audit.records(since=local)] == [2]
    assert audit.records(since=second_time + timedelta(seconds=1)) == []


def test_records_limit_keeps_newest(audit: AuditLog) -> None:
    fill(audit)

    assert [r.sequence for r in audit.records(limit=2)] == [4, 5]
    assert [r.sequence for r in audit.records(limit=9)] == [1, 2, 3, 4, 5]
    combined = audit.records(resource_prefix="orthanc:", limit=1)
    assert [r.sequence for r in combined] == [2]


def test_records_rejects_bad_filters(audit: AuditLog) -> None:
    with pytest.raises(ConfigurationError, match="limit 0 is invalid"):
        audit.records(limit=0)
    with pytest.raises(ConfigurationError, match="'yesterday' is not ISO 8601"):
        audit.records(since="yesterday")


# Verification of an intact log


def test_verify_empty_log(audit: AuditLog) -> None:
    report = audit.verify()

    assert report.record_count == 0
    assert report.head_sequence == 0
    assert report.head_hash == GENESIS_HASH


def test_verify_intact_log(audit: AuditLog) -> None:
    records = fill(audit)

    report = audit.verify()

    assert report.record_count == 5
    assert report.head_sequence == 5
    assert report.head_hash == records[-1].hash


def test_verify_accepts_older_expected_head(audit: AuditLog) -> None:
    records = fill(audit)

    assert audit.verify(expected_head=records[2].hash).record_count == 5
    assert audit.verify(expected_head=records[4].hash.upper()).record_count == 5
    assert audit.verify(expected_head=GENESIS_HASH).record_count == 5


def test_verify_rejects_malformed_expected_head(audit: AuditLog) -> None:
    with pytest.raises(ConfigurationError, match="is not a SHA-256 hash"):
        audit.verify(expected_head="abc123")


def test_reopened_log_continues_chain(backend: AuditBackend) -> None:
    with backend.open() as log:
        first = fill(log)
    with backend.open() as log:
        sixth = log.append(AuditEvent(action="dataset.read"))
        report = log.verify()

    assert sixth.sequence == 6
    assert sixth.previous_hash == first[-1].hash
    assert report.head_hash == sixth.hash


# Tampering


def test_triggers_reject_update_and_delete(
    audit: AuditLog, backend: AuditBackend
) -> None:
    fill(audit)
    errors = (sqlite3.Error, psycopg.Error)

    with pytest.raises(errors, match="append-only"):
        backend.execute("UPDATE audit_record SET purpose = 'other' WHERE sequence = 3")
    with pytest.raises(errors, match="append-only"):
        backend.execute("DELETE FROM audit_record WHERE sequence = 5")
    with pytest.raises(errors):
        backend.execute("DELETE FROM audit_head")
    assert audit.verify().record_count == 5


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("purpose", "'another study'"),
        ("actor", "'someone-else'"),
        ("outcome", "'ok'"),
        ("timestamp", "'2020-01-01T00:00:00.000000+00:00'"),
        # Same JSON content, other spacing: the stored text is what is hashed.
        (
            "details",
            """'{"instances": 40, "quarantined": 2, "reasons": ["burned-in text"]}'""",
        ),
        (
            "details",
            """'{"instances":41,"quarantined":2,"reasons":["burned-in text"]}'""",
        ),
        ("hash", "'" + "ab" * 32 + "'"),
    ],
)
def test_verify_detects_edited_field(
    audit: AuditLog, backend: AuditBackend, column: str, value: str
) -> None:
    fill(audit)
    backend.disable_guards()
    backend.execute(f"UPDATE audit_record SET {column} = {value} WHERE sequence = 3")  # noqa: S608

    with pytest.raises(AuditChainError, match="audit record 3 was altered") as caught:
        audit.verify()
    assert caught.value.sequence == 3


def test_verify_detects_rehashed_edit_at_next_link(
    audit: AuditLog, backend: AuditBackend
) -> None:
    records = fill(audit)
    backend.disable_guards()
    edited = records[2].to_dict()
    edited["purpose"] = "another study"
    del edited["hash"]
    backend.execute(
        "UPDATE audit_record SET purpose = ?, hash = ? WHERE sequence = 3",
        ("another study", record_hash(**edited)),
    )

    # Record 3 is self-consistent again, so the break shows at record 4's link.
    with pytest.raises(AuditChainError, match="record 4 does not link") as caught:
        audit.verify()
    assert caught.value.sequence == 4


def test_verify_detects_deleted_middle_record(
    audit: AuditLog, backend: AuditBackend
) -> None:
    fill(audit)
    backend.disable_guards()
    backend.execute("DELETE FROM audit_record WHERE sequence = 3")

    with pytest.raises(AuditChainError, match="audit record 3 is missing") as caught:
        audit.verify()
    assert caught.value.sequence == 3


def test_verify_detects_swapped_records(audit: AuditLog, backend: AuditBackend) -> None:
    fill(audit)
    backend.disable_guards()
    backend.execute("UPDATE audit_record SET sequence = -1 WHERE sequence = 2")
    backend.execute("UPDATE audit_record SET sequence = 2 WHERE sequence = 4")
    backend.execute("UPDATE audit_record SET sequence = 4 WHERE sequence = -1")

    with pytest.raises(AuditChainError, match="record 2 does not link") as caught:
        audit.verify()
    assert caught.value.sequence == 2


def test_verify_detects_forged_record_at_end(
    audit: AuditLog, backend: AuditBackend
) -> None:
    records = fill(audit)
    forged = forged_record(sequence=6, previous_hash=records[-1].hash)
    backend.execute(insert_statement(), forged)

    # The forged record is well chained; only the head anchor exposes it.
    with pytest.raises(AuditChainError, match="record 6 lies beyond") as caught:
        audit.verify()
    assert caught.value.sequence == 6


def test_verify_detects_forged_record_in_middle(
    audit: AuditLog, backend: AuditBackend
) -> None:
    records = fill(audit)
    backend.disable_guards()
    # Make room at 3 by moving records 3 to 5 up by one, via negative numbers.
    backend.execute(
        "UPDATE audit_record SET sequence = -sequence - 1 WHERE sequence >= 3"
    )
    backend.execute("UPDATE audit_record SET sequence = -sequence WHERE sequence < 0")
    backend.execute(
        insert_statement(), forged_record(sequence=3, previous_hash=records[1].hash)
    )

    # A forged record chained onto record 2 verifies by itself; the record after
    # it cannot link to it.
    with pytest.raises(AuditChainError, match="record 4 does not link") as caught:
        audit.verify()
    assert caught.value.sequence == 4


def test_verify_detects_forged_record_before_first(
    audit: AuditLog, backend: AuditBackend
) -> None:
    fill(audit)
    backend.execute(
        insert_statement(), forged_record(sequence=0, previous_hash=GENESIS_HASH)
    )

    with pytest.raises(AuditChainError, match="sequence 0 is invalid") as caught:
        audit.verify()
    assert caught.value.sequence == 0


def test_verify_detects_truncation_by_anchor(
    audit: AuditLog, backend: AuditBackend
) -> None:
    fill(audit)
    backend.disable_guards()
    backend.execute("DELETE FROM audit_record WHERE sequence = 5")

    with pytest.raises(AuditChainError, match="audit record 5 is missing") as caught:
        audit.verify()
    assert caught.value.sequence == 5


def test_verify_detects_truncation_by_expected_head(
    audit: AuditLog, backend: AuditBackend
) -> None:
    records = fill(audit)
    kept_head = audit.verify().head_hash
    backend.disable_guards()
    backend.execute("DELETE FROM audit_record WHERE sequence = 5")
    backend.execute(
        "UPDATE audit_head SET sequence = 4, hash = ? WHERE id = 1", (records[3].hash,)
    )

    # Rolling the anchor back with the records leaves a valid, shorter chain.
    assert audit.verify().record_count == 4
    with pytest.raises(
        AuditChainError, match="no audit record has the expected"
    ) as caught:
        audit.verify(expected_head=kept_head)
    assert caught.value.sequence == 5


def test_verify_detects_rolled_back_anchor(
    audit: AuditLog, backend: AuditBackend
) -> None:
    records = fill(audit)
    backend.execute(
        "UPDATE audit_head SET sequence = 3, hash = ? WHERE id = 1", (records[2].hash,)
    )

    with pytest.raises(AuditChainError, match="record 4 lies beyond") as caught:
        audit.verify()
    assert caught.value.sequence == 4


def test_verify_detects_altered_anchor_hash(
    audit: AuditLog, backend: AuditBackend
) -> None:
    fill(audit)
    backend.execute("UPDATE audit_head SET hash = ? WHERE id = 1", ("cd" * 32,))

    with pytest.raises(
        AuditChainError, match="does not match the head anchor"
    ) as caught:
        audit.verify()
    assert caught.value.sequence == 5


def test_verify_detects_deleted_anchor(audit: AuditLog, backend: AuditBackend) -> None:
    fill(audit)
    backend.disable_guards()
    backend.execute("DELETE FROM audit_head")

    with pytest.raises(
        AuditChainError, match="head anchor of the audit log is missing"
    ) as caught:
        audit.verify()
    assert caught.value.sequence is None


def test_records_reports_invalid_details(
    audit: AuditLog, backend: AuditBackend
) -> None:
    fill(audit)
    backend.disable_guards()
    backend.execute("UPDATE audit_record SET details = '{not json' WHERE sequence = 2")

    with pytest.raises(AuditChainError, match="details are not valid JSON") as caught:
        audit.records()
    assert caught.value.sequence == 2
    with pytest.raises(AuditChainError, match="record 2 was altered") as caught:
        audit.verify()
    assert caught.value.sequence == 2


def test_append_rejected_after_truncation(
    audit: AuditLog, backend: AuditBackend
) -> None:
    fill(audit)
    backend.disable_guards()
    backend.execute("DELETE FROM audit_record WHERE sequence = 5")

    with pytest.raises(
        AuditChainError, match="changed outside the workbench"
    ) as caught:
        audit.append(AuditEvent(action="job.start"))
    assert caught.value.sequence == 5
    assert [r.sequence for r in audit.records()] == [1, 2, 3, 4]


def forged_record(*, sequence: int, previous_hash: str) -> tuple[Any, ...]:
    """Return a correctly hashed row, as anyone who read the hashing rule can make."""
    fields: dict[str, Any] = {
        "sequence": sequence,
        "timestamp": "2026-01-05T12:00:00.000000+00:00",
        "actor": "intruder",
        "action": "dataset.read",
        "resource": "datasets/chest-ct/v1",
        "purpose": "",
        "outcome": "ok",
        "details": {},
        "previous_hash": previous_hash,
    }
    row = {**fields, "details": "{}", "hash": record_hash(**fields)}
    return tuple(row.values())


def insert_statement() -> str:
    return (
        "INSERT INTO audit_record (sequence, timestamp, actor, action, resource,"
        " purpose, outcome, details, previous_hash, hash)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
    )


# Several processes appending at once

WRITERS = 4
APPENDS_PER_WRITER = 50


def append_from_process(url: str, writer: int, start: Any) -> None:
    """Append events in a child process; every third append is a pair."""
    # Wait until every writer has imported the package, so that all run at once.
    start.wait(timeout=60)
    with open_audit_log(url) as log:
        number = 0
        while number < APPENDS_PER_WRITER:
            if number % 3 == 2:
                pair = [
                    AuditEvent(
                        action="instance.fetch",
                        actor=f"writer-{writer}",
                        details={"writer": writer, "number": number + offset},
                    )
                    for offset in (0, 1)
                ]
                log.append_many(pair)
                number += 2
            else:
                log.append(
                    AuditEvent(
                        action="instance.fetch",
                        actor=f"writer-{writer}",
                        details={"writer": writer, "number": number},
                    )
                )
                number += 1


def test_concurrent_appends_keep_one_chain(backend: AuditBackend) -> None:
    # Spawned processes start clean, as Dask workers do; none shares a connection.
    context = multiprocessing.get_context("spawn")
    start = context.Barrier(WRITERS + 1)
    processes = [
        context.Process(target=append_from_process, args=(backend.url, writer, start))
        for writer in range(WRITERS)
    ]
    for process in processes:
        process.start()
    try:
        # The writers create the schema themselves, racing to do it first.
        start.wait(timeout=60)
        # Verification of snapshots taken while the writers run must pass too.
        verified_while_running = 0
        while any(process.is_alive() for process in processes):
            with backend.open() as log:
                log.verify()
            verified_while_running += 1
        for process in processes:
            process.join(timeout=60)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join()
    assert [process.exitcode for process in processes] == [0] * WRITERS

    with backend.open() as log:
        report = log.verify()
        records = log.records()
    assert report.record_count == WRITERS * APPENDS_PER_WRITER
    assert [r.sequence for r in records] == list(range(1, report.record_count + 1))
    for writer in range(WRITERS):
        numbers = [
            r.details["number"] for r in records if r.details["writer"] == writer
        ]
        assert numbers == list(range(APPENDS_PER_WRITER))
    assert verified_while_running >= 1


def test_threads_share_one_log(audit: AuditLog) -> None:
    def append_from_thread(thread: int) -> None:
        for number in range(25):
            audit.append(
                AuditEvent(
                    action="instance.fetch",
                    details={"thread": thread, "number": number},
                )
            )

    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(append_from_thread, range(4)))

    assert audit.verify().record_count == 100
    records = audit.records()
    for thread in range(4):
        numbers = [
            r.details["number"] for r in records if r.details["thread"] == thread
        ]
        assert numbers == list(range(25))


# Opening, closing and process rules


def test_open_default_uses_workbench_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WORKBENCH_AUDIT_URL", raising=False)
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))

    with open_audit_log() as log:
        log.append(AuditEvent(action="job.start"))
        location = log.location

    path = tmp_path / "audit.sqlite"
    assert location == str(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_open_default_uses_environment_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "elsewhere.sqlite"
    monkeypatch.setenv("WORKBENCH_AUDIT_URL", f"sqlite:///{path}")
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path / "unused"))

    with open_audit_log() as log:
        assert log.location == str(path)
    assert path.is_file()


def test_open_plain_path(tmp_path: Path) -> None:
    with open_audit_log(tmp_path / "a.sqlite") as log:
        log.append(AuditEvent(action="job.start"))
    with open_audit_log(str(tmp_path / "a.sqlite")) as log:
        assert log.verify().record_count == 1


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://u:secret@127.0.0.1/db", "scheme 'mysql' is not supported"),
        ("sqlite:///", "names no file"),
        ("sqlite://", "is not a SQLite file URL"),
        ("sqlite:///:memory:", "names no file"),
        ("sqlite://host/file.sqlite", "is not a SQLite file URL"),
    ],
)
def test_open_rejects_bad_url(url: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message) as caught:
        open_audit_log(url)
    assert "secret" not in str(caught.value)


def test_open_rejects_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="does not exist"):
        open_audit_log(f"sqlite:///{tmp_path}/missing/audit.sqlite")


def test_open_rejects_non_database_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.sqlite"
    path.write_text("not a database\n" * 100)

    with pytest.raises(AuditError, match="cannot open audit log"):
        open_audit_log(path)


def test_closed_log_rejects_use(backend: AuditBackend) -> None:
    log = backend.open()
    log.close()
    log.close()

    with pytest.raises(AuditError, match="is closed"):
        log.append(AuditEvent(action="job.start"))


def use_inherited_log(log: AuditLog, results: Any) -> None:
    try:
        log.append(AuditEvent(action="job.start"))
    except AuditError as exc:
        results.put(str(exc))
    else:
        results.put("appended")


def test_forked_process_cannot_use_parent_log(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    with open_audit_log(tmp_path / "audit.sqlite") as log:
        child = context.Process(target=use_inherited_log, args=(log, results))
        child.start()
        message = results.get(timeout=30)
        child.join(timeout=30)
        log.append(AuditEvent(action="job.end"))
        assert log.verify().record_count == 1

    assert "call open_audit_log in each process" in message


def test_library_adds_no_log_handlers(backend: AuditBackend) -> None:
    names = ["", "workbench", "workbench.audit", "workbench.audit.log"]
    before = {name: list(logging.getLogger(name).handlers) for name in names}

    with backend.open() as log:
        fill(log)
        log.verify()

    after = {name: list(logging.getLogger(name).handlers) for name in names}
    assert after == before
    assert logging.getLogger("workbench.audit").handlers == []


# Events


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"action": "Orthanc Query"}, "field action is 'Orthanc Query'"),
        ({"action": ""}, "field action is ''"),
        ({"action": "job.start", "outcome": "OK"}, "field outcome is 'OK'"),
        ({"action": "job.start", "resource": 7}, "resource must be a string, got int"),
        ({"action": "job.start", "purpose": "a\x00b"}, "NUL character"),
        ({"action": "job.start", "actor": ""}, "actor is empty"),
        ({"action": "job.start", "details": [1, 2]}, "must be a mapping, got list"),
        (
            {"action": "job.start", "details": {"ids": {1, 2}}},
            "cannot be stored as JSON",
        ),
        (
            {"action": "job.start", "details": {"loss": float("nan")}},
            "cannot be stored as JSON",
        ),
    ],
)
def test_event_rejects_invalid_fields(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(AuditError, match=re.escape(message)):
        AuditEvent(**fields)


def test_event_copies_details() -> None:
    details: dict[str, Any] = {"series": ["1.2.3"], "shape": (2, 3)}
    event = AuditEvent(action="dataset.write", details=details)
    details["series"].append("4.5.6")

    assert event.details == {"series": ["1.2.3"], "shape": [2, 3]}


def test_record_hash_is_stable() -> None:
    # Changing the hashing rule would make every existing log fail to verify.
    digest = record_hash(
        sequence=1,
        timestamp="2026-01-05T12:00:00.000000+00:00",
        actor="DOE^JANE",
        action="orthanc.query",
        resource="orthanc:/tools/find",
        purpose="chest CT cohort",
        outcome="ok",
        details={"matches": 12, "level": "Series"},
        previous_hash=GENESIS_HASH,
    )
    canonical = (
        '{"action":"orthanc.query","actor":"DOE^JANE",'
        '"details":{"level":"Series","matches":12},"outcome":"ok",'
        f'"previous_hash":"{GENESIS_HASH}","purpose":"chest CT cohort",'
        '"resource":"orthanc:/tools/find","sequence":1,'
        '"timestamp":"2026-01-05T12:00:00.000000+00:00"}'
    )
    assert digest == hashlib.sha256(canonical.encode()).hexdigest()
    assert digest == "11ff21fea30f4474e419d5eb2ab458b206463750fe64d68abb11fcec49dc0bd5"


# PostgreSQL URLs and passwords


def test_redact_url_hides_password() -> None:
    assert (
        redact_url("postgresql://alice:s3cr%40t@127.0.0.1:5432/audit")
        == "postgresql://alice:***@127.0.0.1:5432/audit"
    )
    assert (
        redact_url("postgresql://alice@127.0.0.1/audit?password=s3cret&sslmode=disable")
        == "postgresql://alice@127.0.0.1/audit?password=***&sslmode=disable"
    )
    assert redact_url("postgresql://127.0.0.1/audit") == "postgresql://127.0.0.1/audit"


@pytest.mark.postgres
def test_postgres_password_never_shown(
    fresh_postgres_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="workbench")
    wrong = "wrong-pw-4f9a"
    bad_url = re.sub(r":[0-9a-f]{32}@", f":{wrong}@", fresh_postgres_url)
    password = re.search(r":([0-9a-f]{32})@", fresh_postgres_url)
    assert password is not None

    with pytest.raises(AuditError, match="cannot connect") as caught:
        open_audit_log(bad_url)
    with open_audit_log(fresh_postgres_url) as log:
        log.append(AuditEvent(action="job.start"))
        shown = [repr(log), log.location]

    messages = [str(caught.value), str(caught.value.__cause__), *shown]
    messages += [record.getMessage() for record in caplog.records]
    assert "***@" in str(caught.value)
    for message in messages:
        assert wrong not in message
        assert password.group(1) not in message


@pytest.mark.postgres
def test_postgres_password_in_query_never_shown(postgres_server: Any) -> None:
    url = postgres_server.url("postgres")
    password = re.search(r":([0-9a-f]{32})@", url)
    assert password is not None
    # An invalid option makes libpq quote the connection string back.
    bad = url.replace(f":{password.group(1)}@", "@") + (
        f"?password={password.group(1)}&no_such_option=1"
    )

    with pytest.raises(AuditError) as caught:
        open_audit_log(bad)

    assert password.group(1) not in str(caught.value)
    assert password.group(1) not in str(caught.value.__cause__ or "")
