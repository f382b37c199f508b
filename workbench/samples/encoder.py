"""Fast Part 10 encoding of many instances that share most of their elements.

The synthetic instances carry over a thousand elements each, nearly all the same
across a series. pydicom's ``dcmwrite`` encodes every element of every instance
(about 50 ms an instance here); :class:`SeriesEncoder` encodes the shared
elements once and, per instance, only the few that change, then merges both in
tag order. The bytes equal what ``dcmwrite(..., enforce_file_format=True)``
writes for the same dataset, which the tests check.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import (
    correct_ambiguous_vr,
    write_data_element,
    write_file_meta_info,
)
from pydicom.tag import BaseTag

__all__ = ["SeriesEncoder"]

PREAMBLE = b"\x00" * 128 + b"DICM"


class SeriesEncoder:
    """Encodes instances of one series in Explicit VR Little Endian.

    Parameters
    ----------
    template
        The elements every instance shares. Ambiguous VRs (``OB or OW``) are
        resolved in place from the template's pixel description.
    """

    def __init__(self, template: Dataset) -> None:
        correct_ambiguous_vr(template, True)
        self._character_set = template.get("SpecificCharacterSet")
        self._shared = [
            (tag, self._encode(template[tag]))
            for tag in sorted(template.keys())
            if not _is_retired_group_length(tag)
        ]
        self._shared_tags = {tag for tag, _ in self._shared}

    def encode(self, file_meta: FileMetaDataset, instance: Dataset) -> bytes:
        """Return the Part 10 bytes of the template plus the elements of ``instance``.

        Parameters
        ----------
        file_meta
            The file meta information of this instance.
        instance
            The elements of this instance only; none may be in the template, and
            none may have an ambiguous VR.
        """
        own = sorted((tag, self._encode(instance[tag])) for tag in instance.keys())
        clashing = self._shared_tags.intersection(tag for tag, _ in own)
        if clashing:
            raise ValueError(
                f"elements {sorted(clashing)} are both in the template and in the"
                " instance; remove them from the template"
            )
        meta = DicomBytesIO()
        meta.is_implicit_VR, meta.is_little_endian = False, True
        write_file_meta_info(meta, file_meta, enforce_standard=True)
        merged: Iterable[tuple[BaseTag, bytes]] = heapq.merge(self._shared, own)
        return PREAMBLE + meta.getvalue() + b"".join(data for _, data in merged)

    def _encode(self, element: DataElement) -> bytes:
        buffer = DicomBytesIO()
        buffer.is_implicit_VR, buffer.is_little_endian = False, True
        write_data_element(buffer, element, self._character_set)
        return buffer.getvalue()


def _is_retired_group_length(tag: BaseTag) -> bool:
    # pydicom's writer drops group lengths of groups above 6 (PS3.5 7.2).
    return tag.element == 0 and tag.group > 6
