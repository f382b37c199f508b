"""Loading a Gemma 3n model and its processor, offline, on the CPU or a GPU.

A model spec is either ``"tiny"`` (the randomly initialised test model of
:mod:`workbench.gemma.tiny`) or the path of a local checkpoint folder as written by
``save_pretrained`` (``config.json``, weights, tokenizer and processor files).
Hub names are never passed to transformers: the workbench runs without network
access, and a model is whatever folder the user points it at.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from workbench.errors import ConfigurationError, WorkbenchError

__all__ = [
    "TINY_SPEC",
    "GemmaError",
    "LoadedGemma",
    "force_offline",
    "load_gemma",
    "resolve_device",
    "resolve_dtype",
]

log = logging.getLogger(__name__)

TINY_SPEC = "tiny"

# Accepted names of the two supported dtypes; float16 overflows in Gemma 3n's
# activations and is rejected.
DTYPE_NAMES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}
FLOAT16_NAMES = frozenset({"float16", "fp16", "half"})


class GemmaError(WorkbenchError):
    """A Gemma 3n job received inputs the model cannot use, or produced bad output.

    Parameters
    ----------
    message
        What went wrong and what to do about it.
    series_uid
        The (pseudonymous) SeriesInstanceUID of the example concerned, if any.
    """

    def __init__(self, message: str, *, series_uid: str | None = None):
        super().__init__(message)
        self.series_uid = series_uid


@dataclass
class LoadedGemma:
    """A Gemma 3n model with its processor, ready for a job.

    Attributes
    ----------
    model
        A ``Gemma3nForConditionalGeneration``, or a ``peft.PeftModel`` around one
        when an adapter was loaded, in evaluation mode.
    processor
        The ``Gemma3nProcessor`` that builds the model's inputs.
    spec
        ``"tiny"`` or the checkpoint folder, as given to :func:`load_gemma`.
    device
        The ``torch.device`` the model is on.
    dtype
        The ``torch.dtype`` of the model's floating-point weights.
    adapter
        The LoRA adapter folder loaded onto the model, if any.
    """

    model: Any
    processor: Any
    spec: str
    device: Any
    dtype: Any
    adapter: str | None = None

    @property
    def image_seq_length(self) -> int:
        """Number of image soft tokens the processor puts in the text per image."""
        return int(self.processor.image_seq_length)

    @property
    def image_token_id(self) -> int:
        """Token id of ``<image_soft_token>``."""
        return int(self.processor.image_token_id)


def force_offline() -> None:
    """Switch the Hugging Face libraries to offline mode for this process.

    Sets ``HF_HUB_OFFLINE`` and ``TRANSFORMERS_OFFLINE``. huggingface_hub reads
    them once, at import, so when it is imported already its flag is set too.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        vars(constants)["HF_HUB_OFFLINE"] = True


