"""The coordinator side of a run: strategy, rounds, checkpoints, reports and audit.

The Flower ServerApp (``federation/federated_app/server.py``) calls
:func:`run_server`. It builds FedAvg, FedProx or FedAdam from Flower 1.42's
Message-API strategies with three additions:

- waiting for ``min_sites`` connected sites has a deadline (Flower's own sampling
  waits forever), and sampling is seeded;
- a reply is aggregated only if it holds exactly the expected records (weights
  under the names sent, and numeric metrics); a round with fewer valid replies
  than ``min_sites`` fails the run with that reason;
- after each round the global weights are checkpointed, the metrics of every site
  and the aggregate are written as a table and a plot, and the round is recorded
  in the coordinator's audit log with its participating sites and bytes moved.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from workbench.audit import AuditEvent, AuditLog, open_audit_log
from workbench.errors import WorkbenchError
from workbench.federation.plan import FederationConfig, RunPlan
from workbench.federation.reports import RunRecorder, write_state
from workbench.federation.secure_aggregation import (
    SecureAggregationGrid,
    SecureAggregationOptions,
    secure_aggregation_enabled,
)
from workbench.federation.weights import (
    load_arrays,
    pack,
    save_arrays,
    to_array_record,
    unpack,
)

__all__ = [
    "FederationRunError",
    "PromptGrid",
    "ServerEvaluation",
    "build_strategy",
    "check_message_size",
    "new_global_weights",
    "run_server",
    "transport_limit",
]

log = logging.getLogger(__name__)

# Seconds between the first two looks for the replies of a round. The wait grows
# by REPLY_POLL_GROWTH after each look, up to REPLY_POLL_MAX_S: every look costs the
# SuperLink a query, and on a small machine that CPU is taken from the training.
REPLY_POLL_S = 0.2
REPLY_POLL_GROWTH = 1.5
REPLY_POLL_MAX_S = 2.0
# Share of the previous exchange's duration after which the grid looks for
# replies every REPLY_POLL_S.
EXPECTED_SHARE = 0.8
# The ServerApp's log, in the run's output folder.
SERVER_LOG = "server.log"

ALLOWED_METRICS = frozenset(
    {
        "num-examples",
        "train-loss",
        "val-loss",
        "val-metric",
        "validation-examples",
        "dp-epsilon-round",
        "dp-delta-round",
        "dp-epsilon-total",
        "dp-delta-total",
        "dp-noise-std",
    }
)


class FederationRunError(WorkbenchError):
    """A federated run cannot go on; ``reason`` is a short machine-readable code."""

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def run_server(grid: Any, context: Any) -> None:
    """Run every round of the plan in the run config, then write the reports."""
    from flwr.app import ConfigRecord

    plan = RunPlan.from_json(str(context.run_config["plan"]))
    config = plan.config
    run_id = int(grid.run.run_id)
    out = Path(plan.output)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    random.seed(config.seed)
    np.random.seed(config.seed % 2**32)

    with open_audit_log() as audit, contextlib.ExitStack() as resources:
        initial = _initial_arrays(plan)
        recorder = RunRecorder(out, run_id, _metric_name(plan))
        grid = PromptGrid(grid)
        strategy = build_strategy(plan, grid, recorder, audit, run_id, initial)
        if secure_aggregation_enabled(config.privacy):
            grid = SecureAggregationGrid(
                grid,
                SecureAggregationOptions.from_privacy(config.privacy),
                archive=strategy.archive_stage if plan.keep_replies else None,
            )
            strategy.secure_grid = grid
        evaluate_fn = None
        if plan.validation_dataset:
            evaluate_fn = resources.enter_context(
                ServerEvaluation(plan, recorder, run_id)
            )
        remaining = plan.end_round - plan.start_round + 1
        write_state(
            out,
            run_id=run_id,
            status="running",
            model_hash=plan.model_hash,
            start_round=plan.start_round,
            rounds=plan.end_round,
            metric=_metric_name(plan),
        )
        audit.append(
            AuditEvent(
                action="federation.run.start",
                resource=f"federation:{config.name}",
                purpose=config.purpose,
                details={
                    "run_id": run_id,
                    "model_hash": plan.model_hash,
                    "strategy": config.strategy,
                    "rounds": config.rounds,
                    "start_round": plan.start_round,
                    "min_sites": config.min_sites,
                    "sites": plan.sites,
                    "privacy": config.privacy.get("mode", "none"),
                    "secure_aggregation": secure_aggregation_enabled(config.privacy),
                },
            )
        )
        try:
            packed = pack(initial)
            write_state(
                out,
                message_bytes=check_message_size(packed),
                message_limit=transport_limit(),
            )
            result = strategy.start(
                grid=grid,
                initial_arrays=to_array_record(packed),
                num_rounds=remaining,
                timeout=config.round_timeout_s,
                train_config=ConfigRecord({"local-epochs": config.local_epochs}),
                evaluate_fn=evaluate_fn,
            )
        except BaseException as exc:
            reason = getattr(exc, "reason", type(exc).__name__)
            write_state(out, status="failed", reason=str(exc), reason_code=reason)
            audit.append(
                AuditEvent(
                    action="federation.run.end",
                    resource=f"federation:{config.name}",
                    purpose=config.purpose,
                    outcome="error",
                    details={"run_id": run_id, "reason": reason, "message": str(exc)},
                )
            )
            raise
        final = unpack({k: v.numpy() for k, v in result.arrays.items()}, initial)
        save_arrays(out / "global-final.npz", final)
        write_state(out, status="finished", reason=None)
        audit.append(
            AuditEvent(
                action="federation.run.end",
                resource=f"federation:{config.name}",
                purpose=config.purpose,
                details={"run_id": run_id, "rounds": plan.end_round},
            )
        )


def build_strategy(
    plan: RunPlan,
    grid: Any,
    recorder: RunRecorder,
    audit: AuditLog,
    run_id: int,
    layout: dict[str, np.ndarray],
) -> Any:
    """Return the plan's strategy, with deadlines, reply checks and records added.

    ``layout`` holds the global model's arrays by name; the strategy exchanges them
    packed and unpacks them into its checkpoints.
    """
    from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx

    config = plan.config
    options = dict(config.strategy_options)
    base: type = {"fedavg": FedAvg, "fedprox": FedProx, "fedadam": FedAdam}[
        config.strategy
    ]
    keywords: dict[str, Any] = {
        "fraction_train": config.fraction,
        "fraction_evaluate": config.fraction if config.evaluate else 0.0,
        "min_train_nodes": config.min_sites,
        "min_evaluate_nodes": config.min_sites if config.evaluate else 0,
        "min_available_nodes": config.min_sites,
        "train_metrics_aggr_fn": aggregate_metrics,
        "evaluate_metrics_aggr_fn": aggregate_metrics,
    }
    if config.strategy == "fedprox":
        keywords["proximal_mu"] = options.get("proximal_mu", 0.0)
    if config.strategy == "fedadam":
        keywords.update(options)

    class FederationStrategy(_RoundBookkeeping, base):  # type: ignore[misc, valid-type]
        pass

    strategy = FederationStrategy(**keywords)
    strategy.setup(plan, grid, recorder, audit, run_id, layout)
    return strategy


def aggregate_metrics(records: list[Any], weight_key: str) -> Any:
    """Average each metric over the replies that report it, weighted by examples.

    A site leaves out a metric that is undefined on its data (ROC AUC of a
    validation split with one class), so replies may differ in their keys.
    """
    from flwr.app import MetricRecord

    totals: dict[str, float] = {}
    weights: dict[str, float] = {}
    for record in records:
        metrics = next(iter(record.metric_records.values()))
        weight = float(metrics[weight_key])
        for key, value in metrics.items():
            if key == weight_key or not isinstance(value, (int, float)):
                continue
            totals[key] = totals.get(key, 0.0) + weight * float(value)
            weights[key] = weights.get(key, 0.0) + weight
    return MetricRecord({k: totals[k] / weights[k] for k in totals if weights[k] > 0})


def transport_limit() -> int:
    """Return the largest message Flower's transports accept, in bytes.

    This is Flower's ``GRPC_MAX_MESSAGE_LENGTH``, 2 GiB - 1 in Flower 1.42, which is
    also the protocol buffer limit of a message. Arrays travel in chunks of 5 MiB
    (``FLWR_PRIVATE_MAX_ARRAY_CHUNK_SIZE``), but a message must fit as a whole.
    """
    from flwr.supercore.grpc import GRPC_MAX_MESSAGE_LENGTH

    return int(GRPC_MAX_MESSAGE_LENGTH)


def check_message_size(arrays: dict[str, np.ndarray], limit: int | None = None) -> int:
    """Return the serialized size of ``arrays``; raise when it exceeds the limit.

    Parameters
    ----------
    arrays
        The weights one message carries.
    limit
        Bytes; default :func:`transport_limit`.

    Raises
    ------
    FederationRunError
        When the message would be larger than ``limit``.
    """
    limit = transport_limit() if limit is None else limit
    size = record_bytes(to_array_record(arrays))
    if size > limit:
        raise FederationRunError(
            f"the weights sent each round take {size} bytes, above the transport's"
            f" limit of {limit} bytes; exchange fewer weights (a LoRA adapter instead"
            " of the whole model) or a smaller model",
            reason="message-too-large",
        )
    log.info("weights message: %d bytes (limit %d)", size, limit)
    return size


def record_bytes(record: Any) -> int:
    """Return the bytes of the serialized arrays in an ``ArrayRecord``."""
    return int(sum(len(array.data) for array in record.values()))


class _RoundBookkeeping:
    """Deadlines, reply checks, checkpoints, reports and audit around a strategy."""

    def setup(
        self,
        plan: RunPlan,
        grid: Any,
        recorder: RunRecorder,
        audit: AuditLog,
        run_id: int,
        layout: dict[str, np.ndarray],
    ) -> None:
        self.plan = plan
        self.layout = layout
        self.recorder = recorder
        self.audit = audit
        self.run_id = run_id
        self.out = Path(plan.output)
        self.offset = plan.start_round - 1
        self.sent: dict[str, tuple[str, tuple[int, ...]]] = {}
        self.bytes_sent = 0
        self.round_started = 0.0
        self.site_names: dict[int, str] = {}
        self.total_bytes = {"sent": 0, "received": 0}
        # Set by run_server when the train rounds go through SecAgg+.
        self.secure_grid: SecureAggregationGrid | None = None

    # Sampling with a deadline

    def _await_sites(self, grid: Any, server_round: int, needed: int) -> list[int]:
        deadline = time.monotonic() + self.plan.config.site_wait_s
        while True:
            nodes = list(grid.get_nodes())
            for node in nodes:
                self.site_names[int(node.node_id)] = node.name or f"node-{node.node_id}"
            if len(nodes) >= needed:
                return [int(node.node_id) for node in nodes]
            if time.monotonic() > deadline:
                raise FederationRunError(
                    f"round {server_round + self.offset}: only {len(nodes)} of the"
                    f" {needed} required sites connected within"
                    f" {self.plan.config.site_wait_s:.0f} s",
                    reason="sites-unavailable",
                )
            log.info(
                "round %d: %d of %d sites connected; waiting",
                server_round + self.offset,
                len(nodes),
                needed,
            )
            time.sleep(1.0)

    def configure_train(
        self, server_round: int, arrays: Any, config: Any, grid: Any
    ) -> Iterable[Any]:
        self.round_started = time.monotonic()
        self._await_sites(grid, server_round, self.min_available_nodes)
        self.sent = {k: (v.dtype, tuple(v.shape)) for k, v in arrays.items()}
        messages = list(super().configure_train(server_round, arrays, config, grid))  # type: ignore[misc]
        self.bytes_sent = record_bytes(arrays) * len(messages)
        log.info(
            "round %d: sending the global weights to %d sites",
            server_round + self.offset,
            len(messages),
        )
        return messages

    def configure_evaluate(
        self, server_round: int, arrays: Any, config: Any, grid: Any
    ) -> Iterable[Any]:
        if self.fraction_evaluate == 0.0:  # type: ignore[attr-defined]
            return []
        self._await_sites(grid, server_round, self.min_available_nodes)
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))  # type: ignore[misc]
        self.eval_bytes_sent = record_bytes(arrays) * len(messages)
        return messages

    # Aggregation of checked replies

    def _check_and_log_replies(
        self, replies: Iterable[Any], is_train: bool, validate: bool = True
    ) -> Any:
        # Replies were checked by _problem, which allows metrics a site could not
        # compute; Flower's own check requires identical metric names.
        return super()._check_and_log_replies(replies, is_train, validate=False)  # type: ignore[misc]

    def aggregate_train(self, server_round: int, replies: Iterable[Any]) -> Any:
        global_round = server_round + self.offset
        valid, received = self._check_replies(global_round, "train", list(replies))
        self._require_enough(global_round, "train", valid)
        arrays, metrics = super().aggregate_train(server_round, valid)  # type: ignore[misc]
        arrays = self._as_sent(arrays)
        if self.secure_grid is not None:
            self.bytes_sent = int(self.secure_grid.traffic["sent"])
        seconds = round(time.monotonic() - self.round_started, 3)
        self.total_bytes["sent"] += self.bytes_sent
        self.total_bytes["received"] += received
        self.recorder.add(
            round=global_round,
            phase="train",
            site="all",
            status="ok",
            num_examples=sum(_examples(r) for r in valid),
            train_loss=_metric(metrics, "train-loss"),
            val_loss=_metric(metrics, "val-loss"),
            val_metric=_metric(metrics, "val-metric"),
            bytes_sent=self.bytes_sent,
            bytes_received=received,
            seconds=seconds,
        )
        self._checkpoint(global_round, arrays)
        sites = sorted(self._site(r) for r in valid)
        self.audit.append(
            AuditEvent(
                action="federation.round",
                resource=f"federation:{self.plan.config.name}",
                purpose=self.plan.config.purpose,
                details={
                    "run_id": self.run_id,
                    "round": global_round,
                    "phase": "train",
                    "sites": sites,
                    "failed_sites": len(self._failed),
                    "examples": sum(_examples(r) for r in valid),
                    "aggregate": _plain(metrics),
                    "bytes_sent": self.bytes_sent,
                    "bytes_received": received,
                    "checkpoint": f"checkpoints/round-{global_round:03d}.npz",
                },
            )
        )
        log.info(
            "round %d: aggregated %d sites, %d bytes sent, %d received (%.1f s)",
            global_round,
            len(valid),
            self.bytes_sent,
            received,
            seconds,
        )
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Any]) -> Any:
        global_round = server_round + self.offset
        if self.fraction_evaluate == 0.0:  # type: ignore[attr-defined]
            # No federated evaluation: the round ends after training.
            self.recorder.write()
            return None
        valid, _ = self._check_replies(global_round, "evaluate", list(replies))
        self._require_enough(global_round, "evaluate", valid)
        metrics = super().aggregate_evaluate(server_round, valid)  # type: ignore[misc]
        self.recorder.add(
            round=global_round,
            phase="evaluate",
            site="all",
            status="ok",
            num_examples=sum(_examples(r) for r in valid),
            val_loss=_metric(metrics, "val-loss"),
            val_metric=_metric(metrics, "val-metric"),
            bytes_sent=getattr(self, "eval_bytes_sent", 0),
        )
        self.recorder.write()
        self.audit.append(
            AuditEvent(
                action="federation.round",
                resource=f"federation:{self.plan.config.name}",
                purpose=self.plan.config.purpose,
                details={
                    "run_id": self.run_id,
                    "round": global_round,
                    "phase": "evaluate",
                    "sites": sorted(self._site(r) for r in valid),
                    "aggregate": _plain(metrics),
                },
            )
        )
        return metrics

    def _check_replies(
        self, global_round: int, phase: str, replies: list[Any]
    ) -> tuple[list[Any], int]:
        """Keep replies with exactly the expected records; record every site's row.

        Replies are taken in the order of the sites' names, not of their arrival,
        so the floating-point sums of the aggregation are the same in every run.
        """
        valid, received = [], 0
        self._failed = []
        for reply in sorted(replies, key=lambda r: (self._site(r), _source(r))):
            site = self._site(reply)
            problem = self._problem(reply, phase)
            secure = phase == "train" and self.secure_grid is not None
            if self.plan.keep_replies and not secure:
                # Under SecAgg+ the grid archived what the sites sent, and this
                # reply contains the aggregate.
                self._archive(reply, global_round, phase)
            if problem is None:
                valid.append(reply)
                if phase == "train":
                    received += self._received_bytes(reply)
                metrics = reply.content["metrics"]
                self.recorder.add(
                    round=global_round,
                    phase=phase,
                    site=site,
                    node_id=reply.metadata.src_node_id,
                    status="ok",
                    num_examples=_examples(reply),
                    train_loss=_metric(metrics, "train-loss"),
                    val_loss=_metric(metrics, "val-loss"),
                    val_metric=_metric(metrics, "val-metric"),
                    bytes_received=self._received_bytes(reply)
                    if phase == "train"
                    else 0,
                    dp_epsilon_round=_metric(metrics, "dp-epsilon-round"),
                    dp_epsilon_total=_metric(metrics, "dp-epsilon-total"),
                )
            else:
                self._failed.append(f"{site} ({problem})")
                log.warning(
                    "round %d %s: reply of %s dropped: %s",
                    global_round,
                    phase,
                    site,
                    problem,
                )
                self.recorder.add(
                    round=global_round,
                    phase=phase,
                    site=site,
                    node_id=reply.metadata.src_node_id,
                    status=problem,
                )
        return valid, received

    def _problem(self, reply: Any, phase: str) -> str | None:
        """Return why a reply cannot be aggregated, or None when it can."""
        if reply.has_error():
            return f"error {reply.error.code}: {reply.error.reason}"
        content = reply.content
        if len(content.config_records) != 0:
            return "unexpected config record"
        if set(content.metric_records) != {"metrics"}:
            return "unexpected metric records"
        metrics = content["metrics"]
        if not set(metrics) <= ALLOWED_METRICS or "num-examples" not in metrics:
            return "unexpected metric names"
        if phase == "train":
            if set(content.array_records) != {"arrays"}:
                return "unexpected array records"
            arrays = content["arrays"]
            if list(arrays.keys()) != list(self.sent):
                return "weights under unexpected names"
            if any(
                (v.dtype, tuple(v.shape)) != self.sent[k] for k, v in arrays.items()
            ):
                return "weights of unexpected type or shape"
        elif len(content.array_records) != 0:
            return "arrays in an evaluation reply"
        return None

    def _require_enough(self, global_round: int, phase: str, valid: list[Any]) -> None:
        needed = self.min_train_nodes if phase == "train" else self.min_evaluate_nodes  # type: ignore[attr-defined]
        if len(valid) < needed:
            write_state(self.out, last_failed_round=global_round)
            raise FederationRunError(
                f"round {global_round} ({phase}): {len(valid)} valid replies, fewer"
                f" than the {needed} sites required; failed or missing:"
                f" {sorted(self._failed) or 'none replied'}",
                reason="too-few-replies",
            )

    def _as_sent(self, arrays: Any) -> Any:
        """Return the aggregate in the type the weights were sent in.

        FedAdam computes in float64; sending that on would double the messages.
        """
        values = {k: v.numpy().astype(self.sent[k][0]) for k, v in arrays.items()}
        return to_array_record(values)

    def _checkpoint(self, global_round: int, arrays: Any) -> None:
        packed = {k: v.numpy() for k, v in arrays.items()}
        values = unpack(packed, self.layout)
        save_arrays(self.out / "checkpoints" / f"round-{global_round:03d}.npz", values)
        save_arrays(self.out / "global-last.npz", values)
        write_state(
            self.out,
            last_round=global_round,
            checkpoint=str(self.out / "global-last.npz"),
            bytes_sent_total=self.total_bytes["sent"],
            bytes_received_total=self.total_bytes["received"],
        )

    def _received_bytes(self, reply: Any) -> int:
        """Return the bytes a site's train reply (or, under SecAgg+, replies) held."""
        if self.secure_grid is None:
            return record_bytes(reply.content["arrays"])
        node = int(reply.metadata.src_node_id)
        return int(self.secure_grid.traffic["received"].get(node, 0))

    def archive_stage(self, reply: Any, server_round: int, stage: str) -> None:
        """Archive a reply of one stage of a securely aggregated train round."""
        self._archive(reply, server_round + self.offset, stage)

    def _archive(self, reply: Any, global_round: int, phase: str) -> None:
        """Write the reply as Flower serialises it, for inspection."""
        from flwr.common.serde import message_to_proto

        folder = self.out / "replies"
        folder.mkdir(exist_ok=True)
        name = f"round-{global_round:03d}-{phase}-node-{reply.metadata.src_node_id}"
        (folder / f"{name}.message").write_bytes(
            message_to_proto(reply).SerializeToString()
        )
        if not reply.has_error():
            from flwr.common.serde import recorddict_to_proto

            (folder / f"{name}.content").write_bytes(
                recorddict_to_proto(reply.content).SerializeToString()
            )

    def _site(self, reply: Any) -> str:
        node_id = int(reply.metadata.src_node_id)
        return self.site_names.get(node_id, f"node-{node_id}")


