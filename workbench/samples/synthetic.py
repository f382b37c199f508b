"""Synthetic DICOM studies with invented identities planted everywhere identity can go.

:func:`generate_studies` writes, for each invented patient, studies of one axial CT
series and one sagittal MR series of a phantom (see :mod:`workbench.samples.images`)
as Part 10 files ``out/<patient>/<study>/<series>/<instance number>.dcm``. Folder and
file names carry no identity. Every instance carries a value in every attribute of
PS3.15 Table E.1-1 that a stored instance can hold (see
:mod:`workbench.samples.planting`), so that a test can prove that de-identification
leaves none of them behind: :meth:`SyntheticCorpus.identifying_values` lists every
planted string.

What the studies exercise beyond planting:

- the MR series numbers its instances in interleaved acquisition order, not in
  slice order, so an ingest that sorts by InstanceNumber gets the volume wrong;
- the studies of one patient are at least 400 days apart, so date intervals can be
  checked after a date shift;
- each instance references another instance of the study (ReferencedImageSequence,
  and SourceImageSequence in the MR series), and each series references the other
  (RelatedSeriesSequence), so UID remapping must keep references resolvable.

The same seed gives byte-identical files.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
)

from workbench.errors import ConfigurationError
from workbench.samples.bundled import bundled_sample_files
from workbench.samples.encoder import SeriesEncoder
from workbench.samples.identities import (
    SEARCHABLE_KINDS,
    InventedWords,
    Kind,
    PatientIdentity,
    StudyIdentity,
    UidFactory,
    invent_patient,
    invent_study,
    searchable_strings,
)
from workbench.samples.images import (
    CT_RESCALE_INTERCEPT,
    Phantom,
    SeriesGeometry,
    ct_geometry,
    ct_pixels,
    ds_text,
    invent_phantom,
    mr_geometry,
    mr_pixels,
)
from workbench.samples.planter import Planter
from workbench.samples.planting import (
    PLANTED_BY_NAME,
    REPEATING_GROUP_ROWS,
    plant_curve,
    plant_overlay,
    plant_patient,
    plant_private_blocks,
    plant_study,
    plant_table,
)

__all__ = [
    "SyntheticCorpus",
    "SyntheticPatient",
    "SyntheticSeries",
    "SyntheticStudy",
    "generate_studies",
    "sample_files",
]

log = logging.getLogger(__name__)

MANUFACTURER = "Synthetic Imaging Co"
IMPLEMENTATION_VERSION_NAME = "WBSYN_1"
PIXEL_DATA = 0x7FE00010
# The allow-listed private b-value, in recipe notation.
SIEMENS_B_VALUE = '(0019,"SIEMENS MR HEADER",0C)'
MAX_PATIENTS = 200
MAX_STUDIES_PER_PATIENT = 20
MAX_SLICES = 1000
MIN_IMAGE_SIZE = 8
MAX_IMAGE_SIZE = 1024

# Attributes of each modality that carry no identity and must survive
# de-identification unchanged; the generator writes them as given here.
CT_RETAINED: dict[str, object] = {
    "Modality": "CT",
    "Manufacturer": MANUFACTURER,
    "ManufacturerModelName": "SynthCT 64",
    "BodyPartExamined": "CHEST",
    "KVP": "120",
    "XRayTubeCurrent": 200,
    "ConvolutionKernel": "STANDARD",
    "PatientPosition": "HFS",
    "RescaleSlope": "1",
    "RescaleIntercept": str(CT_RESCALE_INTERCEPT),
    "RescaleType": "HU",
    "WindowCenter": "40",
    "WindowWidth": "400",
}
MR_RETAINED: dict[str, object] = {
    "Modality": "MR",
    "Manufacturer": MANUFACTURER,
    "ManufacturerModelName": "SynthMR 1.5T",
    "BodyPartExamined": "CHEST",
    "MagneticFieldStrength": "1.5",
    "RepetitionTime": "3000",
    "EchoTime": "90",
    "FlipAngle": "90",
    "EchoTrainLength": 16,
    "ImagingFrequency": "63.87",
    "ImagedNucleus": "1H",
    "ScanningSequence": "SE",
    "SequenceVariant": "SK",
    "MRAcquisitionType": "2D",
    "PatientPosition": "HFS",
    "WindowCenter": "900",
    "WindowWidth": "1800",
}


@dataclass
class SyntheticSeries:
    """One written series.

    Parameters
    ----------
    label
        Folder name (``series-01-ct``); carries no identity.
    modality
        ``CT`` or ``MR``.
    series_instance_uid
        The source SeriesInstanceUID.
    geometry
        Slice geometry; slice ``k`` lies at ``geometry.position(k)``.
    files
        The written files, in InstanceNumber order.
    sop_instance_uids, instance_numbers, slice_indexes
        For each file in ``files``: its SOPInstanceUID, its InstanceNumber and its
        slice index along the normal (0 for the first slice).
    retained
        Attributes that carry no identity and must survive de-identification,
        with the values written, plus the patient characteristics the Retain
        Patient Characteristics option keeps.
    """

    label: str
    modality: str
    series_instance_uid: str
    geometry: SeriesGeometry
    files: list[Path] = field(default_factory=list)
    sop_instance_uids: list[str] = field(default_factory=list)
    instance_numbers: list[int] = field(default_factory=list)
    slice_indexes: list[int] = field(default_factory=list)
    retained: dict[str, object] = field(default_factory=dict)

    @property
    def files_in_slice_order(self) -> list[Path]:
        """The files sorted by position along the slice normal."""
        return [
            path for _, path in sorted(zip(self.slice_indexes, self.files, strict=True))
        ]


@dataclass
class SyntheticStudy:
    """One written study: its identity and its CT and MR series."""

    identity: StudyIdentity
    series: list[SyntheticSeries] = field(default_factory=list)


@dataclass
class SyntheticPatient:
    """One invented patient: identity, planted values, imaged phantom and studies."""

    identity: PatientIdentity
    phantom: Phantom
    studies: list[SyntheticStudy] = field(default_factory=list)

    def identifying_values(self, kinds: Iterable[str] = SEARCHABLE_KINDS) -> set[str]:
        """Return every planted string of this patient of the given kinds."""
        return self.identity.identifying_values(kinds)


@dataclass
class SyntheticCorpus:
    """The result of :func:`generate_studies`.

    Parameters
    ----------
    root
        The output folder.
    seed
        The seed the corpus was generated from.
    patients
        The invented patients, with their studies and planted values.
    filled_attributes
        Every Table E.1-1 row that each instance fills: keywords, and tag patterns
        such as ``(60xx,3000)`` for the rows the table gives by pattern.
    """

    root: Path
    seed: int
    patients: list[SyntheticPatient]
    filled_attributes: frozenset[str]

    @property
    def files(self) -> list[Path]:
        """Every written file, patient by patient, study by study."""
        return [
            path
            for patient in self.patients
            for study in patient.studies
            for series in study.series
            for path in series.files
        ]

    @property
    def series(self) -> list[SyntheticSeries]:
        """Every written series."""
        return [
            series
            for patient in self.patients
            for study in patient.studies
            for series in study.series
        ]

    def identifying_values(self, kinds: Iterable[str] = SEARCHABLE_KINDS) -> set[str]:
        """Return every planted string that must never appear in any output.

        Parameters
        ----------
        kinds
            Kinds of value to include (the constants of
            :mod:`workbench.samples.identities`). The default leaves out times of
            day, which the Retain Longitudinal Temporal Information option keeps,
            and numbers such as GPS coordinates.

        Notes
        -----
        Dates are included as ``YYYYMMDD``. A date shift equal to the interval
        between two planted dates of one patient maps one onto the other. The
        studies of a patient are at least 400 days apart, so a shift of less than
        400 days never does that. The first five patients' first studies are four
        years apart, but dates of different patients can still coincide after
        shifting.
        """
        strings: set[str] = set()
        for patient in self.patients:
            strings |= patient.identifying_values(kinds)
        return strings

    def locate(self, text: str) -> list[tuple[str, str]]:
        """Return the planted values that contain ``text``, to explain a leak.

        Returns
        -------
        list of tuple of str
            (patient label, attribute path) pairs.
        """
        found = []
        for patient in self.patients:
            for planted in patient.identity.planted:
                if text in planted.value or text in searchable_strings([planted]):
                    found.append((patient.identity.label, planted.path))
        return found


def generate_studies(
    out: Path,
    *,
    patients: int = 3,
    studies_per_patient: int = 2,
    ct_slices: int = 24,
    mr_slices: int = 12,
    rows: int = 64,
    columns: int = 64,
    seed: int = 0,
) -> SyntheticCorpus:
    """Write synthetic CT and MR studies of invented patients under ``out``.

    Parameters
    ----------
    out
        Output folder; created if missing. A file of an earlier run is overwritten
        when this run writes one of the same name; other files are left alone.
    patients
        Number of invented patients. The first four are ``DOERING^JANE^MARGARET``
        (93 years old, default repertoire), ``MÜLLER^JÜRGEN`` (ISO_IR 192),
        ``Yamada^Tarou=山田^太郎=やまだ^たろう`` (ISO 2022 IR 87) and
        ``ROEBUCK^RICHARD^A``; later ones get invented names.
    studies_per_patient
        Studies per patient, each with one CT and one MR series.
    ct_slices, mr_slices
        Slices per series.
    rows, columns
        Image size of both series.
    seed
        Seed of every invented value and of the image noise; 0 or more.

    Returns
    -------
    SyntheticCorpus
        The written files and the planted values.

    Raises
    ------
    ConfigurationError
        When a count or size is out of range.
    """
    _check_range("patients", patients, 1, MAX_PATIENTS)
    _check_range("studies_per_patient", studies_per_patient, 1, MAX_STUDIES_PER_PATIENT)
    _check_range("ct_slices", ct_slices, 1, MAX_SLICES)
    _check_range("mr_slices", mr_slices, 1, MAX_SLICES)
    _check_range("rows", rows, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    _check_range("columns", columns, MIN_IMAGE_SIZE, MAX_IMAGE_SIZE)
    # numpy seeds its noise generator from non-negative integers only.
    _check_range("seed", seed, 0, 2**63 - 1)
    started = time.perf_counter()
    out = Path(out)
    # Invented test identities, not secrets: a seeded generator keeps them stable.
    rng = random.Random(seed)  # noqa: S311
    words = InventedWords(rng)
    uids = UidFactory(seed)
    filled: set[str] = set()
    corpus_patients = []

    for patient_index in range(patients):
        identity = invent_patient(patient_index, words, rng)
        phantom = invent_phantom(rng)
        patient = SyntheticPatient(identity, phantom)
        for study_index in range(studies_per_patient):
            study_identity = invent_study(identity, study_index, words, rng, uids)
            planter = Planter(identity, study_identity, words, uids)
            study = _write_study(
                out / identity.label / study_identity.label,
                planter,
                phantom,
                (
                    ct_geometry(rows, columns, ct_slices),
                    mr_geometry(rows, columns, mr_slices),
                ),
                seed,
                filled,
            )
            identity.planted.extend(planter.planted)
            patient.studies.append(study)
        corpus_patients.append(patient)

    corpus = SyntheticCorpus(out, seed, corpus_patients, frozenset(filled))
    log.info(
        "wrote %d synthetic instances of %d patients in %.1f s",
        len(corpus.files),
        patients,
        time.perf_counter() - started,
    )
    return corpus


def sample_files(dest: Path) -> list[Path]:
    """Return the bundled sample files and a small synthetic corpus written to ``dest``.

    The corpus is the default of :func:`generate_studies`: 3 patients, 2 studies
    each, 216 instances of 64 x 64 pixels.
    """
    return bundled_sample_files() + generate_studies(dest).files


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ConfigurationError(
            f"{name} is {value}; expected an integer from {low} to {high}"
        )


def _write_study(
    folder: Path,
    planter: Planter,
    phantom: Phantom,
    geometries: tuple[SeriesGeometry, SeriesGeometry],
    seed: int,
    filled: set[str],
) -> SyntheticStudy:
    """Write the CT and the MR series of one study."""
    patient, identity = planter.patient, planter.study
    ct, mr = geometries

    # Identity shared by both series: every table attribute, then the patient's
    # and the study's own values, which override the generic ones.
    shared = Dataset()
    filled |= plant_table(shared, planter)
    plant_patient(shared, planter)
    plant_study(shared, planter)
    filled |= PLANTED_BY_NAME | set(REPEATING_GROUP_ROWS)

    # UIDs of every instance first, so that instances can reference each other.
    series_uids = [planter.uid("series-ct"), planter.uid("series-mr")]
    ct_uids = [planter.uid(f"ct-{k}") for k in range(ct.slices)]
    mr_uids = [planter.uid(f"mr-{k}") for k in range(mr.slices)]
    study = SyntheticStudy(identity)
    specs = (
        ("CT", ct, ct_uids, list(range(ct.slices))),
        ("MR", mr, mr_uids, _interleaved(mr.slices)),
    )
    for series_index, (modality, geometry, sop_uids, order) in enumerate(specs):
        series = SyntheticSeries(
            label=f"series-{series_index + 1:02d}-{modality.lower()}",
            modality=modality,
            series_instance_uid=series_uids[series_index],
            geometry=geometry,
        )
        template = _series_template(
            shared, planter, series, series_index, series_uids[1 - series_index]
        )
        noise = np.random.default_rng(
            [seed, patient.index, identity.index, series_index]
        )
        _write_series(
            folder / series.label,
            template,
            series,
            sop_uids,
            order,
            phantom,
            noise,
            reference_uids=(ct_uids, mr_uids),
        )
        for uid in sop_uids:
            planter.record("SOPInstanceUID", uid, Kind.UID)
        study.series.append(series)
    return study


def _interleaved(slices: int) -> list[int]:
    """Slice indexes in interleaved acquisition order: even slices, then odd ones."""
    return [*range(0, slices, 2), *range(1, slices, 2)]


def _series_template(
    shared: Dataset,
    planter: Planter,
    series: SyntheticSeries,
    series_index: int,
    other_series_uid: str,
) -> Dataset:
    """Build the dataset every instance of ``series`` starts from."""
    patient, study = planter.patient, planter.study
    geometry, modality = series.geometry, series.modality
    ds = copy.deepcopy(shared)

    # Series identity, with descriptors that embed patient identity.
    planter.put(
        ds,
        "SeriesInstanceUID",
        series.series_instance_uid,
        Kind.UID,
        "SeriesInstanceUID",
    )
    ds.SeriesNumber = series_index + 1
    ds.AcquisitionNumber = 1
    if modality == "CT":
        description, protocol = "axial chest 5 mm", "routine chest"
    else:
        description, protocol = "sagittal T2", "T2 TSE sagittal"
    planter.put(
        ds,
        "SeriesDescription",
        planter.descriptor(description, 64),
        Kind.TEXT,
        "SeriesDescription",
    )
    planter.put(
        ds, "ProtocolName", planter.descriptor(protocol, 64), Kind.TEXT, "ProtocolName"
    )
    related = Dataset()
    related.StudyInstanceUID = study.study_instance_uid
    related.SeriesInstanceUID = other_series_uid
    related.PurposeOfReferenceCodeSequence = []
    ds.RelatedSeriesSequence = [related]

    # Equipment and acquisition: values that carry no identity and must survive.
    retained = CT_RETAINED if modality == "CT" else MR_RETAINED
    for keyword, value in retained.items():
        setattr(ds, keyword, value)
    ds.SOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if modality == "CT" else "M"]
    ds.SoftwareVersions = "1.0"
    ds.BurnedInAnnotation = "NO"
    ds.PositionReferenceIndicator = ""

    # Geometry shared by every slice.
    ds.ImageOrientationPatient = [ds_text(v) for v in geometry.orientation]
    ds.PixelSpacing = geometry.pixel_spacing
    ds.SliceThickness = ds_text(geometry.slice_thickness)
    ds.SpacingBetweenSlices = ds_text(geometry.spacing_between_slices)

    # Pixel description: signed 16-bit CT, unsigned 12-bit MR.
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = geometry.rows, geometry.columns
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if modality == "CT" else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if modality == "CT" else 0

    plant_private_blocks(ds, planter, diffusion=modality == "MR")
    plant_overlay(ds, planter, geometry.rows, geometry.columns)
    plant_curve(ds, planter)

    series.retained = {
        **retained,
        "PatientSex": patient.sex,
        "PatientSize": patient.size_m,
        "PatientWeight": patient.weight_kg,
        "SliceThickness": ds.SliceThickness,
        "SpacingBetweenSlices": ds.SpacingBetweenSlices,
        '(0019,"SIEMENS MR HEADER",0C)': "1000" if modality == "MR" else None,
    }
    if modality == "CT":
        del series.retained['(0019,"SIEMENS MR HEADER",0C)']
    return ds


def _write_series(
    folder: Path,
    template: Dataset,
    series: SyntheticSeries,
    sop_uids: list[str],
    order: list[int],
    phantom: Phantom,
    noise: np.random.Generator,
    reference_uids: tuple[list[str], list[str]],
) -> None:
    """Write one file per slice; ``order`` lists slice indexes by InstanceNumber."""
    folder.mkdir(parents=True, exist_ok=True)
    geometry = series.geometry
    ct_uids, mr_uids = reference_uids
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = template.SOPClassUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    encoder = SeriesEncoder(template)
    pixels = ct_pixels if series.modality == "CT" else mr_pixels

    # Pixel data is drawn in slice order, so the noise does not depend on numbering.
    slices = [pixels(geometry, phantom, k, noise) for k in range(geometry.slices)]
    for position_in_order, slice_index in enumerate(order):
        instance_number = position_in_order + 1
        uid = sop_uids[slice_index]
        meta.MediaStorageSOPInstanceUID = UID(uid)
        instance = Dataset()
        instance.SOPInstanceUID = uid
        instance.InstanceNumber = instance_number
        position = geometry.position(slice_index)
        instance.ImagePositionPatient = [ds_text(v) for v in position]
        instance.SliceLocation = ds_text(float(np.dot(position, geometry.normal)))
        instance.add_new(PIXEL_DATA, "OW", slices[slice_index].tobytes())
        _set_references(instance, series.modality, slice_index, ct_uids, mr_uids)
        path = folder / f"{instance_number:04d}.dcm"
        path.write_bytes(encoder.encode(meta, instance))
        series.files.append(path)
        series.sop_instance_uids.append(uid)
        series.instance_numbers.append(instance_number)
        series.slice_indexes.append(slice_index)


def _set_references(
    ds: Dataset, modality: str, slice_index: int, ct_uids: list[str], mr_uids: list[str]
) -> None:
    """Point each instance at other instances of its study."""
    if modality == "CT":
        neighbour = ct_uids[(slice_index + 1) % len(ct_uids)]
        ds.ReferencedImageSequence = [_image_reference(CTImageStorage, neighbour)]
        # A CT instance names an MR instance as its source, crossing series.
        ds.SourceImageSequence = [
            _image_reference(MRImageStorage, mr_uids[len(mr_uids) // 2])
        ]
    else:
        neighbour = mr_uids[(slice_index + 1) % len(mr_uids)]
        ds.ReferencedImageSequence = [
            _image_reference(CTImageStorage, ct_uids[len(ct_uids) // 2])
        ]
        ds.SourceImageSequence = [_image_reference(MRImageStorage, neighbour)]


def _image_reference(sop_class: str, sop_instance: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    return item
