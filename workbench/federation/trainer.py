"""A site's trainer: one long-lived isolated job that trains and evaluates every round.

An isolated job per round would start a new interpreter and import PyTorch and
MONAI (several seconds, more on a busy machine) every round. A site therefore
starts its trainer once, when it joins. :func:`serve` runs through
:func:`workbench.isolation.run_isolated` with the usual sandbox: no network, the
site's datasets read-only, the work folder the only writable place. It listens on a
Unix socket in the work folder, which the host reaches as a file through the
folder's bind mount, and answers one request per connection. The ClientApp writes
a round's global weights into the work folder, sends a request, and reads the
updated weights the trainer wrote there. The site's data stays in the trainer's
memory between rounds (:class:`~workbench.federation.local_round.SiteRounds`,
:class:`~workbench.federation.gemma_round.GemmaRounds`), and every round appends
its own ``dataset.read`` event to the site's audit log through the isolation
relay.

A client connects, sends one JSON line and reads one JSON line back::

    {"op": "train", "kind": "monai", "arguments": {...}}
    {"status": "ok", "value": {"train_loss": ..., ...}}

``op`` is ``train``, ``evaluate``, ``ping`` or ``stop``; ``kind`` is the
federation's kind and ``arguments`` are those of :meth:`SiteRounds.train` and
the other round methods. A failed request returns ``{"status": "error",
"error_type": ..., "message": ...}``.

:class:`Trainer` starts the process that runs the job (``python -m
workbench.federation.trainer``, which stores the job's ``job.start``, ``job.end``
and relayed events in the audit log of its environment), waits until it answers,
and stops it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError

__all__ = [
    "SOCKET_NAME",
    "Trainer",
    "TrainerClient",
    "TrainerError",
    "TrainerUnavailableError",
    "serve",
]

log = logging.getLogger(__name__)

SOCKET_NAME = "trainer.sock"
# Longest request or reply line; both carry settings, paths and numbers, not data.
MAX_LINE_BYTES = 1 << 20
# AF_UNIX paths are limited to 108 bytes on Linux, the terminating zero included.
MAX_SOCKET_PATH_BYTES = 100
# Seconds the trainer has to import PyTorch and MONAI and open its socket.
READY_TIMEOUT_S = 300.0
# Seconds a stop request waits for the trainer's process to end by itself.
STOP_GRACE_S = 10.0
# Modules a trainer imports before it listens, by federation kind.
PRELOAD = {
    "monai": ("torch", "monai"),
    "gemma-lora": ("torch", "transformers", "peft"),
}
ROUND_TARGETS = {
    "monai": "workbench.federation.local_round:SiteRounds",
    "gemma-lora": "workbench.federation.gemma_round:GemmaRounds",
}


class TrainerError(WorkbenchError):
    """A trainer request failed; ``error_type`` names the exception in the trainer."""

    def __init__(self, message: str, *, error_type: str = "") -> None:
        super().__init__(message)
        self.error_type = error_type


class TrainerUnavailableError(TrainerError):
    """No trainer answers on the socket."""


# The job inside the sandbox


def serve(
    *,
    socket_path: str,
    datasets: Sequence[str],
    preload: Sequence[str] = PRELOAD["monai"],
) -> dict[str, int]:
    """Answer trainer requests on ``socket_path`` until a ``stop`` request.

    This is the target of the trainer's isolated job.

    Parameters
    ----------
    socket_path
        The Unix socket to create, in one of the job's output folders.
    datasets
        The dataset folders the job may read; requests for others are rejected.
    preload
        Modules imported before the trainer listens, so that the first round
        does not wait for them.

    Returns
    -------
    dict
        ``requests``: the number of train and evaluate requests answered.
    """
    import importlib

    _log_to_standard_error()
    for module in preload:
        importlib.import_module(module)
    served = {os.path.realpath(path) for path in datasets}
    rounds: dict[str, Any] = {}
    answered = 0
    path = Path(socket_path)
    with _listening(path) as listener:
        log.info("trainer listening on %s for %d datasets", path, len(served))
        while True:
            connection, _ = listener.accept()
            with connection:
                try:
                    request = json.loads(_read_line(connection))
                except (OSError, ValueError) as exc:
                    log.warning("unreadable trainer request: %s", exc)
                    continue
                op = request.get("op") if isinstance(request, dict) else None
                if op == "stop":
                    _send_quietly(connection, {"status": "ok", "value": None})
                    break
                if op == "ping":
                    value = {"pid": os.getpid(), "requests": answered}
                    _send_quietly(connection, {"status": "ok", "value": value})
                    continue
                reply = _answer(request, rounds, served)
                answered += reply["status"] == "ok"
                _send_quietly(connection, reply)
    return {"requests": answered}


def _answer(
    request: dict[str, Any], rounds: dict[str, Any], served: set[str]
) -> dict[str, Any]:
    """Run one train or evaluate request; return the reply document."""
    try:
        op, kind = request.get("op"), request.get("kind")
        if op not in ("train", "evaluate") or kind not in ROUND_TARGETS:
            raise ValueError(
                f"request op {op!r} of kind {kind!r} is unknown; expected train or"
                f" evaluate of kind {sorted(ROUND_TARGETS)}"
            )
        arguments = dict(request.get("arguments") or {})
        dataset = os.path.realpath(str(arguments.get("dataset", "")))
        if dataset not in served:
            raise ValueError(
                f"dataset {arguments.get('dataset')} is not among the datasets this"
                " trainer was started with"
            )
        if kind not in rounds:
            rounds[kind] = _load_class(ROUND_TARGETS[kind])()
        value = getattr(rounds[kind], op)(**arguments)
        return {"status": "ok", "value": value}
    except Exception as exc:
        log.exception("trainer request failed")
        cls = type(exc)
        return {
            "status": "error",
            "error_type": f"{cls.__module__}.{cls.__qualname__}",
            "message": str(exc),
        }


def _load_class(target: str) -> Any:
    import importlib

    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


@contextlib.contextmanager
def _listening(path: Path) -> Iterator[socket.socket]:
    """Bind and listen on the Unix socket ``path``, replacing a stale one."""
    if path.exists():
        try:
            TrainerClient(path).request("ping", timeout=2.0)
        except TrainerUnavailableError:
            path.unlink()
        else:
            raise TrainerError(
                f"another trainer already answers on {path}; stop it first"
            )
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _short_address(path) as address:
            # Only this user may connect: the socket file gets mode 0600.
            previous = os.umask(0o177)
            try:
                listener.bind(address)
            finally:
                os.umask(previous)
        listener.listen(4)
        yield listener
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def _short_address(path: Path) -> Iterator[str]:
    """Yield an address for ``path`` that fits the AF_UNIX limit.

    A long path is reached through ``/proc/self/fd`` and an open descriptor of its
    folder, which the kernel resolves like the full path.
    """
    text = os.fspath(path)
    if len(text.encode()) < MAX_SOCKET_PATH_BYTES:
        yield text
        return
    folder = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{folder}/{path.name}"
    finally:
        os.close(folder)


def _read_line(connection: socket.socket) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = connection.recv(65536)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if chunk.endswith(b"\n"):
            break
        if size > MAX_LINE_BYTES:
            raise ValueError(f"line longer than {MAX_LINE_BYTES} bytes")
    return b"".join(chunks)


def _send_quietly(connection: socket.socket, document: dict[str, Any]) -> None:
    """Send a reply; a client that left (its round timed out) is not an error."""
    try:
        connection.sendall(json.dumps(document, allow_nan=False).encode() + b"\n")
    except OSError as exc:
        log.warning("the trainer's client left before the reply: %s", exc)


# The client in the ClientApp (or the ServerApp)


class TrainerClient:
    """Sends requests to the trainer listening on ``path``."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def request(
        self,
        op: str,
        *,
        kind: str | None = None,
        arguments: dict[str, Any] | None = None,
        timeout: float,
    ) -> Any:
        """Send one request and return the trainer's value.

        Raises
        ------
        TrainerUnavailableError
            When no trainer listens on the socket.
        TrainerError
            When the request failed in the trainer, or no reply came within
            ``timeout`` seconds.
        """
        document = {"op": op, "kind": kind, "arguments": arguments or {}}
        line = json.dumps(document, allow_nan=False).encode() + b"\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(timeout)
            try:
                with _short_address(self.path) as address:
                    connection.connect(address)
            except OSError as exc:
                raise TrainerUnavailableError(
                    f"no trainer answers on {self.path}: {exc.strerror or exc}"
                ) from exc
            try:
                connection.sendall(line)
                reply = _read_line(connection)
            except TimeoutError as exc:
                raise TrainerError(
                    f"the trainer did not answer a {op} request within {timeout:.0f} s"
                ) from exc
            except OSError as exc:
                raise TrainerError(f"the trainer connection failed: {exc}") from exc
        if not reply:
            raise TrainerError(f"the trainer closed the connection during {op}")
        answer = json.loads(reply)
        if answer.get("status") != "ok":
            raise TrainerError(
                str(answer.get("message", "")),
                error_type=str(answer.get("error_type", "")),
            )
        return answer.get("value")


