"""The ingest driver: query the source, run one Dask task per series, finish up.

:func:`run_ingest` is the whole job. The driver (this process) queries the source
for its series first, so that a bad source or option creates no output folder.
It then takes the dataset folder's lock, skips the series already written from the
same source instances with the same recipe and options, and submits the rest to
Dask: a local cluster of worker processes on 127.0.0.1 by default, or an existing
scheduler. At most a few tasks wait per worker thread, so memory stays flat however
many studies there are. The driver alone writes the audit log (one record per
Orthanc query, per series fetched, per instance, per dataset write) and, at the end,
unifies the Parquet schemas, consolidates the Zarr metadata and writes the
quarantine report and the manifest.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from workbench.audit import AuditEvent, AuditLog, current_user, open_audit_log
from workbench.dataset.manifest import build_manifest, dataset_counts
from workbench.dataset.store import DatasetFolder
from workbench.deidentify import (
    DeidentificationOptions,
    Pseudonymizer,
    build_deidentifier,
)
from workbench.deidentify.recipe import compile_recipe, recipe_paths
from workbench.errors import ConfigurationError, WorkbenchError
from workbench.home import find_home, key_fingerprint, read_key
from workbench.ingest.config import IngestConfig, redact_query
from workbench.ingest.series import SeriesResult, WorkerSettings, process_series
from workbench.ingest.sources import (
    ORTHANC,
    SeriesTask,
    folder_tasks,
    hashed_source_ids,
    orthanc_tasks,
    source_fingerprint,
)

__all__ = ["IngestSummary", "run_ingest"]

log = logging.getLogger(__name__)

TASKS_PER_THREAD = 2
LOCAL_ORTHANC = "local"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass
class IngestSummary:
    """The outcome of one ingest run.

    ``written``, ``quarantined`` and ``failed_series`` count this run; the
    ``dataset_*`` counts describe the whole dataset after it.
    """

    out: Path
    series_total: int = 0
    series_skipped: int = 0
    failed_series: int = 0
    written: int = 0
    quarantined: int = 0
    seconds: float = 0.0
    dataset: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)

    @property
    def instances_per_second(self) -> float:
        """Instances handled (written or quarantined) a second in this run."""
        handled = self.written + self.quarantined
        return handled / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        """Return the summary as lines for people to read."""
        d = self.dataset
        return [
            f"dataset:      {self.out}",
            f"patients:     {d.get('patients', 0)}",
            f"studies:      {d.get('studies', 0)}",
            f"series:       {d.get('series', 0)}"
            f" ({self.series_total - self.series_skipped} processed,"
            f" {self.series_skipped} already done, {self.failed_series} failed)",
            f"instances:    {d.get('instances', 0)} ({self.written} written this run)",
            f"quarantined:  {d.get('quarantined', 0)} ({self.quarantined} this run;"
            " see quarantine.csv)",
            f"seconds:      {self.seconds:.1f}",
            f"instances/s:  {self.instances_per_second:.1f}",
        ]


def run_ingest(
    config: IngestConfig,
    *,
    audit: AuditLog | None = None,
    home: Path | None = None,
) -> IngestSummary:
    """Run one ingest and return its summary.

    Parameters
    ----------
    config
        What to read, where to write, and how.
    audit
        The audit log to append to (default: :func:`open_audit_log`).
    home
        The workbench home holding the de-identification key (default: found
        from the current directory or ``WORKBENCH_HOME``).

    Raises
    ------
    WorkbenchError
        When the source cannot be read or the dataset folder cannot be written.
        Instances that cannot be handled are quarantined instead, and series whose
        fetch fails are counted in ``failed_series``.
    """
    started = time.perf_counter()
    started_at = dt.datetime.now(dt.UTC)
    key = read_key(home)
    pseudonymizer = Pseudonymizer(key)
    options = DeidentificationOptions(
        clean_descriptors=config.clean_descriptors,
        quarantine_burned_in=config.quarantine_burned_in,
    )
    recipe_files = [
        *config.recipes,
        *recipe_paths(clean_descriptors=config.clean_descriptors),
    ]
    recipe_texts = tuple(_read_recipe(path) for path in recipe_files)
    # Fail early on a bad recipe, before any data is read.
    deidentifier = build_deidentifier(
        key, options, recipe=compile_recipe(list(recipe_texts))
    )
    purpose = config.purpose or "unspecified"
    if not config.purpose:
        log.warning("no --purpose given; the audit log records 'unspecified'")

    folder = DatasetFolder(config.out)
    _check_same_key(folder, key)
    resource = f"dataset:{folder.root.resolve()}"
    own_audit = audit is None
    audit = audit or open_audit_log()
    summary = IngestSummary(out=config.out)
    audit.append(
        AuditEvent(
            action="ingest.start",
            resource=resource,
            purpose=purpose,
            details={"source": _source_label(config), "workers": config.workers},
        )
    )
    try:
        # 1. Ask the source for its series, before anything is written.
        orthanc_args = None
        if config.orthanc is not None:
            tasks, orthanc_args, source_record = _orthanc_source(
                config, pseudonymizer, audit, purpose, key
            )
        else:
            assert config.folder is not None
            source_record = {"kind": "folder"}
            tasks = folder_tasks(config.folder, pseudonymizer)
        if not tasks:
            log.warning("the source holds no series that match; nothing to ingest")
        settings = WorkerSettings(
            key=key,
            recipe_texts=recipe_texts,
            options=options,
            out=str(folder.root.resolve()),
            orthanc=orthanc_args,
            fetch_threads=config.fetch_threads,
        )
        tasks = [_with_settings(task, settings.digest) for task in tasks]
        summary.series_total = len(tasks)

        with folder.locked():
            folder.prepare()

            # 2. Skip series already written from the same source and settings;
            #    refuse to rewrite a series that would lose instances.
            todo = []
            for task in tasks:
                state = _series_state(folder, task, key)
                if state == "done":
                    summary.series_skipped += 1
                elif state == "conflict":
                    _refuse_conflict(audit, purpose, task, summary)
                else:
                    todo.append(task)
            if summary.series_skipped:
                log.info("%d series already done; skipped", summary.series_skipped)

            # 3. Run one task per series on Dask.
            if todo:
                with _dask_client(config) as client:
                    for task, result, error in _run_tasks(
                        client, todo, settings, config
                    ):
                        _record_result(audit, purpose, task, result, error, summary)

            # 4. Finish: one schema, consolidated Zarr, reports, manifest.
            folder.unify_schemas()
            folder.consolidate_volumes()
            quarantined_total = folder.write_quarantine_report()
            summary.dataset = dataset_counts(folder.root, quarantined_total)
            summary.seconds = time.perf_counter() - started
            folder.write_manifest(
                build_manifest(
                    folder.root,
                    previous=folder.read_manifest(),
                    source=source_record,
                    deidentification=_deidentification_record(
                        deidentifier, recipe_files, options, key
                    ),
                    counts=summary.dataset,
                    run={
                        "started": started_at.isoformat(timespec="seconds"),
                        "seconds": round(summary.seconds, 2),
                        "user": current_user(),
                        "purpose": purpose,
                        "series_processed": len(todo),
                        "written": summary.written,
                        "quarantined": summary.quarantined,
                        "failed_series": summary.failed_series,
                    },
                )
            )
            audit.append(
                AuditEvent(
                    action="dataset.write",
                    resource=resource,
                    purpose=purpose,
                    details={"counts": summary.dataset},
                )
            )
    except BaseException as exc:
        audit.append(
            AuditEvent(
                action="ingest.end",
                resource=resource,
                purpose=purpose,
                outcome="error",
                details={"error": type(exc).__name__},
            )
        )
        if own_audit:
            audit.close()
        raise
    outcome = (
        "error"
        if summary.failed_series
        else ("quarantined" if summary.quarantined else "ok")
    )
    audit.append(
        AuditEvent(
            action="ingest.end",
            resource=resource,
            purpose=purpose,
            outcome=outcome,
            details={
                "written": summary.written,
                "quarantined": summary.quarantined,
                "failed_series": summary.failed_series,
                "seconds": round(summary.seconds, 2),
            },
        )
    )
    if own_audit:
        audit.close()
    log.info(
        "ingest finished: %d written, %d quarantined, %d series failed in %.1f s",
        summary.written,
        summary.quarantined,
        summary.failed_series,
        summary.seconds,
    )
    return summary


# Source


def _orthanc_source(
    config: IngestConfig,
    pseudonymizer: Pseudonymizer,
    audit: AuditLog,
    purpose: str,
    key: bytes,
) -> tuple[list[SeriesTask], dict[str, Any], dict[str, Any]]:
    from workbench.orthanc.client import OrthancClient

    assert config.orthanc is not None
    if config.orthanc == LOCAL_ORTHANC:
        client = _local_orthanc_client()
    else:
        client = OrthancClient.from_environment(
            config.orthanc, insecure=config.insecure
        )
    public_url = _public_url(client.url)
    with client:
        check = client.check_server()
        system = client.system()
        query = redact_query(config.query, key)
        try:
            series = client.find("Series", config.query, expand=True)
        except WorkbenchError:
            audit.append(
                AuditEvent(
                    action="orthanc.query",
                    resource=f"orthanc:{public_url}",
                    purpose=purpose,
                    outcome="error",
                    details={"level": "Series", "query": query},
                )
            )
            raise
        audit.append(
            AuditEvent(
                action="orthanc.query",
                resource=f"orthanc:{public_url}",
                purpose=purpose,
                details={"level": "Series", "query": query, "matches": len(series)},
            )
        )
        connection = client.connection_args()
    tasks = orthanc_tasks(series, pseudonymizer)
    log.info(
        "Orthanc %s matched %d series with %d instances",
        public_url,
        len(tasks),
        sum(len(task.instance_refs) for task in tasks),
    )
    record = {
        "kind": ORTHANC,
        "url": public_url,
        "orthanc_version": system.get("Version", ""),
        "orthanc_name": system.get("Name", ""),
        "accepts_unauthenticated": bool(
            getattr(check, "accepts_unauthenticated", False)
        ),
        "level": "Series",
        "query": query,
    }
    return tasks, connection, record


def _local_orthanc_client() -> Any:
    """Return a client of the local Orthanc, with its stored credentials.

    ``ORTHANC_USERNAME`` and ``ORTHANC_PASSWORD`` are for other servers and are not
    used here.
    """
    from workbench.orthanc.client import OrthancClient
    from workbench.orthanc.server import orthanc_status, read_credentials

    home = find_home() / "orthanc"
    status = orthanc_status(home)
    credentials = read_credentials(home)
    if not status.get("running") or credentials is None:
        raise ConfigurationError(
            f"the local Orthanc (home {home}) is not running; start it with"
            " `workbench orthanc start`"
        )
    return OrthancClient(credentials.url, credentials.username, credentials.password)


def _read_recipe(path: Path) -> tuple[str, bytes]:
    try:
        return Path(path).name, Path(path).read_bytes()
    except OSError as exc:
        raise ConfigurationError(
            f"cannot read recipe {path}: {exc.strerror}; check the --recipe path"
        ) from exc


def _check_same_key(folder: DatasetFolder, key: bytes) -> None:
    """Refuse to add to a dataset pseudonymised under another key."""
    manifest = folder.read_manifest() if folder.manifest_path.exists() else None
    if manifest is None:
        return
    recorded = manifest.get("deidentification", {}).get("key_fingerprint")
    if recorded and recorded != key_fingerprint(key):
        raise ConfigurationError(
            f"{folder.root} was written with another de-identification key (key"
            f" fingerprint {recorded}, this one is {key_fingerprint(key)}); its"
            " patients would get a second pseudonym. Use the key it was written"
            " with (WORKBENCH_HOME or WORKBENCH_DEID_KEY_FILE), or a new --out folder"
        )


def _with_settings(task: SeriesTask, settings_digest: str) -> SeriesTask:
    """Fold the settings into the task's fingerprint: a new recipe redoes a series."""
    return replace(
        task, fingerprint=source_fingerprint(list(task.source_ids), settings_digest)
    )


