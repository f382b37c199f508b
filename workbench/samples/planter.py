"""Invented values for the synthetic studies, and the table of attributes to fill.

DICOM PS3.15 Table E.1-1 lists every attribute the Basic Application Level
Confidentiality Profile acts on (``workbench/recipes/ps3.15-table-e.1-1.csv``).
:func:`table_e11` reads it. A :class:`Planter` invents a value for each attribute,
by VR and keyword, and records every identifying value with its attribute path:

- person names, identifiers, addresses, telephone numbers, UIDs, dates and free
  text get invented values unique to the patient;
- descriptors that the Clean Descriptors option keeps (Study Description, Allergies,
  ...) get a clinical phrase followed by one of the patient's own identifying values
  (family name, record number, accession number, a date). A cleaning step can find
  such a value, and must remove it;
- coded values and ages get plausible values that carry no identity.
"""

from __future__ import annotations

import csv
import functools
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from typing import Literal

from pydicom.charset import convert_encodings, encode_string
from pydicom.datadict import dictionary_VM, dictionary_VR
from pydicom.dataset import Dataset

from workbench.samples.identities import (
    InventedWords,
    Kind,
    PatientIdentity,
    PlantedValue,
    StudyIdentity,
    UidFactory,
)

__all__ = [
    "CODE_STRINGS",
    "DESCRIPTOR_PHRASES",
    "MAX_LENGTHS",
    "Planter",
    "TableAttribute",
    "table_e11",
    "words_of_keyword",
]

MAX_LENGTHS = {"AE": 16, "CS": 16, "SH": 16, "LO": 64, "ST": 1024, "LT": 10240}

# Descriptors get a clinical phrase before the identifying value planted in them.
DESCRIPTOR_PHRASES = {
    "StudyDescription": "CT and MR chest",
    "SeriesDescription": "axial 5 mm",
    "ProtocolName": "routine chest",
    "AdmittingDiagnosesDescription": "suspected pneumonia",
    "Allergies": "penicillin allergy",
    "MedicalAlerts": "pacemaker, MR conditional",
    "AdditionalPatientHistory": "former smoker",
    "PatientComments": "prefers morning appointments",
    "ImageComments": "motion artefact in lower slices",
    "ReasonForStudy": "lung nodule follow-up",
    "RequestedProcedureDescription": "CT chest with contrast",
    "ReasonForVisit": "persistent cough",
    "Occupation": "teacher",
    "SpecialNeeds": "wheelchair user",
    "PatientState": "stable",
    "PreMedication": "none",
    "ContrastBolusAgent": "iohexol 350",
    "ScheduledProcedureStepDescription": "CT chest",
    "PerformedProcedureStepDescription": "CT chest",
}

# Code strings that carry no identity. ModifyingDeviceID is identifying and invented.
CODE_STRINGS = {
    "SmokingStatus": "NO",
    "PatientSexNeutered": "UNALTERED",
    "GPSLatitudeRef": "N",
    "GPSLongitudeRef": "E",
    "GPSStatus": "A",
    "GPSMeasureMode": "3",
    "GPSSpeedRef": "K",
    "GPSTrackRef": "T",
    "GPSImgDirectionRef": "T",
    "GPSDestLatitudeRef": "N",
    "GPSDestLongitudeRef": "E",
    "GPSDestBearingRef": "T",
    "GPSDestDistanceRef": "K",
    "ReasonForTheAttributeModification": "COERCE",
    "InstanceOriginStatus": "LOCAL",
}

_NUMBERS: dict[str, list[str]] = {
    "LensSpecification": ["24", "70", "2.8", "4"],
    "GPSAltitude": ["35"],
    "GPSDOP": ["1.2"],
    "GPSSpeed": ["0"],
    "GPSTrack": ["90"],
    "GPSImgDirection": ["180"],
    "GPSDestBearing": ["45"],
    "GPSDestDistance": ["1.5"],
    "GPSDifferential": ["0"],
    "GPSAltitudeRef": ["0"],
    "PregnancyStatus": ["4"],
}


@dataclass(frozen=True)
class TableAttribute:
    """One row of PS3.15 Table E.1-1.

    Parameters
    ----------
    tag
        The tag as the table writes it, such as ``(0010,0010)`` or ``(60xx,3000)``.
    keyword
        The DICOM keyword; empty for rows given by tag pattern.
    vr
        The value representation from pydicom's data dictionary; ``""`` for rows
        given by tag pattern.
    descriptor
        Whether the Clean Descriptors or Retain Patient Characteristics option
        keeps a cleaned copy (action ``C``).
    characteristic
        Whether the Retain Patient Characteristics option keeps it (action ``K``).
    """

    tag: str
    keyword: str
    vr: str
    descriptor: bool
    characteristic: bool