# The process that runs the job, on the host


@dataclass
class Trainer:
    """The trainer of a site (or of the coordinator's server-side evaluation).

    Parameters
    ----------
    name
        What the trainer serves, for messages (``"site-a"``).
    output
        Its work folder: the only folder the job writes, holding the socket.
    datasets
        Dataset folders the job reads.
    purpose
        Why the job runs, for its ``job.start`` audit record.
    policy
        Isolation policy of the job.
    environment
        Extra environment of the process, such as the ``WORKBENCH_HOME`` whose
        audit log stores the job's events.
    preload
        Modules imported before the trainer answers (:data:`PRELOAD`).
    """

    name: str
    output: Path
    datasets: list[str]
    purpose: str
    policy: str = "namespaces"
    job: str = "federated-trainer"
    environment: dict[str, str] = field(default_factory=dict)
    preload: Sequence[str] = PRELOAD["monai"]
    process: Any = None

    @property
    def socket_path(self) -> Path:
        """The trainer's Unix socket."""
        return Path(self.output) / SOCKET_NAME

    @property
    def client(self) -> TrainerClient:
        """A client for the trainer's socket."""
        return TrainerClient(self.socket_path)

    def start(self) -> Trainer:
        """Start the trainer's process; :meth:`wait_ready` waits until it answers."""
        from workbench.federation.processes import FlowerProcess

        self.output = Path(self.output).expanduser().resolve()
        self.output.mkdir(parents=True, exist_ok=True)
        command = [
            sys.executable,
            "-m",
            "workbench.federation.trainer",
            "--socket",
            str(self.socket_path),
            "--output",
            str(self.output),
            "--purpose",
            self.purpose,
            "--job",
            self.job,
            "--policy",
            self.policy,
        ]
        for dataset in self.datasets:
            command += ["--dataset", str(Path(dataset).resolve())]
        for module in self.preload:
            command += ["--preload", module]
        environment = {**os.environ, **self.environment, "PYTHONUNBUFFERED": "1"}
        self.process = FlowerProcess(
            f"trainer of {self.name}",
            command,
            environment,
            self.output.parent / f"{self.output.name}-trainer.log",
        ).start()
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait until the trainer answers a ping.

        Raises
        ------
        TrainerError
            When the process ends first, or does not answer within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.client.request("ping", timeout=5.0)
                log.info("trainer of %s ready", self.name)
                return
            except TrainerUnavailableError:
                pass
            if self.process is None or not self.process.alive():
                tail = self.process.log_tail() if self.process else ""
                raise TrainerError(
                    f"the trainer of {self.name} ended before it answered:\n{tail}"
                )
            if time.monotonic() > deadline:
                tail = self.process.log_tail()
                self.process.stop()
                raise TrainerError(
                    f"the trainer of {self.name} did not answer within"
                    f" {timeout:.0f} s:\n{tail}"
                )
            time.sleep(0.2)

    def alive(self) -> bool:
        """Return whether the trainer's process runs."""
        return self.process is not None and self.process.alive()

    def stop(self) -> None:
        """Ask the trainer to stop, then end its processes."""
        if self.process is None:
            return
        if self.process.alive():
            with contextlib.suppress(TrainerError):
                self.client.request("stop", timeout=5.0)
            deadline = time.monotonic() + STOP_GRACE_S
            while self.process.alive() and time.monotonic() < deadline:
                time.sleep(0.1)
        self.process.stop()

    def kill(self) -> None:
        """Kill the trainer's processes at once, as a crash would."""
        if self.process is not None:
            self.process.kill()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the trainer's isolated job until it is stopped; return the exit status."""
    from workbench.audit import open_audit_log
    from workbench.isolation import run_isolated

    parser = argparse.ArgumentParser(
        prog="python -m workbench.federation.trainer",
        description="Run a federation site's trainer as an isolated job.",
    )
    parser.add_argument("--socket", required=True, help="Unix socket to listen on")
    parser.add_argument("--output", required=True, help="the job's writable folder")
    parser.add_argument(
        "--dataset", action="append", default=[], help="a dataset folder to read"
    )
    parser.add_argument("--purpose", required=True, help="purpose for the audit log")
    parser.add_argument("--job", default="federated-trainer", help="job name")
    parser.add_argument("--policy", default="namespaces", help="isolation policy")
    parser.add_argument(
        "--preload",
        action="append",
        default=[],
        help="a module to import before answering (repeatable)",
    )
    arguments = parser.parse_args(argv)
    _log_to_standard_error()
    _exit_with_parent()

    with open_audit_log() as audit:
        result = run_isolated(
            "workbench.federation.trainer:serve",
            {
                "socket_path": arguments.socket,
                "datasets": arguments.dataset,
                "preload": arguments.preload,
            },
            datasets=arguments.dataset,
            outputs=[arguments.output],
            purpose=arguments.purpose,
            job=arguments.job,
            policy=arguments.policy,
            audit=audit,
        )
    log.info("trainer stopped after %d requests", result.value["requests"])
    return 0


def _log_to_standard_error() -> None:
    """Send the workbench's log lines to standard error, the trainer's log file.

    Both the runner and its isolated job are entry points of their processes.
    """
    logger = logging.getLogger("workbench")
    if any(not isinstance(h, logging.NullHandler) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _exit_with_parent() -> None:
    """End this process when the process that started it ends, however it ends."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        log.warning("the trainer's parent process ended; stopping the trainer")
        os._exit(1)

    threading.Thread(target=watch, name="parent watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
