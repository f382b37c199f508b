"""LoRA fine-tuning of Gemma 3n's text decoder on series of a de-identified dataset.

:func:`run_gemma_finetune` teaches the model to answer a prompt about a series'
images with a target text (a report, or a column such as SeriesDescription). Only
low-rank adapters on the attention projections (q, k, v, o) of the language model
are trained. The vision and audio towers, the embeddings and every other weight
stay frozen. The job writes to its output folder:

- ``adapter/``: the LoRA adapter (``peft`` format), loadable onto the same base
  model with ``load_gemma(spec, adapter=...)``;
- ``loss.csv``: the training loss of each step;
- ``finetune.json``: settings, trainable parameters, target modules and losses.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from workbench.dataset.reader import DatasetView
from workbench.errors import ConfigurationError
from workbench.gemma.inference import as_loaded_gemma
from workbench.gemma.inputs import collate_training, encode_training
from workbench.gemma.model import (
    GemmaError,
    LoadedGemma,
    peft_renaming_warning_ignored,
)

__all__ = [
    "ADAPTER_DIR",
    "LORA_TARGET_PATTERN",
    "LOSS_FILE",
    "SUMMARY_FILE",
    "lora_target_modules",
    "run_gemma_finetune",
    "target_losses",
]

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
LOSS_FILE = "loss.csv"
SUMMARY_FILE = "finetune.json"

# Attention projections of the language model's decoder layers, and nothing else.
# Layers that share another layer's keys and values have no k_proj or v_proj.
LORA_TARGET_PATTERN = r".*\.language_model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj"
FROZEN_TOWERS = ("vision_tower", "audio_tower", "embed_vision", "embed_audio")
# Share of the steps, at each end, whose mean loss is compared to see the loss fall.
LOSS_WINDOW_SHARE = 0.2
# Gradients are clipped to this global norm, which keeps the first steps stable.
MAX_GRAD_NORM = 1.0


def lora_target_modules(model: Any) -> list[str]:
    """Return the names of the modules LoRA adapts: the decoder's attention
    projections.

    Raises
    ------
    GemmaError
        When no module matches, or a match lies inside a vision or audio module.
    """
    pattern = re.compile(LORA_TARGET_PATTERN)
    names = [name for name, _ in model.named_modules() if pattern.fullmatch(name)]
    if not names:
        raise GemmaError(
            f"no module of {type(model).__name__} matches {LORA_TARGET_PATTERN!r};"
            " fine-tuning needs a Gemma3nForConditionalGeneration"
        )
    misplaced = [n for n in names if any(t in n.split(".") for t in FROZEN_TOWERS)]
    if misplaced:
        raise GemmaError(
            f"LoRA target {misplaced[0]} lies in a vision or audio module; only the"
            " language model's attention may be adapted"
        )
    return names


def _check_trainable(model: Any) -> int:
    """Return the trainable parameter count; raise unless all are decoder LoRA."""
    count = 0
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if "lora_" not in name or ".language_model." not in name:
            raise GemmaError(
                f"parameter {name} would be trained; only LoRA weights of the"
                " language model's attention may be"
            )
        count += parameter.numel()
    if count == 0:
        raise GemmaError("the LoRA model has no trainable parameters")
    return count


def _check_finite(loss: Any, logits: Any, step: int) -> None:
    import torch

    if not bool(torch.isfinite(loss)):
        raise GemmaError(
            f"the training loss is {float(loss.detach())} at step {step}; lower the"
            " learning rate or use float32"
        )
    if not bool(torch.isfinite(logits).all()):
        raise GemmaError(
            f"the logits contain NaN or infinity at step {step}; lower the learning"
            " rate or use float32"
        )


def target_losses(
    gemma: LoadedGemma, prompt: str, images: Sequence[Any], targets: Sequence[str]
) -> list[float]:
    """Return the model's mean loss per target token of each candidate text.

    A lower loss means the model finds that text more likely for the prompt and
    images, so ranking candidates by it classifies an example.
    """
    import torch

    losses = []
    with torch.inference_mode():
        for target in targets:
            batch, _ = collate_training(
                gemma, [encode_training(gemma, prompt, images, target)]
            )
            output = gemma.model(**batch)
            _check_finite(output.loss, output.logits, 0)
            losses.append(float(output.loss))
    return losses


def _training_rows(gemma: LoadedGemma, examples: Sequence[Any]) -> list[dict[str, Any]]:
    """Encode the examples that have a target; raise when none has one."""
    with_target = [example for example in examples if example.target is not None]
    if not with_target:
        raise ConfigurationError(
            f"none of the {len(examples)} examples has a target text; set"
            " target_column to a dataset column, or pass reports with one text per"
            " SeriesInstanceUID"
        )
    if len(with_target) < len(examples):
        log.warning(
            "fine-tuning on %d of %d examples; the others have no target text",
            len(with_target),
            len(examples),
        )
    return [
        encode_training(gemma, example.prompt, example.images, example.target)
        for example in with_target
    ]


def _batches(count: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Return the example indices of each step: shuffled epochs, cut into batches."""
    import torch

    shuffler = torch.Generator().manual_seed(seed)
    order: list[int] = []
    batches = []
    for _ in range(steps):
        batch: list[int] = []
        while len(batch) < min(batch_size, count):
            if not order:
                order = torch.randperm(count, generator=shuffler).tolist()
            batch.append(order.pop())
        batches.append(batch)
    return batches