def _series_state(folder: DatasetFolder, task: SeriesTask, key: bytes) -> str:
    """Return ``done``, ``conflict`` (rewriting would drop instances) or ``todo``."""
    quarantine = folder.read_quarantine(task.key)
    if not task.readable:
        done = quarantine is not None and quarantine.fingerprint == task.fingerprint
        return "done" if done else "todo"
    record = folder.series_record(task.key)
    if record is None:
        # A series whose every instance was quarantined has no Parquet part; one
        # killed between its two writes has a quarantine list that expects rows.
        done = (
            quarantine is not None
            and quarantine.fingerprint == task.fingerprint
            and quarantine.written == 0
        )
        return "done" if done else "todo"
    if record.fingerprint == task.fingerprint:
        return "done"
    if not record.source_ids <= set(hashed_source_ids(task.source_ids, key)):
        return "conflict"
    return "todo"


def _refuse_conflict(
    audit: AuditLog, purpose: str, task: SeriesTask, summary: IngestSummary
) -> None:
    message = (
        "the dataset already holds instances of this series that this source does"
        " not list, and rewriting the series would drop them; ingest into a new"
        " --out folder, or give a source that holds the whole series"
    )
    summary.failed_series += 1
    summary.failures.append(f"{task.key}: {message}")
    log.error("series %s not rewritten: %s", task.key, message)
    audit.append(
        AuditEvent(
            action="series.fetch",
            resource=f"series:{task.key}",
            purpose=purpose,
            outcome="denied",
            details={"reason": "would drop instances already in the dataset"},
        )
    )


