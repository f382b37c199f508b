"""Secure aggregation: the coordinator learns the sites' combined update, not theirs.

Flower 1.42 implements SecAgg+ as a workflow for its legacy strategies
(``SecAggPlusWorkflow``) and a client mod (``secaggplus_mod``), both speaking the
legacy ``FitIns`` and ``FitRes`` records. The workbench's rounds use the Message
API, so this module adapts the two ends and leaves the protocol to Flower:

- at the coordinator, :class:`SecureAggregationGrid` replaces the plain exchange
  of a train round by the workflow's four stages (public keys, encrypted key
  shares, masked updates, unmasking). It then gives the strategy one reply per
  site with the unmasked aggregate, so FedAvg, FedProx and FedAdam run unchanged;
- at a site, :func:`secure_aggregation_mod` gives the train message to the
  workbench's handler in Message-API form and gives ``secaggplus_mod`` the site's
  **update** (its new weights minus the global weights), which the mod clips to
  ``[-clipping_range, clipping_range]``, weights by the example count, quantizes
  and masks.

Sites send updates rather than weights because of that clipping: a round moves a
weight by far less than the range, where batch-norm statistics can exceed it. With
two sites both must reply, because a missing site's mask could only be removed by
revealing the other's update. With more, a site may drop after sending its keys
as long as ``reconstruction_threshold`` of its neighbours remain.
"""

from __future__ import annotations

import json
import logging
import time
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from workbench.errors import ConfigurationError, WorkbenchError

__all__ = [
    "SecureAggregationError",
    "SecureAggregationGrid",
    "SecureAggregationOptions",
    "secure_aggregation_mod",
]

log = logging.getLogger(__name__)

# The train config key that carries the names of the exchanged arrays: legacy
# parameters are an unnamed list.
ARRAY_NAMES_KEY = "array-names"
# Flower's workflow needs a power of two above the quantization range. This one
# leaves room for the sum of the quantized updates of 1,024 sites.
MODULUS_RANGE = 2**32


class SecureAggregationError(WorkbenchError):
    """The sites' updates could not be aggregated securely this round."""

    def __init__(self, message: str, *, reason: str = "secure-aggregation-failed"):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class SecureAggregationOptions:
    """The SecAgg+ settings of a federation (``[privacy]`` keys ``secagg_*``).

    Attributes
    ----------
    reconstruction_threshold
        Share of a site's neighbours whose key shares are needed to remove its
        mask, in (0, 1]; at least two sites in any case.
    clipping_range
        Each value of a site's update is clipped to this magnitude before it is
        quantized.
    quantization_range
        Number of integer levels over ``[-clipping_range, clipping_range]``.
    max_weight
        The largest example count a site may report. Updates are weighted by
        ``examples / max_weight`` before quantization, so a bound close to the
        real counts keeps more precision.
    """

    reconstruction_threshold: float = 0.67
    clipping_range: float = 8.0
    quantization_range: int = 2**22
    max_weight: float = 1000.0

    @classmethod
    def from_privacy(cls, privacy: Mapping[str, Any]) -> SecureAggregationOptions:
        """Read the options from a federation's ``[privacy]`` table.

        Raises
        ------
        ConfigurationError
            When a value is out of its range.
        """
        options = cls(
            reconstruction_threshold=_number(
                privacy, "secagg_reconstruction_threshold", 0.67
            ),
            clipping_range=_number(privacy, "secagg_clipping_range", 8.0),
            quantization_range=int(
                _number(privacy, "secagg_quantization_range", 2**22, whole=True)
            ),
            max_weight=_number(privacy, "secagg_max_weight", 1000.0),
        )
        if not 0 < options.reconstruction_threshold <= 1:
            raise ConfigurationError(
                "[privacy] secagg_reconstruction_threshold must be in (0, 1], not"
                f" {options.reconstruction_threshold}"
            )
        if not options.clipping_range > 0 or not options.max_weight > 0:
            raise ConfigurationError(
                "[privacy] secagg_clipping_range and secagg_max_weight must be positive"
            )
        if not 0 < options.quantization_range <= MODULUS_RANGE // 1024:
            raise ConfigurationError(
                "[privacy] secagg_quantization_range must be in (0,"
                f" {MODULUS_RANGE // 1024}], not {options.quantization_range}"
            )
        return options


