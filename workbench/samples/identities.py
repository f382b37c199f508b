"""Invented patient identities for the synthetic studies, and the record of each value.

Every value that could identify a patient in a real archive (names, ids, dates,
addresses, telephone numbers, UIDs, free text) is invented here, deterministically
from a seed, and recorded as a :class:`PlantedValue` with the attribute path that
carries it. Tests search de-identified output for these strings: a hit names the
patient and the attribute the value leaked from.

The invented words are pronounceable nonsense ("Korvantel") and unique across a
corpus, so that a word found in an output file belongs to exactly one planted value.
Numeric identifiers always carry a letter prefix ("MRN4821390"), because bare digit
runs also occur inside the 2.25 UIDs that de-identification produces.
"""

from __future__ import annotations

import datetime
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum

from pydicom.uid import generate_uid

__all__ = [
    "MIN_COMPONENT_BYTES",
    "SEARCHABLE_KINDS",
    "InventedWords",
    "Kind",
    "PatientIdentity",
    "PlantedValue",
    "StudyIdentity",
    "UidFactory",
    "invent_patient",
    "invent_study",
    "searchable_strings",
]


class Kind(StrEnum):
    """Kind of a planted value."""

    PERSON_NAME = "person name"
    IDENTIFIER = "identifier"
    DATE = "date"
    DATETIME = "datetime"
    TIME = "time"
    UID = "uid"
    TEXT = "text"
    WORD = "word"
    NUMBER = "number"


# Kinds that must never appear in de-identified output. Times of day are left out
# because the Retain Longitudinal Temporal Information option keeps them, and
# numbers (GPS coordinates, sizes) because short digit strings occur by chance.
SEARCHABLE_KINDS = frozenset(
    {
        Kind.PERSON_NAME,
        Kind.IDENTIFIER,
        Kind.DATE,
        Kind.DATETIME,
        Kind.UID,
        Kind.TEXT,
        Kind.WORD,
    }
)

# Person name components shorter than this many UTF-8 bytes (a middle initial "A",
# a prefix "Dr") are not searched for on their own: they occur everywhere.
MIN_COMPONENT_BYTES = 4

_SYLLABLES = (
    "bar", "cel", "dor", "fen", "gal", "hol", "ish", "jor", "kel", "lun", "mar",
    "nor", "ost", "pel", "quin", "ril", "sar", "tov", "ulm", "vel", "wyn", "zan",
    "bek", "tirn",
)  # fmt: skip
# Attempts at a three-syllable word before words get four syllables.
_SHORT_WORD_ATTEMPTS = 20


@dataclass(frozen=True)
class PlantedValue:
    """An invented identifying value and the attribute that carries it.

    Parameters
    ----------
    path
        Where the value sits: a keyword, a sequence path such as
        ``RequestAttributesSequence[0].RequestingPhysician``, or a private element
        in recipe notation such as ``(0011,"WBSYN PATIENT INFO",10)``.
    value
        The value as decoded text (for binary values, the text inside the bytes).
    kind
        What sort of value it is.
    """

    path: str
    value: str
    kind: Kind


def searchable_strings(
    planted: Iterable[PlantedValue], kinds: Iterable[str] = SEARCHABLE_KINDS
) -> set[str]:
    """Return the strings to search output for, from values of the given kinds.

    A person name contributes the whole value, each ``=``-separated group and each
    component of at least :data:`MIN_COMPONENT_BYTES` UTF-8 bytes.
    """
    selected = set(kinds)
    strings: set[str] = set()
    for planted_value in planted:
        if planted_value.kind not in selected or not planted_value.value:
            continue
        strings.add(planted_value.value)
        if planted_value.kind == Kind.PERSON_NAME:
            strings.update(_name_parts(planted_value.value))
    return strings


def _name_parts(name: str) -> set[str]:
    parts: set[str] = set()
    for group in name.split("="):
        if group.strip("^"):
            parts.add(group)
        for component in group.split("^"):
            if len(component.encode("utf-8")) >= MIN_COMPONENT_BYTES:
                parts.add(component)
    return parts


