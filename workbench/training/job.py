"""The training job: fit a MONAI network to a de-identified dataset from a TOML config.

:func:`run_training` reads the items of the dataset (with
:func:`~workbench.loaders.items.build_items`, as the MONAI loader does), splits
them by patient, trains with Adam, validates after every epoch, and writes the
files listed in :mod:`workbench.training.records`. When the output folder
contains a checkpoint of the same job, it resumes after the last finished epoch.

Every epoch reseeds PyTorch, NumPy, Python and the random transforms from
``seed + epoch``, so two runs with one seed give identical metrics on the CPU, and
a resumed run continues exactly as an uninterrupted one would. On a GPU, cuDNN is
set to deterministic mode, but some operations may still differ between runs.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from workbench.audit import AuditEvent, open_audit_log
from workbench.dataset.reader import DatasetView
from workbench.errors import ConfigurationError, DatasetError
from workbench.loaders.items import build_items, unique_values
from workbench.loaders.monai import (
    build_transform,
    check_purpose,
    open_view,
    raise_transform_cause,
    record_read,
    wrap_items,
)
from workbench.training.config import (
    RESUMABLE_CHANGES,
    TrainingConfig,
    build_network,
    build_transforms,
    load_config,
)
from workbench.training.records import (
    BEST_CHECKPOINT,
    CONFIG_COPY,
    LAST_CHECKPOINT,
    RUN_FILE,
    SPLIT_FILE,
    file_sha256,
    load_checkpoint,
    plot_history,
    read_run,
    save_checkpoint,
    write_json,
    write_metrics,
)
from workbench.training.split import split_by_patient
from workbench.training.tasks import make_task

__all__ = [
    "as_plain_tensor",
    "audit_job_event",
    "evaluate",
    "network_output",
    "run_training",
    "select_device",
]

log = logging.getLogger(__name__)

# Seeds are taken modulo this: NumPy accepts seeds below 2**32.
SEED_MODULUS = 2**32


def run_training(
    config: TrainingConfig | Mapping[str, Any] | str | Path,
    dataset: str | Path | DatasetView | None,
    out: str | Path,
    *,
    purpose: str,
    progress: bool = False,
) -> dict[str, Any]:
    """Train a MONAI network on a dataset; resume when ``out`` has a checkpoint.

    Parameters
    ----------
    config
        A TOML file, its parsed mapping, or a :class:`TrainingConfig`.
    dataset
        The dataset folder; ``None`` takes ``dataset`` from the config.
    out
        Output folder; created if missing.
    purpose
        Why the data is read; recorded in the audit log.
    progress
        Show a progress bar of the batches of each epoch on standard error.

    Returns
    -------
    dict
        ``out``, ``dataset``, ``dataset_version``, ``task``, ``metric``,
        ``classes``, ``epochs``, ``epochs_run`` (in this call), ``resumed_from``
        (the epoch resumed after, or None), ``best_epoch``, ``best_metric``,
        ``last`` (the latest metrics row), item and patient counts per side, and
        ``seconds``.

    Raises
    ------
    ConfigurationError
        For invalid settings, or an output folder that holds a different job.
    DatasetError
        When the dataset cannot be read, or has too few labelled items or
        patients to split.
    """
    started = time.perf_counter()
    settings = load_config(config)
    check_purpose(purpose)
    source = dataset if dataset is not None else settings.dataset
    if source is None:
        raise ConfigurationError(
            'no dataset given: pass one, or set dataset = "..." in the config'
        )
    view = open_view(source)
    if settings.labels is not None and not settings.labels.is_file():
        raise ConfigurationError(f"labels table {settings.labels} not found")
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    labels_sha256 = file_sha256(settings.labels)
    previous = read_run(out)
    resume = previous is not None and (out / LAST_CHECKPOINT).is_file()
    if resume:
        assert previous is not None
        _check_resumable(previous, settings, view, labels_sha256, out)

    audit_job_event(
        "training.start", view, purpose, {"out": out.name, "resume": resume}
    )
    try:
        summary = _train(settings, view, out, purpose, labels_sha256, resume, progress)
    except BaseException as exc:
        audit_job_event(
            "training.end",
            view,
            purpose,
            {"out": out.name, "error": type(exc).__name__},
            outcome="error",
        )
        raise_transform_cause(exc)
        raise
    summary["seconds"] = round(time.perf_counter() - started, 2)
    audit_job_event(
        "training.end",
        view,
        purpose,
        {
            "out": out.name,
            "epochs_run": summary["epochs_run"],
            "best_epoch": summary["best_epoch"],
        },
    )
    return summary


def _train(
    settings: TrainingConfig,
    view: DatasetView,
    out: Path,
    purpose: str,
    labels_sha256: str | None,
    resume: bool,
    progress: bool,
) -> dict[str, Any]:
    import torch
    from monai.utils import set_determinism

    # 1. Items, classes, and the split by patient.
    items = build_items(
        view,
        settings.level,
        label_column=settings.label_column,
        labels=settings.labels,
        where=settings.where,
        mask_column=settings.mask_column,
    )
    classes = None
    if settings.task == "classification":
        classes, items = _index_classes(items, settings.classes)
    split = split_by_patient(items, settings.validation_fraction, settings.seed)
    train_items = [items[i] for i in split.train]
    validation_items = [items[i] for i in split.validation]
    record_read(
        view,
        purpose,
        {
            "level": settings.level,
            "items": len(items),
            "job": "training",
            "train_items": len(train_items),
            "validation_items": len(validation_items),
        },
    )

    # 2. Record what this run is, so inference and a resumed run can check it.
    write_json(
        out / RUN_FILE,
        {
            "config": settings.to_dict(),
            "dataset": view.name,
            "dataset_version": view.version,
            "labels_sha256": labels_sha256,
            "classes": classes,
            "metric": settings.metric,
            "train_items": len(train_items),
            "validation_items": len(validation_items),
        },
    )
    write_json(
        out / SPLIT_FILE,
        {"train": split.train_patients, "validation": split.validation_patients},
    )
    if settings.source is not None and settings.source != out / CONFIG_COPY:
        shutil.copyfile(settings.source, out / CONFIG_COPY)

    # 3. Network, optimiser and data.
    device = select_device(settings.device)
    set_determinism(seed=settings.seed % SEED_MODULUS)
    network = build_network(settings.model_name, settings.model_args).to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=settings.learning_rate)
    task = make_task(settings.task, settings.metric, classes)
    train_data = _monai_data(view, settings, train_items, train=True)
    validation_data = _monai_data(view, settings, validation_items, train=False)

    # 4. Continue after the last finished epoch, if there is one.
    history: list[dict[str, Any]] = []
    best_epoch: int | None = None
    start = 0
    if resume:
        checkpoint = load_checkpoint(out / LAST_CHECKPOINT, device)
        network.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        history = list(checkpoint["history"])
        best_epoch = checkpoint["best_epoch"]
        start = int(checkpoint["epoch"])
        log.info("resuming %s after epoch %d", out.name, start)
    if start >= settings.epochs:
        log.info(
            "%s has finished %d of %d epochs already", out.name, start, settings.epochs
        )

    # 5. Train, validate and record each epoch.
    for epoch in range(start + 1, settings.epochs + 1):
        epoch_started = time.perf_counter()
        generator = _seed_epoch(settings.seed + epoch, train_data)
        train_loss = _train_epoch(
            network,
            optimizer,
            task,
            train_data,
            settings,
            generator,
            device,
            description=f"epoch {epoch}/{settings.epochs}" if progress else None,
        )
        validation_loss, metric = evaluate(
            network,
            task,
            validation_data,
            settings.batch_size,
            settings.num_workers,
            device,
        )
        row = {
            "epoch": epoch,
            "train_loss": train_loss,
            "val_loss": validation_loss,
            "val_metric": metric,
        }
        history.append(row)
        if best_epoch is None or _rank(row) > _rank(history[best_epoch - 1]):
            best_epoch = epoch
            save_checkpoint(
                out / BEST_CHECKPOINT,
                {"epoch": epoch, "model": network.state_dict(), **_scores(row)},
            )
        save_checkpoint(
            out / LAST_CHECKPOINT,
            {
                "epoch": epoch,
                "model": network.state_dict(),
                "optimizer": optimizer.state_dict(),
                "history": history,
                "best_epoch": best_epoch,
            },
        )
        write_metrics(out, history)
        plot_history(out, history, settings.metric)
        log.info(
            "epoch %d/%d: train loss %.4f, validation loss %.4f, validation %s %.4f"
            " (%.1f s)",
            epoch,
            settings.epochs,
            train_loss,
            validation_loss,
            settings.metric,
            metric,
            time.perf_counter() - epoch_started,
        )

    best = history[best_epoch - 1] if best_epoch else None
    return {
        "out": str(out),
        "dataset": view.name,
        "dataset_version": view.version,
        "task": settings.task,
        "metric": settings.metric,
        "classes": classes,
        "epochs": settings.epochs,
        "epochs_run": max(0, settings.epochs - start),
        "resumed_from": start if resume else None,
        "best_epoch": best_epoch,
        "best_metric": best["val_metric"] if best else None,
        "last": history[-1] if history else None,
        "train_items": len(train_items),
        "validation_items": len(validation_items),
        "train_patients": len(split.train_patients),
        "validation_patients": len(split.validation_patients),
    }


def evaluate(
    network: Any,
    task: Any,
    dataset: Any,
    batch_size: int,
    num_workers: int,
    device: Any,
) -> tuple[float, float]:
    """Return the mean loss and the metric of ``network`` on ``dataset``."""
    import torch
    from monai.data import DataLoader

    network.eval()
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    accumulator = task.new_metric()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            inputs = as_plain_tensor(batch["image"]).to(device)
            target = task.targets(batch, device)
            output = network_output(network(inputs))
            task.check_output(output, target)
            total += float(task.loss(output, target)) * len(inputs)
            count += len(inputs)
            accumulator.update(output, target)
    return (total / count if count else math.nan), accumulator.result()


def select_device(name: str) -> Any:
    """Return the torch device for ``cpu``, ``cuda`` or ``auto``."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigurationError(
            "training.device is 'cuda' but PyTorch finds no GPU; use 'cpu' or 'auto'"
        )
    return torch.device(name)