def resolve_device(device: Any = "auto") -> Any:
    """Return the ``torch.device`` for ``device``.

    ``"auto"`` picks the first CUDA GPU when there is one and the CPU otherwise.

    Raises
    ------
    ConfigurationError
        When the name is not a device, or names a CUDA device that is absent.
    """
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigurationError(
            f"invalid device {device!r}; expected 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from exc
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigurationError(
                f"device {device!r} requested, but PyTorch sees no CUDA GPU; use"
                " 'auto' or 'cpu'"
            )
        count = torch.cuda.device_count()
        if resolved.index is not None and resolved.index >= count:
            raise ConfigurationError(
                f"device {device!r} requested, but only {count} CUDA GPUs are visible"
            )
    return resolved


def resolve_dtype(dtype: Any, device: Any) -> Any:
    """Return the ``torch.dtype`` for ``dtype`` on ``device``.

    The default (``None``) is bfloat16 on a CUDA GPU that supports it and float32
    everywhere else.

    Raises
    ------
    ConfigurationError
        For float16, which Gemma 3n does not run in reliably, and for any dtype
        other than float32 and bfloat16.
    """
    import torch

    if dtype is None:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    name = str(dtype).removeprefix("torch.").lower()
    if name in FLOAT16_NAMES:
        raise ConfigurationError(
            f"dtype {dtype!r} is not supported: Gemma 3n's activations overflow in"
            " float16; use bfloat16 on a GPU or float32"
        )
    if name not in DTYPE_NAMES:
        raise ConfigurationError(
            f"invalid dtype {dtype!r}; expected 'float32' or 'bfloat16'"
        )
    return getattr(torch, DTYPE_NAMES[name])


def _checkpoint_folder(spec: str | os.PathLike[str]) -> Path:
    """Return the checkpoint folder a spec names, or raise a ConfigurationError."""
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise ConfigurationError(
            f"model {str(spec)!r} is neither 'tiny' nor an existing folder; the"
            " workbench never downloads models, so download the checkpoint"
            " beforehand (for example with `hf download`) and pass its folder"
        )
    if not (folder / "config.json").is_file():
        raise ConfigurationError(
            f"model folder {folder} has no config.json; pass a folder written by"
            " save_pretrained, holding the model and processor files"
        )
    return folder.resolve()


def load_gemma(
    spec: str | os.PathLike[str],
    *,
    device: Any = "auto",
    dtype: Any = None,
    adapter: str | os.PathLike[str] | None = None,
    seed: int = 0,
) -> LoadedGemma:
    """Load a Gemma 3n model and its processor, without network access.

    Parameters
    ----------
    spec
        ``"tiny"`` for the tiny test model, or a local checkpoint folder holding
        a ``Gemma3nForConditionalGeneration`` and its processor files.
    device
        ``"auto"`` (a CUDA GPU when there is one, else the CPU), ``"cpu"``,
        ``"cuda"`` or ``"cuda:N"``.
    dtype
        ``None`` (bfloat16 on a GPU that supports it, else float32),
        ``"float32"`` or ``"bfloat16"``.
    adapter
        A LoRA adapter folder written by :func:`run_gemma_finetune`, loaded onto
        the model.
    seed
        Seed of the tiny model's weights; ignored for a checkpoint folder.

    Returns
    -------
    LoadedGemma
        The model, in evaluation mode on ``device``, and its processor.

    Raises
    ------
    ConfigurationError
        For float16, an unknown device, or a spec that is neither ``"tiny"`` nor
        a checkpoint folder (a hub name such as ``google/gemma-3n-E2B-it`` is
        rejected).
    GemmaError
        When the processor's image token count disagrees with the model's.
    """
    force_offline()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    started = time.perf_counter()

    # Build the tiny model, or read a checkpoint folder with local files only.
    if str(spec) == TINY_SPEC:
        from workbench.gemma.tiny import build_tiny_gemma

        model, processor = build_tiny_gemma(seed)
        spec_text = TINY_SPEC
    else:
        folder = _checkpoint_folder(spec)
        model, processor = _load_checkpoint(folder, torch_dtype)
        spec_text = str(folder)

    model.to(device=torch_device, dtype=torch_dtype)
    model.eval()
    _check_processor_matches(model, processor, spec_text)

    # Put a fine-tuned LoRA adapter on top when one is given.
    adapter_text = None
    if adapter is not None:
        model = _load_adapter(model, Path(adapter))
        adapter_text = str(Path(adapter).resolve())

    log.info(
        "loaded Gemma 3n %s on %s as %s in %.1f s",
        "tiny model" if spec_text == TINY_SPEC else "checkpoint",
        torch_device,
        str(torch_dtype).removeprefix("torch."),
        time.perf_counter() - started,
    )
    return LoadedGemma(
        model=model,
        processor=processor,
        spec=spec_text,
        device=torch_device,
        dtype=torch_dtype,
        adapter=adapter_text,
    )


def _load_checkpoint(folder: Path, dtype: Any) -> tuple[Any, Any]:
    from transformers import AutoProcessor, Gemma3nForConditionalGeneration

    # NOTE: tested with the tiny model saved by save_pretrained; a released Gemma 3n
    # checkpoint and a CUDA device have not been run through this path yet.
    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        model = Gemma3nForConditionalGeneration.from_pretrained(
            folder, local_files_only=True, dtype=dtype
        )
    except (OSError, ValueError) as exc:
        raise ConfigurationError(
            f"could not load a Gemma 3n model and processor from {folder}: {exc};"
            " the folder must hold the files save_pretrained writes for both"
        ) from exc
    return model, processor


def _check_processor_matches(model: Any, processor: Any, spec: str) -> None:
    """Raise when the processor would put a different image token count than the
    model's vision tower produces."""
    if not hasattr(processor, "image_seq_length") or not hasattr(
        processor, "image_token_id"
    ):
        raise GemmaError(
            f"the processor of model {spec} is {type(processor).__name__}, not a"
            " Gemma3nProcessor with image_seq_length and image_token_id"
        )
    expected = int(model.config.vision_soft_tokens_per_image)
    if int(processor.image_seq_length) != expected:
        raise GemmaError(
            f"the processor of model {spec} puts {processor.image_seq_length} image"
            f" tokens per image in the text, but the vision tower produces"
            f" {expected}; set image_seq_length to {expected} in"
            " processor_config.json"
        )
    if int(processor.image_token_id) != int(model.config.image_token_id):
        raise GemmaError(
            f"the processor of model {spec} uses image token id"
            f" {processor.image_token_id}, the model {model.config.image_token_id};"
            " the tokenizer and the model come from different checkpoints"
        )


@contextlib.contextmanager
def peft_renaming_warning_ignored() -> Iterator[None]:
    """Ignore the FutureWarning that peft 0.21 triggers in transformers 5 when it
    calls ``is_gradient_checkpointing``, a method since renamed."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message="`is_gradient_checkpointing` is deprecated",
            category=FutureWarning,
        )
        yield


def _load_adapter(model: Any, folder: Path) -> Any:
    from peft import PeftModel

    if not (folder / "adapter_config.json").is_file():
        raise ConfigurationError(
            f"adapter folder {folder} has no adapter_config.json; pass the adapter"
            " folder written by the fine-tuning job"
        )
    with peft_renaming_warning_ignored():
        adapted = PeftModel.from_pretrained(model, folder, is_trainable=False)
    adapted.eval()
    return adapted
