"""Field cases: small DICOM inputs that reproduce how DICOM goes wrong in practice.

Each case rebuilds, with invented identities, a kind of input that widely used
DICOM and de-identification tools have been reported to mishandle. A builder writes
the case's files and returns a :class:`FieldCase` that records what was planted where
and what the right behaviour is, so that ingest and de-identification tests can
assert it:

F1
    Identity nested one to four levels deep in sequences.
F2
    UIDs inside reference sequences that point at other instances of the study.
F3
    Private blocks holding identity; one allow-listed private element.
F4
    Person names in UTF-8, in three-group ISO 2022 Japanese, in Latin-1, and
    under misspelled Specific Character Set terms.
F5
    Other patient identities: other ids with their issuers, other names, the
    mother's birth name.
F6
    One study written as two batches, with the patient name once without and once
    with a trailing caret.
F7
    A dataset without preamble and file meta, files truncated inside the pixel data
    and inside a sequence, and a text file named ``.dcm``.
F8
    Values that violate their VR.
F9
    A 1-bit segmentation whose 3x3 frames are packed across byte boundaries.
F10
    Every common transfer syntax (see :mod:`workbench.samples.pixel_cases`).
F11
    All of the above together, plus files whose multi-valued attributes hold one
    value in one file and several in another.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom import config
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
)

from workbench.errors import ConfigurationError
from workbench.samples.identities import (
    SEARCHABLE_KINDS,
    Kind,
    PlantedValue,
    searchable_strings,
)
from workbench.samples.planting import (
    PRIVATE_GLOBAL_ID_CREATOR,
    PRIVATE_PATIENT_CREATOR,
    SIEMENS_MR_HEADER,
    plant_patient,
    plant_study,
)
from workbench.samples.sequence_items import build_content_tree
from workbench.samples.small_instances import (
    image_reference,
    new_subject,
    small_image,
    write_part10,
)

__all__ = ["FIELD_CASES", "FieldCase", "build_field_case"]

log = logging.getLogger(__name__)

FIELD_CASES: tuple[str, ...] = tuple(f"F{number}" for number in range(1, 12))


@dataclass
class FieldCase:
    """The files of one field case and what a correct pipeline does with them.

    Parameters
    ----------
    case_id
        ``F1`` to ``F11``.
    title
        What the input is, in a few words.
    expected
        The right behaviour, in plain words.
    files
        Every file written, in a stable order.
    roles
        Files (or folders) by the part they play in the case, such as
        ``"headerless"`` or ``"batch-1"``.
    planted
        The invented identifying values and their attribute paths.
    facts
        Case-specific values a test asserts, documented by each builder.
    """

    case_id: str
    title: str
    expected: str
    files: list[Path] = field(default_factory=list)
    roles: dict[str, Path] = field(default_factory=dict)
    planted: list[PlantedValue] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)

    def identifying_values(self, kinds: Iterable[str] = SEARCHABLE_KINDS) -> set[str]:
        """Return the planted strings that de-identified output must not contain."""
        return searchable_strings(self.planted, kinds)


def build_field_case(case_id: str, out: Path) -> FieldCase:
    """Write the input of field case ``case_id`` under ``out`` and describe it.

    Parameters
    ----------
    case_id
        One of :data:`FIELD_CASES`, case-insensitive.
    out
        Folder to write to; created if missing.

    Raises
    ------
    ConfigurationError
        When ``case_id`` is not a known case.
    """
    key = case_id.upper()
    builder = _BUILDERS.get(key)
    if builder is None:
        raise ConfigurationError(
            f"unknown field case {case_id!r}; expected one of {', '.join(FIELD_CASES)}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    case = builder(out)
    log.info("wrote field case %s: %d files", key, len(case.files))
    return case


# The builders, one per case.


def _build_f1(out: Path) -> FieldCase:
    """Write F1: identity nested in sequences.

    facts: ``nested_paths``, the attribute paths below top level that hold planted
    values; ``max_depth``, the deepest sequence nesting (4, a person name in
    RequestAttributesSequence > ScheduledProtocolCodeSequence >
    ProtocolContextSequence > ContentItemModifierSequence).
    """
    subject = new_subject("F1", "NESTWICK^ORLANDO")
    ds = small_image(
        subject, series_uid=subject.uids("series"), sop_uid=subject.uids("sop")
    )
    plant_patient(ds, subject.planter)
    plant_study(ds, subject.planter)
    ds.ContentSequence = build_content_tree(subject.planter, "ContentSequence")
    path = write_part10(ds, out / "nested.dcm")
    nested = sorted({v.path for v in subject.planter.planted if "." in v.path})
    return FieldCase(
        case_id="F1",
        title="identity inside sequences, up to four levels deep",
        expected=(
            "Every planted value is cleaned at every depth by the same rules as at"
            " top level: RequestAttributesSequence (accession number, requested"
            " procedure id, requesting physician, a date), ReferencedPatientSequence"
            " with a copy of the patient module, person names, dates and UIDs in"
            " PerformedProtocolCodeSequence > ProtocolContextSequence >"
            " ContentItemModifierSequence and in a ContentSequence tree."
        ),
        files=[path],
        roles={"nested": path},
        planted=subject.planter.planted,
        facts={"nested_paths": nested, "max_depth": max(p.count("[") for p in nested)},
    )


def _build_f2(out: Path) -> FieldCase:
    """Write F2: UIDs in reference sequences.

    facts: ``references``, one dict per reference with ``file``, ``path`` (the
    attribute path of the referencing UID), ``value`` and ``target`` (the keyword
    it must still equal after remapping: ``SOPInstanceUID`` of ``target_file``,
    or ``SeriesInstanceUID``/``StudyInstanceUID``).
    """
    subject = new_subject("F2", "LINKLATER^PRUDENCE")
    ct_series, mr_series = subject.uids("series-ct"), subject.uids("series-mr")
    ct_uids = [subject.uids(f"ct-{k}") for k in range(3)]
    mr_uids = [subject.uids(f"mr-{k}") for k in range(2)]
    study_uid = subject.study.study_instance_uid
    files: list[Path] = []
    references: list[dict[str, Any]] = []
    paths = {uid: out / f"ct-{k + 1}.dcm" for k, uid in enumerate(ct_uids)}
    paths |= {uid: out / f"mr-{k + 1}.dcm" for k, uid in enumerate(mr_uids)}

    def note(path: Path, attribute: str, value: str, target: str) -> None:
        references.append(
            {
                "file": path,
                "path": attribute,
                "value": value,
                "target": target,
                "target_file": paths.get(value),
            }
        )

    for k, uid in enumerate(ct_uids):
        ds = small_image(
            subject, series_uid=ct_series, sop_uid=uid, instance_number=k + 1
        )
        neighbour = ct_uids[(k + 1) % len(ct_uids)]
        ds.ReferencedImageSequence = [image_reference(CTImageStorage, neighbour)]
        ds.RelatedSeriesSequence = [_related_series(study_uid, mr_series)]
        ds.ReferencedStudySequence = [
            image_reference("1.2.840.10008.3.1.2.3.1", study_uid)
        ]
        files.append(write_part10(ds, paths[uid]))
        note(
            paths[uid],
            "ReferencedImageSequence[0].ReferencedSOPInstanceUID",
            neighbour,
            "SOPInstanceUID",
        )
        note(
            paths[uid],
            "RelatedSeriesSequence[0].SeriesInstanceUID",
            mr_series,
            "SeriesInstanceUID",
        )
        note(
            paths[uid],
            "RelatedSeriesSequence[0].StudyInstanceUID",
            study_uid,
            "StudyInstanceUID",
        )
        note(
            paths[uid],
            "ReferencedStudySequence[0].ReferencedSOPInstanceUID",
            study_uid,
            "StudyInstanceUID",
        )
    for k, uid in enumerate(mr_uids):
        ds = small_image(
            subject,
            series_uid=mr_series,
            sop_uid=uid,
            modality="MR",
            instance_number=k + 1,
        )
        source = mr_uids[(k + 1) % len(mr_uids)]
        ds.ReferencedImageSequence = [image_reference(CTImageStorage, ct_uids[1])]
        ds.SourceImageSequence = [image_reference(MRImageStorage, source)]
        ds.RelatedSeriesSequence = [_related_series(study_uid, ct_series)]
        files.append(write_part10(ds, paths[uid]))
        note(
            paths[uid],
            "ReferencedImageSequence[0].ReferencedSOPInstanceUID",
            ct_uids[1],
            "SOPInstanceUID",
        )
        note(
            paths[uid],
            "SourceImageSequence[0].ReferencedSOPInstanceUID",
            source,
            "SOPInstanceUID",
        )
        note(
            paths[uid],
            "RelatedSeriesSequence[0].SeriesInstanceUID",
            ct_series,
            "SeriesInstanceUID",
        )
        note(
            paths[uid],
            "RelatedSeriesSequence[0].StudyInstanceUID",
            study_uid,
            "StudyInstanceUID",
        )
    return FieldCase(
        case_id="F2",
        title="UIDs in reference sequences pointing within the study",
        expected=(
            "Every UID inside ReferencedImageSequence, SourceImageSequence,"
            " RelatedSeriesSequence and ReferencedStudySequence is mapped through the"
            " same keyed table as the top-level UIDs, so after de-identification each"
            " reference still equals the new UID of the instance, series or study it"
            " points at."
        ),
        files=files,
        roles={path.stem: path for path in files},
        planted=subject.planter.planted,
        facts={"references": references},
    )


def _related_series(study_uid: str, series_uid: str) -> Dataset:
    item = Dataset()
    item.StudyInstanceUID = study_uid
    item.SeriesInstanceUID = series_uid
    item.PurposeOfReferenceCodeSequence = []
    return item


def _build_f3(out: Path) -> FieldCase:
    """Write F3: private blocks.

    facts: ``allow_listed`` is the private element to keep, in recipe notation.
    ``kept`` maps each file to the tag the element sits at and its value
    (``"1000"``). ``removed`` maps each file to the tags that must be gone.
    """
    subject = new_subject("F3", "PRIVETT^CASSIUS")
    patient = subject.patient
    series = subject.uids("series")
    global_id = subject.planter.identifier("GPI")

    # Instance A: the Siemens block at the first private block number, an orphan
    # element whose block has no creator.
    first = small_image(
        subject, series_uid=series, sop_uid=subject.uids("a"), modality="MR"
    )
    block = first.private_block(0x0011, PRIVATE_PATIENT_CREATOR, create=True)
    block.add_new(0x10, "PN", patient.patient_name)
    block.add_new(0x11, "LO", patient.patient_id)
    block = first.private_block(0x0013, PRIVATE_GLOBAL_ID_CREATOR, create=True)
    block.add_new(0x10, "LO", global_id)
    first.private_block(0x0019, SIEMENS_MR_HEADER, create=True).add_new(
        0x0C, "IS", "1000"
    )
    first.add_new(0x00151010, "LO", patient.patient_id)
    first_path = write_part10(first, out / "siemens-first-block.dcm")

    # Instance B: another creator takes block 10 of group 0019 and puts the name at
    # element 0C, where the Siemens b-value sat in instance A.
    second = small_image(
        subject,
        series_uid=series,
        sop_uid=subject.uids("b"),
        modality="MR",
        instance_number=2,
    )
    second.private_block(0x0019, "WBSYN DECOY", create=True).add_new(
        0x0C, "PN", patient.patient_name
    )
    second.private_block(0x0019, SIEMENS_MR_HEADER, create=True).add_new(
        0x0C, "IS", "1000"
    )
    second_path = write_part10(second, out / "siemens-second-block.dcm")

    planter = subject.planter
    creator = f'(0011,"{PRIVATE_PATIENT_CREATOR}",%02X)'
    planter.record(creator % 0x10, patient.patient_name, Kind.PERSON_NAME)
    planter.record(creator % 0x11, patient.patient_id, Kind.IDENTIFIER)
    planter.record(
        f'(0013,"{PRIVATE_GLOBAL_ID_CREATOR}",10)', global_id, Kind.IDENTIFIER
    )
    planter.record("(0015,1010)", patient.patient_id, Kind.IDENTIFIER)
    planter.record('(0019,"WBSYN DECOY",0C)', patient.patient_name, Kind.PERSON_NAME)
    return FieldCase(
        case_id="F3",
        title="private blocks holding identity, and one allow-listed element",
        expected=(
            "Private elements are removed unless their (private creator, element"
            " offset) pair is on the allow-list: the Siemens b-value"
            ' (0019,"SIEMENS MR HEADER",0C) stays in both files, at (0019,100C) in'
            " one and (0019,110C) in the other. The name that another creator put at"
            " (0019,100C) and the element without a private creator are removed."
        ),
        files=[first_path, second_path],
        roles={"siemens-first-block": first_path, "siemens-second-block": second_path},
        planted=planter.planted,
        facts={
            "allow_listed": f'(0019,"{SIEMENS_MR_HEADER}",0C)',
            "kept": {
                first_path: ("(0019,100C)", "1000"),
                second_path: ("(0019,110C)", "1000"),
            },
            "removed": {
                first_path: [
                    "(0011,1010)",
                    "(0011,1011)",
                    "(0013,1010)",
                    "(0015,1010)",
                ],
                second_path: ["(0019,100C)"],
            },
        },
    )


def _build_f4(out: Path) -> FieldCase:
    """Write F4: person names in several character sets.

    facts: ``decoded``, per file the PatientName and ReferringPhysicianName as
    Python text; ``character_sets``, per file the Specific Character Set bytes as
    written, misspellings included.
    """
    variants: tuple[tuple[str, tuple[str, ...], str | None, str, str], ...] = (
        # File stem, character set, misspelling written over it, two names.
        ("utf8", ("ISO_IR 192",), None, "MÜLLER^JÜRGEN", "ŠKODA^ŽOFIE"),
        (
            "iso2022-japanese",
            ("", "ISO 2022 IR 87"),
            None,
            "Yamada^Tarou=山田^太郎=やまだ^たろう",
            "Suzuki^Hanako=鈴木^花子=すずき^はなこ",
        ),
        ("latin1", ("ISO_IR 100",), None, "GARÇON^ÉLODIE", "LEFÈVRE^HÉLÈNE"),
        (
            "misspelled-utf8",
            ("ISO_IR 192",),
            "ISO-IR 192",
            "ÖZTÜRK^AYŞE",
            "ÇELİK^MEHMET",
        ),
        (
            "misspelled-latin1",
            ("ISO_IR 100",),
            "ISO_IR100",
            "NUÑEZ^ÁNGELA",
            "SØRENSEN^ÅSE",
        ),
    )
    files: list[Path] = []
    planted: list[PlantedValue] = []
    decoded: dict[Path, dict[str, str]] = {}
    written: dict[Path, str] = {}
    for stem, character_set, misspelling, name, physician in variants:
        subject = new_subject(f"F4-{stem}", name, character_set)
        ds = small_image(
            subject, series_uid=subject.uids("series"), sop_uid=subject.uids("sop")
        )
        ds.ReferringPhysicianName = physician
        ds.OtherPatientNames = [name]
        subject.planter.record("ReferringPhysicianName", physician, Kind.PERSON_NAME)
        subject.planter.record("OtherPatientNames", name, Kind.PERSON_NAME)
        path = write_part10(ds, out / f"{stem}.dcm")
        if misspelling is not None:
            # Padded to the same length, so the element's length field stays right.
            correct = character_set[0].encode()
            wrong = misspelling.encode().ljust(len(correct))
            path.write_bytes(path.read_bytes().replace(correct, wrong, 1))
        files.append(path)
        planted.extend(subject.planter.planted)
        decoded[path] = {"PatientName": name, "ReferringPhysicianName": physician}
        written[path] = misspelling or "\\".join(character_set)
    return FieldCase(
        case_id="F4",
        title="person names in UTF-8, ISO 2022 Japanese, Latin-1 and misspelled sets",
        expected=(
            "Names are decoded with their Specific Character Set (a misspelled term"
            " such as 'ISO-IR 192' read as the term it stands for), every group of a"
            " multi-group name is replaced, and verification compares decoded text,"
            " so a surviving 山田 is found whatever its byte encoding."
        ),
        files=files,
        roles={path.stem: path for path in files},
        planted=planted,
        facts={"decoded": decoded, "character_sets": written},
    )


def _build_f5(out: Path) -> FieldCase:
    """Write F5: other patient identities.

    facts: ``removed``, the keywords that must be absent after de-identification.
    """
    subject = new_subject("F5", "OTHERTON^BEATRIX")
    ds = small_image(
        subject, series_uid=subject.uids("series"), sop_uid=subject.uids("sop")
    )
    plant_patient(ds, subject.planter)
    qualifiers = Dataset()
    qualifiers.UniversalEntityID = f"2.16.840.1.113883.19.{subject.planter.digits()}"
    qualifiers.UniversalEntityIDType = "ISO"
    ds.IssuerOfPatientIDQualifiersSequence = [qualifiers]
    subject.planter.record(
        "IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID",
        qualifiers.UniversalEntityID,
        Kind.IDENTIFIER,
    )
    path = write_part10(ds, out / "other-identities.dcm")
    return FieldCase(
        case_id="F5",
        title="other patient ids, other names and the mother's birth name",
        expected=(
            "OtherPatientIDsSequence (each item's PatientID and IssuerOfPatientID),"
            " OtherPatientIDs, OtherPatientNames, PatientBirthName,"
            " PatientMotherBirthName, IssuerOfPatientID and its qualifiers are all"
            " removed."
        ),
        files=[path],
        roles={"other-identities": path},
        planted=subject.planter.planted,
        facts={
            "removed": [
                "OtherPatientIDsSequence",
                "OtherPatientIDs",
                "OtherPatientNames",
                "PatientBirthName",
                "PatientMotherBirthName",
                "IssuerOfPatientID",
                "IssuerOfPatientIDQualifiersSequence",
            ]
        },
    )


def _build_f6(out: Path) -> FieldCase:
    """Write F6: one study in two batches.

    facts: ``batches``, the files of each batch; ``patient_names``, the name as
    written in each batch; ``study_instance_uid``, ``frame_of_reference_uid`` and
    ``ct_series_instance_uid``, the source UIDs both batches share.
    """
    subject = new_subject("F6", "TWOFOLD^MARTHA")
    ct_series, mr_series = subject.uids("series-ct"), subject.uids("series-mr")
    batches: list[list[Path]] = [[], []]
    names = ["TWOFOLD^MARTHA", "TWOFOLD^MARTHA^"]
    for k in range(6):
        batch = 0 if k < 3 else 1
        ds = small_image(
            subject,
            series_uid=ct_series,
            sop_uid=subject.uids(f"ct-{k}"),
            instance_number=k + 1,
        )
        ds.PatientName = names[batch]
        batches[batch].append(
            write_part10(ds, out / f"batch-{batch + 1}" / f"ct-{k + 1}.dcm")
        )
    for k in range(2):
        ds = small_image(
            subject,
            series_uid=mr_series,
            sop_uid=subject.uids(f"mr-{k}"),
            modality="MR",
            instance_number=k + 1,
        )
        ds.PatientName = names[1]
        batches[1].append(write_part10(ds, out / "batch-2" / f"mr-{k + 1}.dcm"))
    subject.planter.record("PatientName", names[1], Kind.PERSON_NAME)
    return FieldCase(
        case_id="F6",
        title="one study ingested in two runs; name with and without trailing caret",
        expected=(
            "Ingesting batch-1 and then batch-2 in separate runs gives one patient"
            " pseudonym (the names differ only by a trailing empty component, which"
            " PS3.5 says is the same name), one new StudyInstanceUID, one new"
            " FrameOfReferenceUID and one new SeriesInstanceUID for the CT series"
            " that both batches hold."
        ),
        files=batches[0] + batches[1],
        roles={"batch-1": out / "batch-1", "batch-2": out / "batch-2"},
        planted=subject.planter.planted,
        facts={
            "batches": batches,
            "patient_names": names,
            "study_instance_uid": subject.study.study_instance_uid,
            "frame_of_reference_uid": subject.study.frame_of_reference_uid,
            "ct_series_instance_uid": ct_series,
        },
    )


def _build_f7(out: Path) -> FieldCase:
    """Write F7: broken and impostor files.

    facts: ``reasons``, per role the outcome of
    :func:`workbench.dicomio.read_instance` (``"ok"`` or a
    :class:`~workbench.errors.DicomReadError` reason); ``transfer_syntaxes``, per
    headerless role the transfer syntax to infer.
    """
    subject = new_subject("F7", "HEADLESS^CORNELIUS")
    series = subject.uids("series")
    roles: dict[str, Path] = {}

    # Datasets without preamble and file meta, in both little-endian encodings.
    for role, implicit in (
        ("headerless-implicit", True),
        ("headerless-explicit", False),
    ):
        ds = small_image(subject, series_uid=series, sop_uid=subject.uids(role))
        del ds.file_meta
        roles[role] = out / f"{role}.dcm"
        pydicom.dcmwrite(
            roles[role],
            ds,
            implicit_vr=implicit,
            little_endian=True,
            enforce_file_format=False,
        )

    # A complete file cut in the middle of its pixel data.
    ds = small_image(
        subject, series_uid=series, sop_uid=subject.uids("truncated"), size=32
    )
    whole = write_part10(ds, out / "whole.dcm").read_bytes()
    (out / "whole.dcm").unlink()
    roles["truncated-pixel-data"] = out / "truncated-pixel-data.dcm"
    roles["truncated-pixel-data"].write_bytes(whole[: len(whole) - 32 * 32])

    # A file cut inside a sequence item, before the pixel data.
    ds = small_image(subject, series_uid=series, sop_uid=subject.uids("truncated-sq"))
    plant_study(ds, subject.planter)
    whole = write_part10(ds, out / "whole.dcm").read_bytes()
    (out / "whole.dcm").unlink()
    cut = whole.index(
        subject.study.accession_number.encode(), whole.index(b"\x40\x00\x75\x02")
    )
    roles["truncated-sequence"] = out / "truncated-sequence.dcm"
    roles["truncated-sequence"].write_bytes(whole[: cut + 3])

    # A referral letter saved with a .dcm name.
    roles["text"] = out / "referral-letter.dcm"
    roles["text"].write_text(
        f"Referral letter\nPatient: {subject.patient.patient_name}\n"
        f"Record number: {subject.patient.patient_id}\nPlease image the chest.\n",
        encoding="utf-8",
    )
    return FieldCase(
        case_id="F7",
        title="no preamble or file meta; truncated files; a text file named .dcm",
        expected=(
            "The headerless datasets are read with their transfer syntax inferred"
            " (Implicit and Explicit VR Little Endian). The truncated files are"
            " quarantined with reason 'truncated'. The text file is rejected with"
            " reason 'not-dicom' and never wrapped into a DICOM file."
        ),
        files=list(roles.values()),
        roles=roles,
        planted=subject.planter.planted,
        facts={
            "reasons": {
                "headerless-implicit": "ok",
                "headerless-explicit": "ok",
                "truncated-pixel-data": "truncated",
                "truncated-sequence": "truncated",
                "text": "not-dicom",
            },
            "transfer_syntaxes": {
                "headerless-implicit": ImplicitVRLittleEndian,
                "headerless-explicit": ExplicitVRLittleEndian,
            },
        },
    )


# VR violations of F8: keyword, VR, raw value, the typed value a reader should
# produce (None when ambiguous), and whether the raw text must be kept and flagged.
_VR_VIOLATIONS: tuple[tuple[str, str, bytes, object, bool], ...] = (
    ("AcquisitionNumber", "IS", b"14.5", None, True),
    ("SliceThickness", "DS", b"1.23456789012345678 ", 1.23456789012345678, True),
    ("PixelSpacing", "DS", b"0,5\\0,5 ", None, True),
    ("ManufacturerModelName", "LO", b"M" * 200, "M" * 200, True),
    ("SeriesNumber", "IS", b"", None, False),
    ("AcquisitionDate", "DA", b"2016-09-12", None, True),
    ("AcquisitionTime", "TM", b"10:15:00", None, True),
    ("PatientSize", "DS", b"1.68m ", None, True),
)


def _build_f8(out: Path) -> FieldCase:
    """Write F8: values that violate their VR.

    facts: ``violations``, one dict per element with ``keyword``, ``vr``, ``raw``
    (the bytes written), ``expected`` (the typed value, or None) and ``flagged``
    (whether the raw text must be kept and flagged).
    """
    subject = new_subject("F8", "BADVALUE^OCTAVIA")
    ds = small_image(
        subject, series_uid=subject.uids("series"), sop_uid=subject.uids("sop")
    )
    violations = []
    for keyword, vr, raw, expected, flagged in _VR_VIOLATIONS:
        tag = Tag(keyword)
        ds[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
        violations.append(
            {
                "keyword": keyword,
                "vr": vr,
                "raw": raw,
                "expected": expected,
                "flagged": flagged,
            }
        )
    # The malformed date and time still identify the study.
    subject.planter.record("AcquisitionDate", "2016-09-12", Kind.DATE)
    subject.planter.record("AcquisitionTime", "10:15:00", Kind.TIME)
    path = out / "vr-violations.dcm"
    with _pydicom_validation_off():
        write_part10(ds, path)
    return FieldCase(
        case_id="F8",
        title="values that violate their VR",
        expected=(
            "Ingest never crashes. A typed column gets the number where the text"
            " reads as one number (a DS of 19 characters), otherwise null, with the"
            " raw text kept and flagged: IS '14.5', PixelSpacing '0,5\\0,5', DS"
            " '1.68m', a 200-character LO (kept whole), DA '2016-09-12', TM"
            " '10:15:00'. An empty IS is null and not flagged. The malformed"
            " AcquisitionDate still identifies: de-identification must shift or"
            " remove it like a valid date."
        ),
        files=[path],
        roles={"vr-violations": path},
        planted=subject.planter.planted,
        facts={"violations": violations},
    )


@contextmanager
def _pydicom_validation_off() -> Iterator[None]:
    """Silence pydicom's value validation while writing invalid values on purpose."""
    saved = (
        config.settings.reading_validation_mode,
        config.settings.writing_validation_mode,
    )
    config.settings.reading_validation_mode = config.IGNORE
    config.settings.writing_validation_mode = config.IGNORE
    try:
        yield
    finally:
        (
            config.settings.reading_validation_mode,
            config.settings.writing_validation_mode,
        ) = saved


