"""The Parquet form of DICOM metadata: one column per attribute, typed by VR and VM.

Column types come from the DICOM data dictionary, never from the values, so every
partition of a dataset agrees on the type of every column:

=====================================  ==============================================
VR                                     Arrow type (a list of it when VM is not 1)
=====================================  ==============================================
DA                                     ``date32``
TM                                     ``time64[us]``
DT                                     ``timestamp[us]`` (UTC offset not applied)
IS, SS, US, SL, UL, SV, UV             ``int64``
DS, FL, FD                             ``float64``
AE AS CS LO LT PN SH ST UC UI UR UT    ``string`` (person names as ``FAMILY^GIVEN``)
AT                                     ``string`` such as ``(0008,0018)``
SQ                                     ``string``: the items as DICOM JSON (PS3.18 F.2)
OB OD OF OL OV OW UN                   not stored (pixels go to Zarr)
=====================================  ==============================================

Columns are named by the attribute's keyword, as in Imaging Data Commons' tables.
Private attributes a recipe keeps are named ``Private_<creator>_<gggg>xx<ee>`` with
their type from pydicom's private dictionary, or ``string`` when it has none.

A value that breaks its VR (``IS "14.5"``, ``DS "0,5"``, a date that is not a date,
a string longer than its VR allows) never stops an ingest: the column gets the
number or date when the text has one unambiguous reading and null otherwise, and
the ``invalid_values`` column keeps the raw text under the keyword.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from functools import lru_cache
from typing import Any

import pyarrow as pa
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import get_entry, get_private_entry, keyword_for_tag
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag

__all__ = [
    "BOOKKEEPING_FIELDS",
    "INVALID_VALUES",
    "arrow_type",
    "column_for_tag",
    "instance_row",
    "schema_for_columns",
]

INVALID_VALUES = "invalid_values"
VOLUME_PATH = "volume_path"
VOLUME_INDEX = "volume_index"
BOOKKEEPING_FIELDS = (
    pa.field(VOLUME_PATH, pa.string()),
    pa.field(VOLUME_INDEX, pa.int32()),
    pa.field(INVALID_VALUES, pa.map_(pa.string(), pa.string())),
)
_BOOKKEEPING_NAMES = {field.name for field in BOOKKEEPING_FIELDS}

STRING_VRS = frozenset(
    {"AE", "AS", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UI", "UR", "UT", "AT"}
)
INTEGER_VRS = frozenset({"IS", "SS", "US", "SL", "UL", "SV", "UV"})
FLOAT_VRS = frozenset({"DS", "FL", "FD"})
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
# Maximum value length in characters (PS3.5 table 6.2-1).
MAX_LENGTH = {
    "AE": 16,
    "AS": 4,
    "CS": 16,
    "DS": 16,
    "IS": 12,
    "LO": 64,
    "SH": 16,
    "UI": 64,
    "ST": 1024,
    "LT": 10240,
}
_INTEGER_TEXT = re.compile(r"^[+-]?\d+$")
_DECIMAL_TEXT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_SEQUENCE_BULK_THRESHOLD = 256


def arrow_type(vr: str, vm: str) -> pa.DataType | None:
    """Return the Arrow type of an attribute with this VR and VM, or None."""
    vr = _resolve_ambiguous_vr(vr)
    if vr is None or vr in BINARY_VRS:
        return None
    if vr == "SQ":
        return pa.string()
    if vr == "DA":
        base: pa.DataType = pa.date32()
    elif vr == "TM":
        base = pa.time64("us")
    elif vr == "DT":
        base = pa.timestamp("us")
    elif vr in INTEGER_VRS:
        base = pa.int64()
    elif vr in FLOAT_VRS:
        base = pa.float64()
    elif vr in STRING_VRS:
        base = pa.string()
    else:
        return None
    return base if vm == "1" else pa.list_(base)


@lru_cache(maxsize=16384)
def column_for_tag(
    tag: int, private_creator: str | None = None
) -> tuple[str, str, pa.DataType] | None:
    """Return ``(column name, VR, Arrow type)`` of an attribute, or None if unstored."""
    if private_creator is not None:
        try:
            vr, vm, *_ = get_private_entry(tag, private_creator)
        except KeyError:
            vr, vm = "LO", "1-n"
        safe_creator = re.sub(r"[^A-Za-z0-9]+", "_", private_creator).strip("_")
        name = f"Private_{safe_creator}_{tag >> 16:04X}xx{tag & 0xFF:02X}"
    else:
        keyword = keyword_for_tag(tag)
        if not keyword:
            return None
        vr, vm, *_ = get_entry(tag)
        name = keyword
    data_type = arrow_type(vr, vm)
    if data_type is None:
        return None
    return name, _resolve_ambiguous_vr(vr) or vr, data_type


def schema_for_columns(columns: dict[str, pa.DataType]) -> pa.Schema:
    """Return the schema for a set of DICOM columns plus the bookkeeping columns.

    DICOM columns come first, in keyword order, so every partition of a dataset
    lays its columns out the same way.
    """
    fields = [
        pa.field(name, columns[name])
        for name in sorted(columns)
        if name not in _BOOKKEEPING_NAMES
    ]
    return pa.schema([*fields, *BOOKKEEPING_FIELDS])


def instance_row(ds: Dataset) -> tuple[dict[str, Any], dict[str, pa.DataType]]:
    """Convert the top level of a de-identified instance to one typed row.

    Returns
    -------
    row
        Column name to value; ``invalid_values`` maps keywords to raw text.
    types
        Column name to Arrow type, for the columns this row has.
    """
    row: dict[str, Any] = {}
    types: dict[str, pa.DataType] = {}
    invalid: dict[str, str] = {}
    encodings = convert_encodings(ds.get("SpecificCharacterSet"))
    creators = _private_creators(ds)

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        row["TransferSyntaxUID"] = str(meta.TransferSyntaxUID)
        types["TransferSyntaxUID"] = pa.string()

    for tag in ds.keys():
        group, element_number = tag >> 16, tag & 0xFFFF
        creator = None
        if group & 1:
            if element_number <= 0x00FF:
                continue
            creator = creators.get((group, element_number >> 8))
            if creator is None:
                continue
        column = column_for_tag(int(tag), creator)
        if column is None:
            continue
        name, vr, data_type = column
        raw = ds.get_item(tag)
        if vr == "SQ":
            row[name] = _sequence_json(ds[tag])
        else:
            texts = _texts(raw, ds, tag, encodings)
            row[name] = _typed(name, vr, data_type, texts, invalid)
        types[name] = data_type

    row[INVALID_VALUES] = list(invalid.items()) or None
    return row, types


def _texts(
    raw: RawDataElement | DataElement, ds: Dataset, tag: BaseTag, encodings: list[str]
) -> list[str]:
    """Return the values of an element as text, from its raw bytes when possible."""
    if isinstance(raw, RawDataElement) and isinstance(raw.value, bytes):
        vr = raw.VR or get_entry(tag)[0]
        if vr in ("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV") or " or " in vr:
            # Binary numbers: let pydicom unpack them.
            return _element_texts(ds[tag])
        if vr in ("PN", "LO", "LT", "SH", "ST", "UC", "UT"):
            text = decode_bytes(raw.value, encodings, set())
        else:
            text = raw.value.decode("ascii", errors="replace")
        text = text.rstrip("\x00 ")
        if vr in ("LT", "ST", "UT", "UR"):
            return [text] if text else []
        return [part.strip() for part in text.split("\\")] if text else []
    return _element_texts(raw)


def _element_texts(element: DataElement) -> list[str]:
    value = element.value
    if value is None or value == "":
        return []
    if element.VR == "AT":
        values = value if isinstance(value, (list, MultiValue)) else [value]
        return [f"({int(tag) >> 16:04X},{int(tag) & 0xFFFF:04X})" for tag in values]
    if isinstance(value, (list, tuple, MultiValue)):
        return [_plain(item) for item in value]
    return [_plain(value)]


def _plain(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("latin-1")
    if type(value) is float:
        # Binary floats (FL, FD): repr keeps every digit.
        return repr(value)
    return str(value)


def _typed(
    name: str,
    vr: str,
    data_type: pa.DataType,
    texts: list[str],
    invalid: dict[str, str],
) -> Any:
    """Convert text values to the column's type, recording any that break the VR."""
    parsed = []
    broken = False
    for text in texts:
        value, valid = _parse(vr, text)
        broken = broken or not valid
        parsed.append(value)
    if broken:
        invalid[name] = "\\".join(texts)
    if pa.types.is_list(data_type):
        return parsed or None
    return parsed[0] if parsed else None


