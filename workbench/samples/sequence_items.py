"""Items of the sequences that the synthetic studies fill with invented identities.

Each builder takes a :class:`~workbench.samples.planter.Planter` and the attribute
path of the sequence, and returns the items, built the way the standard defines
them: codes, person identification, observers, references to other instances,
issuers of identifiers, SR content trees, and the records of earlier values.
Identifying values go through the planter, so each one is recorded with its path.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from workbench.samples.identities import Kind
from workbench.samples.planter import (
    DESCRIPTOR_PHRASES,
    Planter,
    words_of_keyword,
)

__all__ = [
    "DETACHED_STUDY",
    "LOCAL_CODING_SCHEME",
    "SEQUENCE_BUILDERS",
    "SequenceBuilder",
    "build_content_tree",
    "identifying_code_sequence",
    "modified_attributes",
    "original_attributes",
    "other_patient_ids",
    "protocol_with_context",
    "reference_item",
    "referenced_patient",
    "request_attributes",
]

# Coding scheme of the invented codes; "99" marks a private scheme in DICOM.
LOCAL_CODING_SCHEME = "99WBSYN"

# Detached management SOP classes (retired) that reference patients and studies.
_DETACHED_PATIENT = "1.2.840.10008.3.1.2.1.1"
DETACHED_STUDY = "1.2.840.10008.3.1.2.3.1"
_MODALITY_PERFORMED_STEP = "1.2.840.10008.3.1.2.3.3"
_VL_PHOTOGRAPHIC_IMAGE = "1.2.840.10008.5.1.4.1.1.77.1.4"

# Coded values that carry no identity: (CodeValue, CodingSchemeDesignator, meaning).
_PERSON_OBSERVER_NAME = ("121008", "DCM", "Person Observer Name")
_DEVICE_OBSERVER_UID = ("121012", "DCM", "Device Observer UID")
_STUDY_DATE = ("111060", "DCM", "Study Date")
_DATETIME_STARTED = ("111526", "DCM", "DateTime Started")
_FINDINGS = ("121070", "DCM", "Findings")
_PROTOCOL = ("WBP-001", LOCAL_CODING_SCHEME, "Routine chest imaging protocol")
_CLINICAL_CODES = (
    ("WBD-001", LOCAL_CODING_SCHEME, "Chest pain"),
    ("WBD-002", LOCAL_CODING_SCHEME, "Persistent cough"),
    ("WBD-003", LOCAL_CODING_SCHEME, "Follow-up of lung nodule"),
)

# Items of sequences. Each builder takes the planter and the sequence's path and
# returns the items.
SequenceBuilder = Callable[[Planter, str], list[Dataset]]


def _code(value: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value
    return item


def _identifying_code(planter: Planter, path: str, meaning: str) -> Dataset:
    item = Dataset()
    planter.put(
        item, "CodeValue", planter.identifier("C"), Kind.IDENTIFIER, f"{path}.CodeValue"
    )
    item.CodingSchemeDesignator = LOCAL_CODING_SCHEME
    word = planter.word(f"{path}.CodeMeaning")
    planter.put(
        item, "CodeMeaning", f"{word} {meaning}", Kind.TEXT, f"{path}.CodeMeaning"
    )
    return item


def identifying_code_sequence(planter: Planter, path: str) -> list[Dataset]:
    """Build one code item whose value and meaning are invented and recorded."""
    meaning = words_of_keyword(path.removesuffix("Sequence").removesuffix("Code"))
    return [_identifying_code(planter, f"{path}[0]", meaning)]


def _clinical_code_sequence(planter: Planter, path: str) -> list[Dataset]:
    del planter, path  # Clinical codes carry no identity and are not recorded.
    return [_code(_CLINICAL_CODES[0]), _code(_CLINICAL_CODES[1])]


def reference_item(
    planter: Planter, path: str, sop_class: str, sop_instance: str
) -> Dataset:
    """Build a reference item and record its Referenced SOP Instance UID."""
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    planter.put(
        item,
        "ReferencedSOPInstanceUID",
        sop_instance,
        Kind.UID,
        f"{path}.ReferencedSOPInstanceUID",
    )
    return item


def _reference_sequence(sop_class: str) -> SequenceBuilder:
    def build(planter: Planter, path: str) -> list[Dataset]:
        return [reference_item(planter, f"{path}[0]", sop_class, planter.uid(path))]

    return build


def _person_identification(planter: Planter, path: str) -> list[Dataset]:
    item = Dataset()
    prefix = f"{path}[0]"
    item.PersonIdentificationCodeSequence = [
        _identifying_code(
            planter, f"{prefix}.PersonIdentificationCodeSequence[0]", "badge"
        )
    ]
    planter.put(
        item,
        "PersonAddress",
        planter.address(prefix),
        Kind.TEXT,
        f"{prefix}.PersonAddress",
    )
    planter.put(
        item,
        "PersonTelephoneNumbers",
        planter.phone(),
        Kind.TEXT,
        f"{prefix}.PersonTelephoneNumbers",
    )
    hospital = f"{planter.word(prefix)} General Hospital"
    planter.put(
        item, "InstitutionName", hospital, Kind.TEXT, f"{prefix}.InstitutionName"
    )
    return [item]


def _human_performer(planter: Planter, path: str) -> list[Dataset]:
    item = Dataset()
    prefix = f"{path}[0]"
    item.HumanPerformerCodeSequence = [
        _identifying_code(
            planter, f"{prefix}.HumanPerformerCodeSequence[0]", "technologist"
        )
    ]
    name = planter.person_name(f"{prefix}.HumanPerformerName")
    planter.put(
        item,
        "HumanPerformerName",
        name,
        Kind.PERSON_NAME,
        f"{prefix}.HumanPerformerName",
    )
    organization = f"{planter.word(prefix)} Imaging Centre"
    planter.put(
        item,
        "HumanPerformerOrganization",
        organization,
        Kind.TEXT,
        f"{prefix}.HumanPerformerOrganization",
    )
    return [item]


def _observer(planter: Planter, path: str) -> list[Dataset]:
    item = Dataset()
    prefix = f"{path}[0]"
    item.ObserverType = "PSN"
    if path == "ParticipantSequence":
        item.ParticipationType = "ENT"
        planter.put(
            item,
            "ParticipationDateTime",
            planter.study.datetime_text,
            Kind.DATETIME,
            f"{prefix}.ParticipationDateTime",
        )
    name = planter.person_name(f"{prefix}.PersonName")
    planter.put(item, "PersonName", name, Kind.PERSON_NAME, f"{prefix}.PersonName")
    item.PersonIdentificationCodeSequence = [
        _identifying_code(
            planter, f"{prefix}.PersonIdentificationCodeSequence[0]", "badge"
        )
    ]
    hospital = f"{planter.word(prefix)} General Hospital"
    planter.put(
        item, "InstitutionName", hospital, Kind.TEXT, f"{prefix}.InstitutionName"
    )
    return [item]


def _verifying_observer(planter: Planter, path: str) -> list[Dataset]:
    item = Dataset()
    prefix = f"{path}[0]"
    name = planter.person_name(prefix, physician=True)
    planter.put(
        item,
        "VerifyingObserverName",
        name,
        Kind.PERSON_NAME,
        f"{prefix}.VerifyingObserverName",
    )
    organization = f"{planter.word(prefix)} General Hospital"
    planter.put(
        item,
        "VerifyingOrganization",
        organization,
        Kind.TEXT,
        f"{prefix}.VerifyingOrganization",
    )
    planter.put(
        item,
        "VerificationDateTime",
        planter.study.datetime_text,
        Kind.DATETIME,
        f"{prefix}.VerificationDateTime",
    )
    item.VerifyingObserverIdentificationCodeSequence = [
        _identifying_code(
            planter, f"{prefix}.VerifyingObserverIdentificationCodeSequence[0]", "badge"
        )
    ]
    return [item]


def _custodial_organization(planter: Planter, path: str) -> list[Dataset]:
    item = Dataset()
    prefix = f"{path}[0]"
    hospital = f"{planter.word(prefix)} Records Office"
    planter.put(
        item, "InstitutionName", hospital, Kind.TEXT, f"{prefix}.InstitutionName"
    )
    item.InstitutionCodeSequence = [
        _identifying_code(
            planter, f"{prefix}.InstitutionCodeSequence[0]", "records office"
        )
    ]
    return [item]


def _issuer(planter: Planter, path: str) -> list[Dataset]:
    item = Dataset()
    prefix = f"{path}[0]"
    namespace = f"{planter.word(prefix)} HIS"
    planter.put(
        item,
        "LocalNamespaceEntityID",
        namespace,
        Kind.TEXT,
        f"{prefix}.LocalNamespaceEntityID",
    )
    oid = f"2.16.840.1.113883.19.{planter.digits()}"
    planter.put(
        item, "UniversalEntityID", oid, Kind.IDENTIFIER, f"{prefix}.UniversalEntityID"
    )
    item.UniversalEntityIDType = "ISO"
    return [item]


def other_patient_ids(planter: Planter, other_ids: list[str]) -> list[Dataset]:
    """Build OtherPatientIDsSequence items, one per id, each with its issuer."""
    items = []
    for index, other_id in enumerate(other_ids):
        item = Dataset()
        prefix = f"OtherPatientIDsSequence[{index}]"
        planter.put(item, "PatientID", other_id, Kind.IDENTIFIER, f"{prefix}.PatientID")
        issuer = f"{planter.word(prefix)} Regional Health"
        planter.put(
            item, "IssuerOfPatientID", issuer, Kind.TEXT, f"{prefix}.IssuerOfPatientID"
        )
        item.TypeOfPatientID = "TEXT"
        items.append(item)
    return items


def referenced_patient(planter: Planter) -> list[Dataset]:
    """Build the ReferencedPatientSequence item, with the patient module nested."""
    # Vendors copy the patient module into this item; the standard does not ask it.
    path = "ReferencedPatientSequence[0]"
    patient = planter.patient
    item = reference_item(planter, path, _DETACHED_PATIENT, planter.uid(path))
    planter.put(
        item,
        "PatientName",
        patient.patient_name,
        Kind.PERSON_NAME,
        f"{path}.PatientName",
    )
    planter.put(
        item, "PatientID", patient.patient_id, Kind.IDENTIFIER, f"{path}.PatientID"
    )
    birth_date = patient.birth_date.strftime("%Y%m%d")
    planter.put(
        item, "PatientBirthDate", birth_date, Kind.DATE, f"{path}.PatientBirthDate"
    )
    return [item]


def modified_attributes(
    planter: Planter, path: str, earlier_name: str
) -> list[Dataset]:
    """Build a ModifiedAttributesSequence item: an earlier name and record number."""
    item = Dataset()
    planter.put(
        item, "PatientName", earlier_name, Kind.PERSON_NAME, f"{path}.PatientName"
    )
    earlier_id = planter.identifier("OLD")
    planter.put(item, "PatientID", earlier_id, Kind.IDENTIFIER, f"{path}.PatientID")
    return [item]


def original_attributes(planter: Planter, birth_name: str) -> list[Dataset]:
    """Build the OriginalAttributesSequence item that records a name change."""
    item = Dataset()
    prefix = "OriginalAttributesSequence[0]"
    planter.put(
        item,
        "AttributeModificationDateTime",
        planter.study.datetime_text,
        Kind.DATETIME,
        f"{prefix}.AttributeModificationDateTime",
    )
    system = f"{planter.word(prefix)} RIS"
    planter.put(item, "ModifyingSystem", system, Kind.TEXT, f"{prefix}.ModifyingSystem")
    source = f"{planter.word(prefix)} PACS"
    planter.put(
        item,
        "SourceOfPreviousValues",
        source,
        Kind.TEXT,
        f"{prefix}.SourceOfPreviousValues",
    )
    item.ReasonForTheAttributeModification = "CORRECT"
    item.ModifiedAttributesSequence = modified_attributes(
        planter, f"{prefix}.ModifiedAttributesSequence[0]", birth_name
    )
    return [item]


def _content_item(
    planter: Planter,
    path: str,
    value_type: str,
    concept: tuple[str, str, str],
    value: tuple[str, object, Kind] | None = None,
    relationship: str = "CONTAINS",
) -> Dataset:
    """Build an SR content item; ``value`` is (keyword, value, kind) or None."""
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = value_type
    item.ConceptNameCodeSequence = [_code(concept)]
    if value is not None:
        keyword, text, kind = value
        planter.put(item, keyword, text, kind, f"{path}.{keyword}")
    return item


def _person_content(
    planter: Planter, path: str, relationship: str = "CONTAINS"
) -> Dataset:
    name = planter.person_name(f"{path}.PersonName")
    return _content_item(
        planter,
        path,
        "PNAME",
        _PERSON_OBSERVER_NAME,
        ("PersonName", name, Kind.PERSON_NAME),
        relationship,
    )


def build_content_tree(planter: Planter, path: str) -> list[Dataset]:
    """Build the items of an SR tree with person names one, two and three levels deep.

    ``path`` is the sequence's attribute path, used to record the planted values.
    """
    study = planter.study
    items = [
        _person_content(planter, f"{path}[0]", "HAS OBS CONTEXT"),
        _content_item(
            planter,
            f"{path}[1]",
            "DATE",
            _STUDY_DATE,
            ("Date", study.date_text, Kind.DATE),
        ),
        _content_item(
            planter,
            f"{path}[2]",
            "TIME",
            _STUDY_DATE,
            ("Time", study.study_time, Kind.TIME),
        ),
        _content_item(
            planter,
            f"{path}[3]",
            "DATETIME",
            _DATETIME_STARTED,
            ("DateTime", study.datetime_text, Kind.DATETIME),
        ),
        _content_item(
            planter,
            f"{path}[4]",
            "UIDREF",
            _DEVICE_OBSERVER_UID,
            ("UID", planter.uid(f"{path}[4].UID"), Kind.UID),
        ),
    ]
    container = _content_item(planter, f"{path}[5]", "CONTAINER", _FINDINGS)
    container.ContinuityOfContent = "SEPARATE"
    inner = _content_item(
        planter, f"{path}[5].ContentSequence[1]", "CONTAINER", _FINDINGS
    )
    inner.ContinuityOfContent = "SEPARATE"
    inner.ContentSequence = [
        _person_content(planter, f"{path}[5].ContentSequence[1].ContentSequence[0]")
    ]
    container.ContentSequence = [
        _person_content(planter, f"{path}[5].ContentSequence[0]"),
        inner,
    ]
    items.append(container)
    return items


def protocol_with_context(planter: Planter, path: str) -> Dataset:
    """Build a protocol code whose context nests names, a date, a UID, a date-time."""
    protocol = _code(_PROTOCOL)
    context = f"{path}.ProtocolContextSequence"
    person = _person_content(planter, f"{context}[0]", "HAS CONCEPT MOD")
    person.ContentItemModifierSequence = [
        _person_content(
            planter, f"{context}[0].ContentItemModifierSequence[0]", "HAS CONCEPT MOD"
        )
    ]
    study = planter.study
    protocol.ProtocolContextSequence = [
        person,
        _content_item(
            planter,
            f"{context}[1]",
            "DATE",
            _STUDY_DATE,
            ("Date", study.date_text, Kind.DATE),
            "HAS CONCEPT MOD",
        ),
        _content_item(
            planter,
            f"{context}[2]",
            "UIDREF",
            _DEVICE_OBSERVER_UID,
            ("UID", planter.uid(f"{context}[2].UID"), Kind.UID),
            "HAS CONCEPT MOD",
        ),
        _content_item(
            planter,
            f"{context}[3]",
            "DATETIME",
            _DATETIME_STARTED,
            ("DateTime", study.datetime_text, Kind.DATETIME),
            "HAS CONCEPT MOD",
        ),
    ]
    return protocol


def request_attributes(planter: Planter) -> list[Dataset]:
    """Build the RequestAttributesSequence item, with names up to three levels down."""
    study = planter.study
    prefix = "RequestAttributesSequence[0]"
    item = Dataset()

    # Identifiers, the requesting physician and a date, one level deep.
    physician = planter.person_name(f"{prefix}.RequestingPhysician", physician=True)
    planter.put_all(
        item,
        [
            ("AccessionNumber", study.accession_number, Kind.IDENTIFIER),
            ("StudyInstanceUID", study.study_instance_uid, Kind.UID),
            ("RequestedProcedureID", planter.identifier("RP"), Kind.IDENTIFIER),
            ("RequestingPhysician", physician, Kind.PERSON_NAME),
            ("ScheduledProcedureStepStartDate", study.date_text, Kind.DATE),
            ("ScheduledProcedureStepID", planter.identifier("SPS"), Kind.IDENTIFIER),
        ],
        prefix,
    )

    # Descriptors that embed the patient's identity.
    for keyword in (
        "ScheduledProcedureStepDescription",
        "RequestedProcedureDescription",
        "ReasonForTheRequestedProcedure",
    ):
        text = planter.descriptor(
            DESCRIPTOR_PHRASES.get(keyword, words_of_keyword(keyword)), 64
        )
        planter.put(item, keyword, text, Kind.TEXT, f"{prefix}.{keyword}")

    # Codes, with person names two and three levels further down.
    item.ReasonForRequestedProcedureCodeSequence = [_code(_CLINICAL_CODES[2])]
    item.ScheduledProtocolCodeSequence = [
        protocol_with_context(planter, f"{prefix}.ScheduledProtocolCodeSequence[0]")
    ]
    item.ReferencedStudySequence = [
        reference_item(
            planter,
            f"{prefix}.ReferencedStudySequence[0]",
            DETACHED_STUDY,
            study.study_instance_uid,
        )
    ]
    return [item]


def _content_sequence_of(item_keyword: str) -> SequenceBuilder:
    """Return a builder of content items in a sequence, as in acquisition context."""

    def build(planter: Planter, path: str) -> list[Dataset]:
        if item_keyword:
            item = Dataset()
            setattr(
                item,
                item_keyword,
                [_person_content(planter, f"{path}[0].{item_keyword}[0]")],
            )
            return [item]
        return [
            _person_content(planter, f"{path}[0]"),
            _content_item(
                planter,
                f"{path}[1]",
                "DATE",
                _STUDY_DATE,
                ("Date", planter.study.date_text, Kind.DATE),
            ),
        ]

    return build


def _graphic_annotation(planter: Planter, path: str) -> list[Dataset]:
    patient = planter.patient
    text_object = Dataset()
    label = f"{patient.family_names[0]}, {patient.given_name} {patient.patient_id}"
    planter.put(
        text_object,
        "UnformattedTextValue",
        label,
        Kind.TEXT,
        f"{path}[0].TextObjectSequence[0].UnformattedTextValue",
    )
    text_object.BoundingBoxAnnotationUnits = "PIXEL"
    text_object.BoundingBoxTopLeftHandCorner = [1.0, 1.0]
    text_object.BoundingBoxBottomRightHandCorner = [40.0, 8.0]
    text_object.BoundingBoxTextHorizontalJustification = "LEFT"
    item = Dataset()
    item.GraphicLayer = "ANNOTATION"
    item.TextObjectSequence = [text_object]
    return [item]


def _icon_image(planter: Planter, path: str) -> list[Dataset]:
    del planter, path  # The icon is a plain gradient and carries no identity.
    item = Dataset()
    item.Rows = item.Columns = 8
    item.SamplesPerPixel = 1
    item.PhotometricInterpretation = "MONOCHROME2"
    item.BitsAllocated = item.BitsStored = 8
    item.HighBit = 7
    item.PixelRepresentation = 0
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    item.add_new(0x7FE00010, "OB", pixels.tobytes())
    return [item]


def _digital_signature(planter: Planter, path: str) -> list[Dataset]:
    item = Dataset()
    prefix = f"{path}[0]"
    item.MACIDNumber = 1
    planter.put(
        item,
        "DigitalSignatureUID",
        planter.uid(f"{prefix}.DigitalSignatureUID"),
        Kind.UID,
        f"{prefix}.DigitalSignatureUID",
    )
    planter.put(
        item,
        "DigitalSignatureDateTime",
        planter.study.datetime_text,
        Kind.DATETIME,
        f"{prefix}.DigitalSignatureDateTime",
    )
    item.CertificateType = "X509_1993_SIG"
    signer = f"CN={planter.word(prefix)} Signing Authority".encode("ascii")
    planter.put(
        item, "CertificateOfSigner", signer, Kind.TEXT, f"{prefix}.CertificateOfSigner"
    )
    item.Signature = b"\x30\x06\x02\x01\x01\x02\x01\x02"
    return [item]


def _referenced_signature(planter: Planter, path: str) -> list[Dataset]:
    item = Dataset()
    prefix = f"{path}[0]"
    planter.put(
        item,
        "DigitalSignatureUID",
        planter.uid(f"{prefix}.DigitalSignatureUID"),
        Kind.UID,
        f"{prefix}.DigitalSignatureUID",
    )
    item.Signature = b"\x30\x06\x02\x01\x01\x02\x01\x02"
    return [item]


def _mac(planter: Planter, path: str) -> list[Dataset]:
    item = Dataset()
    prefix = f"{path}[0]"
    item.MACCalculationTransferSyntaxUID = ExplicitVRLittleEndian
    item.MACAlgorithm = "SHA256"
    item.DataElementsSigned = [tag_for_keyword("PatientName")]
    mac = f"{planter.word(prefix)} message authentication code".encode("ascii")
    planter.put(item, "MAC", mac, Kind.TEXT, f"{prefix}.MAC")
    return [item]


def _nonconforming_attributes(planter: Planter, path: str) -> list[Dataset]:
    item = Dataset()
    prefix = f"{path}[0]"
    item.SelectorAttribute = tag_for_keyword("PatientName")
    item.SelectorValueNumber = 1
    raw_name = planter.patient.name_groups[0].encode("utf-8")
    planter.put(
        item,
        "NonconformingDataElementValue",
        raw_name,
        Kind.PERSON_NAME,
        f"{prefix}.NonconformingDataElementValue",
    )
    return [item]


def _udi(planter: Planter, path: str) -> list[Dataset]:
    item = Dataset()
    prefix = f"{path}[0]"
    udi = f"(01)0{planter.digits()}(21){planter.identifier('SN')}"
    planter.put(
        item,
        "UniqueDeviceIdentifier",
        udi,
        Kind.IDENTIFIER,
        f"{prefix}.UniqueDeviceIdentifier",
    )
    description = f"{planter.word(prefix)} injector"
    planter.put(
        item, "DeviceDescription", description, Kind.TEXT, f"{prefix}.DeviceDescription"
    )
    return [item]


def _transducer(planter: Planter, path: str) -> list[Dataset]:
    item = Dataset()
    prefix = f"{path}[0]"
    item.Manufacturer = "Synthetic Imaging Co"
    item.ManufacturerModelName = "Probe S1"
    serial = planter.identifier("TSN")
    planter.put(
        item,
        "DeviceSerialNumber",
        serial,
        Kind.IDENTIFIER,
        f"{prefix}.DeviceSerialNumber",
    )
    return [item]


def _flow_identifier(planter: Planter, path: str) -> list[Dataset]:
    item = Dataset()
    prefix = f"{path}[0]"
    flow = f"{planter.word(prefix)} flow".encode("ascii")
    planter.put(item, "FlowIdentifier", flow, Kind.TEXT, f"{prefix}.FlowIdentifier")
    source = f"{planter.word(prefix)} source".encode("ascii")
    planter.put(
        item, "SourceIdentifier", source, Kind.TEXT, f"{prefix}.SourceIdentifier"
    )
    return [item]


def _other_protocol_ids(planter: Planter, path: str) -> list[Dataset]:
    item = Dataset()
    prefix = f"{path}[0]"
    planter.put(
        item,
        "ClinicalTrialProtocolID",
        planter.identifier("CTP"),
        Kind.IDENTIFIER,
        f"{prefix}.ClinicalTrialProtocolID",
    )
    issuer = f"{planter.word(prefix)} Trials Office"
    planter.put(
        item,
        "IssuerOfClinicalTrialProtocolID",
        issuer,
        Kind.TEXT,
        f"{prefix}.IssuerOfClinicalTrialProtocolID",
    )
    return [item]


def _interpretation_approver(planter: Planter, path: str) -> list[Dataset]:
    item = Dataset()
    prefix = f"{path}[0]"
    study = planter.study
    planter.put(
        item,
        "InterpretationApprovalDate",
        study.date_text,
        Kind.DATE,
        f"{prefix}.InterpretationApprovalDate",
    )
    planter.put(
        item,
        "InterpretationApprovalTime",
        study.study_time,
        Kind.TIME,
        f"{prefix}.InterpretationApprovalTime",
    )
    name = planter.person_name(prefix, physician=True)
    planter.put(
        item,
        "PhysicianApprovingInterpretation",
        name,
        Kind.PERSON_NAME,
        f"{prefix}.PhysicianApprovingInterpretation",
    )
    return [item]


def _distribution_list(planter: Planter, path: str) -> list[Dataset]:
    item = Dataset()
    prefix = f"{path}[0]"
    name = planter.person_name(prefix)
    planter.put(
        item, "DistributionName", name, Kind.PERSON_NAME, f"{prefix}.DistributionName"
    )
    planter.put(
        item,
        "DistributionAddress",
        planter.address(prefix),
        Kind.TEXT,
        f"{prefix}.DistributionAddress",
    )
    return [item]


def _prescription_notes(planter: Planter, path: str) -> list[Dataset]:
    item = Dataset()
    text = planter.descriptor("fractionation as planned", None)
    planter.put(
        item, "PrescriptionNotes", text, Kind.TEXT, f"{path}[0].PrescriptionNotes"
    )
    return [item]


SEQUENCE_BUILDERS = {
    "InstitutionCodeSequence": identifying_code_sequence,
    "AdmittingDiagnosesCodeSequence": _clinical_code_sequence,
    "ReasonForVisitCodeSequence": _clinical_code_sequence,
    "ReasonForRequestedProcedureCodeSequence": _clinical_code_sequence,
    "ReferringPhysicianIdentificationSequence": _person_identification,
    "ConsultingPhysicianIdentificationSequence": _person_identification,
    "PhysiciansOfRecordIdentificationSequence": _person_identification,
    "PerformingPhysicianIdentificationSequence": _person_identification,
    "PhysiciansReadingStudyIdentificationSequence": _person_identification,
    "OperatorIdentificationSequence": _person_identification,
    "ScheduledPerformingPhysicianIdentificationSequence": _person_identification,
    "IntendedRecipientsOfResultsIdentificationSequence": _person_identification,
    "ReferencedPerformedProcedureStepSequence": _reference_sequence(
        _MODALITY_PERFORMED_STEP
    ),
    "ReferencedPatientPhotoSequence": _reference_sequence(_VL_PHOTOGRAPHIC_IMAGE),
    "ReferencedPatientAliasSequence": _reference_sequence(_DETACHED_PATIENT),
    "OtherClinicalTrialProtocolIDsSequence": _other_protocol_ids,
    "UDISequence": _udi,
    "TransducerIdentificationSequence": _transducer,
    "FlowIdentifierSequence": _flow_identifier,
    "IssuerOfAdmissionIDSequence": _issuer,
    "IssuerOfServiceEpisodeIDSequence": _issuer,
    "IssuerOfTheContainerIdentifierSequence": _issuer,
    "IssuerOfTheSpecimenIdentifierSequence": _issuer,
    "AcquisitionContextSequence": _content_sequence_of(""),
    "SpecimenPreparationSequence": _content_sequence_of(
        "SpecimenPreparationStepContentItemSequence"
    ),
    "ScheduledHumanPerformersSequence": _human_performer,
    "ActualHumanPerformersSequence": _human_performer,
    "VerifyingObserverSequence": _verifying_observer,
    "AuthorObserverSequence": _observer,
    "ParticipantSequence": _observer,
    "ROICreatorSequence": _observer,
    "ROIInterpreterSequence": _observer,
    "CustodialOrganizationSequence": _custodial_organization,
    "ContentSequence": build_content_tree,
    "GraphicAnnotationSequence": _graphic_annotation,
    "IconImageSequence": _icon_image,
    "ReferencedDigitalSignatureSequence": _referenced_signature,
    "ReferencedSOPInstanceMACSequence": _mac,
    "NonconformingModifiedAttributesSequence": _nonconforming_attributes,
    "PrescriptionNotesSequence": _prescription_notes,
    "InterpretationApproverSequence": _interpretation_approver,
    "ResultsDistributionListSequence": _distribution_list,
    "DigitalSignaturesSequence": _digital_signature,
}
