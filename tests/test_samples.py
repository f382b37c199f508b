"""Tests of the synthetic studies, the bundled files and ``workbench samples``."""

from __future__ import annotations

import argparse
import io
import itertools
from collections import defaultdict
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from workbench.errors import ConfigurationError
from workbench.samples import (
    SyntheticCorpus,
    bundled_sample_files,
    generate_studies,
    sample_files,
)
from workbench.samples.commands import register
from workbench.samples.identities import Kind
from workbench.samples.planter import table_e11
from workbench.samples.planting import (
    PLANTED_BY_NAME,
    REPEATING_GROUP_ROWS,
    UNFILLED_TABLE_ATTRIBUTES,
)
from workbench.samples.sequence_items import SEQUENCE_BUILDERS
from workbench.samples.synthetic import SyntheticSeries

SMALL = {"patients": 2, "studies_per_patient": 1, "ct_slices": 3, "mr_slices": 3}
REPEATING_GROUP_TAGS = {
    "(50xx,xxxx)": (0x50000022, 0x50003000),
    "(60xx,3000)": (0x60003000,),
    "(60xx,4000)": (0x60004000,),
}


def read(path: Path) -> Dataset:
    return pydicom.dcmread(path)


def texts(ds: Dataset) -> set[str]:
    """Return every value in ``ds``, at every depth, as decoded text."""
    found: set[str] = set()
    for element in ds.iterall():
        if element.VR == "SQ" or element.value is None:
            continue
        values = (
            element.value if isinstance(element.value, MultiValue) else [element.value]
        )
        for value in values:
            if isinstance(value, bytes):
                found.add(value.rstrip(b"\x00 ").decode("utf-8", errors="replace"))
            else:
                found.add(str(value))
    return found


def sample_of(series: SyntheticSeries) -> list[Path]:
    """The first and the last file of a series: enough to check shared attributes."""
    return [series.files[0], series.files[-1]]


# Generator.


def test_generator_same_seed_same_bytes(tmp_path: Path) -> None:
    first = generate_studies(tmp_path / "a", seed=7, rows=16, columns=16, **SMALL)
    second = generate_studies(tmp_path / "b", seed=7, rows=16, columns=16, **SMALL)
    other = generate_studies(tmp_path / "c", seed=8, rows=16, columns=16, **SMALL)
    assert len(first.files) == 2 * (3 + 3)
    for a, b, c in zip(first.files, second.files, other.files, strict=True):
        assert a.relative_to(first.root) == b.relative_to(second.root)
        assert a.read_bytes() == b.read_bytes()
        assert a.read_bytes() != c.read_bytes()


def test_generator_layout(synthetic_corpus: SyntheticCorpus) -> None:
    corpus = synthetic_corpus
    assert len(corpus.patients) == 3
    assert len(corpus.files) == 3 * 2 * (24 + 12)
    relative = sorted(str(path.relative_to(corpus.root)) for path in corpus.files)
    assert relative[0] == "patient-01/study-01/series-01-ct/0001.dcm"
    assert relative[-1] == "patient-03/study-02/series-02-mr/0012.dcm"
    # Folder and file names carry no planted value.
    parts = {
        part for path in corpus.files for part in path.relative_to(corpus.root).parts
    }
    for part in parts:
        assert not corpus.locate(part), part


def test_encoder_writes_what_pydicom_writes(synthetic_corpus: SyntheticCorpus) -> None:
    for series in synthetic_corpus.series[:4]:
        for path in sample_of(series):
            buffer = io.BytesIO()
            pydicom.dcmwrite(buffer, read(path), enforce_file_format=True)
            assert buffer.getvalue() == path.read_bytes()


def test_generator_rejects_bad_counts(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="patients is 0"):
        generate_studies(tmp_path, patients=0)
    with pytest.raises(ConfigurationError, match="rows is 4"):
        generate_studies(tmp_path, rows=4)
    with pytest.raises(ConfigurationError, match="seed is -1"):
        generate_studies(tmp_path, seed=-1)
    assert not any(tmp_path.iterdir())


# Table E.1-1 coverage.