def _parse(vr: str, text: str) -> tuple[Any, bool]:
    """Return ``(value, valid)`` for one text value of the VR."""
    if vr in STRING_VRS:
        limit = MAX_LENGTH.get(vr)
        return (text if text else None), limit is None or len(text) <= limit
    if text == "":
        return None, True
    if vr == "IS" or vr in INTEGER_VRS:
        return _parse_integer(text)
    if vr in FLOAT_VRS:
        return _parse_decimal(vr, text)
    if vr == "DA":
        return _parse_date(text)
    if vr == "TM":
        return _parse_time(text)
    if vr == "DT":
        return _parse_datetime(text)
    return text, True


def _parse_integer(text: str) -> tuple[int | None, bool]:
    if _INTEGER_TEXT.match(text):
        return int(text), len(text) <= MAX_LENGTH["IS"]
    if _DECIMAL_TEXT.match(text):
        number = float(text)
        if number.is_integer():
            # "14.0": one reading, but not a valid IS.
            return int(number), False
    return None, False


def _parse_decimal(vr: str, text: str) -> tuple[float | None, bool]:
    if _DECIMAL_TEXT.match(text):
        return float(text), vr != "DS" or len(text) <= MAX_LENGTH["DS"]
    try:
        # Binary floats rendered by pydicom ("nan", "inf").
        return float(text), vr != "DS"
    except ValueError:
        # "0,5" may be a decimal comma or two values: no single reading.
        return None, False


