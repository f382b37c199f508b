"""Small invented instances that the field cases are built from.

A :class:`Subject` is one invented patient with one study. :func:`small_image`
makes a 16 x 16 axial image of it, with the patient, study and series identity set
and recorded as planted values. Each field case then adds what it is about.
"""

from __future__ import annotations

import datetime
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

from workbench.samples.identities import (
    InventedWords,
    Kind,
    PatientIdentity,
    StudyIdentity,
    UidFactory,
)
from workbench.samples.planter import Planter

__all__ = [
    "Subject",
    "image_reference",
    "new_subject",
    "set_file_meta",
    "small_image",
    "write_part10",
]


@dataclass
class Subject:
    """An invented patient and study of a field case, with its planter."""

    planter: Planter
    uids: UidFactory

    @property
    def patient(self) -> PatientIdentity:
        """The invented patient."""
        return self.planter.patient

    @property
    def study(self) -> StudyIdentity:
        """The patient's one study."""
        return self.planter.study


def new_subject(
    case_id: str, patient_name: str, character_set: tuple[str, ...] = ()
) -> Subject:
    """Invent a patient named ``patient_name`` with one study, seeded by ``case_id``."""
    # Invented test identities, not secrets: a seeded generator keeps them stable.
    rng = random.Random(f"workbench-field-case-{case_id}")  # noqa: S311
    words = InventedWords(rng)
    uids = UidFactory(f"field-case-{case_id}")
    patient = PatientIdentity(
        index=0,
        label=case_id.lower(),
        patient_name=patient_name,
        patient_id=f"MRN{words.number()}",
        birth_date=datetime.date(1961, 4, 17),
        sex="F",
        character_set=character_set,
        first_study_date=datetime.date(2016, 9, 12),
        size_m="1.68",
        weight_kg="64.0",
    )
    study = StudyIdentity(
        index=0,
        label="study-01",
        study_instance_uid=uids("StudyInstanceUID"),
        frame_of_reference_uid=uids("FrameOfReferenceUID"),
        study_date=patient.first_study_date,
        study_time="101500",
        accession_number=f"ACC{words.number()}",
        study_id=f"ST{words.number(6)}",
    )
    return Subject(Planter(patient, study, words, uids), uids)


def small_image(
    subject: Subject,
    *,
    series_uid: str,
    sop_uid: str,
    modality: str = "CT",
    instance_number: int = 1,
    size: int = 16,
) -> Dataset:
    """Build a small axial image of ``subject`` with its patient and study identity.

    CT images are signed 16-bit, MR images unsigned 16-bit; slices are 2.5 mm apart
    along z by instance number.
    """
    patient, study = subject.patient, subject.study
    ds = Dataset()

    # Identity of the patient, the study, the series and the instance.
    if patient.character_set:
        values = list(patient.character_set)
        ds.SpecificCharacterSet = values if len(values) > 1 else values[0]
    ds.SOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = modality
    ds.PatientName = patient.patient_name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date.strftime("%Y%m%d")
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = study.date_text
    ds.StudyTime = study.study_time
    ds.AccessionNumber = study.accession_number
    ds.StudyID = study.study_id
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1 if modality == "CT" else 2
    ds.InstanceNumber = instance_number

    # Geometry and pixels: one axial slice holding a gradient.
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 2.5 * (instance_number - 1)]
    ds.PixelSpacing = [1, 1]
    ds.SliceThickness = "2.5"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = size
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if modality == "CT" else 0
    dtype = np.int16 if modality == "CT" else np.uint16
    pixels = np.arange(size * size, dtype=dtype).reshape(size, size) + instance_number
    ds.PixelData = pixels.tobytes()
    set_file_meta(ds)

    # Record what identifies, so that tests can search output for it.
    for keyword, kind in (
        ("PatientName", Kind.PERSON_NAME),
        ("PatientID", Kind.IDENTIFIER),
        ("StudyInstanceUID", Kind.UID),
        ("SeriesInstanceUID", Kind.UID),
        ("SOPInstanceUID", Kind.UID),
        ("AccessionNumber", Kind.IDENTIFIER),
    ):
        subject.planter.record(keyword, ds[keyword].value, kind)
    subject.planter.record("StudyDate", study.date_text, Kind.DATE)
    subject.planter.record("PatientBirthDate", ds.PatientBirthDate, Kind.DATE)
    return ds


def set_file_meta(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> None:
    """Give ``ds`` a file meta header for ``transfer_syntax``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta


def write_part10(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a Part 10 file at ``path``, creating folders; return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
    return path


def image_reference(sop_class: str, sop_instance: str) -> Dataset:
    """Build a reference item: Referenced SOP Class and Instance UIDs."""
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item
