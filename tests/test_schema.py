"""Parquet conversion: column types from the data dictionary, invalid values kept."""

from __future__ import annotations

import datetime as dt
import json

import pyarrow as pa
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from workbench.dataset.schema import (
    INVALID_VALUES,
    arrow_type,
    column_for_tag,
    instance_row,
    schema_for_columns,
)


def raw_dataset(elements: dict[str, tuple[str, bytes]]) -> Dataset:
    """Build a dataset of raw (unconverted) elements, as a file would give them."""
    from pydicom.datadict import tag_for_keyword

    values = {}
    for keyword, (vr, value) in elements.items():
        tag = Tag(tag_for_keyword(keyword))
        values[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    return Dataset(values)


@pytest.mark.parametrize(
    ("vr", "vm", "expected"),
    [
        ("DA", "1", pa.date32()),
        ("TM", "1", pa.time64("us")),
        ("DT", "1", pa.timestamp("us")),
        ("IS", "1", pa.int64()),
        ("DS", "2", pa.list_(pa.float64())),
        ("US", "1", pa.int64()),
        ("FD", "1-n", pa.list_(pa.float64())),
        ("PN", "1", pa.string()),
        ("CS", "2-n", pa.list_(pa.string())),
        ("SQ", "1", pa.string()),
        ("OB", "1", None),
        ("US or SS", "1", pa.int64()),
        ("OB or OW", "1", None),
    ],
)
def test_arrow_type_from_vr_and_vm(vr, vm, expected):
    assert arrow_type(vr, vm) == expected


def test_columns_named_by_keyword():
    assert column_for_tag(0x00280030) == ("PixelSpacing", "DS", pa.list_(pa.float64()))
    assert column_for_tag(0x7FE00010) is None
    name, vr, _ = column_for_tag(0x0019100C, "SIEMENS MR HEADER")
    assert name == "Private_SIEMENS_MR_HEADER_0019xx0C"
    assert vr == "IS"


def test_typed_values():
    ds = raw_dataset(
        {
            "StudyDate": ("DA", b"20220310"),
            "StudyTime": ("TM", b"101500.25"),
            "AcquisitionDateTime": ("DT", b"20220310101500.5+0100"),
            "InstanceNumber": ("IS", b"12 "),
            "PixelSpacing": ("DS", b"0.5\\0.6 "),
            "ImageType": ("CS", b"ORIGINAL\\PRIMARY"),
            "PatientName": ("PN", b"WBXYZ"),
            "Modality": ("CS", b"CT"),
        }
    )
    row, types = instance_row(ds)
    assert row["StudyDate"] == dt.date(2022, 3, 10)
    assert row["StudyTime"] == dt.time(10, 15, 0, 250000)
    assert row["AcquisitionDateTime"] == dt.datetime(2022, 3, 10, 10, 15, 0, 500000)
    assert row["InstanceNumber"] == 12
    assert row["PixelSpacing"] == [0.5, 0.6]
    assert row["ImageType"] == ["ORIGINAL", "PRIMARY"]
    assert row["PatientName"] == "WBXYZ"
    assert row[INVALID_VALUES] is None
    table = pa.Table.from_pylist([row], schema=schema_for_columns(types))
    assert table.schema.field("StudyDate").type == pa.date32()


def test_single_value_of_multivalued_attribute_is_a_list():
    ds = raw_dataset({"ImageType": ("CS", b"DERIVED"), "WindowCenter": ("DS", b"40")})
    row, _ = instance_row(ds)
    assert row["ImageType"] == ["DERIVED"]
    assert row["WindowCenter"] == [40.0]


def test_vr_violations_never_raise_and_are_flagged():
    ds = raw_dataset(
        {
            "InstanceNumber": ("IS", b"14.5"),
            "SeriesNumber": ("IS", b"7.0 "),
            "SliceThickness": ("DS", b"1.2345678901234567"),
            "PixelSpacing": ("DS", b"0,5\\0,5 "),
            "StationName": ("SH", b"X" * 40),
            "AcquisitionNumber": ("IS", b""),
            "ContentDate": ("DA", b"2022.03.10"),
            "SeriesDate": ("DA", b"not a date"),
        }
    )
    row, _ = instance_row(ds)
    invalid = dict(row[INVALID_VALUES])
    assert row["InstanceNumber"] is None
    assert invalid["InstanceNumber"] == "14.5"
    assert row["SeriesNumber"] == 7
    assert invalid["SeriesNumber"] == "7.0"
    assert row["SliceThickness"] == pytest.approx(1.2345678901234567)
    assert "SliceThickness" in invalid
    assert row["PixelSpacing"] == [None, None]
    assert invalid["PixelSpacing"] == "0,5\\0,5"
    assert row["StationName"] == "X" * 40
    assert "StationName" in invalid
    assert row["AcquisitionNumber"] is None
    assert "AcquisitionNumber" not in invalid
    assert row["ContentDate"] == dt.date(2022, 3, 10)
    assert "ContentDate" in invalid
    assert row["SeriesDate"] is None
    assert invalid["SeriesDate"] == "not a date"


def test_sequence_stored_as_dicom_json():
    ds = Dataset()
    item = Dataset()
    item.CodeValue = "T-D3000"
    item.CodingSchemeDesignator = "SRT"
    item.CodeMeaning = "Chest"
    ds.AnatomicRegionSequence = Sequence([item])
    row, types = instance_row(ds)
    assert types["AnatomicRegionSequence"] == pa.string()
    decoded = json.loads(row["AnatomicRegionSequence"])
    assert decoded[0]["00080104"] == {"vr": "LO", "Value": ["Chest"]}


def test_one_schema_for_rows_with_different_columns():
    first, first_types = instance_row(raw_dataset({"Modality": ("CS", b"CT")}))
    second, second_types = instance_row(
        raw_dataset({"Modality": ("CS", b"MR"), "EchoTime": ("DS", b"4.5")})
    )
    schema = schema_for_columns({**first_types, **second_types})
    table = pa.Table.from_pylist([first, second], schema=schema)
    assert table.column("EchoTime").to_pylist() == [None, 4.5]
    assert schema.names[-3:] == ["volume_path", "volume_index", INVALID_VALUES]
