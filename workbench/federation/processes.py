"""Flower server processes started by the workbench, and how they are stopped.

A SuperLink or SuperNode starts helpers in new sessions (``flower-superexec``,
then ``flwr-serverapp`` or ``flwr-clientapp`` per run); when its parent is killed,
Flower 1.42 leaves the SuperNode's ``flower-superexec`` running. A
:class:`FlowerProcess` therefore records every descendant it sees (PID and start
time, polled by a thread) and :meth:`FlowerProcess.stop` ends all of them, by PID,
also those already re-parented to init. The sites' trainers
(:mod:`workbench.federation.trainer`) run as a :class:`FlowerProcess` too.

Every process gets an environment with Flower's telemetry and update check off
(both would contact flower.ai) and ``FLWR_HOME`` set to a private folder.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from workbench.errors import ConfigurationError, WorkbenchError

__all__ = [
    "FlowerProcess",
    "FlowerProcessError",
    "flower_environment",
    "free_port",
    "wait_for_port",
]

log = logging.getLogger(__name__)

# Seconds between two scans of a process tree for new descendants. Flower's
# helpers live for a run or a message, many seconds; each scan reads the whole
# process table.
SCAN_INTERVAL_S = 1.0
# Seconds between two task polls of flower-superexec.
SUPEREXEC_POLL_S = 0.5
# Seconds a process has to end after SIGTERM before it gets SIGKILL.
TERMINATE_GRACE_S = 5.0


class FlowerProcessError(WorkbenchError):
    """A Flower process could not be started, or ended early."""


def flower_environment(
    flwr_home: str | os.PathLike[str], extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Return the environment for Flower commands: offline, with a private FLWR_HOME.

    The virtual environment's ``bin`` comes first on ``PATH``, because the
    SuperLink and SuperNode start ``flower-superexec``, ``flwr-serverapp`` and
    ``flwr-clientapp`` by name.
    """
    # Flower's commands print JSON through Rich, which colours it when a notebook
    # kernel's FORCE_COLOR asks for colour; plain text is what gets parsed.
    environment = {
        name: value
        for name, value in os.environ.items()
        if name not in ("FORCE_COLOR", "CLICOLOR_FORCE")
    }
    environment.update(
        {
            "NO_COLOR": "1",
            "FLWR_HOME": os.fspath(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            # flower-superexec looks for a new ClientApp or ServerApp task this
            # often (seconds; 1 by default in Flower 1.42).
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": str(SUPEREXEC_POLL_S),
            "PYTHONUNBUFFERED": "1",
        }
    )
    bin_folder = str(Path(sys.executable).parent)
    environment["PATH"] = os.pathsep.join(
        [bin_folder, *(p for p in environment.get("PATH", "").split(os.pathsep) if p)]
    )
    environment.update(extra or {})
    return environment


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 at the time of the call."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, process: FlowerProcess) -> None:
    """Wait until ``host:port`` accepts connections, or raise FlowerProcessError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process.alive():
            raise FlowerProcessError(
                f"{process.name} exited with status {process.returncode} before"
                f" listening on {host}:{port}; see {process.log_path}:"
                f"\n{process.log_tail()}"
            )
        with contextlib.suppress(OSError), socket.create_connection((host, port), 1):
            return
        time.sleep(0.2)
    raise FlowerProcessError(
        f"{process.name} did not listen on {host}:{port} within {timeout:.0f} s; see"
        f" {process.log_path}:\n{process.log_tail()}"
    )


class FlowerProcess:
    """One Flower command started by the workbench, with every process it starts.

    Parameters
    ----------
    name
        What the process is, for messages (``"SuperLink"``, ``"SuperNode site-a"``).
    command
        The argument list.
    environment
        Its environment, usually from :func:`flower_environment`.
    log_path
        File that receives its standard output and error.
    """

    def __init__(
        self,
        name: str,
        command: Sequence[str],
        environment: Mapping[str, str],
        log_path: str | os.PathLike[str],
    ) -> None:
        self.name = name
        self.command = list(command)
        self.log_path = Path(log_path)
        self._environment = dict(environment)
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        # PID -> start time, of every descendant seen. The start time distinguishes a
        # recorded process from a later one that reuses its PID.
        self._seen: dict[int, float] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        """PID of the command, or None before :meth:`start`."""
        return self._process.pid if self._process else None

    @property
    def returncode(self) -> int | None:
        """Exit status once the command has ended, else None."""
        return self._process.poll() if self._process else None

    def start(self) -> FlowerProcess:
        """Start the command in a new process group and begin watching its tree."""
        import psutil

        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        try:
            self._process = subprocess.Popen(
                self.command,
                env=self._environment,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                process_group=0,
            )
        except OSError as exc:
            self._log.close()
            raise FlowerProcessError(
                f"cannot start {self.name} ({self.command[0]}): {exc}; is flwr"
                " installed in this virtual environment?"
            ) from exc
        with contextlib.suppress(psutil.Error):
            self._seen[self._process.pid] = psutil.Process(
                self._process.pid
            ).create_time()
        self._watcher = threading.Thread(
            target=self._watch, name=f"watch {self.name}", daemon=True
        )
        self._watcher.start()
        log.info("started %s, PID %d", self.name, self._process.pid)
        return self

    def alive(self) -> bool:
        """Return whether the command itself still runs."""
        return self._process is not None and self._process.poll() is None

    def descendants(self) -> list[int]:
        """Return the PIDs recorded so far that still run, the command's own first."""
        import psutil

        self._scan()
        alive = []
        with self._lock:
            recorded = dict(self._seen)
        for pid, created in recorded.items():
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                if (
                    process.create_time() == created
                    and process.status() != psutil.STATUS_ZOMBIE
                ):
                    alive.append(pid)
        return alive

    def kill(self) -> None:
        """Kill the command and every recorded descendant at once (SIGKILL)."""
        self._kill_all()
        self._reap()

    def stop(self, grace: float = TERMINATE_GRACE_S) -> None:
        """End the command and every recorded descendant; SIGKILL them after grace."""
        if self._process is None:
            return
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self.descendants():
            time.sleep(0.1)
        left = self.descendants()
        if left:
            log.warning(
                "%s: %d processes outlived SIGTERM by %.0f s; killing them",
                self.name,
                len(left),
                grace,
            )
            self._kill_all()
        self._reap()

    def log_tail(self, lines: int = 30) -> str:
        """Return the last ``lines`` lines of the process's log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _kill_all(self) -> None:
        """SIGKILL every recorded process until none runs.

        A process that was starting a child when the signal came leaves that
        child behind; the next scan records it, and it is killed in turn.
        """
        deadline = time.monotonic() + TERMINATE_GRACE_S
        while True:
            self._signal_all(signal.SIGKILL)
            time.sleep(0.05)
            if not self.descendants() or time.monotonic() > deadline:
                return

    def _signal_all(self, number: int) -> None:
        import psutil

        self._scan()
        with self._lock:
            recorded = dict(self._seen)
        for pid, created in recorded.items():
            with contextlib.suppress(psutil.Error, ProcessLookupError, PermissionError):
                if psutil.Process(pid).create_time() == created:
                    os.kill(pid, number)

    def _reap(self) -> None:
        self._stopping.set()
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=TERMINATE_GRACE_S)
        if self._watcher is not None:
            self._watcher.join(timeout=2)
        if self._log is not None:
            self._log.close()
            self._log = None

    def _watch(self) -> None:
        while not self._stopping.is_set():
            self._scan()
            self._stopping.wait(SCAN_INTERVAL_S)

    def _scan(self) -> None:
        """Record the descendants of every recorded process that still runs."""
        import psutil

        with self._lock:
            roots = list(self._seen)
        # One pass over the process table, then a walk down from the roots:
        # psutil's children() would read the whole table once per root.
        children: dict[int, list[tuple[int, float]]] = {}
        for process in psutil.process_iter(["ppid", "create_time"]):
            info = process.info
            if info["ppid"] is not None and info["create_time"] is not None:
                children.setdefault(info["ppid"], []).append(
                    (process.pid, info["create_time"])
                )
        found: dict[int, float] = {}
        pending = list(roots)
        while pending:
            for child, created in children.get(pending.pop(), []):
                if child not in found:
                    found[child] = created
                    pending.append(child)
        with self._lock:
            for pid, created in found.items():
                self._seen.setdefault(pid, created)


def require_flower_command(name: str) -> str:
    """Return the path of a Flower command next to this interpreter."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        raise ConfigurationError(
            f"{name} not found next to {sys.executable}; install the federation extra"
            " (flwr 1.42) into this virtual environment"
        )
    return str(path)
