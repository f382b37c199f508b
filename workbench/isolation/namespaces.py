"""The kernel sandbox of an isolated job: new namespaces, a read-only view, no network.

:func:`enter_sandbox` runs in the job's process, started by the runner, before the
job's module is imported. It moves the process into new mount, network and PID
namespaces (and a new user namespace when the process lacks ``CAP_SYS_ADMIN``, as an
ordinary user does), then forks. The process that called it stays outside the new PID
namespace as a supervisor that forwards signals and reports the exit status; the
forked process becomes PID 1 of the new namespace and returns from
:func:`enter_sandbox` to run the job. Inside:

- the network namespace has only ``lo``, brought up, so 127.0.0.1 is the job's own
  and the host's loopback services and every other address are unreachable;
- every mount is read-only, except fresh empty ``tmpfs`` mounts on ``/tmp``,
  ``/var/tmp``, ``/run`` and ``/dev/shm``, which also hide the host's Unix sockets
  kept there;
- output folders are bind-mounted writable and dataset folders read-only, each on
  its own path, so paths mean the same inside and out;
- the workbench home (de-identification key, Orthanc credentials, audit database)
  and credential folders such as ``~/.ssh`` are covered by an empty, unreadable
  ``tmpfs``, and secret files kept elsewhere (another key file, ``~/.pgpass``) by
  ``/dev/null``;
- ``/proc`` shows only the job's processes, which cannot signal or trace anything
  outside;
- the job has no capabilities, even as user id 0, so it cannot unmount, remount
  or enter other namespaces. It may create a nested user namespace, but the
  kernel locks the mounts inherited there, so that does not undo any of this.

When the job's PID 1 ends, the kernel ends every process left in its namespace.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import platform
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NoReturn

from workbench.isolation import syscalls
from workbench.isolation.errors import IsolationError

__all__ = ["JOB_TMP", "SCRATCH_FOLDERS", "SandboxPlan", "enter_sandbox"]

log = logging.getLogger(__name__)

# Folders replaced by an empty writable tmpfs: scratch space, and the usual places of
# Unix sockets (PostgreSQL, D-Bus, Docker), which a read-only mount does not protect.
# They are private to the job's mount namespace, so fixed names are safe here.
SCRATCH_FOLDERS = ("/tmp", "/var/tmp", "/run", "/dev/shm")  # noqa: S108
JOB_TMP = "/tmp"  # noqa: S108 (the job's own tmpfs, see SCRATCH_FOLDERS)

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

NAMESPACE_FIX = (
    "run the job as root, or allow unprivileged user namespaces"
    " (`sysctl -w kernel.unprivileged_userns_clone=1` on Debian and Ubuntu kernels"
    " that have it, a non-zero `user.max_user_namespaces`, and on Ubuntu 23.10 and"
    " later `kernel.apparmor_restrict_unprivileged_userns=0`); in a container, allow"
    " the unshare and mount system calls, which Docker's default seccomp and"
    " AppArmor profiles block; or accept the weaker protection by name with"
    " IsolationPolicy.WEAK_IN_PROCESS_GUARD"
)


@dataclass(frozen=True)
class SandboxPlan:
    """Paths that the sandbox shows or hides, as absolute paths on the host.

    Attributes
    ----------
    datasets
        Folders mounted read-only on their own path.
    outputs
        Folders mounted writable on their own path.
    inputs
        Other folders mounted read-only on their own path (models, checkpoints).
    code_folders
        Folders of the job's import path. Those below a scratch folder are
        mounted read-only, so that code kept in ``/tmp`` still imports.
    hidden_folders
        Folders covered by an empty, read-only, unreadable ``tmpfs``.
    hidden_files
        Files covered by ``/dev/null``, so that they read as empty.
    cwd
        Working folder of the job; ``/tmp`` when it is not visible in the sandbox.
    """

    datasets: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    code_folders: list[str] = field(default_factory=list)
    hidden_folders: list[str] = field(default_factory=list)
    hidden_files: list[str] = field(default_factory=list)
    cwd: str = JOB_TMP


def enter_sandbox(plan: SandboxPlan, on_job_died: Callable[[int, int], None]) -> None:
    """Build the sandbox and return in a forked process that lives inside it.

    The calling process never returns. It supervises the forked job process and
    exits with the job's exit status, or with 128 plus the number of the signal
    that ended the job. Before that, when the job ended abnormally, it calls
    ``on_job_died(exit_status, signal_number)``, where ``signal_number`` is 0
    for a non-zero exit.

    Raises
    ------
    IsolationError
        When the namespaces or mounts cannot be created. Nothing of the job has
        run then.
    """
    if platform.system() != "Linux":
        raise IsolationError(
            f"isolated jobs need Linux namespaces, and this system is"
            f" {platform.system()}; use IsolationPolicy.WEAK_IN_PROCESS_GUARD"
        )
    _create_namespaces()
    try:
        syscalls.set_loopback_up()
        _build_mounts(plan)
    except OSError as exc:
        hint = ""
        if exc.errno == errno.ENOSYS:
            hint = f"; this needs Linux 5.12 or later, and this is {platform.release()}"
        raise IsolationError(f"failed to build the job's sandbox: {exc}{hint}") from exc

    job_pid = os.fork()
    if job_pid != 0:
        _supervise(job_pid, on_job_died)

    # From here on this is the job's process, PID 1 of the new PID namespace.
    try:
        _mount_own_proc()
        syscalls.drop_capabilities()
        syscalls.set_no_new_privileges()
        syscalls.set_parent_death_signal(signal.SIGKILL)
    except OSError as exc:
        raise IsolationError(f"failed to finish the job's sandbox: {exc}") from exc
    _enter_working_folder(plan.cwd)


def _create_namespaces() -> None:
    """Unshare mount, network and PID namespaces, and a user namespace if needed."""
    flags = syscalls.CLONE_NEWNS | syscalls.CLONE_NEWNET | syscalls.CLONE_NEWPID
    # Without CAP_SYS_ADMIN (an ordinary user, or root in a restricted container)
    # only a new user namespace grants the capabilities to mount and configure lo.
    needs_user_namespace = not syscalls.has_effective_capability()
    if needs_user_namespace:
        flags |= syscalls.CLONE_NEWUSER
    uid, gid = os.getuid(), os.getgid()
    try:
        syscalls.unshare(flags)
    except OSError as exc:
        kinds = "mount, network and PID"
        if needs_user_namespace:
            kinds = "user, " + kinds
        reason = exc.strerror
        if exc.errno == errno.ENOSPC:
            reason = "the user.max_user_namespaces limit is reached"
        raise IsolationError(
            f"failed to create the {kinds} namespaces for the isolated job (uid {uid}:"
            f" {reason}); {NAMESPACE_FIX}"
        ) from exc
    if needs_user_namespace:
        try:
            syscalls.write_id_maps(uid, gid)
        except OSError as exc:
            raise IsolationError(
                f"failed to map uid {uid} into the job's user namespace: {exc}"
            ) from exc


def _build_mounts(plan: SandboxPlan) -> None:
    """Make the read-only view with writable outputs, read-only datasets, no secrets."""
    syscalls.set_mount_propagation_private("/")

    # Keep handles on the folders to show: the scratch tmpfs mounts may cover them.
    scratch = _existing_folders(SCRATCH_FOLDERS)
    code = [
        path
        for path in _existing_folders(plan.code_folders)
        if any(_is_below(path, folder) for folder in scratch)
    ]
    handles = {
        path: os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        for path in [*plan.outputs, *plan.inputs, *plan.datasets, *code]
    }
    try:
        # Everything read-only, then fresh scratch space over the socket folders.
        syscalls.set_readonly("/", readonly=True)
        for folder in scratch:
            flags = syscalls.MS_NOSUID | syscalls.MS_NODEV
            syscalls.mount_filesystem("tmpfs", folder, "tmpfs", flags, "mode=1777")

        # Code folders and inputs, then outputs (writable), then datasets
        # (read-only): each mount covers the ones before it, so an output inside
        # an input folder is writable and a dataset inside an output is read-only.
        for path in [*code, *plan.inputs]:
            _bind_handle(handles[path], path)
            syscalls.set_readonly(path, readonly=True)
        for path in plan.outputs:
            _bind_handle(handles[path], path)
            syscalls.set_readonly(path, readonly=False)
        for path in plan.datasets:
            _bind_handle(handles[path], path)
            syscalls.set_readonly(path, readonly=True)
    finally:
        for handle in handles.values():
            os.close(handle)

    # Secrets last, so that no output or dataset mount uncovers them again.
    for path in plan.hidden_folders:
        if os.path.isdir(path):
            flags = syscalls.MS_RDONLY | syscalls.MS_NOSUID | syscalls.MS_NODEV
            syscalls.mount_filesystem("tmpfs", path, "tmpfs", flags, "mode=000,size=4k")
    for path in plan.hidden_files:
        if os.path.isfile(path):
            syscalls.bind_mount("/dev/null", path)
            syscalls.set_readonly(path, readonly=True)


def _existing_folders(paths: Iterable[str]) -> list[str]:
    """Return the real paths of the folders among ``paths`` that exist, once each."""
    folders: list[str] = []
    for path in paths:
        real = os.path.realpath(path)
        if os.path.isdir(real) and real not in folders:
            folders.append(real)
    return folders


def _is_below(path: str, folder: str) -> bool:
    return path.startswith(folder.rstrip("/") + "/")


def _bind_handle(handle: int, target: str) -> None:
    """Bind the folder open as ``handle`` onto ``target``, creating the mount point."""
    # The mount point may lie in a scratch tmpfs, which starts empty.
    with contextlib.suppress(FileExistsError):
        os.makedirs(target)
    syscalls.bind_mount(f"/proc/self/fd/{handle}", target)


def _mount_own_proc() -> None:
    """Mount a ``/proc`` that shows only the processes of the job's PID namespace."""
    flags = syscalls.MS_NOSUID | syscalls.MS_NODEV | syscalls.MS_NOEXEC
    try:
        syscalls.mount_filesystem("proc", "/proc", "proc", flags, "")
    except OSError as exc:
        # A user namespace may mount proc only where the host's /proc is fully
        # visible, which some container runtimes prevent by covering parts of it.
        if exc.errno != errno.EPERM:
            raise
        log.warning(
            "cannot mount a private /proc (%s); the job sees the host's process"
            " list but still cannot signal or trace those processes",
            exc.strerror,
        )


def _enter_working_folder(cwd: str) -> None:
    """Change into ``cwd`` as the sandbox shows it, or ``/tmp`` if it is hidden."""
    # The working folder was inherited from the host's view; entering it again by
    # path resolves it through the new mounts.
    try:
        os.chdir(cwd)
    except OSError:
        os.chdir(JOB_TMP)


def _supervise(job_pid: int, on_job_died: Callable[[int, int], None]) -> NoReturn:
    """Wait for the job's process, forwarding signals, and exit with its status."""
    for number in FORWARDED_SIGNALS:
        signal.signal(number, lambda received, _frame: _forward(job_pid, received))
    with contextlib.suppress(OSError):
        syscalls.set_parent_death_signal(signal.SIGKILL)
        syscalls.drop_capabilities()

    _, status = os.waitpid(job_pid, 0)
    if os.WIFSIGNALED(status):
        signal_number = os.WTERMSIG(status)
        on_job_died(0, signal_number)
        os._exit(128 + signal_number)
    exit_status = os.waitstatus_to_exitcode(status)
    if exit_status != 0:
        on_job_died(exit_status, 0)
    os._exit(exit_status)


def _forward(job_pid: int, number: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(job_pid, number)
