"""Direct slice reads from the Zarr stacks give what zarr itself reads."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from ingest_helpers import ingest_folder
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.storage import LocalStore

from workbench.dataset.chunks import SliceReader
from workbench.dataset.reader import DatasetView
from workbench.samples import generate_studies


@pytest.fixture(scope="module")
def view(tmp_path_factory):
    root = tmp_path_factory.mktemp("chunks")
    corpus = generate_studies(
        root / "corpus",
        patients=2,
        studies_per_patient=1,
        ct_slices=5,
        mr_slices=3,
        rows=20,
        columns=24,
    )
    ingest_folder(corpus.root, root / "dataset")
    return DatasetView.open(root / "dataset")


def stack_array(folder, *, chunks, compressors, fill_value=0):
    store = LocalStore(folder)
    return zarr.create_array(
        store,
        name="pixels",
        shape=(3, 4, 5),
        chunks=chunks,
        dtype="int16",
        compressors=compressors,
        fill_value=fill_value,
        zarr_format=3,
    )


def test_dataset_stacks_read_directly_as_zarr_reads_them(view):
    paths = list(view.volumes().volume_path)
    assert len(paths) == 4
    for path in paths:
        array = view.pixel_array(path)
        reader = SliceReader(array)

        assert reader.direct
        np.testing.assert_array_equal(reader.volume(), np.asarray(array[...]))
        for index in range(array.shape[0]):
            np.testing.assert_array_equal(reader.slice(index), np.asarray(array[index]))


def test_direct_slice_is_writable_native_values(view):
    array = view.pixel_array(view.volumes().volume_path.iloc[0])

    pixels = SliceReader(array).slice(0)

    assert pixels.flags.writeable
    assert pixels.dtype == np.dtype(array.dtype)
    assert pixels.shape == tuple(array.shape[1:])


def test_missing_chunk_reads_as_fill_value(tmp_path):
    array = stack_array(
        tmp_path, chunks=(1, 4, 5), compressors=ZstdCodec(level=0), fill_value=-7
    )
    values = np.arange(60, dtype=np.int16).reshape(3, 4, 5) - 30
    array[0] = values[0]
    array[2] = values[2]
    reader = SliceReader(array)

    assert reader.direct
    assert not (tmp_path / "pixels" / "c" / "1").exists()
    np.testing.assert_array_equal(reader.slice(1), np.full((4, 5), -7, np.int16))
    np.testing.assert_array_equal(reader.slice(2), values[2])
    np.testing.assert_array_equal(reader.volume(), np.asarray(array[...]))


@pytest.mark.parametrize(
    ("chunks", "compressors"),
    [((1, 4, 5), BloscCodec()), ((2, 4, 5), ZstdCodec(level=0))],
    ids=["other-codec", "other-chunks"],
)
def test_other_layouts_read_through_zarr(tmp_path, chunks, compressors):
    array = stack_array(tmp_path, chunks=chunks, compressors=compressors)
    array[...] = np.arange(60, dtype=np.int16).reshape(3, 4, 5)
    reader = SliceReader(array)

    assert not reader.direct
    np.testing.assert_array_equal(reader.slice(1), np.asarray(array[1]))
    np.testing.assert_array_equal(reader.volume(), np.asarray(array[...]))


def test_slice_outside_stack_raises(view):
    array = view.pixel_array(view.volumes().volume_path.iloc[0])

    with pytest.raises(IndexError, match="outside a stack"):
        SliceReader(array).slice(array.shape[0])