@functools.cache
def table_e11() -> tuple[TableAttribute, ...]:
    """Return the rows of PS3.15 Table E.1-1 shipped in ``workbench/recipes``."""
    text = (
        resources.files("workbench")
        .joinpath("recipes", "ps3.15-table-e.1-1.csv")
        .read_text(encoding="utf-8")
    )
    rows = []
    for row in csv.DictReader(io.StringIO(text)):
        keyword = row["keyword"]
        vr = dictionary_VR(keyword) if keyword else ""
        rows.append(
            TableAttribute(
                tag=row["tag"],
                keyword=keyword,
                vr=vr,
                descriptor="C"
                in (row["clean_descriptors"], row["retain_patient_characteristics"]),
                characteristic=row["retain_patient_characteristics"] == "K",
            )
        )
    return tuple(rows)


def words_of_keyword(keyword: str) -> str:
    """Split a keyword into lower-case words: ``admitting diagnoses description``."""
    words = re.findall(r"[A-Z]+(?=[A-Z][a-z])|[A-Z][a-z0-9]*|[0-9]+", keyword)
    return " ".join(words).lower()


def _is_identifier(keyword: str) -> bool:
    if "Telephone" in keyword:
        return False
    return "OrderNumber" in keyword or bool(
        re.search(r"(ID|IDs|Number|Identifier|Locator)$", keyword)
    )


