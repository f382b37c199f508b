"""Planting invented identities in every attribute that can carry identity.

The synthetic studies give every attribute of DICOM PS3.15 Table E.1-1 a value:
:func:`plant_table` fills each one from a :class:`~workbench.samples.planter.Planter`
and the sequence builders of :mod:`workbench.samples.sequence_items`.
:func:`plant_patient` and :func:`plant_study` plant the patient's and the study's
own identity over it, including identities nested up to four levels deep in
sequences. Attributes that the Retain Patient Characteristics option keeps (sex,
age, size, weight, smoking status, ...) get plausible values that carry no
identity.

The module also plants private blocks, an overlay plane and a curve, which the
table lists by tag pattern.
"""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pack_bits
from pydicom.sequence import Sequence

from workbench.samples.identities import Kind
from workbench.samples.planter import CODE_STRINGS, Planter, table_e11
from workbench.samples.sequence_items import (
    DETACHED_STUDY,
    SEQUENCE_BUILDERS,
    identifying_code_sequence,
    modified_attributes,
    original_attributes,
    other_patient_ids,
    protocol_with_context,
    reference_item,
    referenced_patient,
    request_attributes,
)

__all__ = [
    "PLANTED_BY_NAME",
    "PRIVATE_GLOBAL_ID_CREATOR",
    "PRIVATE_PATIENT_CREATOR",
    "REPEATING_GROUP_ROWS",
    "SIEMENS_MR_HEADER",
    "UNFILLED_TABLE_ATTRIBUTES",
    "plant_curve",
    "plant_overlay",
    "plant_patient",
    "plant_private_blocks",
    "plant_study",
    "plant_table",
]

PRIVATE_PATIENT_CREATOR = "WBSYN PATIENT INFO"
PRIVATE_GLOBAL_ID_CREATOR = "WBSYN GLOBAL ID"
SIEMENS_MR_HEADER = "SIEMENS MR HEADER"

# Table rows that no stored instance can hold, with the reason.
UNFILLED_TABLE_ATTRIBUTES = {
    "AffectedSOPInstanceUID": "group 0000 belongs to DIMSE command messages",
    "RequestedSOPInstanceUID": "group 0000 belongs to DIMSE command messages",
    "ReferencedSOPInstanceUIDInFile": "group 0004 belongs to DICOMDIR files",
}

# Table rows given by tag pattern, and the element that fills each.
REPEATING_GROUP_ROWS = {
    "(50xx,xxxx)": "(5000,0022) CurveDescription and (5000,3000) CurveData",
    "(60xx,3000)": "(6000,3000) OverlayData",
    "(60xx,4000)": "(6000,4000) OverlayComments",
}

# Table attributes that plant_patient, plant_study and the study generator fill,
# not the generic loop of plant_table.
PLANTED_BY_NAME = frozenset(
    {
        # Patient identity and characteristics (plant_patient).
        "PatientName",
        "PatientID",
        "IssuerOfPatientID",
        "PatientBirthDate",
        "PatientSex",
        "PatientAge",
        "PatientSize",
        "PatientWeight",
        "EthnicGroup",
        "SmokingStatus",
        "PregnancyStatus",
        "PatientSexNeutered",
        "SelectorASValue",
        "OtherPatientIDs",
        "OtherPatientNames",
        "OtherPatientIDsSequence",
        "PatientBirthName",
        "PatientMotherBirthName",
        "ReferencedPatientSequence",
        "ModifiedAttributesSequence",
        "OriginalAttributesSequence",
        # Study identity (plant_study).
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "StudyID",
        "FrameOfReferenceUID",
        "RequestAttributesSequence",
        "ReferencedStudySequence",
        "TimezoneOffsetFromUTC",
        # Series and instance identity, set by the study generator.
        "SeriesInstanceUID",
        "SOPInstanceUID",
        "MediaStorageSOPInstanceUID",
        "SeriesDescription",
        "ProtocolName",
        "ReferencedImageSequence",
        "SourceImageSequence",
    }
)