def _parse_date(text: str) -> tuple[dt.date | None, bool]:
    for pattern, valid in (("%Y%m%d", True), ("%Y.%m.%d", False), ("%Y-%m-%d", False)):
        try:
            return dt.datetime.strptime(text, pattern).date(), valid
        except ValueError:
            continue
    return None, False


def _parse_time(text: str) -> tuple[dt.time | None, bool]:
    valid = ":" not in text
    digits = text.replace(":", "")
    whole, _, fraction = digits.partition(".")
    if (
        not whole.isdigit()
        or len(whole) not in (2, 4, 6)
        or (fraction and not fraction.isdigit())
    ):
        return None, False
    hour = int(whole[:2])
    minute = int(whole[2:4] or 0)
    second = min(int(whole[4:6] or 0), 59)
    micro = int((fraction + "000000")[:6]) if fraction else 0
    try:
        return dt.time(hour, minute, second, micro), valid
    except ValueError:
        return None, False


def _parse_datetime(text: str) -> tuple[dt.datetime | None, bool]:
    stamp = re.split(r"[+-]", text, maxsplit=1)[0]
    whole, _, fraction = stamp.partition(".")
    if not whole.isdigit() or len(whole) not in (4, 6, 8, 10, 12, 14):
        return None, False
    padded = whole + "0101000000"[len(whole) - 4 :] if len(whole) < 14 else whole
    try:
        value = dt.datetime.strptime(padded[:14], "%Y%m%d%H%M%S")
    except ValueError:
        return None, False
    if fraction.isdigit():
        value = value.replace(microsecond=int((fraction + "000000")[:6]))
    return value, True


def _sequence_json(element: DataElement) -> str | None:
    items = element.value or []
    if not items:
        return None
    encoded = [
        item.to_json_dict(
            bulk_data_threshold=_SEQUENCE_BULK_THRESHOLD,
            bulk_data_element_handler=lambda _element: "omitted",
        )
        for item in items
    ]
    return json.dumps(encoded, ensure_ascii=False, separators=(",", ":"))


def _private_creators(ds: Dataset) -> dict[tuple[int, int], str]:
    creators = {}
    for tag in ds.keys():
        group, element_number = tag >> 16, tag & 0xFFFF
        if group & 1 and 0x0010 <= element_number <= 0x00FF:
            creators[(group, element_number)] = str(ds[tag].value or "").strip()
    return creators


def _resolve_ambiguous_vr(vr: str) -> str | None:
    """Return one storable VR for a dictionary VR such as ``US or SS``, or None."""
    if " or " not in vr:
        return vr
    choices = [choice.strip() for choice in vr.split(" or ")]
    if any(choice in BINARY_VRS for choice in choices):
        return None
    return choices[0]
