"""Training, inference and Gemma 3n jobs started from a notebook, isolated.

Each function runs the same job as its command (``workbench train``, ``workbench
infer``, ``workbench infer --gemma``, ``workbench finetune-gemma``): it calls the
command's ``launch_*`` function of :mod:`workbench.jobs.commands`, which copies
the config and labels files into ``out/inputs`` and runs the job function of
:mod:`workbench.jobs.entry` through :func:`workbench.isolation.run_isolated`,
and returns the job's summary::

    import workbench.notebook as wb

    ds = wb.open_dataset("datasets/demo", purpose="sphere classifier")
    summary = wb.train(ds, "runs/sphere.toml", "runs/sphere", labels="labels.csv")
    wb.infer(ds, "runs/sphere", "runs/sphere-predictions")

By default a job runs in a child process with no network, the dataset read-only
and no secrets (``isolation="namespaces"``). ``isolation="weak"`` accepts a guard
that blocks only Python's own network calls, for kernels that forbid namespaces,
and ``isolation="none"`` runs the job in the notebook's own process, for debugging.
The audit log records the policy with each job. The job writes to the kernel's
standard output and error, so its progress bars show under the cell while it runs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeAlias

from workbench.errors import ConfigurationError
from workbench.jobs import commands
from workbench.notebook.dataset import AuditedDataset

__all__ = ["ISOLATION_POLICIES", "finetune_gemma", "gemma_infer", "infer", "train"]

log = logging.getLogger(__name__)

# The isolation names of the command line's --isolation, plus "none" for
# --no-isolation, mapped to workbench.isolation.IsolationPolicy values.
ISOLATION_POLICIES = {**commands.POLICIES, "none": "none"}

DatasetLike: TypeAlias = AuditedDataset | str | os.PathLike[str]


def train(
    dataset: DatasetLike,
    config: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    purpose: str | None = None,
    labels: str | os.PathLike[str] | None = None,
    isolation: str = "namespaces",
) -> dict[str, Any]:
    """Train a MONAI model on a dataset in an isolated job, as ``workbench train``.

    Parameters
    ----------
    dataset
        A dataset opened with :func:`~workbench.notebook.open_dataset`, or a
        dataset folder.
    config
        The training config, a TOML file (see :mod:`workbench.training.config`).
    out
        Output folder, outside the dataset: checkpoints, ``metrics.csv``,
        ``loss.png``, ``run.json``, ``split.json``. When it contains a checkpoint of
        the same job, training resumes after its last epoch.
    purpose
        Why the job runs, for the audit log; default the purpose the dataset was
        opened with.
    labels
        A labels table (CSV or Parquet) that replaces the config's ``labels``.
    isolation
        ``"namespaces"`` (default), ``"weak"`` or ``"none"``; see the module
        documentation.

    Returns
    -------
    dict
        The summary of :func:`workbench.training.run_training`: ``best_metric``,
        ``best_epoch``, ``last`` (the last epoch's metrics row), item and patient
        counts per side of the split, ``seconds`` and more.

    Raises
    ------
    ConfigurationError
        For a missing config or labels file, invalid settings, or an unknown
        isolation name.
    DatasetError
        When the dataset is not de-identified and verified, or ``out`` lies
        inside it.
    workbench.isolation.IsolatedJobError
        When the job fails; the message carries its error and traceback.
    """
    policy = _isolation_policy(isolation)
    folder, purpose = _dataset_and_purpose(dataset, purpose)
    result = commands.launch_train(
        folder,
        Path(config),
        _output_folder(out),
        purpose=purpose,
        labels=Path(labels) if labels is not None else None,
        policy=policy,
    )
    return dict(result.value)


def infer(
    dataset: DatasetLike,
    model: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    purpose: str | None = None,
    checkpoint: str = "best",
    isolation: str = "namespaces",
) -> dict[str, Any]:
    """Predict every item of a dataset with a trained model, as ``workbench infer``.

    Parameters
    ----------
    dataset
        An opened dataset or a dataset folder.
    model
        The output folder of :func:`train` (or ``workbench train``); the job
        reads it and cannot change it.
    out
        Output folder for ``predictions.parquet``, outside the dataset.
    purpose
        Why the job runs; default the dataset's purpose.
    checkpoint
        ``"best"`` (highest validation metric) or ``"last"``.
    isolation
        ``"namespaces"`` (default), ``"weak"`` or ``"none"``.

    Returns
    -------
    dict
        The summary of :func:`workbench.inference.run_inference`:
        ``predictions`` (the Parquet path), ``items``, ``checkpoint_epoch``,
        ``seconds`` and more.

    Raises
    ------
    ConfigurationError
        When ``model`` is not a folder, or an option is invalid.
    DatasetError
        When the dataset is not de-identified and verified, or ``out`` lies
        inside it.
    workbench.isolation.IsolatedJobError
        When the job fails.
    """
    policy = _isolation_policy(isolation)
    folder, purpose = _dataset_and_purpose(dataset, purpose)
    result = commands.launch_infer(
        folder,
        Path(model),
        _output_folder(out),
        purpose=purpose,
        checkpoint=checkpoint,
        policy=policy,
    )
    return dict(result.value)


def gemma_infer(
    dataset: DatasetLike,
    gemma: str | os.PathLike[str],
    prompt: str,
    out: str | os.PathLike[str],
    *,
    purpose: str | None = None,
    adapter: str | os.PathLike[str] | None = None,
    max_new_tokens: int = 32,
    slices: int = 1,
    window: str | Sequence[float] = "auto",
    isolation: str = "namespaces",
) -> dict[str, Any]:
    """Answer a prompt about each series with Gemma 3n, as ``workbench infer --gemma``.

    Parameters
    ----------
    dataset
        An opened dataset or a dataset folder.
    gemma
        ``"tiny"`` (a small randomly initialised model) or a local Gemma 3n
        checkpoint folder with a ``config.json``; nothing is downloaded.
    prompt
        A template over the dataset's columns, such as ``"Modality: {Modality}.
        Describe the image."`` (see :func:`workbench.loaders.gemma_examples`).
    out
        Output folder for ``generations.parquet``, outside the dataset.
    purpose
        Why the job runs; default the dataset's purpose.
    adapter
        A LoRA adapter folder written by :func:`finetune_gemma`.
    max_new_tokens
        Maximum length of each answer in tokens.
    slices, window
        Images per series and their display window; see
        :func:`workbench.loaders.gemma_examples`.
    isolation
        ``"namespaces"`` (default), ``"weak"`` or ``"none"``.

    Returns
    -------
    dict
        ``examples``, ``output`` (the Parquet path), ``model``, ``adapter``,
        ``device``, ``dtype`` and ``seconds``.

    Raises
    ------
    ConfigurationError
        When ``gemma`` is neither ``"tiny"`` nor a checkpoint folder, or an option
        is invalid.
    DatasetError
        When the dataset is not de-identified and verified, or ``out`` lies
        inside it.
    workbench.isolation.IsolatedJobError
        When the job fails.
    """
    policy = _isolation_policy(isolation)
    folder, purpose = _dataset_and_purpose(dataset, purpose)
    result = commands.launch_gemma_infer(
        folder,
        str(gemma),
        prompt,
        _output_folder(out),
        purpose=purpose,
        adapter=Path(adapter) if adapter is not None else None,
        max_new_tokens=max_new_tokens,
        slices=slices,
        window=window if isinstance(window, str) else list(window),
        policy=policy,
    )
    return dict(result.value)


def finetune_gemma(
    dataset: DatasetLike,
    gemma: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    prompt: str,
    purpose: str | None = None,
    target_column: str | None = None,
    reports: str | os.PathLike[str] | None = None,
    steps: int = 100,
    learning_rate: float = 2e-4,
    lora_rank: int = 8,
    seed: int = 0,
    isolation: str = "namespaces",
) -> dict[str, Any]:
    """Fine-tune Gemma 3n with LoRA on a dataset, as ``workbench finetune-gemma``.

    Only low-rank adapters on the attention projections of the text decoder are
    trained (see :func:`workbench.gemma.run_gemma_finetune`).

    Parameters
    ----------
    dataset
        An opened dataset or a dataset folder.
    gemma
        ``"tiny"`` or a local Gemma 3n checkpoint folder.
    out
        Output folder, outside the dataset: ``adapter/``, ``loss.csv`` and
        ``finetune.json``.
    prompt
        The prompt template, as for :func:`gemma_infer`.
    purpose
        Why the job runs; default the dataset's purpose.
    target_column
        The dataset column whose value is each series' target text, such as
        ``"Modality"``.
    reports
        Instead of ``target_column``: a CSV or Parquet table with
        ``SeriesInstanceUID`` and ``report`` columns.
    steps, learning_rate, lora_rank, seed
        Optimiser steps, AdamW learning rate, LoRA rank, and the seed of the
        adapter initialisation and the example order.
    isolation
        ``"namespaces"`` (default), ``"weak"`` or ``"none"``.

    Returns
    -------
    dict
        The contents of ``finetune.json``: ``adapter`` (the folder to pass to
        :func:`gemma_infer`), ``loss_start`` and ``loss_end``,
        ``trainable_parameters``, the settings and ``seconds``.

    Raises
    ------
    ConfigurationError
        When both or neither of ``target_column`` and ``reports`` are given, the
        model is not found, or a setting is invalid.
    DatasetError
        When the dataset is not de-identified and verified, or ``out`` lies
        inside it.
    workbench.isolation.IsolatedJobError
        When the job fails.
    """
    if (target_column is None) == (reports is None):
        raise ConfigurationError(
            "finetune_gemma needs exactly one target: target_column (a dataset"
            " column such as 'Modality') or reports (a table of one text per"
            " SeriesInstanceUID)"
        )
    policy = _isolation_policy(isolation)
    folder, purpose = _dataset_and_purpose(dataset, purpose)
    result = commands.launch_gemma_finetune(
        folder,
        str(gemma),
        _output_folder(out),
        purpose=purpose,
        prompt=prompt,
        target_column=target_column,
        reports=Path(reports) if reports is not None else None,
        steps=steps,
        learning_rate=learning_rate,
        lora_rank=lora_rank,
        seed=seed,
        policy=policy,
    )
    return dict(result.value)


def _dataset_and_purpose(dataset: DatasetLike, purpose: str | None) -> tuple[Path, str]:
    """Return the dataset folder, checked, and the purpose of the job."""
    from workbench.dataset.reader import DatasetView

    if isinstance(dataset, AuditedDataset):
        folder = dataset.path
        purpose = purpose if purpose is not None else dataset.purpose
    else:
        folder = DatasetView.open(Path(dataset)).root
    if not isinstance(purpose, str) or not purpose.strip():
        raise ConfigurationError(
            "the job needs a purpose, because the audit log records it: pass"
            " purpose='...', or a dataset opened with wb.open_dataset(path,"
            " purpose='...')"
        )
    return folder, purpose.strip()


def _output_folder(out: str | os.PathLike[str]) -> Path:
    return Path(out).expanduser().resolve()


def _isolation_policy(isolation: str) -> str:
    """Return the :class:`~workbench.isolation.IsolationPolicy` value of a name."""
    policy = ISOLATION_POLICIES.get(isolation)
    if policy is None:
        raise ConfigurationError(
            f"isolation {isolation!r} is unknown; use one of"
            f" {', '.join(map(repr, ISOLATION_POLICIES))}"
        )
    return policy
