"""Isolated jobs: real child processes in real namespaces, probed from inside.

The functions named ``job_*`` are the jobs: :func:`run_isolated` imports this module
in the child and calls them there, so every attack they try is a real system call
made inside the sandbox. Listeners are opened on this host's 127.0.0.1 and on the
address of its default interface; nothing is ever sent off this machine.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from workbench.audit import AuditEvent, current_user, open_audit_log
from workbench.errors import AuditError, ConfigurationError, DatasetError
from workbench.home import init_home
from workbench.isolation import (
    IsolatedJobError,
    IsolationPolicy,
    run_isolated,
)
from workbench.isolation.environment import child_environment
from workbench.isolation.relay import RelayAuditLog

TESTS_FOLDER = Path(__file__).resolve().parent
PURPOSE = "isolation test"

# ---------------------------------------------------------------------------
# Jobs: these run in the isolated child process.
# ---------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _errno_name(number: int | None) -> str:
    return errno.errorcode.get(number or 0, f"errno {number}")


def _attempt(action: Callable[[], object]) -> str:
    """Run ``action``; return ``"succeeded"`` or the errno name it failed with."""
    try:
        action()
    except OSError as exc:
        return _errno_name(exc.errno)
    return "succeeded"


def _python_connect(host: str, port: int) -> str:
    def connect() -> None:
        socket.create_connection((host, port), timeout=3).close()

    return _attempt(connect)


def _subprocess_connect(host: str, port: int) -> str:
    code = (
        "import socket, sys\n"
        "try:\n"
        "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)\n"
        "except OSError:\n"
        "    sys.exit(1)\n"
    )
    command = [sys.executable, "-c", code, host, str(port)]
    completed = subprocess.run(command, timeout=30, check=False)
    return "succeeded" if completed.returncode == 0 else "failed"


def _curl(curl: str, host: str, port: int) -> int:
    command = [curl, "-sS", "--max-time", "3", f"http://{host}:{port}/"]
    return subprocess.run(command, timeout=30, check=False).returncode


def _native_connect(host: str, port: int) -> str:
    """Connect with libc's socket() and connect(), below Python's socket module."""
    fd = _libc.socket(socket.AF_INET, socket.SOCK_STREAM, 0)
    if fd < 0:
        return _errno_name(ctypes.get_errno())
    # struct sockaddr_in: family in host byte order, port and address in network
    # byte order, 8 bytes of padding.
    address = (
        struct.pack("=H", socket.AF_INET)
        + struct.pack("!H", port)
        + socket.inet_aton(host)
        + bytes(8)
    )
    buffer = ctypes.create_string_buffer(address, len(address))
    try:
        if _libc.connect(fd, buffer, len(address)) == 0:
            return "succeeded"
        return _errno_name(ctypes.get_errno())
    finally:
        _libc.close(fd)


def _own_loopback_round_trip() -> str:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=3) as client:
            peer, _ = server.accept()
            with peer:
                client.sendall(b"ping")
                return peer.recv(4).decode()


def job_probe_network(targets: list[list[Any]], curl: str | None) -> dict[str, Any]:
    attempts = {}
    for host, port in targets:
        attempts[f"{host}:{port}"] = {
            "python": _python_connect(host, port),
            "subprocess": _subprocess_connect(host, port),
            "native": _native_connect(host, port),
            "curl": _curl(curl, host, port) if curl else None,
        }
    interfaces = [name for _, name in socket.if_nameindex()]
    # Resolve a name only where no interface could carry the query off this machine.
    dns = "not tried"
    if interfaces == ["lo"]:
        try:
            socket.getaddrinfo("pacs.example.org", 443)
            dns = "resolved"
        except socket.gaierror as exc:
            dns = f"gaierror {exc.errno}"
    return {
        "attempts": attempts,
        "interfaces": interfaces,
        "own_loopback": _own_loopback_round_trip(),
        "dns": dns,
    }


def _escape_in_nested_namespaces(dataset: str) -> dict[str, str]:
    """In a forked process, gain capabilities in a new user namespace and retry."""
    from workbench.isolation import syscalls

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        outcome = {
            "unshare": _attempt(
                lambda: syscalls.unshare(syscalls.CLONE_NEWUSER | syscalls.CLONE_NEWNS)
            )
        }
        if outcome["unshare"] == "succeeded":
            outcome["remount_writable"] = _attempt(
                lambda: syscalls.set_readonly(dataset, readonly=False)
            )
            outcome["unmount"] = _attempt(lambda: _unmount(dataset))
            outcome["create"] = _attempt(
                lambda: Path(dataset, "nested.txt").write_text("x")
            )
        os.write(write_end, json.dumps(outcome).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as handle:
        text = handle.read()
    os.waitpid(pid, 0)
    return json.loads(text)


def _unmount(path: str) -> None:
    mnt_detach = 2
    if _libc.umount2(os.fsencode(path), mnt_detach) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))


def _append_to(path: Path) -> None:
    with path.open("a") as handle:
        handle.write("x")


def job_tamper_with_dataset(dataset: str, output: str) -> dict[str, Any]:
    from workbench.isolation import syscalls

    root = Path(dataset)
    manifest = root / "manifest.json"
    part = next((root / "instances").glob("*.parquet"))
    attempts = {
        "create": lambda: (root / "new.txt").write_text("x"),
        "append": lambda: _append_to(manifest),
        "truncate": lambda: os.truncate(part, 0),
        "delete": part.unlink,
        "rename": lambda: part.rename(part.with_suffix(".bak")),
        "mkdir": (root / "extra").mkdir,
        "chmod": lambda: manifest.chmod(0o666),
        "touch": lambda: os.utime(manifest, (0, 0)),
        "remount_writable": lambda: syscalls.set_readonly(root, readonly=False),
        "unmount": lambda: _unmount(dataset),
    }
    outcome = {name: _attempt(action) for name, action in attempts.items()}
    written = Path(output, "model.txt")
    written.write_text("weights")
    with open("/dev/urandom", "rb") as random_source:
        random_bytes = len(random_source.read(8))
    return {
        "attempts": outcome,
        "random_bytes": random_bytes,
        "scratch_writable": _attempt(lambda: Path("/tmp/scratch").write_text("x")),
        "nested": _escape_in_nested_namespaces(dataset),
        "output_read_back": written.read_text(),
    }


def _read_attempt(path: Path) -> dict[str, Any]:
    try:
        return {"read_bytes": len(path.read_bytes())}
    except OSError as exc:
        return {"error": _errno_name(exc.errno)}


def job_report_secrets(home: str, key_file: str, user_home: str) -> dict[str, Any]:
    return {
        "pgpass": _read_attempt(Path(user_home, ".pgpass")),
        "ssh_key": _read_attempt(Path(user_home, ".ssh", "id_ed25519")),
        "environment": dict(os.environ),
        "home_key": _read_attempt(Path(home, "deid.key")),
        "home_listing": _attempt(lambda: os.listdir(home)),
        "key_file": _read_attempt(Path(key_file)),
        "processes": sorted(
            int(name) for name in os.listdir("/proc") if name.isdigit()
        ),
        "parent_pid": os.getppid(),
    }


def job_read_dataset(dataset: str, purpose: str) -> dict[str, Any]:
    from workbench.dataset.reader import DatasetView

    view = DatasetView.open(dataset)
    instances = view.instances(columns=["SOPInstanceUID"]).num_rows
    with open_audit_log() as audit:
        record = audit.append(
            AuditEvent(
                action="dataset.read",
                resource=f"dataset:{view.name}",
                purpose=purpose,
                details={"instances": instances},
            )
        )
        try:
            audit.verify()
            verify_error = ""
        except AuditError as exc:
            verify_error = str(exc)
        # Only the runner may record job starts and ends; this one is rejected.
        audit.append(AuditEvent(action="job.end", resource="job:forged"))
    return {
        "instances": instances,
        "provisional_sequence": record.sequence,
        "verify_error": verify_error,
    }


def job_load_with_workers(workers: int) -> dict[str, Any]:
    import torch
    from torch.utils.data import DataLoader, Dataset

    class Slices(Dataset):
        def __len__(self) -> int:
            return 8

        def __getitem__(self, index: int) -> Any:
            if index % 4 == 0:
                with open_audit_log() as audit:
                    audit.append(
                        AuditEvent(
                            action="dataset.read",
                            resource="dataset:workers",
                            purpose=PURPOSE,
                            details={"index": index, "pid": os.getpid()},
                        )
                    )
            return torch.full((4,), float(index))

    loader = DataLoader(Slices(), batch_size=2, num_workers=workers)
    return {"total": sum(float(batch.sum()) for batch in loader)}


def job_raise(message: str) -> None:
    raise ValueError(message)


def job_exit_without_result() -> None:
    os._exit(7)


def job_segfault() -> None:
    ctypes.string_at(0)


def job_return_path() -> Any:
    return Path("/")


def job_identity() -> dict[str, Any]:
    return {"pid": os.getpid(), "isolated": os.environ.get("WORKBENCH_ISOLATED")}


def job_try_python_network(host: str, port: int) -> dict[str, Any]:
    with socket.socket() as plain:
        connect = _attempt(lambda: plain.connect((host, port)))
        connect_ex = _errno_name(plain.connect_ex((host, port)))
    try:
        socket.getaddrinfo("localhost", 80)
        lookup = "resolved"
    except socket.gaierror:
        lookup = "gaierror"
    left, right = socket.socketpair()
    with left, right:
        left.sendall(b"ping")
        unix = right.recv(4).decode()
    return {
        "create_connection": _python_connect(host, port),
        "connect": connect,
        "connect_ex": connect_ex,
        "getaddrinfo": lookup,
        "unix_socketpair": unix,
        "native": _native_connect(host, port),
    }


def job_sleep_with_child(marker: str, token: str) -> None:
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", token])
    Path(marker).write_text("started")
    time.sleep(600)


def job_probe_user(dataset: str) -> dict[str, Any]:
    return {
        "uid": os.getuid(),
        "interfaces": [name for _, name in socket.if_nameindex()],
        "create_in_dataset": _attempt(lambda: Path(dataset, "x.txt").write_text("x")),
    }


# ---------------------------------------------------------------------------
# Fixtures and helpers of the tests, in the pytest process.
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Imported here, so that the job processes, which import this module, need not
    # load the ingest pipeline.
    from ingest_helpers import ingest_folder

    from workbench.samples import generate_studies

    root = tmp_path_factory.mktemp("isolation")
    corpus = generate_studies(
        root / "corpus",
        patients=1,
        studies_per_patient=1,
        ct_slices=3,
        mr_slices=2,
        rows=16,
        columns=16,
    )
    ingest_folder(corpus.root, root / "dataset", workers=1)
    return root / "dataset"


@contextlib.contextmanager
def listening(host: str) -> Iterator[socket.socket]:
    """A TCP listener on ``host`` that never accepts; closed on exit."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        server.bind((host, 0))
        server.listen(8)
        server.setblocking(False)
        yield server
    finally:
        server.close()