class InventedWords:
    """Source of pronounceable invented words and numbers, unique within one corpus.

    Parameters
    ----------
    rng
        The corpus's random generator; the same seed gives the same words.
    """

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng
        self._used: set[str] = set()

    def word(self) -> str:
        """Return a new capitalised word such as ``Korvantel``."""
        attempts = 0
        while True:
            syllables = 3 if attempts < _SHORT_WORD_ATTEMPTS else 4
            attempts += 1
            word = "".join(self._rng.choice(_SYLLABLES) for _ in range(syllables))
            word = word.capitalize()
            if word.lower() not in self._used:
                self._used.add(word.lower())
                return word

    def number(self, digits: int = 7) -> str:
        """Return a new run of ``digits`` decimal digits, not starting with 0."""
        while True:
            text = str(self._rng.randrange(10 ** (digits - 1), 10**digits))
            if text not in self._used:
                self._used.add(text)
                return text


@dataclass(frozen=True)
class _Profile:
    patient_name: str
    character_set: tuple[str, ...]
    sex: str
    age_years: int


# The first patients of every corpus: one each for the default repertoire, UTF-8,
# and a three-group Japanese name in ISO 2022, so that every corpus tests decoding.
_FIXED_PROFILES = (
    _Profile("DOERING^JANE^MARGARET", (), "F", 93),
    _Profile("MÜLLER^JÜRGEN", ("ISO_IR 192",), "M", 58),
    _Profile(
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        ("", "ISO 2022 IR 87"),
        "M",
        41,
    ),
    _Profile("ROEBUCK^RICHARD^A", (), "M", 67),
)


@dataclass
class PatientIdentity:
    """The invented identity of one synthetic patient.

    Parameters
    ----------
    index
        Position of the patient in the corpus, from 0.
    label
        Folder name of the patient's files (``patient-01``); carries no identity.
    patient_name
        The PN value as Python text, for example ``MÜLLER^JÜRGEN``.
    patient_id
        The medical record number.
    birth_date
        Date of birth.
    sex
        ``F`` or ``M``.
    character_set
        Specific Character Set values; empty for the default repertoire.
    first_study_date
        Date of the patient's first study; later studies follow at least 400 days
        apart.
    size_m, weight_kg
        Patient Size and Patient Weight, kept by the Retain Patient Characteristics
        option.
    planted
        Every identifying value planted for this patient, in every study.
    """

    index: int
    label: str
    patient_name: str
    patient_id: str
    birth_date: datetime.date
    sex: str
    character_set: tuple[str, ...]
    first_study_date: datetime.date
    size_m: str
    weight_kg: str
    planted: list[PlantedValue] = field(default_factory=list)

    @property
    def name_groups(self) -> list[str]:
        """The alphabetic, ideographic and phonetic groups of the name, if present."""
        return self.patient_name.split("=")

    @property
    def family_names(self) -> list[str]:
        """The family name component of each group of the name."""
        return [group.split("^")[0] for group in self.name_groups if group]

    @property
    def given_name(self) -> str:
        """The given name component of the alphabetic group."""
        components = self.name_groups[0].split("^")
        return components[1] if len(components) > 1 else ""

    @property
    def uses_utf8(self) -> bool:
        """Whether the patient's instances are encoded in UTF-8 (ISO_IR 192)."""
        return "ISO_IR 192" in self.character_set

    def age_on(self, day: datetime.date) -> str:
        """Return Patient Age on ``day`` as an AS value such as ``093Y``."""
        years = day.year - self.birth_date.year
        if (day.month, day.day) < (self.birth_date.month, self.birth_date.day):
            years -= 1
        return f"{years:03d}Y"

    def identifying_values(self, kinds: Iterable[str] = SEARCHABLE_KINDS) -> set[str]:
        """Return the strings planted for this patient that output must not contain."""
        return searchable_strings(self.planted, kinds)


