"""The functions isolated jobs run: plain arguments in, a JSON summary out.

:func:`workbench.isolation.run_isolated` calls these in a child process with no
network, the datasets read-only and no secrets; every argument is a string, number
or list, so that it crosses the process boundary as JSON.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

__all__ = ["gemma_finetune", "gemma_infer", "infer", "train"]


def train(
    config: str, dataset: str, out: str, purpose: str, labels: str | None = None
) -> dict[str, Any]:
    """Run :func:`workbench.training.run_training`, with an optional labels table."""
    from workbench.training import load_config, run_training

    settings = load_config(config)
    if labels is not None:
        settings = replace(settings, labels=Path(labels))
    return _plain(run_training(settings, dataset, out, purpose=purpose, progress=True))


def infer(
    dataset: str, model: str, out: str, purpose: str, checkpoint: str = "best"
) -> dict[str, Any]:
    """Run :func:`workbench.inference.run_inference` with a trained model folder."""
    from workbench.inference import run_inference

    summary = run_inference(
        dataset, model, out, purpose=purpose, checkpoint=checkpoint, progress=True
    )
    return _plain(summary)


def gemma_infer(
    dataset: str,
    gemma: str,
    prompt: str,
    out: str,
    purpose: str,
    adapter: str | None = None,
    max_new_tokens: int = 32,
    slices: int = 1,
    window: str = "auto",
) -> dict[str, Any]:
    """Run Gemma 3n on one representative image per series."""
    from workbench.gemma import load_gemma, run_gemma_inference

    model = load_gemma(gemma, adapter=adapter)
    summary = run_gemma_inference(
        dataset,
        model,
        prompt,
        out,
        purpose=purpose,
        max_new_tokens=max_new_tokens,
        slices=slices,
        window=window,
    )
    return _plain(summary)


def gemma_finetune(
    dataset: str,
    gemma: str,
    out: str,
    purpose: str,
    prompt: str,
    target_column: str | None = None,
    reports: str | None = None,
    steps: int = 100,
    learning_rate: float = 2e-4,
    lora_rank: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """Fine-tune Gemma 3n with LoRA on the text decoder; write the adapter."""
    from workbench.gemma import run_gemma_finetune

    summary = run_gemma_finetune(
        dataset,
        gemma,
        out,
        purpose=purpose,
        prompt_template=prompt,
        target_column=target_column,
        reports=reports,
        steps=steps,
        learning_rate=learning_rate,
        lora_rank=lora_rank,
        seed=seed,
    )
    return _plain(summary)


def _plain(value: Any) -> Any:
    """Return ``value`` with paths and other objects as JSON-friendly types."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
