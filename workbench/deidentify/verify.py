"""Verification: no identifying value of the source survives de-identification.

Before an instance is de-identified, :func:`collect_identifiers` gathers, at every
depth of every sequence, the values the recipe removes or replaces and that can
identify someone: person names (each component of each group, so the ideographic
and phonetic groups of a Japanese name count), identifiers, addresses,
institution and station names, dates and UIDs. After de-identification,
:func:`verify` walks the result, again at every depth, and reports each place where
one of those values appears: as the value of a date or UID element, or inside any
text. One finding fails the instance.

Text is compared decoded (pydicom applies the Specific Character Set) and ignoring
case. Name components and identifiers match as whole words, so ``ANN`` is not found
in ``SCANNER``; CJK text has no word boundaries and matches anywhere.

Values the recipe keeps are not identifiers by the profile's definition. When a
removed value also occurs in the source's kept text (an institution called
``TOSHIBA`` beside the manufacturer ``TOSHIBA_MEC``), it is a coincidence, not a
leak, and is not searched for; the patient's own names and IDs are always searched
for, wherever they occur.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import PersonName

from workbench.deidentify.pseudonyms import DICOM_ROOT_UID
from workbench.errors import VerificationError

__all__ = [
    "IDENTIFYING_KEYWORD",
    "RecipeView",
    "SourceIdentifiers",
    "collect_identifiers",
    "find_leaks",
    "find_leaks_in_values",
    "verify",
]

TEXT_VRS = frozenset({"AE", "CS", "LO", "LT", "SH", "ST", "UC", "UR", "UT"})
BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
# Binary numbers: never text, so never searched.
SKIPPED_VRS = frozenset(
    {"US", "SS", "UL", "SL", "UV", "SV", "FL", "FD", "AT", "OF", "OD"}
)
# Binary values shorter than this are searched as text (private strings stored as
# UN); longer ones are bulk data such as pixels or waveforms.
MAX_BINARY_TEXT = 1024
MIN_TEXT_LENGTH = 3
MIN_NAME_LENGTH = 3
MIN_PATIENT_NAME_LENGTH = 2
# Plain numbers shorter than this (series numbers, counts) are too common to
# attribute; longer digit strings (record numbers, phone numbers) are kept.
MIN_NUMBER_DIGITS = 4
MIN_PRIVATE_TEXT_LENGTH = 6
BULK_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009, 0x54000100, 0x56000020})
# Text attributes that identify a person, place or device when the recipe does not
# keep them; descriptions and comments are not among them.
IDENTIFYING_KEYWORD = re.compile(
    r"(ID|IDs|Identifier|Number|Numbers|Address|Telephone|Telecom|Institution"
    r"|Station|Location|Issuer|AETitle|Residence|Country|Region|Occupation"
    r"|Military|Branch|Religio|Insurance|Site|Sponsor|Machine|Organization"
    r"|Department|Serial|Barcode)"
)
# The patient's own identity: always searched for, even in kept text.
PATIENT_KEYWORDS = frozenset(
    {
        "PatientName",
        "PatientID",
        "OtherPatientIDs",
        "OtherPatientNames",
        "PatientBirthName",
        "PatientMotherBirthName",
        "PatientAddress",
        "PatientTelephoneNumbers",
        "MedicalRecordLocator",
    }
)

_ASCII_WORD = re.compile(r"^[A-Za-z0-9]")
_UID_TOKEN = re.compile(r"(?<![\d.])\d+(?:\.\d+)+(?![\d.])")


class RecipeView(Protocol):
    """What verification needs to know of the recipe that will be applied."""

    def keeps(self, tag: int, vr: str, private_creator: str | None) -> bool:
        """Return True when the recipe keeps this element unchanged."""
        ...


@dataclass
class SourceIdentifiers:
    """The identifying values of one source instance.

    Attributes
    ----------
    names
        Person name components and whole names, upper case.
    texts
        Identifiers, addresses and other identifying text, upper case.
    dates
        Dates as ``YYYYMMDD``.
    uids
        UIDs outside the DICOM root.
    """

    names: set[str] = field(default_factory=set)
    texts: set[str] = field(default_factory=set)
    dates: set[str] = field(default_factory=set)
    uids: set[str] = field(default_factory=set)

    def pattern(self) -> re.Pattern[str] | None:
        """Return one regular expression that finds any name, text or date in text.

        UIDs are looked up separately (see :meth:`find_in_text`): they differ in
        every instance, while names, texts and dates repeat across a patient's
        instances, so their compiled pattern is cached and shared.
        """
        return _compiled_pattern(
            frozenset(self.names), frozenset(self.texts), frozenset(self.dates)
        )

    def kind_of(self, matched: str) -> str:
        """Return the kind of identifier a match of :meth:`pattern` belongs to."""
        value = matched.upper()
        if value in self.names:
            return "person name"
        if value in self.dates:
            return "date"
        return "identifier"

    def find_in_text(self, text: str) -> str | None:
        """Return the kind of the first identifier found in ``text``, or None."""
        if not text:
            return None
        if self.uids:
            for candidate in _UID_TOKEN.findall(text):
                if candidate in self.uids:
                    return "UID"
        pattern = self.pattern()
        if pattern is None:
            return None
        match = pattern.search(text)
        return self.kind_of(match.group(0)) if match else None


@lru_cache(maxsize=256)
def _compiled_pattern(
    names: frozenset[str], texts: frozenset[str], dates: frozenset[str]
) -> re.Pattern[str] | None:
    alternatives = [_word_pattern(value, digits=True) for value in dates]
    # Longest first, so a whole identifier wins over a shorter part of it.
    for value in sorted(names | texts, key=len, reverse=True):
        alternatives.append(_word_pattern(value, digits=False))
    if not alternatives:
        return None
    return re.compile("|".join(alternatives), re.IGNORECASE)


@dataclass
class _Collector:
    view: RecipeView
    found: SourceIdentifiers = field(default_factory=SourceIdentifiers)
    patient_names: set[str] = field(default_factory=set)
    patient_texts: set[str] = field(default_factory=set)
    kept_texts: list[str] = field(default_factory=list)

    def walk(self, ds: Dataset, removed: bool) -> None:
        creators = _private_creators(ds)
        for tag in list(ds.keys()):
            # The raw element tells the VR without converting the value; kept
            # numbers and bulk data are never converted.
            vr = ds.get_item(tag).VR or _dictionary_vr(tag)
            creator = None
            if tag >> 16 & 1 and tag & 0xFFFF > 0x00FF:
                creator = creators.get((tag >> 16, (tag & 0xFFFF) >> 8))
            kept = not removed and self.view.keeps(tag, vr, creator)
            if vr == "SQ":
                for item in ds[tag].value or ():
                    self.walk(item, removed=not kept)
            elif kept:
                if vr in TEXT_VRS or vr == "PN":
                    values = _values(ds[tag].value)
                    self.kept_texts.extend(str(value) for value in values)
            elif creator is not None:
                self._collect_private(ds.get_item(tag), vr)
            else:
                self._collect(ds[tag], creator)

    def _collect_private(self, raw: Any, vr: str) -> None:
        """Collect a private element from its raw bytes, without converting it.

        Private blocks are large (hundreds of vendor elements an instance) and all
        go; decoding only the text among them keeps verification cheap.
        """
        value = raw.value
        if not isinstance(value, bytes):
            if raw.VR != "SQ":
                self._collect(raw, None)
            return
        if vr in TEXT_VRS or vr == "PN":
            text = value.decode("utf-8", errors="replace")
            for part in text.split("\\"):
                if vr == "PN" and part.strip():
                    self._add_name(part, patient=True)
                else:
                    self._add_private_text(part)
        elif vr in BINARY_VRS:
            self._add_private_text(_binary_as_text(value))

    def _collect(self, element: DataElement, creator: str | None) -> None:
        vr, value, tag = element.VR, element.value, element.tag
        if value is None or value == "" or tag in BULK_TAGS:
            return
        keyword = element.keyword
        patient = keyword in PATIENT_KEYWORDS or (tag.is_private and vr == "PN")
        if vr == "PN":
            for name in _values(value):
                self._add_name(name, patient=patient)
        elif vr == "UI":
            for item in _values(value):
                uid = str(item).strip("\x00 ")
                if uid and not uid.startswith(DICOM_ROOT_UID):
                    self.found.uids.add(uid)
        elif vr in ("DA", "DT"):
            for item in _values(value):
                day = str(item).strip()[:8]
                if len(day) == 8 and day.isdigit():
                    self.found.dates.add(day)
        elif tag.is_private:
            if tag.is_private_creator:
                return
            if vr in TEXT_VRS:
                texts = [str(text) for text in _values(value)]
            elif vr in BINARY_VRS:
                texts = [_binary_as_text(value)]
            else:
                return
            for text in texts:
                self._add_private_text(text)
        elif vr in TEXT_VRS and IDENTIFYING_KEYWORD.search(keyword):
            for text in _values(value):
                self._add_text(str(text), patient=patient)

    def _add_name(self, name: Any, *, patient: bool) -> None:
        person = name if isinstance(name, PersonName) else PersonName(str(name))
        target = self.patient_names if patient else self.found.names
        minimum = MIN_PATIENT_NAME_LENGTH if patient else MIN_NAME_LENGTH
        for group in (person.alphabetic, person.ideographic, person.phonetic):
            if not group:
                continue
            whole = group.strip("^ ").upper()
            if len(whole) >= MIN_NAME_LENGTH:
                target.add(whole)
            for component in group.split("^"):
                for word in component.replace(",", " ").split():
                    token = word.strip(" .").upper()
                    if not _ASCII_WORD.match(token) or len(token) >= minimum:
                        target.add(token)
        target.discard("")

    def _add_text(self, text: str, *, patient: bool) -> None:
        text = text.strip("\x00 ")
        if len(text) < MIN_TEXT_LENGTH or _is_short_number(text):
            return
        (self.patient_texts if patient else self.found.texts).add(text.upper())

    def _add_private_text(self, text: str) -> None:
        """Collect private text that looks like a name, a record number or an id.

        Names (with ``^``) and digit strings count as the patient's own. Private
        blocks also hold short codes (``HFS``, ``YES``) and labels (``WHOLE BODY``)
        that public attributes repeat: short ones are not collected, longer ones
        only when no kept text repeats them.
        """
        text = text.strip("\x00 ")
        if "^" in text:
            self._add_name(text, patient=True)
        elif sum(ch.isdigit() for ch in text) >= MIN_NUMBER_DIGITS:
            self._add_text(text, patient=True)
        elif len(text) >= MIN_PRIVATE_TEXT_LENGTH and any(ch.isalpha() for ch in text):
            self._add_text(text, patient=False)

    def result(self) -> SourceIdentifiers:
        kept = "\n".join(self.kept_texts).upper()
        found = self.found
        found.names = {
            name for name in found.names if not _occurs(name, kept)
        } | self.patient_names
        found.texts = {
            text for text in found.texts if not _occurs(text, kept)
        } | self.patient_texts
        return found


def collect_identifiers(ds: Dataset, view: RecipeView) -> SourceIdentifiers:
    """Gather the identifying values of the source instance ``ds`` at every depth.

    Parameters
    ----------
    ds
        The source instance, before de-identification.
    view
        The recipe about to be applied: values it keeps are not collected.
    """
    collector = _Collector(view)
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        collector.walk(meta, removed=False)
    collector.walk(ds, removed=False)
    return collector.result()


def find_leaks(
    ds: Dataset,
    identifiers: SourceIdentifiers,
    skip_tags: frozenset[int] = frozenset(),
) -> list[tuple[str, str]]:
    """Return ``(kind, attribute path)`` for each surviving identifier in ``ds``.

    ``skip_tags`` names top-level attributes the de-identification itself wrote
    from constants (DeidentificationMethod and the like).
    """
    findings: list[tuple[str, str]] = []
    for element, path in _walk(ds, skip_tags=skip_tags):
        value = element.value
        if value is None or value == "" or element.tag in BULK_TAGS:
            continue
        vr = element.VR
        if vr in ("DA", "DT"):
            for day in _values(value):
                if str(day).strip()[:8] in identifiers.dates:
                    findings.append(("date", path))
            continue
        if vr == "UI":
            for uid in _values(value):
                if str(uid).strip("\x00 ") in identifiers.uids:
                    findings.append(("UID", path))
            continue
        if vr == "PN" or vr in TEXT_VRS:
            texts = [str(item) for item in _values(value)]
        elif vr in BINARY_VRS:
            text = _binary_as_text(value)
            texts = [text] if text else []
        else:
            continue
        for text in texts:
            kind = identifiers.find_in_text(text)
            if kind:
                findings.append((kind, path))
    return findings


def verify(
    ds: Dataset,
    identifiers: SourceIdentifiers,
    skip_tags: frozenset[int] = frozenset(),
) -> None:
    """Raise :class:`VerificationError` if any source identifier survives in ``ds``."""
    findings = find_leaks(ds, identifiers, skip_tags)
    if findings:
        shown = ", ".join(f"{kind} in {path}" for kind, path in findings[:5])
        more = f" and {len(findings) - 5} more" if len(findings) > 5 else ""
        raise VerificationError(
            f"source {shown}{more} survived de-identification", findings=findings
        )


def find_leaks_in_values(
    values: Mapping[str, Any],
    identifiers: SourceIdentifiers,
    skip_keys: frozenset[str] = frozenset(),
) -> list[tuple[str, str]]:
    """Return ``(kind, key)`` for each identifier found in a mapping of plain values.

    Used on what is written besides the dataset itself: Parquet rows, Zarr
    attributes. Nested lists and mappings are searched too; dates are compared in
    ``YYYYMMDD`` form. ``skip_keys`` names columns the de-identification wrote from
    constants.
    """
    findings = []
    for key, value in values.items():
        if key in skip_keys:
            continue
        for text in _plain_texts(value):
            kind = identifiers.find_in_text(text)
            if kind is None and text[:8] in identifiers.dates:
                kind = "date"
            if kind is None and text in identifiers.uids:
                kind = "UID"
            if kind:
                findings.append((kind, key))
    return findings


def _plain_texts(value: Any) -> Iterator[str]:
    if value is None:
        return
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from _plain_texts(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _plain_texts(item)
    elif hasattr(value, "isoformat"):
        yield value.isoformat().replace("-", "")


def _walk(
    ds: Dataset, prefix: str = "", skip_tags: frozenset[int] = frozenset()
) -> Iterator[tuple[DataElement, str]]:
    """Yield every element of ``ds`` and its file meta that can hold text.

    Numbers and bulk data cannot hold a name, date or UID: they are skipped by
    their VR, without converting their values. Paths read like
    ``RequestAttributesSequence[0].AccessionNumber``.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is not None and not prefix:
        for element in meta:
            yield element, f"file_meta.{element.keyword or element.tag}"
    for tag in list(ds.keys()):
        if not prefix and tag in skip_tags:
            continue
        vr = ds.get_item(tag).VR or _dictionary_vr(tag)
        if vr in SKIPPED_VRS or tag in BULK_TAGS:
            continue
        element = ds[tag]
        name = element.keyword or str(element.tag)
        path = f"{prefix}{name}"
        if element.VR == "SQ":
            for index, item in enumerate(element.value or ()):
                yield from _walk(item, f"{path}[{index}].")
        else:
            yield element, path