def test_every_table_row_filled_or_explained(synthetic_corpus: SyntheticCorpus) -> None:
    filled = synthetic_corpus.filled_attributes
    for row in table_e11():
        name = row.keyword or row.tag
        if name in UNFILLED_TABLE_ATTRIBUTES:
            assert name not in filled
            continue
        assert name in filled, f"Table E.1-1 row {name} is neither filled nor explained"
    assert set(REPEATING_GROUP_ROWS) <= filled
    assert filled | {"MediaStorageSOPInstanceUID"} >= PLANTED_BY_NAME


def test_filled_attributes_have_values(synthetic_corpus: SyntheticCorpus) -> None:
    keywords = {name for name in synthetic_corpus.filled_attributes if "(" not in name}
    for series in synthetic_corpus.series:
        for path in sample_of(series):
            ds = read(path)
            for keyword in sorted(keywords):
                holder = ds.file_meta if keyword == "MediaStorageSOPInstanceUID" else ds
                assert keyword in holder, f"{keyword} missing from {path}"
                element = holder[keyword]
                assert not element.is_empty, f"{keyword} empty in {path}"
            for row, tags in REPEATING_GROUP_TAGS.items():
                for tag in tags:
                    assert tag in ds, f"{row}: {tag:08X} missing from {path}"
                    assert not ds[tag].is_empty


def test_every_table_sequence_has_a_builder() -> None:
    for row in table_e11():
        if row.vr != "SQ" or row.keyword in PLANTED_BY_NAME:
            continue
        is_code_sequence = row.keyword.endswith(("CodeSequence", "CodeSequenceTrial"))
        assert row.keyword in SEQUENCE_BUILDERS or is_code_sequence, row.keyword


# Planted values.


def test_planted_values_are_in_the_files(synthetic_corpus: SyntheticCorpus) -> None:
    for patient in synthetic_corpus.patients:
        found: set[str] = set()
        sop_uids: set[str] = set()
        for study in patient.studies:
            for series in study.series:
                sop_uids.update(series.sop_instance_uids)
                for path in sample_of(series):
                    found |= texts(read(path))
        for planted in patient.identity.planted:
            if planted.path == "SOPInstanceUID":
                assert planted.value in sop_uids
            elif planted.kind == Kind.WORD:
                assert any(planted.value in text for text in found), planted
            else:
                assert planted.value in found, planted


def test_planted_values_belong_to_one_patient(
    synthetic_corpus: SyntheticCorpus,
) -> None:
    owners: dict[str, set[str]] = defaultdict(set)
    for patient in synthetic_corpus.patients:
        for value in patient.identifying_values(set(Kind)):
            owners[value].add(patient.identity.label)
    shared = {value: labels for value, labels in owners.items() if len(labels) > 1}
    # Times of day and GPS numbers are not attributable; everything searchable is.
    searchable = synthetic_corpus.identifying_values()
    assert not {value for value in shared if value in searchable}


def test_identifying_values_cover_names_ids_and_dates(
    synthetic_corpus: SyntheticCorpus,
) -> None:
    values = synthetic_corpus.identifying_values()
    doering, muller, yamada = (p.identity for p in synthetic_corpus.patients)
    assert {"DOERING^JANE^MARGARET", "DOERING", "JANE", "MARGARET"} <= values
    assert {"MÜLLER^JÜRGEN", "MÜLLER", "JÜRGEN"} <= values
    assert {
        "山田^太郎",
        "山田",
        "太郎",
        "やまだ",
        "たろう",
        "Yamada",
        "Tarou",
    } <= values
    assert {doering.patient_id, muller.patient_id, yamada.patient_id} <= values
    assert doering.birth_date.strftime("%Y%m%d") in values
    for patient in synthetic_corpus.patients:
        for study in patient.studies:
            assert study.identity.date_text in values
            assert study.identity.accession_number in values
            assert study.identity.study_instance_uid in values
            for series in study.series:
                assert series.series_instance_uid in values
                assert set(series.sop_instance_uids) <= values
    # Components shorter than four bytes are not searched for on their own.
    assert "A" not in synthetic_corpus.identifying_values()
    study_times = {
        s.identity.study_time for p in synthetic_corpus.patients for s in p.studies
    }
    assert not study_times & values
    assert study_times <= synthetic_corpus.identifying_values({Kind.TIME})