def secure_aggregation_enabled(privacy: Mapping[str, Any]) -> bool:
    """Return whether a federation's ``[privacy]`` table turns SecAgg+ on.

    Raises
    ------
    ConfigurationError
        When ``secure_aggregation`` is not ``true`` or ``false``.
    """
    value = privacy.get("secure_aggregation", False)
    if not isinstance(value, bool):
        raise ConfigurationError(
            f"[privacy] secure_aggregation must be true or false, not {value!r}"
        )
    return value


def _number(
    privacy: Mapping[str, Any], key: str, default: float, *, whole: bool = False
) -> float:
    """Return a numeric ``[privacy]`` value, or raise ConfigurationError."""
    value = privacy.get(key, default)
    kinds = (int,) if whole else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if whole else "a number"
        raise ConfigurationError(f"[privacy] {key} must be {kind}, not {value!r}")
    return float(value)


class SecureAggregationGrid:
    """A grid that runs every train round of a strategy through SecAgg+.

    Evaluate messages pass through unchanged. After a train round,
    :attr:`traffic` contains the bytes the protocol's four stages sent and
    the bytes of each site's replies.
    """

    def __init__(
        self,
        grid: Any,
        options: SecureAggregationOptions,
        *,
        archive: Any | None = None,
    ) -> None:
        self._grid = grid
        self.options = options
        self._archive = archive
        self.traffic: dict[str, Any] = {"sent": 0, "received": {}}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Any], *, timeout: float | None = None
    ) -> list[Any]:
        """Exchange ``messages``; a train round is aggregated securely."""
        from flwr.app.message_type import MessageType

        messages = list(messages)
        if not messages or any(
            m.metadata.message_type != MessageType.TRAIN for m in messages
        ):
            return list(self._grid.send_and_receive(messages, timeout=timeout))
        return self._secure_round(messages, timeout)

    def _secure_round(self, messages: list[Any], timeout: float | None) -> list[Any]:
        import flwr.compat.common.recorddict_compat as compat
        from flwr.app import ConfigRecord, Context, MetricRecord, RecordDict
        from flwr.common import (
            FitIns,
            ndarrays_to_parameters,
            parameters_to_ndarrays,
        )
        from flwr.server.compat.grid_client_proxy import GridClientProxy
        from flwr.server.compat.legacy_context import LegacyContext
        from flwr.server.workflow import SecAggPlusWorkflow
        from flwr.server.workflow.constant import (
            MAIN_CONFIGS_RECORD,
            MAIN_PARAMS_RECORD,
            Key,
        )

        from workbench.federation.weights import to_array_record

        started = time.monotonic()
        first = messages[0]
        names = list(first.content["arrays"].keys())
        global_arrays = [first.content["arrays"][name].numpy() for name in names]
        config = dict(first.content["config"])
        server_round = int(config["server-round"])
        config[ARRAY_NAMES_KEY] = json.dumps(names)
        run_id = int(first.metadata.run_id)
        nodes = [int(m.metadata.dst_node_id) for m in messages]
        if len(nodes) < 2:
            raise SecureAggregationError(
                f"round {server_round}: secure aggregation needs at least two sites,"
                f" {len(nodes)} sampled; raise min_sites or fraction"
            )

        collector = _ResultCollector(
            {
                node: (
                    GridClientProxy(node, self._grid, run_id),
                    FitIns(ndarrays_to_parameters(global_arrays), dict(config)),
                )
                for node in nodes
            }
        )
        state = RecordDict(
            {
                MAIN_CONFIGS_RECORD: ConfigRecord({Key.CURRENT_ROUND: server_round}),
                MAIN_PARAMS_RECORD: compat.parameters_to_arrayrecord(
                    ndarrays_to_parameters(global_arrays), True
                ),
            }
        )
        context = LegacyContext(
            Context(
                run_id=run_id, node_id=0, node_config={}, state=state, run_config={}
            ),
            strategy=collector,  # type: ignore[arg-type]
        )
        stages = _StageRecorder(self._grid, self._archive, server_round)
        workflow = SecAggPlusWorkflow(
            num_shares=1.0,
            reconstruction_threshold=self.options.reconstruction_threshold,
            max_weight=self.options.max_weight,
            clipping_range=self.options.clipping_range,
            quantization_range=self.options.quantization_range,
            modulus_range=MODULUS_RANGE,
            timeout=timeout,
        )
        workflow(stages, context)
        self.traffic = {"sent": stages.sent, "received": dict(stages.received)}
        if collector.results is None:
            raise SecureAggregationError(
                f"round {server_round}: secure aggregation stopped with"
                f" {len(stages.answered)} of {len(nodes)} sites answering every stage"
                f" (errors: {stages.errors or 'none'}); each site's key shares must"
                " reach enough of its neighbours to remove the masks",
            )

        replies = []
        for proxy, fitres in collector.results:
            update = parameters_to_ndarrays(fitres.parameters)
            arrays = {
                name: (base + delta).astype(base.dtype)
                for name, base, delta in zip(names, global_arrays, update, strict=True)
            }
            reply = stages.masked[int(proxy.node_id)]
            reply.content = RecordDict(
                {
                    "arrays": to_array_record(arrays),
                    "metrics": MetricRecord(
                        {k: v for k, v in fitres.metrics.items() if _is_number(v)}
                    ),
                }
            )
            replies.append(reply)
        log.info(
            "round %d: securely aggregated the updates of %d of %d sites in %.1f s"
            " (%d bytes sent, %d received)",
            server_round,
            len(replies),
            len(nodes),
            time.monotonic() - started,
            stages.sent,
            sum(stages.received.values()),
        )
        return replies


