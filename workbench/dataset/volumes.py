"""Pixel volumes: decode instances, stack them by patient geometry, write Zarr.

Each series becomes one Zarr group named by its (new) SeriesInstanceUID, holding one
or more *stacks*: ``<SeriesInstanceUID>/0``, ``/1``, ... Each stack is an xarray
dataset with a ``pixels`` variable of dims ``(z, y, x)`` (``channel`` last for colour)
and coordinates in millimetres:

- ``z``: position of each slice along the slice normal (the cross product of the
  row and column direction cosines), so slices sort by patient geometry and never
  by InstanceNumber;
- ``y`` and ``x``: row and column centres from PixelSpacing, from 0 at the first
  pixel;
- ``SOPInstanceUID`` and ``frame`` along ``z``: which instance and frame each slice
  is, the link to the Parquet rows (whose ``volume_path`` and ``volume_index``
  point back here); ``ImagePositionPatient`` along ``z``.

Attributes hold the orientation, spacing, a 4x4 ``affine`` from (x, y, z) voxel
indices to patient coordinates (LPS, mm), and how pixel values were rescaled:
RescaleSlope and RescaleIntercept are always applied, to ``int16`` when every
slice's slope is 1 with an integer intercept and the values fit, else to
``float32``.

Slices that do not stack (other size, orientation, spacing or photometric
interpretation; several echoes or time points at one position; images without
geometry) go to separate stacks, never dropped. A multi-frame instance is one
stack, its frames sorted by their positions when the functional groups give them.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import uuid
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset

from workbench.errors import DicomReadError

__all__ = [
    "DecodedInstance",
    "Stack",
    "decode_instance",
    "plan_stacks",
    "replace_directory",
    "write_series_volumes",
]

log = logging.getLogger(__name__)

POSITION_TOLERANCE_MM = 0.01
NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})
MONOCHROME = frozenset({"MONOCHROME1", "MONOCHROME2"})
ORIENTATION_DECIMALS = 4
SPACING_DECIMALS = 4


@dataclass
class DecodedInstance:
    """The pixels and geometry of one instance, ready to stack.

    ``pixels`` has shape ``(frames, rows, columns)`` or
    ``(frames, rows, columns, samples)`` and holds stored values; ``slopes`` and
    ``intercepts`` give each frame's rescale.
    """

    sop_instance_uid: str
    instance_number: int | None
    pixels: np.ndarray
    slopes: np.ndarray
    intercepts: np.ndarray
    orientation: tuple[float, ...] | None
    positions: np.ndarray | None
    spacing: tuple[float, float] | None
    photometric: str
    modality: str
    split_key: tuple[Any, ...] = ()
    multi_frame: bool = False
    rescale_type: str = ""

    @property
    def frame_count(self) -> int:
        """Number of frames."""
        return int(self.pixels.shape[0])

    @property
    def normal(self) -> np.ndarray | None:
        """Slice normal from the orientation, or None without geometry."""
        if self.orientation is None:
            return None
        row = np.asarray(self.orientation[:3])
        column = np.asarray(self.orientation[3:])
        return np.cross(row, column)


@dataclass
class Stack:
    """Slices that form one volume: ``(instance index, frame index)`` in z order."""

    members: list[tuple[int, int]]
    reason: str
    z_mm: np.ndarray | None = None
    attributes: dict[str, Any] = field(default_factory=dict)


def decode_instance(ds: Dataset) -> DecodedInstance | None:
    """Decode the pixels and geometry of a de-identified instance.

    Returns None for an instance without pixel data that is not an image (a
    structured report, a presentation state).

    Raises
    ------
    DicomReadError
        ``missing-pixels`` for an image without pixel data, ``pixel-decode`` when
        the pixel data cannot be decoded (an unsupported transfer syntax, corrupt
        compressed data).
    """
    if "PixelData" not in ds and "FloatPixelData" not in ds:
        if "Rows" in ds and "Columns" in ds:
            raise DicomReadError(
                "image has Rows and Columns but no pixel data", reason="missing-pixels"
            )
        return None

    syntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if ds.file_meta else ""
    try:
        array = _native_pixels(ds, syntax)
        if array is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                array = ds.pixel_array
    except Exception as exc:
        raise DicomReadError(
            f"pixel data could not be decoded (transfer syntax {syntax or 'unknown'},"
            f" {type(exc).__name__})",
            reason="pixel-decode",
        ) from exc
    if array.dtype.byteorder == ">" or (
        array.dtype.byteorder == "=" and not np.little_endian
    ):
        array = array.astype(array.dtype.newbyteorder("<"))

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    expected_dims = 3 if samples > 1 else 2
    if array.ndim == expected_dims:
        array = array[np.newaxis]
    frames = array.shape[0]

    shared = _first_item(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    orientation = _orientation(ds, shared, per_frame)
    positions = _positions(ds, shared, per_frame, frames, orientation)
    spacing = _spacing(ds, shared)
    slopes, intercepts = _rescale(ds, shared, per_frame, frames)

    number = ds.get("InstanceNumber")
    try:
        instance_number = int(number) if number not in (None, "") else None
    except (TypeError, ValueError):
        instance_number = None
    return DecodedInstance(
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        instance_number=instance_number,
        pixels=array,
        slopes=slopes,
        intercepts=intercepts,
        orientation=orientation,
        positions=positions,
        spacing=spacing,
        photometric=str(ds.get("PhotometricInterpretation", "")),
        modality=str(ds.get("Modality", "")),
        split_key=_split_key(ds),
        multi_frame=frames > 1 or "PerFrameFunctionalGroupsSequence" in ds,
        rescale_type=str(ds.get("RescaleType", "") or ""),
    )


def plan_stacks(instances: Sequence[DecodedInstance]) -> list[Stack]:
    """Group decoded instances into stacks, each sorted along its slice normal."""
    stacks: list[Stack] = []
    groups: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for index, instance in enumerate(instances):
        if instance.multi_frame:
            stacks.extend(_multi_frame_stacks(index, instance))
        elif instance.orientation is None or instance.positions is None:
            stacks.append(
                Stack(members=[(index, 0)], reason="image without patient geometry")
            )
        else:
            groups[_stack_key(instance)].append(index)

    for key in sorted(groups, key=repr):
        stacks.extend(_single_frame_stacks(instances, groups[key]))
    return stacks


def write_series_volumes(
    instances: Sequence[DecodedInstance],
    stacks: Sequence[Stack],
    *,
    store: Path,
    series_uid: str,
    series_attributes: dict[str, Any],
    check_attributes: Callable[[dict[str, Any]], None] | None = None,
) -> dict[tuple[int, int], tuple[str, int]]:
    """Write a series' stacks to ``store/<series_uid>``, replacing any earlier copy.

    The group is written in a temporary folder inside the store and renamed into
    place, so a reader never sees a half-written series.

    ``check_attributes`` is called with the attributes of the series group and of
    each stack before they are written, and may raise to stop the write.

    Returns
    -------
    dict
        ``(instance index, frame index)`` to ``(volume path, index along z)``.
    """
    import zarr

    staging = store / f".staging-{uuid.uuid4().hex}"
    placement: dict[tuple[int, int], tuple[str, int]] = {}
    try:
        attributes = {
            **series_attributes,
            "stacks": [
                {"path": f"{series_uid}/{i}", "reason": stack.reason}
                for i, stack in enumerate(stacks)
            ],
        }
        if check_attributes is not None:
            check_attributes(attributes)
        group = zarr.open_group(staging, mode="w", zarr_format=3)
        group.attrs.update(attributes)
        for stack_index, stack in enumerate(stacks):
            dataset = _stack_dataset(instances, stack)
            if check_attributes is not None:
                check_attributes(dict(dataset.attrs))
            chunks = (1, *dataset["pixels"].shape[1:])
            dataset.to_zarr(
                staging,
                group=str(stack_index),
                mode="w",
                zarr_format=3,
                consolidated=False,
                encoding={"pixels": {"chunks": chunks}},
            )
            for z_index, member in enumerate(stack.members):
                placement[member] = (f"{series_uid}/{stack_index}", z_index)
        replace_directory(staging, store / series_uid)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return placement


def replace_directory(source: Path, target: Path) -> None:
    """Move the folder ``source`` to ``target``, replacing what was there.

    The old folder is first renamed aside, so ``target`` is always either the old
    or the new complete folder; the old one is deleted afterwards.
    """
    aside = None
    if target.exists():
        aside = target.with_name(f".replaced-{uuid.uuid4().hex}")
        os.rename(target, aside)
    os.rename(source, target)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def _native_pixels(ds: Dataset, syntax: str) -> np.ndarray | None:
    """Read plain little-endian greyscale pixels with NumPy, or return None.

    Most CT and MR instances are stored this way, and reading them directly is
    several times cheaper than pydicom's general decoder, which handles every
    other case.
    """
    if syntax not in NATIVE_SYNTAXES or "PixelData" not in ds:
        return None
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        allocated, stored = int(ds.BitsAllocated), int(ds.BitsStored)
        signed = int(ds.PixelRepresentation) == 1
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if samples != 1 or allocated not in (8, 16, 32) or photometric not in MONOCHROME:
        return None
    data = ds.PixelData
    dtype = np.dtype(f"<{'i' if signed else 'u'}{allocated // 8}")
    if len(data) < rows * columns * frames * dtype.itemsize:
        return None
    array = np.frombuffer(data, dtype=dtype, count=rows * columns * frames)
    array = array.reshape(frames, rows, columns)
    if stored < allocated:
        shift = allocated - stored
        if signed:
            # Move the sign bit of the stored value to the top, then back.
            array = (array << shift) >> shift
        else:
            array = array & np.array((1 << stored) - 1, dtype=dtype)
    return np.array(array, copy=True) if not array.flags.writeable else array


# Geometry


def _first_item(ds: Dataset, keyword: str) -> Dataset | None:
    sequence = ds.get(keyword)
    return sequence[0] if sequence else None


def _macro(item: Dataset | None, keyword: str) -> Dataset | None:
    if item is None:
        return None
    return _first_item(item, keyword)


def _floats(value: Any, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        return None
    return numbers


def _orientation(
    ds: Dataset, shared: Dataset | None, per_frame: Sequence[Dataset]
) -> tuple[float, ...] | None:
    candidates = [
        _macro(shared, "PlaneOrientationSequence"),
        _macro(per_frame[0], "PlaneOrientationSequence") if per_frame else None,
        ds,
    ]
    for item in candidates:
        if item is not None and "ImageOrientationPatient" in item:
            orientation = _floats(item.ImageOrientationPatient, 6)
            if orientation is not None:
                return orientation
    return None


def _positions(
    ds: Dataset,
    shared: Dataset | None,
    per_frame: Sequence[Dataset],
    frames: int,
    orientation: tuple[float, ...] | None,
) -> np.ndarray | None:
    if per_frame and len(per_frame) == frames:
        positions = []
        for item in per_frame:
            plane = _macro(item, "PlanePositionSequence")
            position = (
                _floats(plane.ImagePositionPatient, 3)
                if plane is not None and "ImagePositionPatient" in plane
                else None
            )
            if position is None:
                return None
            positions.append(position)
        return np.asarray(positions)
    first = _floats(ds.get("ImagePositionPatient"), 3)
    if first is None:
        return None
    if frames == 1:
        return np.asarray([first])
    offsets = ds.get("GridFrameOffsetVector")
    if orientation is not None and offsets is not None and len(offsets) == frames:
        normal = np.cross(orientation[:3], orientation[3:])
        return np.asarray(first) + np.outer(np.asarray(offsets, float), normal)
    return None


def _spacing(ds: Dataset, shared: Dataset | None) -> tuple[float, float] | None:
    measures = _macro(shared, "PixelMeasuresSequence")
    for item in (measures, ds):
        if item is not None and "PixelSpacing" in item:
            spacing = _floats(item.PixelSpacing, 2)
            if spacing is not None and spacing[0] > 0 and spacing[1] > 0:
                return (spacing[0], spacing[1])
    return None


def _rescale(
    ds: Dataset, shared: Dataset | None, per_frame: Sequence[Dataset], frames: int
) -> tuple[np.ndarray, np.ndarray]:
    slopes = np.ones(frames)
    intercepts = np.zeros(frames)
    shared_transform = _macro(shared, "PixelValueTransformationSequence")
    for index in range(frames):
        item = None
        if per_frame and index < len(per_frame):
            item = _macro(per_frame[index], "PixelValueTransformationSequence")
        item = item or shared_transform or ds
        slopes[index] = _number(item.get("RescaleSlope"), 1.0)
        intercepts[index] = _number(item.get("RescaleIntercept"), 0.0)
    return slopes, intercepts


def _number(value: Any, default: float) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


def _split_key(ds: Dataset) -> tuple[Any, ...]:
    """Attributes that tell apart images at the same position in one series."""
    keys = []
    for keyword in (
        "EchoNumbers",
        "TemporalPositionIdentifier",
        "TriggerTime",
        "DiffusionBValue",
        "AcquisitionNumber",
    ):
        value = ds.get(keyword)
        keys.append("" if value is None else str(value))
    return tuple(keys)


def _stack_key(instance: DecodedInstance) -> tuple[Any, ...]:
    shape = instance.pixels.shape[1:]
    orientation = tuple(
        round(v, ORIENTATION_DECIMALS) for v in instance.orientation or ()
    )
    spacing = tuple(round(v, SPACING_DECIMALS) for v in instance.spacing or ())
    return (
        shape,
        orientation,
        spacing,
        instance.photometric,
        str(instance.pixels.dtype),
    )


def _multi_frame_stacks(index: int, instance: DecodedInstance) -> list[Stack]:
    frames = list(range(instance.frame_count))
    normal = instance.normal
    if instance.positions is None or normal is None:
        return [
            Stack(
                members=[(index, frame) for frame in frames],
                reason="multi-frame image, frames in stored order",
            )
        ]
    distances = instance.positions @ normal
    order = sorted(frames, key=lambda frame: (distances[frame], frame))
    return [
        Stack(
            members=[(index, frame) for frame in order],
            reason="multi-frame image, frames sorted along the slice normal",
            z_mm=distances[order],
        )
    ]


def _single_frame_stacks(
    instances: Sequence[DecodedInstance], indices: list[int]
) -> list[Stack]:
    """Stack single-frame images of one geometry, splitting repeated positions."""
    normal = instances[indices[0]].normal
    assert normal is not None
    by_split_key: dict[tuple[Any, ...], list[int]] = defaultdict(list)
    for index in indices:
        by_split_key[instances[index].split_key].append(index)
    reason = "slices of one geometry, sorted along the slice normal"
    if len(by_split_key) > 1:
        reason = "split by echo, temporal position, b-value or acquisition"

    stacks = []
    for key in sorted(by_split_key, key=repr):
        members = by_split_key[key]
        distance = {i: float(instances[i].positions[0] @ normal) for i in members}
        ordered = sorted(
            members,
            key=lambda i: (distance[i], instances[i].instance_number or 0, i),
        )
        # Images that still share a position go to further stacks, in order.
        layers: list[list[int]] = []
        for i in ordered:
            for layer in layers:
                if abs(distance[layer[-1]] - distance[i]) > POSITION_TOLERANCE_MM:
                    layer.append(i)
                    break
            else:
                layers.append([i])
        layer_reason = reason
        if len(layers) > 1:
            layer_reason = "several images at one position, split into layers"
        for layer in layers:
            stacks.append(
                Stack(
                    members=[(i, 0) for i in layer],
                    reason=layer_reason,
                    z_mm=np.asarray([distance[i] for i in layer]),
                )
            )
    return stacks


# Writing


def _stack_dataset(instances: Sequence[DecodedInstance], stack: Stack) -> Any:
    """Build the xarray dataset of one stack, with rescale applied."""
    import xarray as xr

    first = instances[stack.members[0][0]]
    frames = [instances[i].pixels[f] for i, f in stack.members]
    slopes = np.asarray([instances[i].slopes[f] for i, f in stack.members])
    intercepts = np.asarray([instances[i].intercepts[f] for i, f in stack.members])
    pixels = _apply_rescale(np.stack(frames), slopes, intercepts)

    rows, columns = pixels.shape[1], pixels.shape[2]
    spacing = first.spacing
    dims = ["z", "y", "x"] + (["channel"] if pixels.ndim == 4 else [])
    if stack.z_mm is not None:
        z = np.asarray(stack.z_mm, dtype=float)
    else:
        z = np.arange(len(stack.members), dtype=float)
    coords: dict[str, Any] = {
        "z": ("z", z, {"units": "mm" if stack.z_mm is not None else "index"}),
        "y": ("y", np.arange(rows) * (spacing[0] if spacing else 1.0)),
        "x": ("x", np.arange(columns) * (spacing[1] if spacing else 1.0)),
        "SOPInstanceUID": (
            "z",
            np.asarray(
                [instances[i].sop_instance_uid for i, _ in stack.members], object
            ),
        ),
        "frame": ("z", np.asarray([f for _, f in stack.members], dtype=np.int32)),
        "InstanceNumber": (
            "z",
            np.asarray(
                [instances[i].instance_number or 0 for i, _ in stack.members], np.int64
            ),
        ),
    }
    unit = "mm" if spacing else "pixel"
    coords["y"] = ("y", coords["y"][1], {"units": unit})
    coords["x"] = ("x", coords["x"][1], {"units": unit})
    positions = _stack_positions(instances, stack)
    if positions is not None:
        coords["ImagePositionPatient"] = (("z", "xyz"), positions, {"units": "mm"})

    attributes = {
        "Modality": first.modality,
        "PhotometricInterpretation": first.photometric,
        "rescale_applied": True,
        "units": _units(first),
        "stack_reason": stack.reason,
    }
    if first.orientation is not None:
        attributes["ImageOrientationPatient"] = list(first.orientation)
    if spacing is not None:
        attributes["PixelSpacing"] = list(spacing)
    if stack.z_mm is not None and len(stack.z_mm) > 1:
        steps = np.diff(np.asarray(stack.z_mm, dtype=float))
        attributes["slice_spacing_mm"] = float(np.median(steps))
        attributes["uniform_spacing"] = bool(np.allclose(steps, steps[0], atol=1e-3))
    affine = _affine(first, positions, attributes.get("slice_spacing_mm"))
    if affine is not None:
        attributes["affine"] = affine
    dataset = xr.Dataset({"pixels": (dims, pixels)}, coords=coords, attrs=attributes)
    return dataset


def _apply_rescale(
    stored: np.ndarray, slopes: np.ndarray, intercepts: np.ndarray
) -> np.ndarray:
    if np.all(slopes == 1) and np.all(intercepts == 0):
        return stored
    shape = (-1,) + (1,) * (stored.ndim - 1)
    integral = np.all(slopes == 1) and np.all(intercepts == np.round(intercepts))
    if integral and stored.dtype.kind in "iu":
        values = stored.astype(np.int32) + intercepts.astype(np.int32).reshape(shape)
        if (
            values.min() >= np.iinfo(np.int16).min
            and values.max() <= np.iinfo(np.int16).max
        ):
            return values.astype(np.int16)
        return values
    values = stored.astype(np.float32) * slopes.astype(np.float32).reshape(shape)
    return values + intercepts.astype(np.float32).reshape(shape)


def _units(instance: DecodedInstance) -> str:
    if instance.rescale_type:
        return instance.rescale_type
    if instance.modality == "CT":
        return "HU"
    return "stored value"


def _stack_positions(
    instances: Sequence[DecodedInstance], stack: Stack
) -> np.ndarray | None:
    positions = []
    for i, f in stack.members:
        instance_positions = instances[i].positions
        if instance_positions is None:
            return None
        positions.append(instance_positions[f])
    return np.asarray(positions, dtype=float)


def _affine(
    first: DecodedInstance,
    positions: np.ndarray | None,
    slice_spacing: float | None,
) -> list[list[float]] | None:
    """Return the 4x4 matrix from (x, y, z) indices to LPS millimetres."""
    if first.orientation is None or first.spacing is None or positions is None:
        return None
    row_direction = np.asarray(first.orientation[:3])
    column_direction = np.asarray(first.orientation[3:])
    normal = np.cross(row_direction, column_direction)
    matrix = np.eye(4)
    matrix[:3, 0] = row_direction * first.spacing[1]
    matrix[:3, 1] = column_direction * first.spacing[0]
    matrix[:3, 2] = normal * (slice_spacing or 1.0)
    matrix[:3, 3] = positions[0]
    return matrix.tolist()
