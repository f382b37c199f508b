"""Tests of workbench.orthanc.client: transport rules, retries, and the REST calls.

Transport and retry tests run against small HTTP servers on 127.0.0.1 started here;
the REST tests against the real Orthanc of the ``orthanc`` fixture.
"""

from __future__ import annotations

import io
import json
import logging
import pickle
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from fixtures.orthanc import free_port, pydicom_test_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from workbench.errors import (
    ConfigurationError,
    InsecureConnectionError,
    OrthancConnectionError,
    OrthancError,
)
from workbench.orthanc.client import OrthancClient, is_loopback_url
from workbench.orthanc.server import OrthancServer, find_orthanc_executable

CT_SMALL = pydicom_test_file("CT_small.dcm")  # StudyDate 20040119, Modality CT
MR_SMALL = pydicom_test_file("MR_small.dcm")  # StudyDate 20040826, Modality MR


@pytest.fixture
def no_requests(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make any HTTP request fail the test; return the list of attempted URLs."""
    attempted: list[str] = []

    def refuse(self: requests.Session, method: str, url: str, **kwargs: object) -> None:
        attempted.append(url)
        raise AssertionError(f"unexpected request {method} {url}")

    monkeypatch.setattr(requests.Session, "request", refuse)
    return attempted


# Transport rules: no request is sent in these tests.


@pytest.mark.parametrize(
    "url",
    [
        "http://example.org",
        "http://example.org:8042/orthanc",
        "http://192.0.2.10:8042",
        "http://10.0.0.1",
        "http://[2001:db8::1]:8042",
        "http://localhost.example.org",
    ],
)
def test_plain_http_to_remote_host_rejected(url: str, no_requests: list[str]) -> None:
    with pytest.raises(InsecureConnectionError) as rejected:
        OrthancClient(url, "user", "secret")

    assert "https://" in str(rejected.value)
    assert "--insecure" in str(rejected.value)
    assert "secret" not in str(rejected.value)
    assert no_requests == []


@pytest.mark.parametrize(
    ("url", "base_url"),
    [
        ("http://127.0.0.1:8042", "http://127.0.0.1:8042"),
        ("http://127.1.2.3:8042", "http://127.1.2.3:8042"),
        ("http://localhost:8042", "http://localhost:8042"),
        ("HTTP://LOCALHOST:8042/", "http://localhost:8042"),
        ("http://[::1]:8042", "http://[::1]:8042"),
        ("https://pacs.example.org/orthanc/", "https://pacs.example.org/orthanc"),
    ],
)
def test_loopback_and_https_accepted(
    url: str, base_url: str, no_requests: list[str]
) -> None:
    client = OrthancClient(url, "user", "secret")

    assert client.url == base_url
    assert no_requests == []


def test_insecure_flag_allows_and_warns(
    no_requests: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="workbench.orthanc.client"):
        client = OrthancClient(
            "http://example.org:8042", "user", "secret", insecure=True
        )

    assert client.url == "http://example.org:8042"
    assert "INSECURE CONNECTION" in caplog.text
    assert "secret" not in caplog.text
    assert no_requests == []


def test_is_loopback_url() -> None:
    assert is_loopback_url("http://127.0.0.1:8042")
    assert is_loopback_url("http://[::ffff:127.0.0.1]:8042")
    assert not is_loopback_url("http://128.0.0.1:8042")
    assert not is_loopback_url("http://example.org")


def test_credentials_in_url_are_taken_out(no_requests: list[str]) -> None:
    client = OrthancClient("http://alice:s3cret@127.0.0.1:8042/")

    assert client.url == "http://127.0.0.1:8042"
    assert client.username == "alice"
    assert client.connection_args()["password"] == "s3cret"
    assert "s3cret" not in repr(client)


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1", "127.0.0.1:8042", "http://127.0.0.1:8042/?a=1"]
)
def test_invalid_url_rejected(url: str, no_requests: list[str]) -> None:
    with pytest.raises(ConfigurationError):
        OrthancClient(url)


def test_username_without_password_rejected(no_requests: list[str]) -> None:
    with pytest.raises(ConfigurationError, match="both"):
        OrthancClient("http://127.0.0.1:8042", "user")


def test_date_wildcard_rejected_before_request(no_requests: list[str]) -> None:
    client = OrthancClient("http://127.0.0.1:8042", "user", "secret")

    with pytest.raises(ConfigurationError) as by_keyword:
        client.find("Study", {"StudyDate": "2004*"})
    with pytest.raises(ConfigurationError) as by_tag:
        client.find("Study", {"0008,0020": "*"})
    with pytest.raises(ConfigurationError) as birth_date:
        client.find("Patient", {"PatientBirthDate": "1970*"})

    assert "20190101-20191231" in str(by_keyword.value)
    assert "VR DA" in str(by_tag.value)
    assert "1970" not in str(birth_date.value)
    assert no_requests == []


def test_invalid_level_and_id_rejected(no_requests: list[str]) -> None:
    client = OrthancClient("http://127.0.0.1:8042", "user", "secret")
    study_uid = "1.3.6.1.4.1.5962.1.2.1.20040119072730.12322"

    with pytest.raises(ConfigurationError, match="unknown Orthanc level"):
        client.find("Frame", {})
    with pytest.raises(ConfigurationError) as invalid_id:
        client.series(study_uid)
    with pytest.raises(ConfigurationError):
        client.delete("Patient", "../system")

    assert study_uid not in str(invalid_id.value)
    assert no_requests == []


# Retries, against a small scripted HTTP server.


class ScriptedServer:
    """An HTTP server on 127.0.0.1 that responds with a scripted list of statuses."""

    def __init__(self, statuses: list[int], port: int = 0) -> None:
        self.statuses = list(statuses)
        self.requests: list[tuple[str, str, float]] = []
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                scripted.requests.append((self.command, self.path, time.monotonic()))
                status = scripted.statuses.pop(0) if scripted.statuses else 200
                body = json.dumps({"Version": "test", "Name": "scripted"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        # http.server dispatches on methods named do_<HTTP method>.
        for method in ("GET", "POST", "DELETE"):
            setattr(Handler, f"do_{method}", Handler.answer)
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()


def test_get_retried_after_503(caplog: pytest.LogCaptureFixture) -> None:
    with ScriptedServer([503, 503, 200]) as server:
        client = OrthancClient(server.url, "user", "secret", retries=5, backoff=0.05)
        with caplog.at_level(logging.WARNING, logger="workbench.orthanc.client"):
            system = client.system()

    assert system["Version"] == "test"
    assert [path for _, path, _ in server.requests] == ["/system"] * 3
    first_wait = server.requests[1][2] - server.requests[0][2]
    second_wait = server.requests[2][2] - server.requests[1][2]
    assert first_wait >= 0.025
    assert second_wait >= 0.05
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2
    assert "secret" not in caplog.text


def test_find_retried_after_502() -> None:
    with ScriptedServer([502, 200]) as server:
        client = OrthancClient(server.url, "user", "secret", backoff=0.01)
        client.find("Study", {"Modality": "CT"}, expand=False)

    assert [(m, p) for m, p, _ in server.requests] == [("POST", "/tools/find")] * 2


def test_retries_exhausted_raise_connection_error() -> None:
    with ScriptedServer([503] * 10) as server:
        client = OrthancClient(server.url, "user", "secret", retries=2, backoff=0.01)
        with pytest.raises(OrthancConnectionError) as failure:
            client.statistics()

    assert len(server.requests) == 3
    assert failure.value.status == 503
    assert failure.value.url == f"{server.url}/statistics"
    assert "secret" not in str(failure.value)


def test_delete_not_retried() -> None:
    with ScriptedServer([503, 200]) as server:
        client = OrthancClient(server.url, "user", "secret", backoff=0.01)
        with pytest.raises(OrthancConnectionError):
            client.delete("Study", "8a8cf898-ca27c490-d0c7058c-929d0581-2bbf104d")

    assert len(server.requests) == 1


def test_connection_refused_after_retries() -> None:
    port = free_port()
    client = OrthancClient(
        f"http://127.0.0.1:{port}", "user", "secret", retries=2, backoff=0.01
    )

    with pytest.raises(OrthancConnectionError) as failure:
        client.system()

    assert "after 3 attempt(s)" in str(failure.value)
    assert f"127.0.0.1:{port}" in str(failure.value)
    assert failure.value.status is None
    assert "secret" not in str(failure.value)


def test_request_waits_for_late_server() -> None:
    port = free_port()
    client = OrthancClient(f"http://127.0.0.1:{port}", "user", "secret", backoff=0.2)
    started: list[ScriptedServer] = []
    starter = threading.Timer(
        0.3, lambda: started.append(ScriptedServer([], port=port).__enter__())
    )
    starter.start()
    try:
        system = client.system()
    finally:
        starter.join()
        for server in started:
            server.__exit__()

    assert system["Name"] == "scripted"
    assert len(started[0].requests) == 1


# Pickling and threads.


def test_pickled_client_reconnects(orthanc: OrthancServer) -> None:
    client = orthanc.client(timeout=10.0, retries=1)
    client.system()

    # The test unpickles only what it pickled itself.
    copy = pickle.loads(pickle.dumps(client))

    assert copy.connection_args() == client.connection_args()
    assert copy.system()["Version"] == "1.10.1"


def test_client_shared_by_threads(orthanc: OrthancServer) -> None:
    client = orthanc.client()
    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(lambda _: client.system()["Version"], range(32)))
    client.close()

    assert versions == ["1.10.1"] * 32
    assert client.system()["Version"] == "1.10.1"


# Unauthenticated servers.


@pytest.fixture
def open_orthanc(tmp_path: Path) -> Iterator[str]:
    """An Orthanc with authentication off, in its own home; stopped after the test."""
    home = tmp_path / "open-orthanc"
    home.mkdir()
    port = free_port()
    config = {
        "Name": "open",
        "StorageDirectory": str(home / "storage"),
        "IndexDirectory": str(home / "index"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomServerEnabled": False,
        "Plugins": [],
    }
    (home / "orthanc.json").write_text(json.dumps(config))
    url = f"http://127.0.0.1:{port}"
    with (home / "orthanc.log").open("wb") as log_file:
        process = subprocess.Popen(
            [find_orthanc_executable(), str(home / "orthanc.json")],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_until(lambda: requests.get(f"{url}/system", timeout=1).ok)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def wait_until(ready: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if ready():
                return
        except requests.RequestException:
            pass
        time.sleep(0.05)
    raise TimeoutError("the server did not become ready")


@pytest.mark.orthanc
def test_unauthenticated_server_warns(
    open_orthanc: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="workbench.orthanc.client"):
        anonymous = OrthancClient(open_orthanc).check_server()
        with_login = OrthancClient(open_orthanc, "someone", "anything").check_server()

    warnings = [r for r in caplog.records if "SECURITY WARNING" in r.getMessage()]
    assert anonymous.accepts_unauthenticated is True
    assert with_login.accepts_unauthenticated is True
    assert anonymous.name == "open"
    assert len(warnings) == 2
    assert all(r.levelno == logging.WARNING for r in warnings)
    assert "CVE-2025-0896" in warnings[0].getMessage()


def test_hardened_server_does_not_warn(
    orthanc: OrthancServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="workbench.orthanc.client"):
        check = orthanc.client().check_server()

    assert check.accepts_unauthenticated is False
    assert "SECURITY WARNING" not in caplog.text


# REST calls against the real Orthanc.


def test_upload_and_fetch_byte_identical(orthanc: OrthancServer) -> None:
    client = orthanc.client()
    original = CT_SMALL.read_bytes()

    first = client.upload(original)
    second = client.upload(original)
    instances = client.series_instances(first["ParentSeries"])
    fetched = client.instance_file(first["ID"])

    assert first["Status"] == "Success"
    assert second["Status"] == "AlreadyStored"
    assert second["ID"] == first["ID"]
    assert instances == [first["ID"]]
    assert fetched == original
    assert client.series(first["ParentSeries"])["ParentStudy"] == first["ParentStudy"]
    assert client.patients() == [first["ParentPatient"]]


def test_find_by_modality(orthanc: OrthancServer) -> None:
    client = orthanc.client()
    ct = client.upload(CT_SMALL.read_bytes())
    mr = client.upload(MR_SMALL.read_bytes())

    mr_series = client.find("Series", {"Modality": "MR"})
    ct_ids = client.find("series", {"Modality": "CT"}, expand=False)
    both = client.find("Series", {"Modality": "*"}, expand=False)
    limited = client.find("Series", {}, expand=False, limit=1)

    assert [series["ID"] for series in mr_series] == [mr["ParentSeries"]]
    assert mr_series[0]["MainDicomTags"]["Modality"] == "MR"
    assert ct_ids == [ct["ParentSeries"]]
    assert sorted(both) == sorted([ct["ParentSeries"], mr["ParentSeries"]])
    assert len(limited) == 1


def test_find_by_study_date_range(orthanc: OrthancServer) -> None:
    client = orthanc.client()
    ct = client.upload(CT_SMALL.read_bytes())
    mr = client.upload(MR_SMALL.read_bytes())

    january = client.find("Study", {"StudyDate": "20040101-20040131"}, expand=False)
    from_march = client.find("Study", {"StudyDate": "20040301-"}, expand=False)
    year = client.find("Study", {"StudyDate": "20040101-20041231"}, expand=False)
    none = client.find("Study", {"StudyDate": "19900101-19901231"}, expand=False)

    assert january == [ct["ParentStudy"]]
    assert from_march == [mr["ParentStudy"]]
    assert sorted(year) == sorted([ct["ParentStudy"], mr["ParentStudy"]])
    assert none == []


def test_server_rejects_date_wildcard(orthanc: OrthancServer) -> None:
    # Sent without the client's own check, to pin down Orthanc 1.10's behaviour
    # that the check exists for.
    response = requests.post(
        f"{orthanc.url}/tools/find",
        json={"Level": "Study", "Query": {"StudyDate": "2004*"}},
        auth=(orthanc.username, orthanc.password),
        timeout=10,
    )

    assert response.status_code == 400
    assert "Wildcards are not allowed" in response.json()["Details"]


def test_upload_of_non_dicom_rejected_with_400(orthanc: OrthancServer) -> None:
    with pytest.raises(OrthancError) as rejected:
        orthanc.client().upload(b"this is a text file, not DICOM")

    assert rejected.value.status == 400
    assert "Bad file format" in str(rejected.value)
    assert rejected.value.url == f"{orthanc.url}/instances"


def test_upload_without_study_uid_rejected(orthanc: OrthancServer) -> None:
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = generate_uid()
    dataset.PatientID = "DOE-0001"
    dataset.PatientName = "DOE^JANE"
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)

    with pytest.raises(OrthancError) as rejected:
        orthanc.client().upload(buffer.getvalue())

    assert rejected.value.status == 404
    assert "StudyInstanceUID" in str(rejected.value)


def test_delete_patient(orthanc: OrthancServer) -> None:
    client = orthanc.client()
    answer = client.upload(CT_SMALL.read_bytes())

    client.delete("Patient", answer["ParentPatient"])

    assert client.patients() == []
    assert client.statistics()["CountInstances"] == 0
    with pytest.raises(OrthancError) as missing:
        client.instance(answer["ID"])
    assert missing.value.status == 404


# Credentials from the environment.


def test_from_environment_prefers_variables(
    orthanc: OrthancServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORTHANC_USERNAME", "from-environment")
    monkeypatch.setenv("ORTHANC_PASSWORD", "secret")

    client = OrthancClient.from_environment(orthanc.url, home=orthanc.home)

    assert client.username == "from-environment"


def test_from_environment_reads_local_credentials(
    orthanc: OrthancServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ORTHANC_USERNAME", raising=False)
    monkeypatch.delenv("ORTHANC_PASSWORD", raising=False)
    localhost_url = orthanc.url.replace("127.0.0.1", "localhost")

    default = OrthancClient.from_environment(home=orthanc.home)
    by_name = OrthancClient.from_environment(localhost_url, home=orthanc.home)
    other_port = OrthancClient.from_environment("http://127.0.0.1:1", home=orthanc.home)

    assert default.url == orthanc.url
    assert default.username == orthanc.username
    assert default.check_server().version == "1.10.1"
    assert by_name.username == orthanc.username
    assert other_port.username is None


def test_from_environment_needs_both_variables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORTHANC_USERNAME", "someone")
    monkeypatch.delenv("ORTHANC_PASSWORD", raising=False)

    with pytest.raises(ConfigurationError, match="ORTHANC_PASSWORD"):
        OrthancClient.from_environment("http://127.0.0.1:8042", home=tmp_path)


def test_from_environment_without_url_or_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("ORTHANC_USERNAME", raising=False)
    monkeypatch.delenv("ORTHANC_PASSWORD", raising=False)

    with pytest.raises(ConfigurationError, match="workbench orthanc start"):
        OrthancClient.from_environment(home=tmp_path)
