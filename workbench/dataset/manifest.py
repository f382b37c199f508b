"""The dataset manifest: where the data came from, how it was made, what it holds.

``manifest.json`` is the first thing a reader of a dataset looks at. Loaders and
the isolated training environment refuse a dataset whose manifest does not say it
was de-identified and verified. It records:

- ``source``: the Orthanc URL (never credentials) or that a folder was read, and
  the query, with identifying values replaced by keyed hashes;
- ``deidentification``: the recipe files with their SHA-256, the PS3.15 profile and
  option codes, the options, and a fingerprint of the key (not the key);
- ``counts``: patients, studies, series, instances and quarantined instances;
- ``software``: versions of the workbench and the libraries that shaped the data;
- ``runs``: one entry per ingest run (start, end, instances, user, purpose);
- ``dataset_version``: a hash of the Parquet parts' fingerprints, which changes
  whenever the content does.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads
import pyarrow.parquet as pq

from workbench import __version__
from workbench.dataset.store import INSTANCES_DIR, QUARANTINE_REPORT, VOLUMES_STORE
from workbench.errors import DatasetError

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "build_manifest",
    "dataset_counts",
    "require_deidentified",
    "software_versions",
]

FORMAT_NAME = "workbench-dataset"
FORMAT_VERSION = 1
SOFTWARE = (
    "pydicom",
    "deid",
    "pyarrow",
    "zarr",
    "xarray",
    "numpy",
    "dask",
    "distributed",
)
MAX_RUNS_KEPT = 100
VOLUME_LAYOUT = f"{VOLUMES_STORE}/<SeriesInstanceUID>/<stack>"


def software_versions() -> dict[str, str]:
    """Return the versions of the workbench and the libraries that shape a dataset."""
    versions = {"workbench": __version__}
    for name in SOFTWARE:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def dataset_counts(root: Path, quarantined: int) -> dict[str, int]:
    """Count patients, studies, series and instances in a dataset's Parquet parts."""
    instances_dir = Path(root) / INSTANCES_DIR
    counts = {"patients": 0, "studies": 0, "series": 0, "instances": 0}
    parts = sorted(instances_dir.glob("*.parquet"))
    if parts:
        dataset = pads.dataset([str(p) for p in parts], format="parquet")
        wanted = [
            name
            for name in ("PatientID", "StudyInstanceUID", "SeriesInstanceUID")
            if name in dataset.schema.names
        ]
        table = dataset.to_table(columns=wanted)
        counts["instances"] = table.num_rows
        for name, label in (
            ("PatientID", "patients"),
            ("StudyInstanceUID", "studies"),
            ("SeriesInstanceUID", "series"),
        ):
            if name in wanted:
                column = table.column(name).drop_null()
                counts[label] = len(set(column.to_pylist()))
    counts["quarantined"] = quarantined
    return counts


def build_manifest(
    root: Path,
    *,
    previous: dict[str, Any] | None,
    source: dict[str, Any],
    deidentification: dict[str, Any],
    counts: dict[str, int],
    run: dict[str, Any],
) -> dict[str, Any]:
    """Return the manifest for a dataset after a run, keeping earlier runs' history."""
    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    runs = list((previous or {}).get("runs", []))[-(MAX_RUNS_KEPT - 1) :]
    runs.append(run)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dataset_version": _dataset_version(Path(root)),
        "created": (previous or {}).get("created", now),
        "updated": now,
        "deidentified": True,
        "verified": True,
        "source": source,
        "deidentification": deidentification,
        "counts": counts,
        "software": software_versions(),
        "layout": {
            "instances": f"{INSTANCES_DIR}/*.parquet",
            "volumes": VOLUME_LAYOUT,
            "quarantine": QUARANTINE_REPORT,
        },
        "runs": runs,
    }


def require_deidentified(root: Path) -> dict[str, Any]:
    """Return the manifest of ``root`` if it says de-identified and verified.

    Raises
    ------
    DatasetError
        When the folder has no manifest, is not a workbench dataset, or was not
        de-identified and verified.
    """
    path = Path(root) / "manifest.json"
    if not path.exists():
        raise DatasetError(
            f"{root} has no manifest.json, so it is not a workbench dataset; make one"
            " with `workbench ingest`"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from exc
    if manifest.get("format") != FORMAT_NAME:
        raise DatasetError(
            f"{root} is not a {FORMAT_NAME} (format {manifest.get('format')!r})"
        )
    if manifest.get("deidentified") is not True or manifest.get("verified") is not True:
        raise DatasetError(
            f"{root} is not marked de-identified and verified; only datasets written"
            " by `workbench ingest` may be used here"
        )
    return manifest


def _dataset_version(root: Path) -> str:
    digest = hashlib.sha256()
    for part in sorted((root / INSTANCES_DIR).glob("*.parquet")):
        metadata = pq.read_metadata(part).metadata or {}
        digest.update(part.name.encode())
        digest.update(metadata.get(b"workbench.source_fingerprint", b""))
    return digest.hexdigest()[:16]