def secure_aggregation_mod(message: Any, context: Any, call_next: Any) -> Any:
    """Handle the train messages of a securely aggregated run (a ClientApp mod).

    Runs that do not ask for secure aggregation, and evaluate messages, pass
    through. The site's admission check runs on the protocol's first message, so
    a refused run never gets the site's keys.
    """
    from flwr.app.message_type import MessageType
    from flwr.client.mod import secaggplus_mod
    from flwr.common.secure_aggregation.secaggplus_constants import (
        RECORD_KEY_CONFIGS,
        Key,
        Stage,
    )

    from workbench.federation.plan import RunPlan

    if message.metadata.message_type != MessageType.TRAIN or "plan" not in (
        context.run_config
    ):
        return call_next(message, context)
    plan = RunPlan.from_json(str(context.run_config["plan"]))
    if not secure_aggregation_enabled(plan.config.privacy):
        return call_next(message, context)
    stage = message.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)
    if stage == Stage.SETUP:
        refusal = _refusal(message, context, plan)
        if refusal is not None:
            return refusal

    def train(inner: Any, inner_context: Any) -> Any:
        return _train_update(inner, inner_context, call_next, plan)

    return secaggplus_mod(message, context, train)


class SiteRoundFailedError(WorkbenchError):
    """The site's handler returned an error for a securely aggregated round."""


def _train_update(message: Any, context: Any, call_next: Any, plan: Any) -> Any:
    """Train through the site's handler; return its update as a legacy FitRes."""
    import flwr.compat.common.recorddict_compat as compat
    from flwr.app import ConfigRecord, RecordDict
    from flwr.common import (
        Code,
        FitRes,
        Status,
        ndarrays_to_parameters,
        parameters_to_ndarrays,
    )

    from workbench.federation.client import SITE_CONFIG_KEY
    from workbench.federation.site import SiteConfig
    from workbench.federation.weights import to_array_record

    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    config = dict(fitins.config)
    names = json.loads(str(config.pop(ARRAY_NAMES_KEY)))
    received = parameters_to_ndarrays(fitins.parameters)
    message.content = RecordDict(
        {
            "arrays": to_array_record(dict(zip(names, received, strict=True))),
            "config": ConfigRecord(config),
        }
    )
    reply = call_next(message, context)
    if reply.has_error():
        # The handler's reasons are fixed phrases; Flower sends this text back.
        raise SiteRoundFailedError(str(reply.error.reason))
    options = SecureAggregationOptions.from_privacy(plan.config.privacy)
    arrays = reply.content["arrays"]
    update = [
        (arrays[name].numpy() - base).astype(np.float32)
        for name, base in zip(names, received, strict=True)
    ]
    clipped = sum(int((np.abs(u) > options.clipping_range).sum()) for u in update)
    if clipped:
        log.warning(
            "round %s: %d values of the site's update exceed the secure aggregation"
            " clipping range %.3g and are clipped",
            config.get("server-round"),
            clipped,
            options.clipping_range,
        )
    metrics = dict(reply.content["metrics"])
    examples = int(metrics["num-examples"])
    # The mod quantizes by stochastic rounding with NumPy's global generator:
    # seeded, a simulation with a seed gives the same aggregate every time.
    site = SiteConfig.load(str(context.node_config[SITE_CONFIG_KEY])).site
    np.random.seed(
        (
            plan.config.seed * 7919
            + int(config["server-round"]) * 31
            + zlib.crc32(site.encode())
        )
        % 2**32
    )
    reply.content = compat.fitres_to_recorddict(
        FitRes(
            status=Status(Code.OK, "update ready"),
            parameters=ndarrays_to_parameters(update),
            num_examples=examples,
            metrics=metrics,
        ),
        keep_input=False,
    )
    return reply