def test_locate_names_patient_and_attribute(synthetic_corpus: SyntheticCorpus) -> None:
    found = synthetic_corpus.locate("JÜRGEN")
    assert ("patient-02", "PatientName") in found
    assert ("patient-02", '(0011,"WBSYN PATIENT INFO",10)') in found
    assert synthetic_corpus.locate("no such value") == []


def test_nested_identities_three_levels_deep(synthetic_corpus: SyntheticCorpus) -> None:
    patient = synthetic_corpus.patients[0]
    ds = read(patient.studies[0].series[0].files[0])
    request = ds.RequestAttributesSequence[0]
    assert request.AccessionNumber == patient.studies[0].identity.accession_number
    assert request.RequestedProcedureID.startswith("RP")
    assert str(request.RequestingPhysician).endswith("^^Dr")
    assert (
        request.ScheduledProcedureStepStartDate == patient.studies[0].identity.date_text
    )
    context = request.ScheduledProtocolCodeSequence[0].ProtocolContextSequence[0]
    assert context.ValueType == "PNAME"
    assert str(context.PersonName) in patient.identifying_values()
    performed = ds.PerformedProtocolCodeSequence[0].ProtocolContextSequence[0]
    deepest = performed.ContentItemModifierSequence[0].PersonName
    assert str(deepest) in patient.identifying_values()
    tree = ds.ContentSequence[5].ContentSequence[1].ContentSequence[0]
    assert str(tree.PersonName) in patient.identifying_values()
    referenced = ds.ReferencedPatientSequence[0]
    assert referenced.PatientName == patient.identity.patient_name
    assert referenced.PatientID == patient.identity.patient_id


def test_other_patient_identities(synthetic_corpus: SyntheticCorpus) -> None:
    ds = read(synthetic_corpus.files[0])
    assert len(ds.OtherPatientIDsSequence) == 2
    for item in ds.OtherPatientIDsSequence:
        assert item.PatientID.startswith("ALT")
        assert item.IssuerOfPatientID.endswith("Regional Health")
    assert list(ds.OtherPatientIDs) == [i.PatientID for i in ds.OtherPatientIDsSequence]
    assert len(ds.OtherPatientNames) == 2
    assert ds.PatientMotherBirthName
    assert ds.PatientBirthDate == synthetic_corpus.patients[
        0
    ].identity.birth_date.strftime("%Y%m%d")


def test_private_blocks(synthetic_corpus: SyntheticCorpus) -> None:
    patient = synthetic_corpus.patients[0].identity
    study = synthetic_corpus.patients[0].studies[0]
    ct, mr = (read(series.files[0]) for series in study.series)
    for ds in (ct, mr):
        block = ds.private_block(0x0011, "WBSYN PATIENT INFO")
        assert block[0x10].value == patient.patient_name
        assert block[0x11].value == patient.patient_id
        assert ds.private_block(0x0013, "WBSYN GLOBAL ID")[0x10].value.startswith("GPI")
    assert mr.private_block(0x0019, "SIEMENS MR HEADER")[0x0C].value == 1000
    with pytest.raises(KeyError):
        ct.private_block(0x0019, "SIEMENS MR HEADER")


def test_ages_and_study_dates(synthetic_corpus: SyntheticCorpus) -> None:
    oldest = synthetic_corpus.patients[0]
    ages = [read(study.series[0].files[0]).PatientAge for study in oldest.studies]
    assert ages[0] == "093Y"
    assert all(int(age[:3]) > 89 for age in ages)
    for patient in synthetic_corpus.patients:
        dates = [study.identity.study_date for study in patient.studies]
        assert all((b - a).days >= 400 for a, b in itertools.pairwise(dates))
        for study in patient.studies:
            ds = read(study.series[1].files[0])
            assert ds.StudyDate == study.identity.date_text
            assert ds.PatientBirthDate == patient.identity.birth_date.strftime("%Y%m%d")


def test_retained_values_written(synthetic_corpus: SyntheticCorpus) -> None:
    for series in synthetic_corpus.series[:2]:
        ds = read(series.files[0])
        assert series.retained["Modality"] == series.modality
        for name, value in series.retained.items():
            if name.startswith("("):
                b_value = ds.private_block(0x0019, "SIEMENS MR HEADER")[0x0C].value
                assert str(b_value) == value
            else:
                assert str(ds[name].value) == str(value), name