@dataclass(frozen=True)
class StudyIdentity:
    """The invented identity of one study: its date, time and identifiers.

    Parameters
    ----------
    index
        Position of the study among the patient's studies, from 0.
    label
        Folder name of the study (``study-01``); carries no identity.
    study_instance_uid, frame_of_reference_uid
        UIDs shared by every series of the study.
    study_date
        Date of the study; every other date of the study equals it.
    study_time
        Study Time as a TM value ``HHMMSS``.
    accession_number, study_id
        Identifiers of the study.
    """

    index: int
    label: str
    study_instance_uid: str
    frame_of_reference_uid: str
    study_date: datetime.date
    study_time: str
    accession_number: str
    study_id: str

    @property
    def date_text(self) -> str:
        """Study Date as a DA value ``YYYYMMDD``."""
        return self.study_date.strftime("%Y%m%d")

    @property
    def datetime_text(self) -> str:
        """Study date and time as a DT value ``YYYYMMDDHHMMSS``."""
        return self.date_text + self.study_time


def invent_patient(
    index: int, words: InventedWords, rng: random.Random
) -> PatientIdentity:
    """Invent patient number ``index`` of a corpus.

    The first four patients have fixed names that exercise character sets; later
    ones get invented names. The first patient is 93 years old at the first study,
    above the age of 89 that the Basic Profile caps.
    """
    if index < len(_FIXED_PROFILES):
        profile = _FIXED_PROFILES[index]
    else:
        name = f"{words.word().upper()}^{words.word()}"
        profile = _Profile(name, (), rng.choice("FM"), rng.randrange(20, 86))

    # Patients' studies fall in different years, so that one patient's planted dates
    # stay apart from another's even after a shift of up to a year.
    year = 2004 + (4 * index) % 20
    first_study_date = datetime.date(
        year, 1 + (5 * index) % 12, 1
    ) + datetime.timedelta(days=rng.randrange(0, 28))
    birth_date = datetime.date(
        first_study_date.year - profile.age_years - 1,
        first_study_date.month,
        1,
    ) + datetime.timedelta(days=rng.randrange(40, 300))
    height = 1.50 + rng.randrange(0, 40) / 100
    weight = 48 + rng.randrange(0, 50) + rng.randrange(0, 10) / 10
    return PatientIdentity(
        index=index,
        label=f"patient-{index + 1:02d}",
        patient_name=profile.patient_name,
        patient_id=f"MRN{words.number()}",
        birth_date=birth_date,
        sex=profile.sex,
        character_set=profile.character_set,
        first_study_date=first_study_date,
        size_m=f"{height:.2f}",
        weight_kg=f"{weight:.1f}",
    )


def invent_study(
    patient: PatientIdentity,
    index: int,
    words: InventedWords,
    rng: random.Random,
    uid_factory: UidFactory,
) -> StudyIdentity:
    """Invent study number ``index`` of ``patient``, at least 400 days after the last.

    Study ``index`` falls 600 days times ``index``, plus up to 199 days, after the
    first study date.
    """
    offset = 0 if index == 0 else index * 600 + rng.randrange(0, 200)
    study_date = patient.first_study_date + datetime.timedelta(days=offset)
    hour, minute, second = rng.randrange(7, 18), rng.randrange(60), rng.randrange(60)
    study_time = f"{hour:02d}{minute:02d}{second:02d}"
    return StudyIdentity(
        index=index,
        label=f"study-{index + 1:02d}",
        study_instance_uid=uid_factory(patient.index, index, "StudyInstanceUID"),
        frame_of_reference_uid=uid_factory(patient.index, index, "FrameOfReferenceUID"),
        study_date=study_date,
        study_time=study_time,
        accession_number=f"ACC{words.number()}",
        study_id=f"ST{words.number(6)}",
    )


class UidFactory:
    """Deterministic UIDs under pydicom's root, from the seed and a context.

    Parameters
    ----------
    seed
        The corpus seed, or a name for fixtures; different seeds give disjoint
        UIDs.
    """

    def __init__(self, seed: int | str) -> None:
        self._seed = seed

    def __call__(self, *context: object) -> str:
        """Return the UID for ``context``; the same context gives the same UID."""
        sources = [
            f"workbench-synthetic-{self._seed}",
            *(str(part) for part in context),
        ]
        return str(generate_uid(entropy_srcs=sources))
