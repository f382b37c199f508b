"""Pixel volumes: geometry sort, stack splitting, rescale and the Zarr layout."""

from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
import zarr
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from workbench.dataset.volumes import (
    decode_instance,
    plan_stacks,
    write_series_volumes,
)
from workbench.errors import DicomReadError


def ct_slice(z: float, number: int, value: int, **extra: object) -> Dataset:
    """A 4x5 CT slice at height ``z`` whose stored pixels all equal ``value``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = f"2.25.{number}"
    ds.Modality = "CT"
    ds.InstanceNumber = number
    ds.Rows, ds.Columns = 4, 5
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = 1
    ds.RescaleIntercept = -1024
    ds.PixelSpacing = [0.5, 0.8]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [-10.0, -20.0, z]
    ds.PixelData = np.full((4, 5), value, dtype="<u2").tobytes()
    for keyword, item in extra.items():
        setattr(ds, keyword, item)
    return ds


def test_slices_sorted_by_position_not_instance_number():
    # Instance numbers run against the geometry.
    decoded = [
        decode_instance(ct_slice(z, number, 1000 + number))
        for z, number in [(5.0, 1), (0.0, 3), (2.5, 2)]
    ]
    [stack] = plan_stacks(decoded)
    order = [decoded[i].instance_number for i, _ in stack.members]
    assert order == [3, 2, 1]
    assert list(stack.z_mm) == [0.0, 2.5, 5.0]


def test_series_written_to_zarr_with_mm_coordinates(tmp_path):
    store = tmp_path / "volumes.zarr"
    zarr.open_group(store, mode="w", zarr_format=3)
    decoded = [
        decode_instance(ct_slice(z, number, 1000 + number))
        for z, number in [(5.0, 1), (0.0, 3), (2.5, 2)]
    ]
    stacks = plan_stacks(decoded)
    placement = write_series_volumes(
        decoded, stacks, store=store, series_uid="2.25.99", series_attributes={}
    )
    volume = xr.open_zarr(store, group="2.25.99/0", zarr_format=3, consolidated=False)
    assert volume.pixels.dims == ("z", "y", "x")
    assert volume.pixels.dtype == np.int16
    # Stored 1003 with intercept -1024 is -21 HU, at the lowest position.
    assert int(volume.pixels[0, 0, 0]) == 1003 - 1024
    assert list(volume.z.values) == [0.0, 2.5, 5.0]
    assert volume.y.values[1] == pytest.approx(0.5)
    assert volume.x.values[1] == pytest.approx(0.8)
    assert list(volume.SOPInstanceUID.values) == ["2.25.3", "2.25.2", "2.25.1"]
    assert volume.attrs["units"] == "HU"
    assert volume.pixels.encoding["chunks"] == (1, 4, 5)
    affine = np.asarray(volume.attrs["affine"])
    assert affine[:3, 3].tolist() == [-10.0, -20.0, 0.0]
    assert affine[2, 2] == pytest.approx(2.5)
    assert placement[(0, 0)] == ("2.25.99/0", 2)


def test_rewrite_replaces_series(tmp_path):
    store = tmp_path / "volumes.zarr"
    zarr.open_group(store, mode="w", zarr_format=3)
    first = [decode_instance(ct_slice(0.0, 1, 5))]
    write_series_volumes(
        first,
        plan_stacks(first),
        store=store,
        series_uid="2.25.7",
        series_attributes={},
    )
    second = [decode_instance(ct_slice(0.0, 1, 9))]
    write_series_volumes(
        second,
        plan_stacks(second),
        store=store,
        series_uid="2.25.7",
        series_attributes={},
    )
    volume = xr.open_zarr(store, group="2.25.7/0", zarr_format=3, consolidated=False)
    assert int(volume.pixels[0, 0, 0]) == 9 - 1024
    assert [p.name for p in store.iterdir() if p.name.startswith(".")] == []


def test_echoes_at_same_positions_split():
    decoded = []
    for echo in (1, 2):
        for number, z in enumerate((0.0, 1.0, 2.0)):
            decoded.append(
                decode_instance(ct_slice(z, echo * 10 + number, 1, EchoNumbers=echo))
            )
    stacks = plan_stacks(decoded)
    assert len(stacks) == 2
    assert all(len(stack.members) == 3 for stack in stacks)
    assert "echo" in stacks[0].reason


def test_repeated_positions_without_key_become_layers():
    decoded = [
        decode_instance(ct_slice(z, number, 1))
        for number, z in enumerate((0.0, 1.0, 0.0, 1.0))
    ]
    stacks = plan_stacks(decoded)
    assert [len(stack.members) for stack in stacks] == [2, 2]


def test_other_orientation_and_size_split():
    axial = [decode_instance(ct_slice(z, n, 1)) for n, z in enumerate((0.0, 1.0))]
    coronal = decode_instance(
        ct_slice(0.0, 7, 1, ImageOrientationPatient=[1, 0, 0, 0, 0, -1])
    )
    stacks = plan_stacks([*axial, coronal])
    assert sorted(len(stack.members) for stack in stacks) == [1, 2]


def test_image_without_geometry_kept_alone():
    ds = ct_slice(0.0, 1, 1)
    del ds.ImagePositionPatient
    del ds.ImageOrientationPatient
    stacks = plan_stacks([decode_instance(ds)])
    assert len(stacks) == 1
    assert stacks[0].z_mm is None


def test_non_integer_rescale_gives_float():
    decoded = [decode_instance(ct_slice(0.0, 1, 10, RescaleSlope=0.5))]
    from workbench.dataset.volumes import _stack_dataset

    volume = _stack_dataset(decoded, plan_stacks(decoded)[0])
    assert volume.pixels.dtype == np.float32
    assert float(volume.pixels[0, 0, 0]) == pytest.approx(10 * 0.5 - 1024)


def test_enhanced_multiframe_sorted_by_frame_position():
    ds = ct_slice(0.0, 1, 0)
    del ds.ImagePositionPatient
    ds.NumberOfFrames = 3
    frames = np.stack([np.full((4, 5), v, dtype="<u2") for v in (30, 10, 20)])
    ds.PixelData = frames.tobytes()
    shared = Dataset()
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PlaneOrientationSequence = Sequence([orientation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for z in (3.0, 1.0, 2.0):
        item = Dataset()
        position = Dataset()
        position.ImagePositionPatient = [0, 0, z]
        item.PlanePositionSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    decoded = [decode_instance(ds)]
    [stack] = plan_stacks(decoded)
    assert [frame for _, frame in stack.members] == [1, 2, 0]
    assert list(stack.z_mm) == [1.0, 2.0, 3.0]


def test_image_without_pixel_data_rejected():
    ds = ct_slice(0.0, 1, 1)
    del ds.PixelData
    with pytest.raises(DicomReadError) as error:
        decode_instance(ds)
    assert error.value.reason == "missing-pixels"


def test_non_image_has_no_volume():
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.Modality = "SR"
    assert decode_instance(ds) is None