# Character sets.


def test_utf8_and_japanese_names_decode(synthetic_corpus: SyntheticCorpus) -> None:
    muller, yamada = synthetic_corpus.patients[1], synthetic_corpus.patients[2]
    path = muller.studies[0].series[0].files[0]
    ds = read(path)
    assert ds.SpecificCharacterSet == "ISO_IR 192"
    assert ds.PatientName == "MÜLLER^JÜRGEN"
    assert "MÜLLER^JÜRGEN".encode() in path.read_bytes()
    assert "Ö" in str(ds.ReferringPhysicianName)

    path = yamada.studies[0].series[1].files[0]
    ds = read(path)
    assert list(ds.SpecificCharacterSet) == ["", "ISO 2022 IR 87"]
    assert ds.PatientName == "Yamada^Tarou=山田^太郎=やまだ^たろう"
    assert ds.PatientName.ideographic == "山田^太郎"
    assert ds.PatientName.phonetic == "やまだ^たろう"
    raw = path.read_bytes()
    assert b"Yamada^Tarou=\x1b$B;3ED\x1b(B" in raw
    assert "山田".encode() not in raw


# Geometry and pixels.


def test_slices_evenly_spaced_along_normal(synthetic_corpus: SyntheticCorpus) -> None:
    for series in synthetic_corpus.series[:2]:
        datasets = [read(path) for path in series.files]
        orientation = np.array(datasets[0].ImageOrientationPatient, dtype=float)
        row, column = orientation[:3], orientation[3:]
        assert abs(np.dot(row, column)) < 1e-9
        normal = np.cross(row, column)
        distances = sorted(
            float(np.dot(normal, np.array(ds.ImagePositionPatient, dtype=float)))
            for ds in datasets
        )
        steps = np.diff(distances)
        spacing = float(datasets[0].SpacingBetweenSlices)
        assert np.allclose(steps, spacing, atol=1e-3), (series.label, steps)
        assert float(datasets[0].SliceThickness) <= spacing
        assert len({tuple(ds.PixelSpacing) for ds in datasets}) == 1


def test_mr_numbering_differs_from_slice_order(
    synthetic_corpus: SyntheticCorpus,
) -> None:
    ct, mr = synthetic_corpus.patients[0].studies[0].series
    assert ct.slice_indexes == sorted(ct.slice_indexes)
    assert mr.slice_indexes != sorted(mr.slice_indexes)
    assert mr.slice_indexes[:3] == [0, 2, 4]
    normal = mr.geometry.normal
    distances = [
        float(np.dot(normal, np.array(read(p).ImagePositionPatient, dtype=float)))
        for p in mr.files_in_slice_order
    ]
    assert distances == sorted(distances)
    numbers = [int(read(p).InstanceNumber) for p in mr.files_in_slice_order]
    assert numbers != sorted(numbers)


def test_series_share_frame_of_reference(synthetic_corpus: SyntheticCorpus) -> None:
    seen = set()
    for patient in synthetic_corpus.patients:
        for study in patient.studies:
            ct, mr = (read(series.files[0]) for series in study.series)
            assert ct.FrameOfReferenceUID == mr.FrameOfReferenceUID
            assert ct.StudyInstanceUID == mr.StudyInstanceUID
            assert ct.ImageOrientationPatient != mr.ImageOrientationPatient
            seen.add(ct.FrameOfReferenceUID)
    assert len(seen) == 6


def test_references_resolve_within_study(synthetic_corpus: SyntheticCorpus) -> None:
    for study in synthetic_corpus.patients[1].studies:
        instances = {uid for s in study.series for uid in s.sop_instance_uids}
        series_uids = [s.series_instance_uid for s in study.series]
        for index, series in enumerate(study.series):
            for path in series.files:
                ds = read(path)
                for keyword in ("ReferencedImageSequence", "SourceImageSequence"):
                    target = ds[keyword][0].ReferencedSOPInstanceUID
                    assert target in instances
                    assert target != ds.SOPInstanceUID
                related = ds.RelatedSeriesSequence[0]
                assert related.SeriesInstanceUID == series_uids[1 - index]
                assert related.StudyInstanceUID == study.identity.study_instance_uid


