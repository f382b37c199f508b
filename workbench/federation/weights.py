"""Model weights as NumPy arrays: the only thing a site sends besides metrics.

A model's exchanged weights are named arrays: for a MONAI network the
floating-point entries of its ``state_dict`` (weights and batch-norm statistics,
while integer counters such as ``num_batches_tracked`` stay at the site), for
Gemma the LoRA adapter's factors. They travel **packed**: one float32 vector,
the arrays flattened and concatenated in the model's own order, under the single
name :data:`PACKED_NAME`. Flower 1.42 sends every array of a message as separate
HTTP requests (and arrays above 5 MiB in chunks), so a network of 800 arrays
would cost thousands of requests a round, where one vector costs a few. Both
ends know the layout (names and shapes) from the model they build.

Weights cross the isolation boundary as ``.npz`` files (read with
``allow_pickle=False``), packed; checkpoints keep the arrays by name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "PACKED_NAME",
    "exchanged_state",
    "load_arrays",
    "load_into_network",
    "pack",
    "payload_bytes",
    "save_arrays",
    "to_array_record",
    "unpack",
]

PACKED_NAME = "weights"


def save_arrays(path: str | os.PathLike[str], arrays: Mapping[str, np.ndarray]) -> Path:
    """Write named arrays to an ``.npz`` file atomically; return its path."""
    target = Path(path)
    temporary = target.with_name(f".{target.name}.tmp-{os.getpid()}.npz")
    np.savez(temporary, **{name: np.asarray(value) for name, value in arrays.items()})
    os.replace(temporary, target)
    return target


def load_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read named arrays from an ``.npz`` file, refusing pickled objects."""
    with np.load(path, allow_pickle=False) as archive:
        return {name: archive[name] for name in archive.files}


def exchanged_state(network: Any) -> dict[str, np.ndarray]:
    """Return the floating-point ``state_dict`` entries of a network as arrays."""
    return {
        name: tensor.detach().cpu().numpy().copy()
        for name, tensor in network.state_dict().items()
        if tensor.is_floating_point()
    }


def load_into_network(network: Any, arrays: Mapping[str, np.ndarray]) -> None:
    """Copy named arrays into a network's floating-point state.

    Raises
    ------
    ValueError
        When a name is missing or unknown, or a shape differs: the arrays were
        made for another network.
    """
    import torch

    state = network.state_dict()
    expected = {name for name, tensor in state.items() if tensor.is_floating_point()}
    missing, unknown = expected - set(arrays), set(arrays) - expected
    if missing or unknown:
        raise ValueError(
            f"weights do not fit the network: {len(missing)} missing (such as"
            f" {sorted(missing)[:3]}), {len(unknown)} unknown (such as"
            f" {sorted(unknown)[:3]})"
        )
    for name in expected:
        value = torch.as_tensor(np.asarray(arrays[name]))
        if tuple(value.shape) != tuple(state[name].shape):
            raise ValueError(
                f"weight {name} has shape {tuple(value.shape)}, the network expects"
                f" {tuple(state[name].shape)}"
            )
        state[name].copy_(value.to(state[name].dtype))


def payload_bytes(arrays: Mapping[str, np.ndarray]) -> int:
    """Return the bytes of array data in ``arrays`` (without framing)."""
    return int(sum(np.asarray(value).nbytes for value in arrays.values()))


def to_array_record(arrays: Mapping[str, np.ndarray]) -> Any:
    """Return named arrays as a Flower ``ArrayRecord``, keeping their order."""
    from flwr.app import Array, ArrayRecord

    return ArrayRecord(
        {name: Array(np.asarray(value)) for name, value in arrays.items()}
    )


def pack(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Return named arrays as one float32 vector under :data:`PACKED_NAME`."""
    parts = [np.asarray(value, dtype=np.float32).ravel() for value in arrays.values()]
    vector = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return {PACKED_NAME: vector}


def unpack(
    packed: Mapping[str, np.ndarray], layout: Mapping[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Split a packed vector into arrays named and shaped as those of ``layout``.

    Arrays by name (a checkpoint) are returned as they are.

    Raises
    ------
    ValueError
        When the vector's length is not the total size of ``layout``: the
        weights were made for another model.
    """
    if set(packed) != {PACKED_NAME}:
        return dict(packed)
    vector = np.asarray(packed[PACKED_NAME])
    expected = sum(int(np.asarray(value).size) for value in layout.values())
    if vector.ndim != 1 or vector.size != expected:
        raise ValueError(
            f"packed weights of shape {vector.shape} do not fit a model of"
            f" {expected} values in {len(layout)} arrays"
        )
    arrays, offset = {}, 0
    for name, value in layout.items():
        template = np.asarray(value)
        arrays[name] = (
            vector[offset : offset + template.size]
            .reshape(template.shape)
            .astype(template.dtype)
        )
        offset += template.size
    return arrays
