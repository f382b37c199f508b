"""Model inputs for Gemma 3n built through its processor, with their checks.

The processor is the only place where image soft tokens enter ``input_ids``: a
prompt carries one ``<image_soft_token>`` per image and the processor expands it to
``image_seq_length`` tokens between begin- and end-of-image tokens, next to the
``pixel_values``. :func:`check_image_tokens` verifies the count before every forward
pass, because a mismatch would otherwise surface as a shape error deep inside the
model, or not at all.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from workbench.gemma.model import GemmaError, LoadedGemma

__all__ = [
    "IGNORE_INDEX",
    "check_image_tokens",
    "collate_training",
    "encode_prompt",
    "encode_training",
]

# Label value that the loss skips (PyTorch's cross-entropy ignore_index).
IGNORE_INDEX = -100


def prompt_text(gemma: LoadedGemma, prompt: str, images: int) -> tuple[str, bool]:
    """Return the text to give the processor and whether the tokenizer adds BOS.

    A processor with a chat template (the released instruction-tuned checkpoints)
    gets a user turn with the images and the prompt, followed by the start of the
    model's turn. The template writes BOS itself. A processor without one (the tiny
    model) gets the image tokens followed by the prompt on its own line.
    """
    processor = gemma.processor
    # NOTE: the chat-template branch is tested with a Gemma-style stand-in template
    # on the tiny model, not yet with a released checkpoint's own template.
    if getattr(processor, "chat_template", None):
        content: list[dict[str, str]] = [{"type": "image"} for _ in range(images)]
        content.append({"type": "text", "text": prompt})
        text = processor.apply_chat_template(
            [{"role": "user", "content": content}],
            tokenize=False,
            add_generation_prompt=True,
        )
        bos = processor.tokenizer.bos_token
        return str(text), not (bos and str(text).startswith(bos))
    return f"{processor.image_token * images}{prompt}\n", True


def check_image_tokens(
    batch: Any, gemma: LoadedGemma, images_per_example: Sequence[int]
) -> None:
    """Raise when ``input_ids`` do not contain the image tokens the images need.

    Each row must contain exactly ``image_seq_length`` image soft tokens per
    image, and ``pixel_values`` one entry per image of the batch.

    Raises
    ------
    GemmaError
        Naming the row, the count found and the count expected.
    """
    input_ids = batch["input_ids"]
    if input_ids.shape[0] != len(images_per_example):
        raise GemmaError(
            f"the batch has {input_ids.shape[0]} rows of input_ids but"
            f" {len(images_per_example)} examples"
        )
    found = (input_ids == gemma.image_token_id).sum(dim=1).tolist()
    for row, (count, images) in enumerate(zip(found, images_per_example, strict=True)):
        expected = images * gemma.image_seq_length
        if count != expected:
            raise GemmaError(
                f"row {row} of input_ids contains {count} image tokens, but its"
                f" {images} image(s) need {expected} ({gemma.image_seq_length} per"
                " image); build the inputs with the model's processor, one"
                " <image_soft_token> per image in the prompt"
            )
    pixel_values = batch.get("pixel_values")
    total = sum(images_per_example)
    pixel_count = 0 if pixel_values is None else int(pixel_values.shape[0])
    if pixel_count != total:
        raise GemmaError(
            f"the batch has pixel_values for {pixel_count} images, but its prompts"
            f" carry {total}"
        )


def encode_prompt(gemma: LoadedGemma, prompt: str, images: Sequence[Any]) -> Any:
    """Return the processor's inputs for one prompt with its images, checked.

    The tensors are on the model's device, ``pixel_values`` in the model's dtype.
    """
    text, add_bos = prompt_text(gemma, prompt, len(images))
    batch = gemma.processor(
        text=[text],
        images=[list(images)],
        return_tensors="pt",
        add_special_tokens=add_bos,
    )
    check_image_tokens(batch, gemma, [len(images)])
    return _to_model(batch, gemma)


def encode_training(
    gemma: LoadedGemma, prompt: str, images: Sequence[Any], target: str
) -> dict[str, Any]:
    """Return one training row: the prompt's inputs followed by the target's tokens.

    The prompt part (with its image tokens) comes from the processor. The
    target's token ids and an end-of-sequence token are appended, so a token
    never spans the boundary between prompt and target. ``labels`` copy the
    target's ids and mask the prompt with :data:`IGNORE_INDEX`.
    """
    import torch

    prompt_batch = encode_prompt(gemma, prompt, images)
    tokenizer = gemma.processor.tokenizer
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
    if not target_ids:
        raise GemmaError(f"target text {target!r} has no tokens; give a non-empty text")
    answer = torch.tensor(
        [*target_ids, tokenizer.eos_token_id], device=gemma.device, dtype=torch.long
    )
    prompt_ids = prompt_batch["input_ids"][0]
    row: dict[str, Any] = {
        "input_ids": torch.cat([prompt_ids, answer]),
        "attention_mask": torch.cat(
            [prompt_batch["attention_mask"][0], torch.ones_like(answer)]
        ),
        "labels": torch.cat([torch.full_like(prompt_ids, IGNORE_INDEX), answer]),
        "pixel_values": prompt_batch["pixel_values"],
        "images": len(images),
    }
    if "token_type_ids" in prompt_batch:
        row["token_type_ids"] = torch.cat(
            [prompt_batch["token_type_ids"][0], torch.zeros_like(answer)]
        )
    return row


def collate_training(gemma: LoadedGemma, rows: Sequence[dict[str, Any]]) -> Any:
    """Pad training rows on the right into one batch and check its image tokens.

    Returns
    -------
    tuple
        The batch (a dict of tensors for the model's forward pass) and the number
        of images of each row.
    """
    import torch

    length = max(int(row["input_ids"].shape[0]) for row in rows)
    pad_id = gemma.processor.tokenizer.pad_token_id
    fill = {
        "input_ids": pad_id,
        "attention_mask": 0,
        "labels": IGNORE_INDEX,
        "token_type_ids": 0,
    }
    batch: dict[str, Any] = {}
    for name, value in fill.items():
        if name not in rows[0]:
            continue
        padded = [
            torch.nn.functional.pad(
                row[name], (0, length - row[name].shape[0]), value=value
            )
            for row in rows
        ]
        batch[name] = torch.stack(padded)
    batch["pixel_values"] = torch.cat([row["pixel_values"] for row in rows])
    images = [int(row["images"]) for row in rows]
    check_image_tokens(batch, gemma, images)
    return batch, images


def _to_model(batch: Any, gemma: LoadedGemma) -> Any:
    """Move a processor batch to the model's device and floats to its dtype."""
    moved = batch.to(gemma.device)
    if "pixel_values" in moved:
        moved["pixel_values"] = moved["pixel_values"].to(gemma.dtype)
    return moved