def plant_table(ds: Dataset, planter: Planter) -> set[str]:
    """Fill the Table E.1-1 attributes that no other function of this module plants.

    Returns
    -------
    set of str
        The keywords filled.
    """
    filled = set()
    for attribute in table_e11():
        keyword = attribute.keyword
        if (
            not keyword
            or keyword in PLANTED_BY_NAME
            or keyword in UNFILLED_TABLE_ATTRIBUTES
        ):
            continue
        if attribute.vr == "SQ":
            builder = SEQUENCE_BUILDERS.get(keyword, identifying_code_sequence)
            setattr(ds, keyword, Sequence(builder(planter, keyword)))
        else:
            value, kind = planter.value_for(attribute, keyword)
            if kind is None:
                setattr(ds, keyword, value)
            else:
                planter.put(ds, keyword, value, kind, keyword)
        filled.add(keyword)
    return filled


def plant_patient(ds: Dataset, planter: Planter) -> None:
    """Plant the patient's identity, other identities and characteristics."""
    patient, study = planter.patient, planter.study
    if patient.character_set:
        values = list(patient.character_set)
        ds.SpecificCharacterSet = values if len(values) > 1 else values[0]

    # Identity, and the characteristics that carry no identity.
    planter.put(
        ds, "PatientName", patient.patient_name, Kind.PERSON_NAME, "PatientName"
    )
    planter.put(ds, "PatientID", patient.patient_id, Kind.IDENTIFIER, "PatientID")
    issuer = f"{planter.word('IssuerOfPatientID')} Hospital MPI"
    planter.put(ds, "IssuerOfPatientID", issuer, Kind.TEXT, "IssuerOfPatientID")
    birth_date = patient.birth_date.strftime("%Y%m%d")
    planter.put(ds, "PatientBirthDate", birth_date, Kind.DATE, "PatientBirthDate")
    ds.PatientSex = patient.sex
    ds.PatientAge = patient.age_on(study.study_date)
    ds.SelectorASValue = ds.PatientAge
    ds.PatientSize = patient.size_m
    ds.PatientWeight = patient.weight_kg
    ds.EthnicGroup = "Not reported"
    ds.SmokingStatus = CODE_STRINGS["SmokingStatus"]
    ds.PregnancyStatus = 4
    ds.PatientSexNeutered = CODE_STRINGS["PatientSexNeutered"]

    # Other identities of the same patient.
    other_ids = [planter.identifier("ALT"), planter.identifier("ALT")]
    ds.OtherPatientIDsSequence = other_patient_ids(planter, other_ids)
    planter.put(ds, "OtherPatientIDs", other_ids, Kind.IDENTIFIER, "OtherPatientIDs")
    other_names = [
        planter.person_name("OtherPatientNames"),
        planter.person_name("OtherPatientNames"),
    ]
    planter.put(
        ds, "OtherPatientNames", other_names, Kind.PERSON_NAME, "OtherPatientNames"
    )
    birth_name = planter.person_name("PatientBirthName")
    planter.put(
        ds, "PatientBirthName", birth_name, Kind.PERSON_NAME, "PatientBirthName"
    )
    mother = planter.person_name("PatientMotherBirthName")
    planter.put(
        ds, "PatientMotherBirthName", mother, Kind.PERSON_NAME, "PatientMotherBirthName"
    )

    # References to the patient, and records of earlier values.
    ds.ReferencedPatientSequence = referenced_patient(planter)
    ds.ModifiedAttributesSequence = modified_attributes(
        planter, "ModifiedAttributesSequence[0]", other_names[0]
    )
    ds.OriginalAttributesSequence = original_attributes(planter, birth_name)


