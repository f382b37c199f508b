"""Text generation with Gemma 3n for each series of a de-identified dataset.

:func:`run_gemma_inference` builds one example per pixel stack with
:func:`workbench.loaders.gemma.gemma_examples`, generates an answer to the prompt
for each with greedy decoding, and writes ``generations.parquet`` keyed by
SeriesInstanceUID.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from workbench.dataset.reader import DatasetView
from workbench.gemma.inputs import encode_prompt
from workbench.gemma.model import GemmaError, LoadedGemma, load_gemma

__all__ = [
    "GENERATIONS_FILE",
    "as_loaded_gemma",
    "generate_text",
    "run_gemma_inference",
]

log = logging.getLogger(__name__)

GENERATIONS_FILE = "generations.parquet"


def as_loaded_gemma(
    gemma: LoadedGemma | str | os.PathLike[str], *, device: Any, dtype: Any
) -> LoadedGemma:
    """Return ``gemma`` when it is loaded, else load the model it names."""
    if isinstance(gemma, LoadedGemma):
        return gemma
    return load_gemma(gemma, device=device, dtype=dtype)


def _suppressed_token_ids(gemma: LoadedGemma) -> list[int]:
    """Return ids generation must not produce: padding, BOS and multimodal tokens."""
    tokenizer = gemma.processor.tokenizer
    names = (
        *("pad_token", "bos_token"),
        *("image_token", "boi_token", "eoi_token"),
        *("audio_token", "boa_token", "eoa_token"),
    )
    ids = set()
    for name in names:
        token = getattr(tokenizer, name, None)
        if token:
            ids.add(int(tokenizer.convert_tokens_to_ids(token)))
    return sorted(ids)


def generate_text(
    gemma: LoadedGemma,
    prompt: str,
    images: list[Any],
    *,
    max_new_tokens: int = 32,
    series_uid: str | None = None,
) -> tuple[str, int]:
    """Generate an answer to ``prompt`` about ``images`` with greedy decoding.

    Returns
    -------
    tuple
        The answer without special tokens, and the number of tokens generated.

    Raises
    ------
    GemmaError
        When the logits contain NaN or infinity, or the answer is empty.
    """
    import torch

    batch = encode_prompt(gemma, prompt, images)
    prompt_length = int(batch["input_ids"].shape[1])
    with torch.inference_mode():
        output = gemma.model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            min_new_tokens=1,
            do_sample=False,
            suppress_tokens=_suppressed_token_ids(gemma),
            return_dict_in_generate=True,
            output_logits=True,
        )
    for step, logits in enumerate(output.logits):
        if not bool(torch.isfinite(logits).all()):
            raise GemmaError(
                f"the model produced NaN or infinite logits at generated token"
                f" {step}; the checkpoint or dtype is broken (try float32)",
                series_uid=series_uid,
            )
    new_tokens = output.sequences[0, prompt_length:]
    text = gemma.processor.tokenizer.decode(new_tokens, skip_special_tokens=True)
    text = text.strip()
    if not text:
        raise GemmaError(
            f"the model generated no text ({len(new_tokens)} special tokens only)"
            f" for series {series_uid}",
            series_uid=series_uid,
        )
    return text, len(new_tokens)


def run_gemma_inference(
    dataset: DatasetView | str | os.PathLike[str],
    gemma: LoadedGemma | str | os.PathLike[str],
    prompt_template: str,
    out: str | os.PathLike[str],
    *,
    purpose: str,
    max_new_tokens: int = 32,
    slices: int = 1,
    window: Any = "auto",
    image_size: int | tuple[int, int] | None = None,
    where: Mapping[str, Any] | None = None,
    device: Any = "auto",
    dtype: Any = None,
) -> dict[str, Any]:
    """Generate an answer for each series of a dataset and write them to Parquet.

    Parameters
    ----------
    dataset
        A :class:`DatasetView` or a de-identified dataset folder.
    gemma
        A :class:`LoadedGemma`, ``"tiny"`` or a local checkpoint folder.
    prompt_template
        The prompt, a template over the dataset's columns (see
        :func:`workbench.loaders.gemma.gemma_examples`).
    out
        Output folder; ``generations.parquet`` is written (or replaced) there.
    purpose
        Why the dataset is read; recorded in the audit log.
    max_new_tokens
        Maximum length of each answer in tokens.
    slices, window, image_size, where
        How examples are built; see :func:`~workbench.loaders.gemma.gemma_examples`.
    device, dtype
        Used when ``gemma`` still has to be loaded; see :func:`load_gemma`.

    Returns
    -------
    dict
        ``examples``, ``output`` (the Parquet path), ``model``, ``adapter``,
        ``device``, ``dtype``, ``seconds``.

    Raises
    ------
    GemmaError
        When an answer is empty or the logits are not finite.
    """
    import pandas as pd

    from workbench.loaders.gemma import gemma_examples

    started = time.perf_counter()
    loaded = as_loaded_gemma(gemma, device=device, dtype=dtype)
    examples = gemma_examples(
        dataset,
        purpose=purpose,
        prompt_template=prompt_template,
        slices=slices,
        window=window,
        image_size=image_size,
        where=where,
    )

    # Generate one answer per example.
    rows = []
    for example in examples:
        example_started = time.perf_counter()
        text, tokens = generate_text(
            loaded,
            example.prompt,
            example.images,
            max_new_tokens=max_new_tokens,
            series_uid=example.SeriesInstanceUID,
        )
        rows.append(
            {
                "SeriesInstanceUID": example.SeriesInstanceUID,
                "volume_path": example.volume_path,
                "slice_indices": example.slice_indices,
                "prompt": example.prompt,
                "text": text,
                "new_tokens": tokens,
                "model": loaded.spec,
                "adapter": loaded.adapter,
                "seconds": time.perf_counter() - example_started,
            }
        )

    # Write the answers.
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / GENERATIONS_FILE
    frame = pd.DataFrame(rows).astype({"adapter": "string"})
    frame.to_parquet(path, index=False)
    seconds = time.perf_counter() - started
    log.info(
        "generated %d answers with Gemma 3n in %.1f s (%.2f s per series)",
        len(rows),
        seconds,
        seconds / max(len(rows), 1),
    )
    return {
        "examples": len(rows),
        "output": str(path),
        "model": loaded.spec,
        "adapter": loaded.adapter,
        "device": str(loaded.device),
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "seconds": seconds,
    }
