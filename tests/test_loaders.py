"""MONAI loader: items, pixels, affines, labels, workers and caches on a real dataset.

The dataset is a real ingest of two synthetic patients (an axial CT and a sagittal
MR series each). Images are 20 rows by 24 columns, so a swap of the x and y axes
changes the shape and cannot pass unnoticed.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from ingest_helpers import ingest_folder
from monai.data import CacheDataset, DataLoader, MetaTensor, PersistentDataset
from monai.transforms import LoadImage, MapTransform, ScaleIntensityRanged

from workbench.audit import open_audit_log
from workbench.dataset.reader import DatasetView
from workbench.errors import ConfigurationError, DatasetError
from workbench.loaders import monai_dataset
from workbench.loaders.monai import transform_error_cause
from workbench.samples import generate_studies
from workbench.samples.images import ct_geometry

ROWS, COLUMNS, CT_SLICES, MR_SLICES = 20, 24, 6, 4
RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
PURPOSE = "loader tests"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("loaders")
    corpus = generate_studies(
        root / "corpus",
        patients=2,
        studies_per_patient=1,
        ct_slices=CT_SLICES,
        mr_slices=MR_SLICES,
        rows=ROWS,
        columns=COLUMNS,
    )
    ingest_folder(corpus.root, root / "dataset")
    return root / "dataset", corpus


def zarr_stack(path, volume_path):
    return np.asarray(DatasetView.open(path).pixel_array(volume_path)[...])


def item_matching(ds, pixels):
    """Return the item whose image equals ``pixels`` (x, y, z), or fail."""
    for index in range(len(ds)):
        item = ds[index]
        if item["image"].shape[1:] == pixels.shape and np.array_equal(
            item["image"][0].numpy(), pixels
        ):
            return item
    raise AssertionError("no item contains these pixels")


class RecordReaderProcess(MapTransform):
    """Add the reading process id and the processes that opened the Zarr store."""

    def __init__(self, view):
        super().__init__(keys="image")
        self.view = view

    def __call__(self, data):
        item = dict(data)
        item["pid"] = os.getpid()
        item["store_pids"] = ",".join(str(pid) for pid in sorted(self.view._stores))
        return item


# Items, pixels and affines


def test_volume_items_values_and_affine(dataset):
    path, _ = dataset
    ds = monai_dataset(
        path,
        purpose=PURPOSE,
        level="volume",
        where={"Modality": "CT"},
        columns=("Modality", "StudyDate", "SeriesNumber"),
    )
    assert len(ds) == 2
    item = ds[0]
    image = item["image"]
    assert isinstance(image, MetaTensor)
    assert image.shape == (1, COLUMNS, ROWS, CT_SLICES)
    assert image.dtype == torch.float32

    stack = zarr_stack(path, ds.data[0]["image"])
    assert stack.shape == (CT_SLICES, ROWS, COLUMNS)
    np.testing.assert_array_equal(image[0].numpy(), stack.transpose(2, 1, 0))

    geometry = ct_geometry(ROWS, COLUMNS, CT_SLICES)
    spacing = geometry.row_spacing
    expected_lps = np.array(
        [
            [spacing, 0, 0, geometry.first_position[0]],
            [0, spacing, 0, geometry.first_position[1]],
            [0, 0, geometry.spacing_between_slices, geometry.first_position[2]],
            [0, 0, 0, 1],
        ]
    )
    np.testing.assert_allclose(image.affine.numpy(), RAS @ expected_lps)
    assert image.meta["space"] == "RAS"
    assert image.meta["spatial_shape"] == (COLUMNS, ROWS, CT_SLICES)

    assert item["Modality"] == "CT"
    assert item["SeriesNumber"] == 1
    assert len(item["StudyDate"]) == 10
    uids = DatasetView.open(path).instances(columns=["SeriesInstanceUID"])
    assert item["SeriesInstanceUID"] in set(uids.column(0).to_pylist())


def test_lps_space_keeps_dicom_coordinates(dataset):
    path, _ = dataset
    ras = monai_dataset(path, purpose=PURPOSE, where={"Modality": "CT"})[0]
    lps = monai_dataset(path, purpose=PURPOSE, where={"Modality": "CT"}, space="LPS")[0]
    np.testing.assert_allclose(
        lps["image"].affine.numpy(), RAS @ ras["image"].affine.numpy()
    )
    assert lps["image"].meta["space"] == "LPS"


def test_slice_items_pixels_and_affine(dataset):
    path, _ = dataset
    ds = monai_dataset(path, purpose=PURPOSE, level="slice", where={"Modality": "CT"})
    assert len(ds) == 2 * CT_SLICES
    reference = ds.data[3]
    item = ds[3]
    image = item["image"]
    assert image.shape == (1, COLUMNS, ROWS)
    stack = zarr_stack(path, reference["image"])
    np.testing.assert_array_equal(image[0].numpy(), stack[reference["volume_index"]].T)

    view = DatasetView.open(path)
    row = view.instances(
        columns=["SOPInstanceUID", "ImagePositionPatient"],
    ).to_pandas()
    position = row.set_index("SOPInstanceUID").loc[item["SOPInstanceUID"]]
    origin = np.asarray(position["ImagePositionPatient"]) * [-1, -1, 1]
    np.testing.assert_allclose(image.affine.numpy()[:3, 3], origin)
    volume = monai_dataset(path, purpose=PURPOSE, where={"Modality": "CT"})
    volume_affine = next(
        volume[i]["image"].affine.numpy()
        for i in range(len(volume))
        if volume.data[i]["image"] == reference["image"]
    )
    np.testing.assert_allclose(image.affine.numpy()[:3, :3], volume_affine[:3, :3])


def test_slice_item_reads_one_chunk(dataset, monkeypatch):
    import pathlib

    path, _ = dataset
    ds = monai_dataset(path, purpose=PURPOSE, level="slice", where={"Modality": "CT"})
    requested = []
    original_read_bytes = pathlib.Path.read_bytes

    def recording_read_bytes(self):
        requested.append(str(self))
        return original_read_bytes(self)

    # The loader reads a slice's chunk file directly (workbench.dataset.chunks).
    monkeypatch.setattr(pathlib.Path, "read_bytes", recording_read_bytes)
    ds[4]
    chunks = [key for key in requested if "/pixels/c/" in key]
    assert len(chunks) == 1
    assert chunks[0].endswith(f"/pixels/c/{ds.data[4]['volume_index']}/0/0")


def test_ct_matches_monai_pydicom_reader(dataset):
    path, corpus = dataset
    ds = monai_dataset(path, purpose=PURPOSE, where={"Modality": "CT"})
    folder = corpus.series[0].files[0].parent
    assert corpus.series[0].modality == "CT"
    reference = LoadImage(reader="PydicomReader", image_only=True)(str(folder))
    item = item_matching(ds, reference.numpy())
    np.testing.assert_allclose(item["image"].affine.numpy(), reference.affine.numpy())


def test_mr_slices_in_geometric_order(dataset):
    # The synthetic MR numbers its instances in interleaved order. MONAI's
    # PydicomReader stacks by InstanceNumber; the Zarr stack follows the geometry.
    path, corpus = dataset
    series = corpus.series[1]
    assert series.modality == "MR"
    expected = np.stack(
        [pydicom.dcmread(f).pixel_array for f in series.files_in_slice_order]
    )
    ds = monai_dataset(path, purpose=PURPOSE, where={"Modality": "MR"})
    item = item_matching(ds, expected.transpose(2, 1, 0).astype(np.float32))

    reference = LoadImage(reader="PydicomReader", image_only=True)(
        str(series.files[0].parent)
    )
    np.testing.assert_allclose(item["image"].affine.numpy(), reference.affine.numpy())
    assert not np.array_equal(item["image"][0].numpy(), reference.numpy())
    first = series.geometry.position(0)
    np.testing.assert_allclose(
        item["image"].affine.numpy()[:3, 3], np.asarray(first) * [-1, -1, 1]
    )


def test_slice_affine_matches_pydicom_reader_file(dataset):
    path, corpus = dataset
    series = corpus.series[0]
    ds = monai_dataset(path, purpose=PURPOSE, level="slice", where={"Modality": "CT"})
    file = series.files_in_slice_order[2]
    reference = LoadImage(reader="PydicomReader", image_only=True)(str(file))
    item = item_matching(ds, reference.numpy())
    ours, theirs = item["image"].affine.numpy(), reference.affine.numpy()
    np.testing.assert_allclose(ours[:, [0, 1, 3]], theirs[:, [0, 1, 3]])
    # The third column is the slice normal scaled by the slice spacing (5 mm);
    # PydicomReader gives a single file a unit normal.
    np.testing.assert_allclose(ours[:3, 2], [0, 0, series.geometry.slice_thickness])


# Labels


def test_label_from_parquet_column(dataset):
    path, _ = dataset
    ds = monai_dataset(path, purpose=PURPOSE, label_column="Modality")
    assert sorted(item["label"] for item in ds.data) == ["CT", "CT", "MR", "MR"]
    assert ds[0]["label"] == ds.data[0]["label"]


def test_labels_table_joins_on_sop_uid(dataset):
    path, _ = dataset
    view = DatasetView.open(path)
    rows = view.instances(columns=["SOPInstanceUID", "Modality"]).to_pandas()
    rows = rows[rows["Modality"] == "CT"].reset_index(drop=True)
    table = pd.DataFrame(
        {"SOPInstanceUID": rows["SOPInstanceUID"], "score": np.arange(len(rows))}
    )
    ds = monai_dataset(
        path, purpose=PURPOSE, level="slice", labels=table, label_column="score"
    )
    assert len(ds) == len(rows)
    expected = dict(zip(table["SOPInstanceUID"], table["score"], strict=True))
    for item in ds.data:
        assert item["label"] == expected[item["SOPInstanceUID"]]
        assert isinstance(item["label"], int)


def test_labels_csv_on_series_for_slices(dataset, tmp_path):
    path, _ = dataset
    stacks = DatasetView.open(path).volumes()
    table = pd.DataFrame(
        {
            "SeriesInstanceUID": stacks["SeriesInstanceUID"],
            "is_ct": stacks["Modality"] == "CT",
        }
    )
    csv_path = tmp_path / "labels.csv"
    table.to_csv(csv_path, index=False)
    ds = monai_dataset(
        path, purpose=PURPOSE, level="slice", labels=csv_path, label_column="is_ct"
    )
    assert len(ds) == 2 * (CT_SLICES + MR_SLICES)
    assert sum(item["label"] is True for item in ds.data) == 2 * CT_SLICES


def test_label_errors(dataset):
    path, _ = dataset
    series = DatasetView.open(path).volumes()["SeriesInstanceUID"]
    with pytest.raises(ConfigurationError, match="'NoSuchColumn' is missing or empty"):
        monai_dataset(path, purpose=PURPOSE, label_column="NoSuchColumn")
    table = pd.DataFrame({"SeriesInstanceUID": series, "grade": 1})
    with pytest.raises(ConfigurationError, match="label column 'stage' not found"):
        monai_dataset(path, purpose=PURPOSE, labels=table, label_column="stage")
    with pytest.raises(ConfigurationError, match="has no SeriesInstanceUID column"):
        monai_dataset(
            path,
            purpose=PURPOSE,
            labels=pd.DataFrame({"uid": series, "grade": 1}),
            label_column="grade",
        )
    unrelated = pd.DataFrame({"SeriesInstanceUID": ["1.2.3", "1.2.4"], "grade": 1})
    with pytest.raises(DatasetError, match="labels table does not join"):
        monai_dataset(path, purpose=PURPOSE, labels=unrelated, label_column="grade")
    repeated = pd.DataFrame({"SeriesInstanceUID": [series[0], series[0]], "grade": 1})
    with pytest.raises(ConfigurationError, match="repeated SeriesInstanceUID"):
        monai_dataset(path, purpose=PURPOSE, labels=repeated, label_column="grade")


def test_argument_errors(dataset):
    path, _ = dataset
    with pytest.raises(ConfigurationError, match="purpose is required"):
        monai_dataset(path, purpose=" ")
    with pytest.raises(ConfigurationError, match="level 'series'"):
        monai_dataset(path, purpose=PURPOSE, level="series")
    with pytest.raises(ConfigurationError, match="cache 'disk'"):
        monai_dataset(path, purpose=PURPOSE, cache="disk")
    with pytest.raises(ConfigurationError, match="cannot be applied"):
        monai_dataset(path, purpose=PURPOSE, where={"NoSuchColumn": 1})
    with pytest.raises(DatasetError, match="no volume items"):
        monai_dataset(path, purpose=PURPOSE, where={"Modality": "PT"})


def test_mask_takes_image_geometry(dataset, tmp_path):
    path, _ = dataset
    stacks = DatasetView.open(path).volumes()
    ct = stacks[stacks["Modality"] == "CT"].reset_index(drop=True)
    masks = []
    for number, volume_path in enumerate(ct["volume_path"]):
        mask = (zarr_stack(path, volume_path) > 300).astype(np.uint8)
        np.save(tmp_path / f"mask{number}.npy", mask)
        masks.append(f"mask{number}.npy")
    table = pd.DataFrame({"SeriesInstanceUID": ct["SeriesInstanceUID"], "mask": masks})
    table.to_csv(tmp_path / "masks.csv", index=False)
    for level in ("volume", "slice"):
        ds = monai_dataset(
            path,
            purpose=PURPOSE,
            level=level,
            labels=tmp_path / "masks.csv",
            mask_column="mask",
        )
        item = ds[1]
        assert item["mask"].shape == item["image"].shape
        np.testing.assert_array_equal(
            item["mask"].numpy(), (item["image"].numpy() > 300).astype(np.float32)
        )
        np.testing.assert_allclose(item["mask"].affine, item["image"].affine)

    np.save(tmp_path / "mask0.npy", np.zeros((2, ROWS, COLUMNS), np.uint8))
    ds = monai_dataset(
        path, purpose=PURPOSE, labels=tmp_path / "masks.csv", mask_column="mask"
    )
    index = next(i for i, item in enumerate(ds.data) if item["mask"].endswith("0.npy"))
    # MONAI wraps errors of transforms in RuntimeError.
    with pytest.raises(RuntimeError) as caught:
        ds[index]
    cause = transform_error_cause(caught.value)
    assert isinstance(cause, ConfigurationError)
    assert "masks must have the stack's shape" in str(cause)


# Workers and caches


@pytest.mark.slow
@pytest.mark.parametrize("start_method", ["fork", "spawn"])
def test_dataloader_two_workers(dataset, start_method):
    path, _ = dataset
    view = DatasetView.open(path)
    ds = monai_dataset(
        view,
        purpose=PURPOSE,
        level="slice",
        transforms=[RecordReaderProcess(view)],
    )
    expected = {item["SOPInstanceUID"]: item["image"] for item in ds}
    assert view._stores, "the parent read first, so it holds an open store"
    loader = DataLoader(
        ds, batch_size=4, num_workers=2, multiprocessing_context=start_method
    )
    seen = 0
    for batch in loader:
        for position, uid in enumerate(batch["SOPInstanceUID"]):
            np.testing.assert_array_equal(batch["image"][position], expected[uid])
            pid = int(batch["pid"][position])
            assert pid != os.getpid()
            assert batch["store_pids"][position] == str(pid)
            seen += 1
    assert seen == len(ds)


def test_cache_dataset_equals_plain_reads(dataset):
    path, _ = dataset
    plain = monai_dataset(path, purpose=PURPOSE, level="slice")
    cached = monai_dataset(path, purpose=PURPOSE, level="slice", cache="memory")
    assert isinstance(cached, CacheDataset)
    for index in (0, len(plain) - 1):
        assert isinstance(cached[index]["image"], MetaTensor)
        np.testing.assert_array_equal(cached[index]["image"], plain[index]["image"])
        np.testing.assert_allclose(
            cached[index]["image"].affine, plain[index]["image"].affine
        )


def test_persistent_cache_keys_and_hits(dataset, tmp_path):
    path, _ = dataset
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    cache_dir = tmp_path / "cache"

    def scaled(maximum, root=copy):
        return monai_dataset(
            root,
            purpose=PURPOSE,
            level="slice",
            transforms=[ScaleIntensityRanged("image", -1000, maximum, 0.0, 1.0)],
            cache="persistent",
            cache_dir=cache_dir,
        )

    first = scaled(1000)
    assert isinstance(first, PersistentDataset)
    fresh = first[0]
    # Plain string keys load under weights_only in every process (enum keys may not).
    assert all(type(key) is str for key in fresh["image"].meta)
    assert len(list(first.cache_dir.glob("*.pt"))) == 1
    again = scaled(1000)
    assert again.cache_dir == first.cache_dir
    cached = again[0]
    assert type(cached["image"]) is type(fresh["image"]) is MetaTensor
    np.testing.assert_array_equal(cached["image"], fresh["image"])
    np.testing.assert_allclose(cached["image"].affine, fresh["image"].affine)
    assert cached["image"].meta["volume_path"] == fresh["image"].meta["volume_path"]
    assert cached["SOPInstanceUID"] == fresh["SOPInstanceUID"]

    # Another transform argument: another folder, freshly computed values.
    other = scaled(2000)
    assert other.cache_dir != first.cache_dir
    assert not torch.equal(other[0]["image"], fresh["image"])

    # A cache hit is served from disk: without the pixels only item 0 reads.
    shutil.rmtree(copy / "volumes.zarr")
    np.testing.assert_array_equal(scaled(1000)[0]["image"], fresh["image"])
    with pytest.raises(RuntimeError) as caught:
        scaled(1000)[1]
    assert isinstance(transform_error_cause(caught.value), DatasetError)

    # Another dataset version: another folder.
    manifest_path = copy / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["dataset_version"] = "0123456789abcdef"
    manifest_path.write_text(json.dumps(manifest))
    changed = scaled(1000)
    assert changed.cache_dir != first.cache_dir
    assert changed.cache_dir.parent.name == "copy-0123456789abcdef"


def test_cache_key_same_in_other_process(dataset, monkeypatch):
    from workbench.loaders.monai import build_transform, persistent_cache_folder

    path, _ = dataset
    view = DatasetView.open(path)
    here = persistent_cache_folder(view, build_transform(view, "slice", []), "slice")
    view.pixel_array(view.volumes()["volume_path"][0])
    monkeypatch.setattr(os, "getpid", lambda: 1)
    other = DatasetView.open(path)
    transform = build_transform(other, "slice", [])
    transform(monai_dataset(other, purpose=PURPOSE, level="slice").data[0])
    assert persistent_cache_folder(other, transform, "slice") == here


def test_read_is_audited(dataset):
    path, _ = dataset
    monai_dataset(path, purpose="audit check of loader", level="slice")
    with open_audit_log() as audit:
        records = audit.records(action="dataset.read")
    record = records[-1]
    assert record.purpose == "audit check of loader"
    assert record.resource == f"dataset:{path.name}"
    assert record.details["level"] == "slice"
    assert record.details["items"] == 2 * (CT_SLICES + MR_SLICES)