class Planter:
    """Invents values for one study of one patient and records each one.

    Parameters
    ----------
    patient, study
        Whose values to invent.
    words
        The corpus's source of invented words, so that words stay unique.
    uids
        The corpus's UID factory.
    """

    def __init__(
        self,
        patient: PatientIdentity,
        study: StudyIdentity,
        words: InventedWords,
        uids: UidFactory,
    ) -> None:
        self.patient = patient
        self.study = study
        self.planted: list[PlantedValue] = []
        self._words = words
        self._uids = uids
        self._inserts = [
            *patient.family_names,
            patient.patient_id,
            study.accession_number,
            study.date_text,
            patient.given_name,
            patient.birth_date.strftime("%Y%m%d"),
        ]
        self._next_insert = 0

    # Recording.

    def record(self, path: str, value: object, kind: Kind) -> None:
        """Record ``value`` (a list records each item) as planted at ``path``."""
        values = value if isinstance(value, list | tuple) else [value]
        for item in values:
            text = item.decode("utf-8") if isinstance(item, bytes) else str(item)
            self.planted.append(PlantedValue(path, text, kind))

    def put(
        self, ds: Dataset, keyword: str, value: object, kind: Kind, path: str
    ) -> None:
        """Set ``keyword`` of ``ds`` to ``value`` and record it at ``path``."""
        setattr(ds, keyword, value)
        self.record(path, value, kind)

    def put_all(
        self,
        ds: Dataset,
        values: Iterable[tuple[str, object, Kind]],
        prefix: str = "",
    ) -> None:
        """Set and record (keyword, value, kind) triples in ``ds``.

        ``prefix`` is the path of ``ds`` when it is a sequence item.
        """
        for keyword, value, kind in values:
            path = f"{prefix}.{keyword}" if prefix else keyword
            self.put(ds, keyword, value, kind, path)

    # Invented values.

    def word(
        self, path: str, *, case: Literal["title", "upper", "lower"] = "title"
    ) -> str:
        """Return a new invented word in ``case``, recorded as planted at ``path``."""
        word = self._words.word()
        if case == "upper":
            word = word.upper()
        elif case == "lower":
            word = word.lower()
        self.record(path, word, Kind.WORD)
        return word

    def digits(self) -> str:
        """Return a new run of seven digits."""
        return self._words.number()

    def identifier(self, prefix: str) -> str:
        """Return a new identifier: ``prefix`` and seven digits."""
        return f"{prefix}{self._words.number()}"

    def person_name(self, path: str, *, physician: bool = False) -> str:
        """Return a new person name; UTF-8 patients get names with umlauts."""
        family, given_name = self._words.word().upper(), self._words.word()
        if self.patient.uses_utf8:
            family = family.replace("O", "Ö", 1).replace("U", "Ü", 1)
            given_name = given_name.replace("a", "ä", 1)
        self.record(path, family, Kind.WORD)
        self.record(path, given_name, Kind.WORD)
        name = f"{family}^{given_name}"
        return f"{name}^^Dr" if physician else name

    def uid(self, path: str) -> str:
        """Return the UID of ``path`` in this study."""
        return self._uids(self.patient.index, self.study.index, path)

    def phone(self) -> str:
        """Return a new telephone number in the reserved 555 range."""
        return f"+1-555-{self._words.number()}"

    def address(self, path: str) -> str:
        """Return a new postal address."""
        street, town = self.word(path), self.word(path)
        return f"{len(street) * 7} {street} Street, {town}ville"

    def descriptor(self, phrase: str, max_length: int | None) -> str:
        """Return ``phrase`` followed by one of the patient's identifying values.

        The values rotate through the family names, the record number, the
        accession number, the study date, the given name and the birth date.
        """
        insert = self._inserts[self._next_insert % len(self._inserts)]
        self._next_insert += 1
        text = f"{phrase} {insert}"
        while max_length is not None and self._encoded_length(text) > max_length:
            phrase = phrase[:-1].rstrip()
            if len(phrase) <= 2:
                return insert
            text = f"{phrase} {insert}"
        return text

    def _encoded_length(self, text: str) -> int:
        # Length limits count bytes as encoded in the patient's character set.
        character_set = list(self.patient.character_set) or ["ISO_IR 6"]
        return len(encode_string(text, convert_encodings(character_set)))

    def value_for(
        self, attribute: TableAttribute, path: str
    ) -> tuple[object, Kind | None]:
        """Invent a value for a table attribute that is not a sequence.

        Returns
        -------
        tuple
            The value, and its kind; the kind is None for coded values and ages,
            which carry no identity.
        """
        keyword, vr = attribute.keyword, attribute.vr
        if vr == "PN":
            return self.person_name(
                path, physician="Physician" in keyword
            ), Kind.PERSON_NAME
        if vr == "DA":
            return self.study.date_text, Kind.DATE
        if vr == "DT":
            return self.study.datetime_text, Kind.DATETIME
        if vr == "TM":
            return self.study.study_time, Kind.TIME
        if vr == "UI":
            return self.uid(path), Kind.UID
        if vr == "CS":
            if keyword == "ModifyingDeviceID":
                return self.word(path, case="upper"), Kind.IDENTIFIER
            return CODE_STRINGS[keyword], None
        if vr == "US":
            return int(_NUMBERS.get(keyword, ["1"])[0]), None
        if vr in ("DS", "IS"):
            return self._number_for(keyword), Kind.NUMBER
        if vr in ("OB", "UN"):
            if keyword == "GPSVersionID":
                return b"\x02\x03\x00\x00", None
            return f"{self.word(path)} {words_of_keyword(keyword)}".encode(
                "ascii"
            ), Kind.TEXT
        if vr == "AE":
            return self.word(path, case="upper"), Kind.IDENTIFIER
        if vr == "UR":
            slug = words_of_keyword(keyword).replace(" ", "-")
            host = self.word(path, case="lower")
            return f"https://{host}.example.org/{slug}", Kind.TEXT
        if vr == "AS":
            return self.patient.age_on(self.study.study_date), None
        if attribute.descriptor:
            phrase = DESCRIPTOR_PHRASES.get(keyword, words_of_keyword(keyword))
            return self.descriptor(phrase, MAX_LENGTHS.get(vr)), Kind.TEXT
        return self._text_for(keyword, vr, path)

    def _number_for(self, keyword: str) -> list[str] | str:
        index = self.patient.index
        if keyword in ("GPSLatitude", "GPSDestLatitude"):
            values = [str(40 + index), str(10 + index), "30.5"]
        elif keyword in ("GPSLongitude", "GPSDestLongitude"):
            values = [str(8 + index), str(20 + index), "12.25"]
        else:
            count = int(dictionary_VM(keyword).split("-")[0])
            values = _NUMBERS.get(keyword, ["1"] * count)
        return values if len(values) > 1 else values[0]

    def _text_for(self, keyword: str, vr: str, path: str) -> tuple[str, Kind]:
        max_length = MAX_LENGTHS.get(vr)
        if _is_identifier(keyword):
            prefix = "".join(c for c in keyword if c.isupper())[:4] or "ID"
            return self.identifier(prefix), Kind.IDENTIFIER
        if "Telephone" in keyword:
            return self.phone(), Kind.TEXT
        if "Telecom" in keyword:
            mailbox = self.word(path, case="lower")
            return f"tel:{self.phone()};mailto:{mailbox}@example.org", Kind.TEXT
        if "Address" in keyword:
            return self.address(path), Kind.TEXT
        word = self.word(path)
        if "Institution" in keyword or "Organization" in keyword:
            text = f"{word} General Hospital"
        else:
            text = f"{word} {words_of_keyword(keyword)}"
        if max_length is not None:
            text = text[:max_length].rstrip()
        return text, Kind.TEXT