def new_global_weights(config: FederationConfig) -> dict[str, np.ndarray]:
    """Return the weights of a new global model (network or LoRA adapter), seeded."""
    if config.kind == "monai":
        from workbench.federation.local_round import initial_weights

        return initial_weights(config.training, config.seed)
    from workbench.federation.gemma_round import initial_adapter

    return initial_adapter(config.gemma, config.seed)


def _initial_arrays(plan: RunPlan) -> dict[str, np.ndarray]:
    if plan.initial_weights:
        return load_arrays(plan.initial_weights)
    return new_global_weights(plan.config)


class ServerEvaluation:
    """Flower's ``evaluate_fn``: the global model on the coordinator's dataset.

    The evaluation runs in a trainer (:mod:`workbench.federation.trainer`), an
    isolated job started once per run, so the dataset is read in the sandbox
    and kept in memory between rounds.
    """

    def __init__(self, plan: RunPlan, recorder: RunRecorder, run_id: int) -> None:
        from workbench.federation.trainer import Trainer

        self.plan = plan
        self.recorder = recorder
        self.run_id = run_id
        self.folder = Path(plan.output) / "server-evaluation"
        assert plan.validation_dataset is not None
        self.trainer = Trainer(
            "server-side evaluation",
            self.folder,
            [plan.validation_dataset],
            purpose=plan.config.purpose,
            job="federated-server-evaluation",
        )

    def __enter__(self) -> ServerEvaluation:
        self.trainer.start().wait_ready()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.trainer.stop()

    def __call__(self, server_round: int, arrays: Any) -> Any:
        """Evaluate the global weights after ``server_round``; return the metrics."""
        import shutil

        from flwr.app import MetricRecord

        plan = self.plan
        if server_round == 0 and plan.start_round > 1:
            # The resumed checkpoint was evaluated by the run that wrote it.
            return None
        global_round = server_round + plan.start_round - 1
        folder = self.folder / f"round-{global_round:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        save_arrays(folder / "global.npz", {k: v.numpy() for k, v in arrays.items()})
        labels = None
        if plan.validation_labels:
            source = Path(plan.validation_labels)
            labels = str(folder / f"labels{source.suffix}")
            shutil.copyfile(source, labels)
        value = self.trainer.client.request(
            "evaluate",
            kind="monai",
            arguments={
                "training": plan.config.training,
                "dataset": plan.validation_dataset,
                "labels": labels,
                "weights_in": str(folder / "global.npz"),
                "purpose": plan.config.purpose,
                "whole_dataset": True,
                "server_round": global_round,
                "run_id": self.run_id,
            },
            timeout=plan.config.round_timeout_s,
        )
        self.recorder.add(
            round=global_round,
            phase="server",
            site="coordinator",
            status="ok",
            num_examples=value["examples"],
            val_loss=value["val_loss"],
            val_metric=value["val_metric"],
            seconds=value["seconds"],
        )
        self.recorder.write()
        numbers = {
            key.replace("_", "-"): float(value[key])
            for key in ("val_loss", "val_metric")
            if value[key] is not None
        }
        return MetricRecord(numbers)


