"""Run a training or inference job as a function in an isolated child process.

:func:`run_isolated` checks that every dataset is de-identified and verified and
records ``job.start`` in the audit log. It then runs ``module:function`` in a child
process started with this interpreter, so the job uses the same virtual environment,
and stores the job's own audit events in the same log. Finally it records
``job.end`` and returns the function's JSON value. The child's standard output and
error are this process's, so progress bars show as usual.
"""

from __future__ import annotations

import contextlib
import enum
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from workbench.audit import AuditEvent, AuditLog, open_audit_log
from workbench.errors import AuditError, ConfigurationError, DatasetError
from workbench.isolation.environment import child_environment
from workbench.isolation.errors import IsolatedJobError, IsolationError
from workbench.isolation.namespaces import JOB_TMP
from workbench.isolation.relay import AuditRelay

if TYPE_CHECKING:
    from workbench.dataset.reader import DatasetView

__all__ = ["IsolatedResult", "IsolationPolicy", "run_isolated"]

log = logging.getLogger(__name__)

TARGET_PATTERN = re.compile(
    r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
    r":[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*"
)

# Credentials that common clients keep in the user's home folder: SSH, cloud and
# container tools, GnuPG, netrc, libpq's password file, git and Hugging Face tokens.
HOME_CREDENTIAL_FOLDERS = (
    ".ssh",
    ".aws",
    ".gnupg",
    ".kube",
    ".docker",
    ".config/gcloud",
)
HOME_CREDENTIAL_FILES = (
    ".netrc",
    ".pgpass",
    ".git-credentials",
    ".cache/huggingface/token",
    ".cache/huggingface/stored_tokens",
)

# Seconds a job has to end after Ctrl-C (it gets SIGINT) before it is killed.
INTERRUPT_GRACE_S = 10.0


class IsolationPolicy(enum.StrEnum):
    """Strength of a job's separation from the network, the datasets and secrets."""

    #: Kernel namespaces: no network, read-only datasets, hidden workbench home.
    #: Covers the job's native code and every process it starts.
    NAMESPACES = "namespaces"
    #: Python socket calls refused in the child process; native code and programs
    #: the job starts are not contained, and datasets are not write-protected.
    WEAK_IN_PROCESS_GUARD = "weak-in-process-guard"
    #: No child process and no protection, for debugging.
    NONE = "none"


@dataclass(frozen=True)
class IsolatedResult:
    """The outcome of a job that returned normally.

    Attributes
    ----------
    value
        The function's return value, after a JSON round trip.
    job_id
        The id that pairs the job's ``job.start`` and ``job.end`` audit records.
    policy
        The policy the job ran under.
    seconds
        Wall-clock duration of the job, including the start of its process and
        the building of its sandbox.
    exit_status
        Exit status of the job's process; None when it ran in this process.
    audit_events_relayed
        Number of audit events the job sent through the relay and this process
        stored.
    """

    value: Any
    job_id: str
    policy: IsolationPolicy
    seconds: float
    exit_status: int | None
    audit_events_relayed: int


@dataclass
class _Job:
    """A validated request to run a job, with the paths the sandbox needs."""

    job_id: str
    name: str
    target: str
    kwargs: dict[str, Any]
    purpose: str
    policy: IsolationPolicy
    datasets: list[DatasetView]
    outputs: list[Path]
    hidden_folders: list[Path] = field(default_factory=list)
    hidden_files: list[Path] = field(default_factory=list)
    inputs: list[Path] = field(default_factory=list)

    def start_event(self) -> AuditEvent:
        return AuditEvent(
            action="job.start",
            resource=f"job:{self.name}",
            purpose=self.purpose,
            details={
                "job_id": self.job_id,
                "job": self.name,
                "function": self.target,
                "policy": self.policy.value,
                "datasets": [
                    {"name": view.name, "path": str(view.root), "version": view.version}
                    for view in self.datasets
                ],
                "outputs": [str(path) for path in self.outputs],
                "inputs": [str(path) for path in self.inputs],
            },
        )

    def end_event(self, outcome: str, details: Mapping[str, Any]) -> AuditEvent:
        return AuditEvent(
            action="job.end",
            resource=f"job:{self.name}",
            purpose=self.purpose,
            outcome=outcome,
            details={"job_id": self.job_id, "job": self.name, **details},
        )


