"""The site side of a round: admission, isolated training, audit, and the reply.

The Flower ClientApp (``federation/federated_app/client.py``) calls
:func:`handle_message` for every train and evaluate message. The handler runs in
the ClientApp process, which keeps talking to Flower. The data is read only by the
site's trainer (:mod:`workbench.federation.trainer`), an isolated job with no
network and the dataset read-only, which gets the global weights in a file and
leaves the updated weights in another.

A reply carries one ``ArrayRecord`` (weights by parameter name, train only) and
one ``MetricRecord`` (counts, losses, metric); never a text. Errors go back as a
Flower ``Error`` whose reason is a fixed phrase naming the failure kind, so no
exception text (which could quote a path or a value) leaves the site.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

from workbench.audit import AuditLog
from workbench.errors import ConfigurationError
from workbench.federation.plan import RunPlan
from workbench.federation.secure_aggregation import secure_aggregation_enabled
from workbench.federation.site import (
    RunRefusedError,
    SiteConfig,
    admit,
    open_site_audit,
    record_round,
)
from workbench.federation.weights import load_arrays, save_arrays, to_array_record

__all__ = ["LOG_FILE_KEY", "SITE_CONFIG_KEY", "handle_message"]

log = logging.getLogger(__name__)

# The SuperNode's --node-config keys naming the site's config file, and the file
# that receives the ClientApp's log lines.
SITE_CONFIG_KEY = "site-config"
LOG_FILE_KEY = "log-file"
# Flower error codes of the replies this module sends.
ERROR_REFUSED = 100
ERROR_SITE_FAILED = 101
JOBS = {
    ("monai", "train"): "workbench.federation.local_round:train_round",
    ("monai", "evaluate"): "workbench.federation.local_round:evaluate_round",
    ("gemma-lora", "train"): "workbench.federation.gemma_round:train_round",
    ("gemma-lora", "evaluate"): "workbench.federation.gemma_round:evaluate_round",
}


def handle_message(message: Any, context: Any, phase: str) -> Any:
    """Answer one train or evaluate message of a run at this site."""
    from flwr.app import Error, Message

    plan = RunPlan.from_json(str(context.run_config["plan"]))
    site = SiteConfig.load(str(context.node_config[SITE_CONFIG_KEY]))
    run_id = int(message.metadata.run_id)
    config = message.content["config"]
    server_round = int(config["server-round"]) + plan.start_round - 1
    log.info("site %s: %s message of round %d received", site.site, phase, server_round)

    with open_site_audit() as audit:
        try:
            admit(site, plan, run_id, audit)
        except RunRefusedError as exc:
            log.warning("run %d refused at site %s: %s", run_id, site.site, exc)
            return Message(
                Error(code=ERROR_REFUSED, reason=f"refused by site: {exc.reason}"),
                reply_to=message,
            )
        try:
            content = _run_round(
                message, plan, site, run_id, server_round, phase, audit
            )
        except Exception as exc:
            log.exception(
                "round %d (%s) failed at site %s", server_round, phase, site.site
            )
            record_round(
                audit,
                site=site,
                plan=plan,
                run_id=run_id,
                server_round=server_round,
                phase=phase,
                outcome="error",
                details={"error_type": type(exc).__name__},
            )
            return Message(
                Error(code=ERROR_SITE_FAILED, reason=f"site job failed: {phase}"),
                reply_to=message,
            )
    reply = Message(content, reply_to=message)
    if phase == "train" and plan.config.privacy.get("mode") == "local-dp":
        reply = _apply_local_dp(message, context, reply, plan, site, server_round)
    return reply


def _apply_local_dp(
    message: Any,
    context: Any,
    reply: Any,
    plan: RunPlan,
    site: SiteConfig,
    server_round: int,
) -> Any:
    """Clip the site's update and add Gaussian noise with Flower's ``LocalDpMod``.

    The update is clipped to L2 norm ``C``, so two updates differ by at most
    ``2C``: that is the sensitivity given to the Gaussian mechanism. Each round
    spends ``(epsilon, delta)``; the total is reported by basic composition (the
    sum over the rounds this site took part in), an upper bound.
    """
    import zlib

    import numpy as np
    from flwr.app import MetricRecord
    from flwr.clientapp.mod import LocalDpMod

    privacy = plan.config.privacy
    clipping_norm = float(privacy["clipping_norm"])
    epsilon, delta = float(privacy["epsilon"]), float(privacy["delta"])
    # LocalDpMod draws its noise from NumPy's global generator.
    np.random.seed(
        (plan.config.seed * 7919 + server_round * 31 + zlib.crc32(site.site.encode()))
        % 2**32
    )
    mod = LocalDpMod(clipping_norm, 2 * clipping_norm, epsilon, delta)
    noised = mod(message, context, lambda _message, _context: reply)
    spent = context.state.metric_records.get("privacy", MetricRecord({"rounds": 0}))
    rounds = int(spent["rounds"]) + 1
    context.state.metric_records["privacy"] = MetricRecord({"rounds": rounds})
    metrics = noised.content["metrics"]
    metrics["dp-epsilon-round"] = epsilon
    metrics["dp-delta-round"] = delta
    metrics["dp-epsilon-total"] = epsilon * rounds
    metrics["dp-delta-total"] = delta * rounds
    metrics["dp-noise-std"] = float(
        2 * clipping_norm * np.sqrt(2 * np.log(1.25 / delta)) / epsilon
    )
    return noised


def _run_round(
    message: Any,
    plan: RunPlan,
    site: SiteConfig,
    run_id: int,
    server_round: int,
    phase: str,
    audit: AuditLog,
) -> Any:
    """Have the site's trainer run one round and build the reply's records."""
    from flwr.app import MetricRecord, RecordDict

    config = plan.config
    dataset = site.datasets[config.dataset]
    folder = Path(site.work) / f"run-{run_id}" / f"round-{server_round:03d}-{phase}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    # The trainer sees only its datasets and the work folder, so the labels
    # travel in a copy.
    labels = site.labels.get(config.dataset)
    if labels is not None:
        copy = folder / f"labels{Path(labels).suffix}"
        shutil.copyfile(labels, copy)
        labels = str(copy)
    received = message.content["arrays"]
    save_arrays(
        folder / "global.npz", {name: array.numpy() for name, array in received.items()}
    )

    # 1. The trainer reads the data in isolation and writes the new weights.
    arguments = _job_arguments(
        plan, phase, dataset, labels, folder, server_round, run_id
    )
    value = _train_or_evaluate(site, config.kind, phase, arguments, plan, audit)

    # 2. The reply: weights (train only) and numeric metrics.
    metrics = _metrics(value, phase)
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if phase == "train":
        updated = load_arrays(folder / "update.npz")
        content["arrays"] = to_array_record({k: updated[k] for k in received.keys()})
    record_round(
        audit,
        site=site,
        plan=plan,
        run_id=run_id,
        server_round=server_round,
        phase=phase,
        outcome="ok",
        details={
            "rows_read": int(value.get("rows_read", 0)),
            "examples": int(metrics["num-examples"]),
            "seconds": float(value.get("seconds", 0.0)),
            "secure_aggregation": secure_aggregation_enabled(config.privacy),
        },
    )
    log.info(
        "site %s: %s round %d done in %.1f s (%d rows read)",
        site.site,
        phase,
        server_round,
        float(value.get("seconds", 0.0)),
        int(value.get("rows_read", 0)),
    )
    return content


def _train_or_evaluate(
    site: SiteConfig,
    kind: str,
    phase: str,
    arguments: dict[str, Any],
    plan: RunPlan,
    audit: AuditLog,
) -> dict[str, Any]:
    """Run the round in the site's trainer, or in a one-off isolated job without one.

    A SuperNode started by the workbench always has a trainer; a one-off job per
    round serves SuperNodes started by hand, at the price of starting PyTorch
    each round.
    """
    from workbench.federation.trainer import (
        TrainerClient,
        TrainerError,
        TrainerUnavailableError,
    )

    config = plan.config
    try:
        value = TrainerClient(site.trainer_socket).request(
            phase, kind=kind, arguments=arguments, timeout=config.round_timeout_s
        )
        return dict(value)
    except TrainerUnavailableError as exc:
        log.warning(
            "site %s has no trainer running (%s); running the round in a one-off"
            " isolated job",
            site.site,
            exc,
        )
    except TrainerError as exc:
        log.error(
            "the trainer of site %s failed the %s round: %s: %s",
            site.site,
            phase,
            exc.error_type or "error",
            exc,
        )
        raise

    from workbench.isolation import run_isolated

    result = run_isolated(
        JOBS[(kind, phase)],
        arguments,
        datasets=[arguments["dataset"]],
        outputs=[site.work],
        purpose=config.purpose,
        job=f"federated-{phase}",
        policy=site.isolation,
        audit=audit,
    )
    return dict(result.value)


def _job_arguments(
    plan: RunPlan,
    phase: str,
    dataset: str,
    labels: str | None,
    folder: Path,
    server_round: int,
    run_id: int,
) -> dict[str, Any]:
    config = plan.config
    weights_in = str(folder / "global.npz")
    if config.kind == "monai":
        common = {
            "training": config.training,
            "dataset": dataset,
            "labels": labels,
            "weights_in": weights_in,
            "purpose": config.purpose,
            "server_round": server_round,
            "run_id": run_id,
        }
        if phase == "evaluate":
            return common
        return {
            **common,
            "weights_out": str(folder / "update.npz"),
            "epochs": config.local_epochs,
            "seed": config.seed,
            "proximal_mu": float(config.strategy_options.get("proximal_mu", 0.0))
            if config.strategy == "fedprox"
            else 0.0,
        }
    common = {
        "gemma": config.gemma,
        "dataset": dataset,
        "weights_in": weights_in,
        "purpose": config.purpose,
        "seed": config.seed,
        "server_round": server_round,
        "run_id": run_id,
    }
    if phase == "evaluate":
        return common
    return {**common, "weights_out": str(folder / "update.npz")}


def _metrics(value: dict[str, Any], phase: str) -> dict[str, float | int]:
    """Return the job's numbers as Flower metrics; leave out undefined ones."""
    examples = (
        value.get("train_examples") if phase == "train" else value.get("examples")
    )
    if not examples:
        raise ConfigurationError(f"the site has no example for {phase}")
    metrics: dict[str, float | int] = {"num-examples": int(examples)}
    for key in ("train_loss", "val_loss", "val_metric", "validation_examples"):
        number = value.get(key)
        if isinstance(number, (int, float)) and not math.isnan(float(number)):
            metrics[key.replace("_", "-")] = float(number)
    return metrics
