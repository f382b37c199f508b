"""Site control: which runs a partner site accepts, and the site's audit records.

A site's config (JSON, written by ``workbench federation join``) names the
federation it joined, the dataset it offers under the federation's dataset name,
and the model hashes it accepts::

    {"site": "site-a", "federation": "chest-ct",
     "datasets": {"chest-ct": "/data/datasets/chest-ct"},
     "labels": {"chest-ct": "/data/labels/chest-ct.csv"},
     "accepted_model_hashes": ["sha256:..."],
     "work": "/var/lib/workbench/federation/site-a",
     "isolation": "namespaces"}

:func:`admit` checks a run's plan against it before any data is read. A run of
another federation, for a dataset the site does not offer, or with a model hash the
site did not accept (or that the site's own code does not reproduce) is refused,
and the refusal is recorded in the site's audit log.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workbench.audit import AuditEvent, AuditLog, open_audit_log
from workbench.errors import ConfigurationError, WorkbenchError
from workbench.federation.plan import RunPlan, model_hash
from workbench.federation.secure_aggregation import secure_aggregation_enabled

__all__ = ["RunRefusedError", "SiteConfig", "admit", "record_round"]


class RunRefusedError(WorkbenchError):
    """The site refused a run; ``reason`` is a short code sent back to the server."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SiteConfig:
    """What a site offers to a federation.

    Attributes
    ----------
    site
        The site's name.
    federation
        The federation whose runs the site accepts.
    datasets
        Dataset name (as the federation calls it) to a local dataset folder.
    labels
        Dataset name to a local labels table, where the task needs one.
    accepted_model_hashes
        Model hashes (``sha256:...``) the site agreed to train.
    work
        Folder for the rounds' weights; outside every dataset and the workbench home.
    isolation
        Isolation policy of the training jobs (``namespaces`` unless a machine
        cannot create namespaces).
    require_secure_aggregation
        Whether the site rejects runs whose updates are not securely aggregated.
    """

    site: str
    federation: str
    datasets: dict[str, str]
    work: str
    labels: dict[str, str] = field(default_factory=dict)
    accepted_model_hashes: list[str] = field(default_factory=list)
    isolation: str = "namespaces"
    require_secure_aggregation: bool = False

    @property
    def trainer_socket(self) -> Path:
        """The Unix socket of the site's trainer, in the work folder."""
        from workbench.federation.trainer import SOCKET_NAME

        return Path(self.work) / SOCKET_NAME

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the config as JSON; return the path."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> SiteConfig:
        """Read a config written by :meth:`save`.

        Raises
        ------
        ConfigurationError
            When the file is missing or not a site config.
        """
        try:
            return cls(**json.loads(Path(path).read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError) as exc:
            raise ConfigurationError(
                f"site config {path} is not readable: {exc}; write it with"
                " `workbench federation join`"
            ) from exc


def admit(site: SiteConfig, plan: RunPlan, run_id: int, audit: AuditLog) -> None:
    """Check a run's plan against the site's config; record and raise a refusal.

    Raises
    ------
    RunRefusedError
        When the run is for another federation or dataset, its model hash is
        not accepted or not reproduced by this site's code, or the site requires
        secure aggregation and the run does not use it.
    """
    config = plan.config
    refusal: tuple[str, str] | None = None
    if config.name != site.federation:
        refusal = (
            "federation",
            f"the run belongs to federation {config.name!r}, but this"
            f" site joined {site.federation!r}",
        )
    elif config.dataset not in site.datasets:
        refusal = (
            "dataset",
            f"the run asks for dataset {config.dataset!r}, which this site does not"
            f" offer (it offers {sorted(site.datasets)})",
        )
    elif plan.model_hash not in site.accepted_model_hashes:
        refusal = (
            "model-hash",
            f"model hash {plan.model_hash} is not among the hashes this site"
            " accepts; review the model and add it with `workbench federation join"
            f" --accept-model {plan.model_hash}`",
        )
    else:
        local = model_hash(config)
        if local != plan.model_hash:
            refusal = (
                "model-code",
                f"the run announces model hash {plan.model_hash}, but this site's"
                f" code and the run's settings give {local}; the coordinator and the"
                " site run different model code",
            )
    if refusal is None and (
        site.require_secure_aggregation
        and not secure_aggregation_enabled(config.privacy)
    ):
        refusal = (
            "secure-aggregation",
            "this site requires secure aggregation, and the run does not use it;"
            " set `secure_aggregation = true` in the federation's [privacy] table",
        )
    if refusal is None:
        return
    reason, message = refusal
    audit.append(
        AuditEvent(
            action="federation.refuse",
            resource=f"federation:{config.name}",
            purpose=config.purpose,
            outcome="denied",
            details={
                "run_id": run_id,
                "reason": reason,
                "model_hash": plan.model_hash,
                "dataset": config.dataset,
                "site": site.site,
            },
        )
    )
    raise RunRefusedError(message, reason=reason)


def record_round(
    audit: AuditLog,
    *,
    site: SiteConfig,
    plan: RunPlan,
    run_id: int,
    server_round: int,
    phase: str,
    outcome: str,
    details: dict[str, Any],
) -> None:
    """Append one round's data access at this site to its audit log."""
    config = plan.config
    audit.append(
        AuditEvent(
            action=f"federation.{phase}",
            resource=f"dataset:{Path(site.datasets[config.dataset]).name}",
            purpose=config.purpose,
            outcome=outcome,
            details={
                "federation": config.name,
                "dataset": site.datasets[config.dataset],
                "run_id": run_id,
                "round": server_round,
                "model_hash": plan.model_hash,
                "site": site.site,
                **details,
            },
        )
    )


def open_site_audit() -> AuditLog:
    """Open this site's audit log (``WORKBENCH_AUDIT_URL`` or the workbench home)."""
    return open_audit_log()
