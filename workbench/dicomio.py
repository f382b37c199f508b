"""Reading DICOM instances from bytes, strictly.

Instances reach the workbench as bytes: from Orthanc, or from files on disk that
``workbench orthanc load`` uploads. This module turns bytes into a pydicom dataset or
raises :class:`~workbench.errors.DicomReadError` with a reason code, so the pipeline
can quarantine the instance and go on:

``not-dicom``
    The bytes are not DICOM (a text file named ``.dcm``, say). They are never
    wrapped in a file meta header and passed on as DICOM.
``truncated``
    The file ends early, inside an element or inside the pixel data.
``unreadable``
    pydicom could not parse the bytes for another reason.

A dataset written without the 128-byte preamble and file meta header is accepted
when its first element is a plausible DICOM tag and it has a SOP Class UID and SOP
Instance UID; its transfer syntax is inferred from the encoding pydicom detects.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from workbench.errors import DicomReadError

__all__ = ["fix_file_meta", "read_instance", "to_upload_bytes"]

log = logging.getLogger(__name__)

PREAMBLE_LENGTH = 128
UNDEFINED_LENGTH = 0xFFFFFFFF
MAGIC = b"DICM"
# Groups a dataset without a preamble may plausibly start with: file meta, the
# command group, directory records, identification.
PLAUSIBLE_FIRST_GROUPS = frozenset({0x0000, 0x0002, 0x0004, 0x0008})


def read_instance(data: bytes, *, stop_before_pixels: bool = False) -> Dataset:
    """Parse ``data`` as one DICOM instance.

    Parameters
    ----------
    data
        The bytes of a DICOM Part 10 file, or of a dataset without preamble and
        file meta header.
    stop_before_pixels
        Skip the pixel data, for a quick look at the header.

    Returns
    -------
    pydicom.dataset.Dataset
        The dataset with its ``file_meta`` present and its transfer syntax set.

    Raises
    ------
    DicomReadError
        With ``reason`` ``not-dicom``, ``truncated`` or ``unreadable``.
    """
    has_preamble = len(data) >= PREAMBLE_LENGTH + 4 and (
        data[PREAMBLE_LENGTH : PREAMBLE_LENGTH + 4] == MAGIC
    )
    if not has_preamble and not _starts_like_a_dataset(data):
        raise DicomReadError(
            "bytes are not DICOM: no 'DICM' marker at offset 128 and no plausible"
            " first element",
            reason="not-dicom",
        )

    try:
        ds = _parse(
            data, has_preamble=has_preamble, stop_before_pixels=stop_before_pixels
        )
    except DicomReadError as exc:
        if has_preamble:
            raise
        # Without the 'DICM' marker, bytes that do not even parse are not taken
        # for a broken DICOM file: an ICC profile or a zip looks like that.
        raise DicomReadError(
            f"bytes without a DICOM preamble do not parse as a dataset ({exc.reason})",
            reason="not-dicom",
        ) from exc

    if not has_preamble:
        if "SOPClassUID" not in ds or "SOPInstanceUID" not in ds:
            raise DicomReadError(
                "bytes without a DICOM preamble lack SOP Class UID and SOP Instance"
                " UID, so they are not taken for a DICOM instance",
                reason="not-dicom",
            )
        fix_file_meta(ds)
    elif not getattr(ds, "file_meta", None) or "TransferSyntaxUID" not in ds.file_meta:
        fix_file_meta(ds)

    if not stop_before_pixels:
        _check_pixel_data_length(ds)
    return ds


def _parse(data: bytes, *, has_preamble: bool, stop_before_pixels: bool) -> Dataset:
    """Parse every element of ``data``, raising ``truncated`` or ``unreadable``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(
                io.BytesIO(data),
                force=not has_preamble,
                stop_before_pixels=stop_before_pixels,
            )
            # Parse every element now, so that truncation inside a sequence or the
            # pixel data shows here and not later in the pipeline.
            _check_value_lengths(ds)
        except DicomReadError:
            raise
        except (EOFError, struct.error) as exc:
            raise DicomReadError(
                f"DICOM data ends early ({type(exc).__name__})", reason="truncated"
            ) from exc
        except Exception as exc:
            raise DicomReadError(
                f"pydicom could not parse the data ({type(exc).__name__})",
                reason="unreadable",
            ) from exc
    if any(_is_truncation_warning(w.message) for w in caught):
        raise DicomReadError("DICOM data ends early", reason="truncated")
    return ds


