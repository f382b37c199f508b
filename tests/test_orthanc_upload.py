"""Tests of workbench.orthanc.upload against the real Orthanc."""

from __future__ import annotations

import io
import logging
import shutil
from pathlib import Path

import pytest
from fixtures.orthanc import free_port, pydicom_test_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from workbench.errors import ConfigurationError, OrthancConnectionError
from workbench.orthanc.client import OrthancClient
from workbench.orthanc.server import OrthancServer
from workbench.orthanc.upload import (
    UploadOutcome,
    UploadReport,
    UploadStatus,
    find_files,
    upload_paths,
)


def write_without_study_uid(path: Path) -> Path:
    """Write a Part 10 file that pydicom reads but Orthanc cannot index."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = generate_uid()
    dataset.PatientID = "DOE-0001"
    dataset.PatientName = "DOE^JANE"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    path.write_bytes(buffer.getvalue())
    return path


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """A folder with two good files, a text file, a truncated file, and a file
    Orthanc rejects, some in a nested folder."""
    folder = tmp_path / "incoming"
    nested = folder / "nested" / "deeper"
    nested.mkdir(parents=True)
    shutil.copy(pydicom_test_file("CT_small.dcm"), folder / "ct.dcm")
    shutil.copy(pydicom_test_file("MR_small.dcm"), nested / "mr.dcm")
    shutil.copy(pydicom_test_file("MR_truncated.dcm"), nested / "truncated.dcm")
    (folder / "notes.dcm").write_text("DOE^JANE: follow-up in March\n")
    write_without_study_uid(folder / "no-study.dcm")
    return folder


def outcome_by_name(report: UploadReport, name: str) -> UploadOutcome:
    [outcome] = [o for o in report.outcomes if o.path.name == name]
    return outcome


def test_upload_folder_reports_each_file(
    orthanc: OrthancServer, mixed_folder: Path
) -> None:
    client = orthanc.client()

    report = upload_paths(client, [mixed_folder], workers=3, progress=False)

    assert len(report.outcomes) == 5
    assert report.uploaded == 2
    assert report.already_stored == 0
    assert report.rejected == 1
    assert report.not_dicom == 1
    assert report.unreadable == 1
    assert report.ok is False
    assert client.statistics()["CountInstances"] == 2

    ct = outcome_by_name(report, "ct.dcm")
    notes = outcome_by_name(report, "notes.dcm")
    truncated = outcome_by_name(report, "truncated.dcm")
    rejected = outcome_by_name(report, "no-study.dcm")
    assert ct.status is UploadStatus.UPLOADED
    assert ct.instance_id is not None
    stored = client.instance_file(ct.instance_id)
    assert stored == (mixed_folder / "ct.dcm").read_bytes()
    assert notes.status is UploadStatus.NOT_DICOM
    assert notes.reason.startswith("not-dicom")
    assert truncated.status is UploadStatus.UNREADABLE
    assert truncated.reason.startswith("truncated")
    assert rejected.status is UploadStatus.REJECTED
    assert "HTTP 404" in rejected.reason
    assert rejected.instance_id is None
    assert {o.path.name for o in report.problems()} == {
        "notes.dcm",
        "truncated.dcm",
        "no-study.dcm",
    }


def test_second_upload_is_already_stored(
    orthanc: OrthancServer, mixed_folder: Path
) -> None:
    client = orthanc.client()
    first = upload_paths(client, [mixed_folder], progress=False)

    second = upload_paths(client, [mixed_folder / "ct.dcm"], progress=False)

    assert second.summary().startswith("1 file: 0 uploaded, 1 already stored")
    assert second.already_stored == 1
    assert second.uploaded == 0
    assert second.ok is True
    assert (
        second.outcomes[0].instance_id == outcome_by_name(first, "ct.dcm").instance_id
    )


def test_non_dicom_and_truncated_never_sent(
    orthanc: OrthancServer, tmp_path: Path
) -> None:
    text = tmp_path / "report.dcm"
    text.write_text("not DICOM at all")
    truncated = shutil.copy(pydicom_test_file("MR_truncated.dcm"), tmp_path / "t.dcm")

    report = upload_paths(orthanc.client(), [text, Path(truncated)], progress=False)

    assert [o.status for o in report.outcomes] == [
        UploadStatus.NOT_DICOM,
        UploadStatus.UNREADABLE,
    ]
    assert orthanc.client().statistics()["CountInstances"] == 0


def test_file_meta_added_to_headerless_file(
    orthanc: OrthancServer, tmp_path: Path
) -> None:
    headerless = shutil.copy(
        pydicom_test_file("ExplVR_LitEndNoMeta.dcm"), tmp_path / "x.dcm"
    )

    report = upload_paths(orthanc.client(), [Path(headerless)], progress=False)

    assert report.uploaded == 1


def test_summary_logged_without_paths_or_names(
    orthanc: OrthancServer,
    mixed_folder: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG, logger="workbench"):
        report = upload_paths(orthanc.client(), [mixed_folder], progress=False)

    summaries = [r for r in caplog.records if r.getMessage().startswith("upload to")]
    assert len(summaries) == 1
    assert summaries[0].levelno == logging.INFO
    assert "2 uploaded" in summaries[0].getMessage()
    assert str(mixed_folder) not in caplog.text
    assert "DOE" not in caplog.text
    assert report.summary().startswith("5 files: 2 uploaded, 0 already stored")


def test_progress_bar_on_stderr(
    orthanc: OrthancServer, capsys: pytest.CaptureFixture[str]
) -> None:
    upload_paths(orthanc.client(), [pydicom_test_file("CT_small.dcm")], progress=True)

    captured = capsys.readouterr()
    assert "upload" in captured.err
    assert "1/1" in captured.err
    assert captured.out == ""


def test_find_files_walks_and_deduplicates(mixed_folder: Path) -> None:
    files = find_files([mixed_folder, mixed_folder / "ct.dcm"])

    assert len(files) == 5
    assert files[0] == mixed_folder / "ct.dcm"


def test_missing_path_rejected(tmp_path: Path) -> None:
    client = OrthancClient("http://127.0.0.1:8042", "user", "secret")

    with pytest.raises(ConfigurationError, match="does not exist"):
        upload_paths(client, [tmp_path / "missing"], progress=False)


def test_unreachable_server_stops_upload(mixed_folder: Path) -> None:
    client = OrthancClient(
        f"http://127.0.0.1:{free_port()}", "user", "secret", retries=0
    )

    with pytest.raises(OrthancConnectionError):
        upload_paths(client, [mixed_folder], workers=2, progress=False)