def _private_creators(ds: Dataset) -> dict[tuple[int, int], str]:
    """Return the private creator of each ``(group, block)`` of ``ds``."""
    creators = {}
    for tag in ds.keys():
        group, element_number = tag >> 16, tag & 0xFFFF
        if group & 1 and 0x0010 <= element_number <= 0x00FF:
            value = ds[tag].value
            if isinstance(value, bytes):
                value = value.decode("latin-1", errors="replace")
            creators[(group, element_number)] = str(value or "").strip()
    return creators


@lru_cache(maxsize=8192)
def _dictionary_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return "UN"


def _values(value: Any) -> list[Any]:
    if isinstance(value, (MultiValue, list, tuple)):
        return list(value)
    return [value]


def _is_short_number(text: str) -> bool:
    """Return True for numbers too short to attribute: ``12``, ``1,0``, ``3.5``."""
    if any(ch.isalpha() for ch in text):
        return False
    return sum(ch.isdigit() for ch in text) < MIN_NUMBER_DIGITS


def _binary_as_text(value: Any) -> str:
    if not isinstance(value, bytes) or len(value) > MAX_BINARY_TEXT:
        return ""
    text = value.decode("utf-8", errors="ignore").strip("\x00 ")
    printable = sum(ch.isprintable() for ch in text)
    if len(text) < MIN_TEXT_LENGTH or printable < 0.9 * len(text):
        return ""
    return text


def _occurs(value: str, text: str) -> bool:
    # The substring test rules most values out without compiling a pattern.
    if not text or value not in text:
        return False
    return re.search(_word_pattern(value, digits=False), text) is not None


def _word_pattern(value: str, *, digits: bool) -> str:
    escaped = re.escape(value)
    if digits:
        return rf"(?<![\d.]){escaped}(?![\d.])"
    if _ASCII_WORD.match(value):
        return rf"(?<![A-Za-z0-9]){escaped}(?![A-Za-z0-9])"
    return escaped