def has_pending_connection(server: socket.socket) -> bool:
    try:
        peer, _ = server.accept()
    except BlockingIOError:
        return False
    peer.close()
    return True


def default_interface_address() -> str | None:
    """Return the IPv4 address of this host's first global interface, if any."""
    ip = shutil.which("ip")
    if ip is None:
        return None
    command = [ip, "-4", "-o", "addr", "show", "scope", "global"]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    for line in completed.stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            return fields[fields.index("inet") + 1].split("/")[0]
    return None


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    """Map each file below ``root`` to its size, mtime and SHA-256."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            info = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            files[str(path.relative_to(root))] = (
                info.st_size,
                info.st_mtime_ns,
                digest,
            )
    return files


def audit_head() -> int:
    with open_audit_log() as audit:
        return audit.verify().head_sequence


def records_after(sequence: int) -> list[Any]:
    with open_audit_log() as audit:
        return [r for r in audit.records() if r.sequence > sequence]


def run_job(function: str, kwargs: dict[str, Any], **options: Any) -> Any:
    options.setdefault("purpose", PURPOSE)
    options.setdefault("job", function.removeprefix("job_"))
    return run_isolated(f"test_isolation:{function}", kwargs, **options)


# ---------------------------------------------------------------------------
# NAMESPACES
# ---------------------------------------------------------------------------


def test_network_unreachable_from_job(dataset):
    hosts = ["127.0.0.1"]
    interface_address = default_interface_address()
    if interface_address:
        hosts.append(interface_address)

    with contextlib.ExitStack() as stack:
        listeners = [stack.enter_context(listening(host)) for host in hosts]
        targets = [list(listener.getsockname()) for listener in listeners]
        result = run_job(
            "job_probe_network",
            {"targets": targets, "curl": shutil.which("curl")},
            datasets=[dataset],
        )
        pending = [has_pending_connection(listener) for listener in listeners]

    probe = result.value
    assert len(probe["attempts"]) == len(hosts)
    for target, attempts in probe["attempts"].items():
        assert attempts["python"] in {"ECONNREFUSED", "ENETUNREACH"}, target
        assert attempts["subprocess"] == "failed", target
        assert attempts["native"] in {"ECONNREFUSED", "ENETUNREACH"}, target
        if attempts["curl"] is not None:
            assert attempts["curl"] == 7, target  # curl: "Failed to connect"
    assert pending == [False] * len(hosts)
    assert probe["interfaces"] == ["lo"]
    assert probe["own_loopback"] == "ping"
    assert probe["dns"].startswith("gaierror")


def test_dataset_read_only_output_writable(dataset, tmp_path):
    before = snapshot(dataset)
    output = tmp_path / "run"

    result = run_job(
        "job_tamper_with_dataset",
        {"dataset": str(dataset), "output": str(output)},
        datasets=[dataset],
        outputs=[output],
    )

    for action, outcome in result.value["attempts"].items():
        assert outcome in {"EROFS", "EPERM", "EACCES"}, action
    nested = result.value["nested"]
    assert nested["unshare"] in {"succeeded", "EPERM", "ENOSPC", "EINVAL"}
    if nested["unshare"] == "succeeded":
        assert nested["remount_writable"] in {"EPERM", "EINVAL"}
        assert nested["unmount"] in {"EPERM", "EINVAL"}
        assert nested["create"] == "EROFS"
    assert snapshot(dataset) == before
    assert result.value["output_read_back"] == "weights"
    assert result.value["random_bytes"] == 8
    assert result.value["scratch_writable"] == "succeeded"
    assert (output / "model.txt").read_text() == "weights"


def test_secrets_hidden_and_offline(dataset, tmp_path, monkeypatch):
    # A project folder whose home and site key sit inside the job's output folder,
    # so that only the sandbox's covering mounts keep them unreadable.
    project = tmp_path / "project"
    home = init_home(project / ".workbench")
    key_file = project / "site.key"
    key_file.write_text((home / "deid.key").read_text())
    user_home = project / "doe"
    (user_home / ".ssh").mkdir(parents=True)
    (user_home / ".ssh" / "id_ed25519").write_text("ssh-s3cret")
    (user_home / ".pgpass").write_text("127.0.0.1:5432:*:doe:pg-s3cret\n")
    audit = open_audit_log(home / "audit.sqlite")
    secrets = {
        "ORTHANC_USERNAME": "orthanc-s3cret-user",
        "ORTHANC_PASSWORD": "orthanc-s3cret-password",
        "WORKBENCH_AUDIT_URL": "postgresql://u:s3cret@127.0.0.1/db",
        "PGPASSWORD": "pg-s3cret",
        "HF_TOKEN": "hf_s3cret",
        "HTTPS_PROXY": "http://127.0.0.1:9",
        "MIRROR": "https://user:s3cret@127.0.0.1/simple",
        "WORKBENCH_DEID_KEY_FILE": str(key_file),
    }
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    monkeypatch.setenv("LANG", "C.UTF-8")
    monkeypatch.setenv("HOME", str(user_home))

    with audit:
        result = run_job(
            "job_report_secrets",
            {"home": str(home), "key_file": str(key_file), "user_home": str(user_home)},
            datasets=[dataset],
            outputs=[project],
            audit=audit,
        )

    environment = result.value["environment"]
    for name in [*secrets, "WORKBENCH_HOME"]:
        assert name not in environment, name
    for name, value in environment.items():
        assert "s3cret" not in value, name
    assert environment["PATH"] == os.environ["PATH"]
    assert environment["LANG"] == "C.UTF-8"
    assert environment["HOME"] == str(user_home)
    assert environment["HF_HUB_OFFLINE"] == "1"
    assert environment["TRANSFORMERS_OFFLINE"] == "1"
    assert environment["HF_DATASETS_OFFLINE"] == "1"
    assert environment["WORKBENCH_ISOLATED"] == "1"
    assert result.value["home_key"] == {"error": "EACCES"}
    assert result.value["home_listing"] == "EACCES"
    assert result.value["key_file"] == {"read_bytes": 0}
    assert result.value["pgpass"] == {"read_bytes": 0}
    assert result.value["ssh_key"] == {"error": "EACCES"}
    assert result.value["processes"] == [1]
    assert result.value["parent_pid"] == 0


def test_audit_relay_records_in_order(dataset, caplog):
    before = audit_head()

    with caplog.at_level(logging.WARNING, logger="workbench.isolation"):
        result = run_job(
            "job_read_dataset",
            {"dataset": str(dataset), "purpose": PURPOSE},
            datasets=[dataset],
        )

    records = records_after(before)
    assert [r.action for r in records] == ["job.start", "dataset.read", "job.end"]
    start, read, end = records
    assert start.details["job_id"] == result.job_id
    assert end.details["job_id"] == result.job_id
    assert start.details["policy"] == "namespaces"
    assert start.details["datasets"][0]["name"] == dataset.name
    assert start.actor == current_user()
    assert read.resource == f"dataset:{dataset.name}"
    assert read.details == {"instances": result.value["instances"]}
    assert read.actor == current_user()
    assert end.outcome == "ok"
    assert end.details["audit_events_relayed"] == 1
    assert result.audit_events_relayed == 1
    assert result.value["provisional_sequence"] == 0
    assert "inside an isolated job" in result.value["verify_error"]
    assert "rejected a relayed audit line" in caplog.text
    with open_audit_log() as audit:
        assert audit.verify().head_sequence == end.sequence


def test_dataloader_workers_relay_audit():
    pytest.importorskip("torch")
    before = audit_head()

    result = run_job("job_load_with_workers", {"workers": 2})

    # Worker processes pass batches through shared memory in the private
    # /dev/shm, and send audit events through the relay inherited by fork.
    assert result.value == {"total": 4.0 * sum(range(8))}
    reads = [r for r in records_after(before) if r.action == "dataset.read"]
    assert sorted(r.details["index"] for r in reads) == [0, 4]
    assert all(r.details["pid"] != 1 for r in reads)
    assert result.audit_events_relayed == 2


def test_job_exception_becomes_error():
    before = audit_head()
    message = "learning rate must be positive, got -1"

    with pytest.raises(IsolatedJobError) as caught:
        run_job("job_raise", {"message": message})

    error = caught.value
    assert str(error) == message
    assert error.error_type == "ValueError"
    assert "job_raise" in error.traceback
    assert "ValueError: learning rate" in error.traceback
    assert error.exit_status == 1
    assert error.signal is None
    end = records_after(before)[-1]
    assert end.action == "job.end"
    assert end.outcome == "error"
    assert end.details["job_error_type"] == "ValueError"


@pytest.mark.parametrize("policy", ["namespaces", "weak-in-process-guard"])
def test_job_death_reported(policy):
    with pytest.raises(IsolatedJobError) as exited:
        run_job("job_exit_without_result", {}, policy=policy)
    with pytest.raises(IsolatedJobError) as crashed:
        run_job("job_segfault", {}, policy=policy)

    assert exited.value.exit_status == 7
    assert exited.value.signal is None
    assert "status 7" in str(exited.value)
    assert crashed.value.signal == signal.SIGSEGV
    assert crashed.value.exit_status is None
    assert "SIGSEGV" in str(crashed.value)


def test_return_value_must_be_json():
    with pytest.raises(IsolatedJobError, match="not JSON") as caught:
        run_job("job_return_path", {})
    assert caught.value.error_type == "TypeError"


def test_interrupt_ends_job_and_its_children(tmp_path):
    marker = tmp_path / "out" / "started"
    token = f"isolation-test-sleeper-{os.getpid()}-{time.monotonic_ns()}"
    script = (
        "import sys\n"
        "from workbench.isolation import run_isolated\n"
        "try:\n"
        "    run_isolated(\n"
        "        'test_isolation:job_sleep_with_child',\n"
        "        {'marker': sys.argv[1], 'token': sys.argv[2]},\n"
        "        outputs=[sys.argv[3]], purpose='interrupt test', job='sleep',\n"
        "    )\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', flush=True)\n"
        "    sys.exit(130)\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(TESTS_FOLDER)}
    command = [sys.executable, "-c", script, str(marker), token, str(marker.parent)]
    before = audit_head()
    runner = subprocess.Popen(
        command, env=environment, stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 30
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists()

        runner.send_signal(signal.SIGINT)
        stdout, _ = runner.communicate(timeout=90)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()

    assert runner.returncode == 130
    assert stdout.strip() == "interrupted"
    leftovers = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        with contextlib.suppress(OSError):
            if token.encode() in cmdline.read_bytes():
                leftovers.append(cmdline.parent.name)
    assert leftovers == []
    end = records_after(before)[-1]
    assert end.action == "job.end"
    assert end.outcome == "error"
    assert end.details["error_type"] == "KeyboardInterrupt"


# ---------------------------------------------------------------------------
# Requests rejected before anything starts
# ---------------------------------------------------------------------------


def _unverified_copy(dataset: Path, folder: Path) -> Path:
    shutil.copytree(dataset, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["verified"] = False
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("kind", ["no manifest", "verified false"])
def test_raw_dataset_rejected(dataset, tmp_path, kind):
    if kind == "no manifest":
        raw = tmp_path / "raw"
        raw.mkdir()
        (raw / "image.dcm").write_bytes(b"\0" * 132 + b"DICM")
    else:
        raw = _unverified_copy(dataset, tmp_path / "unverified")
    output = tmp_path / "out"
    before = audit_head()

    with pytest.raises(DatasetError, match=r"manifest|verified"):
        run_job("job_identity", {}, datasets=[raw], outputs=[output])

    assert audit_head() == before
    assert not output.exists()


def test_output_inside_dataset_rejected(dataset):
    with pytest.raises(DatasetError, match="inside dataset"):
        run_job("job_identity", {}, datasets=[dataset], outputs=[dataset / "runs"])
    assert not (dataset / "runs").exists()


def test_invalid_requests_rejected(tmp_path):
    with pytest.raises(ConfigurationError, match="not of the form"):
        run_isolated("test_isolation.job_identity", {}, purpose=PURPOSE, job="x")
    with pytest.raises(ConfigurationError, match="not JSON"):
        run_job("job_identity", {"path": tmp_path})
    with pytest.raises(ConfigurationError, match="purpose"):
        run_job("job_identity", {}, purpose=" ")
    with pytest.raises(ConfigurationError, match="unknown"):
        run_job("job_identity", {}, policy="containers")


# ---------------------------------------------------------------------------
# WEAK_IN_PROCESS_GUARD and NONE
# ---------------------------------------------------------------------------


def test_weak_guard_refuses_python_sockets(dataset, caplog):
    with listening("127.0.0.1") as listener, caplog.at_level(logging.WARNING):
        host, port = listener.getsockname()
        result = run_job(
            "job_try_python_network",
            {"host": host, "port": port},
            datasets=[dataset],
            policy=IsolationPolicy.WEAK_IN_PROCESS_GUARD,
        )
        native_connected = has_pending_connection(listener)

    probe = result.value
    assert probe["create_connection"] == "EACCES"
    assert probe["connect"] == "EACCES"
    assert probe["connect_ex"] == "EACCES"
    assert probe["getaddrinfo"] == "gaierror"
    assert probe["unix_socketpair"] == "ping"
    # The documented limit: native code passes the guard.
    assert probe["native"] == "succeeded"
    assert native_connected
    warnings = [r for r in caplog.records if r.name == "workbench.isolation.runner"]
    assert [r.levelname for r in warnings] == ["WARNING"]
    assert "WEAK in-process guard" in warnings[0].getMessage()


def test_no_isolation_runs_in_process(caplog):
    before = audit_head()
    with caplog.at_level(logging.WARNING, logger="workbench.isolation"):
        result = run_job("job_identity", {}, policy="none")

    assert result.value == {"pid": os.getpid(), "isolated": None}
    assert result.exit_status is None
    assert "WITHOUT isolation" in caplog.text
    start, end = records_after(before)
    assert start.details["policy"] == "none"
    assert end.outcome == "ok"


# ---------------------------------------------------------------------------
# Without root: a user namespace, or a clear error when none can be made
# ---------------------------------------------------------------------------

USER_SCRIPT = """
import json, sys
from workbench.isolation import run_isolated
try:
    result = run_isolated("test_isolation:job_probe_user", {"dataset": sys.argv[1]},
                          datasets=[sys.argv[1]], purpose="user test", job="probe")
    print(json.dumps({"value": result.value}))