# Dask


@contextmanager
def _dask_client(config: IngestConfig) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    if config.scheduler:
        _check_scheduler_address(config.scheduler, insecure=config.insecure)
        try:
            client = Client(config.scheduler, timeout="30s")
        except (OSError, TimeoutError) as exc:
            raise ConfigurationError(
                f"could not reach the Dask scheduler at {config.scheduler} within"
                " 30 s; check the address and that the scheduler runs"
            ) from exc
        with client:
            log.info("attached to Dask scheduler %s", config.scheduler)
            yield client
        return
    with (
        _environment_kept(),
        LocalCluster(
            n_workers=config.workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            # The scheduler serves HTTP (health, dashboard) even when asked for no
            # dashboard; a free loopback port avoids clashes between clusters.
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        log.info("started a local Dask cluster of %d workers", config.workers)
        yield client


@contextmanager
def _environment_kept() -> Iterator[None]:
    """Undo what a local Dask cluster sets in this process's environment.

    Dask's nanny sets ``OMP_NUM_THREADS=1`` and its kin in ``os.environ`` of the
    process that starts the workers and leaves them there, so every process
    started later (a training job in the same notebook) would run PyTorch on one
    thread.
    """
    saved = dict(os.environ)
    try:
        yield
    finally:
        for name in set(os.environ) - set(saved):
            del os.environ[name]
        for name, value in saved.items():
            if os.environ.get(name) != value:
                os.environ[name] = value


def _check_scheduler_address(address: str, *, insecure: bool) -> None:
    """Refuse a plain-TCP scheduler on another host: tasks carry the key."""
    parts = urlsplit(address if "://" in address else f"tcp://{address}")
    if parts.scheme == "tcp" and parts.hostname not in LOOPBACK_HOSTS and not insecure:
        raise ConfigurationError(
            f"scheduler {address} is reached over plain TCP on another host, and the"
            " tasks carry the de-identification key and Orthanc credentials; use a"
            " tls:// scheduler, or pass --insecure on a network you trust"
        )


def _run_tasks(
    client: Any, tasks: list[SeriesTask], settings: WorkerSettings, config: IngestConfig
) -> Iterator[tuple[SeriesTask, SeriesResult | None, BaseException | None]]:
    """Submit tasks a few at a time and yield each as it finishes."""
    from distributed import as_completed

    threads = sum(client.nthreads().values()) or 1
    in_flight = max(1, threads * TASKS_PER_THREAD)
    [settings_future] = client.scatter([settings], broadcast=True, hash=False)
    pending = iter(tasks)
    by_key: dict[str, SeriesTask] = {}
    # Task keys are unique per run: runs may share one scheduler.
    run_token = uuid.uuid4().hex[:8]

    def submit(task: SeriesTask) -> Any:
        future = client.submit(
            process_series,
            task,
            settings_future,
            key=f"series-{task.key}-{run_token}",
            pure=False,
        )
        by_key[future.key] = task
        return future

    first = [submit(task) for task in islice(pending, in_flight)]
    progress = _progress_bar(config, sum(len(task.instance_refs) for task in tasks))
    try:
        completed = as_completed(first)
        for future in completed:
            task = by_key.pop(future.key)
            try:
                result = future.result()
                error = None
            except Exception as exc:
                result, error = None, exc
            future.release()
            following = next(pending, None)
            if following is not None:
                completed.add(submit(following))
            progress.update(len(task.instance_refs))
            yield task, result, error
    finally:
        progress.close()


def _progress_bar(config: IngestConfig, total: int) -> Any:
    # tqdm.auto draws a widget in notebooks and text in terminals.
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="instance",
        desc="ingest",
        disable=not config.progress,
        file=sys.stderr,
        dynamic_ncols=True,
    )


# Audit and summary


def _record_result(
    audit: AuditLog,
    purpose: str,
    task: SeriesTask,
    result: SeriesResult | None,
    error: BaseException | None,
    summary: IngestSummary,
) -> None:
    resource = f"series:{task.key}"
    if error is not None or result is None:
        summary.failed_series += 1
        message = f"{type(error).__name__}: {error}" if error else "no result"
        summary.failures.append(f"{task.key}: {message}")
        log.error("series %s failed: %s", task.key, message)
        audit.append(
            AuditEvent(
                action="series.fetch",
                resource=resource,
                purpose=purpose,
                outcome="error",
                details={
                    "source": task.source,
                    "orthanc_series": list(task.orthanc_series),
                    "instances": len(task.instance_refs),
                    "error": type(error).__name__ if error else "",
                },
            )
        )
        return

    summary.written += result.written
    summary.quarantined += len(result.quarantined)
    log.debug(
        "series %s: %d written, %d quarantined in %.2f s on the worker",
        task.key,
        result.written,
        len(result.quarantined),
        result.seconds,
    )
    events = [
        AuditEvent(
            action="series.fetch",
            resource=resource,
            purpose=purpose,
            outcome="quarantined" if result.quarantined else "ok",
            details={
                "source": task.source,
                "orthanc_series": list(task.orthanc_series),
                "instances": len(task.instance_refs),
                "bytes": result.bytes_fetched,
                "seconds": round(result.seconds, 3),
            },
        )
    ]
    for instance in result.instances:
        events.append(
            AuditEvent(
                action="instance.fetch",
                resource=f"{task.source}:{instance.source_id}",
                purpose=purpose,
                outcome=instance.outcome,
                details={
                    "series": task.key,
                    "sop_instance_uid": instance.sop_instance_uid,
                    "reason_code": instance.reason_code,
                },
            )
        )
    audit.append_many(events)


def _deidentification_record(
    deidentifier: Any,
    recipe_files: list[Path],
    options: DeidentificationOptions,
    key: bytes,
) -> dict[str, Any]:
    return {
        "recipes": [
            {"file": name, "sha256": sha, "version": version}
            for name, sha, version in deidentifier.recipe.sources
        ],
        "recipe_sha256": deidentifier.recipe.digest,
        "recipe_paths": [str(path) for path in recipe_files],
        "profile": (
            "DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile"
        ),
        "method_codes": [
            {"CodeValue": code, "CodingSchemeDesignator": "DCM", "CodeMeaning": meaning}
            for code, meaning in deidentifier.method_codes()
        ],
        "options": {
            "clean_descriptors": options.clean_descriptors,
            "quarantine_burned_in": options.quarantine_burned_in,
            "date_shift": "one keyed shift of whole days per patient",
            "uids": "keyed 2.25 UIDs",
        },
        "key_fingerprint": key_fingerprint(key),
    }


def _source_label(config: IngestConfig) -> str:
    if config.orthanc is not None:
        return f"orthanc:{_public_url(config.orthanc)}"
    return "folder"


def _public_url(url: str) -> str:
    """Return ``url`` without any user name or password written into it."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return parts._replace(netloc=host).geturl()
