"""Simulation: several sites on this machine, for notebooks and tests.

Flower's own simulation engine needs Ray, which the workbench does not install.
:func:`simulate` runs the real deployment instead, on 127.0.0.1 only: a SuperLink
with TLS and certificates issued for the simulation, and one SuperNode per site.
Each site has its own config, work folder and audit log, and its own trainer, an
isolated job that trains every round, as at a partner site. It uses no
network beyond loopback and installs nothing, so it works offline. Given the same
seed, datasets and code, two simulations give the same metrics on the CPU.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.errors import ConfigurationError
from workbench.federation.certs import SiteKeys, issue_certificates
from workbench.federation.deployment import (
    APP_FOLDER,
    Coordinator,
    RunOutcome,
    SiteNode,
)
from workbench.federation.plan import (
    FederationConfig,
    load_federation_config,
    model_hash,
)
from workbench.federation.server import new_global_weights
from workbench.federation.site import SiteConfig
from workbench.federation.trainer import PRELOAD
from workbench.federation.weights import save_arrays

__all__ = ["SimulationResult", "simulate"]

log = logging.getLogger(__name__)

DEFAULT_CONFIG = APP_FOLDER / "chest-ct.toml"


@dataclass(frozen=True)
class SimulationResult:
    """The results of a simulation.

    Attributes
    ----------
    outcome
        Flower's final status of the run and the coordinator's ``state.json``.
    output
        Folder with checkpoints, ``metrics.csv``, ``metrics.parquet`` and
        ``metrics.png``.
    sites
        Site name to the site's folder (config, work folder, audit log).
    """

    outcome: RunOutcome
    output: Path
    sites: dict[str, Path]

    @property
    def metrics(self) -> Any:
        """The metrics table as a pandas DataFrame."""
        import pandas as pd

        return pd.read_parquet(self.output / "metrics.parquet")

    def plot(self) -> Any:
        """Draw the losses and the validation metric by round, overall and per site.

        Returns a :class:`matplotlib.figure.Figure`; in a notebook it shows as the
        value of the cell.
        """
        from workbench.federation.reports import metrics_figure
        from workbench.notebook.display import register_png_display

        frame = self.metrics.astype(object).where(self.metrics.notna(), None)
        metric = str(self.outcome.state.get("metric") or "metric")
        figure = metrics_figure(frame.to_dict("records"), metric)
        register_png_display()
        return figure

    def audit_log(self, site: str) -> Path:
        """Return the path of the SQLite audit log of ``site``."""
        return self.sites[site] / "audit.sqlite"


def simulate(
    sites: Mapping[str, str | os.PathLike[str] | Mapping[str, Any]],
    rounds: int = 3,
    *,
    config: str | os.PathLike[str] | FederationConfig = DEFAULT_CONFIG,
    seed: int | None = None,
    min_sites: int | None = None,
    out: str | os.PathLike[str] | None = None,
    timeout: float = 3600.0,
    keep_replies: bool = False,
    validation: str | os.PathLike[str] | Mapping[str, Any] | None = None,
) -> SimulationResult:
    """Run a federation of local sites and return its results.

    Parameters
    ----------
    sites
        Site name to its dataset folder, or to ``{"dataset": ..., "labels": ...}``
        when the task needs a labels table.
    rounds
        Number of federated rounds.
    config
        A federation config (TOML path or :class:`FederationConfig`); by default
        ``federation/chest-ct.toml``.
    seed, min_sites
        Override the config's seed and minimum number of sites (default: all).
    out
        Folder for everything the simulation writes; default a new temporary
        folder.
    timeout
        Seconds the run may take.
    keep_replies
        Archive every reply the coordinator receives under ``out/result/replies``.
    validation
        A dataset the coordinator evaluates the global model on before round 1
        and after every round (phase ``server`` in the metrics), given like a
        site's; ``monai`` federations only.

    Returns
    -------
    SimulationResult
        The run's outcome, output folder and site folders.

    Raises
    ------
    ConfigurationError
        For fewer than one site or an invalid config.
    """
    if not sites:
        raise ConfigurationError("a simulation needs at least one site")
    settings = (
        config
        if isinstance(config, FederationConfig)
        else load_federation_config(config)
    )
    settings = settings.with_overrides(
        rounds=rounds, seed=seed, min_sites=min_sites or len(sites)
    )
    root = (
        Path(out) if out is not None else Path(tempfile.mkdtemp(prefix="federation-"))
    )
    root = root.expanduser().resolve()
    accepted = model_hash(settings)
    held_out = _dataset_entry(validation) if validation is not None else {}

    # 1. One folder per site: config, work folder and audit log.
    site_folders: dict[str, Path] = {}
    for name, value in sites.items():
        entry = _dataset_entry(value)
        folder = root / "sites" / name
        folder.mkdir(parents=True, exist_ok=True)
        labels = entry.get("labels")
        SiteConfig(
            site=name,
            federation=settings.name,
            datasets={settings.dataset: str(Path(entry["dataset"]).resolve())},
            labels={settings.dataset: str(Path(labels).resolve())} if labels else {},
            accepted_model_hashes=[accepted],
            work=str(folder / "work"),
        ).save(folder / "site.json")
        site_folders[name] = folder

    # 2. The SuperLink and the SuperNodes, on loopback, with TLS and registered site
    # keys as in a deployment (this also gives the coordinator the site names).
    certs = root / "certs"
    issue_certificates(certs, sorted(site_folders), federation=settings.name)
    coordinator = Coordinator(root / "coordinator", certs=certs)
    nodes: list[SiteNode] = []
    try:
        for name, folder in site_folders.items():
            audit_url = f"sqlite:///{folder / 'audit.sqlite'}"
            nodes.append(
                SiteNode(
                    name,
                    coordinator.address,
                    folder / "site.json",
                    folder / "node",
                    keys=SiteKeys(name, certs / name),
                    environment={"WORKBENCH_AUDIT_URL": audit_url},
                    preload=PRELOAD[settings.kind],
                )
            )
        # The trainers import PyTorch and MONAI while the SuperLink starts and
        # a thread builds the initial model.
        for node in nodes:
            node.start_trainer()
        with ThreadPoolExecutor(max_workers=len(nodes) + 1) as executor:
            initial = executor.submit(new_global_weights, settings)
            coordinator.start()
            coordinator.register_sites()
            for started in [executor.submit(node.start) for node in nodes]:
                started.result()
            output = root / "result"
            output.mkdir(parents=True, exist_ok=True)
            weights = save_arrays(output / "global-initial.npz", initial.result())
        run_id = coordinator.submit(
            settings,
            output,
            sites=sorted(site_folders),
            keep_replies=keep_replies,
            initial_weights=str(weights),
            validation_dataset=_resolved(held_out.get("dataset")),
            validation_labels=_resolved(held_out.get("labels")),
        )
        outcome = coordinator.wait(run_id, output, timeout)
    finally:
        with ThreadPoolExecutor(max_workers=len(nodes) + 1) as executor:
            for stopped in [executor.submit(node.stop) for node in nodes]:
                stopped.result()
        coordinator.stop()
    log.info("simulation of %d sites: %s", len(site_folders), outcome.status)
    return SimulationResult(outcome=outcome, output=output, sites=site_folders)


def _dataset_entry(value: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Return ``{"dataset": ..., "labels": ...}`` for a folder or such a mapping."""
    entry = dict(value) if isinstance(value, Mapping) else {"dataset": value}
    if "dataset" not in entry:
        raise ConfigurationError(
            f"a site is a dataset folder or a mapping with a 'dataset' key; got"
            f" the keys {sorted(entry)}"
        )
    return entry


def _resolved(path: str | os.PathLike[str] | None) -> str | None:
    return str(Path(path).expanduser().resolve()) if path is not None else None