def plant_study(ds: Dataset, planter: Planter) -> None:
    """Plant the study's identifiers, request and the protocol with nested names."""
    study = planter.study

    # Identifiers that every series of the study shares.
    planter.put_all(
        ds,
        [
            ("StudyInstanceUID", study.study_instance_uid, Kind.UID),
            ("FrameOfReferenceUID", study.frame_of_reference_uid, Kind.UID),
            ("StudyDate", study.date_text, Kind.DATE),
            ("StudyTime", study.study_time, Kind.TIME),
            ("AccessionNumber", study.accession_number, Kind.IDENTIFIER),
            ("StudyID", study.study_id, Kind.IDENTIFIER),
        ],
    )
    ds.TimezoneOffsetFromUTC = "+0100"

    # The request, and a reference from the study to itself.
    ds.RequestAttributesSequence = request_attributes(planter)
    path = "ReferencedStudySequence[0]"
    ds.ReferencedStudySequence = [
        reference_item(planter, path, DETACHED_STUDY, study.study_instance_uid)
    ]

    # Not a table attribute, so recipes keep it and must clean what it nests.
    ds.PerformedProtocolCodeSequence = [
        protocol_with_context(planter, "PerformedProtocolCodeSequence[0]")
    ]


def plant_private_blocks(ds: Dataset, planter: Planter, *, diffusion: bool) -> None:
    """Plant private blocks holding identity, and one allow-listed b-value.

    Parameters
    ----------
    ds
        The dataset to fill.
    planter
        The study's planter.
    diffusion
        Add the Siemens b-value and gradient direction, which carry no identity and
        which recipes may keep.
    """
    patient = planter.patient
    block = ds.private_block(0x0011, PRIVATE_PATIENT_CREATOR, create=True)
    path = f'(0011,"{PRIVATE_PATIENT_CREATOR}",%02X)'
    block.add_new(0x10, "PN", patient.patient_name)
    planter.record(path % 0x10, patient.patient_name, Kind.PERSON_NAME)
    block.add_new(0x11, "LO", patient.patient_id)
    planter.record(path % 0x11, patient.patient_id, Kind.IDENTIFIER)
    birth_date = patient.birth_date.strftime("%Y%m%d")
    block.add_new(0x12, "DA", birth_date)
    planter.record(path % 0x12, birth_date, Kind.DATE)
    nested = Dataset()
    planter.put(
        nested, "PatientName", patient.patient_name, Kind.PERSON_NAME, path % 0x13
    )
    planter.put(nested, "PatientID", patient.patient_id, Kind.IDENTIFIER, path % 0x13)
    block.add_new(0x13, "SQ", Sequence([nested]))

    global_id = planter.identifier("GPI")
    block = ds.private_block(0x0013, PRIVATE_GLOBAL_ID_CREATOR, create=True)
    block.add_new(0x10, "LO", global_id)
    planter.record(
        f'(0013,"{PRIVATE_GLOBAL_ID_CREATOR}",10)', global_id, Kind.IDENTIFIER
    )

    if diffusion:
        block = ds.private_block(0x0019, SIEMENS_MR_HEADER, create=True)
        block.add_new(0x0C, "IS", "1000")
        block.add_new(0x0E, "FD", [0.0, 0.0, 1.0])


def plant_overlay(ds: Dataset, planter: Planter, rows: int, columns: int) -> None:
    """Plant overlay plane 6000: a frame drawn over the image, with a comment."""
    mask = np.zeros((rows, columns), dtype=np.uint8)
    mask[2:-2, 2] = mask[2:-2, -3] = mask[2, 2:-2] = mask[-3, 2:-2] = 1
    ds.add_new(0x60000010, "US", rows)
    ds.add_new(0x60000011, "US", columns)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60003000, "OW", pack_bits(mask.ravel()))
    comment = (
        f"{planter.word('(6000,4000)')} annotation for {planter.patient.patient_id}"
    )
    ds.add_new(0x60004000, "LT", comment)
    planter.record("(6000,4000)", comment, Kind.TEXT)


def plant_curve(ds: Dataset, planter: Planter) -> None:
    """Plant retired curve group 5000: four points and an identifying description."""
    ds.add_new(0x50000005, "US", 1)
    ds.add_new(0x50000010, "US", 4)
    ds.add_new(0x50000020, "CS", "TAC")
    description = f"{planter.word('(5000,0022)')} time activity curve"
    ds.add_new(0x50000022, "LO", description)
    planter.record("(5000,0022)", description, Kind.TEXT)
    ds.add_new(0x50000103, "US", 0)
    ds.add_new(0x50003000, "OB", np.array([1, 4, 9, 16], dtype="<u2").tobytes())
