"""Tests of ``workbench audit verify`` and ``workbench audit show``.

The handlers are reached through ``register`` on a parser built here, the way
``workbench.cli`` builds its own.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from workbench.audit import AuditEvent, AuditRecord, open_audit_log
from workbench.audit.commands import register
from workbench.errors import AuditChainError, ConfigurationError


def run_command(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="workbench")
    subparsers = parser.add_subparsers(dest="command", required=True)
    register(subparsers)
    args = parser.parse_args(argv)
    return int(args.handler(args))


@pytest.fixture
def audit_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.sqlite"


@pytest.fixture
def records(audit_path: Path) -> list[AuditRecord]:
    events = [
        AuditEvent(
            action="orthanc.query",
            resource="orthanc:/tools/find",
            purpose="chest CT cohort",
            details={"level": "Series", "matches": 12},
            actor="DOE^JANE",
        ),
        AuditEvent(
            action="instance.fetch",
            resource="orthanc:/instances/0a1b2c3d",
            purpose="chest CT cohort",
            actor="DOE^JANE",
        ),
        AuditEvent(
            action="dataset.write",
            resource="datasets/chest-ct/v1",
            outcome="quarantined",
            actor="DOE^JOHN",
        ),
    ]
    with open_audit_log(audit_path) as log:
        return log.append_many(events)


def url_of(path: Path) -> str:
    return f"sqlite:///{path}"


def test_verify_prints_count_and_head(
    audit_path: Path, records: list[AuditRecord], capsys: pytest.CaptureFixture[str]
) -> None:
    status = run_command(["audit", "verify", "--url", url_of(audit_path)])

    output = capsys.readouterr().out
    assert status == 0
    assert f"audit log: {audit_path}\n" in output
    assert "records verified: 3\n" in output
    assert "head sequence: 3\n" in output
    assert f"head hash: {records[-1].hash}\n" in output


def test_verify_with_expected_head(
    audit_path: Path, records: list[AuditRecord], capsys: pytest.CaptureFixture[str]
) -> None:
    url = url_of(audit_path)
    assert (
        run_command(
            ["audit", "verify", "--url", url, "--expected-head", records[1].hash]
        )
        == 0
    )

    with pytest.raises(AuditChainError, match="expected head hash") as caught:
        run_command(["audit", "verify", "--url", url, "--expected-head", "e" * 64])
    assert caught.value.sequence == 4
    with pytest.raises(ConfigurationError, match="is not a SHA-256 hash"):
        run_command(["audit", "verify", "--url", url, "--expected-head", "xyz"])


def test_verify_raises_on_tampering(
    audit_path: Path, records: list[AuditRecord]
) -> None:
    connection = sqlite3.connect(audit_path)
    connection.execute("DROP TRIGGER audit_record_no_update")
    connection.execute("UPDATE audit_record SET actor = 'DOE^JOHN' WHERE sequence = 2")
    connection.commit()
    connection.close()

    with pytest.raises(AuditChainError, match="audit record 2 was altered") as caught:
        run_command(["audit", "verify", "--url", url_of(audit_path)])
    assert caught.value.sequence == 2


def test_verify_default_url_from_environment(
    audit_path: Path,
    records: list[AuditRecord],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("WORKBENCH_AUDIT_URL", url_of(audit_path))

    assert run_command(["audit", "verify"]) == 0
    assert "records verified: 3\n" in capsys.readouterr().out


def test_show_table(
    audit_path: Path, records: list[AuditRecord], capsys: pytest.CaptureFixture[str]
) -> None:
    status = run_command(["audit", "show", "--url", url_of(audit_path)])

    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert len(lines) == 4
    assert re.split(r"\s{2,}", lines[0]) == [
        "SEQ",
        "TIME (UTC)",
        "ACTOR",
        "ACTION",
        "OUTCOME",
        "RESOURCE",
        "PURPOSE / DETAILS",
    ]
    first = re.split(r"\s{2,}", lines[1])
    assert first[0] == "1"
    assert first[1] == records[0].timestamp[:19].replace("T", " ")
    assert first[2:6] == ["DOE^JANE", "orthanc.query", "ok", "orthanc:/tools/find"]
    assert first[6] == 'chest CT cohort {"level":"Series","matches":12}'
    assert re.split(r"\s{2,}", lines[3])[2:] == [
        "DOE^JOHN",
        "dataset.write",
        "quarantined",
        "datasets/chest-ct/v1",
    ]
    # Columns line up: every row's ACTION starts where the header's does.
    action_column = lines[0].index("ACTION")
    assert lines[2][action_column:].startswith("instance.fetch")


def test_show_json_lines(
    audit_path: Path, records: list[AuditRecord], capsys: pytest.CaptureFixture[str]
) -> None:
    run_command(["audit", "show", "--url", url_of(audit_path), "--json"])

    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == [r.to_dict() for r in records]


@pytest.mark.parametrize(
    ("options", "sequences"),
    [
        (["--action", "instance.fetch"], [2]),
        (["--actor", "DOE^JANE"], [1, 2]),
        (["--outcome", "quarantined"], [3]),
        (["--resource", "orthanc:/"], [1, 2]),
        (["--actor", "DOE^JANE", "--limit", "1"], [2]),
        (["--since", "2000-01-01", "--until", "2000-01-02"], []),
        (["--since", "2000-01-01T00:00:00Z"], [1, 2, 3]),
    ],
)
def test_show_filters(
    audit_path: Path,
    records: list[AuditRecord],
    capsys: pytest.CaptureFixture[str],
    options: list[str],
    sequences: list[int],
) -> None:
    run_command(["audit", "show", "--url", url_of(audit_path), "--json", *options])

    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["sequence"] for line in lines] == sequences


def test_show_no_match_message(
    audit_path: Path, records: list[AuditRecord], capsys: pytest.CaptureFixture[str]
) -> None:
    run_command(["audit", "show", "--url", url_of(audit_path), "--action", "job.end"])

    assert capsys.readouterr().out == "no audit records match\n"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--limit", "0"], "'0' is not a positive integer"),
        (["--limit", "ten"], "'ten' is not a positive integer"),
        (["--since", "last week"], "'last week' is not ISO 8601"),
    ],
)
def test_show_rejects_bad_options(
    audit_path: Path,
    capsys: pytest.CaptureFixture[str],
    options: list[str],
    message: str,
) -> None:
    with pytest.raises(SystemExit) as caught:
        run_command(["audit", "show", "--url", url_of(audit_path), *options])

    assert caught.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.postgres
def test_verify_postgres_hides_password(
    fresh_postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    password = re.search(r":([0-9a-f]{32})@", fresh_postgres_url)
    assert password is not None
    with open_audit_log(fresh_postgres_url) as log:
        log.append(AuditEvent(action="job.start"))

    assert run_command(["audit", "verify", "--url", fresh_postgres_url]) == 0

    output = capsys.readouterr().out
    assert "records verified: 1\n" in output
    assert ":***@127.0.0.1" in output
    assert password.group(1) not in output
