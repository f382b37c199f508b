"""Fast reads of whole slices from a dataset's Zarr stacks.

The dataset stores each stack's pixels as a Zarr v3 array with one chunk per slice,
encoded with the ``bytes`` and ``zstd`` codecs (:mod:`workbench.dataset.volumes`).
zarr-python spends about 0.7 ms of its own on every read, in its asynchronous
machinery, which is more than reading and decompressing a 256 x 256 slice takes.
:class:`SliceReader` reads such a chunk's file directly, at the key the Zarr v3
specification gives it, and decompresses it with numcodecs. An array stored any
other way (another codec, chunk shape or store) is read through zarr, so the
results are the same either way.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["SliceReader"]

log = logging.getLogger(__name__)


class SliceReader:
    """Reads slices (index 0 of a stack's array) and whole stacks.

    Parameters
    ----------
    array
        A ``zarr.Array`` of a stack's pixels, slices along the first axis.
    """

    def __init__(self, array: Any) -> None:
        self.array = array
        self.shape: tuple[int, ...] = tuple(array.shape)
        self.dtype = np.dtype(array.dtype)
        self._chunks = _chunk_folder(array)
        self._fill = np.asarray(array.fill_value, dtype=self.dtype)
        self._decoder: Any = None
        if self._chunks is not None:
            from numcodecs import Zstd

            self._decoder = Zstd()
            # The bytes codec writes little-endian values.
            self.dtype = self.dtype.newbyteorder("<")

    @property
    def direct(self) -> bool:
        """Whether chunks are read from their files directly, without zarr."""
        return self._chunks is not None

    def slice(self, index: int) -> np.ndarray:
        """Return slice ``index`` (``0 <= index < shape[0]``) as a NumPy array."""
        if self._chunks is None:
            return np.asarray(self.array[index])
        target = np.empty(self.shape[1:], dtype=self.dtype)
        self._read_into(index, target)
        return target

    def volume(self) -> np.ndarray:
        """Return the whole stack as a NumPy array."""
        if self._chunks is None:
            return np.asarray(self.array[...])
        volume = np.empty(self.shape, dtype=self.dtype)
        for index in range(self.shape[0]):
            self._read_into(index, volume[index])
        return volume

    def _read_into(self, index: int, target: np.ndarray) -> None:
        assert self._chunks is not None
        if not 0 <= index < self.shape[0]:
            raise IndexError(f"slice {index} is outside a stack of {self.shape[0]}")
        path = self._chunks.joinpath(str(index), *["0"] * (len(self.shape) - 1))
        try:
            encoded = path.read_bytes()
        except FileNotFoundError:
            # Zarr leaves out chunks that contain only the fill value.
            target[...] = self._fill
            return
        self._decoder.decode(encoded, out=target)


def _chunk_folder(array: Any) -> Path | None:
    """Return the folder of the array's chunk files, or None to read through zarr.

    Only a Zarr v3 array in a local store, with one chunk per slice, the default
    chunk key encoding with ``/``, the codecs ``bytes`` (little-endian) then
    ``zstd``, and no storage transformer qualifies.
    """
    from zarr.codecs import BytesCodec, ZstdCodec
    from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding
    from zarr.storage import LocalStore

    metadata = array.metadata
    if getattr(metadata, "zarr_format", None) != 3 or not isinstance(
        array.store, LocalStore
    ):
        return None
    codecs = tuple(metadata.codecs)
    if (
        len(codecs) != 2
        or not isinstance(codecs[0], BytesCodec)
        or not isinstance(codecs[1], ZstdCodec)
        or (codecs[0].endian is not None and codecs[0].endian.value != "little")
    ):
        return None
    encoding = metadata.chunk_key_encoding
    if not isinstance(encoding, DefaultChunkKeyEncoding) or encoding.separator != "/":
        return None
    if getattr(metadata, "storage_transformers", ()):
        return None
    if tuple(array.chunks) != (1, *array.shape[1:]):
        return None
    return Path(array.store.root) / array.path / "c"
