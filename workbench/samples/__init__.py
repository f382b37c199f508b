"""DICOM input for the demo and the tests: bundled, synthetic and field-case files.

- :func:`bundled_sample_files`: real DICOM files shipped inside installed packages.
- :func:`generate_studies`: synthetic CT and MR studies of invented patients, with
  invented identities planted in every attribute that can carry identity.
- :func:`build_field_case`: small inputs that reproduce how DICOM goes wrong in
  practice (nested identities, broken files, unusual encodings), one per case in
  :data:`FIELD_CASES`.
"""

from __future__ import annotations

from workbench.samples.bundled import bundled_sample_files
from workbench.samples.field_cases import FIELD_CASES, FieldCase, build_field_case
from workbench.samples.identities import PlantedValue
from workbench.samples.synthetic import SyntheticCorpus, generate_studies, sample_files

__all__ = [
    "FIELD_CASES",
    "FieldCase",
    "PlantedValue",
    "SyntheticCorpus",
    "build_field_case",
    "bundled_sample_files",
    "generate_studies",
    "sample_files",
]