except Exception as exc:
    print(json.dumps({"error_type": type(exc).__name__, "message": str(exc)}))
"""


def run_as_unprivileged_user(dataset: Path, namespace_limit: int | None) -> Any:
    """Run USER_SCRIPT as uid 1000 without capabilities, in nested user namespaces.

    The outer namespace maps uid 0 to this process's user, so files stay
    accessible. The inner one runs the script as uid 1000 without capabilities,
    the way an ordinary user runs it. ``namespace_limit`` caps the
    number of user namespaces below the outer one.
    """
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("util-linux unshare is not installed")
    probe = subprocess.run(
        [unshare, "--user", "--map-root-user", "true"], capture_output=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip("this machine does not allow user namespaces")
    inner = [
        unshare,
        "--user",
        "--map-user=1000",
        "--map-group=1000",
        sys.executable,
        "-c",
        USER_SCRIPT,
        str(dataset),
    ]
    shell = 'exec "$@"'
    if namespace_limit is not None:
        limit_file = "/proc/sys/user/max_user_namespaces"
        shell = f'echo {namespace_limit} > {limit_file} && exec "$@"'
    command = [unshare, "--user", "--map-root-user", "sh", "-c", shell, "sh", *inner]
    environment = {**os.environ, "PYTHONPATH": str(TESTS_FOLDER)}
    completed = subprocess.run(
        command, env=environment, capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_user_namespace_without_root(dataset):
    report = run_as_unprivileged_user(dataset, namespace_limit=None)

    assert report["value"]["uid"] == 1000
    assert report["value"]["interfaces"] == ["lo"]
    assert report["value"]["create_in_dataset"] == "EROFS"


def test_namespaces_unavailable_raises(dataset):
    # One user namespace is allowed, and the inner one of the test uses it up.
    report = run_as_unprivileged_user(dataset, namespace_limit=1)

    assert report["error_type"] == "IsolationError"
    assert "max_user_namespaces" in report["message"]
    assert "IsolationPolicy.WEAK_IN_PROCESS_GUARD" in report["message"]


# ---------------------------------------------------------------------------
# Pieces without a job process
# ---------------------------------------------------------------------------


def test_child_environment_rules():
    parent = {
        "PATH": "/usr/bin",
        "HOME": "/home/doe",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "VIRTUAL_ENV": "/work/.venv",
        "PYTHONPATH": "/work/src",
        "ORTHANC_URL": "http://127.0.0.1:8042",
        "PGHOST": "127.0.0.1",
        "DATABASE_URL": "postgresql://127.0.0.1/db",
        "aws_secret_access_key": "x",
        "GITHUB_TOKEN": "x",
        "SSH_AUTH_SOCK": "/run/user/0/agent",
        "no_proxy": "localhost",
        "HTTP_PROXY": "http://127.0.0.1:3128",
        "DOCKER_HOST": "unix:///run/docker.sock",
        "PIP_EXTRA": "https://doe:pw@127.0.0.1/simple",
        "HF_HUB_OFFLINE": "0",
    }

    environment = child_environment(parent, {"TMPDIR": "/tmp"})

    assert environment == {
        "PATH": "/usr/bin",
        "HOME": "/home/doe",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "VIRTUAL_ENV": "/work/.venv",
        "PYTHONPATH": "/work/src",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "WORKBENCH_ISOLATED": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "TMPDIR": "/tmp",
    }


def test_relay_rejects_descriptor_that_is_not_pipe(tmp_path):
    with (
        (tmp_path / "file").open("w") as handle,
        pytest.raises(AuditError, match="not the audit relay pipe"),
    ):
        RelayAuditLog(handle.fileno())


def job_use_input(folder: str, output: str) -> dict[str, Any]:
    model = Path(folder) / "model.txt"
    return {
        "read": model.read_text(),
        "write": _attempt(lambda: (Path(folder) / "new.txt").write_text("x")),
        "output": _attempt(lambda: (Path(output) / "out.txt").write_text("y")),
    }


def test_input_folder_readable_not_writable(dataset, tmp_path):
    # Under /tmp, which the sandbox replaces: only the input mount shows it.
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.txt").write_text("weights")
    output = tmp_path / "out"
    result = run_job(
        "job_use_input",
        {"folder": str(model), "output": str(output)},
        datasets=[dataset],
        outputs=[output],
        inputs=[model],
    )
    assert result.value["read"] == "weights"
    assert result.value["write"] == "EROFS"
    assert result.value["output"] == "succeeded"
    assert not (model / "new.txt").exists()