def run_isolated(
    target: str,
    kwargs: Mapping[str, Any] | None = None,
    *,
    datasets: Sequence[str | os.PathLike[str]] = (),
    outputs: Sequence[str | os.PathLike[str]] = (),
    inputs: Sequence[str | os.PathLike[str]] = (),
    purpose: str,
    job: str,
    policy: IsolationPolicy | str = IsolationPolicy.NAMESPACES,
    audit: AuditLog | None = None,
) -> IsolatedResult:
    """Run the function ``target`` with ``kwargs`` in an isolated child process.

    Parameters
    ----------
    target
        ``"package.module:function"``, imported and called in the child.
    kwargs
        Keyword arguments of the function; they must survive a JSON round trip.
    datasets
        Dataset folders the job reads. Each must be a de-identified, verified
        workbench dataset; under ``NAMESPACES`` they are read-only for the job.
    outputs
        Folders the job writes, created if missing. Under ``NAMESPACES`` they and
        the job's private ``/tmp`` are the only writable places.
    inputs
        Other folders the job reads, such as a trained model or a model
        checkpoint: read-only for the job, and visible even where they lie under
        a folder the sandbox replaces (``/tmp``). They are not datasets, so they
        must hold no patient data.
    purpose
        Why the job runs, in the user's words, for the audit log.
    job
        Short name of the kind of job, such as ``"train"``, for the audit log.
    policy
        :class:`IsolationPolicy` or its value. ``WEAK_IN_PROCESS_GUARD`` and
        ``NONE`` log a warning, because they do not contain the job.
    audit
        The audit log for ``job.start``, the job's relayed events and ``job.end``;
        default :func:`workbench.audit.open_audit_log`.

    Returns
    -------
    IsolatedResult
        The function's return value and facts about the run.

    Raises
    ------
    DatasetError
        When a dataset is not a de-identified, verified dataset, or an output
        lies inside a dataset. The job does not start.
    ConfigurationError
        When ``target``, ``kwargs``, ``purpose`` or a path is invalid.
    IsolationError
        When the sandbox cannot be built (the message names the fix). The job
        did not run.
    IsolatedJobError
        When the function raised (with the exception's type, message and
        traceback) or its process ended without a result (with the exit status
        or signal).
    AuditError
        When the audit log cannot record the job, or could not store an audit
        event the job sent; the job's result is then not returned.
    KeyboardInterrupt
        After Ctrl-C, once the job's processes have ended.
    """
    policy = _parse_policy(policy)
    request = _validate(target, kwargs, datasets, outputs, purpose, job, policy)
    request.inputs = _input_folders(inputs, request)
    if policy is IsolationPolicy.WEAK_IN_PROCESS_GUARD:
        log.warning(
            "job %s runs with the WEAK in-process guard: only Python socket calls"
            " are refused; native code and programs the job starts can reach the"
            " network, datasets are writable and the de-identification key is"
            " readable",
            job,
        )
    elif policy is IsolationPolicy.NONE:
        log.warning(
            "job %s runs in this process WITHOUT isolation: it can reach the"
            " network, write the datasets and read every secret of this process",
            job,
        )

    own_audit = audit is None
    audit_log = open_audit_log() if audit is None else audit
    try:
        return _run_audited(request, audit_log)
    finally:
        if own_audit:
            audit_log.close()


def _parse_policy(policy: IsolationPolicy | str) -> IsolationPolicy:
    try:
        return IsolationPolicy(policy)
    except ValueError as exc:
        choices = ", ".join(repr(p.value) for p in IsolationPolicy)
        raise ConfigurationError(
            f"isolation policy {policy!r} is unknown; use one of {choices}"
        ) from exc


