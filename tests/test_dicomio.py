"""Strict reading of DICOM bytes: headerless datasets, truncation, non-DICOM files."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from workbench.dicomio import read_instance, to_upload_bytes
from workbench.errors import DicomReadError

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def read(name: str):
    return read_instance((TEST_FILES / name).read_bytes())


@pytest.mark.parametrize(
    ("name", "syntax"),
    [
        ("ExplVR_LitEndNoMeta.dcm", "1.2.840.10008.1.2.1"),
        ("ExplVR_BigEndNoMeta.dcm", "1.2.840.10008.1.2.2"),
        ("no_meta_group_length.dcm", "1.2.840.10008.1.2"),
    ],
)
def test_headerless_dataset_gets_inferred_syntax(name, syntax):
    ds = read(name)
    assert ds.file_meta.TransferSyntaxUID == syntax


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("MR_truncated.dcm", "truncated"),
        ("rtplan_truncated.dcm", "truncated"),
        ("no_meta.dcm", "not-dicom"),
        ("crayons.icc", "not-dicom"),
        ("README.txt", "not-dicom"),
    ],
)
def test_broken_input_rejected_with_reason(name, reason):
    with pytest.raises(DicomReadError) as error:
        read(name)
    assert error.value.reason == reason


def test_subsampled_colour_is_not_truncated():
    ds = read("SC_ybr_full_422_uncompressed.dcm")
    assert ds.PhotometricInterpretation == "YBR_FULL_422"


def test_text_never_becomes_dicom(tmp_path):
    text = tmp_path / "letter.dcm"
    text.write_text("Dear colleague, please see the attached scan.\n")
    with pytest.raises(DicomReadError) as error:
        to_upload_bytes(text)
    assert error.value.reason == "not-dicom"


def test_headerless_file_uploaded_as_part10(tmp_path):
    data = to_upload_bytes(TEST_FILES / "ExplVR_LitEndNoMeta.dcm")
    assert data[128:132] == b"DICM"
    again = read_instance(data)
    assert again.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"


def test_complete_file_uploaded_unchanged():
    path = TEST_FILES / "CT_small.dcm"
    assert to_upload_bytes(path) == path.read_bytes()
