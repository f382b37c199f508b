"""Tests of workbench.orthanc.server against the real Orthanc binary."""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import requests
from fixtures.orthanc import free_port, pydicom_test_file

from workbench.errors import ConfigurationError, OrthancAuthError, OrthancServerError
from workbench.orthanc import server as server_module
from workbench.orthanc.client import OrthancClient
from workbench.orthanc.server import (
    CONFIG_FILENAME,
    CREDENTIALS_FILENAME,
    LOG_FILENAME,
    PID_FILENAME,
    OrthancServer,
    orthanc_status,
    start_orthanc,
    stop_orthanc,
)

pytestmark = pytest.mark.orthanc


def file_mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def own_home(tmp_path: Path) -> Iterator[Path]:
    """A home for a test that starts its own Orthanc; stopped after the test."""
    home = tmp_path / "orthanc"
    try:
        yield home
    finally:
        stop_orthanc(home)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A process that is not Orthanc, for PID files that point elsewhere."""
    process = subprocess.Popen(["sleep", "60"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def test_config_is_hardened(orthanc_server: OrthancServer) -> None:
    home = orthanc_server.home
    config = json.loads((home / CONFIG_FILENAME).read_text())

    assert config["RemoteAccessAllowed"] is False
    assert config["DicomServerEnabled"] is False
    assert config["AuthenticationEnabled"] is True
    assert config["RegisteredUsers"] == {
        orthanc_server.username: orthanc_server.password
    }
    assert config["Plugins"] == []
    assert config["LuaScripts"] == []
    assert config["ExecuteLuaEnabled"] is False
    assert config["RestApiWriteToFileSystemEnabled"] is False
    assert config["WebDavEnabled"] is False
    assert config["DicomAlwaysAllowStore"] is False
    assert config["DeidentifyLogs"] is True
    assert config["HttpPort"] == int(orthanc_server.url.rsplit(":", 1)[1])
    assert Path(config["StorageDirectory"]).parent == home
    assert Path(config["IndexDirectory"]).parent == home
    assert config["Name"]


def test_secret_files_are_private(orthanc_server: OrthancServer) -> None:
    home = orthanc_server.home
    credentials = json.loads((home / CREDENTIALS_FILENAME).read_text())

    assert file_mode(home / CONFIG_FILENAME) == 0o600
    assert file_mode(home / CREDENTIALS_FILENAME) == 0o600
    assert file_mode(home / LOG_FILENAME) == 0o600
    assert file_mode(home) == 0o700
    assert credentials == {
        "url": orthanc_server.url,
        "username": orthanc_server.username,
        "password": orthanc_server.password,
    }
    assert len(orthanc_server.password) >= 24
    assert orthanc_server.password not in repr(orthanc_server)
    assert orthanc_server.password not in (home / LOG_FILENAME).read_text()


def test_server_listens_on_loopback_url(orthanc_server: OrthancServer) -> None:
    assert orthanc_server.url.startswith("http://127.0.0.1:")


def test_requests_without_credentials_get_401(orthanc_server: OrthancServer) -> None:
    url = f"{orthanc_server.url}/system"

    anonymous = requests.get(url, timeout=5)
    wrong_password = requests.get(
        url, auth=(orthanc_server.username, "wrong"), timeout=5
    )
    wrong_user = requests.get(url, auth=("admin", orthanc_server.password), timeout=5)
    right = requests.get(
        url, auth=(orthanc_server.username, orthanc_server.password), timeout=5
    )

    assert anonymous.status_code == 401
    assert wrong_password.status_code == 401
    assert wrong_user.status_code == 401
    assert right.status_code == 200
    assert right.json()["Version"] == "1.10.1"


def test_client_reports_rejected_credentials(orthanc_server: OrthancServer) -> None:
    wrong = OrthancClient(orthanc_server.url, orthanc_server.username, "wrong")
    without = OrthancClient(orthanc_server.url)

    with pytest.raises(OrthancAuthError) as rejected:
        wrong.check_server()
    with pytest.raises(OrthancAuthError) as missing:
        without.check_server()

    assert rejected.value.status == 401
    assert "rejected the credentials" in str(rejected.value)
    assert "wrong" not in str(rejected.value)
    assert missing.value.status == 401
    assert "ORTHANC_USERNAME" in str(missing.value)


def test_check_server_of_hardened_server(orthanc_server: OrthancServer) -> None:
    check = orthanc_server.client().check_server()

    assert check.accepts_unauthenticated is False
    assert check.version == "1.10.1"
    assert check.name == "workbench"


def test_default_port_taken_picks_free_port(
    own_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        monkeypatch.setattr(server_module, "DEFAULT_HTTP_PORT", taken)

        server = start_orthanc(own_home)

    config = json.loads((own_home / CONFIG_FILENAME).read_text())
    port = int(server.url.rsplit(":", 1)[1])
    assert port != taken
    assert config["HttpPort"] == port
    assert server.client().system()["HttpPort"] == port


def test_port_taken_at_launch_is_retried(
    own_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]
        # The first port offered is taken after the check, as in a race with
        # another program; the second one is free.
        offered = iter([taken, free_port()])
        monkeypatch.setattr(server_module, "_choose_http_port", lambda: next(offered))

        server = start_orthanc(own_home)

    log_text = (own_home / LOG_FILENAME).read_text()
    assert server.url != f"http://127.0.0.1:{taken}"
    assert server.client().system()["Version"] == "1.10.1"
    assert server_module.HTTP_PORT_TAKEN_MESSAGE in log_text


def test_requested_port_taken_is_an_error(own_home: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = listener.getsockname()[1]

        with pytest.raises(OrthancServerError, match=f"port {taken} is in use"):
            start_orthanc(own_home, port=taken)

    assert not (own_home / PID_FILENAME).exists()


def test_invalid_ports_rejected(tmp_path: Path) -> None:
    home = tmp_path / "orthanc"

    with pytest.raises(ConfigurationError, match="from 1 to 65535"):
        start_orthanc(home, port=0)
    with pytest.raises(ConfigurationError, match="from 1 to 65535"):
        start_orthanc(home, dicom_port=70000)
    with pytest.raises(ConfigurationError, match="its own port"):
        start_orthanc(home, port=4242, dicom_port=4242)

    assert not home.exists()


def test_start_twice_returns_running_server(own_home: Path) -> None:
    port = free_port()
    first = start_orthanc(own_home, port=port)

    second = start_orthanc(own_home)
    same_port = start_orthanc(own_home, port=port)

    assert second == first
    assert same_port == first
    with pytest.raises(OrthancServerError, match="already running on HTTP port"):
        start_orthanc(own_home, port=free_port())


def test_restart_reuses_credentials(own_home: Path) -> None:
    first = start_orthanc(own_home, port=free_port())
    first.stop()

    second = start_orthanc(own_home, port=free_port())

    assert second.pid != first.pid
    assert second.url != first.url
    assert second.username == first.username
    assert second.password == first.password
    assert second.client().check_server().version == "1.10.1"


def test_stop_ends_process(own_home: Path) -> None:
    server = start_orthanc(own_home, port=free_port())
    assert psutil.pid_exists(server.pid)

    stopped = stop_orthanc(own_home)

    assert stopped is True
    assert not psutil.pid_exists(server.pid)
    assert not (own_home / PID_FILENAME).exists()
    assert stop_orthanc(own_home) is False


def test_stop_refuses_pid_of_other_process(
    own_home: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    own_home.mkdir()
    (own_home / PID_FILENAME).write_text(f"{sleeper.pid}\n")

    with pytest.raises(OrthancServerError, match="not the Orthanc started with"):
        stop_orthanc(own_home)

    assert sleeper.poll() is None
    assert (own_home / PID_FILENAME).exists()


def test_stop_refuses_orthanc_of_other_home(
    own_home: Path, orthanc_server: OrthancServer
) -> None:
    own_home.mkdir()
    (own_home / PID_FILENAME).write_text(f"{orthanc_server.pid}\n")

    with pytest.raises(OrthancServerError, match="not the Orthanc started with"):
        stop_orthanc(own_home)

    assert psutil.pid_exists(orthanc_server.pid)
    assert orthanc_server.client().system()["Version"] == "1.10.1"
    (own_home / PID_FILENAME).unlink()


def test_start_replaces_stale_pid_file(
    own_home: Path, sleeper: subprocess.Popen[bytes]
) -> None:
    own_home.mkdir()
    (own_home / PID_FILENAME).write_text(f"{sleeper.pid}\n")

    server = start_orthanc(own_home, port=free_port())

    assert server.pid != sleeper.pid
    assert (own_home / PID_FILENAME).read_text().strip() == str(server.pid)
    assert sleeper.poll() is None


def fake_orthanc(folder: Path, script: str) -> str:
    """Write an executable named Orthanc that runs ``script`` with Python."""
    folder.mkdir()
    executable = folder / "Orthanc"
    executable.write_text(f"#!{sys.executable}\n{script}\n")
    executable.chmod(0o755)
    return str(executable)


def test_start_failure_shows_log_tail(
    own_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    executable = fake_orthanc(
        tmp_path / "bin",
        "import sys\nprint('E1204 configuration error: bad option', file=sys.stderr)\n"
        "sys.exit(3)",
    )
    monkeypatch.setattr(server_module, "find_orthanc_executable", lambda: executable)

    with pytest.raises(OrthancServerError) as failure:
        start_orthanc(own_home, port=free_port())

    assert "exited with status 3" in str(failure.value)
    assert "configuration error: bad option" in str(failure.value)
    assert not (own_home / PID_FILENAME).exists()


def test_start_timeout_kills_process(
    own_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    executable = fake_orthanc(
        tmp_path / "bin",
        "import time\nprint('starting but never listening', flush=True)\n"
        "time.sleep(60)",
    )
    monkeypatch.setattr(server_module, "find_orthanc_executable", lambda: executable)

    with pytest.raises(OrthancServerError) as failure:
        start_orthanc(own_home, port=free_port(), timeout=1.0)

    assert "did not respond" in str(failure.value)
    assert "starting but never listening" in str(failure.value)
    assert not (own_home / PID_FILENAME).exists()
    fakes = [
        process.pid
        for process in psutil.process_iter(["cmdline"])
        if executable in (process.info["cmdline"] or [])
    ]
    assert fakes == []


def test_dicom_port_enables_dicom_server(own_home: Path) -> None:
    dicom_port = free_port()

    server = start_orthanc(own_home, port=free_port(), dicom_port=dicom_port)

    config = json.loads((own_home / CONFIG_FILENAME).read_text())
    assert config["DicomServerEnabled"] is True
    assert config["DicomPort"] == dicom_port
    assert config["DicomAlwaysAllowStore"] is False
    assert server.client().system()["DicomPort"] == dicom_port
    with socket.create_connection(("127.0.0.1", dicom_port), timeout=5):
        pass


def test_status_reports_counts(own_home: Path) -> None:
    with start_orthanc(own_home, port=free_port()) as server:
        server.client().upload(pydicom_test_file("CT_small.dcm").read_bytes())
        running = orthanc_status(own_home)
    stopped = orthanc_status(own_home)

    assert running["running"] is True
    assert running["responding"] is True
    assert running["pid"] == server.pid
    assert running["url"] == server.url
    assert running["instances"] == 1
    assert running["studies"] == 1
    assert server.password not in json.dumps(running)
    assert stopped["running"] is False
    assert stopped["pid"] is None
    assert not psutil.pid_exists(server.pid)
