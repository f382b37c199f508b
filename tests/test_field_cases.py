"""Field cases F1-F11: how DICOM goes wrong in practice, each through a real ingest.

Each case's files are written by :mod:`workbench.samples.field_cases` and ingested
by the real pipeline (local Dask cluster, folder source). The F11 test also loads
every case into the session's Orthanc and ingests from there.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import xarray as xr
from ingest_helpers import (
    find_planted,
    ingest_folder,
    instances_table,
    orthanc_credentials,
    quarantine_entries,
    written_texts,
)

from workbench.deidentify import build_deidentifier, collect_identifiers
from workbench.deidentify.verify import find_leaks
from workbench.dicomio import read_instance
from workbench.errors import DicomReadError
from workbench.ingest import IngestConfig, run_ingest
from workbench.orthanc.upload import upload_paths

pytestmark = pytest.mark.slow

# Reference sequences the Basic Profile removes (Table E.1-1 action X).
PROFILE_REMOVES = {"ReferencedStudySequence"}
# F8: what the typed column holds and whether the raw text is flagged. A value with
# one reading in an old or loose format (a date with dashes) keeps that reading.
F8_EXPECTED = {
    "AcquisitionNumber": (None, True),
    "SliceThickness": (1.2345678901234567, True),
    "PixelSpacing": ([None, None], True),
    "ManufacturerModelName": ("M" * 200, True),
    "SeriesNumber": (None, False),
    "AcquisitionTime": (dt.time(10, 15), True),
    "PatientSize": (None, True),
}


def rows_by_file(case, out, pseudonyms):
    """Map each written file of a case to its output row (by the keyed SOP UID)."""
    table = instances_table(out).to_pandas()
    rows = {}
    for path in case.files:
        try:
            ds = read_instance(path.read_bytes(), stop_before_pixels=True)
        except DicomReadError:
            continue  # broken files are quarantined, so they have no row
        uid = pseudonyms.uid(str(ds.SOPInstanceUID))
        match = table[table["SOPInstanceUID"] == uid]
        if len(match):
            rows[path] = match.iloc[0]
    return rows


def assert_no_planted(case, out):
    planted = case.identifying_values()
    assert planted
    leaks = find_planted(written_texts(out), planted)
    assert leaks == []


def test_f1_identity_cleaned_at_every_depth(field_case, tmp_path):
    case = field_case("F1")
    for keep in (False, True):
        out = tmp_path / f"keep-{keep}"
        summary = ingest_folder(
            case.roles["nested"].parent, out, clean_descriptors=keep
        )
        assert summary.written == 1
        assert summary.quarantined == 0
        assert_no_planted(case, out)
        row = instances_table(out).to_pandas().iloc[0]
        # The Basic Profile removes these sequences; the Clean Descriptors option
        # keeps RequestAttributesSequence, cleaned at every depth.
        assert pd.isna(row.get("ReferencedPatientSequence"))
        assert pd.isna(row.get("RequestAttributesSequence")) != keep


def test_f1_verification_sees_nested_names(field_case):
    case = field_case("F1")
    source = read_instance(case.roles["nested"].read_bytes())
    deidentifier = build_deidentifier(bytes(32))
    identifiers = collect_identifiers(source, deidentifier)
    # Undo nothing: the source itself must fail verification at depth.
    paths = {path for _, path in find_leaks(source, identifiers)}
    assert any(path.count("[") >= 3 for path in paths), sorted(paths)


def test_f2_references_resolve(field_case, tmp_path, deid_key):
    from workbench.deidentify import Pseudonymizer

    case = field_case("F2")
    out = tmp_path / "f2"
    summary = ingest_folder(case.files[0].parent, out)
    assert summary.written == len(case.files)
    pseudonyms = Pseudonymizer(deid_key)
    table = instances_table(out).to_pandas()
    by_file = rows_by_file(case, out, pseudonyms)
    checked = 0
    for reference in case.facts["references"]:
        row = by_file[reference["file"]]
        sequence, _, rest = reference["path"].partition("[")
        if sequence in PROFILE_REMOVES:
            assert sequence not in row or pd.isna(row[sequence])
            checked += 1
            continue
        index = int(rest.split("]")[0])
        keyword = rest.split("].")[1]
        items = json.loads(row[sequence])
        from pydicom.datadict import tag_for_keyword

        tag = f"{tag_for_keyword(keyword):08X}"
        value = items[index][tag]["Value"][0]
        assert value == pseudonyms.uid(reference["value"])
        if reference["target_file"] is not None:
            target = by_file[reference["target_file"]]
            assert value == target[reference["target"]]
        else:
            assert value in set(table[reference["target"]])
        checked += 1
    assert checked == len(case.facts["references"])


def test_f3_private_allow_list(field_case, tmp_path):
    case = field_case("F3")
    out = tmp_path / "f3"
    summary = ingest_folder(case.files[0].parent, out)
    assert summary.written == 2
    schema = instances_table(out).schema
    frame = instances_table(out).to_pandas()
    private = [c for c in frame.columns if c.startswith("Private_")]
    assert private == ["Private_SIEMENS_MR_HEADER_0019xx0C"]
    assert list(frame[private[0]]) == [1000, 1000]
    assert schema.field(private[0]).type == pa.int64()
    assert_no_planted(case, out)


def test_f4_character_sets(field_case, tmp_path):
    case = field_case("F4")
    out = tmp_path / "f4"
    summary = ingest_folder(case.files[0].parent, out)
    assert summary.written == len(case.files)
    frame = instances_table(out).to_pandas()
    assert frame["PatientName"].map(str.isascii).all()
    assert_no_planted(case, out)


def test_f4_verification_compares_decoded_text(field_case):
    case = field_case("F4")
    source = read_instance(case.roles["iso2022-japanese"].read_bytes())
    identifiers = collect_identifiers(source, build_deidentifier(bytes(32)))
    assert "山田" in identifiers.names
    assert identifiers.find_in_text("患者 山田 様") == "person name"


def test_f5_other_identities_removed(field_case, tmp_path):
    case = field_case("F5")
    out = tmp_path / "f5"
    ingest_folder(case.files[0].parent, out)
    row = instances_table(out).to_pandas().iloc[0]
    for keyword in case.facts["removed"]:
        assert keyword not in row or pd.isna(row[keyword]), keyword
    assert_no_planted(case, out)


def test_f6_two_runs_one_identity(field_case, tmp_path, deid_key):
    case = field_case("F6")
    first = tmp_path / "batch-1"
    second = tmp_path / "batch-2"
    ingest_folder(case.roles["batch-1"], first)
    ingest_folder(case.roles["batch-2"], second)
    a = instances_table(first).to_pandas()
    b = instances_table(second).to_pandas()
    assert a["PatientID"].nunique() == 1
    assert set(a["PatientID"]) == set(b["PatientID"])
    assert set(a["StudyInstanceUID"]) == set(b["StudyInstanceUID"])
    assert set(a["FrameOfReferenceUID"]) <= set(b["FrameOfReferenceUID"])
    from workbench.deidentify import Pseudonymizer

    ct_series = Pseudonymizer(deid_key).uid(case.facts["ct_series_instance_uid"])
    assert ct_series in set(a["SeriesInstanceUID"])
    assert ct_series in set(b["SeriesInstanceUID"])


def test_f6_second_batch_into_same_dataset_refused_not_lost(field_case, tmp_path):
    case = field_case("F6")
    out = tmp_path / "both"
    ingest_folder(case.roles["batch-1"], out)
    before = instances_table(out).num_rows
    summary = ingest_folder(case.roles["batch-2"], out)
    # The CT series holds batch-1's slices: rewriting it from batch-2 would drop
    # them, so it is refused; the MR series of batch-2 is written.
    assert summary.failed_series == 1
    assert "would drop" in summary.failures[0]
    after = instances_table(out).to_pandas()
    assert len(after) == before + 2
    assert after["PatientID"].nunique() == 1


def test_f7_headerless_truncated_and_text(field_case, tmp_path):
    case = field_case("F7")
    out = tmp_path / "f7"
    summary = ingest_folder(case.files[0].parent, out)
    assert summary.written == 2
    reasons = sorted(entry["reason_code"] for entry in quarantine_entries(out))
    assert reasons == ["not-dicom", "truncated", "truncated"]
    syntaxes = set(instances_table(out).to_pandas()["TransferSyntaxUID"])
    assert syntaxes == set(case.facts["transfer_syntaxes"].values())


def test_f7_text_file_never_uploaded(field_case, orthanc):
    case = field_case("F7")
    with orthanc.client() as client:
        report = upload_paths(client, case.files, progress=False)
    outcome = {o.path.name: o.status for o in report.outcomes}
    assert outcome["referral-letter.dcm"] == "not-dicom"
    assert outcome["headerless-implicit.dcm"] == "uploaded"
    assert outcome["headerless-explicit.dcm"] == "uploaded"
    assert outcome["truncated-pixel-data.dcm"] in ("truncated", "unreadable")


def test_f8_vr_violations(field_case, tmp_path):
    case = field_case("F8")
    out = tmp_path / "f8"
    summary = ingest_folder(case.files[0].parent, out)
    assert summary.written == 1
    row = instances_table(out).to_pylist()[0]
    invalid = dict(row["invalid_values"] or [])
    planted = {v["keyword"] for v in case.facts["violations"]}
    assert set(F8_EXPECTED) | {"AcquisitionDate"} == planted
    for keyword, (expected, flagged) in F8_EXPECTED.items():
        value = row.get(keyword)
        if isinstance(expected, float):
            assert value == pytest.approx(expected), keyword
        else:
            assert value == expected, keyword
        assert (keyword in invalid) == flagged, keyword
    # A malformed date still identifies: it cannot be shifted by whole days, so
    # de-identification empties it before the row is built.
    assert row["AcquisitionDate"] is None
    assert "AcquisitionDate" not in invalid
    assert_no_planted(case, out)


def test_f9_one_bit_segmentation(field_case, tmp_path):
    case = field_case("F9")
    out = tmp_path / "f9"
    summary = ingest_folder(case.files[0].parent, out)
    assert summary.written == 1
    row = instances_table(out).to_pandas().iloc[0]
    volume = xr.open_zarr(
        out / "volumes.zarr",
        group=row["volume_path"],
        zarr_format=3,
        consolidated=False,
    )
    assert volume.pixels.shape == tuple(case.facts["shape"])
    assert volume.pixels.dtype in (np.uint8, np.bool_)
    ordered = volume.pixels.values[np.argsort(volume.frame.values)]
    assert ordered.tolist() == case.facts["frames"]


def test_f10_transfer_syntaxes(field_case, tmp_path):
    case = field_case("F10")
    folder = tmp_path / "input"
    folder.mkdir()
    for role, path in case.roles.items():
        shutil.copy(path, folder / f"{role}.dcm")
    out = tmp_path / "f10"
    # Several bundled samples are OT or SC images, which are quarantined as
    # possible burned-in text by default; this case is about decoding.
    ingest_folder(folder, out, quarantine_burned_in=False)
    table = instances_table(out).to_pandas()
    quarantined = {e["source_id"]: e for e in quarantine_entries(out)}
    from workbench.deidentify import Pseudonymizer
    from workbench.home import read_key

    pseudonyms = Pseudonymizer(read_key())
    pixels = {}
    for role, facts in case.facts["files"].items():
        ds = read_instance(
            (folder / f"{role}.dcm").read_bytes(), stop_before_pixels=True
        )
        uid = pseudonyms.uid(str(ds.SOPInstanceUID))
        rows = table[table["SOPInstanceUID"] == uid]
        if facts["expect"] == "quarantine":
            assert len(rows) == 0, role
            assert any(e["reason_code"] == "pixel-decode" for e in quarantined.values())
            continue
        assert len(rows) >= 1, role
        row = rows.iloc[0]
        volume = xr.open_zarr(
            out / "volumes.zarr",
            group=row["volume_path"],
            zarr_format=3,
            consolidated=False,
        )
        index = list(volume.SOPInstanceUID.values).index(uid)
        data = volume.pixels.values[index]
        assert data.dtype.byteorder in ("=", "<", "|"), role
        pixels[role] = data
    for role, facts in case.facts["files"].items():
        if facts["same_pixels_as"]:
            np.testing.assert_array_equal(pixels[role], pixels[facts["same_pixels_as"]])


def test_f11_one_schema_through_orthanc(field_case, orthanc, tmp_path):
    case = field_case("F11")
    with orthanc.client() as client:
        upload_paths(client, case.files, progress=False)
    out = tmp_path / "f11"
    with orthanc_credentials(orthanc):
        summary = run_ingest(
            IngestConfig(
                out=out, orthanc=orthanc.url, purpose="F11 test", progress=False
            )
        )
    assert summary.failed_series == 0
    assert summary.written > 30
    parts = sorted((out / "instances").glob("*.parquet"))
    schemas = {pq.read_schema(part).remove_metadata() for part in parts}
    assert len(schemas) == 1
    [schema] = schemas
    # OtherPatientIDs is removed by the profile, so it has no column.
    list_attributes = [k for k in case.facts["list_attributes"] if k in schema.names]
    assert len(list_attributes) >= 3
    for keyword in list_attributes:
        assert pa.types.is_list(schema.field(keyword).type), keyword
    assert schema.field("PatientName").type == pa.string()
    assert schema.field("StudyDate").type == pa.date32()
    frame = instances_table(out).to_pandas()
    for keyword in list_attributes:
        values = frame[keyword].dropna()
        assert values.map(lambda v: isinstance(v, (list, np.ndarray))).all(), keyword
    assert_no_planted(case, out)
