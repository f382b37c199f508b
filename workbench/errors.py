"""Exceptions raised by the workbench.

Every error the package raises on purpose derives from :class:`WorkbenchError`, so a
caller can catch the whole family in one clause::

    WorkbenchError
    ├── ConfigurationError      bad option, missing file, unreadable settings
    ├── OrthancError            the Orthanc server failed or rejected a request
    │   ├── OrthancConnectionError   no answer from the server
    │   ├── OrthancAuthError         credentials missing or rejected
    │   └── InsecureConnectionError  plain HTTP to a remote host without --insecure
    ├── OrthancServerError      the local Orthanc process could not be managed
    ├── DicomReadError          bytes that are not a readable DICOM instance
    ├── DeidentificationError   the recipe could not be applied or verified
    │   ├── RecipeError              the recipe file is invalid
    │   └── VerificationError        an identifying source value survived
    ├── DatasetError            a dataset folder is missing, invalid or locked
    └── AuditError              the audit store failed
        └── AuditChainError          the hash chain does not verify

Messages never contain patient data: they name Orthanc ids, pseudonymous UIDs,
attribute keywords and reasons, never values.
"""

from __future__ import annotations


class WorkbenchError(Exception):
    """Base class of every error the workbench raises on purpose."""


class ConfigurationError(WorkbenchError):
    """An option, setting or file the user supplied is invalid or missing."""


class OrthancError(WorkbenchError):
    """The Orthanc server failed or rejected a request.

    Parameters
    ----------
    message
        What went wrong and what to do about it.
    url
        The request URL, without credentials.
    status
        The HTTP status code, when the server answered.
    """

    def __init__(self, message: str, *, url: str = "", status: int | None = None):
        super().__init__(message)
        self.url = url
        self.status = status


class OrthancConnectionError(OrthancError):
    """The Orthanc server did not answer."""


class OrthancAuthError(OrthancError):
    """The Orthanc server rejected the credentials, or none were given."""


class InsecureConnectionError(OrthancError):
    """A plain-HTTP URL names a non-loopback host and --insecure was not given."""


class OrthancServerError(WorkbenchError):
    """The local Orthanc process could not be started, found or stopped."""


class DicomReadError(WorkbenchError):
    """Bytes could not be read as a DICOM instance.

    Parameters
    ----------
    message
        The reason, free of patient data.
    reason
        A short machine-readable reason code, such as ``"not-dicom"`` or
        ``"truncated"``.
    """

    def __init__(self, message: str, *, reason: str):
        super().__init__(message)
        self.reason = reason


class DeidentificationError(WorkbenchError):
    """The de-identification recipe could not be applied to an instance."""


class RecipeError(DeidentificationError):
    """The de-identification recipe file is invalid."""


class VerificationError(DeidentificationError):
    """An identifying value of the source instance survived de-identification.

    Parameters
    ----------
    message
        Which kind of value was found where; never the value itself.
    findings
        ``(kind, attribute path)`` pairs, for example
        ``("person name", "RequestAttributesSequence[0].RequestingPhysician")``.
    """

    def __init__(self, message: str, *, findings: list[tuple[str, str]]):
        super().__init__(message)
        self.findings = findings


class DatasetError(WorkbenchError):
    """A dataset folder is missing, invalid, or not what the caller expects."""


class AuditError(WorkbenchError):
    """The audit store could not be opened, written or read."""


class AuditChainError(AuditError):
    """The audit log's hash chain does not verify.

    Parameters
    ----------
    message
        What broke and where.
    sequence
        The sequence number of the first record that fails to verify.
    """

    def __init__(self, message: str, *, sequence: int | None = None):
        super().__init__(message)
        self.sequence = sequence
