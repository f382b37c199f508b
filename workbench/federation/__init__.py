"""Federated learning across partner sites with Flower 1.42: data never leaves a site.

Each site keeps its de-identified dataset and its own audit log; only model
weights and numeric metrics cross the wire. The coordinator runs a SuperLink, each
site a SuperNode, and every round's training runs at the site in an isolated job
(:mod:`workbench.isolation`). From a notebook::

    from workbench import federation

    result = federation.simulate(
        sites={"a": {"dataset": "datasets/a", "labels": "labels-a.csv"},
               "b": {"dataset": "datasets/b", "labels": "labels-b.csv"}},
        rounds=3,
    )
    result.metrics          # one row per round, phase and site

Modules: :mod:`~workbench.federation.plan` (federation config, model hash),
:mod:`~workbench.federation.certs` (CA, server certificate, site keys),
:mod:`~workbench.federation.deployment` (SuperLink, SuperNodes, runs),
:mod:`~workbench.federation.site` (what a site accepts, its audit records),
:mod:`~workbench.federation.server` and :mod:`~workbench.federation.client` (the
two sides of a round), :mod:`~workbench.federation.simulation`.

Names are imported on first use, so ``import workbench.federation`` loads neither
Flower nor PyTorch.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Coordinator",
    "FederationConfig",
    "SiteConfig",
    "SiteNode",
    "issue_certificates",
    "load_federation_config",
    "model_hash",
    "simulate",
]

_MODULES = {
    "Coordinator": "workbench.federation.deployment",
    "SiteNode": "workbench.federation.deployment",
    "FederationConfig": "workbench.federation.plan",
    "load_federation_config": "workbench.federation.plan",
    "model_hash": "workbench.federation.plan",
    "SiteConfig": "workbench.federation.site",
    "issue_certificates": "workbench.federation.certs",
    "simulate": "workbench.federation.simulation",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_MODULES])