def as_plain_tensor(value: Any) -> Any:
    """Return a ``MetaTensor``'s data as a plain tensor (faster through a network)."""
    return value.as_tensor() if hasattr(value, "as_tensor") else value


def network_output(output: Any) -> Any:
    """Return the main output of networks that return several (deep supervision)."""
    if isinstance(output, (list, tuple)):
        return output[0]
    return output


def _train_epoch(
    network: Any,
    optimizer: Any,
    task: Any,
    dataset: Any,
    settings: TrainingConfig,
    generator: Any,
    device: Any,
    description: str | None,
) -> float:
    from monai.data import DataLoader
    from tqdm import tqdm

    network.train()
    # A last batch of one item breaks batch normalisation in training mode.
    drop_last = len(dataset) > settings.batch_size and (
        len(dataset) % settings.batch_size == 1
    )
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=True,
        num_workers=settings.num_workers,
        generator=generator,
        drop_last=drop_last,
    )
    total, count = 0.0, 0
    for batch in tqdm(
        loader, desc=description, leave=False, disable=description is None
    ):
        inputs = as_plain_tensor(batch["image"]).to(device)
        target = task.targets(batch, device)
        optimizer.zero_grad(set_to_none=True)
        output = network_output(network(inputs))
        task.check_output(output, target)
        loss = task.loss(output, target)
        loss.backward()
        optimizer.step()
        total += loss.detach().item() * len(inputs)
        count += len(inputs)
    return total / count if count else math.nan


