"""The environment variables an isolated job starts with.

The job inherits the caller's environment minus every variable that could carry a
secret or point at a server, plus the variables that keep Hugging Face libraries
offline and tell workbench code that it runs isolated. A variable is dropped when its
name

- is ``WORKBENCH_HOME``, ``WORKBENCH_AUDIT_URL`` or ``DATABASE_URL``;
- starts with ``ORTHANC_`` or ``PG`` (libpq's connection variables);
- contains ``PASSWORD``, ``PASSWD``, ``TOKEN``, ``SECRET``, ``KEY``, ``CREDENTIAL``,
  ``AUTH``, ``COOKIE`` or ``PRIVATE`` (any case);
- ends with ``_PROXY``, ``_URL``, ``_URI``, ``_HOST`` or ``_ADDRESS`` (any case),
  which covers ``HTTP_PROXY``, ``no_proxy``, ``DOCKER_HOST`` and the D-Bus address;

or when its value contains a URL with a user name or password (``scheme://user@``).
``PATH``, ``HOME``, ``LANG``, ``LC_*``, ``VIRTUAL_ENV`` and ``PYTHONPATH`` match none
of these rules and are kept.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

__all__ = ["OFFLINE_VARIABLES", "child_environment", "is_sensitive_variable"]

DROPPED_NAMES = frozenset({"WORKBENCH_HOME", "WORKBENCH_AUDIT_URL", "DATABASE_URL"})
DROPPED_PREFIXES = ("ORTHANC_", "PG")
DROPPED_WORDS = (
    "PASSWORD",
    "PASSWD",
    "TOKEN",
    "SECRET",
    "KEY",
    "CREDENTIAL",
    "AUTH",
    "COOKIE",
    "PRIVATE",
)
DROPPED_SUFFIXES = ("_PROXY", "_URL", "_URI", "_HOST", "_ADDRESS")
URL_WITH_USER = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s@]+@", re.IGNORECASE)

OFFLINE_VARIABLES = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}
ISOLATED_FLAG = "WORKBENCH_ISOLATED"


def is_sensitive_variable(name: str, value: str) -> bool:
    """Return whether the variable ``name=value`` must not reach an isolated job."""
    upper = name.upper()
    return (
        upper in DROPPED_NAMES
        or upper.startswith(DROPPED_PREFIXES)
        or any(word in upper for word in DROPPED_WORDS)
        or upper.endswith(DROPPED_SUFFIXES)
        or URL_WITH_USER.search(value) is not None
    )


def child_environment(
    parent: Mapping[str, str], extra: Mapping[str, str]
) -> dict[str, str]:
    """Return the environment of an isolated job started from ``parent``.

    Parameters
    ----------
    parent
        The caller's environment, usually ``os.environ``.
    extra
        Variables the runner sets for this job, such as ``TMPDIR`` and the audit
        relay's file descriptor; they override the parent's.
    """
    environment = {
        name: value
        for name, value in parent.items()
        if not is_sensitive_variable(name, value)
    }
    environment.update(OFFLINE_VARIABLES)
    environment[ISOLATED_FLAG] = "1"
    environment["PYTHONDONTWRITEBYTECODE"] = "1"
    environment.update(extra)
    return environment
