"""A federation's settings (TOML) and the run plan sent to the server and the sites.

A federation config is a training config (``[data]``, ``[task]``, ``[model]``,
``[[transforms]]``, ``[training]``, as ``workbench train`` reads it) plus::

    [federation]
    name = "chest-ct"            # sites accept runs of federations they joined
    dataset = "chest-ct"         # the dataset name each site maps to its folder
    purpose = "federated sphere classifier"
    kind = "monai"               # or "gemma-lora"
    rounds = 5
    min_sites = 2                # fewer connected sites: the run waits, then fails
    fraction = 1.0               # share of the connected sites sampled per round
    strategy = "fedavg"          # "fedavg", "fedprox" or "fedadam"
    local_epochs = 1
    seed = 0
    round_timeout_s = 600        # a round ends with the replies received by then
    site_wait_s = 600            # deadline for min_sites sites to be connected
    evaluate = true              # federated evaluation of the global model each round

    [strategy]                   # proximal_mu (fedprox); eta, eta_l, beta_1,
    proximal_mu = 0.01           # beta_2, tau (fedadam)

    [privacy]
    mode = "none"                # or "local-dp": clipping and noise at each site
    clipping_norm = 1.0
    epsilon = 1.0                # per round
    delta = 1e-5
    secure_aggregation = false   # SecAgg+: the coordinator gets only the sum
    secagg_clipping_range = 8.0  # bound on each value of a site's update
    secagg_max_weight = 1000     # bound on a site's example count
    secagg_reconstruction_threshold = 0.67

    [gemma]                      # kind = "gemma-lora" only
    model = "tiny"
    prompt_template = "Which modality is this?"
    target_column = "Modality"
    steps = 4
    lora_rank = 4

Datasets and labels are the sites' business: the config names no folder. The
**model hash** covers the training settings and the source files of the code that
builds and trains the model; a site accepts only hashes it lists, and recomputes the
hash from its own code, so a coordinator cannot announce one hash and ship another
model.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import ConfigurationError
from workbench.federation.secure_aggregation import (
    SecureAggregationOptions,
    secure_aggregation_enabled,
)

__all__ = [
    "KINDS",
    "STRATEGIES",
    "FederationConfig",
    "RunPlan",
    "load_federation_config",
    "model_hash",
]

log = logging.getLogger(__name__)

KINDS = ("monai", "gemma-lora")
STRATEGIES = ("fedavg", "fedprox", "fedadam")
PRIVACY_MODES = ("none", "local-dp")
PRIVACY_KEYS = frozenset(
    {
        "mode",
        "clipping_norm",
        "epsilon",
        "delta",
        "secure_aggregation",
        "secagg_reconstruction_threshold",
        "secagg_clipping_range",
        "secagg_quantization_range",
        "secagg_max_weight",
    }
)
STRATEGY_OPTIONS = {
    "fedavg": frozenset(),
    "fedprox": frozenset({"proximal_mu"}),
    "fedadam": frozenset({"eta", "eta_l", "beta_1", "beta_2", "tau"}),
}
GEMMA_KEYS = frozenset(
    {
        "model",
        "prompt_template",
        "target_column",
        "steps",
        "learning_rate",
        "lora_rank",
        "batch_size",
        "slices",
        "image_size",
        "where",
    }
)
# Training settings that do not change the model a site computes.
LOCAL_ONLY_SETTINGS = ("dataset", "labels", "source", "num_workers", "device", "cache")

# Source files, relative to the workbench package, whose code builds and trains the
# model; their content is part of the model hash.
MODEL_CODE = {
    "monai": (
        "federation/local_round.py",
        "federation/weights.py",
        "loaders/items.py",
        "loaders/monai.py",
        "loaders/transforms.py",
        "training/config.py",
        "training/split.py",
        "training/tasks.py",
    ),
    "gemma-lora": (
        "federation/gemma_round.py",
        "federation/weights.py",
        "gemma/finetune.py",
        "gemma/inputs.py",
        "gemma/model.py",
        "gemma/tiny.py",
        "loaders/gemma.py",
    ),
}


@dataclass(frozen=True)
class FederationConfig:
    """The settings of a federation: who, what, how many rounds and how aggregated.

    Attributes
    ----------
    name, dataset, purpose, kind
        Federation name, dataset name at the sites, purpose for the audit logs,
        and ``monai`` or ``gemma-lora``.
    rounds, min_sites, fraction, strategy, strategy_options, local_epochs, seed
        The federated optimisation.
    round_timeout_s, site_wait_s
        Seconds a round waits for replies, and for ``min_sites`` sites to connect.
    evaluate
        Whether sites evaluate the global model after each round.
    privacy
        ``mode`` (``none`` or ``local-dp``), ``clipping_norm``, ``epsilon``,
        ``delta``; ``secure_aggregation`` and the ``secagg_*`` options of
        :class:`~workbench.federation.secure_aggregation.SecureAggregationOptions`.
    training
        The training settings as :meth:`TrainingConfig.to_dict` writes them
        (``monai``), or empty.
    gemma
        The Gemma LoRA settings (``gemma-lora``), or empty.
    source
        The TOML file read.
    """

    name: str
    dataset: str
    purpose: str
    kind: str = "monai"
    rounds: int = 3
    min_sites: int = 2
    fraction: float = 1.0
    strategy: str = "fedavg"
    strategy_options: dict[str, float] = field(default_factory=dict)
    local_epochs: int = 1
    seed: int = 0
    round_timeout_s: float = 600.0
    site_wait_s: float = 600.0
    evaluate: bool = True
    privacy: dict[str, Any] = field(default_factory=lambda: {"mode": "none"})
    training: dict[str, Any] = field(default_factory=dict)
    gemma: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    def __post_init__(self) -> None:
        for key, value in (("name", self.name), ("dataset", self.dataset)):
            if not isinstance(value, str) or not value.strip():
                raise ConfigurationError(f"[federation] {key} must be a non-empty text")
        if not self.purpose.strip():
            raise ConfigurationError(
                "[federation] purpose is empty; say why the sites' data is read, for"
                " their audit logs"
            )
        _choice("federation.kind", self.kind, KINDS)
        _choice("federation.strategy", self.strategy, STRATEGIES)
        _choice("privacy.mode", self.privacy.get("mode", "none"), PRIVACY_MODES)
        for key, value, low in (
            ("rounds", self.rounds, 1),
            ("min_sites", self.min_sites, 1),
            ("local_epochs", self.local_epochs, 1),
            ("seed", self.seed, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigurationError(
                    f"[federation] {key} must be an integer of at least {low}, not"
                    f" {value!r}"
                )
        if not 0 < self.fraction <= 1:
            raise ConfigurationError(
                f"[federation] fraction must be in (0, 1], not {self.fraction!r}"
            )
        for key in ("round_timeout_s", "site_wait_s"):
            if not getattr(self, key) > 0:
                raise ConfigurationError(f"[federation] {key} must be positive")
        unknown = set(self.strategy_options) - STRATEGY_OPTIONS[self.strategy]
        if unknown:
            raise ConfigurationError(
                f"[strategy] has options {sorted(unknown)} that {self.strategy} does"
                f" not take; it takes {sorted(STRATEGY_OPTIONS[self.strategy])}"
            )
        unknown_privacy = set(self.privacy) - PRIVACY_KEYS
        if unknown_privacy:
            raise ConfigurationError(
                f"[privacy] has unknown keys {sorted(unknown_privacy)}; expected some"
                f" of {sorted(PRIVACY_KEYS)}"
            )
        if secure_aggregation_enabled(self.privacy):
            SecureAggregationOptions.from_privacy(self.privacy)
            if self.min_sites < 2:
                raise ConfigurationError(
                    "[privacy] secure_aggregation needs min_sites of at least 2: the"
                    " sum of one site's update is that update"
                )
        elif any(key.startswith("secagg_") for key in self.privacy):
            log.warning(
                "[privacy] has secagg_* options but secure_aggregation is not true;"
                " the rounds are not securely aggregated"
            )
        if self.privacy.get("mode") == "local-dp":
            for key in ("clipping_norm", "epsilon", "delta"):
                if not float(self.privacy.get(key, 0)) > 0:
                    raise ConfigurationError(
                        f"[privacy] {key} must be positive for local-dp"
                    )
        if self.kind == "monai":
            if not self.training:
                raise ConfigurationError(
                    "a monai federation needs [model], [task] and [training] sections"
                )
            if self.training.get("task") == "classification" and not self.training.get(
                "classes"
            ):
                raise ConfigurationError(
                    "[task] classes must be listed in a federation (for example"
                    " classes = [false, true]): sites may hold different label values,"
                    " and every site's network needs the same output order"
                )
        else:
            unknown = set(self.gemma) - GEMMA_KEYS
            if unknown or "prompt_template" not in self.gemma:
                raise ConfigurationError(
                    f"[gemma] needs prompt_template and takes {sorted(GEMMA_KEYS)};"
                    f" unknown keys: {sorted(unknown)}"
                )

    def with_overrides(self, **changes: Any) -> FederationConfig:
        """Return a copy with some settings changed (and checked again)."""
        values = asdict(self)
        values.update({k: v for k, v in changes.items() if v is not None})
        return FederationConfig(**values)

    def model_settings(self) -> dict[str, Any]:
        """Return the settings that decide the model a site computes."""
        if self.kind == "monai":
            training = {
                k: v for k, v in self.training.items() if k not in LOCAL_ONLY_SETTINGS
            }
            return {"kind": self.kind, "training": training}
        return {"kind": self.kind, "gemma": self.gemma}


@dataclass(frozen=True)
class RunPlan:
    """Everything a run's ServerApp and ClientApps need, sent as JSON in the run config.

    Attributes
    ----------
    config
        The federation settings.
    model_hash
        :func:`model_hash` of ``config``, as the coordinator computed it.
    output
        Coordinator folder for checkpoints, metrics and reports.
    sites
        Names of the sites expected to take part (for the coordinator's log).
    start_round
        The first round of this run; above 1 when resuming a checkpoint.
    initial_weights
        Global weights to start from (``.npz``): a new model's weights, written by
        the coordinator before it submits the run, or the checkpoint a resumed run
        continues from. None lets the ServerApp build a new model itself.
    keep_replies
        Whether the server archives every reply it receives, for inspection.
    validation_dataset, validation_labels
        A dataset folder (and labels table) at the coordinator for server-side
        evaluation, or None.
    """

    config: FederationConfig
    model_hash: str
    output: str
    sites: list[str] = field(default_factory=list)
    start_round: int = 1
    initial_weights: str | None = None
    keep_replies: bool = False
    validation_dataset: str | None = None
    validation_labels: str | None = None

    def to_json(self) -> str:
        """Return the plan as JSON text (keys sorted)."""
        return json.dumps(asdict(self), sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> RunPlan:
        """Read a plan written by :meth:`to_json`.

        Raises
        ------
        ConfigurationError
            When the text is not a plan.
        """
        try:
            values = json.loads(text)
            values["config"] = FederationConfig(**values["config"])
            return cls(**values)
        except (ValueError, TypeError, KeyError) as exc:
            raise ConfigurationError(f"the run's plan is not readable: {exc}") from exc

    @property
    def end_round(self) -> int:
        """The last round number of the federation."""
        return self.config.rounds


def load_federation_config(path: str | Path) -> FederationConfig:
    """Read a federation config from TOML.

    Raises
    ------
    ConfigurationError
        When the file is missing, not TOML, or a setting is invalid.
    """
    from workbench.training.config import TrainingConfig

    source = Path(path).expanduser().resolve()
    try:
        data = tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigurationError(f"federation config {source} not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(
            f"federation config {source} is not valid TOML: {exc}"
        ) from exc
    data = copy.deepcopy(data)
    federation = dict(data.pop("federation", {}))
    strategy_options = dict(data.pop("strategy", {}))
    privacy = {"mode": "none", **dict(data.pop("privacy", {}))}
    gemma = dict(data.pop("gemma", {}))
    if "dataset" in data or "labels" in data.get("data", {}):
        raise ConfigurationError(
            f"{source} names a dataset or labels folder; in a federation each site"
            " chooses its own (`workbench federation join --dataset ... --labels ...`)"
        )
    known = {
        "name",
        "dataset",
        "purpose",
        "kind",
        "rounds",
        "min_sites",
        "fraction",
        "strategy",
        "local_epochs",
        "seed",
        "round_timeout_s",
        "site_wait_s",
        "evaluate",
    }
    unknown = sorted(set(federation) - known)
    if unknown:
        raise ConfigurationError(
            f"[federation] has unknown keys {unknown}; expected some of {sorted(known)}"
        )
    training: dict[str, Any] = {}
    if federation.get("kind", "monai") == "monai":
        # Labels are a site's file; a placeholder keeps the training checks happy.
        settings = TrainingConfig.from_mapping(data, base=source.parent, source=source)
        training = settings.to_dict()
        for key in LOCAL_ONLY_SETTINGS:
            training.pop(key, None)
    return FederationConfig(
        strategy_options={k: float(v) for k, v in strategy_options.items()},
        privacy=privacy,
        training=training,
        gemma=gemma,
        source=str(source),
        **federation,
    )


def model_hash(config: FederationConfig) -> str:
    """Return ``sha256:<hex>`` over the model settings and the model code's sources.

    Two parties with the same settings and the same workbench source files get the
    same hash; any change to either gives another.
    """
    import workbench

    package = Path(workbench.__file__).resolve().parent
    code = {}
    for relative in MODEL_CODE[config.kind]:
        code[relative] = hashlib.sha256((package / relative).read_bytes()).hexdigest()
    document = json.dumps(
        {"settings": config.model_settings(), "code": code},
        sort_keys=True,
        separators=(",", ":"),
        allow_nan=False,
    )
    return "sha256:" + hashlib.sha256(document.encode("utf-8")).hexdigest()


def check_minimums(config: FederationConfig, registered_sites: int) -> None:
    """Reject a run whose minimum number of sites can never be met.

    Raises
    ------
    ConfigurationError
        When ``min_sites`` exceeds the registered sites, or the fraction of them
        sampled per round is below one site.
    """
    if config.min_sites > registered_sites:
        raise ConfigurationError(
            f"min_sites is {config.min_sites} but only {registered_sites} sites are"
            " registered at this SuperLink; lower --min-sites or register more sites"
            " (`workbench federation certs --sites ...`)"
        )
    if math.floor(registered_sites * config.fraction) < 1 and config.min_sites < 1:
        raise ConfigurationError(
            f"fraction {config.fraction} of {registered_sites} sites samples no site"
        )


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigurationError(
            f"{name} must be one of {list(choices)}, not {value!r}"
        )


def plan_from_mapping(values: Mapping[str, Any]) -> RunPlan:
    """Rebuild a plan from a mapping (for tests and reports)."""
    return RunPlan.from_json(json.dumps(dict(values)))
