"""A tiny, randomly initialised Gemma 3n with its tokenizer and processor, for tests.

The released Gemma 3n checkpoints are gigabytes in size. The tiny model keeps their
architecture: a text decoder, a MobileNetV5 vision tower, an audio tower, and the
vision and audio token ids placed after the text vocabulary. With about 3.8 M
parameters, the whole pipeline runs on a CPU in seconds. Its configuration lives
in ``workbench/configs/gemma3n-tiny.json``. The tokenizer is a byte-level BPE
trained when the model is built on the short corpus in that file. It is
deterministic, and no file is ever downloaded.
"""

from __future__ import annotations

import json
import logging
from functools import cache
from importlib import resources
from typing import Any

from workbench.errors import ConfigurationError

__all__ = ["TINY_CONFIG_NAME", "build_tiny_gemma", "tiny_config"]

log = logging.getLogger(__name__)

TINY_CONFIG_NAME = "gemma3n-tiny.json"


@cache
def _tiny_config_text() -> str:
    return (resources.files("workbench") / "configs" / TINY_CONFIG_NAME).read_text()


def tiny_config() -> dict[str, Any]:
    """Return the tiny model's settings: ``model``, ``processor`` and ``tokenizer``."""
    settings: dict[str, Any] = json.loads(_tiny_config_text())
    return settings


def build_tiny_tokenizer(settings: dict[str, Any]) -> Any:
    """Train the tiny byte-level BPE tokenizer and wrap it for transformers.

    Ids 0 to 5 are the text special tokens, then the 256 byte symbols and the BPE
    merges. Unused ids up to ``text_vocab_size`` get ``<unusedN>`` tokens, so the
    vision tokens start at ``text_vocab_size`` (the vision ``vocab_offset``) and
    the audio tokens right after the vision range, as the model config expects.
    """
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        trainers,
    )
    from tokenizers import processors as post_processors
    from transformers import PreTrainedTokenizerFast

    model_config = settings["model"]
    token_settings = settings["tokenizer"]
    text_vocab_size = int(token_settings["text_vocab_size"])

    # Train the BPE on the corpus: special tokens first, then bytes and merges.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=text_vocab_size,
        special_tokens=list(token_settings["text_special_tokens"]),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(token_settings["corpus"], trainer)

    # Fill the text range, then the vision and audio ranges, in id order.
    def special(names: list[str]) -> list[AddedToken]:
        return [AddedToken(name, special=True, normalized=False) for name in names]

    trained = bpe.get_vocab_size()
    bpe.add_special_tokens(
        special([f"<unused{i}>" for i in range(text_vocab_size - trained)])
    )
    for modality in ("vision", "audio"):
        named = list(token_settings[f"{modality}_tokens"])
        size = int(model_config[f"{modality}_config"]["vocab_size"])
        reserved = [f"<unused_{modality}{i}>" for i in range(size - len(named))]
        bpe.add_special_tokens(special(named + reserved))

    bos = token_settings["special_tokens"]["bos_token"]
    bpe.post_processor = post_processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A $B",
        special_tokens=[(bos, bpe.token_to_id(bos))],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        extra_special_tokens=dict(token_settings["extra_special_tokens"]),
        **token_settings["special_tokens"],
    )
    _check_token_ids(tokenizer, model_config)
    return tokenizer


def _check_token_ids(tokenizer: Any, model_config: dict[str, Any]) -> None:
    """Raise when a multimodal token id of the tokenizer differs from the config's."""
    expected = {
        "boi_token": model_config["boi_token_id"],
        "eoi_token": model_config["eoi_token_id"],
        "image_token": model_config["image_token_id"],
        "boa_token": model_config["boa_token_id"],
        "eoa_token": model_config["eoa_token_id"],
        "audio_token": model_config["audio_token_id"],
    }
    for name, token_id in expected.items():
        actual = tokenizer.convert_tokens_to_ids(getattr(tokenizer, name))
        if actual != token_id:
            raise ConfigurationError(
                f"the tiny tokenizer gives {name} the id {actual}, but"
                f" {TINY_CONFIG_NAME} expects {token_id}; make the corpus and"
                " text_vocab_size in that file agree with the token ids"
            )
    if len(tokenizer) != model_config["text_config"]["vocab_size"]:
        vocab_size = model_config["text_config"]["vocab_size"]
        raise ConfigurationError(
            f"the tiny tokenizer has {len(tokenizer)} tokens, but {TINY_CONFIG_NAME}"
            f" sets text_config.vocab_size to {vocab_size}"
        )


def build_tiny_processor(settings: dict[str, Any], tokenizer: Any) -> Any:
    """Return a ``Gemma3nProcessor`` for the tiny model's image size and tokens."""
    from transformers import (
        Gemma3nAudioFeatureExtractor,
        Gemma3nProcessor,
        SiglipImageProcessor,
    )

    processor_settings = settings["processor"]
    size = int(processor_settings["image_size"])
    image_processor = SiglipImageProcessor(size={"height": size, "width": size})
    return Gemma3nProcessor(
        feature_extractor=Gemma3nAudioFeatureExtractor(),
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=int(processor_settings["image_seq_length"]),
        audio_seq_length=int(processor_settings["audio_seq_length"]),
    )


def build_tiny_gemma(seed: int = 0) -> tuple[Any, Any]:
    """Build the tiny ``Gemma3nForConditionalGeneration`` and its processor.

    The weights are drawn from a generator seeded with ``seed`` inside a forked
    random state, so the same seed gives the same model and the caller's random
    state is left as it was.

    Returns
    -------
    tuple
        The model (float32, on the CPU, in evaluation mode) and the processor.
    """
    import torch
    from transformers import Gemma3nConfig, Gemma3nForConditionalGeneration

    settings = tiny_config()
    tokenizer = build_tiny_tokenizer(settings)
    processor = build_tiny_processor(settings, tokenizer)
    config = Gemma3nConfig(**settings["model"])

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Gemma3nForConditionalGeneration(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.eval()
    parameters = sum(p.numel() for p in model.parameters())
    log.debug("built the tiny Gemma 3n (seed %d, %d parameters)", seed, parameters)
    return model, processor
