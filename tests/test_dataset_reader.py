"""DatasetView: opening checks, rows, stacks and volumes of a real ingested dataset."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from ingest_helpers import ingest_folder

from workbench.dataset.reader import DatasetView
from workbench.errors import DatasetError
from workbench.samples import generate_studies

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("reader")
    corpus = generate_studies(root / "corpus", patients=1, studies_per_patient=1)
    ingest_folder(corpus.root, root / "dataset")
    return root / "dataset", corpus


def test_rows_and_missing_columns(dataset):
    path, corpus = dataset
    view = DatasetView.open(path)
    table = view.instances(columns=["SOPInstanceUID", "NotAColumn"])
    assert table.num_rows == len(corpus.files)
    assert table.column("NotAColumn").null_count == table.num_rows
    assert len(view.version) == 16


def test_volumes_and_pixels(dataset):
    path, corpus = dataset
    view = DatasetView.open(path)
    stacks = view.volumes()
    assert sorted(stacks["Modality"]) == ["CT", "MR"]
    assert sorted(stacks["slices"]) == sorted(len(s.files) for s in corpus.series)
    first = stacks.iloc[0]
    volume = view.volume(first.volume_path)
    pixels = view.pixel_array(first.volume_path)
    assert pixels.shape == volume.pixels.shape
    np.testing.assert_array_equal(pixels[1], volume.pixels[1].values)


def test_view_pickles_without_open_store(dataset):
    path, _ = dataset
    view = DatasetView.open(path)
    view.pixel_array(view.volumes().volume_path[0])
    assert view._stores
    copy = pickle.loads(pickle.dumps(view))
    assert copy._stores == {}


def test_refuses_folder_not_marked_deidentified(dataset, tmp_path):
    path, _ = dataset
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["verified"] = False
    (tmp_path / "instances").mkdir()
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="de-identified and verified"):
        DatasetView.open(tmp_path)
    with pytest.raises(DatasetError, match="no manifest"):
        DatasetView.open(tmp_path / "instances")
