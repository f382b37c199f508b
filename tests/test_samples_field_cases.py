"""Tests that each field case writes files that behave as the case describes."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from workbench.dicomio import read_instance
from workbench.errors import ConfigurationError, DicomReadError
from workbench.samples import FIELD_CASES, FieldCase, build_field_case
from workbench.samples.identities import Kind

FieldCaseFactory = Callable[[str], FieldCase]
PATH_STEP = re.compile(r"(\w+)(?:\[(\d+)\])?")


def value_at(ds: Dataset, path: str) -> Any:
    """Return the value at an attribute path such as ``A[0].B[1].C``."""
    current: Any = ds
    for step in path.split("."):
        match = PATH_STEP.fullmatch(step)
        assert match, f"not an attribute path: {path}"
        keyword, index = match.groups()
        current = current[keyword].value
        if index is not None:
            current = current[int(index)]
    return current


def test_field_cases_listed() -> None:
    assert tuple(f"F{n}" for n in range(1, 12)) == FIELD_CASES


def test_unknown_case_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="unknown field case 'F12'"):
        build_field_case("F12", tmp_path)


@pytest.mark.parametrize("case_id", FIELD_CASES)
def test_case_describes_its_files(field_case: FieldCaseFactory, case_id: str) -> None:
    case = field_case(case_id)
    assert case.case_id == case_id
    assert case.title
    assert case.expected
    assert case.files
    assert all(path.is_file() for path in case.files)
    assert all(path.exists() for path in case.roles.values())
    assert case.identifying_values()


def test_f1_planted_values_at_their_paths(field_case: FieldCaseFactory) -> None:
    case = field_case("F1")
    ds = pydicom.dcmread(case.roles["nested"])
    checked = 0
    for planted in case.planted:
        if "." not in planted.path or planted.kind == Kind.WORD:
            continue
        value = value_at(ds, planted.path)
        values = [str(v) for v in value] if isinstance(value, list) else [str(value)]
        assert planted.value in values, planted
        checked += 1
    assert checked >= 30
    assert case.facts["max_depth"] == 4
    deepest = [p for p in case.facts["nested_paths"] if p.count("[") == 4]
    assert any(p.endswith("PersonName") for p in deepest)
    assert (
        "RequestAttributesSequence[0].RequestingPhysician" in case.facts["nested_paths"]
    )


def test_f2_references_resolve(field_case: FieldCaseFactory) -> None:
    case = field_case("F2")
    datasets = {path: pydicom.dcmread(path) for path in case.files}
    for reference in case.facts["references"]:
        ds = datasets[reference["file"]]
        assert value_at(ds, reference["path"]) == reference["value"]
        if reference["target"] == "SOPInstanceUID":
            target = datasets[reference["target_file"]]
            assert target.SOPInstanceUID == reference["value"]
            assert reference["target_file"] != reference["file"]
        else:
            holders = {str(d[reference["target"]].value) for d in datasets.values()}
            assert reference["value"] in holders
    kinds = {reference["target"] for reference in case.facts["references"]}
    assert kinds == {"SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"}


def test_f3_private_blocks(field_case: FieldCaseFactory) -> None:
    case = field_case("F3")
    first, second = (pydicom.dcmread(path) for path in case.files)
    assert first.private_block(0x0019, "SIEMENS MR HEADER")[0x0C].value == 1000
    assert second.private_block(0x0019, "SIEMENS MR HEADER")[0x0C].value == 1000
    for path, (tag, value) in case.facts["kept"].items():
        ds = pydicom.dcmread(path)
        assert str(ds[Tag(int(tag[1:5], 16), int(tag[6:10], 16))].value) == value
    assert second[0x00190010].value == "WBSYN DECOY"
    assert second[0x0019100C].VR == "PN"
    assert second[0x0019100C].value == case.planted[0].value
    for path, tags in case.facts["removed"].items():
        ds = pydicom.dcmread(path)
        for tag in tags:
            assert Tag(int(tag[1:5], 16), int(tag[6:10], 16)) in ds
    # The orphan element has no private creator in its block.
    assert 0x00150010 not in first
    assert 0x00151010 in first


def test_f4_names_decode(field_case: FieldCaseFactory) -> None:
    case = field_case("F4")
    pydicom_warnings = {
        "misspelled-utf8": "Incorrect value for Specific Character Set 'ISO-IR 192'",
        "misspelled-latin1": "Unknown encoding 'ISO_IR100'",
    }
    for path, names in case.facts["decoded"].items():
        with pytest.warns(UserWarning) as caught:
            ds = pydicom.dcmread(path)
            assert str(ds.PatientName) == names["PatientName"]
            assert str(ds.ReferringPhysicianName) == names["ReferringPhysicianName"]
            warnings.warn("no warning from pydicom", UserWarning, stacklevel=1)
        messages = [str(w.message) for w in caught]
        if path.stem in pydicom_warnings:
            assert any(pydicom_warnings[path.stem] in m for m in messages), messages
        else:
            assert messages == ["no warning from pydicom"]
        written = case.facts["character_sets"][path]
        assert written.encode() in path.read_bytes()
    japanese = pydicom.dcmread(case.roles["iso2022-japanese"])
    assert japanese.PatientName.ideographic == "山田^太郎"
    assert japanese.ReferringPhysicianName.phonetic == "すずき^はなこ"
    assert b"\x1b$B" in case.roles["iso2022-japanese"].read_bytes()
    assert "ISO-IR 192" in case.facts["character_sets"].values()
    assert {"山田", "鈴木", "ÖZTÜRK", "SØRENSEN"} <= case.identifying_values()


def test_f5_other_identities_present(field_case: FieldCaseFactory) -> None:
    case = field_case("F5")
    ds = pydicom.dcmread(case.files[0])
    for keyword in case.facts["removed"]:
        assert keyword in ds
        assert not ds[keyword].is_empty
    assert ds.OtherPatientIDsSequence[0].IssuerOfPatientID
    values = case.identifying_values()
    assert str(ds.PatientMotherBirthName) in values
    assert {str(name) for name in ds.OtherPatientNames} <= values


def test_f6_batches_share_the_study(field_case: FieldCaseFactory) -> None:
    case = field_case("F6")
    first, second = case.facts["batches"]
    assert len(first) == 3
    assert len(second) == 5
    names = set()
    for batch in (first, second):
        for path in batch:
            ds = pydicom.dcmread(path)
            assert ds.StudyInstanceUID == case.facts["study_instance_uid"]
            assert ds.FrameOfReferenceUID == case.facts["frame_of_reference_uid"]
            names.add(str(ds.PatientName))
    assert names == {"TWOFOLD^MARTHA", "TWOFOLD^MARTHA^"}
    assert b"TWOFOLD^MARTHA^" in second[0].read_bytes()
    assert all(path.parent == case.roles["batch-1"] for path in first)
    ct_series = {pydicom.dcmread(p).SeriesInstanceUID for p in first + second[:3]}
    assert ct_series == {case.facts["ct_series_instance_uid"]}


def test_f7_reader_outcomes(field_case: FieldCaseFactory) -> None:
    case = field_case("F7")
    for role, expected in case.facts["reasons"].items():
        data = case.roles[role].read_bytes()
        if expected == "ok":
            ds = read_instance(data)
            assert (
                ds.file_meta.TransferSyntaxUID == case.facts["transfer_syntaxes"][role]
            )
            assert data[128:132] != b"DICM"
            assert ds.PatientName == "HEADLESS^CORNELIUS"
        else:
            with pytest.raises(DicomReadError) as raised:
                read_instance(data)
            assert raised.value.reason == expected, role


def test_f8_raw_values_survive_reading(field_case: FieldCaseFactory) -> None:
    case = field_case("F8")
    data = case.files[0].read_bytes()
    ds = read_instance(data)
    for violation in case.facts["violations"]:
        raw = violation["raw"]
        assert raw in data
        element = ds.get_item(Tag(violation["keyword"]))
        assert violation["vr"] == element.VR
        if raw:
            assert element.value == raw
        else:
            assert ds[violation["keyword"]].value is None
        if isinstance(violation["expected"], float):
            assert float(raw) == pytest.approx(violation["expected"])
    lengths = {v["keyword"]: len(v["raw"]) for v in case.facts["violations"]}
    assert lengths["ManufacturerModelName"] == 200
    assert lengths["SeriesNumber"] == 0


def test_f9_frames_cross_byte_boundaries(field_case: FieldCaseFactory) -> None:
    case = field_case("F9")
    ds = pydicom.dcmread(case.files[0])
    expected = np.array(case.facts["frames"], dtype=np.uint8)
    assert expected.shape == (5, 3, 3)
    assert len(ds.PixelData) == 6  # 45 bits, padded to an even number of bytes
    decoded = ds.pixel_array
    assert decoded.shape == expected.shape
    assert np.array_equal(decoded, expected)
    # Unpacking each frame from a byte boundary gets the second frame wrong.
    bits = np.unpackbits(np.frombuffer(ds.PixelData, np.uint8), bitorder="little")
    assert not np.array_equal(bits[8:17].reshape(3, 3), expected[1])


def test_f10_transfer_syntaxes_decode(field_case: FieldCaseFactory) -> None:
    case = field_case("F10")
    files = case.facts["files"]
    assert case.facts["skipped"] == {}
    decoded = {}
    for role, fact in files.items():
        ds = pydicom.dcmread(case.roles[role])
        assert ds.file_meta.TransferSyntaxUID == fact["transfer_syntax"], role
        if fact["expect"] == "decode":
            decoded[role] = ds.pixel_array
        else:
            with pytest.raises(RuntimeError):
                _ = ds.pixel_array
    for role, fact in files.items():
        if fact["same_pixels_as"] is not None:
            assert np.array_equal(decoded[role], decoded[fact["same_pixels_as"]]), role
    assert np.array_equal(decoded["written-explicit-little"], case.facts["pixels"])
    syntaxes = {str(fact["transfer_syntax"]) for fact in files.values()}
    assert len(syntaxes) >= 12


def test_f11_gathers_every_case(field_case: FieldCaseFactory) -> None:
    case = field_case("F11")
    parts = case.facts["parts"]
    assert tuple(parts) == FIELD_CASES[:-1]
    for part in parts.values():
        assert set(part.files) <= set(case.files)
    single, several = (pydicom.dcmread(p) for p in case.facts["vm_variants"])
    for keyword in case.facts["list_attributes"]:
        assert single[keyword].VM == 1, keyword
        assert several[keyword].VM > 1, keyword
