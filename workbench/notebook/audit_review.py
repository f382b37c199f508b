"""The audit log for review in a notebook: records as a DataFrame, chain verified.

:func:`audit_log` returns the records that match the filters of
:meth:`~workbench.audit.AuditLog.records` as a pandas DataFrame, one row per record,
with ``timestamp`` as a UTC datetime. :func:`verify_audit` recomputes the hash
chain, as ``workbench audit verify`` does. Reading the log is not itself recorded.
"""

from __future__ import annotations

from datetime import datetime

import pandas as pd

from workbench.audit import VerificationReport, open_audit_log
from workbench.audit.store import RECORD_COLUMNS

__all__ = ["audit_log", "verify_audit"]


def audit_log(
    action: str | None = None,
    actor: str | None = None,
    outcome: str | None = None,
    resource: str | None = None,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    limit: int | None = None,
    *,
    url: str | None = None,
) -> pd.DataFrame:
    """Return audit records as a DataFrame, oldest first, without verifying them.

    Parameters
    ----------
    action, actor, outcome
        Exact values to match, such as ``action="dataset.read"``.
    resource
        Keep records whose resource starts with this text, such as
        ``"dataset:demo"``.
    since, until
        Keep records with ``since <= timestamp < until``: datetimes or ISO 8601
        strings, taken to be UTC when they carry no offset.
    limit
        Keep only the newest ``limit`` matching records.
    url
        The audit log (default: ``WORKBENCH_AUDIT_URL``, else ``audit.sqlite`` in
        the workbench home).

    Returns
    -------
    pandas.DataFrame
        Columns ``sequence``, ``timestamp`` (UTC), ``actor``, ``action``,
        ``resource``, ``purpose``, ``outcome``, ``details`` (a dict per row),
        ``previous_hash`` and ``hash``.

    Raises
    ------
    ConfigurationError
        When a time is not ISO 8601 or ``limit`` is not a positive integer.
    AuditError
        When the log cannot be read.
    """
    with open_audit_log(url) as audit:
        records = audit.records(
            action=action,
            actor=actor,
            outcome=outcome,
            resource_prefix=resource,
            since=since,
            until=until,
            limit=limit,
        )
    frame = pd.DataFrame(
        [record.to_dict() for record in records], columns=list(RECORD_COLUMNS)
    )
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], utc=True, format="ISO8601")
    return frame


def verify_audit(
    expected_head: str | None = None, *, url: str | None = None
) -> VerificationReport:
    """Check every record's number, link and hash, and the head anchor.

    Parameters
    ----------
    expected_head
        A head hash kept outside the store from an earlier verification. The log
        passes only if some record has it, so deleting the newest records together
        with the anchor is detected.
    url
        The audit log (default: as for :func:`audit_log`).

    Returns
    -------
    VerificationReport
        Record count, head sequence and head hash.

    Raises
    ------
    AuditChainError
        At the first record that was edited, deleted, inserted or moved.
    """
    with open_audit_log(url) as audit:
        return audit.verify(expected_head=expected_head)
