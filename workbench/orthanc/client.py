"""A careful client for the REST API of Orthanc, the archive that studies come from.

:class:`OrthancClient` wraps :mod:`requests` with the habits a client of a clinical
archive needs:

- Plain ``http://`` is accepted only for loopback hosts (127.0.0.0/8, ``::1``,
  ``localhost``). Any other host needs ``https://`` or an explicit
  ``insecure=True``, so that credentials and patient data do not cross a network
  unencrypted by accident.
- :meth:`OrthancClient.check_server` warns loudly when the server responds to requests
  without credentials. Orthanc servers left without authentication have exposed
  patient data: CVE-2025-0896 covers Orthanc before 1.5.8, which did not turn on
  authentication when remote access was enabled.
- Idempotent requests (GET and ``POST /tools/find``) and uploads are retried on
  connection errors, timeouts and HTTP 502, 503 and 504, with exponential back-off
  and jitter.
- Errors are :class:`~workbench.errors.OrthancError` subclasses that carry the URL
  (never the credentials) and the HTTP status.

A client can be shared by threads (each thread gets its own ``requests.Session``)
and pickled into Dask workers: the pickle contains the connection settings, password
included, and the worker opens its own sessions.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, overload
from urllib.parse import urlsplit, urlunsplit

import requests
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.tag import Tag

from workbench import __version__
from workbench.errors import (
    ConfigurationError,
    InsecureConnectionError,
    OrthancAuthError,
    OrthancConnectionError,
    OrthancError,
)

__all__ = ["LEVELS", "OrthancClient", "ServerCheck", "is_loopback_url"]

log = logging.getLogger(__name__)

# Orthanc's resource levels, and the REST collection of each.
LEVELS = {
    "Patient": "patients",
    "Study": "studies",
    "Series": "series",
    "Instance": "instances",
}
RETRY_STATUSES = frozenset({502, 503, 504})
# Orthanc resource ids are SHA-1 digests written as five dash-separated groups.
ORTHANC_ID = re.compile(r"^[0-9a-f]{8}(-[0-9a-f]{8}){4}$")
# Value representations on which Orthanc 1.10 rejects * and ? wildcards in
# /tools/find (HTTP 400, "Wildcards are not allowed on tag"). It accepts ranges.
RANGE_MATCHED_VRS = frozenset({"DA", "DT", "TM"})
MAX_BACKOFF_SECONDS = 30.0
MAX_CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class ServerCheck:
    """Result of :meth:`OrthancClient.check_server`."""

    name: str
    version: str
    accepts_unauthenticated: bool


def is_loopback_url(url: str) -> bool:
    """Return whether ``url`` names this machine (127.0.0.0/8, ``::1``, localhost)."""
    return _is_loopback_host(urlsplit(url).hostname)


class OrthancClient:
    """A client for one Orthanc server's REST API.

    Parameters
    ----------
    url
        The server's base URL, such as ``http://127.0.0.1:8042`` or
        ``https://pacs.example.org/orthanc``. Credentials written into the URL
        (``https://user:password@host``) are taken out of it and used when
        ``username`` and ``password`` are not given.
    username, password
        HTTP basic-authentication credentials; give both or neither.
    insecure
        Allow plain ``http://`` to a host other than this machine. A warning is
        logged, because the password and the DICOM data travel unencrypted.
    timeout
        Seconds to wait for the server's response to one request. Connecting waits
        at most 10 s of that.
    retries
        How many times a failed idempotent request or upload is repeated.
    backoff
        Seconds before the first retry; each next wait doubles, up to 30 s, and is
        drawn at random between half and all of that value (jitter).

    Raises
    ------
    InsecureConnectionError
        For a plain-HTTP URL to another host without ``insecure=True``. No request
        has been sent at that point.
    ConfigurationError
        For a URL that is not http or https, or only one of username and password.
    """

    url: str
    username: str | None
    insecure: bool
    timeout: float
    retries: int
    backoff: float
    _password: str | None
    _loopback: bool
    _local: threading.local
    _sessions: list[requests.Session]
    _sessions_lock: threading.Lock

    def __init__(
        self,
        url: str,
        username: str | None = None,
        password: str | None = None,
        *,
        insecure: bool = False,
        timeout: float = 60.0,
        retries: int = 5,
        backoff: float = 0.5,
    ) -> None:
        self._configure(
            url,
            username,
            password,
            insecure=insecure,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
            warn_insecure=True,
        )

    @classmethod
    def from_environment(
        cls,
        url: str | None = None,
        *,
        home: Path | None = None,
        insecure: bool = False,
        **options: Any,
    ) -> OrthancClient:
        """Return a client whose credentials come from the environment.

        Credentials are taken, in order, from ``ORTHANC_USERNAME`` and
        ``ORTHANC_PASSWORD``, or from the local Orthanc's ``credentials.json`` when
        its URL names the same server as ``url``. Otherwise the client has none,
        and :meth:`check_server` explains how to supply them.

        Parameters
        ----------
        url
            The server's URL; by default the local Orthanc's.
        home
            The local Orthanc home (default: ``<workbench home>/orthanc``).
        insecure, options
            Passed to :class:`OrthancClient`.

        Raises
        ------
        ConfigurationError
            When only one of the two variables is set, or ``url`` is None and no
            local Orthanc credentials exist.
        """
        username = os.environ.get("ORTHANC_USERNAME") or None
        password = os.environ.get("ORTHANC_PASSWORD") or None
        if (username is None) != (password is None):
            raise ConfigurationError(
                "only one of ORTHANC_USERNAME and ORTHANC_PASSWORD is set; set both,"
                " or neither to use the local Orthanc's credentials.json"
            )
        local = _local_credentials(home)
        if url is None:
            if local is None:
                raise ConfigurationError(
                    "no Orthanc URL was given and the local Orthanc has no"
                    " credentials.json; pass --url, or start the local Orthanc with"
                    " `workbench orthanc start`"
                )
            url = local.url
        if username is None and local is not None and _same_server(local.url, url):
            username, password = local.username, local.password
        return cls(url, username, password, insecure=insecure, **options)

    # Connection settings, pickling and clean-up.

    def connection_args(self) -> dict[str, Any]:
        """Return the keyword arguments that rebuild this client, password included."""
        return {
            "url": self.url,
            "username": self.username,
            "password": self._password,
            "insecure": self.insecure,
            "timeout": self.timeout,
            "retries": self.retries,
            "backoff": self.backoff,
        }

    def __getstate__(self) -> dict[str, Any]:
        return self.connection_args()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # The insecure-transport warning was logged where the client was built.
        self._configure(**state, warn_insecure=False)

    def __repr__(self) -> str:
        return f"OrthancClient(url={self.url!r}, username={self.username!r})"

    def close(self) -> None:
        """Close the HTTP sessions of every thread that used this client."""
        with self._sessions_lock:
            sessions, self._sessions = self._sessions, []
        for session in sessions:
            session.close()
        self._local = threading.local()

    def __enter__(self) -> OrthancClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # Server checks.

    def check_server(self) -> ServerCheck:
        """Check that the server responds and accepts this client's credentials.

        ``GET /system`` is first sent without credentials. When the server responds
        to it, a WARNING is logged, because anyone who can reach the server can read,
        change and delete its studies, and the returned check has
        ``accepts_unauthenticated`` set. The request is then repeated with the
        credentials, if the client has any.

        Raises
        ------
        OrthancAuthError
            When the server requires credentials and none were given, or rejects
            them.
        OrthancConnectionError
            When the server does not respond.
        """
        # Step 1: without credentials.
        anonymous = self._request("GET", "/system", retry=True, authenticate=False)
        accepts_unauthenticated = anonymous.status_code == 200
        system: dict[str, Any] = {}
        if accepts_unauthenticated:
            log.warning(
                "SECURITY WARNING: Orthanc at %s responds to requests without"
                " credentials, so anyone who can reach it can read, change and delete"
                " every study it stores. Set AuthenticationEnabled to true and add"
                " RegisteredUsers in its configuration. Orthanc servers left without"
                " authentication have exposed patient data (CVE-2025-0896).",
                self.url,
            )
            system = self._json(anonymous, "GET /system")
        elif anonymous.status_code != 401:
            self._raise_for_status(anonymous, "GET /system")

        # Step 2: with credentials.
        if self.username is not None:
            response = self._request("GET", "/system", retry=True)
            self._raise_for_status(response, "GET /system")
            system = self._json(response, "GET /system")
        elif not accepts_unauthenticated:
            raise OrthancAuthError(
                self._auth_help(), url=f"{self.url}/system", status=401
            )

        if "Version" not in system:
            raise OrthancError(
                f"the server at {self.url} responded to GET /system without a Version;"
                " check that the URL names an Orthanc server",
                url=f"{self.url}/system",
            )
        return ServerCheck(
            name=str(system.get("Name", "")),
            version=str(system["Version"]),
            accepts_unauthenticated=accepts_unauthenticated,
        )

    def system(self) -> dict[str, Any]:
        """Return ``GET /system``: the server's name, version and settings."""
        return self.get_json("/system")

    def statistics(self) -> dict[str, Any]:
        """Return ``GET /statistics``: resource counts and disk use."""
        return self.get_json("/statistics")

    # Resources.

    def patients(self) -> list[str]:
        """Return the Orthanc ids of all patients."""
        return list(self.get_json("/patients"))

    def studies(self) -> list[str]:
        """Return the Orthanc ids of all studies."""
        return list(self.get_json("/studies"))

    def study(self, study_id: str) -> dict[str, Any]:
        """Return the study resource: main DICOM tags, parent patient, series ids."""
        return self.get_json(_resource_path("Study", study_id))

    def series(self, series_id: str) -> dict[str, Any]:
        """Return the series resource: main DICOM tags, parent study, instance ids."""
        return self.get_json(_resource_path("Series", series_id))

    def series_instances(self, series_id: str) -> list[str]:
        """Return the Orthanc ids of the instances of a series.

        The order is Orthanc's, which is not the InstanceNumber order.
        """
        return [str(instance) for instance in self.series(series_id)["Instances"]]

    def instance(self, instance_id: str) -> dict[str, Any]:
        """Return the instance resource: main DICOM tags, parent series, file size."""
        return self.get_json(_resource_path("Instance", instance_id))

    def instance_file(self, instance_id: str) -> bytes:
        """Return the stored DICOM file of an instance, byte for byte.

        The request asks for no HTTP compression: Orthanc would otherwise deflate
        every file it sends, which costs it about 5 ms of CPU for a 128 KiB CT
        slice (measured here: 143 files/s with compression, 1058 without, on
        loopback), while pixel data shrinks little.
        """
        path = _resource_path("Instance", instance_id) + "/file"
        response = self._request(
            "GET", path, retry=True, headers={"Accept-Encoding": "identity"}
        )
        self._raise_for_status(response, f"GET {path}")
        return response.content

    def get_json(self, path: str) -> Any:
        """Send ``GET path`` (retried when transient) and return the decoded JSON.

        ``path`` is a REST route such as ``/studies/{id}/shared-tags``.
        """
        if not path.startswith("/"):
            raise ConfigurationError(
                f"Orthanc REST path {path!r} must start with '/', as in '/system'"
            )
        response = self._request("GET", path, retry=True)
        self._raise_for_status(response, f"GET {path}")
        return self._json(response, f"GET {path}")

    def upload(self, data: bytes) -> dict[str, Any]:
        """Store one DICOM Part 10 file in Orthanc (``POST /instances``).

        An upload is retried like an idempotent request: Orthanc stores an instance
        once per SOP Instance UID and returns ``AlreadyStored`` for a repeat.

        Returns
        -------
        dict
            Orthanc's response: ``ID`` (the instance id), ``ParentPatient``,
            ``ParentStudy``, ``ParentSeries``, ``Path`` and ``Status``
            (``"Success"`` or ``"AlreadyStored"``).

        Raises
        ------
        OrthancError
            When Orthanc rejects the file, with Orthanc's reason in the message:
            ``status`` 400 for a file it cannot parse, 404 for one that lacks an
            identifying attribute.
        """
        response = self._request(
            "POST",
            "/instances",
            retry=True,
            data=data,
            headers={"Content-Type": "application/dicom"},
        )
        hint = ""
        if response.status_code == 404:
            hint = (
                "; the instance lacks an attribute Orthanc indexes it by, such as"
                " StudyInstanceUID, SeriesInstanceUID or SOPInstanceUID"
            )
        self._raise_for_status(response, f"upload of {len(data)} bytes", hint=hint)
        answer = self._json(response, "POST /instances")
        if not isinstance(answer, dict):
            raise OrthancError(
                f"Orthanc responded to an upload with a {type(answer).__name__}, not a"
                " JSON object; the body was probably not a single DICOM file",
                url=f"{self.url}/instances",
                status=response.status_code,
            )
        return answer

    def delete(self, level: str, resource_id: str) -> dict[str, Any]:
        """Delete a patient, study, series or instance and everything below it.

        Not retried: when a response is lost, a repeat would fail with 404.
        """
        path = _resource_path(_level_name(level), resource_id)
        response = self._request("DELETE", path, retry=False)
        self._raise_for_status(response, f"DELETE {path}")
        answer = self._json(response, f"DELETE {path}")
        return answer if isinstance(answer, dict) else {}

    # Queries.

    @overload
    def find(
        self,
        level: str,
        query: Mapping[str, str],
        *,
        expand: Literal[True] = ...,
        limit: int | None = None,
    ) -> list[dict[str, Any]]: ...

    @overload
    def find(
        self,
        level: str,
        query: Mapping[str, str],
        *,
        expand: Literal[False],
        limit: int | None = None,
    ) -> list[str]: ...

    def find(
        self,
        level: str,
        query: Mapping[str, str],
        *,
        expand: bool = True,
        limit: int | None = None,
    ) -> list[dict[str, Any]] | list[str]:
        """Find resources whose DICOM attributes match ``query`` (``/tools/find``).

        Parameters
        ----------
        level
            ``Patient``, ``Study``, ``Series`` or ``Instance`` (any case).
        query
            DICOM keywords (or ``GGGG,EEEE`` tags) mapped to DICOM matching
            strings, for example ``{"Modality": "MR"}`` or
            ``{"StudyDate": "20190101-20191231"}``. ``*`` and ``?`` wildcards work
            on text attributes. Orthanc 1.10 rejects them on date and time
            attributes (DA, DT, TM) with HTTP 400: use a range such as
            ``20190101-20191231``, ``20190101-`` or ``-20191231``.
        expand
            Return each resource's description rather than only its Orthanc id.
        limit
            Return at most this many resources.

        Raises
        ------
        ConfigurationError
            For an unknown level, a value that is not a string, or a wildcard on a
            date or time attribute. No request is sent then.
        OrthancError
            When Orthanc rejects the query.
        """
        level_name = _level_name(level)
        body: dict[str, Any] = {
            "Level": level_name,
            "Query": _checked_find_query(query),
            "Expand": bool(expand),
        }
        if limit is not None:
            if limit < 1:
                raise ConfigurationError(f"find limit must be at least 1, not {limit}")
            body["Limit"] = int(limit)
        response = self._request("POST", "/tools/find", retry=True, json=body)
        hint = ""
        if (
            response.status_code == 400
            and "wildcard" in _error_detail(response).lower()
        ):
            hint = (
                "; date and time attributes take ranges such as 20190101-20191231,"
                " not wildcards"
            )
        self._raise_for_status(response, f"find at level {level_name}", hint=hint)
        answer = self._json(response, "POST /tools/find")
        return list(answer)

    # HTTP plumbing.

    def _configure(
        self,
        url: str,
        username: str | None,
        password: str | None,
        *,
        insecure: bool,
        timeout: float,
        retries: int,
        backoff: float,
        warn_insecure: bool,
    ) -> None:
        base_url, url_username, url_password = _split_url(url)
        if username is None and password is None and url_username is not None:
            username, password = url_username, url_password or ""
        if (username is None) != (password is None):
            raise ConfigurationError(
                "give both an Orthanc username and a password, or neither"
            )
        if timeout <= 0:
            raise ConfigurationError(f"timeout must be positive, not {timeout}")
        if retries < 0:
            raise ConfigurationError(f"retries must be 0 or more, not {retries}")
        if backoff < 0:
            raise ConfigurationError(f"backoff must be 0 or more, not {backoff}")

        self.url = base_url
        self.username = username
        self._password = password
        self.insecure = insecure
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self._loopback = is_loopback_url(base_url)
        self._check_transport(warn_insecure=warn_insecure)

        self._local = threading.local()
        self._sessions = []
        self._sessions_lock = threading.Lock()

    def _check_transport(self, *, warn_insecure: bool) -> None:
        if urlsplit(self.url).scheme == "https" or self._loopback:
            return
        host = urlsplit(self.url).hostname
        if not self.insecure:
            raise InsecureConnectionError(
                f"rejected plain-HTTP URL {self.url}: {host} is not this machine, so"
                " the password and the DICOM data would cross the network"
                " unencrypted. Use an https:// URL, or pass --insecure"
                " (insecure=True) if the network to the server is trusted",
                url=self.url,
            )
        if warn_insecure:
            log.warning(
                "INSECURE CONNECTION: credentials and DICOM data for %s travel over"
                " plain HTTP without encryption, because insecure=True was given",
                self.url,
            )

    def _session(self) -> requests.Session:
        session: requests.Session | None = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.headers["User-Agent"] = f"workbench/{__version__}"
            # Proxy variables would route loopback requests, and the password,
            # through a proxy.
            session.trust_env = not self._loopback
            with self._sessions_lock:
                self._sessions.append(session)
            self._local.session = session
        return session

    def _request(
        self,
        method: str,
        path: str,
        *,
        retry: bool,
        authenticate: bool = True,
        **kwargs: Any,
    ) -> requests.Response:
        """Send one request, repeating it on transient failures when ``retry``."""
        url = self.url + path
        auth = None
        if authenticate and self.username is not None:
            auth = (self.username, self._password or "")
        attempts = self.retries + 1 if retry else 1
        connect_timeout = min(self.timeout, MAX_CONNECT_TIMEOUT)
        for attempt in range(1, attempts + 1):
            try:
                response = self._session().request(
                    method,
                    url,
                    auth=auth,
                    timeout=(connect_timeout, self.timeout),
                    **kwargs,
                )
            except requests.exceptions.SSLError as exc:
                raise OrthancConnectionError(
                    f"TLS connection to {url} failed: {exc}. Check the server"
                    " certificate, or set REQUESTS_CA_BUNDLE to the file of the"
                    " certificate authority that signed it",
                    url=url,
                ) from exc
            except (requests.ConnectionError, requests.Timeout) as exc:
                if attempt < attempts:
                    self._sleep_before_retry(method, path, attempt, type(exc).__name__)
                    continue
                raise OrthancConnectionError(
                    f"no response from Orthanc at {url} after {attempts} attempt(s):"
                    f" {exc}. Check that the server is running (`workbench orthanc"
                    " status` for the local one) and that the URL is right",
                    url=url,
                ) from exc
            except requests.RequestException as exc:
                raise OrthancError(f"{method} {url} failed: {exc}", url=url) from exc

            if response.status_code in RETRY_STATUSES and attempt < attempts:
                retry_after = _retry_after_seconds(response)
                response.close()
                self._sleep_before_retry(
                    method, path, attempt, f"HTTP {response.status_code}", retry_after
                )
                continue
            log.debug("%s %s: HTTP %d", method, path, response.status_code)
            return response
        raise AssertionError("unreachable: the retry loop returns or raises")

    def _sleep_before_retry(
        self,
        method: str,
        path: str,
        attempt: int,
        reason: str,
        retry_after: float | None = None,
    ) -> None:
        delay = min(MAX_BACKOFF_SECONDS, self.backoff * 2 ** (attempt - 1))
        delay = _jitter.uniform(delay / 2, delay)
        if retry_after is not None:
            delay = max(delay, min(retry_after, MAX_BACKOFF_SECONDS))
        log.warning(
            "Orthanc %s %s failed (%s); retry %d of %d in %.2f s",
            method,
            path,
            reason,
            attempt,
            self.retries,
            delay,
        )
        time.sleep(delay)

    def _raise_for_status(
        self, response: requests.Response, action: str, *, hint: str = ""
    ) -> None:
        status = response.status_code
        if status < 400:
            return
        url = response.url
        detail = _error_detail(response)
        detail_text = f" ({detail})" if detail else ""
        if status == 401:
            raise OrthancAuthError(self._auth_help(), url=url, status=status)
        if status == 403:
            raise OrthancAuthError(
                f"{action} at {self.url} was forbidden (HTTP 403){detail_text}; the"
                f" user {self.username!r} may lack permission for it",
                url=url,
                status=status,
            )
        if status in RETRY_STATUSES:
            raise OrthancConnectionError(
                f"{action} at {self.url} failed: Orthanc or a proxy in front of it is"
                f" unavailable (HTTP {status} {response.reason}){detail_text}, also"
                f" after {self.retries} retries",
                url=url,
                status=status,
            )
        raise OrthancError(
            f"{action} at {self.url} failed: HTTP {status}"
            f" {response.reason}{detail_text}{hint}",
            url=url,
            status=status,
        )

    def _auth_help(self) -> str:
        if self.username is None:
            return (
                f"Orthanc at {self.url} requires a username and password (HTTP 401)"
                " and none were given. Set ORTHANC_USERNAME and ORTHANC_PASSWORD. The"
                " workbench's own Orthanc keeps them in credentials.json in its home"
                " folder, which is read automatically when the URL matches"
            )
        return (
            f"Orthanc at {self.url} rejected the credentials of user"
            f" {self.username!r} (HTTP 401). Check ORTHANC_USERNAME and"
            " ORTHANC_PASSWORD, or the credentials.json of the local Orthanc. Orthanc"
            " also returns 401 to clients on other hosts when its RemoteAccessAllowed"
            " setting is false"
        )

    def _json(self, response: requests.Response, action: str) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise OrthancError(
                f"{action} at {self.url} returned a body that is not JSON; check"
                " that the URL names an Orthanc server",
                url=response.url,
                status=response.status_code,
            ) from exc


_jitter = random.SystemRandom()


def _is_loopback_host(host: str | None) -> bool:
    if not host:
        return False
    host = host.rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _split_url(url: str) -> tuple[str, str | None, str | None]:
    """Return the base URL without credentials, and the credentials it contained."""
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        # The netloc may contain a password: show only scheme and host.
        raise ConfigurationError(
            f"invalid Orthanc URL (scheme {scheme or 'missing'!r}, host"
            f" {parts.hostname or 'missing'!r}): expected http:// or https:// and a"
            " host name, as in http://127.0.0.1:8042"
        )
    if parts.query or parts.fragment:
        raise ConfigurationError(
            "an Orthanc URL takes no query string or fragment; give the server's base"
            " URL, as in https://pacs.example.org/orthanc"
        )
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    base_url = urlunsplit((scheme, netloc, parts.path.rstrip("/"), "", ""))
    return base_url, parts.username, parts.password


def _same_server(first: str, second: str) -> bool:
    """Return whether two URLs name the same server; all loopback names match."""
    a, b = urlsplit(_split_url(first)[0]), urlsplit(_split_url(second)[0])
    default_ports = {"http": 80, "https": 443}
    if a.scheme != b.scheme or a.path != b.path:
        return False
    if (a.port or default_ports[a.scheme]) != (b.port or default_ports[b.scheme]):
        return False
    if _is_loopback_host(a.hostname) and _is_loopback_host(b.hostname):
        return True
    return a.hostname == b.hostname


def _local_credentials(home: Path | None) -> Any:
    from workbench.home import find_home
    from workbench.orthanc.server import read_credentials

    if home is None:
        try:
            home = find_home() / "orthanc"
        except ConfigurationError:
            return None
    return read_credentials(home)


def _level_name(level: str) -> str:
    names = {name.lower(): name for name in LEVELS}
    names.update({collection: name for name, collection in LEVELS.items()})
    name = names.get(str(level).lower())
    if name is None:
        raise ConfigurationError(
            f"unknown Orthanc level {level!r}; expected Patient, Study, Series or"
            " Instance"
        )
    return name


def _resource_path(level: str, resource_id: str) -> str:
    if not isinstance(resource_id, str) or not ORTHANC_ID.match(resource_id):
        # The value is not echoed: it may be a DICOM UID of the source data.
        raise ConfigurationError(
            f"invalid Orthanc {level.lower()} id: expected five groups of 8 hex"
            " digits separated by dashes, as Orthanc returns them. A DICOM UID is not"
            " an Orthanc id; look the resource up with find()"
        )
    return f"/{LEVELS[level]}/{resource_id}"


def _checked_find_query(query: Mapping[str, str]) -> dict[str, str]:
    checked: dict[str, str] = {}
    for key, value in query.items():
        if not isinstance(value, str):
            raise ConfigurationError(
                f"find query value for {key} is a {type(value).__name__}; Orthanc"
                " expects a string in DICOM matching syntax"
            )
        vr = _dictionary_vr(key)
        if vr in RANGE_MATCHED_VRS and ("*" in value or "?" in value):
            # The value is not echoed: it may be a birth date.
            raise ConfigurationError(
                f"find query on {key}: Orthanc 1.10 rejects * and ? wildcards on"
                f" date and time attributes ({key} has VR {vr}) with HTTP 400. Use"
                " a range, such as 20190101-20191231 or 20190101- for a date and"
                f" 080000-120000 for a time, or leave {key} out of the query"
            )
        checked[key] = value
    return checked


def _dictionary_vr(key: str) -> str | None:
    """Return the VR of a DICOM keyword or ``GGGG,EEEE`` tag, or None if unknown."""
    tag = tag_for_keyword(key)
    if tag is None:
        digits = key.strip("()").replace(",", "").replace(" ", "")
        if len(digits) != 8:
            return None
        try:
            tag = Tag(int(digits, 16))
        except ValueError:
            return None
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def _error_detail(response: requests.Response) -> str:
    """Return Orthanc's error message and details, or the start of a non-JSON body."""
    try:
        content = response.json()
    except ValueError:
        return response.text.strip()[:200]
    if not isinstance(content, dict):
        return ""
    parts = [str(content[key]) for key in ("Message", "Details") if content.get(key)]
    return ": ".join(parts)


def _retry_after_seconds(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
