"""The workbench's own Orthanc: a DICOM archive on this machine for studies to ingest.

:func:`start_orthanc` runs the Orthanc binary with a configuration that the workbench
writes into an *Orthanc home* folder (by default ``<workbench home>/orthanc``). The
configuration is locked down, because the archive holds identifiable patient data:

- HTTP clients must log in (``AuthenticationEnabled``) with a generated user name and
  a random password, kept in ``credentials.json`` with mode 0600.
- ``RemoteAccessAllowed`` is false. Orthanc has no bind-address option and listens on
  every interface, so this setting is what keeps clients on other hosts out.
- The DICOM server is off unless a DICOM port is requested. It then rejects C-STORE
  from modalities that are not configured, and C-ECHO stays allowed.
- No plugins, no Lua scripts, no WebDAV, and the REST API cannot write to the file
  system.

The home folder contains::

    orthanc.json        the configuration (mode 0600: it contains the password)
    credentials.json    url, username, password (mode 0600)
    orthanc.pid         the PID of the running Orthanc
    orthanc.log         Orthanc's log, appended to on each start
    storage/, index/    the DICOM files and the SQLite index

:func:`stop_orthanc` ends the process named in ``orthanc.pid`` only after checking
that its command line is the Orthanc binary with this home's configuration file.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
import requests

from workbench.errors import ConfigurationError, OrthancError, OrthancServerError
from workbench.home import write_secret_file
from workbench.orthanc.client import OrthancClient

__all__ = [
    "CONFIG_FILENAME",
    "CREDENTIALS_FILENAME",
    "DEFAULT_HTTP_PORT",
    "LOG_FILENAME",
    "PID_FILENAME",
    "OrthancCredentials",
    "OrthancServer",
    "build_config",
    "find_orthanc_executable",
    "orthanc_status",
    "read_credentials",
    "start_orthanc",
    "stop_orthanc",
]

log = logging.getLogger(__name__)

CONFIG_FILENAME = "orthanc.json"
CREDENTIALS_FILENAME = "credentials.json"
PID_FILENAME = "orthanc.pid"
LOG_FILENAME = "orthanc.log"
LOCK_FILENAME = ".orthanc.lock"
DEFAULT_HTTP_PORT = 8042
LOOPBACK = "127.0.0.1"
# Orthanc's log is appended to on every start. Above this size, the old log is moved
# to orthanc.log.1 first.
MAX_LOG_BYTES = 16 * 1024 * 1024
LOG_TAIL_LINES = 20
# A port chosen by the workbench can be taken by another program between the check
# and Orthanc's start. Orthanc then exits, and the start is retried on another port.
AUTO_PORT_ATTEMPTS = 3
READY_POLL_SECONDS = 0.05
# What Orthanc 1.10 logs before it exits when its HTTP port is taken.
HTTP_PORT_TAKEN_MESSAGE = "port of the HTTP server is privileged or already in use"

# Processes started by this Python process, kept so that stop_orthanc can reap them
# and their PID does not linger as a zombie.
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class OrthancCredentials:
    """URL and login of an Orthanc, as stored in ``credentials.json``."""

    url: str
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class OrthancServer:
    """A running Orthanc started by :func:`start_orthanc`.

    Used as a context manager, the server is stopped when the block ends::

        with start_orthanc(tmp_path / "orthanc") as server:
            server.client().statistics()
    """

    url: str
    username: str
    password: str = field(repr=False)
    pid: int
    home: Path

    def client(self, **options: Any) -> OrthancClient:
        """Return an :class:`OrthancClient` logged in to this server.

        ``options`` are passed to :class:`OrthancClient` (``timeout``, ``retries``).
        """
        return OrthancClient(self.url, self.username, self.password, **options)

    def stop(self, timeout: float = 10.0) -> bool:
        """Stop this server; see :func:`stop_orthanc`."""
        return stop_orthanc(self.home, timeout=timeout)

    def __enter__(self) -> OrthancServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def find_orthanc_executable() -> str:
    """Return the path of the Orthanc binary on ``PATH`` or in ``/usr/sbin``.

    Raises
    ------
    OrthancServerError
        When Orthanc is not installed.
    """
    search_path = os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"]
    )
    executable = shutil.which("Orthanc", path=search_path)
    if executable is None:
        raise OrthancServerError(
            "the Orthanc binary was not found on PATH or in /usr/sbin; install it"
            " (on Debian or Ubuntu: `apt-get install --no-install-recommends orthanc`)"
            " or run `make setup`"
        )
    return executable


def build_config(
    home: Path,
    *,
    http_port: int,
    username: str,
    password: str,
    dicom_port: int | None = None,
    dicom_modalities: Mapping[str, tuple[str, str, int]] | None = None,
    name: str = "workbench",
) -> dict[str, Any]:
    """Return the hardened Orthanc configuration for ``home``.

    Parameters
    ----------
    home
        The Orthanc home; storage and index folders are created inside it.
    http_port
        The HTTP port. Orthanc listens on it on every interface, but serves only
        clients on this host because ``RemoteAccessAllowed`` is false.
    username, password
        The only registered HTTP user.
    dicom_port
        Enables the DICOM server on this port. It also listens on every interface.
    dicom_modalities
        DICOM peers allowed to store, query and retrieve, as
        ``{name: (AE title, host, port)}``. Orthanc checks both the AE title and the
        host of a caller. Any caller may still send C-ECHO.
    name
        The server name that ``GET /system`` returns.
    """
    home = Path(home).resolve()
    config: dict[str, Any] = {
        "Name": name,
        "StorageDirectory": str(home / "storage"),
        "IndexDirectory": str(home / "index"),
        # HTTP: local clients only, always with a password.
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {username: password},
        "SslEnabled": False,
        "HttpDescribeErrors": True,
        "WebDavEnabled": False,
        # Nothing that runs code or writes outside the storage folder.
        "Plugins": [],
        "LuaScripts": [],
        "ExecuteLuaEnabled": False,
        "RestApiWriteToFileSystemEnabled": False,
        # No outgoing connections are configured.
        "OrthancPeers": {},
        "OrthancPeersInDatabase": False,
        "HttpProxy": "",
        # DICOM: off unless a port is requested. Only configured peers may store.
        "DicomServerEnabled": dicom_port is not None,
        "DicomModalities": {
            peer: list(address) for peer, address in (dicom_modalities or {}).items()
        },
        "DicomModalitiesInDatabase": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowFind": False,
        "DicomAlwaysAllowGet": False,
        "DicomAlwaysAllowMove": False,
        "DicomCheckModalityHost": True,
        # Orthanc replaces patient data with placeholders in its own log.
        "DeidentifyLogs": True,
        "OverwriteInstances": False,
    }
    if dicom_port is not None:
        config["DicomPort"] = dicom_port
    return config


def start_orthanc(
    home: Path,
    *,
    port: int | None = None,
    dicom_port: int | None = None,
    timeout: float = 30,
    dicom_modalities: Mapping[str, tuple[str, str, int]] | None = None,
    name: str = "workbench",
) -> OrthancServer:
    """Start the Orthanc of ``home``, or return it when it is already running.

    Parameters
    ----------
    home
        The Orthanc home folder; created with mode 0700 if missing.
    port
        The HTTP port. By default 8042 when it is free, otherwise a free port.
    dicom_port
        Enables Orthanc's DICOM server on this port. By default it is off.
    timeout
        Seconds to wait for Orthanc to respond to ``GET /system``.
    dicom_modalities
        DICOM peers allowed to store, query and retrieve; see
        :func:`build_config`.
    name
        The server name that ``GET /system`` returns.

    Returns
    -------
    OrthancServer
        The running server, with its URL and credentials.

    Raises
    ------
    ConfigurationError
        When a port is outside 1 to 65535, or both ports are the same.
    OrthancServerError
        When Orthanc is missing, the requested port is in use, a running server
        uses other ports than those requested, or Orthanc exits or does not
        respond within ``timeout``. The message ends with the tail of Orthanc's log.
    """
    for option, value in (("port", port), ("dicom_port", dicom_port)):
        if value is not None and not 0 < value < 65536:
            raise ConfigurationError(f"{option} must be from 1 to 65535, not {value}")
    if port is not None and port == dicom_port:
        raise ConfigurationError(
            f"port and dicom_port are both {port}; give the DICOM server its own port"
        )
    home = _prepare_home(home)
    with _home_lock(home):
        # Step 1: a server that is already running is returned as it is.
        running = _running_server(home)
        if running is not None:
            _check_requested_ports(running, home, port=port, dicom_port=dicom_port)
            log.info(
                "Orthanc is already running (PID %d) at %s", running.pid, running.url
            )
            return running

        # Step 2: check the requested ports before writing anything.
        executable = find_orthanc_executable()
        if port is not None and not _port_is_free(port):
            raise OrthancServerError(
                f"HTTP port {port} is in use by another program; pass another --port,"
                " or leave it out to let the workbench choose a free port"
            )
        if dicom_port is not None and not _port_is_free(dicom_port):
            raise OrthancServerError(
                f"DICOM port {dicom_port} is in use by another program; pass another"
                " --dicom-port"
            )

        # Step 3: write configuration and credentials, then launch. A port chosen
        # here may be taken before Orthanc binds it, so that case is retried.
        previous = read_credentials(home)
        username = previous.username if previous else _new_username()
        password = previous.password if previous else secrets.token_urlsafe(24)
        attempts = 1 if port is not None else AUTO_PORT_ATTEMPTS
        for attempt in range(1, attempts + 1):
            http_port = port if port is not None else _choose_http_port()
            config = build_config(
                home,
                http_port=http_port,
                username=username,
                password=password,
                dicom_port=dicom_port,
                dicom_modalities=dicom_modalities,
                name=name,
            )
            write_secret_file(home / CONFIG_FILENAME, json.dumps(config, indent=2))
            url = f"http://{LOOPBACK}:{http_port}"
            credentials = {"url": url, "username": username, "password": password}
            write_secret_file(
                home / CREDENTIALS_FILENAME, json.dumps(credentials, indent=2) + "\n"
            )
            try:
                return _launch(executable, home, url, username, password, timeout)
            except _PortTakenError:
                if attempt == attempts:
                    raise OrthancServerError(
                        f"Orthanc could not bind HTTP port {http_port} because another"
                        f" program took it ({attempts} port(s) tried); pass a free"
                        f" --port. Orthanc's log is {home / LOG_FILENAME}"
                    ) from None
                log.warning(
                    "HTTP port %d was taken before Orthanc started; trying another",
                    http_port,
                )
    raise AssertionError("unreachable: the start loop returns or raises")


def stop_orthanc(home: Path, *, timeout: float = 10.0) -> bool:
    """Stop the Orthanc of ``home``.

    The process named in the PID file is ended only when its command line is the
    Orthanc binary with this home's configuration file, so a reused PID never
    leads to another process being killed. It receives SIGTERM, then SIGKILL when
    it has not exited after ``timeout`` seconds.

    Returns
    -------
    bool
        True when a running Orthanc was stopped, False when none was running.

    Raises
    ------
    OrthancServerError
        When the PID file names a running process that is not this home's Orthanc,
        or the process survives SIGKILL.
    """
    home = Path(home).expanduser().resolve()
    pid_path = home / PID_FILENAME
    if not home.is_dir():
        return False
    with _home_lock(home):
        pid = _read_pid(pid_path)
        if pid is None:
            log.info("no Orthanc is running for %s", home)
            return False

        state = _process_state(pid, home / CONFIG_FILENAME)
        if state == "gone":
            pid_path.unlink(missing_ok=True)
            log.info("removed stale PID file of Orthanc (PID %d had exited)", pid)
            return False
        if state == "foreign":
            raise OrthancServerError(
                f"PID {pid} in {pid_path} is not the Orthanc started with"
                f" {home / CONFIG_FILENAME}, so it was not stopped. If this home's"
                f" Orthanc is not running, delete {pid_path}"
            )

        os.kill(pid, signal.SIGTERM)
        if not _wait_for_exit(pid, timeout):
            log.warning(
                "Orthanc (PID %d) did not exit %.0f s after SIGTERM; sending SIGKILL",
                pid,
                timeout,
            )
            os.kill(pid, signal.SIGKILL)
            if not _wait_for_exit(pid, 5.0):
                raise OrthancServerError(
                    f"Orthanc (PID {pid}) is still running after SIGKILL"
                )
        pid_path.unlink(missing_ok=True)
        log.info("stopped Orthanc (PID %d)", pid)
        return True


def orthanc_status(home: Path) -> dict[str, Any]:
    """Return whether the Orthanc of ``home`` runs, where, and what it stores.

    The keys are ``home``, ``running``, ``pid``, ``url``, ``credentials_file``, and
    when it runs ``responding``, plus either the counts ``patients``, ``studies``,
    ``series``, ``instances`` and ``disk_size_mb`` or an ``error``.
    """
    home = Path(home).expanduser().resolve()
    credentials = read_credentials(home) if home.is_dir() else None
    status: dict[str, Any] = {
        "home": str(home),
        "running": False,
        "pid": None,
        "url": credentials.url if credentials else None,
        "credentials_file": str(home / CREDENTIALS_FILENAME),
    }
    server = _running_server(home) if home.is_dir() else None
    if server is None:
        return status

    status.update(running=True, pid=server.pid, url=server.url)
    try:
        with server.client(timeout=5.0, retries=0) as client:
            statistics = client.statistics()
    except OrthancError as exc:
        status.update(responding=False, error=str(exc))
        return status
    status.update(
        responding=True,
        patients=int(statistics["CountPatients"]),
        studies=int(statistics["CountStudies"]),
        series=int(statistics["CountSeries"]),
        instances=int(statistics["CountInstances"]),
        disk_size_mb=int(statistics["TotalDiskSizeMB"]),
    )
    return status


def read_credentials(home: Path) -> OrthancCredentials | None:
    """Return the credentials in ``home/credentials.json``, or None if it is missing.

    Raises
    ------
    ConfigurationError
        When the file is readable by other users or is not valid credentials JSON.
    """
    path = Path(home) / CREDENTIALS_FILENAME
    if not path.is_file():
        return None
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise ConfigurationError(
            f"Orthanc credentials file {path} is readable by other users (mode"
            f" {oct(mode)}); run `chmod 600 {path}`"
        )
    try:
        content = json.loads(path.read_text())
        return OrthancCredentials(
            url=str(content["url"]),
            username=str(content["username"]),
            password=str(content["password"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigurationError(
            f"Orthanc credentials file {path} is not a JSON object with url, username"
            " and password; delete it and its orthanc.json, and start Orthanc again"
            " to create new credentials"
        ) from exc


class _PortTakenError(Exception):
    """Orthanc exited because its HTTP port was taken."""


def _prepare_home(home: Path) -> Path:
    home = Path(home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    for folder in ("storage", "index"):
        (home / folder).mkdir(mode=0o700, exist_ok=True)
    return home


@contextmanager
def _home_lock(home: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``home`` so two starts or stops do not interleave."""
    fd = os.open(home / LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _new_username() -> str:
    return f"workbench-{secrets.token_hex(3)}"


def _port_is_free(port: int) -> bool:
    """Return whether a TCP listener could bind ``port`` on the loopback interface.

    A listener on the wildcard address, as Orthanc's own, also makes the bind fail.
    SO_REUSEADDR lets connections in TIME_WAIT from a stopped server pass, as they
    do for Orthanc's own listener.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((LOOPBACK, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return int(probe.getsockname()[1])


def _choose_http_port() -> int:
    if _port_is_free(DEFAULT_HTTP_PORT):
        return DEFAULT_HTTP_PORT
    return _free_port()


def _read_pid(pid_path: Path) -> int | None:
    try:
        text = pid_path.read_text().strip()
    except FileNotFoundError:
        return None
    try:
        return int(text)
    except ValueError:
        log.warning("ignoring PID file %s: it does not contain a number", pid_path)
        return None


def _process_state(pid: int, config_path: Path) -> str:
    """Classify ``pid`` as ``"ours"``, ``"gone"`` or ``"foreign"``.

    ``"ours"`` means the Orthanc binary running ``config_path``. A zombie left by a
    crashed Orthanc that this process started is reaped and counts as gone.
    """
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            _reap(pid)
            return "gone"
        # psutil reads /proc/PID/cmdline on Linux.
        command_line = process.cmdline()
    except psutil.NoSuchProcess:
        _reap(pid)
        return "gone"
    except psutil.AccessDenied:
        return "foreign"
    is_orthanc = bool(command_line) and Path(command_line[0]).name == "Orthanc"
    if is_orthanc and str(config_path) in command_line[1:]:
        return "ours"
    return "foreign"


def _reap(pid: int) -> None:
    child = _children.pop(pid, None)
    if child is not None:
        child.poll()


def _wait_for_exit(pid: int, timeout: float) -> bool:
    """Wait until ``pid`` has exited and return whether it did within ``timeout``."""
    child = _children.get(pid)
    try:
        if child is not None:
            child.wait(timeout)
            _children.pop(pid, None)
        else:
            psutil.Process(pid).wait(timeout)
    except psutil.NoSuchProcess:
        return True
    except (psutil.TimeoutExpired, subprocess.TimeoutExpired):
        return False
    return True


def _running_server(home: Path) -> OrthancServer | None:
    """Return the server of ``home`` if its PID file names our running Orthanc.

    A PID file that names an exited or unrelated process is removed.
    """
    pid_path = home / PID_FILENAME
    pid = _read_pid(pid_path)
    if pid is None:
        return None
    if _process_state(pid, home / CONFIG_FILENAME) != "ours":
        log.info("removing stale Orthanc PID file %s", pid_path)
        pid_path.unlink(missing_ok=True)
        return None
    credentials = read_credentials(home)
    if credentials is None:
        raise OrthancServerError(
            f"Orthanc (PID {pid}) is running but {home / CREDENTIALS_FILENAME} is"
            " missing; stop it with `workbench orthanc stop` and start it again"
        )
    return OrthancServer(
        url=credentials.url,
        username=credentials.username,
        password=credentials.password,
        pid=pid,
        home=home,
    )


def _check_requested_ports(
    server: OrthancServer, home: Path, *, port: int | None, dicom_port: int | None
) -> None:
    config = json.loads((home / CONFIG_FILENAME).read_text())
    running_port = config.get("HttpPort")
    running_dicom = (
        config.get("DicomPort") if config.get("DicomServerEnabled") else None
    )
    if port is not None and port != running_port:
        raise OrthancServerError(
            f"Orthanc is already running on HTTP port {running_port}, not {port};"
            " stop it with `workbench orthanc stop` to restart it on another port"
        )
    if dicom_port is not None and dicom_port != running_dicom:
        raise OrthancServerError(
            f"Orthanc is already running with DICOM port {running_dicom}, not"
            f" {dicom_port}; stop it with `workbench orthanc stop` to restart it"
        )


def _launch(
    executable: str,
    home: Path,
    url: str,
    username: str,
    password: str,
    timeout: float,
) -> OrthancServer:
    """Start Orthanc detached and wait until it responds to ``GET /system``."""
    # Step 1: start the process in its own session, its output appended to the log.
    log_path = home / LOG_FILENAME
    _rotate_log(log_path)
    log_offset = log_path.stat().st_size if log_path.exists() else 0
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(log_fd, "ab") as log_file:
        process = subprocess.Popen(
            [executable, str(home / CONFIG_FILENAME)],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=home,
            start_new_session=True,
        )
    _children[process.pid] = process
    (home / PID_FILENAME).write_text(f"{process.pid}\n")
    started = time.monotonic()

    # Step 2: poll GET /system with the credentials until it responds or the
    # process exits. The session ignores proxy variables: a proxy would see the
    # password of a loopback server.
    session = requests.Session()
    session.trust_env = False
    try:
        while True:
            if process.poll() is not None:
                (home / PID_FILENAME).unlink(missing_ok=True)
                _children.pop(process.pid, None)
                tail = _log_tail(log_path, log_offset)
                if HTTP_PORT_TAKEN_MESSAGE in tail:
                    raise _PortTakenError
                raise OrthancServerError(
                    f"Orthanc exited with status {process.returncode} during start-up."
                    f" Last lines of {log_path}:\n{tail}"
                )
            try:
                response = session.get(
                    f"{url}/system", auth=(username, password), timeout=1.0
                )
                if response.status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() - started > timeout:
                process.kill()
                process.wait()
                _children.pop(process.pid, None)
                (home / PID_FILENAME).unlink(missing_ok=True)
                raise OrthancServerError(
                    f"Orthanc did not respond to GET {url}/system within"
                    f" {timeout:.0f} s and was killed. Last lines of {log_path}:\n"
                    f"{_log_tail(log_path, log_offset)}"
                )
            time.sleep(READY_POLL_SECONDS)
    finally:
        session.close()

    log.info(
        "Orthanc started (PID %d) at %s in %.2f s",
        process.pid,
        url,
        time.monotonic() - started,
    )
    return OrthancServer(
        url=url, username=username, password=password, pid=process.pid, home=home
    )


def _rotate_log(log_path: Path) -> None:
    if log_path.exists() and log_path.stat().st_size > MAX_LOG_BYTES:
        log_path.replace(log_path.with_name(log_path.name + ".1"))


def _log_tail(log_path: Path, offset: int) -> str:
    """Return the last lines Orthanc wrote to ``log_path`` after byte ``offset``."""
    try:
        with log_path.open("rb") as handle:
            handle.seek(offset)
            text = handle.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return "(no log was written)"
    lines = text.strip().splitlines()[-LOG_TAIL_LINES:]
    return "\n".join(lines) if lines else "(the log is empty)"