def _refusal(message: Any, context: Any, plan: Any) -> Any | None:
    """Return the site's refusal of the run, or None when the site accepts it."""
    from flwr.app import Error, Message

    from workbench.federation.client import ERROR_REFUSED, SITE_CONFIG_KEY
    from workbench.federation.site import (
        RunRefusedError,
        SiteConfig,
        admit,
        open_site_audit,
    )

    site = SiteConfig.load(str(context.node_config[SITE_CONFIG_KEY]))
    with open_site_audit() as audit:
        try:
            admit(site, plan, int(message.metadata.run_id), audit)
        except RunRefusedError as exc:
            log.warning("run refused at site %s: %s", site.site, exc)
            return Message(
                Error(code=ERROR_REFUSED, reason=f"refused by site: {exc.reason}"),
                reply_to=message,
            )
    return None


class _ResultCollector:
    """The legacy strategy that the workflow calls: fixed instructions, kept results."""

    def __init__(self, instructions: dict[int, tuple[Any, Any]]) -> None:
        self.instructions = instructions
        self.results: list[tuple[Any, Any]] | None = None

    def configure_fit(
        self, server_round: int, parameters: Any, client_manager: Any
    ) -> list[tuple[Any, Any]]:
        return list(self.instructions.values())

    def aggregate_fit(
        self, server_round: int, results: list[tuple[Any, Any]], failures: list[Any]
    ) -> tuple[None, dict[str, Any]]:
        self.results = sorted(results, key=lambda pair: int(pair[0].node_id))
        return None, {}


class _StageRecorder:
    """The grid the workflow uses: counts bytes, keeps the masked-update replies."""

    def __init__(self, grid: Any, archive: Any | None, server_round: int) -> None:
        self._grid = grid
        self._archive = archive
        self._round = server_round
        self.sent = 0
        self.received: dict[int, int] = {}
        self.masked: dict[int, Any] = {}
        self.answered: set[int] = set()
        self.errors: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(
        self, messages: Iterable[Any], *, timeout: float | None = None
    ) -> list[Any]:
        from flwr.common.secure_aggregation.secaggplus_constants import (
            RECORD_KEY_CONFIGS,
            Key,
            Stage,
        )

        messages = list(messages)
        stage = str(messages[0].content.config_records[RECORD_KEY_CONFIGS][Key.STAGE])
        self.sent += sum(content_bytes(m.content) for m in messages)
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            node = int(reply.metadata.src_node_id)
            if self._archive is not None:
                self._archive(reply, self._round, f"train-{stage}")
            if reply.has_error():
                self.errors.append(f"{node}: {reply.error.reason}")
                self.answered.discard(node)
                continue
            self.received[node] = self.received.get(node, 0) + content_bytes(
                reply.content
            )
            if stage == Stage.COLLECT_MASKED_VECTORS:
                self.masked[node] = reply
        if stage == Stage.SETUP:
            self.answered = {
                int(r.metadata.src_node_id) for r in replies if not r.has_error()
            }
        else:
            self.answered &= {
                int(r.metadata.src_node_id) for r in replies if not r.has_error()
            }
        return replies


def content_bytes(content: Any) -> int:
    """Return the bytes of a message's arrays and of the bytes in its configs."""
    total = sum(
        len(array.data)
        for record in content.array_records.values()
        for array in record.values()
    )
    for record in content.config_records.values():
        for value in record.values():
            items = value if isinstance(value, list) else [value]
            total += sum(len(item) for item in items if isinstance(item, bytes))
    return int(total)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
