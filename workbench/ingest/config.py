"""What an ingest reads, where it writes and how: options and dataset definitions.

An ingest is described by an :class:`IngestConfig`, built from command-line options
or from a dataset definition in TOML (``workbench ingest datasets/chest-ct.toml``)::

    [source]
    orthanc = "http://127.0.0.1:8042"        # or "local", or: folder = "path"
    query = { Modality = "CT", StudyDate = "20190101-20191231" }

    [output]
    path = "datasets/chest-ct"                # relative to the TOML file's folder

    [deidentification]
    clean_descriptors = false                 # keep cleaned descriptions
    quarantine_burned_in = true
    recipes = []                              # extra recipe files, read first

    [run]
    purpose = "chest CT cohort for nodule detection"
    workers = 2
    # scheduler = "tls://dask.example.org:8786"

Options given on the command line override the file.
"""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword

from workbench.errors import ConfigurationError

__all__ = ["IngestConfig", "load_dataset_definition", "parse_query", "redact_query"]

# Query keys whose values carry no identity and may be written to the manifest and
# the audit log as they are. Other values are replaced by a keyed hash.
SAFE_QUERY_KEYS = frozenset(
    {
        "Modality",
        "ModalitiesInStudy",
        "BodyPartExamined",
        "Manufacturer",
        "ManufacturerModelName",
        "SeriesNumber",
        "ImageType",
        "SOPClassUID",
        "SOPClassesInStudy",
    }
)


@dataclass(frozen=True)
class IngestConfig:
    """Everything one ingest run needs to know.

    Attributes
    ----------
    out
        The dataset folder to write.
    orthanc
        Base URL of the Orthanc server to read, or ``local`` for the Orthanc that
        ``workbench orthanc start`` runs; exactly one of ``orthanc`` and
        ``folder`` is set.
    folder
        A folder of DICOM files to read instead of an Orthanc server.
    query
        Orthanc ``/tools/find`` query at series level: DICOM keyword to matching
        string; study-level keys such as StudyDate work too.
    purpose
        Why the data is read; recorded in the audit log.
    workers
        Dask worker processes of the local cluster.
    scheduler
        Address of an existing Dask scheduler to use instead of a local cluster.
    insecure
        Allow plain-HTTP Orthanc URLs and ``tcp://`` schedulers on other hosts.
    clean_descriptors
        Keep descriptions and comments, cleaned, instead of removing them.
    quarantine_burned_in
        Quarantine instances that may show burned-in text.
    recipes
        Extra recipe files, read before the bundled recipe.
    fetch_threads
        Concurrent instance downloads inside one series task.
    progress
        Show a progress bar on standard error.
    """

    out: Path
    orthanc: str | None = None
    folder: Path | None = None
    query: dict[str, str] = field(default_factory=dict)
    purpose: str = ""
    workers: int = 2
    scheduler: str | None = None
    insecure: bool = False
    clean_descriptors: bool = False
    quarantine_burned_in: bool = True
    recipes: tuple[Path, ...] = ()
    fetch_threads: int = 4
    progress: bool = True

    def __post_init__(self) -> None:
        if (self.orthanc is None) == (self.folder is None):
            raise ConfigurationError(
                "give exactly one source: an Orthanc URL (--orthanc) or a folder of"
                " DICOM files (--folder)"
            )
        if self.workers < 1:
            raise ConfigurationError(
                f"--workers must be at least 1, not {self.workers}"
            )
        if self.fetch_threads < 1:
            raise ConfigurationError(
                f"fetch threads must be at least 1, not {self.fetch_threads}"
            )
        if self.folder is not None and self.query:
            raise ConfigurationError(
                "--query filters an Orthanc server; it cannot be used with --folder"
            )

    def with_overrides(self, **changes: Any) -> IngestConfig:
        """Return a copy with the given fields replaced (None values are ignored)."""
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


def parse_query(items: list[str]) -> dict[str, str]:
    """Parse ``KEY=VALUE`` query options, checking that each key is a DICOM keyword.

    Raises
    ------
    ConfigurationError
        For an item without ``=`` or a key that is not a DICOM keyword.
    """
    query: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigurationError(
                f"--query {item!r} is not KEY=VALUE; for example --query Modality=CT"
            )
        if tag_for_keyword(key) is None:
            raise ConfigurationError(
                f"--query key {key!r} is not a DICOM keyword; for example Modality,"
                " StudyDate, BodyPartExamined"
            )
        query[key] = value.strip()
    return query