class PromptGrid:
    """The run's grid, collecting replies soon after they arrive.

    Flower 1.42's grid looks for replies every 3 s, which a round of a few
    seconds would wait for twice (train, then evaluate). This grid looks after
    ``REPLY_POLL_S``, then less and less often, up to every ``REPLY_POLL_MAX_S``.
    Once an exchange of the same kind has been timed, it looks every
    ``REPLY_POLL_S`` from ``EXPECTED_SHARE`` of that time on, since replies
    then arrive at about the same moment each round. Node ids are listed in the
    order of the sites' names, so seeded sampling picks the same sites in every
    run. Everything else is Flower's grid.
    """

    def __init__(self, grid: Any) -> None:
        self._grid = grid
        self._last_seconds: dict[str, float] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def get_node_ids(self) -> list[int]:
        """Return the connected nodes' ids, ordered by the sites' names."""
        nodes = sorted(self._grid.get_nodes(), key=lambda n: (n.name, n.node_id))
        return [int(node.node_id) for node in nodes]

    def send_and_receive(
        self, messages: Iterable[Any], *, timeout: float | None = None
    ) -> list[Any]:
        """Send ``messages``; return the replies received within ``timeout``."""
        messages = list(messages)
        kind = _exchange_kind(messages)
        started = time.monotonic()
        pending = set(self._grid.push_messages(messages))
        deadline = None if timeout is None else started + timeout
        expected = self._last_seconds.get(kind)
        replies: list[Any] = []
        delay = REPLY_POLL_S
        while pending:
            arrived = list(self._grid.pull_messages(pending))
            replies.extend(arrived)
            pending -= {reply.metadata.reply_to_message_id for reply in arrived}
            if not pending or (deadline is not None and time.monotonic() > deadline):
                break
            time.sleep(_next_wait(delay, time.monotonic() - started, expected))
            delay = min(REPLY_POLL_MAX_S, delay * REPLY_POLL_GROWTH)
        if pending:
            log.warning(
                "%d of %d sites sent no reply within %.0f s",
                len(pending),
                len(pending) + len(replies),
                timeout or 0,
            )
        elif messages:
            self._last_seconds[kind] = time.monotonic() - started
            log.info(
                "%d replies (%s) received %.2f s after sending",
                len(replies),
                kind,
                self._last_seconds[kind],
            )
        return replies


def _exchange_kind(messages: list[Any]) -> str:
    """Return what an exchange is, to compare its duration with earlier ones."""
    if not messages:
        return "none"
    first = messages[0]
    stage = ""
    if first.has_content():
        for record in first.content.config_records.values():
            stage = str(record.get("stage", stage))
    return f"{first.metadata.message_type}:{stage}"


def _next_wait(delay: float, elapsed: float, expected: float | None) -> float:
    """Return the seconds to wait before looking for replies again."""
    if expected is None:
        return delay
    soon = EXPECTED_SHARE * expected - elapsed
    if soon <= 0:
        return REPLY_POLL_S
    return max(REPLY_POLL_S, min(delay, soon))


def _metric_name(plan: RunPlan) -> str:
    if plan.config.kind == "monai":
        return str(plan.config.training.get("metric", "metric"))
    return "token loss"


def _metric(metrics: Any, key: str) -> float | None:
    if metrics is None or key not in metrics:
        return None
    return float(metrics[key])


def _source(reply: Any) -> int:
    return int(reply.metadata.src_node_id)


def _examples(reply: Any) -> int:
    return int(reply.content["metrics"]["num-examples"])


def _plain(metrics: Any) -> dict[str, float]:
    if metrics is None:
        return {}
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