def _build_f9(out: Path) -> FieldCase:
    from workbench.samples.pixel_cases import build_packed_segmentation

    return build_packed_segmentation(out)


def _build_f10(out: Path) -> FieldCase:
    from workbench.samples.pixel_cases import build_transfer_syntaxes

    return build_transfer_syntaxes(out)


def _build_f11(out: Path) -> FieldCase:
    """Write F11: every other case, and files that vary in value multiplicity.

    facts: ``parts`` maps F1 to F10 to their FieldCase. ``list_attributes`` names
    attributes whose dictionary VM allows several values and which the two
    ``vm_variants`` files hold with one value in one file and several in the
    other, so they must be list columns in every row.
    """
    parts = {
        case_id: build_field_case(case_id, out / case_id)
        for case_id in FIELD_CASES[:-1]
    }
    subject = new_subject("F11", "MIXWELL^THEODORA")
    series = subject.uids("series")
    single = small_image(subject, series_uid=series, sop_uid=subject.uids("single"))
    single.ImageType = "ORIGINAL"
    single.WindowCenter = "40"
    single.WindowWidth = "400"
    single.OtherPatientIDs = "ALT1234567"
    several = small_image(
        subject, series_uid=series, sop_uid=subject.uids("several"), instance_number=2
    )
    several.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    several.WindowCenter = ["40", "-600"]
    several.WindowWidth = ["400", "1500"]
    several.OtherPatientIDs = ["ALT1234567", "ALT7654321"]
    variants = [
        write_part10(single, out / "vm-variants" / "single-values.dcm"),
        write_part10(several, out / "vm-variants" / "several-values.dcm"),
    ]
    planted = [
        v for case in parts.values() for v in case.planted
    ] + subject.planter.planted
    files = [path for case in parts.values() for path in case.files] + variants
    return FieldCase(
        case_id="F11",
        title="the metadata of every field case in one dataset",
        expected=(
            "One Parquet schema, taken from the data dictionary (VR and VM), not"
            " inferred from values: attributes whose VM allows several values are"
            " list columns in every row even where a file holds one value; person"
            " names are strings; sequences take one documented form; the broken"
            " files of F7 and F8 are quarantined or flagged without changing the"
            " schema."
        ),
        files=files,
        roles={"vm-single": variants[0], "vm-several": variants[1]},
        planted=planted,
        facts={
            "parts": parts,
            "list_attributes": [
                "ImageType",
                "WindowCenter",
                "WindowWidth",
                "OtherPatientIDs",
            ],
            "vm_variants": variants,
        },
    )


_BUILDERS: dict[str, Callable[[Path], FieldCase]] = {
    "F1": _build_f1,
    "F2": _build_f2,
    "F3": _build_f3,
    "F4": _build_f4,
    "F5": _build_f5,
    "F6": _build_f6,
    "F7": _build_f7,
    "F8": _build_f8,
    "F9": _build_f9,
    "F10": _build_f10,
    "F11": _build_f11,
}
