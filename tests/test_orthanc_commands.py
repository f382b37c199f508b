"""Tests of the ``workbench orthanc`` commands, run through their own parser."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from fixtures.orthanc import free_port, pydicom_test_file

from workbench.errors import InsecureConnectionError
from workbench.orthanc import commands
from workbench.orthanc.server import OrthancServer, stop_orthanc


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="workbench")
    subparsers = parser.add_subparsers(dest="command", required=True)
    commands.register(subparsers)
    args = parser.parse_args(argv)
    return int(args.handler(args))


@pytest.fixture
def own_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A workbench home whose Orthanc is stopped after the test."""
    workbench_home = tmp_path / "workbench-home"
    workbench_home.mkdir()
    monkeypatch.setenv("WORKBENCH_HOME", str(workbench_home))
    try:
        yield workbench_home / "orthanc"
    finally:
        stop_orthanc(workbench_home / "orthanc")


@pytest.fixture
def no_orthanc_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ORTHANC_USERNAME", raising=False)
    monkeypatch.delenv("ORTHANC_PASSWORD", raising=False)


@pytest.mark.orthanc
def test_start_status_stop(own_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    port = free_port()

    started = run(["orthanc", "start", "--port", str(port)])
    start_output = capsys.readouterr().out
    running = run(["orthanc", "status"])
    status_output = capsys.readouterr().out
    stopped = run(["orthanc", "stop"])
    stop_output = capsys.readouterr().out
    not_running = run(["orthanc", "status"])
    final_output = capsys.readouterr().out

    password = json.loads((own_home / "credentials.json").read_text())["password"]
    assert started == 0
    assert f"http://127.0.0.1:{port}" in start_output
    assert str(own_home / "credentials.json") in start_output
    assert password not in start_output
    assert running == 0
    assert "running: yes" in status_output
    assert "0 instances" in status_output
    assert stopped == 0
    assert "stopped Orthanc" in stop_output
    assert not_running == 1
    assert "running: no" in final_output


@pytest.mark.orthanc
def test_start_with_explicit_home(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "elsewhere"
    try:
        exit_status = run(
            ["orthanc", "start", "--home", str(home), "--port", str(free_port())]
        )
    finally:
        stop_orthanc(home)

    assert exit_status == 0
    assert (home / "orthanc.json").is_file()


def test_stop_when_not_running(
    own_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run(["orthanc", "stop"]) == 0
    assert "was not running" in capsys.readouterr().out


def test_load_files(
    orthanc: OrthancServer,
    no_orthanc_environment: None,
    capsys: pytest.CaptureFixture[str],
) -> None:
    exit_status = run(
        [
            "orthanc",
            "load",
            str(pydicom_test_file("CT_small.dcm")),
            str(pydicom_test_file("MR_small.dcm")),
            "--home",
            str(orthanc.home),
            "--no-progress",
        ]
    )

    output = capsys.readouterr().out
    assert exit_status == 0
    assert "2 files: 2 uploaded" in output
    assert orthanc.client().statistics()["CountInstances"] == 2


def test_load_with_problems_exits_3(
    orthanc: OrthancServer,
    no_orthanc_environment: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    shutil.copy(pydicom_test_file("CT_small.dcm"), tmp_path / "ct.dcm")
    shutil.copy(pydicom_test_file("MR_truncated.dcm"), tmp_path / "truncated.dcm")
    (tmp_path / "notes.txt").write_text("not DICOM")

    exit_status = run(
        [
            "orthanc",
            "load",
            str(tmp_path),
            "--url",
            orthanc.url,
            "--home",
            str(orthanc.home),
            "--no-progress",
        ]
    )

    output = capsys.readouterr().out
    assert exit_status == 3
    assert "3 files: 1 uploaded" in output
    assert f"unreadable: {tmp_path / 'truncated.dcm'}: truncated" in output
    assert f"not-dicom: {tmp_path / 'notes.txt'}" in output


def test_load_samples(
    orthanc: OrthancServer,
    no_orthanc_environment: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Stands in for workbench.samples, which another module provides.
    def sample_files(destination: Path) -> list[Path]:
        names = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm"]
        return [Path(shutil.copy(pydicom_test_file(n), destination)) for n in names]

    fake = types.ModuleType("workbench.samples")
    fake.sample_files = sample_files  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "workbench.samples", fake)

    exit_status = run(
        ["orthanc", "load", "--samples", "--home", str(orthanc.home), "--no-progress"]
    )

    assert exit_status == 0
    assert "3 files: 3 uploaded" in capsys.readouterr().out
    assert orthanc.client().statistics()["CountInstances"] == 3


def test_load_without_paths_is_usage_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert run(["orthanc", "load"]) == 2
    assert "PATH" in capsys.readouterr().err


def test_load_rejects_plain_http_to_remote(tmp_path: Path) -> None:
    with pytest.raises(InsecureConnectionError):
        run(["orthanc", "load", str(tmp_path), "--url", "http://example.org:8042"])
