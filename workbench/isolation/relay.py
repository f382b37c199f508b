"""The audit relay: an isolated job's audit events, stored by the process that ran it.

An isolated job has no audit database: it gets no password and cannot write the
SQLite file. Instead the runner opens a pipe and passes its write end to the job as
the file descriptor named by ``WORKBENCH_AUDIT_RELAY_FD``. In the job,
:func:`workbench.audit.open_audit_log` then returns a :class:`RelayAuditLog`, which
writes each ``append`` or ``append_many`` call as one JSON line to the pipe::

    {"events": [{"action": "dataset.read", "resource": "dataset:demo",
                 "purpose": "...", "outcome": "ok", "details": {...}}]}

In the runner, :class:`AuditRelay` reads the lines in a thread and appends each
line's events with one ``append_many`` call to the real audit log, so the job's
records join the same hash chain as the runner's ``job.start`` and ``job.end``.
The runner stamps its own user as the actor and rejects ``job.*`` actions, so a job
cannot forge who acted or when a job started or ended.
"""

from __future__ import annotations

import json
import logging
import os
import select
import stat
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from workbench.audit import (
    AuditEvent,
    AuditLog,
    AuditRecord,
    VerificationReport,
    current_user,
)
from workbench.audit.chain import format_timestamp
from workbench.audit.log import AUDIT_RELAY_FD_ENV
from workbench.errors import AuditError

__all__ = ["MAX_LINE_BYTES", "AuditRelay", "RelayAuditLog"]

log = logging.getLogger(__name__)

# Maximum length of a JSON line that the runner accepts. Audit events carry counts
# and ids, not data, so real lines are far shorter.
MAX_LINE_BYTES = 1 << 20

# Seconds the reading thread waits for data before it checks whether to stop.
IDLE_POLL_S = 0.2

# Seconds the reading thread keeps storing events after the job has ended, in case
# a process that escaped the job keeps writing.
MAX_DRAIN_S = 5.0

# Serialises writes of this process's threads. Writes of up to PIPE_BUF (4096) bytes
# are atomic on Linux, so lines of forked worker processes interleave only above that.
_write_lock = threading.Lock()


def _renew_write_lock() -> None:
    # A fork taken while another thread held the lock would leave it held forever.
    global _write_lock  # noqa: PLW0603 (one lock per process, replaced after fork)
    _write_lock = threading.Lock()


os.register_at_fork(after_in_child=_renew_write_lock)


class RelayAuditLog(AuditLog):
    """The audit log of an isolated job: appends go to the runner through a pipe.

    :func:`workbench.audit.open_audit_log` returns one when
    ``WORKBENCH_AUDIT_RELAY_FD`` is set and no URL is given. It may be used in
    processes forked from the job, such as PyTorch data-loader workers, which
    inherit the pipe.

    Parameters
    ----------
    fd
        The write end of the relay pipe.

    Raises
    ------
    AuditError
        When ``fd`` is not an open pipe, as in a program the job started without
        passing it the descriptor.
    """

    def __init__(self, fd: int) -> None:
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            raise AuditError(
                f"{AUDIT_RELAY_FD_ENV}={fd} names no open file descriptor in this"
                " process; a program started by an isolated job inherits the audit"
                f" relay only when it is given descriptor {fd} (pass_fds)"
            ) from exc
        if not stat.S_ISFIFO(mode):
            raise AuditError(
                f"{AUDIT_RELAY_FD_ENV}={fd} is not the audit relay pipe; a program"
                " started by an isolated job inherits the relay only when it is"
                f" given descriptor {fd} (pass_fds)"
            )
        self._fd = fd
        self._closed = False
        self._pid = os.getpid()

    @classmethod
    def from_environment(cls) -> RelayAuditLog:
        """Open the relay named by ``WORKBENCH_AUDIT_RELAY_FD``."""
        text = os.environ.get(AUDIT_RELAY_FD_ENV, "")
        try:
            fd = int(text)
        except ValueError as exc:
            raise AuditError(
                f"{AUDIT_RELAY_FD_ENV}={text!r} is not a file descriptor number"
            ) from exc
        return cls(fd)

    @property
    def location(self) -> str:
        """Where appends go: the pipe to the process that started the job."""
        return f"relay to the job runner (descriptor {self._fd})"

    def close(self) -> None:
        """Stop using this object. The pipe stays open for other users in the job."""
        self._closed = True

    def append_many(self, events: Iterable[AuditEvent]) -> list[AuditRecord]:
        """Send ``events`` to the runner, which appends them in one transaction.

        Returns
        -------
        list[AuditRecord]
            Provisional records: the runner assigns the sequence number, the
            timestamp, the hashes and the actor (its own user) when it stores them,
            so ``sequence`` is 0 and both hashes are empty here.

        Raises
        ------
        AuditError
            When an item is not an :class:`AuditEvent`, the line is longer than
            :data:`MAX_LINE_BYTES`, this object is closed, or the runner is gone.
        """
        if self._closed:
            raise AuditError(f"audit log {self.location} is closed; open it again")
        events = list(events)
        for event in events:
            if not isinstance(event, AuditEvent):
                raise AuditError(
                    f"append expects AuditEvent objects, got {type(event).__name__}"
                )
        if not events:
            return []
        line = _encode_line(events)
        with _write_lock:
            _write_all(self._fd, line, self.location)

        timestamp = format_timestamp(datetime.now(UTC))
        actor = current_user()
        return [
            AuditRecord(
                sequence=0,
                timestamp=timestamp,
                actor=event.actor or actor,
                action=event.action,
                resource=event.resource,
                purpose=event.purpose,
                outcome=event.outcome,
                details=dict(event.details),
                previous_hash="",
                hash="",
            )
            for event in events
        ]

    def verify(self, expected_head: str | None = None) -> VerificationReport:
        """Raise AuditError: the chain lives with the runner, not in the job."""
        raise self._not_here("verify")

    def records(self, *args: Any, **kwargs: Any) -> list[AuditRecord]:
        """Raise AuditError: the records live with the runner, not in the job."""
        raise self._not_here("read")

    def _not_here(self, operation: str) -> AuditError:
        return AuditError(
            f"cannot {operation} the audit log inside an isolated job: its events go"
            " to the process that started the job, which stores them; run"
            " `workbench audit verify` or `workbench audit show` there"
        )


