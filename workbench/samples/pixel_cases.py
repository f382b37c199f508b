"""Field cases about pixel data: packed 1-bit frames (F9) and transfer syntaxes (F10).

F9 is a segmentation whose frames are 3 x 3 pixels at 1 bit: 9 bits a frame, so
every frame after the first starts inside a byte. A reader that unpacks each
frame from a byte boundary gets every frame but the first wrong.

F10 gathers every common transfer syntax: pydicom's bundled encodings of one MR
image (so the lossless ones must decode to the same array), other bundled samples
(deflate, JPEG baseline, JPEG lossless, lossy JPEG 2000 and JPEG-LS, a 12-bit JPEG
that the installed decoders reject), and encodings of a synthetic CT slice written
here with pydicom's encoders.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pack_bits
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from workbench.samples.bundled import PYDICOM_TEST_FILES
from workbench.samples.field_cases import FieldCase
from workbench.samples.small_instances import (
    new_subject,
    set_file_meta,
    small_image,
    write_part10,
)

__all__ = ["build_packed_segmentation", "build_transfer_syntaxes"]

log = logging.getLogger(__name__)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SEGMENT_FRAMES = 5
SEGMENT_SIZE = 3

# pydicom's encodings of MR_small.dcm that must decode to the same array.
_SAME_AS_MR_SMALL = {
    "MR_small_implicit.dcm": ImplicitVRLittleEndian,
    "MR_small_bigendian.dcm": ExplicitVRBigEndian,
    "MR_small_RLE.dcm": RLELossless,
    "MR_small_jp2klossless.dcm": JPEG2000Lossless,
    "MR_small_jpeg_ls_lossless.dcm": JPEGLSLossless,
}
# Other bundled samples: transfer syntax and what a reader must do.
_OTHER_BUNDLED = {
    "image_dfl.dcm": (DeflatedExplicitVRLittleEndian, "decode"),
    "SC_rgb_jpeg_dcmtk.dcm": (JPEGBaseline8Bit, "decode"),
    "SC_rgb_jpeg_gdcm.dcm": (JPEGLosslessSV1, "decode"),
    "JPEG2000.dcm": (JPEG2000, "decode"),
    "JPEGLSNearLossless_16.dcm": (JPEGLSNearLossless, "decode"),
    # 12-bit JPEG Extended: python-gdcm 3.2.6, pylibjpeg-libjpeg 2.5.0 and Pillow
    # 13.0.0 all fail to decode this file.
    "JPEG-lossy.dcm": (JPEGExtended12Bit, "quarantine"),
}


def segmentation_frames() -> np.ndarray:
    """Return the 5 x 3 x 3 binary frames of the F9 segmentation, as uint8."""
    frames = np.zeros((SEGMENT_FRAMES, SEGMENT_SIZE, SEGMENT_SIZE), dtype=np.uint8)
    for index in range(SEGMENT_FRAMES):
        frames[index].flat[index] = 1  # a pixel walking along the frame
        frames[index, 0, 2] = 1  # the top right corner in every frame
        frames[index, 2, 2] = index % 2  # the bottom right corner in odd frames
    return frames


def build_packed_segmentation(out: Path) -> FieldCase:
    """Write the F9 segmentation.

    facts: ``frames``, the expected array as nested lists; ``shape``; ``bits``, the
    number of pixel data bits that carry values (45 of 48 written).
    """
    subject = new_subject("F9", "BITWISE^PERPETUA")
    frames = segmentation_frames()
    ds = small_image(
        subject, series_uid=subject.uids("series"), sop_uid=subject.uids("seg")
    )
    ds.SOPClassUID = SEGMENTATION_STORAGE
    ds.Modality = "SEG"
    ds.Rows = ds.Columns = SEGMENT_SIZE
    ds.NumberOfFrames = SEGMENT_FRAMES
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelRepresentation = 0
    ds.SegmentationType = "BINARY"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.ContentLabel = "PHANTOM"
    segment = Dataset()
    segment.SegmentNumber = 1
    segment.SegmentLabel = "sphere"
    segment.SegmentAlgorithmType = "MANUAL"
    ds.SegmentSequence = [segment]
    ds.SharedFunctionalGroupsSequence = [_shared_groups()]
    ds.PerFrameFunctionalGroupsSequence = [
        _frame_groups(index) for index in range(SEGMENT_FRAMES)
    ]
    del ds.ImagePositionPatient, ds.ImageOrientationPatient, ds.PixelSpacing
    ds.PixelData = pack_bits(frames.ravel())
    set_file_meta(ds)
    path = write_part10(ds, out / "packed-1-bit-segmentation.dcm")
    return FieldCase(
        case_id="F9",
        title="1-bit segmentation, 3x3 frames packed across byte boundaries",
        expected=(
            "The pixel data decodes to shape (5, 3, 3) with exactly the planted"
            " values, frames unpacked from one continuous bit stream, and is stored"
            " as bool or uint8."
        ),
        files=[path],
        roles={"segmentation": path},
        planted=subject.planter.planted,
        facts={
            "frames": frames.tolist(),
            "shape": frames.shape,
            "bits": frames.size,
        },
    )


def _shared_groups() -> Dataset:
    measures = Dataset()
    measures.PixelSpacing = [1, 1]
    measures.SliceThickness = "2.5"
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    groups = Dataset()
    groups.PixelMeasuresSequence = [measures]
    groups.PlaneOrientationSequence = [orientation]
    return groups


def _frame_groups(index: int) -> Dataset:
    position = Dataset()
    position.ImagePositionPatient = [0, 0, 2.5 * index]
    content = Dataset()
    content.DimensionIndexValues = [1, index + 1]
    segment = Dataset()
    segment.ReferencedSegmentNumber = 1
    groups = Dataset()
    groups.PlanePositionSequence = [position]
    groups.FrameContentSequence = [content]
    groups.SegmentIdentificationSequence = [segment]
    return groups


def build_transfer_syntaxes(out: Path) -> FieldCase:
    """Write or copy the F10 files.

    facts: ``files`` maps each role to a dict with ``transfer_syntax``,
    ``expect`` (``"decode"`` or ``"quarantine"``) and ``same_pixels_as``. The
    last is the role whose decoded array a lossless file must equal, or None.
    ``skipped`` lists encodings not written because an encoder is missing.
    ``pixels`` is the array of the written files.
    """
    files: dict[str, dict[str, Any]] = {}
    roles: dict[str, Path] = {}

    # pydicom's samples, copied so that the case is one self-contained folder.
    bundled = out / "bundled"
    bundled.mkdir(parents=True, exist_ok=True)
    names = ["MR_small.dcm", *_SAME_AS_MR_SMALL, *_OTHER_BUNDLED]
    for name in names:
        role = f"bundled-{Path(name).stem}"
        roles[role] = bundled / name
        shutil.copyfile(PYDICOM_TEST_FILES / name, roles[role])
    files["bundled-MR_small"] = _fact(ExplicitVRLittleEndian, "decode", None)
    for name, syntax in _SAME_AS_MR_SMALL.items():
        files[f"bundled-{Path(name).stem}"] = _fact(
            syntax, "decode", "bundled-MR_small"
        )
    for name, (syntax, expect) in _OTHER_BUNDLED.items():
        files[f"bundled-{Path(name).stem}"] = _fact(syntax, expect, None)

    # Encodings of a synthetic CT slice written here.
    subject = new_subject("F10", "ENCODER^FLAVIA")
    rows = np.arange(64, dtype=np.int16)
    pixels = (rows[:, None] * 13 - rows[None, :] * 7 - 300).astype(np.int16)
    skipped: dict[str, str] = {}
    written = out / "written"
    for role, syntax in (
        ("written-explicit-little", ExplicitVRLittleEndian),
        ("written-deflated", DeflatedExplicitVRLittleEndian),
        ("written-big-endian", ExplicitVRBigEndian),
        ("written-rle", RLELossless),
        ("written-jpeg2000-lossless", JPEG2000Lossless),
    ):
        ds = small_image(
            subject,
            series_uid=subject.uids("series"),
            sop_uid=subject.uids(role),
            size=64,
        )
        try:
            _encode(ds, pixels, syntax)
        except (RuntimeError, NotImplementedError) as exc:
            # pydicom raises these when no installed plugin can encode the syntax.
            skipped[role] = str(exc).splitlines()[0]
            log.warning("field case F10: %s not written: %s", role, skipped[role])
            continue
        roles[role] = write_part10(ds, written / f"{role}.dcm")
        reference = (
            None if role == "written-explicit-little" else "written-explicit-little"
        )
        files[role] = _fact(syntax, "decode", reference)
    return FieldCase(
        case_id="F10",
        title="deflated, RLE, JPEG, JPEG 2000, JPEG-LS and big endian encodings",
        expected=(
            "Each file is decoded by a pinned decoder, with byte order normalised to"
            " little endian before Zarr; lossless encodings decode to exactly the"
            " array of their uncompressed counterpart; a file no installed decoder"
            " reads (12-bit JPEG Extended) is quarantined, not a crash."
        ),
        files=list(roles.values()),
        roles=roles,
        planted=subject.planter.planted,
        facts={"files": files, "skipped": skipped, "pixels": pixels},
    )


def _fact(syntax: str, expect: str, same_pixels_as: str | None) -> dict[str, Any]:
    return {
        "transfer_syntax": syntax,
        "expect": expect,
        "same_pixels_as": same_pixels_as,
    }


def _encode(ds: Dataset, pixels: np.ndarray, syntax: str) -> None:
    """Store ``pixels`` in ``ds`` encoded with transfer syntax ``syntax``."""
    set_file_meta(ds, syntax)
    if syntax == ExplicitVRBigEndian:
        # pydicom writes pixel data bytes as given, so swap them here.
        ds.PixelData = pixels.astype(">i2").tobytes()
    elif syntax in (RLELossless, JPEG2000Lossless):
        ds.compress(syntax, pixels, generate_instance_uid=False)
    else:
        ds.PixelData = pixels.tobytes()
