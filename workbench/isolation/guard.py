"""The weak network guard: Python-level socket refusals inside the job's process.

``IsolationPolicy.WEAK_IN_PROCESS_GUARD`` installs this guard instead of kernel
namespaces, for machines where namespaces cannot be created. It replaces methods of
Python's :mod:`socket` module, so only Python code that goes through that module is
stopped:

- native code (C extensions, ctypes, CUDA libraries) calls ``connect(2)`` directly
  and is not stopped;
- programs the job starts (``subprocess``, ``os.system``, multiprocessing with the
  spawn or forkserver method) run without the guard;
- datasets stay writable and the workbench home, with the de-identification key,
  stays readable.

Unix-domain sockets stay allowed, because multiprocessing, asyncio and PyTorch's
data-loader workers use them between the job's own processes.
"""

from __future__ import annotations

import errno
import functools
import socket
from collections.abc import Callable
from typing import Any

__all__ = ["install_network_guard"]

GUARD_NAME = "the weak in-process network guard of an isolated job"


def install_network_guard() -> None:
    """Make Python socket connections, sends and name lookups fail in this process.

    Connecting or sending to anything but a Unix-domain socket raises
    :class:`PermissionError` (``EACCES``); ``connect_ex`` returns ``EACCES``; every
    host-name lookup raises :class:`socket.gaierror`.
    """
    sock = socket.socket
    sock.connect = _refuse_unless_unix(sock.connect)  # type: ignore[method-assign]
    sock.sendto = _refuse_unless_unix(sock.sendto)  # type: ignore[method-assign]
    sock.sendmsg = _refuse_unless_unix(sock.sendmsg)  # type: ignore[method-assign]
    sock.connect_ex = _connect_ex_unless_unix(sock.connect_ex)  # type: ignore[method-assign]
    socket.create_connection = _refuse_connection  # type: ignore[assignment]
    for name in (
        "getaddrinfo",
        "gethostbyname",
        "gethostbyname_ex",
        "gethostbyaddr",
        "getnameinfo",
    ):
        setattr(socket, name, _refuse_lookup)


def _refusal(detail: str) -> PermissionError:
    return PermissionError(
        errno.EACCES, f"network access is blocked by {GUARD_NAME}: {detail}"
    )


def _refuse_unless_unix(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def guarded(self: socket.socket, *args: Any) -> Any:
        if self.family != socket.AF_UNIX:
            raise _refusal(f"{method.__name__} on a {self.family.name} socket")
        return method(self, *args)

    return guarded


def _connect_ex_unless_unix(method: Callable[..., int]) -> Callable[..., int]:
    @functools.wraps(method)
    def guarded(self: socket.socket, address: Any) -> int:
        if self.family != socket.AF_UNIX:
            return errno.EACCES
        return method(self, address)

    return guarded


def _refuse_connection(address: Any, *args: Any, **kwargs: Any) -> socket.socket:
    raise _refusal(f"create_connection to {address!r}")


def _refuse_lookup(*args: Any, **kwargs: Any) -> Any:
    raise socket.gaierror(
        socket.EAI_NONAME, f"host name lookup is blocked by {GUARD_NAME}"
    )