def _encode_line(events: list[AuditEvent]) -> bytes:
    payload = {
        "events": [
            {
                "action": event.action,
                "resource": event.resource,
                "purpose": event.purpose,
                "outcome": event.outcome,
                "details": event.details,
            }
            for event in events
        ]
    }
    line = (json.dumps(payload, ensure_ascii=False) + "\n").encode("utf-8")
    if len(line) > MAX_LINE_BYTES:
        raise AuditError(
            f"{len(events)} audit events take {len(line)} bytes, more than the relay"
            f" accepts in one call ({MAX_LINE_BYTES}); append fewer events at once"
            " or keep details to counts and ids"
        )
    return line


def _write_all(fd: int, data: bytes, location: str) -> None:
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except OSError as exc:
            raise AuditError(
                f"cannot send an audit event through the {location}: {exc}; the"
                " process that started the job has ended"
            ) from exc
        view = view[written:]


class AuditRelay:
    """The runner's end of the relay: a pipe, and a thread that stores its events.

    Call :meth:`open` before starting the job, pass :attr:`write_fd` to it, call
    :meth:`job_started` once it runs, and :meth:`finish` when it has ended.

    Parameters
    ----------
    audit
        The audit log that stores the job's events.

    Attributes
    ----------
    stored
        Number of events appended to ``audit``.
    rejected
        Number of lines rejected as malformed, too long, or forging a ``job.*``
        action.
    failures
        Errors of the audit log while storing events, oldest first.
    """

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit
        self.stored = 0
        self.rejected = 0
        self.failures: list[AuditError] = []
        self._read_fd = -1
        self.write_fd = -1
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._read_lines, name="workbench-audit-relay", daemon=True
        )

    def open(self) -> int:
        """Create the pipe, start the reading thread, and return the write end."""
        self._read_fd, self.write_fd = os.pipe()
        self._thread.start()
        return self.write_fd

    def job_started(self) -> None:
        """Close this process's write end, so the pipe ends when the job's do."""
        if self.write_fd >= 0:
            os.close(self.write_fd)
            self.write_fd = -1

    def finish(self) -> None:
        """Store the events still in the pipe, then stop the thread and close it.

        The thread stops at the end of the pipe. In case a process that escaped
        the job keeps the write end open, it also stops once no data has arrived
        for :data:`IDLE_POLL_S` seconds after this call, or :data:`MAX_DRAIN_S`
        seconds after it in any case.
        """
        self.job_started()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        if self._read_fd >= 0:
            os.close(self._read_fd)
            self._read_fd = -1

    def _read_lines(self) -> None:
        pending = b""
        skipping = False
        stop_deadline: float | None = None
        while True:
            ready, _, _ = select.select([self._read_fd], [], [], IDLE_POLL_S)
            if self._stop.is_set():
                if stop_deadline is None:
                    stop_deadline = time.monotonic() + MAX_DRAIN_S
                if not ready or time.monotonic() > stop_deadline:
                    break
            if not ready:
                continue
            chunk = os.read(self._read_fd, 1 << 16)
            if not chunk:
                break
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                if skipping:
                    skipping = False
                else:
                    self._store_line(line)
            if len(pending) > MAX_LINE_BYTES:
                self._reject("a line longer than the limit")
                pending = b""
                skipping = True
        if pending and not skipping:
            self._reject("an unterminated line at the end of the pipe")

    def _store_line(self, line: bytes) -> None:
        try:
            events = _decode_line(line)
        except (AuditError, ValueError, TypeError, KeyError) as exc:
            self._reject(str(exc))
            return
        started = time.monotonic()
        try:
            self.audit.append_many(events)
        except AuditError as exc:
            log.error(
                "cannot store %d audit events from an isolated job: %s",
                len(events),
                exc,
            )
            self.failures.append(exc)
            return
        self.stored += len(events)
        log.debug(
            "stored %d relayed audit events in %.3f s",
            len(events),
            time.monotonic() - started,
        )

    def _reject(self, reason: str) -> None:
        self.rejected += 1
        log.warning("rejected a relayed audit line from an isolated job: %s", reason)


def _decode_line(line: bytes) -> list[AuditEvent]:
    payload = json.loads(line)
    if not isinstance(payload, dict) or not isinstance(payload.get("events"), list):
        raise AuditError("expected a JSON object with a list of events")
    events = []
    for item in payload["events"]:
        if not isinstance(item, dict):
            raise AuditError("expected each event to be a JSON object")
        action = item["action"]
        if isinstance(action, str) and action.startswith("job."):
            raise AuditError(
                f"action {action!r} is recorded only by the runner, not by the job"
            )
        events.append(
            AuditEvent(
                action=action,
                resource=item.get("resource", ""),
                purpose=item.get("purpose", ""),
                outcome=item.get("outcome", "ok"),
                details=item.get("details", {}),
            )
        )
    return events
