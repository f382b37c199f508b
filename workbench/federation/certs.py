"""Certificates and keys of a federation: a CA, the SuperLink's TLS pair, site keys.

:func:`issue_certificates` writes one folder for the coordinator and one per site::

    certs/
      ca.pem  ca.key            the federation's certificate authority (keep ca.key
                                offline: whoever holds it can impersonate the server)
      server.pem  server.key    the SuperLink's TLS certificate, valid for 127.0.0.1,
                                localhost and every --host given
      sites.json                site names and public keys, registered at the SuperLink
      site-a/
        ca.pem                  to verify the SuperLink's certificate
        site.key  site.pub      the SuperNode's authentication key pair (NIST P-384,
                                OpenSSH format, as Flower's SuperNode reads it)
        site.json               site name, federation, SuperLink names, Flower version

Only ``site-a/`` goes to site A. Private keys are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
import re
import socket
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.errors import ConfigurationError

__all__ = [
    "SITE_NAME_PATTERN",
    "SiteKeys",
    "check_server_certificate",
    "issue_certificates",
    "key_fingerprint",
    "read_site_bundle",
]

log = logging.getLogger(__name__)

SITE_NAME_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
CA_DAYS = 3650
SERVER_DAYS = 825


@dataclass(frozen=True)
class SiteKeys:
    """The files a site needs to join, in its own folder."""

    name: str
    folder: Path

    @property
    def ca(self) -> Path:
        """CA certificate that signed the SuperLink's certificate."""
        return self.folder / "ca.pem"

    @property
    def private_key(self) -> Path:
        """The SuperNode's authentication key (OpenSSH, P-384)."""
        return self.folder / "site.key"

    @property
    def public_key(self) -> Path:
        """The public half of :attr:`private_key`, registered at the SuperLink."""
        return self.folder / "site.pub"

    @property
    def bundle(self) -> Path:
        """``site.json``: site name, federation, SuperLink names, Flower version."""
        return self.folder / "site.json"


def check_site_name(name: str) -> str:
    """Return ``name`` if it is a valid site name, else raise ConfigurationError."""
    if not SITE_NAME_PATTERN.fullmatch(name):
        raise ConfigurationError(
            f"site name {name!r} is invalid; use lowercase letters, digits and"
            " hyphens, starting with a letter or digit, at most 63 characters"
        )
    return name


def issue_certificates(
    out: str | os.PathLike[str],
    sites: Sequence[str],
    *,
    hosts: Sequence[str] = (),
    federation: str = "default",
) -> dict[str, Any]:
    """Write a CA, the SuperLink's TLS certificate and one key pair per site.

    Parameters
    ----------
    out
        Output folder; created if missing. An existing CA in it is reused, so
        sites can be added later without re-issuing the others.
    sites
        Site names (lowercase letters, digits, hyphens).
    hosts
        Extra names or IP addresses of the SuperLink, besides 127.0.0.1 and
        localhost, written into the server certificate.
    federation
        The federation's name, written into each site's ``site.json``.

    Returns
    -------
    dict
        ``ca``, ``server_certificate``, ``server_key``, ``hosts`` and ``sites``
        (name to folder).

    Raises
    ------
    ConfigurationError
        For an invalid site name, a duplicate, or no site at all.
    """
    import flwr
    from cryptography.hazmat.primitives.asymmetric import ec

    if not sites:
        raise ConfigurationError("no site given; name at least one site")
    names = [check_site_name(name) for name in sites]
    if len(set(names)) != len(names):
        raise ConfigurationError(f"site names must be unique, got {names}")
    folder = Path(out).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    all_hosts = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))

    # 1. The CA, reused when present.
    ca_key, ca_certificate = _load_or_create_ca(folder)

    # 2. The SuperLink's certificate, re-issued so that new host names take effect.
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_certificate = _sign_server_certificate(
        server_key, ca_key, ca_certificate, all_hosts
    )
    _write_key(folder / "server.key", server_key)
    _write_certificate(folder / "server.pem", server_certificate)

    # 3. One authentication key pair and bundle per site.
    registry = _read_registry(folder)
    for name in names:
        keys = SiteKeys(name, folder / name)
        keys.folder.mkdir(exist_ok=True)
        os.chmod(keys.folder, 0o700)
        if not keys.private_key.is_file():
            site_key = ec.generate_private_key(ec.SECP384R1())
            _write_ssh_key_pair(site_key, keys.private_key, keys.public_key, name)
        _write_certificate(keys.ca, ca_certificate)
        public_text = keys.public_key.read_text(encoding="ascii").strip()
        registry[name] = {
            "public_key": public_text,
            "fingerprint": key_fingerprint(public_text),
        }
        bundle = {
            "site": name,
            "federation": federation,
            "superlink_names": all_hosts,
            "flwr_version": flwr.__version__,
            "fingerprint": registry[name]["fingerprint"],
        }
        keys.bundle.write_text(json.dumps(bundle, indent=2) + "\n", encoding="utf-8")
    (folder / "sites.json").write_text(
        json.dumps(registry, indent=2, sort_keys=True) + "\n", encoding="utf-8"
    )
    log.info(
        "issued certificates for %d sites in %s (server names: %s)",
        len(names),
        folder,
        ", ".join(all_hosts),
    )
    return {
        "ca": str(folder / "ca.pem"),
        "server_certificate": str(folder / "server.pem"),
        "server_key": str(folder / "server.key"),
        "hosts": all_hosts,
        "sites": {name: str(folder / name) for name in names},
    }


