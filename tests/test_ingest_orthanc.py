"""End to end: synthetic studies with planted identities, from a real Orthanc.

One ingest of the synthetic corpus (a module fixture) feeds most tests here: it
runs the real pipeline against the session's Orthanc, on a local Dask cluster, and
every test then checks one property of what it wrote.
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import xarray as xr
from ingest_helpers import (
    captured_logs,
    find_planted,
    instances_table,
    orthanc_credentials,
    written_texts,
)

from workbench.audit import open_audit_log
from workbench.dataset.manifest import require_deidentified
from workbench.deidentify import Pseudonymizer
from workbench.ingest import IngestConfig, run_ingest
from workbench.orthanc.upload import upload_paths

pytestmark = [pytest.mark.slow, pytest.mark.orthanc]

# Attributes research needs, which de-identification must keep (with a value)
# in every instance of the modality.
RESEARCH_ATTRIBUTES = {
    "common": [
        "Modality",
        "Manufacturer",
        "ManufacturerModelName",
        "BodyPartExamined",
        "PatientSex",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "StudyDate",
        "SeriesNumber",
        "InstanceNumber",
        "Rows",
        "Columns",
        "PixelSpacing",
        "SliceThickness",
        "ImageOrientationPatient",
        "ImagePositionPatient",
        "FrameOfReferenceUID",
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "SOPClassUID",
        "PatientID",
    ],
    "CT": ["KVP", "RescaleSlope", "RescaleIntercept", "ConvolutionKernel"],
    "MR": ["MagneticFieldStrength", "RepetitionTime", "EchoTime", "FlipAngle"],
}


@pytest.fixture(scope="module")
def ingested(orthanc_server, synthetic_corpus, deid_key, tmp_path_factory):
    """Upload the synthetic corpus to Orthanc and ingest it once."""
    with orthanc_server.client() as client:
        for patient in client.patients():
            client.delete("Patient", patient)
        report = upload_paths(client, [synthetic_corpus.root], progress=False)
    assert report.ok, report.summary()
    out = tmp_path_factory.mktemp("ingest") / "synthetic"
    with orthanc_credentials(orthanc_server), captured_logs() as logs:
        summary = run_ingest(
            IngestConfig(
                out=out,
                orthanc=orthanc_server.url,
                purpose="end-to-end test",
                progress=False,
            )
        )
    return SimpleNamespace(
        out=out,
        summary=summary,
        corpus=synthetic_corpus,
        logs=logs.getvalue(),
        pseudonyms=Pseudonymizer(deid_key),
        server=orthanc_server,
    )


def test_every_instance_written(ingested):
    expected = len(ingested.corpus.files)
    assert ingested.summary.written == expected
    assert ingested.summary.quarantined == 0
    assert ingested.summary.failed_series == 0
    assert instances_table(ingested.out).num_rows == expected


def test_no_planted_value_in_any_output(ingested):
    places = written_texts(ingested.out)
    places["logs"] = ingested.logs
    planted = ingested.corpus.identifying_values()
    assert len(planted) > 100
    leaks = find_planted(places, planted)
    explained = [(place, ingested.corpus.locate(value)) for place, value in leaks[:5]]
    assert leaks == [], explained


def test_uid_references_resolve(ingested):
    table = instances_table(ingested.out).to_pandas()
    sop_uids = set(table["SOPInstanceUID"])
    series_uids = set(table["SeriesInstanceUID"])
    references = 0
    for _, row in table.iterrows():
        for column in ("ReferencedImageSequence", "SourceImageSequence"):
            if row.get(column) is None or pd.isna(row.get(column)):
                continue
            for item in json.loads(row[column]):
                uid = item["00081155"]["Value"][0]
                assert uid in sop_uids
                references += 1
        related = row.get("RelatedSeriesSequence")
        if related is not None and not pd.isna(related):
            for item in json.loads(related):
                assert item["0020000E"]["Value"][0] in series_uids
                references += 1
    assert references >= len(table)


def test_uids_consistent_with_keyed_mapping(ingested):
    table = instances_table(ingested.out).to_pandas()
    for series in ingested.corpus.series:
        new_series = ingested.pseudonyms.uid(series.series_instance_uid)
        rows = table[table["SeriesInstanceUID"] == new_series]
        assert len(rows) == len(series.files)
        expected = {ingested.pseudonyms.uid(uid) for uid in series.sop_instance_uids}
        assert set(rows["SOPInstanceUID"]) == expected
    # One frame of reference per study.
    per_study = table.groupby("StudyInstanceUID")["FrameOfReferenceUID"].nunique()
    assert (per_study == 1).all()


def test_date_intervals_within_patient(ingested):
    table = instances_table(ingested.out).to_pandas()
    for patient in ingested.corpus.patients:
        source, shifted, pseudonyms = [], [], set()
        for study in patient.studies:
            new_study = ingested.pseudonyms.uid(study.identity.study_instance_uid)
            rows = table[table["StudyInstanceUID"] == new_study]
            assert len(rows) > 0
            assert rows["StudyDate"].nunique() == 1
            source.append(study.identity.study_date)
            shifted.append(rows["StudyDate"].iloc[0])
            pseudonyms |= set(rows["PatientID"])
        # One pseudonym per patient, and the same gaps between its studies.
        assert len(pseudonyms) == 1
        source_gaps = [(b - a).days for a, b in itertools.pairwise(source)]
        shifted_gaps = [(b - a).days for a, b in itertools.pairwise(shifted)]
        assert shifted_gaps == source_gaps
        assert all(day not in source for day in shifted)


def test_research_attributes_kept(ingested):
    table = instances_table(ingested.out).to_pandas()
    for modality in ("CT", "MR"):
        rows = table[table["Modality"] == modality]
        assert len(rows) > 0
        for keyword in RESEARCH_ATTRIBUTES["common"] + RESEARCH_ATTRIBUTES[modality]:
            assert keyword in rows.columns, keyword
            assert rows[keyword].notna().all(), keyword
    ct = table[table["Modality"] == "CT"].iloc[0]
    assert ct["Manufacturer"] == "Synthetic Imaging Co"
    assert ct["KVP"] == 120.0
    assert ct["RescaleIntercept"] == -1024.0


def test_age_over_89_capped(ingested):
    table = instances_table(ingested.out).to_pandas()
    ages = set(table["PatientAge"])
    assert "090Y" in ages
    assert all(int(age[:3]) <= 90 for age in ages if age.endswith("Y"))


def test_deidentification_method_recorded(ingested):
    table = instances_table(ingested.out).to_pandas()
    assert (table["PatientIdentityRemoved"] == "YES").all()
    codes = json.loads(table["DeidentificationMethodCodeSequence"].iloc[0])
    values = [item["00080100"]["Value"][0] for item in codes]
    assert values[:3] == ["113100", "113107", "113108"]


def test_one_schema_readable_everywhere(ingested):
    parts = sorted((ingested.out / "instances").glob("*.parquet"))
    schemas = {pq.read_schema(part).remove_metadata() for part in parts}
    assert len(schemas) == 1
    frame = pd.read_parquet(ingested.out / "instances")
    assert len(frame) == len(ingested.corpus.files)
    assert frame["StudyDate"].map(type).eq(dt.date).all()
    assert frame["PixelSpacing"].map(len).eq(2).all()
    con = duckdb.connect()
    count, modalities = con.execute(
        "select count(*), count(distinct Modality) from read_parquet(?)",
        [f"{ingested.out}/instances/*.parquet"],
    ).fetchone()
    assert count == len(ingested.corpus.files)
    assert modalities == 2


def test_volumes_sorted_by_geometry(ingested):
    table = instances_table(ingested.out).to_pandas()
    for series in ingested.corpus.series:
        new_series = ingested.pseudonyms.uid(series.series_instance_uid)
        volume = xr.open_zarr(
            ingested.out / "volumes.zarr",
            group=f"{new_series}/0",
            zarr_format=3,
            consolidated=False,
        )
        ordered_source = [
            uid
            for _, uid in sorted(
                zip(series.slice_indexes, series.sop_instance_uids, strict=True)
            )
        ]
        expected = [ingested.pseudonyms.uid(uid) for uid in ordered_source]
        assert list(volume.SOPInstanceUID.values) == expected
        assert np.all(np.diff(volume.z.values) > 0)
        assert volume.z.attrs["units"] == "mm"
        assert volume.pixels.shape[0] == len(series.files)
        rows = table[table["SeriesInstanceUID"] == new_series]
        assert set(rows["volume_path"]) == {f"{new_series}/0"}
        if series.modality == "CT":
            assert volume.pixels.dtype == np.int16
            assert int(volume.pixels.min()) < -900  # air, in HU
            assert volume.attrs["units"] == "HU"


def test_manifest_records_provenance(ingested):
    manifest = require_deidentified(ingested.out)
    assert manifest["source"]["url"] == ingested.server.url
    assert ingested.server.password not in json.dumps(manifest)
    assert manifest["counts"]["instances"] == len(ingested.corpus.files)
    assert manifest["counts"]["patients"] == len(ingested.corpus.patients)
    deid = manifest["deidentification"]
    assert deid["recipes"][0]["file"] == "basic-profile.dicom"
    assert len(deid["recipe_sha256"]) == 64
    assert manifest["software"]["pydicom"].startswith("3.")
    assert manifest["runs"][-1]["purpose"] == "end-to-end test"


def test_audit_records_every_instance(ingested):
    with open_audit_log() as audit:
        audit.verify()
        fetched = [
            record
            for record in audit.records(action="instance.fetch")
            if record.details.get("series") is not None
        ]
        queries = audit.records(action="orthanc.query")
    new_uids = {r.details["sop_instance_uid"] for r in fetched}
    table = instances_table(ingested.out)
    assert set(table.column("SOPInstanceUID").to_pylist()) <= new_uids
    assert queries[-1].purpose == "end-to-end test"
    assert queries[-1].details["matches"] == len(ingested.corpus.series)


def test_rerun_skips_finished_series(ingested):
    before = {
        part.name: part.stat().st_mtime_ns
        for part in (ingested.out / "instances").glob("*.parquet")
    }
    with orthanc_credentials(ingested.server):
        summary = run_ingest(
            IngestConfig(
                out=ingested.out,
                orthanc=ingested.server.url,
                purpose="end-to-end test, second run",
                progress=False,
            )
        )
    assert summary.series_skipped == summary.series_total
    assert summary.written == 0
    after = {
        part.name: part.stat().st_mtime_ns
        for part in (ingested.out / "instances").glob("*.parquet")
    }
    assert after == before


def test_query_selects_series(ingested, tmp_path):
    with orthanc_credentials(ingested.server):
        summary = run_ingest(
            IngestConfig(
                out=tmp_path / "mr-only",
                orthanc=ingested.server.url,
                query={"Modality": "MR"},
                purpose="query test",
                progress=False,
            )
        )
    mr_files = sum(len(s.files) for s in ingested.corpus.series if s.modality == "MR")
    assert summary.written == mr_files
    table = instances_table(tmp_path / "mr-only").to_pandas()
    assert set(table["Modality"]) == {"MR"}
    by_series: dict[str, int] = defaultdict(int)
    for uid in table["SeriesInstanceUID"]:
        by_series[uid] += 1
    assert len(by_series) == sum(
        1 for s in ingested.corpus.series if s.modality == "MR"
    )


def test_dataset_definition_file(ingested, tmp_path):
    definition = tmp_path / "ct.toml"
    definition.write_text(
        "[source]\n"
        f'orthanc = "{ingested.server.url}"\n'
        'query = { Modality = "CT" }\n'
        "[output]\n"
        'path = "ct"\n'
        "[run]\n"
        'purpose = "definition file test"\n'
    )
    from workbench.ingest import load_dataset_definition

    config = load_dataset_definition(definition)
    assert config.out == tmp_path / "ct"
    with orthanc_credentials(ingested.server):
        summary = run_ingest(config)
    ct_files = sum(len(s.files) for s in ingested.corpus.series if s.modality == "CT")
    assert summary.written == ct_files
    assert Path(tmp_path / "ct" / "manifest.json").exists()


def test_no_planted_value_with_clean_descriptors(ingested, tmp_path):
    out = tmp_path / "clean-descriptors"
    with orthanc_credentials(ingested.server), captured_logs() as logs:
        summary = run_ingest(
            IngestConfig(
                out=out,
                orthanc=ingested.server.url,
                purpose="clean descriptors test",
                clean_descriptors=True,
                progress=False,
            )
        )
    assert summary.written == len(ingested.corpus.files)
    places = written_texts(out)
    places["logs"] = logs.getvalue()
    assert find_planted(places, ingested.corpus.identifying_values()) == []
    table = instances_table(out).to_pandas()
    # Descriptions survive, cleaned, and the option is recorded.
    assert table["SeriesDescription"].notna().all()
    assert table["SeriesDescription"].str.contains("[removed]", regex=False).any()
    codes = json.loads(table["DeidentificationMethodCodeSequence"].iloc[0])
    assert "113105" in [item["00080100"]["Value"][0] for item in codes]