def _validate(
    target: str,
    kwargs: Mapping[str, Any] | None,
    datasets: Sequence[str | os.PathLike[str]],
    outputs: Sequence[str | os.PathLike[str]],
    purpose: str,
    job: str,
    policy: IsolationPolicy,
) -> _Job:
    """Check everything about a request before any process starts."""
    from workbench.dataset.reader import DatasetView

    if not TARGET_PATTERN.fullmatch(target):
        raise ConfigurationError(
            f"job target {target!r} is not of the form 'package.module:function'"
        )
    if not purpose.strip():
        raise ConfigurationError(
            "the purpose of the job is empty; state why it runs, for the audit log"
        )
    if not job.strip():
        raise ConfigurationError("the job name is empty; name the kind of job")
    try:
        kwargs_copy = json.loads(json.dumps(dict(kwargs or {}), allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"keyword arguments of job {target} are not JSON: {exc}; pass paths as"
            " strings and numbers, lists and mappings with string keys"
        ) from exc

    views = [DatasetView.open(os.fspath(path)) for path in datasets]
    hidden_folders, hidden_files = _secret_locations()
    roots = [view.root for view in views]
    for root in roots:
        _reject_inside_secrets(root, "dataset", hidden_folders)
    output_paths = []
    for output in outputs:
        path = Path(output).expanduser().resolve()
        for root in roots:
            if path == root or path.is_relative_to(root):
                raise DatasetError(
                    f"output folder {path} lies inside dataset {root}, which the job"
                    " may only read; choose an output folder outside every dataset"
                )
        _reject_inside_secrets(path, "output", hidden_folders)
        output_paths.append(path)
    for path in output_paths:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigurationError(
                f"cannot create output folder {path}: {exc}"
            ) from exc

    return _Job(
        job_id=uuid.uuid4().hex[:16],
        name=job,
        target=target,
        kwargs=kwargs_copy,
        purpose=purpose,
        policy=policy,
        datasets=views,
        outputs=output_paths,
        hidden_folders=hidden_folders,
        hidden_files=hidden_files,
    )


def _input_folders(
    inputs: Sequence[str | os.PathLike[str]], request: _Job
) -> list[Path]:
    """Check the extra read-only folders of a job."""
    folders = []
    for entry in inputs:
        path = Path(entry).expanduser().resolve()
        if not path.is_dir():
            raise ConfigurationError(f"input folder {path} of the job does not exist")
        _reject_inside_secrets(path, "input", request.hidden_folders)
        folders.append(path)
    return folders


def _secret_locations() -> tuple[list[Path], list[Path]]:
    """Return the folders and files an isolated job must not read.

    These are the workbench home (de-identification key, Orthanc credentials,
    default audit database), a key file named by ``WORKBENCH_DEID_KEY_FILE``, and
    a SQLite audit database named by ``WORKBENCH_AUDIT_URL`` with its WAL files.
    The credential files of common clients in the user's home folder are hidden
    too, as are those named by ``PGPASSFILE``, ``HF_TOKEN_PATH`` and ``HF_HOME``.
    """
    from workbench.home import find_home

    folders: list[Path] = []
    files: list[Path] = []
    with contextlib.suppress(ConfigurationError):
        folders.append(find_home())
    user_home = Path.home()
    folders.extend(user_home / name for name in HOME_CREDENTIAL_FOLDERS)
    files.extend(user_home / name for name in HOME_CREDENTIAL_FILES)
    for variable in ("WORKBENCH_DEID_KEY_FILE", "PGPASSFILE", "HF_TOKEN_PATH"):
        if os.environ.get(variable):
            files.append(Path(os.environ[variable]).expanduser())
    if os.environ.get("HF_HOME"):
        files.append(Path(os.environ["HF_HOME"]).expanduser() / "token")
    audit_url = os.environ.get("WORKBENCH_AUDIT_URL", "")
    if audit_url and not audit_url.lower().startswith(("postgres://", "postgresql://")):
        path = audit_url.removeprefix("sqlite:///") if "://" in audit_url else audit_url
        database = Path(path).expanduser().resolve()
        for suffix in ("", "-wal", "-shm"):
            files.append(database.with_name(database.name + suffix))
    return [p.resolve() for p in folders], [p.resolve() for p in files]


def _reject_inside_secrets(path: Path, kind: str, hidden_folders: list[Path]) -> None:
    for folder in hidden_folders:
        if path == folder or path.is_relative_to(folder):
            raise ConfigurationError(
                f"{kind} folder {path} lies inside {folder}, which contains secrets"
                " (the workbench home with the de-identification key, or a"
                f" credentials folder) and is hidden from isolated jobs; move the"
                f" {kind} folder outside it"
            )


def _run_audited(request: _Job, audit: AuditLog) -> IsolatedResult:
    """Record job.start, run the job, record job.end, return or raise its outcome."""
    audit.append(request.start_event())
    started = time.monotonic()
    relayed = 0
    try:
        if request.policy is IsolationPolicy.NONE:
            value, exit_status = _run_in_this_process(request), None
        else:
            value, exit_status, relayed = _run_in_child(request, audit)
    except BaseException as exc:
        details: dict[str, Any] = {
            "seconds": round(time.monotonic() - started, 3),
            "error_type": type(exc).__name__,
        }
        if isinstance(exc, IsolatedJobError):
            details.update(
                job_error_type=exc.error_type,
                exit_status=exc.exit_status,
                signal=exc.signal,
            )
        audit.append(request.end_event("error", details))
        log.info(
            "job %s (%s) failed after %.1f s: %s",
            request.name,
            request.job_id,
            details["seconds"],
            type(exc).__name__,
        )
        raise

    seconds = time.monotonic() - started
    audit.append(
        request.end_event(
            "ok",
            {
                "seconds": round(seconds, 3),
                "exit_status": exit_status,
                "audit_events_relayed": relayed,
            },
        )
    )
    log.info(
        "job %s (%s) finished in %.1f s under policy %s, %d audit events relayed",
        request.name,
        request.job_id,
        seconds,
        request.policy.value,
        relayed,
    )
    return IsolatedResult(
        value=value,
        job_id=request.job_id,
        policy=request.policy,
        seconds=seconds,
        exit_status=exit_status,
        audit_events_relayed=relayed,
    )


def _run_in_this_process(request: _Job) -> Any:
    """Call the function directly, as the ``NONE`` policy does."""
    from workbench.isolation.child import _load_function

    try:
        function = _load_function(request.target)
        value = function(**request.kwargs)
        return json.loads(json.dumps(value, allow_nan=False))
    except Exception as exc:
        cls = type(exc)
        error_type = cls.__qualname__
        if cls.__module__ != "builtins":
            error_type = f"{cls.__module__}.{error_type}"
        raise IsolatedJobError(
            str(exc),
            error_type=error_type,
            traceback="".join(traceback.format_exception(exc)),
        ) from exc


def _run_in_child(request: _Job, audit: AuditLog) -> tuple[Any, int, int]:
    """Run the job in a child process; return its value, exit status and relay count."""
    relay = AuditRelay(audit)
    with (
        tempfile.TemporaryFile() as spec_file,
        tempfile.TemporaryFile() as result_file,
        _job_tmp_folder(request.policy) as tmp_folder,
    ):
        relay_fd = relay.open()
        try:
            spec_file.write(json.dumps(_child_spec(request, result_file)).encode())
            spec_file.flush()
            spec_file.seek(0)
            environment = child_environment(
                os.environ,
                {
                    "WORKBENCH_AUDIT_RELAY_FD": str(relay_fd),
                    "TMPDIR": tmp_folder,
                    # The home folder is read-only for the job; matplotlib keeps
                    # its font cache in the private temporary folder instead.
                    "MPLCONFIGDIR": os.path.join(tmp_folder, "matplotlib"),
                },
            )
            command = [
                sys.executable,
                "-m",
                "workbench.isolation.child",
                "--spec-fd",
                str(spec_file.fileno()),
            ]
            try:
                process = subprocess.Popen(
                    command,
                    env=environment,
                    stdin=subprocess.DEVNULL,
                    pass_fds=(spec_file.fileno(), result_file.fileno(), relay_fd),
                    process_group=0,
                )
            except OSError as exc:
                raise IsolationError(
                    f"cannot start the job's process {sys.executable}: {exc}"
                ) from exc
            relay.job_started()
            returncode = _wait_for_job(process)
        finally:
            relay.finish()
        result_file.seek(0)
        document = _read_result(result_file)

    if relay.rejected:
        log.warning(
            "job %s sent %d audit lines that were rejected",
            request.name,
            relay.rejected,
        )
    value = _value_or_raise(document, returncode)
    if relay.failures:
        raise AuditError(
            f"job {request.name} finished, but {len(relay.failures)} of its audit"
            f" appends could not be stored: {relay.failures[0]}; its result is"
            " withheld because its data reads are not all on record"
        ) from relay.failures[0]
    return value, returncode, relay.stored


def _child_spec(request: _Job, result_file: IO[bytes]) -> dict[str, Any]:
    return {
        "target": request.target,
        "kwargs": request.kwargs,
        "policy": request.policy.value,
        "parent_pid": os.getpid(),
        "sys_path": list(sys.path),
        "result_fd": result_file.fileno(),
        "plan": {
            "datasets": [str(view.root) for view in request.datasets],
            "outputs": [str(path) for path in request.outputs],
            "inputs": [str(path) for path in request.inputs],
            "code_folders": [
                path
                for path in (os.path.realpath(entry or ".") for entry in sys.path)
                if not any(Path(path).is_relative_to(f) for f in request.hidden_folders)
            ],
            "hidden_folders": [str(path) for path in request.hidden_folders],
            "hidden_files": [str(path) for path in request.hidden_files],
            "cwd": os.getcwd(),
        },
    }


@contextlib.contextmanager
def _job_tmp_folder(policy: IsolationPolicy) -> Iterator[str]:
    """Yield the job's TMPDIR: the sandbox's private /tmp, or a new private folder."""
    if policy is IsolationPolicy.NAMESPACES:
        yield JOB_TMP
        return
    folder = tempfile.mkdtemp(prefix="workbench-job-")
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for_job(process: subprocess.Popen[bytes]) -> int:
    """Wait for the job's process, end what it left behind, and return its status."""
    try:
        # WNOWAIT leaves the process unreaped, so its process group id cannot be
        # reused before the group is killed below.
        os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOWAIT)
    except KeyboardInterrupt:
        _stop_after_interrupt(process)
        raise
    _kill_process_group(process.pid)
    return process.wait()


