"""Gemma 3n on de-identified series: loading, generation and LoRA fine-tuning.

The model receives one or more windowed slices of each series with a prompt built from
the series' DICOM attributes, and answers in text::

    from workbench.gemma import load_gemma, run_gemma_finetune, run_gemma_inference

    gemma = load_gemma("/models/gemma-3n-E2B-it")      # or "tiny" for tests
    run_gemma_inference("datasets/demo", gemma, "Modality: {Modality}. Describe"
                        " the image.", "runs/describe", purpose="pilot")
    run_gemma_finetune("datasets/demo", gemma, "runs/lora", purpose="pilot",
                       prompt_template="Which modality is this?",
                       target_column="Modality", steps=100)

Everything runs offline: a model is ``"tiny"`` or a local checkpoint folder, never
a hub name. Examples come from :mod:`workbench.loaders.gemma`, which records each
dataset read in the audit log.
"""

from workbench.gemma.finetune import (
    LORA_TARGET_PATTERN,
    lora_target_modules,
    run_gemma_finetune,
    target_losses,
)
from workbench.gemma.inference import generate_text, run_gemma_inference
from workbench.gemma.inputs import check_image_tokens, encode_prompt, encode_training
from workbench.gemma.model import (
    TINY_SPEC,
    GemmaError,
    LoadedGemma,
    force_offline,
    load_gemma,
)

__all__ = [
    "LORA_TARGET_PATTERN",
    "TINY_SPEC",
    "GemmaError",
    "LoadedGemma",
    "check_image_tokens",
    "encode_prompt",
    "encode_training",
    "force_offline",
    "generate_text",
    "load_gemma",
    "lora_target_modules",
    "run_gemma_finetune",
    "run_gemma_inference",
    "target_losses",
]
