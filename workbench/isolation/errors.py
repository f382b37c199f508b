"""Errors of the isolated job runner.

Both derive from :class:`workbench.errors.WorkbenchError`::

    WorkbenchError
    ├── IsolationError     the sandbox could not be built, or the request is invalid
    └── IsolatedJobError   the job ran and failed: its exception, or its exit status
"""

from __future__ import annotations

from workbench.errors import WorkbenchError

__all__ = ["IsolatedJobError", "IsolationError"]


class IsolationError(WorkbenchError):
    """The isolated environment could not be created, so the job did not run."""


class IsolatedJobError(WorkbenchError):
    """The job raised an exception, or its process ended without a result.

    Parameters
    ----------
    message
        The job's exception message, or what happened to its process.
    error_type
        The job's exception class, such as ``"ValueError"`` or
        ``"workbench.errors.DatasetError"``; empty when the process ended without
        reporting an exception (killed, crashed, or ``os._exit``).
    traceback
        The traceback text printed in the job's process, or empty.
    exit_status
        The exit status of the job's process, or None when it was ended by a
        signal or ran in this process.
    signal
        The number of the signal that ended the job's process, or None.
    """

    def __init__(
        self,
        message: str,
        *,
        error_type: str = "",
        traceback: str = "",
        exit_status: int | None = None,
        signal: int | None = None,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.traceback = traceback
        self.exit_status = exit_status
        self.signal = signal
