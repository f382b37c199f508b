"""The ingest job from a notebook, with a progress bar drawn by the notebook.

:func:`ingest` runs :func:`workbench.ingest.run_ingest`, the same job as
``workbench ingest``. The job's own progress bar writes text to standard error,
which a notebook shows as a stream of red lines. This module turns that bar off and
draws a ``tqdm.auto`` bar instead: a widget in Jupyter, text in a terminal. The bar
advances on the job's audit records, one step per ``series.fetch`` record, and
takes its total from the ``orthanc.query`` record's match count. A folder source
makes no query record, so its bar counts series without a total.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, cast

from workbench.audit import AuditEvent, AuditLog, AuditRecord, open_audit_log
from workbench.errors import ConfigurationError
from workbench.ingest import (
    IngestConfig,
    IngestSummary,
    load_dataset_definition,
    run_ingest,
)

__all__ = ["ingest"]


def ingest(
    definition: str | Path | None = None,
    *,
    out: str | Path | None = None,
    orthanc: str | None = None,
    folder: str | Path | None = None,
    query: Mapping[str, str] | None = None,
    purpose: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    audit_url: str | None = None,
    **options: Any,
) -> IngestSummary:
    """Ingest DICOM from Orthanc or a folder into a de-identified dataset folder.

    Give either a dataset definition (TOML, as for ``workbench ingest FILE``),
    whose values the keyword arguments override, or ``out`` and one source.

    Parameters
    ----------
    definition
        Path of a dataset definition file.
    out
        The dataset folder to write.
    orthanc
        Orthanc base URL, or ``"local"`` for the workbench's own Orthanc.
        Credentials come from ``ORTHANC_USERNAME`` and ``ORTHANC_PASSWORD``, or
        from the local Orthanc's credentials file.
    folder
        A folder of DICOM files to read instead of Orthanc.
    query
        Orthanc series-level query: DICOM keyword to matching value, such as
        ``{"Modality": "CT"}``.
    purpose
        Why the data is read; recorded in the audit log. Required here or in the
        definition.
    workers
        Dask worker processes of the local cluster.
    progress
        Show a progress bar.
    audit_url
        The audit log to append to (default: the workbench's own).
    options
        Further :class:`~workbench.ingest.IngestConfig` fields, such as
        ``clean_descriptors=True``.

    Returns
    -------
    IngestSummary
        Counts of this run and of the whole dataset; ``summary.lines()`` reads
        well in a notebook.

    Raises
    ------
    ConfigurationError
        When neither a definition nor ``out`` is given, no purpose is given, or
        the options are inconsistent.
    WorkbenchError
        When the source cannot be read or the dataset cannot be written.
    """
    config = _build_config(
        definition,
        out=out,
        orthanc=orthanc,
        folder=folder,
        query=query,
        purpose=purpose,
        workers=workers,
        options=options,
    )
    audit = open_audit_log(audit_url)
    if not progress:
        with audit:
            return run_ingest(config, audit=audit)

    from tqdm.auto import tqdm

    bar = tqdm(desc="ingest", unit="series")
    try:
        with audit:
            tracked = cast(AuditLog, _ProgressAudit(audit, bar))
            summary = run_ingest(config, audit=tracked)
        # Series already in the dataset are skipped without an audit record.
        bar.update(summary.series_skipped)
        bar.set_postfix(skipped=summary.series_skipped, quarantined=summary.quarantined)
    finally:
        bar.close()
    return summary


def _build_config(
    definition: str | Path | None,
    *,
    out: str | Path | None,
    orthanc: str | None,
    folder: str | Path | None,
    query: Mapping[str, str] | None,
    purpose: str | None,
    workers: int | None,
    options: dict[str, Any],
) -> IngestConfig:
    overrides: dict[str, Any] = {
        "out": Path(out) if out is not None else None,
        "orthanc": orthanc,
        "folder": Path(folder) if folder is not None else None,
        "query": dict(query) if query is not None else None,
        "purpose": purpose,
        "workers": workers,
        **options,
        "progress": False,
    }
    if definition is not None:
        config = load_dataset_definition(Path(definition)).with_overrides(**overrides)
    elif out is None:
        raise ConfigurationError(
            "ingest needs a dataset definition file or an out folder; pass, for"
            " example, out='datasets/cohort', orthanc='local'"
        )
    else:
        config = IngestConfig(
            **{key: value for key, value in overrides.items() if value is not None}
        )
    if not config.purpose.strip():
        raise ConfigurationError(
            "ingest needs a purpose, because the audit log records it with every"
            " access; pass, for example, purpose='chest CT cohort'"
        )
    return config


class _ProgressAudit:
    """An audit log that passes every event on and advances a progress bar."""

    def __init__(self, audit: AuditLog, bar: Any) -> None:
        self._audit = audit
        self._bar = bar
        self._instances = 0

    @property
    def location(self) -> str:
        return self._audit.location

    def append(self, event: AuditEvent) -> AuditRecord:
        return self.append_many([event])[0]

    def append_many(self, events: Iterable[AuditEvent]) -> list[AuditRecord]:
        events = list(events)
        records = self._audit.append_many(events)
        for event in events:
            self._advance(event)
        return records

    def close(self) -> None:
        self._audit.close()

    def _advance(self, event: AuditEvent) -> None:
        if event.action == "orthanc.query" and event.outcome == "ok":
            self._bar.total = int(event.details.get("matches", 0))
            self._bar.refresh()
        elif event.action == "series.fetch":
            self._instances += int(event.details.get("instances", 0))
            self._bar.set_postfix(instances=self._instances, refresh=False)
            self._bar.update(1)