def nearest_voxel(series: SyntheticSeries, point: np.ndarray) -> tuple[int, int, int]:
    """Return (slice, row, column) of the voxel centre nearest to ``point``."""
    geometry = series.geometry
    offset = point - np.array(geometry.first_position)
    along_normal = float(np.dot(offset, geometry.normal))
    k = round(along_normal / geometry.spacing_between_slices)
    in_plane = offset - along_normal * geometry.normal
    column = round(
        float(np.dot(in_plane, geometry.row_direction)) / geometry.column_spacing
    )
    row = round(
        float(np.dot(in_plane, geometry.column_direction)) / geometry.row_spacing
    )
    return k, row, column


def test_phantom_in_both_series(synthetic_corpus: SyntheticCorpus) -> None:
    patient = synthetic_corpus.patients[0]
    ct, mr = patient.studies[0].series
    centre = np.array(patient.phantom.sphere_centre)
    body = np.array([120.0, 0.0, centre[2]])

    volume = np.stack([read(p).pixel_array for p in ct.files_in_slice_order])
    assert volume.dtype == np.int16
    hounsfield = volume.astype(np.int32) - 1024  # RescaleIntercept
    assert abs(hounsfield[nearest_voxel(ct, centre)] - 700) <= 8
    assert abs(hounsfield[nearest_voxel(ct, body)] - 40) <= 8
    assert abs(hounsfield[0, 0, 0] + 1000) <= 8

    signal = np.stack([read(p).pixel_array for p in mr.files_in_slice_order])
    assert signal.dtype == np.uint16
    assert 1800 <= signal[nearest_voxel(mr, centre)] < 1820
    assert signal.max() < 4096


# Bundled files.


def test_bundled_files_are_pydicom_data() -> None:
    files = bundled_sample_files()
    names = {path.name for path in files}
    assert {"CT_small.dcm", "MR_small_RLE.dcm", "chrH31.dcm", "chrX1.dcm"} <= names
    assert len(files) >= 90
    for path in files:
        assert path.is_file()
        assert path.parent.name in ("test_files", "charset_files")
        assert path.stat().st_size < 1_000_000


def test_sample_files_are_bundled_and_synthetic(tmp_path: Path) -> None:
    files = sample_files(tmp_path)
    bundled = bundled_sample_files()
    assert files[: len(bundled)] == bundled
    synthetic = files[len(bundled) :]
    assert len(synthetic) == 216
    assert all(tmp_path in path.parents for path in synthetic)


# Command line.


def command_line() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="workbench")
    register(parser.add_subparsers(dest="command"))
    return parser


def test_command_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = command_line().parse_args(
        [
            "samples",
            "generate",
            "--out",
            str(tmp_path),
            "--patients",
            "1",
            "--studies-per-patient",
            "1",
            "--ct-slices",
            "2",
            "--mr-slices",
            "3",
            "--size",
            "16",
            "--seed",
            "5",
        ]
    )
    assert args.handler(args) == 0
    assert "wrote 5 instances of 1 patients" in capsys.readouterr().out
    written = sorted(tmp_path.rglob("*.dcm"))
    assert len(written) == 5
    assert read(written[0]).Rows == 16


def test_command_list(capsys: pytest.CaptureFixture[str]) -> None:
    args = command_line().parse_args(["samples", "list"])
    assert args.handler(args) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [str(path) for path in bundled_sample_files()]


def test_command_cases(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = command_line().parse_args(["samples", "cases", "--out", str(tmp_path), "f9"])
    assert args.handler(args) == 0
    output = capsys.readouterr().out
    assert output.startswith("F9: 1-bit segmentation")
    assert (tmp_path / "F9" / "packed-1-bit-segmentation.dcm").is_file()


def test_person_name_values_stay_text(synthetic_corpus: SyntheticCorpus) -> None:
    planted = synthetic_corpus.patients[2].identity.planted
    names = [p.value for p in planted if p.kind == Kind.PERSON_NAME]
    assert "Yamada^Tarou=山田^太郎=やまだ^たろう" in names
    assert all(
        isinstance(name, str) and not isinstance(name, PersonName) for name in names
    )
