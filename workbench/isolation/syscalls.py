"""Linux system calls that build the isolated job's sandbox, called through ctypes.

Python 3.11 has no ``os.unshare`` or ``mount``, so this module calls the C library
directly. Each wrapper raises :class:`OSError` with the C ``errno`` when the kernel
rejects the call, and the caller turns that into an :class:`IsolationError` that
names the fix. Constants are the values of the Linux UAPI headers, which are the
same on x86-64 and arm64.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import os
import socket
import struct
from pathlib import Path

__all__ = [
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWUSER",
    "bind_mount",
    "drop_capabilities",
    "has_effective_capability",
    "mount_filesystem",
    "set_loopback_up",
    "set_mount_propagation_private",
    "set_no_new_privileges",
    "set_parent_death_signal",
    "set_readonly",
    "unshare",
    "write_id_maps",
]

CLONE_NEWNS = 0x00020000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

# mount_setattr(2), Linux 5.12 and later. Syscalls added since Linux 5.1 have the same
# number on every architecture except alpha.
SYS_MOUNT_SETATTR = 442
AT_FDCWD = -100
AT_RECURSIVE = 0x8000
MOUNT_ATTR_RDONLY = 0x1

PR_SET_PDEATHSIG = 1
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
LINUX_CAPABILITY_VERSION_3 = 0x20080522
CAP_SYS_ADMIN = 21

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
IFREQ_FORMAT = "16sH22x"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


class _CapHeader(ctypes.Structure):
    _fields_ = (("version", ctypes.c_uint32), ("pid", ctypes.c_int))


class _CapData(ctypes.Structure):
    _fields_ = (
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    )


def _prctl(option: int, argument: int = 0) -> int:
    """Call ``prctl(2)`` with every argument as the unsigned long the kernel reads."""
    arguments = [ctypes.c_ulong(value) for value in (option, argument, 0, 0, 0)]
    return int(_libc.prctl(*arguments))


def _check(result: int, call: str, target: str = "") -> None:
    """Raise OSError with the C errno when a libc call returned -1."""
    if result == -1:
        error = ctypes.get_errno()
        where = f" {target}" if target else ""
        raise OSError(error, f"{call}{where}: {os.strerror(error)}")


def _encode(path: str | os.PathLike[str] | None) -> bytes | None:
    return None if path is None else os.fsencode(path)


def unshare(flags: int) -> None:
    """Move this process into new namespaces, as ``unshare(2)`` does.

    Creating a user namespace requires a single-threaded process.
    """
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def write_id_maps(uid: int, gid: int) -> None:
    """Map ``uid`` and ``gid`` to themselves in a new user namespace.

    The process keeps its user and group ids, so the files it creates belong to the
    user who started it. ``setgroups`` is denied first, as the kernel requires for an
    unprivileged writer of ``gid_map``.
    """
    Path("/proc/self/setgroups").write_text("deny")
    Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
    Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")


def mount_filesystem(
    source: str, target: str | os.PathLike[str], fstype: str, flags: int, data: str
) -> None:
    """Mount a new file system (such as ``tmpfs`` or ``proc``) on ``target``."""
    result = _libc.mount(
        _encode(source), _encode(target), _encode(fstype), ctypes.c_ulong(flags),
        _encode(data),
    )  # fmt: skip
    _check(result, f"mount -t {fstype}", os.fspath(target))


def bind_mount(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
    """Bind ``source`` and the mounts below it onto ``target``."""
    result = _libc.mount(
        _encode(source), _encode(target), None, ctypes.c_ulong(MS_BIND | MS_REC), None
    )
    _check(result, "bind mount", os.fspath(target))


def set_mount_propagation_private(target: str) -> None:
    """Stop mount events propagating between ``target`` (recursively) and the host."""
    result = _libc.mount(
        None, _encode(target), None, ctypes.c_ulong(MS_REC | MS_PRIVATE), None
    )
    _check(result, "make mounts private", target)


def set_readonly(target: str | os.PathLike[str], *, readonly: bool) -> None:
    """Set or clear the read-only flag of the mount at ``target`` and those below it.

    The flag belongs to the mount, not the file system, so it can differ between
    two bind mounts of one folder. Uses ``mount_setattr(2)``, which needs Linux 5.12.
    """
    attr = _MountAttr()
    if readonly:
        attr.attr_set = MOUNT_ATTR_RDONLY
    else:
        attr.attr_clr = MOUNT_ATTR_RDONLY
    result = _libc.syscall(
        ctypes.c_long(SYS_MOUNT_SETATTR),
        ctypes.c_int(AT_FDCWD),
        _encode(target),
        ctypes.c_uint(AT_RECURSIVE),
        ctypes.byref(attr),
        ctypes.c_size_t(ctypes.sizeof(attr)),
    )
    state = "read-only" if readonly else "writable"
    _check(result, f"mount_setattr ({state})", os.fspath(target))


def set_loopback_up() -> None:
    """Bring up ``lo`` in this process's network namespace.

    A new network namespace has a loopback interface that is down, so even
    connections to 127.0.0.1 fail until it is up. This is ``ip link set lo up``
    done with the ``SIOCSIFFLAGS`` ioctl, so no program has to be started.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as handle:
        # struct ifreq: the interface name, then a union whose first member is
        # the short flags word, 40 bytes in all on 64-bit Linux.
        request = struct.pack(IFREQ_FORMAT, b"lo", 0)
        answer = fcntl.ioctl(handle.fileno(), SIOCGIFFLAGS, request)
        flags = struct.unpack(IFREQ_FORMAT, answer)[1]
        request = struct.pack(IFREQ_FORMAT, b"lo", flags | IFF_UP)
        fcntl.ioctl(handle.fileno(), SIOCSIFFLAGS, request)


def has_effective_capability(capability: int = CAP_SYS_ADMIN) -> bool:
    """Return whether ``capability`` (default ``CAP_SYS_ADMIN``) is effective here."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> capability & 1)
    return False


def drop_capabilities() -> None:
    """Give up every capability, for this process and any program it starts.

    Empties the bounding set (so that running a program, even as user id 0, grants
    nothing back), the ambient set, and the effective, permitted and inheritable
    sets. Afterwards the process cannot mount, unmount, enter other namespaces,
    configure network interfaces or read other processes' memory.
    """
    last = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    for capability in range(last + 1):
        _check(_prctl(PR_CAPBSET_DROP, capability), "drop capability")
    _check(
        _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL),
        "clear ambient capabilities",
    )
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def set_no_new_privileges() -> None:
    """Stop set-user-id programs and file capabilities granting this process more."""
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1), "set no_new_privs")


def set_parent_death_signal(signal_number: int) -> None:
    """Have the kernel send ``signal_number`` to this process when its parent ends."""
    _check(_prctl(PR_SET_PDEATHSIG, signal_number), "set pdeathsig")