def fix_file_meta(ds: Dataset) -> None:
    """Fill in the file meta header of ``ds`` from the encoding pydicom read it with."""
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    if "TransferSyntaxUID" not in meta:
        meta.TransferSyntaxUID = _inferred_transfer_syntax(ds)
    if "MediaStorageSOPClassUID" not in meta and "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "MediaStorageSOPInstanceUID" not in meta and "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    if "ImplementationClassUID" not in meta:
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta


def to_upload_bytes(path: Path) -> bytes:
    """Return the bytes of the DICOM file at ``path`` in a form Orthanc accepts.

    A complete Part 10 file is returned as it is. A dataset without preamble or file
    meta header is read, given a file meta header with the inferred transfer
    syntax, and written as a Part 10 file.

    Raises
    ------
    DicomReadError
        When the file is not a readable DICOM instance.
    """
    data = Path(path).read_bytes()
    ds = read_instance(data)
    complete = data[PREAMBLE_LENGTH : PREAMBLE_LENGTH + 4] == MAGIC and (
        "TransferSyntaxUID" in getattr(ds, "file_meta", {})
    )
    if complete and len(ds.file_meta) > 1:
        return data
    buffer = DicomBytesIO()
    with warnings.catch_warnings():
        # pydicom warns about values that break their VR; they are uploaded as
        # they are, and the ingest flags them.
        warnings.simplefilter("ignore")
        ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _starts_like_a_dataset(data: bytes) -> bool:
    if len(data) < 8:
        return False
    little = struct.unpack("<H", data[:2])[0]
    big = struct.unpack(">H", data[:2])[0]
    return little in PLAUSIBLE_FIRST_GROUPS or big in PLAUSIBLE_FIRST_GROUPS


def _inferred_transfer_syntax(ds: Dataset) -> UID:
    implicit = getattr(ds, "original_encoding", (None, None))[0]
    little = getattr(ds, "original_encoding", (None, True))[1]
    if implicit is None:
        implicit = bool(getattr(ds, "is_implicit_VR", True))
        little = bool(getattr(ds, "is_little_endian", True))
    if implicit:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _check_value_lengths(ds: Dataset) -> None:
    """Raise ``truncated`` when a value holds fewer bytes than its length says.

    pydicom reads a value with ``read(length)`` and keeps what it gets, so a file
    that ends inside a value parses without error; the raw element still records
    the length the file promised.
    """
    for raw in ds.elements():
        length = getattr(raw, "length", UNDEFINED_LENGTH)
        value = raw.value
        if (
            length != UNDEFINED_LENGTH
            and isinstance(value, bytes)
            and len(value) < length
        ):
            raise DicomReadError(
                f"DICOM data ends inside element {raw.tag} ({len(value)} of"
                f" {length} bytes)",
                reason="truncated",
            )
        if raw.VR == "SQ" or (raw.VR is None and ds[raw.tag].VR == "SQ"):
            for item in ds[raw.tag].value or ():
                _check_value_lengths(item)


def _is_truncation_warning(message: Warning | str) -> bool:
    text = str(message).lower()
    return "eof" in text or "end of file" in text or "truncat" in text


def _check_pixel_data_length(ds: Dataset) -> None:
    """Raise ``truncated`` when native pixel data is shorter than its attributes say."""
    if "PixelData" not in ds:
        return
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax is not None and UID(syntax).is_compressed:
        return
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        samples = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return
    photometric = str(ds.get("PhotometricInterpretation", ""))
    if photometric in ("YBR_FULL_422", "YBR_PARTIAL_422"):
        # Chroma is subsampled by two along each row: 2 values a pixel, not 3.
        samples = 2
    expected_bits = rows * columns * samples * bits * frames
    expected = (expected_bits + 7) // 8
    actual = len(ds.PixelData)
    if actual < expected:
        raise DicomReadError(
            f"pixel data holds {actual} bytes where Rows, Columns, SamplesPerPixel,"
            f" BitsAllocated and NumberOfFrames require {expected}",
            reason="truncated",
        )