def run_gemma_finetune(
    dataset: DatasetView | str | os.PathLike[str],
    gemma: LoadedGemma | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    purpose: str,
    prompt_template: str,
    target_column: str | None = None,
    reports: str | os.PathLike[str] | Any | None = None,
    steps: int = 100,
    learning_rate: float = 2e-4,
    lora_rank: int = 8,
    lora_alpha: int | None = None,
    lora_dropout: float = 0.0,
    batch_size: int = 4,
    seed: int = 0,
    slices: int = 1,
    window: Any = "auto",
    image_size: int | tuple[int, int] | None = None,
    where: Mapping[str, Any] | None = None,
    device: Any = "auto",
    dtype: Any = None,
) -> dict[str, Any]:
    """Fine-tune LoRA adapters on the text decoder's attention and save them.

    Parameters
    ----------
    dataset
        A :class:`DatasetView` or a de-identified dataset folder.
    gemma
        A :class:`LoadedGemma`, ``"tiny"`` or a local checkpoint folder. A
        :class:`LoadedGemma` passed in is changed: afterwards its ``model`` is the
        adapted model and its ``adapter`` the saved adapter folder.
    out
        Output folder for ``adapter/``, ``loss.csv`` and ``finetune.json``.
    purpose
        Why the dataset is read; recorded in the audit log.
    prompt_template, target_column, reports, slices, window, image_size, where
        How examples and their target texts are built; see
        :func:`~workbench.loaders.gemma.gemma_examples`.
    steps
        Number of optimiser steps.
    learning_rate
        AdamW learning rate of the adapter weights.
    lora_rank, lora_alpha, lora_dropout
        LoRA settings; ``lora_alpha`` defaults to twice the rank.
    batch_size
        Examples per step (fewer when the dataset has fewer).
    seed
        Seed of the adapter initialisation and the example order.
    device, dtype
        Used when ``gemma`` still has to be loaded; see :func:`load_gemma`.

    Returns
    -------
    dict
        The contents of ``finetune.json``: settings, ``trainable_parameters``,
        ``target_modules``, ``loss_first`` and ``loss_last`` (first and last
        step), ``loss_start`` and ``loss_end`` (means over the first and last
        fifth of the steps) and the output paths.

    Raises
    ------
    ConfigurationError
        When a setting is out of range or no example has a target text.
    GemmaError
        When the loss or the logits stop being finite, or LoRA would touch a
        module other than the decoder's attention.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from workbench.loaders.gemma import gemma_examples

    if steps < 1 or lora_rank < 1 or batch_size < 1 or not learning_rate > 0:
        raise ConfigurationError(
            f"steps ({steps}), lora_rank ({lora_rank}) and batch_size ({batch_size})"
            f" must be 1 or more and learning_rate ({learning_rate}) positive"
        )
    started = time.perf_counter()
    loaded = as_loaded_gemma(gemma, device=device, dtype=dtype)
    examples = gemma_examples(
        dataset,
        purpose=purpose,
        prompt_template=prompt_template,
        target_column=target_column,
        reports=reports,
        slices=slices,
        window=window,
        image_size=image_size,
        where=where,
    )
    rows = _training_rows(loaded, examples)

    # Wrap the model with adapters on the decoder's attention projections only.
    targets = lora_target_modules(loaded.model)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=lora_rank,
        lora_alpha=lora_alpha if lora_alpha is not None else 2 * lora_rank,
        lora_dropout=lora_dropout,
        target_modules=LORA_TARGET_PATTERN,
        bias="none",
    )
    with peft_renaming_warning_ignored():
        model = get_peft_model(loaded.model, config)
    trainable = _check_trainable(model)
    total = sum(parameter.numel() for parameter in model.parameters())
    log.info(
        "LoRA rank %d on %d attention projections: %d trainable of %d parameters",
        lora_rank,
        len(targets),
        trainable,
        total,
    )
    log.debug("LoRA target modules: %s", ", ".join(targets))

    # Train, keeping the frozen towers in evaluation mode.
    base = model.get_base_model()
    model.train()
    for tower in ("vision_tower", "audio_tower"):
        getattr(base.model, tower).eval()
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=0.0)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    losses: list[float] = []
    with (folder / LOSS_FILE).open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "loss", "examples", "seconds"])
        for step, indices in enumerate(_batches(len(rows), batch_size, steps, seed), 1):
            step_started = time.perf_counter()
            batch, _ = collate_training(loaded, [rows[i] for i in indices])
            output = model(**batch)
            _check_finite(output.loss, output.logits, step)
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss = float(output.loss.detach())
            losses.append(loss)
            seconds = time.perf_counter() - step_started
            writer.writerow([step, f"{loss:.6f}", len(indices), f"{seconds:.4f}"])
            log.debug("step %d: loss %.4f in %.2f s", step, loss, seconds)
    model.eval()

    # Save the adapter and the summary, and point the caller's LoadedGemma at both.
    adapter_dir = folder / ADAPTER_DIR
    model.save_pretrained(str(adapter_dir))
    loaded.model = model
    loaded.adapter = str(adapter_dir.resolve())
    window_size = max(1, math.ceil(len(losses) * LOSS_WINDOW_SHARE))
    loss_start = sum(losses[:window_size]) / window_size
    loss_end = sum(losses[-window_size:]) / window_size
    if not loss_end < loss_start:
        log.warning(
            "the loss did not fall: %.4f over the first %d steps, %.4f over the last",
            loss_start,
            window_size,
            loss_end,
        )
    summary: dict[str, Any] = {
        "model": loaded.spec,
        "adapter": loaded.adapter,
        "loss_csv": str((folder / LOSS_FILE).resolve()),
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "examples": len(rows),
        "steps": steps,
        "batch_size": min(batch_size, len(rows)),
        "learning_rate": learning_rate,
        "lora_rank": lora_rank,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": lora_dropout,
        "seed": seed,
        "target_pattern": LORA_TARGET_PATTERN,
        "target_modules": targets,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "loss_start": loss_start,
        "loss_end": loss_end,
        "seconds": time.perf_counter() - started,
    }
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    log.info(
        "fine-tuned Gemma 3n for %d steps on %d examples in %.1f s: loss %.4f -> %.4f",
        steps,
        len(rows),
        summary["seconds"],
        loss_start,
        loss_end,
    )
    return summary
