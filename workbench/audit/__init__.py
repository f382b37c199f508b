"""Tamper-evident audit log of every data access in the workbench.

Each Orthanc query, instance fetched, dataset written or read, and training job start
and end is appended as a numbered record whose SHA-256 hash covers the hash of the
record before it. :meth:`AuditLog.verify` recomputes the chain and reports the first
record that was edited, deleted, inserted or moved. The log lives in a SQLite file
(the default, ``audit.sqlite`` in the workbench home) or a PostgreSQL database::

    from workbench.audit import AuditEvent, open_audit_log

    with open_audit_log() as audit:
        audit.append(AuditEvent(action="orthanc.query", resource="orthanc:/tools/find",
                                purpose="chest CT cohort",
                                details={"level": "Series", "matches": 12}))
        report = audit.verify()

Deleting the newest records together with the head anchor leaves a valid, shorter
chain. Keep ``report.head_hash`` outside the store and pass it to
``verify(expected_head=...)`` to detect that.

This is a data store, not a logger: it records accesses for review and never
configures Python logging.
"""

from workbench.audit.chain import (
    GENESIS_HASH,
    AuditEvent,
    AuditRecord,
    VerificationReport,
    record_hash,
)
from workbench.audit.log import AuditLog, current_user, open_audit_log

__all__ = [
    "GENESIS_HASH",
    "AuditEvent",
    "AuditLog",
    "AuditRecord",
    "VerificationReport",
    "current_user",
    "open_audit_log",
    "record_hash",
]