def _monai_data(
    view: DatasetView,
    settings: TrainingConfig,
    items: list[dict[str, Any]],
    *,
    train: bool,
) -> Any:
    """Return the MONAI dataset of one side of the split, with its transforms."""
    transform = build_transform(
        view,
        settings.level,
        build_transforms(settings.transforms, train=train),
        mask=settings.task == "segmentation",
    )
    cache = None if settings.cache == "none" else settings.cache
    return wrap_items(view, items, transform, settings.level, cache=cache)


def _seed_epoch(seed: int, dataset: Any) -> Any:
    """Seed every random source from ``seed``; return the shuffling generator."""
    import torch
    from monai.utils import set_determinism

    seed %= SEED_MODULUS
    set_determinism(seed=seed)
    dataset.transform.set_random_state(seed=seed)
    return torch.Generator().manual_seed(seed)


def _index_classes(
    items: list[dict[str, Any]], configured: Sequence[Any] | None
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Return the classes and the items with ``label`` as the class index."""
    found = unique_values(items, "label")
    if configured is not None:
        classes = list(configured)
        unknown = [value for value in found if value not in classes]
        if unknown:
            raise ConfigurationError(
                f"labels {unknown[:5]} are not among task.classes {classes}; add them"
                " or leave task.classes out to use every value found"
            )
    else:
        classes = found
    if len(classes) < 2:
        raise DatasetError(
            f"the label column contains a single value {classes}; classification needs"
            " at least two classes"
        )
    index = {value: i for i, value in enumerate(classes)}
    return classes, [{**item, "label": index[item["label"]]} for item in items]


def _rank(row: Mapping[str, Any]) -> tuple[bool, float, float]:
    """Order epochs: a defined metric first, then a higher metric, then lower loss."""
    metric = row["val_metric"]
    defined = not math.isnan(metric)
    return (defined, metric if defined else 0.0, -row["val_loss"])


def _scores(row: Mapping[str, Any]) -> dict[str, float]:
    return {"val_loss": row["val_loss"], "val_metric": row["val_metric"]}


def _check_resumable(
    previous: Mapping[str, Any],
    settings: TrainingConfig,
    view: DatasetView,
    labels_sha256: str | None,
    out: Path,
) -> None:
    """Raise a ConfigurationError unless ``out`` contains a run of the same job."""
    old = dict(previous.get("config", {}))
    new = settings.to_dict()
    ignored = RESUMABLE_CHANGES | {"dataset", "source", "labels"}
    changed = sorted(
        key
        for key in set(old) | set(new)
        if key not in ignored and old.get(key) != new.get(key)
    )
    if previous.get("labels_sha256") != labels_sha256:
        changed.append("labels (file content)")
    if previous.get("dataset_version") != view.version:
        changed.append(
            f"dataset version ({previous.get('dataset_version')} before,"
            f" {view.version} now)"
        )
    if changed:
        raise ConfigurationError(
            f"output folder {out} contains a checkpoint of a different job:"
            f" {', '.join(changed)} changed. A resumed job may change only epochs,"
            " num_workers and device; restore the settings or choose a new output"
            " folder"
        )


def audit_job_event(
    action: str,
    view: DatasetView,
    purpose: str,
    details: dict[str, Any],
    outcome: str = "ok",
) -> None:
    """Append a job's start or end event (``training.start`` ...) to the audit log."""
    with open_audit_log() as audit:
        audit.append(
            AuditEvent(
                action=action,
                resource=f"dataset:{view.name}",
                purpose=purpose,
                outcome=outcome,
                details=details,
            )
        )
