"""Ingest under stress: killed runs, malformed input, distributed Dask, exit codes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pydicom
import pytest
from ingest_helpers import (
    ingest_folder,
    instances_table,
    orthanc_credentials,
    quarantine_entries,
)
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from workbench.audit import open_audit_log
from workbench.errors import ConfigurationError
from workbench.ingest import IngestConfig, run_ingest
from workbench.ingest.pipeline import _check_scheduler_address
from workbench.orthanc.upload import upload_paths
from workbench.samples import generate_studies

pytestmark = pytest.mark.slow


def ct_file(path: Path, **overrides: object) -> Path:
    """Write a small valid CT instance with invented identities."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = overrides.pop("StudyInstanceUID", generate_uid())
    ds.SeriesInstanceUID = overrides.pop("SeriesInstanceUID", generate_uid())
    ds.PatientName = "DOE^JANE"
    ds.PatientID = "MRN-0001"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.PixelData = np.arange(64, dtype="<i2").tobytes()
    for keyword, value in overrides.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(path, enforce_file_format=True)
    return path


def malformed_folder(folder: Path) -> Path:
    """A folder with one good file and one of each kind of broken input."""
    folder.mkdir(parents=True)
    ct_file(folder / "good.dcm")
    truncated = ct_file(folder / "truncated.dcm")
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) - 40])
    (folder / "notes.dcm").write_text("Referral letter for an invented patient.\n")
    ct_file(folder / "no-pixels.dcm", PixelData=None)
    unsupported = ct_file(folder / "unsupported.dcm")
    ds = pydicom.dcmread(unsupported)
    # MPEG-2 video: no decoder here, so the pixels cannot be decoded.
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
    ds.save_as(unsupported, enforce_file_format=True)
    return folder


def run_cli(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "workbench.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=600,
        check=False,
    )


def test_malformed_input_quarantined_with_reasons(tmp_path):
    folder = malformed_folder(tmp_path / "input")
    out = tmp_path / "out"
    result = run_cli(
        "ingest", "--folder", str(folder), "--out", str(out), "--no-progress"
    )
    assert result.returncode == 3, result.stderr
    assert "quarantined:  4" in result.stdout
    reasons = sorted(entry["reason_code"] for entry in quarantine_entries(out))
    assert reasons == ["missing-pixels", "not-dicom", "pixel-decode", "truncated"]
    assert instances_table(out).num_rows == 1
    # Reports carry hashed file ids, never paths or patient data.
    report = (out / "quarantine.csv").read_text()
    assert "notes.dcm" not in report
    assert "DOE" not in report


def test_missing_pixels_and_unsupported_syntax_from_orthanc(orthanc, tmp_path):
    folder = malformed_folder(tmp_path / "input")
    with orthanc.client() as client:
        report = upload_paths(client, [folder], progress=False)
    statuses = sorted(outcome.status for outcome in report.outcomes)
    assert statuses.count("uploaded") == 3
    out = tmp_path / "out"
    with orthanc_credentials(orthanc):
        summary = run_ingest(
            IngestConfig(out=out, orthanc=orthanc.url, purpose="test", progress=False)
        )
    assert summary.written == 1
    reasons = sorted(entry["reason_code"] for entry in quarantine_entries(out))
    assert reasons == ["missing-pixels", "pixel-decode"]
    ids = {entry["source_id"] for entry in quarantine_entries(out)}
    assert all(len(i) == 44 and i.count("-") == 4 for i in ids)  # Orthanc ids


