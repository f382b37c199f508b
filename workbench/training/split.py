"""Training and validation split by patient, so no patient sits on both sides.

Slices of one patient look alike; a split by item would let the validation score
measure memory of a patient rather than what was learnt. Items are grouped by
``PatientID`` (the dataset's pseudonym), falling back to ``StudyInstanceUID``
and then ``SeriesInstanceUID`` for items without one, and whole groups are
drawn for validation with a seeded generator.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from workbench.errors import DatasetError

__all__ = ["PatientSplit", "split_by_patient"]


@dataclass(frozen=True)
class PatientSplit:
    """Item indexes and patient groups of each side of a split."""

    train: list[int]
    validation: list[int]
    train_patients: list[str]
    validation_patients: list[str]


def split_by_patient(
    items: Sequence[Mapping[str, Any]], fraction: float, seed: int
) -> PatientSplit:
    """Hold out ``fraction`` of the patients (at least one, never all) for validation.

    Raises
    ------
    DatasetError
        When the items come from fewer than two patients.
    """
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(patient_group(item), []).append(index)
    patients = sorted(groups)
    if len(patients) < 2:
        raise DatasetError(
            f"the items come from {len(patients)} patient(s); a split by patient"
            " needs at least two"
        )
    count = min(max(1, math.ceil(fraction * len(patients))), len(patients) - 1)
    # A seeded generator for a reproducible split, not for security.
    chosen = set(random.Random(seed).sample(patients, count))  # noqa: S311
    validation_patients = [p for p in patients if p in chosen]
    train_patients = [p for p in patients if p not in chosen]
    return PatientSplit(
        train=[i for p in train_patients for i in groups[p]],
        validation=[i for p in validation_patients for i in groups[p]],
        train_patients=train_patients,
        validation_patients=validation_patients,
    )


def patient_group(item: Mapping[str, Any]) -> str:
    """Return the key that groups ``item`` with the other items of its patient."""
    for key in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID"):
        value = item.get(key)
        if value:
            return f"{key}:{value}" if key != "PatientID" else str(value)
    raise DatasetError(
        "an item has no PatientID, StudyInstanceUID or SeriesInstanceUID to group"
        " it by patient"
    )
