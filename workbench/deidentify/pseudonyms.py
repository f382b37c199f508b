"""Keyed, deterministic pseudonyms: new UIDs, patient pseudonyms and date shifts.

Every replacement value is derived from the source value with HMAC-SHA-256 under the
installation's de-identification key, so the same source gives the same pseudonym in
every run and every batch, and nobody without the key can reverse or recompute it.

- A UID maps to ``2.25.<integer>``, the UUID-derived form of PS3.5 B.2, from the
  UID's value alone: a UID named inside a sequence maps to the same value as the
  instance it names. UIDs under the DICOM root ``1.2.840.10008`` (SOP classes,
  transfer syntaxes, coding schemes) name kinds of object, not patients, and pass
  unchanged.
- A patient maps to one pseudonym, used as both PatientID and PatientName, and to one
  date shift, a whole number of days between -365 and -31, so intervals between a
  patient's dates survive. Keeping the shift within a year keeps seasons and ages
  close to true and makes it rare for a shifted date to land on another date of
  the same patient, which verification would reject.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import uuid
from functools import lru_cache

__all__ = ["DICOM_ROOT_UID", "Pseudonymizer", "patient_key"]

DICOM_ROOT_UID = "1.2.840.10008."
PSEUDONYM_PREFIX = "WB"
MIN_SHIFT_DAYS = 31
MAX_SHIFT_DAYS = 365
SHIFT_SPAN_DAYS = MAX_SHIFT_DAYS - MIN_SHIFT_DAYS + 1


class Pseudonymizer:
    """Derive replacement values from source values under one key.

    Parameters
    ----------
    key
        The secret de-identification key (see :func:`workbench.home.read_key`).
    """

    def __init__(self, key: bytes):
        if len(key) < 16:
            raise ValueError("de-identification key must be at least 16 bytes")
        self._key = key
        # Bound caches: a series repeats its study, series and frame-of-reference
        # UIDs in every instance.
        self.uid = lru_cache(maxsize=65536)(self._uid)  # type: ignore[method-assign]

    def _digest(self, namespace: bytes, value: str) -> bytes:
        return hmac.new(
            self._key, namespace + b"\x00" + value.encode("utf-8"), hashlib.sha256
        ).digest()

    def _uid(self, value: str) -> str:
        """Return the keyed replacement of one UID value."""
        value = value.strip().rstrip("\x00")
        if not value or value.startswith(DICOM_ROOT_UID):
            return value
        digest = self._digest(b"uid", value)
        return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"

    def patient_pseudonym(self, key: str) -> str:
        """Return the pseudonym of the patient whose identity key is ``key``."""
        digest = self._digest(b"patient", key)
        text = base64.b32encode(digest[:10]).decode("ascii")
        return f"{PSEUDONYM_PREFIX}{text}"

    def date_shift_days(self, key: str) -> int:
        """Return the patient's date shift in days (always negative)."""
        digest = self._digest(b"date-shift", key)
        return -(MIN_SHIFT_DAYS + int.from_bytes(digest[:8], "big") % SHIFT_SPAN_DAYS)


def patient_key(patient_id: str, patient_name: str = "", birth_date: str = "") -> str:
    """Return the text that identifies one patient, for keyed pseudonyms.

    The PatientID identifies the patient. IssuerOfPatientID is not part of the key:
    archives fill it inconsistently between studies of one patient, which would
    split the patient in two. Without an ID, the normalised name and the birth
    date identify the patient: upper case, trailing component and group
    separators removed, so ``DOE^JANE`` and ``DOE^JANE^`` are one patient.
    """
    patient_id = patient_id.strip()
    if patient_id:
        return f"id:{patient_id}"
    return f"name:{normalise_person_name(patient_name)}|{birth_date.strip()}"


def normalise_person_name(name: str) -> str:
    """Return a person name in a form that ignores empty trailing components."""
    groups = [group.rstrip("^ ") for group in name.split("=")]
    while groups and not groups[-1]:
        groups.pop()
    return "=".join(groups).upper()


def shift_date(value: str, days: int) -> str | None:
    """Shift a DA value (``YYYYMMDD``) by ``days``; None when it is not a full date."""
    value = value.strip()
    if len(value) != 8 or not value.isdigit():
        return None
    try:
        day = dt.date(int(value[:4]), int(value[4:6]), int(value[6:]))
    except ValueError:
        return None
    return (day + dt.timedelta(days=days)).strftime("%Y%m%d")


def shift_datetime(value: str, days: int) -> str | None:
    """Shift the date part of a DT value, keeping time and UTC offset unchanged.

    Returns None when the value does not start with a full ``YYYYMMDD`` date, since
    a partial date cannot be shifted by whole days without changing its precision.
    """
    value = value.strip()
    shifted = shift_date(value[:8], days)
    if shifted is None:
        return None
    return shifted + value[8:]