def test_clean_run_exits_zero(tmp_path):
    folder = tmp_path / "input"
    folder.mkdir()
    ct_file(folder / "a.dcm")
    result = run_cli(
        "ingest", "--folder", str(folder), "--out", str(tmp_path / "out"),
        "--no-progress", "--purpose", "exit status test",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "instances:    1" in result.stdout


def test_local_cluster_leaves_the_environment_as_it_was(tmp_path, monkeypatch):
    """Dask's nanny sets OMP_NUM_THREADS=1 in its process; later jobs must not."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    folder = tmp_path / "input"
    folder.mkdir()
    ct_file(folder / "a.dcm")
    before = dict(os.environ)

    summary = ingest_folder(folder, tmp_path / "out", workers=1)

    assert summary.written == 1
    assert "OMP_NUM_THREADS" not in os.environ
    assert os.environ["MKL_NUM_THREADS"] == "3"
    assert dict(os.environ) == before


def test_killed_run_resumes_exactly_once(orthanc, tmp_path):
    corpus = generate_studies(tmp_path / "corpus", patients=4, ct_slices=30)
    with orthanc.client() as client:
        assert upload_paths(client, [corpus.root], progress=False).ok
    total = len(corpus.files)
    out = tmp_path / "out"
    env = {"ORTHANC_USERNAME": orthanc.username, "ORTHANC_PASSWORD": orthanc.password}
    command = [
        sys.executable, "-m", "workbench.cli", "ingest", "--orthanc", orthanc.url,
        "--out", str(out), "--workers", "1", "--fetch-threads", "1",
        "--no-progress", "--purpose", "kill test",
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        env={**os.environ, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    group = [process.pid]
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            parts = list((out / "instances").glob("*.parquet"))
            if parts or process.poll() is not None:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run finished before it could be killed"
        assert 1 <= len(parts) < len(corpus.series)
        group = [p.pid for p in psutil.Process(process.pid).children(recursive=True)]
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
    # Every process of the killed run is gone.
    time.sleep(0.5)
    assert not [pid for pid in group if psutil.pid_exists(pid)
                and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]  # fmt: skip

    result = run_cli(*command[3:], env=env)
    assert result.returncode == 0, result.stderr
    table = instances_table(out)
    uids = table.column("SOPInstanceUID").to_pylist()
    assert len(uids) == total
    assert len(set(uids)) == total
    leftovers = [p for p in out.rglob(".*") if p.name != ".lock"]
    assert leftovers == []
    with open_audit_log() as audit:
        audit.verify()


def test_distributed_scheduler(tmp_path):
    from distributed import LocalCluster

    folder = tmp_path / "input"
    folder.mkdir()
    series = generate_uid()
    for index in range(3):
        ct_file(folder / f"{index}.dcm", SeriesInstanceUID=series, InstanceNumber=index)
    with LocalCluster(
        n_workers=1,
        threads_per_worker=2,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
    ) as cluster:
        summary = ingest_folder(
            folder, tmp_path / "out", scheduler=cluster.scheduler_address
        )
    assert summary.written == 3


@pytest.mark.parametrize(
    ("address", "insecure", "refused"),
    [
        ("tcp://10.1.2.3:8786", False, True),
        ("10.1.2.3:8786", False, True),
        ("tcp://10.1.2.3:8786", True, False),
        ("tls://dask.example.org:8786", False, False),
        ("tcp://127.0.0.1:8786", False, False),
    ],
)
def test_remote_plain_tcp_scheduler_refused(address, insecure, refused):
    if refused:
        with pytest.raises(ConfigurationError, match="tls://"):
            _check_scheduler_address(address, insecure=insecure)
    else:
        _check_scheduler_address(address, insecure=insecure)


def test_audit_to_postgresql(tmp_path, fresh_postgres_url):
    folder = tmp_path / "input"
    folder.mkdir()
    ct_file(folder / "a.dcm")
    with open_audit_log(fresh_postgres_url) as audit:
        summary = run_ingest(
            IngestConfig(
                out=tmp_path / "out", folder=folder, purpose="pg", progress=False
            ),
            audit=audit,
        )
        assert summary.written == 1
        report = audit.verify()
        actions = [record.action for record in audit.records()]
    assert report.record_count == len(actions)
    assert actions[0] == "ingest.start"
    assert "instance.fetch" in actions
    assert actions[-1] == "ingest.end"


def test_other_key_refused(tmp_path, monkeypatch):
    from workbench.home import init_home

    folder = tmp_path / "input"
    folder.mkdir()
    ct_file(folder / "a.dcm")
    out = tmp_path / "out"
    ingest_folder(folder, out)
    monkeypatch.setenv("WORKBENCH_HOME", str(init_home(tmp_path / "other-home")))
    with pytest.raises(ConfigurationError, match="another de-identification key"):
        ingest_folder(folder, out)
    assert instances_table(out).num_rows == 1


def test_bad_input_leaves_no_output(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigurationError, match="not a folder"):
        ingest_folder(tmp_path / "missing", out)
    assert not out.exists()
    with pytest.raises(ConfigurationError, match="cannot read recipe"):
        ingest_folder(tmp_path, out, recipes=(tmp_path / "none.dicom",))
    assert not out.exists()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('clean_descriptors = "false"', "true or false"),
        ("workers = 2.5", "whole number"),
    ],
)
def test_definition_types_checked(tmp_path, line, message):
    from workbench.ingest import load_dataset_definition

    section = "[deidentification]" if "clean" in line else "[run]"
    definition = tmp_path / "d.toml"
    definition.write_text(
        f'[source]\nfolder = "in"\n[output]\npath = "out"\n{section}\n{line}\n'
    )
    with pytest.raises(ConfigurationError, match=message):
        load_dataset_definition(definition)
    with pytest.raises(ConfigurationError, match="is a folder"):
        load_dataset_definition(tmp_path)
