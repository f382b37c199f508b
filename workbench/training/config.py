"""Training job settings: read from TOML, checked, and turned into MONAI objects.

A training job is described in TOML (see ``workbench/configs/*.toml``)::

    dataset = "../datasets/demo"        # optional; relative to this file

    [data]
    level = "slice"                     # or "volume"
    where = { Modality = "CT" }         # Parquet rows to use
    labels = "labels.csv"               # omit to read label_column from Parquet
    label_column = "sphere"             # classification
    # mask_column = "mask"              # segmentation: .npy mask file per item
    cache = "memory"                    # "none", "memory" or "persistent"
    num_workers = 0                     # DataLoader worker processes

    [task]
    type = "classification"             # or "segmentation"
    metric = "roc_auc"                  # accuracy or roc_auc; dice for segmentation
    # classes = [false, true]           # label values in output order (default: sorted)

    [model]                             # a class of monai.networks.nets
    name = "DenseNet121"
    args = { spatial_dims = 2, in_channels = 1, out_channels = 2 }

    [[transforms]]                      # classes of monai.transforms, dictionary form
    name = "ScaleIntensityRanged"
    args = { keys = ["image"], a_min = -1000, a_max = 1000, b_min = 0, b_max = 1 }

    [[transforms]]
    name = "RandFlipd"
    args = { keys = ["image"], prob = 0.5, spatial_axis = 0 }
    train_only = true                   # not applied to validation or inference

    [training]
    epochs = 10
    batch_size = 8
    learning_rate = 1e-3
    validation_fraction = 0.2           # share of patients held out
    seed = 0
    device = "auto"                     # "cpu", "cuda" or "auto"

Relative paths are taken relative to the TOML file's folder. Unknown keys are
errors, so a misspelt setting never passes unnoticed.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from workbench.errors import ConfigurationError
from workbench.loaders.items import LEVELS

__all__ = [
    "METRICS",
    "TASKS",
    "TrainingConfig",
    "TransformSpec",
    "build_network",
    "build_transforms",
    "load_config",
]

TASKS = ("classification", "segmentation")
METRICS = {"classification": ("accuracy", "roc_auc"), "segmentation": ("dice",)}
DEFAULT_METRIC = {"classification": "accuracy", "segmentation": "dice"}
CACHES = ("none", "memory", "persistent")
DEVICES = ("auto", "cpu", "cuda")

# Settings a resumed run may change: they do not change what is learnt.
RESUMABLE_CHANGES = frozenset({"epochs", "num_workers", "device"})

_SECTIONS: dict[str, frozenset[str]] = {
    "data": frozenset(
        {"level", "where", "labels", "label_column", "mask_column", "cache"}
        | {"num_workers"}
    ),
    "task": frozenset({"type", "metric", "classes"}),
    "model": frozenset({"name", "args"}),
    "training": frozenset(
        {"epochs", "batch_size", "learning_rate", "validation_fraction", "seed"}
        | {"device"}
    ),
}
_TRANSFORM_KEYS = frozenset({"name", "args", "train_only"})


@dataclass(frozen=True)
class TransformSpec:
    """One MONAI dictionary transform by class name and keyword arguments."""

    name: str
    args: dict[str, Any] = field(default_factory=dict)
    train_only: bool = False


@dataclass(frozen=True)
class TrainingConfig:
    """Every setting of a training job.

    Attributes
    ----------
    dataset
        Dataset folder; ``None`` when the caller passes it.
    level
        ``volume`` or ``slice``.
    where
        Parquet filter, column to value or list of values.
    labels
        Labels table (CSV or Parquet); ``None`` reads ``label_column`` from
        the dataset's Parquet.
    label_column, mask_column
        Label column (classification) and mask file column (segmentation).
    cache
        ``none``, ``memory`` or ``persistent``.
    num_workers
        DataLoader worker processes.
    task, metric, classes
        ``classification`` or ``segmentation``, and the validation metric. For
        classification, ``classes`` lists the label values in the order of the
        network's outputs; ``None`` takes the sorted values found in the data.
    model_name, model_args
        A class of ``monai.networks.nets`` and its keyword arguments.
    transforms
        Transforms after loading, in order.
    epochs, batch_size, learning_rate, validation_fraction, seed, device
        The optimisation: Adam at ``learning_rate``; ``validation_fraction`` of the
        patients held out for validation.
    source
        The TOML file read, if any.
    """

    model_name: str
    model_args: dict[str, Any] = field(default_factory=dict)
    dataset: Path | None = None
    level: str = "slice"
    where: dict[str, Any] | None = None
    labels: Path | None = None
    label_column: str | None = None
    mask_column: str | None = None
    cache: str = "none"
    num_workers: int = 0
    task: str = "classification"
    metric: str = "accuracy"
    classes: list[Any] | None = None
    transforms: tuple[TransformSpec, ...] = ()
    epochs: int = 10
    batch_size: int = 8
    learning_rate: float = 1e-3
    validation_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    source: Path | None = None

    def __post_init__(self) -> None:
        _check_choice("data.level", self.level, LEVELS)
        _check_choice("data.cache", self.cache, CACHES)
        _check_choice("task.type", self.task, TASKS)
        _check_choice(f"task.metric for {self.task}", self.metric, METRICS[self.task])
        _check_choice("training.device", self.device, DEVICES)
        for name, value, low in (
            ("training.epochs", self.epochs, 1),
            ("training.batch_size", self.batch_size, 1),
            ("data.num_workers", self.num_workers, 0),
            ("training.seed", self.seed, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigurationError(
                    f"{name} must be an integer of at least {low}, not {value!r}"
                )
        if not self.learning_rate > 0:
            raise ConfigurationError(
                f"training.learning_rate must be positive, not {self.learning_rate!r}"
            )
        if not 0 < self.validation_fraction < 1:
            raise ConfigurationError(
                "training.validation_fraction must be between 0 and 1 (the share of"
                f" patients held out), not {self.validation_fraction!r}"
            )
        if self.task == "classification" and not self.label_column:
            raise ConfigurationError(
                "classification needs data.label_column: the Parquet or labels table"
                " column that holds each item's class"
            )
        if self.task == "segmentation" and not (self.mask_column and self.labels):
            raise ConfigurationError(
                "segmentation needs data.labels, a labels table, and data.mask_column,"
                " its column naming each item's .npy mask file"
            )

    @classmethod
    def from_mapping(
        cls,
        data: Mapping[str, Any],
        base: Path | None = None,
        source: Path | None = None,
    ) -> TrainingConfig:
        """Build a config from parsed TOML; relative paths start at ``base``.

        Raises
        ------
        ConfigurationError
            For unknown sections or keys, missing required keys or invalid values.
        """
        base = base or Path.cwd()
        known = {"dataset", "transforms", *_SECTIONS}
        _check_keys("the config", data, known)
        sections = {}
        for name, keys in _SECTIONS.items():
            section = data.get(name, {})
            if not isinstance(section, Mapping):
                raise ConfigurationError(f"[{name}] must be a table, not {section!r}")
            _check_keys(f"[{name}]", section, keys)
            sections[name] = section
        model = sections["model"]
        if "name" not in model:
            raise ConfigurationError(
                "[model] needs name, a class of monai.networks.nets such as"
                " 'DenseNet121'"
            )
        task = sections["task"].get("type", "classification")
        data_section = sections["data"]
        training = sections["training"]
        values: dict[str, Any] = {
            "model_name": model["name"],
            "model_args": dict(model.get("args", {})),
            "dataset": _path(data.get("dataset"), base),
            "labels": _path(data_section.get("labels"), base),
            "task": task,
            "metric": sections["task"].get("metric", DEFAULT_METRIC.get(task, "")),
            "classes": sections["task"].get("classes"),
            "transforms": tuple(_transform_specs(data.get("transforms", []))),
            "source": source,
        }
        for key in ("level", "where", "label_column", "mask_column", "cache"):
            if key in data_section:
                values[key] = data_section[key]
        if "num_workers" in data_section:
            values["num_workers"] = data_section["num_workers"]
        for key in _SECTIONS["training"]:
            if key in training:
                values[key] = training[key]
        if isinstance(values.get("learning_rate"), int):
            values["learning_rate"] = float(values["learning_rate"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """Return the settings as JSON-compatible values (paths as text)."""
        result = asdict(self)
        for key in ("dataset", "labels", "source"):
            if result[key] is not None:
                result[key] = str(result[key])
        result["transforms"] = [asdict(spec) for spec in self.transforms]
        return result

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainingConfig:
        """Rebuild a config from :meth:`to_dict` output."""
        values = dict(data)
        for key in ("dataset", "labels", "source"):
            if values.get(key) is not None:
                values[key] = Path(values[key])
        values["transforms"] = tuple(
            TransformSpec(**spec) for spec in values.get("transforms", [])
        )
        return cls(**values)


def load_config(
    config: TrainingConfig | Mapping[str, Any] | str | Path,
) -> TrainingConfig:
    """Return ``config`` as a :class:`TrainingConfig`, reading a TOML file path.

    Raises
    ------
    ConfigurationError
        When the file is missing, not valid TOML, or its settings are invalid.
    """
    if isinstance(config, TrainingConfig):
        return config
    if isinstance(config, Mapping):
        return TrainingConfig.from_mapping(config)
    path = Path(config).expanduser()
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigurationError(f"training config {path} not found") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(
            f"training config {path} is not valid TOML: {exc}"
        ) from exc
    return TrainingConfig.from_mapping(
        data, base=path.resolve().parent, source=path.resolve()
    )


def build_network(name: str, args: Mapping[str, Any]) -> Any:
    """Instantiate ``monai.networks.nets.<name>(**args)``.

    Raises
    ------
    ConfigurationError
        When no such network exists or it rejects the arguments.
    """
    import torch
    from monai.networks import nets

    network_class = getattr(nets, name, None)
    if not (
        isinstance(network_class, type) and issubclass(network_class, torch.nn.Module)
    ):
        candidates = [n for n in dir(nets) if n[:1].isupper()]
        raise ConfigurationError(
            f"network {name!r} not found in monai.networks.nets"
            f"{_did_you_mean(name, candidates)}"
        )
    try:
        return network_class(**args)
    except (TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise ConfigurationError(
            f"network {name} rejected its arguments {dict(args)}: {exc}"
        ) from exc


def build_transforms(specs: tuple[TransformSpec, ...], *, train: bool) -> list[Any]:
    """Instantiate the transforms; ``train=False`` leaves out ``train_only`` ones.

    Raises
    ------
    ConfigurationError
        When a name is not a dictionary transform of ``monai.transforms`` or the
        transform rejects its arguments.
    """
    from monai import transforms

    built = []
    for spec in specs:
        if spec.train_only and not train:
            continue
        transform_class = getattr(transforms, spec.name, None)
        if not (
            isinstance(transform_class, type)
            and issubclass(transform_class, transforms.Transform)
        ):
            candidates = [n for n in dir(transforms) if n[:1].isupper()]
            raise ConfigurationError(
                f"transform {spec.name!r} not found in monai.transforms"
                f"{_did_you_mean(spec.name, candidates)}"
            )
        if not issubclass(transform_class, transforms.MapTransform):
            raise ConfigurationError(
                f"transform {spec.name} works on arrays, but items are dictionaries;"
                f" use its dictionary form {spec.name}d with keys = ['image']"
            )
        try:
            built.append(transform_class(**spec.args))
        except (TypeError, ValueError, AssertionError, KeyError) as exc:
            raise ConfigurationError(
                f"transform {spec.name} rejected its arguments {spec.args}: {exc}"
            ) from exc
    return built


def _transform_specs(entries: Any) -> list[TransformSpec]:
    if not isinstance(entries, list):
        raise ConfigurationError(
            "transforms must be an array of tables: [[transforms]] name = ..., args ="
            " {...}"
        )
    specs = []
    for entry in entries:
        if not isinstance(entry, Mapping) or "name" not in entry:
            raise ConfigurationError(
                f"each [[transforms]] entry needs a name, got {entry!r}"
            )
        _check_keys("[[transforms]]", entry, _TRANSFORM_KEYS)
        specs.append(
            TransformSpec(
                name=str(entry["name"]),
                args=dict(entry.get("args", {})),
                train_only=bool(entry.get("train_only", False)),
            )
        )
    return specs


def _check_keys(
    where: str, data: Mapping[str, Any], known: set[str] | frozenset[str]
) -> None:
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigurationError(
            f"{where} has unknown keys {unknown}; expected some of {sorted(known)}"
        )


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigurationError(
            f"{name} must be one of {list(choices)}, not {value!r}"
        )


def _path(value: Any, base: Path) -> Path | None:
    if value is None:
        return None
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _did_you_mean(name: str, candidates: list[str]) -> str:
    close = difflib.get_close_matches(name, candidates, n=3)
    return f"; did you mean {', '.join(close)}?" if close else ""
