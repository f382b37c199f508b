"""MONAI dictionary transforms that read pixel stacks and masks into ``MetaTensor``.

:class:`LoadZarrd` comes first in a MONAI transform chain. It replaces the
reference in an item (the ``volume_path`` of a stack, plus the slice's
``volume_index`` for slice items) with the pixels read from the dataset's Zarr store,
so MONAI's ``Dataset``, ``CacheDataset`` and ``PersistentDataset`` and PyTorch's
``DataLoader`` workers all read through it. :class:`LoadMaskd` reads a segmentation
mask from a NumPy file and gives it the geometry of the image it belongs to.

Axes and affine
---------------
Zarr holds a stack as ``(z, y, x)``: slice, row, column. Items are channel-first
with the spatial axes in ``(x, y, z)`` order, column index first, as MONAI's readers
return them (``PydicomReader`` with its default ``swap_ij=True``): volumes have shape
``(1, x, y, z)`` and slices ``(1, x, y)``; colour stacks have 3 channels.

The stack's ``affine`` attribute maps ``(x, y, z)`` indices to LPS millimetres
(DICOM patient coordinates). By default the item's affine is that matrix in RAS
(first two rows negated), MONAI's default space, which is what
``LoadImage(reader="PydicomReader")`` returns for the same series; ``space="LPS"``
keeps the DICOM coordinates. A slice item keeps the stack's three axes (the third is
the slice normal scaled by the slice spacing) and its origin is the slice's own
ImagePositionPatient. A stack without patient geometry gets the identity matrix.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

from workbench.dataset.chunks import SliceReader
from workbench.dataset.reader import DatasetView
from workbench.dataset.store import VOLUMES_STORE
from workbench.errors import ConfigurationError, DatasetError
from workbench.loaders.items import check_level

__all__ = [
    "INDEX_KEY",
    "LPS_TO_RAS",
    "LoadMaskd",
    "LoadZarrd",
]

SPACES = ("RAS", "LPS")
# Item key holding a slice's position along z in its stack (the Parquet column).
INDEX_KEY = "volume_index"
# Negating x and y turns LPS patient coordinates into RAS and back.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Stacks that one process keeps open, with their geometry; least recently used
# ones are closed first.
OPEN_STACKS = 1024


@dataclass(frozen=True)
class _OpenStack:
    """The pixel array, affine (LPS) and slice positions of a stack, in one process."""

    pixels: Any
    reader: SliceReader
    affine: np.ndarray
    positions: np.ndarray | None


class LoadZarrd(MapTransform):
    """Read a stack or one of its slices from the dataset's Zarr store.

    Parameters
    ----------
    view
        The dataset. Its Zarr store opens on first use in each process, so the
        transform can be created, cached and pickled before ``DataLoader`` starts
        its workers.
    keys
        Item keys whose value is a ``volume_path``; each is replaced by the
        pixels as a ``MetaTensor``.
    level
        ``volume`` reads the whole stack, ``slice`` reads the one slice (one Zarr
        chunk) at ``item[index_key]``.
    index_key
        Item key of the slice's position along z (``volume_index``).
    dtype
        NumPy dtype of the pixels; ``None`` keeps the stored type (``int16`` for
        most CT, ``uint16`` for MR, ``float32`` after a non-integer rescale).
    space
        ``RAS`` (MONAI's default) or ``LPS`` (DICOM patient coordinates).
    allow_missing_keys
        Skip keys missing from an item instead of raising.
    """

    def __init__(
        self,
        view: DatasetView,
        keys: KeysCollection = "image",
        *,
        level: str = "volume",
        index_key: str = INDEX_KEY,
        dtype: Any = np.float32,
        space: str = "RAS",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        check_level(level)
        if space not in SPACES:
            raise ConfigurationError(
                f"space {space!r} is not supported; use 'RAS' (MONAI's default) or"
                " 'LPS' (DICOM patient coordinates)"
            )
        self.view = view
        self.level = level
        self.index_key = index_key
        self.dtype = None if dtype is None else np.dtype(dtype)
        self.space = space
        self._stacks: OrderedDict[str, _OpenStack] = OrderedDict()
        self._stacks_pid: int | None = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        # Neither the open stacks nor the process id travel: open arrays belong to
        # one process, and either would change the pickled form that
        # PersistentDataset hashes into its cache key.
        state = self.__dict__.copy()
        state["_stacks"] = OrderedDict()
        state["_stacks_pid"] = None
        return state

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return a copy of ``data`` with each key's stack reference read."""
        item = dict(data)
        for key in self.key_iterator(item):
            index = item.get(self.index_key) if self.level == "slice" else None
            item[key] = self.read(str(item[key]), index)
        return item

    def read(self, volume_path: str, index: int | None = None) -> MetaTensor:
        """Read one stack (``index`` None) or one slice of it as a ``MetaTensor``.

        Raises
        ------
        DatasetError
            When the stack does not exist, or the slice index is outside it.
        """
        stack = self._open_stack(volume_path)
        pixels = stack.pixels
        if self.level == "slice":
            if index is None or not 0 <= int(index) < pixels.shape[0]:
                raise DatasetError(
                    f"slice {index!r} is outside stack {volume_path} of"
                    f" {pixels.shape[0]} slices; take indexes from the volume_index"
                    " column"
                )
            index = int(index)
            array = stack.reader.slice(index)
            affine = slice_affine(stack.affine, stack.positions, index)
        else:
            array = stack.reader.volume()
            affine = stack.affine
        array = channel_first_xyz(array, colour=pixels.ndim == 4, dtype=self.dtype)
        if self.space == "RAS":
            affine = LPS_TO_RAS @ affine
        return _meta_tensor(
            array,
            affine,
            {
                "filename_or_obj": f"{self.view.root / VOLUMES_STORE}/{volume_path}",
                "volume_path": volume_path,
                "space": self.space,
                **({"volume_index": index} if index is not None else {}),
            },
        )

    def _open_stack(self, volume_path: str) -> _OpenStack:
        import zarr

        pid = os.getpid()
        if pid != self._stacks_pid:
            self._stacks = OrderedDict()
            self._stacks_pid = pid
        stack = self._stacks.get(volume_path)
        if stack is not None:
            self._stacks.move_to_end(volume_path)
            return stack

        pixels = self.view.pixel_array(volume_path)
        group = zarr.open_group(store=pixels.store, path=volume_path, mode="r")
        affine = group.attrs.get("affine")
        positions = None
        if "ImagePositionPatient" in group.array_keys():
            stored: Any = group["ImagePositionPatient"]
            positions = np.asarray(stored[...], dtype=float)
        stack = _OpenStack(
            pixels=pixels,
            reader=SliceReader(pixels),
            affine=np.eye(4) if affine is None else np.asarray(affine, dtype=float),
            positions=positions,
        )
        self._stacks[volume_path] = stack
        if len(self._stacks) > OPEN_STACKS:
            self._stacks.popitem(last=False)
        return stack


class LoadMaskd(MapTransform):
    """Read a segmentation mask from a ``.npy`` file, in the geometry of its image.

    The file contains the mask in the Zarr stack's order: ``(z, y, x)`` for a whole
    stack, or ``(y, x)`` for one slice. A slice item takes slice
    ``item[index_key]`` of a 3-D mask. The mask comes out channel-first in
    ``(x, y, z)`` order like the image, as ``float32`` class indexes, with the
    image's affine.

    Parameters
    ----------
    keys
        Item keys whose value is the path of a mask file.
    image_key
        The key of the image, loaded already, whose affine and shape the mask
        takes and must match.
    level, index_key
        As for :class:`LoadZarrd`.
    """

    def __init__(
        self,
        keys: KeysCollection = "mask",
        *,
        image_key: str = "image",
        level: str = "volume",
        index_key: str = INDEX_KEY,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        check_level(level)
        self.image_key = image_key
        self.level = level
        self.index_key = index_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Return a copy of ``data`` with each mask path replaced by the mask."""
        item = dict(data)
        image = item[self.image_key]
        for key in self.key_iterator(item):
            path = Path(item[key])
            try:
                stored = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as exc:
                raise ConfigurationError(
                    f"mask file {path} could not be read as a NumPy .npy array"
                    f" ({exc}); write masks with numpy.save"
                ) from exc
            if self.level == "slice" and stored.ndim == 3:
                stored = stored[int(item[self.index_key])]
            array = channel_first_xyz(
                np.asarray(stored), colour=False, dtype=np.dtype(np.float32)
            )
            if array.shape[1:] != tuple(image.shape[1:]):
                raise ConfigurationError(
                    f"mask {path} has shape {tuple(reversed(array.shape[1:]))} in"
                    " (z, y, x) order but its image has"
                    f" {tuple(reversed(image.shape[1:]))}; masks must have the"
                    " stack's shape (or one slice's shape)"
                )
            item[key] = _meta_tensor(
                array,
                np.asarray(image.affine, dtype=float),
                {
                    "filename_or_obj": str(path),
                    "space": image.meta.get("space", "RAS"),
                },
            )
        return item


def channel_first_xyz(
    array: np.ndarray, *, colour: bool, dtype: np.dtype | None = None
) -> np.ndarray:
    """Turn Zarr's ``(z, y, x[, channel])`` or ``(y, x[, channel])`` into MONAI's.

    Returns an array of shape ``(channels, x, y[, z])`` and type ``dtype`` (None
    keeps the type). It keeps the memory layout of the stored array, so it is
    Fortran-ordered rather than C-contiguous: converting it in place of a
    transposing copy is ten times faster for a 60-slice 256 x 256 stack (4 ms
    against 60 ms, measured with NumPy 2.4 on the 2-core development machine).
    """
    if colour:
        spatial = array.ndim - 1
        order = (spatial, *reversed(range(spatial)))
        result = np.transpose(array, order)
    else:
        result = array.T[np.newaxis]
    if dtype is not None and result.dtype != dtype:
        # order="K" follows the memory layout of the view: one pass, no transpose.
        result = result.astype(dtype, order="K")
    return result


def slice_affine(
    affine: np.ndarray, positions: np.ndarray | None, index: int
) -> np.ndarray:
    """Return the affine (LPS) of slice ``index``: the stack's axes, its own origin.

    The origin is the slice's ImagePositionPatient when the stack stores it, so it
    stays exact when the slice spacing varies. Otherwise it is computed from the
    stack's affine.
    """
    result = np.array(affine, dtype=float)
    if positions is not None and index < len(positions):
        result[:3, 3] = positions[index]
    else:
        result[:3, 3] = (affine @ np.array([0.0, 0.0, float(index), 1.0]))[:3]
    return result


def _meta_tensor(
    array: np.ndarray, affine: np.ndarray, extra: dict[str, Any]
) -> MetaTensor:
    # Metadata holds only plain string keys and tensors or plain Python values:
    # PersistentDataset loads its cache with torch.load(weights_only=True), which
    # rejects NumPy arrays, and also MONAI's MetaKeys.AFFINE key in processes where
    # enum members pickle by name (seen in the full test suite). A rejected item is
    # silently recomputed every time. Passing the affine in the metadata, not as
    # an argument, keeps its key a plain string.
    affine_tensor = torch.as_tensor(affine, dtype=torch.float64)
    meta = {
        "affine": affine_tensor,
        "original_affine": affine_tensor.clone(),
        "spatial_shape": tuple(int(n) for n in array.shape[1:]),
        "original_channel_dim": 0,
        **extra,
    }
    return MetaTensor(torch.from_numpy(array), meta=meta)