def read_site_bundle(folder: str | os.PathLike[str]) -> tuple[SiteKeys, dict[str, Any]]:
    """Return a site folder's files and its ``site.json``.

    Raises
    ------
    ConfigurationError
        When a file is missing or ``site.json`` is not readable.
    """
    path = Path(folder).expanduser().resolve()
    try:
        bundle = json.loads((path / "site.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"site folder {path} has no readable site.json ({exc}); pass the folder"
            " that `workbench federation certs` wrote for this site"
        ) from exc
    keys = SiteKeys(str(bundle.get("site", path.name)), path)
    for required in (keys.ca, keys.private_key, keys.public_key):
        if not required.is_file():
            raise ConfigurationError(
                f"site folder {path} lacks {required.name}; copy the whole folder"
                " that `workbench federation certs` wrote for this site"
            )
    return keys, bundle


def key_fingerprint(public_key_text: str) -> str:
    """Return ``sha256:`` and the hex digest of an OpenSSH public key's blob."""
    import base64

    parts = public_key_text.split()
    if len(parts) < 2:
        raise ConfigurationError("public key is not in OpenSSH format")
    blob = base64.b64decode(parts[1])
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def public_key_of(private_key_path: Path) -> str:
    """Return the OpenSSH public key text derived from an OpenSSH private key file."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_private_key(private_key_path.read_bytes(), None)
    return (
        key.public_key()
        .public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        .decode("ascii")
    )


def check_server_certificate(
    ca: str | os.PathLike[str], host: str, port: int, timeout: float = 10.0
) -> dict[str, Any]:
    """Connect to ``host:port`` over TLS and verify its certificate and name.

    Returns
    -------
    dict
        ``subject_alt_names`` and ``not_after`` of the server certificate.

    Raises
    ------
    ConfigurationError
        When the connection fails, the certificate is not signed by ``ca``, or
        it is not valid for ``host``; the message names the failed check.
    """
    context = ssl.create_default_context(cafile=os.fspath(ca))
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            context.wrap_socket(raw, server_hostname=host) as tls,
        ):
            certificate = tls.getpeercert()
    except ssl.SSLCertVerificationError as exc:
        raise ConfigurationError(
            f"the SuperLink at {host}:{port} presents a certificate that fails"
            f" verification against {ca}: {exc.verify_message}; ask the coordinator"
            f" for a certificate issued for {host!r} (`workbench federation certs"
            f" --host {host}`)"
        ) from exc
    except OSError as exc:
        raise ConfigurationError(
            f"cannot open a TLS connection to the SuperLink at {host}:{port}: {exc}"
        ) from exc
    names = [value for _, value in certificate.get("subjectAltName", ())]
    return {"subject_alt_names": names, "not_after": certificate.get("notAfter")}


def _load_or_create_ca(folder: Path) -> tuple[Any, Any]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key_path, certificate_path = folder / "ca.key", folder / "ca.pem"
    if key_path.is_file() and certificate_path.is_file():
        key = serialization.load_pem_private_key(key_path.read_bytes(), None)
        certificate = x509.load_pem_x509_certificate(certificate_path.read_bytes())
        return key, certificate
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, "workbench federation CA")]
    )
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    _write_certificate(certificate_path, certificate)
    return key, certificate


def _sign_server_certificate(
    key: Any, ca_key: Any, ca_certificate: Any, hosts: Sequence[str]
) -> Any:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    alt_names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _write_key(path: Path, key: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    _write_private(path, data)


def _write_ssh_key_pair(
    key: Any, private_path: Path, public_path: Path, name: str
) -> None:
    from cryptography.hazmat.primitives import serialization

    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    _write_private(private_path, private)
    public_path.write_bytes(public + f" {name}\n".encode("ascii"))


def _write_private(path: Path, data: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    os.chmod(path, 0o600)


def _write_certificate(path: Path, certificate: Any) -> None:
    from cryptography.hazmat.primitives import serialization

    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def _read_registry(folder: Path) -> dict[str, Any]:
    path = folder / "sites.json"
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text(encoding="utf-8")))
    except ValueError as exc:
        raise ConfigurationError(f"{path} is not valid JSON: {exc}") from exc