def redact_query(query: dict[str, str], key: bytes) -> dict[str, str]:
    """Return the query with values that could identify replaced by a keyed hash.

    Values of attributes such as Modality are kept; names, IDs, dates and UIDs
    become ``hmac-sha256:<first 16 hex digits>``, the same for the same value under
    the same key, so two runs with one query can still be matched.
    """
    redacted = {}
    for name, value in query.items():
        if name in SAFE_QUERY_KEYS and dictionary_VR(tag_for_keyword(name)) != "PN":
            redacted[name] = value
        else:
            digest = hmac.new(key, value.encode("utf-8"), hashlib.sha256).hexdigest()
            redacted[name] = f"hmac-sha256:{digest[:16]}"
    return redacted


def load_dataset_definition(path: Path) -> IngestConfig:
    """Read a dataset definition (TOML) into an :class:`IngestConfig`.

    Relative paths in the file are taken relative to the file's folder.

    Raises
    ------
    ConfigurationError
        When the file is missing, is not valid TOML, or has unknown keys.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigurationError(
            f"{path} is a folder; give a dataset definition file (TOML), or read the"
            " folder's DICOM files with --folder"
        )
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigurationError(f"dataset definition {path} not found") from exc
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigurationError(
            f"dataset definition {path} is not valid TOML: {exc}"
        ) from exc

    base = path.resolve().parent
    known = {"name", "source", "output", "deidentification", "run"}
    unknown = set(data) - known
    if unknown:
        raise ConfigurationError(
            f"dataset definition {path}: unknown sections {sorted(unknown)}; expected"
            f" {sorted(known)}"
        )
    source = _table(data, "source", path, {"orthanc", "folder", "query"})
    output = _table(data, "output", path, {"path"})
    deid = _table(
        data,
        "deidentification",
        path,
        {"clean_descriptors", "quarantine_burned_in", "recipes"},
    )
    run = _table(
        data,
        "run",
        path,
        {"purpose", "workers", "scheduler", "insecure", "fetch_threads"},
    )

    if "path" not in output:
        raise ConfigurationError(f"dataset definition {path}: [output] path is missing")
    query = source.get("query", {})
    if not isinstance(query, dict):
        raise ConfigurationError(
            f"dataset definition {path}: [source] query must be a table"
        )
    parse_query([f"{k}={v}" for k, v in query.items()])

    def text(table: dict[str, Any], key: str, where: str) -> str:
        value = table[key]
        if not isinstance(value, str):
            raise ConfigurationError(
                f"dataset definition {path}: {where} {key} must be a string, not"
                f" {value!r}"
            )
        return value

    def flag(table: dict[str, Any], key: str, where: str, default: bool) -> bool:
        value = table.get(key, default)
        if not isinstance(value, bool):
            raise ConfigurationError(
                f"dataset definition {path}: {where} {key} must be true or false"
                f" (without quotes), not {value!r}"
            )
        return value

    def number(table: dict[str, Any], key: str, where: str, default: int) -> int:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigurationError(
                f"dataset definition {path}: {where} {key} must be a whole number,"
                f" not {value!r}"
            )
        return value

    def resolve(value: str) -> Path:
        candidate = Path(value).expanduser()
        return candidate if candidate.is_absolute() else base / candidate

    recipes = deid.get("recipes", [])
    if not isinstance(recipes, list) or not all(isinstance(r, str) for r in recipes):
        raise ConfigurationError(
            f"dataset definition {path}: [deidentification] recipes must be a list"
            " of file names"
        )
    return IngestConfig(
        out=resolve(text(output, "path", "[output]")),
        orthanc=text(source, "orthanc", "[source]") if "orthanc" in source else None,
        folder=resolve(text(source, "folder", "[source]"))
        if "folder" in source
        else None,
        query={str(k): str(v) for k, v in query.items()},
        purpose=text(run, "purpose", "[run]") if "purpose" in run else "",
        workers=number(run, "workers", "[run]", 2),
        scheduler=text(run, "scheduler", "[run]") if "scheduler" in run else None,
        insecure=flag(run, "insecure", "[run]", False),
        fetch_threads=number(run, "fetch_threads", "[run]", 4),
        clean_descriptors=flag(deid, "clean_descriptors", "[deidentification]", False),
        quarantine_burned_in=flag(
            deid, "quarantine_burned_in", "[deidentification]", True
        ),
        recipes=tuple(resolve(p) for p in recipes),
    )


def _table(
    data: dict[str, Any], name: str, path: Path, keys: set[str]
) -> dict[str, Any]:
    table = data.get(name, {})
    if not isinstance(table, dict):
        raise ConfigurationError(f"dataset definition {path}: [{name}] must be a table")
    unknown = set(table) - keys
    if unknown:
        raise ConfigurationError(
            f"dataset definition {path}: unknown keys {sorted(unknown)} in [{name}];"
            f" expected some of {sorted(keys)}"
        )
    return table
