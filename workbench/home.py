"""The workbench home: the folder that holds this installation's secrets and state.

The home holds the de-identification key, the local Orthanc's configuration,
credentials and storage, and the default SQLite audit log. It is found, in order,
from the ``WORKBENCH_HOME`` environment variable, or as the nearest ``.workbench``
folder in the current directory or one of its parents (the way git finds ``.git``),
so a notebook in ``notebooks/`` uses the project's home. ``workbench init`` creates
it; the set-up script runs that.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from pathlib import Path

from workbench.errors import ConfigurationError

__all__ = [
    "HOME_DIRNAME",
    "KEY_FILENAME",
    "find_home",
    "init_home",
    "key_fingerprint",
    "read_key",
    "write_secret_file",
]

log = logging.getLogger(__name__)

HOME_DIRNAME = ".workbench"
KEY_FILENAME = "deid.key"
KEY_BYTES = 32


def find_home(start: Path | None = None) -> Path:
    """Return the workbench home folder.

    Raises
    ------
    ConfigurationError
        When ``WORKBENCH_HOME`` is unset and no ``.workbench`` folder exists in
        ``start`` (default: the current directory) or any of its parents.
    """
    env = os.environ.get("WORKBENCH_HOME")
    if env:
        return Path(env).expanduser().resolve()
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        candidate = folder / HOME_DIRNAME
        if candidate.is_dir():
            return candidate
    raise ConfigurationError(
        f"no {HOME_DIRNAME} folder found in {here} or its parents, and WORKBENCH_HOME"
        " is not set; run `workbench init` (or `make setup`) in the project folder"
    )


def init_home(home: Path) -> Path:
    """Create the home folder and its de-identification key if they are missing.

    An existing key is never replaced: pseudonyms depend on it, and a new key would
    give every patient, study and series a new identity.
    """
    home = Path(home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.chmod(home, 0o700)
    key_path = home / KEY_FILENAME
    if key_path.exists():
        log.info("de-identification key already present in %s", home)
    else:
        write_secret_file(key_path, secrets.token_hex(KEY_BYTES) + "\n")
        log.info("created de-identification key in %s", home)
    return home


def read_key(home: Path | None = None) -> bytes:
    """Return the de-identification key of ``home`` (default: :func:`find_home`).

    ``WORKBENCH_DEID_KEY_FILE`` names another key file, for sites that keep keys
    outside the project.

    Raises
    ------
    ConfigurationError
        When the key file is missing, readable by others, or malformed.
    """
    env = os.environ.get("WORKBENCH_DEID_KEY_FILE")
    path = Path(env) if env else (home or find_home()) / KEY_FILENAME
    if not path.is_file():
        raise ConfigurationError(
            f"de-identification key {path} not found; run `workbench init` to create"
            " one, or restore the key used for earlier ingests so pseudonyms match"
        )
    mode = path.stat().st_mode & 0o077
    if mode:
        raise ConfigurationError(
            f"de-identification key {path} is readable by other users (mode"
            f" {oct(path.stat().st_mode & 0o777)}); run `chmod 600 {path}`"
        )
    text = path.read_text().strip()
    try:
        key = bytes.fromhex(text)
    except ValueError as exc:
        raise ConfigurationError(
            f"de-identification key {path} is not hexadecimal text"
        ) from exc
    if len(key) < 16:
        raise ConfigurationError(
            f"de-identification key {path} is {len(key)} bytes long; use at least 16"
        )
    return key


def key_fingerprint(key: bytes) -> str:
    """Return a short public identifier of ``key``, safe to write in manifests.

    Two datasets with the same fingerprint were pseudonymised with the same key, so
    their pseudonyms agree. The fingerprint reveals nothing usable about the key.
    """
    return hmac.new(key, b"workbench key fingerprint", hashlib.sha256).hexdigest()[:16]


def write_secret_file(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that only the owner can ever read it.

    The file is created with mode 0600 before any byte is written, then renamed into
    place, so no other user can open it during the write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