def _stop_after_interrupt(process: subprocess.Popen[bytes]) -> None:
    """Send the job SIGINT, wait a grace period, then kill what is left."""
    log.warning(
        "interrupted: stopping the job's process %d (killed in %.0f s, or at a"
        " second Ctrl-C)",
        process.pid,
        INTERRUPT_GRACE_S,
    )
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGINT)
    deadline = time.monotonic() + INTERRUPT_GRACE_S
    try:
        flags = os.WEXITED | os.WNOHANG | os.WNOWAIT
        while time.monotonic() < deadline:
            if os.waitid(os.P_PID, process.pid, flags) is not None:
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        log.warning("second interrupt: killing the job's processes")
    _kill_process_group(process.pid)
    process.wait()


def _kill_process_group(group: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, signal.SIGKILL)


def _read_result(result_file: IO[bytes]) -> dict[str, Any] | None:
    text = result_file.read()
    if not text:
        return None
    try:
        document = json.loads(text)
    except ValueError:
        log.warning("the job's result is not valid JSON (%d bytes)", len(text))
        return None
    return document if isinstance(document, dict) else None


def _value_or_raise(document: dict[str, Any] | None, returncode: int) -> Any:
    """Return the job's value, or raise the error its result document reports."""
    status = document.get("status") if document else None
    if status == "ok" and document is not None:
        if returncode != 0:
            # Some native libraries crash while the interpreter shuts down; the
            # value was complete before that.
            log.warning(
                "the job returned a value, then its process exited with status %d",
                returncode,
            )
        return document.get("value")
    if status == "isolation-error" and document is not None:
        raise IsolationError(str(document.get("message")))
    if status == "error" and document is not None:
        raise IsolatedJobError(
            str(document.get("message", "")),
            error_type=str(document.get("error_type", "")),
            traceback=str(document.get("traceback", "")),
            exit_status=returncode,
        )

    # No result: the process ended on its own terms, or was killed.
    signal_number = None
    exit_status: int | None = returncode
    if status == "died" and document is not None:
        signal_number = document.get("signal")
        exit_status = None if signal_number else document.get("exit_status")
    elif returncode < 0:
        signal_number, exit_status = -returncode, None
    if signal_number:
        name = signal.Signals(signal_number).name
        message = f"the job's process was killed by signal {name} ({signal_number})"
    else:
        message = f"the job's process exited with status {exit_status}, no result"
    raise IsolatedJobError(message, exit_status=exit_status, signal=signal_number)
