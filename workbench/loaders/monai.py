"""MONAI datasets of de-identified volumes and slices, read from Zarr.

:func:`monai_dataset` builds the item list from the dataset's Parquet columns,
puts :class:`~workbench.loaders.transforms.LoadZarrd` in front of the caller's
transforms, and wraps both in MONAI's ``Dataset``, ``CacheDataset`` or
``PersistentDataset``::

    from monai.transforms import ScaleIntensityRanged
    from workbench.loaders import monai_dataset

    ds = monai_dataset("datasets/demo", purpose="sphere detection", level="slice",
                       where={"Modality": "CT"},
                       transforms=[ScaleIntensityRanged("image", -1000, 1000, 0, 1)],
                       labels="labels.csv", label_column="sphere")
    item = ds[0]   # {"image": MetaTensor (1, x, y), "label": ..., "SOPInstanceUID": ..}

Pixels are read when an item is fetched, in the process that fetches it, so
``DataLoader(ds, num_workers=2)`` works with the ``fork`` and the ``spawn`` start
methods. The axis order and the affine are described in
:mod:`workbench.loaders.transforms`.

A persistent cache lives in a folder named by the dataset's version and a hash of
the pickled deterministic transforms (MONAI's ``pickle_hashing``), so a changed
dataset or transform never serves stale items.
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from workbench.audit import AuditEvent, open_audit_log
from workbench.dataset.reader import DatasetView
from workbench.errors import ConfigurationError, DatasetError, WorkbenchError
from workbench.loaders.items import build_items, check_level

__all__ = [
    "CACHE_MODES",
    "build_transform",
    "check_purpose",
    "default_cache_dir",
    "monai_dataset",
    "open_view",
    "persistent_cache_folder",
    "raise_transform_cause",
    "record_read",
    "transform_error_cause",
    "wrap_items",
]

log = logging.getLogger(__name__)

CACHE_MODES = (None, "memory", "persistent")


def monai_dataset(
    dataset: str | Path | DatasetView,
    *,
    purpose: str,
    level: str = "volume",
    transforms: Sequence[Callable[..., Any]] | Callable[..., Any] | None = None,
    labels: Any = None,
    label_column: str | None = None,
    columns: Sequence[str] = (),
    where: Any = None,
    cache: str | None = None,
    cache_dir: str | Path | None = None,
    mask_column: str | None = None,
    dtype: Any = np.float32,
    space: str = "RAS",
) -> Any:
    """Return a MONAI dataset of a de-identified dataset's volumes or slices.

    Parameters
    ----------
    dataset
        The dataset folder, or a :class:`DatasetView` of it.
    purpose
        Why the data is read; recorded in the audit log.
    level
        ``volume``: one item per stack, ``image`` of shape ``(1, x, y, z)``.
        ``slice``: one item per single-frame instance, ``image`` of shape
        ``(1, x, y)``, read as one Zarr chunk.
    transforms
        MONAI dictionary transforms (a sequence or a ``Compose``) applied after
        the pixels are read.
    labels
        A labels table (CSV or Parquet path, or pandas DataFrame) joined on
        ``SeriesInstanceUID`` (volume items) or ``SOPInstanceUID`` (slice
        items). ``None`` takes ``label_column`` from the dataset's Parquet.
    label_column
        The column that becomes each item's ``label``; items without a value are
        left out. ``None`` gives items without ``label``.
    columns
        Further Parquet columns (DICOM keywords) to copy into each item.
    where
        Rows to keep: a ``pyarrow.compute`` expression, or a mapping such as
        ``{"Modality": "CT"}`` (a list value matches any of its elements).
    cache
        ``None`` (read on every access), ``"memory"`` (MONAI ``CacheDataset``:
        deterministic transforms run once, results kept in memory) or
        ``"persistent"`` (MONAI ``PersistentDataset``: results kept on disk).
    cache_dir
        Root folder of the persistent cache; default ``cache/monai`` in the
        workbench home. Items go to a subfolder named by dataset, version, level
        and transform hash.
    mask_column
        Column of ``labels`` naming each item's segmentation mask (``.npy`` in
        Zarr order, see :class:`~workbench.loaders.transforms.LoadMaskd`); it
        becomes the item's ``mask``.
    dtype
        Pixel dtype; ``None`` keeps the stored type.
    space
        ``RAS`` (MONAI's default) or ``LPS`` for the item affines.

    Returns
    -------
    monai.data.Dataset
        A ``Dataset``, ``CacheDataset`` or ``PersistentDataset``; its ``data``
        attribute is the item list before loading.

    Raises
    ------
    ConfigurationError
        For an empty purpose, an unknown level or cache mode, a missing column,
        an invalid filter or labels table.
    DatasetError
        When the folder is not a de-identified dataset, or no item is left.
    """
    view = open_view(dataset)
    check_purpose(purpose)
    check_level(level)
    _check_cache(cache)
    items = build_items(
        view,
        level,
        label_column=label_column,
        labels=labels,
        columns=columns,
        where=where,
        mask_column=mask_column,
    )
    transform = build_transform(
        view,
        level,
        transforms,
        mask=mask_column is not None,
        dtype=dtype,
        space=space,
    )
    result = wrap_items(view, items, transform, level, cache=cache, cache_dir=cache_dir)
    record_read(
        view,
        purpose,
        {"level": level, "items": len(items), "cache": cache or "none"},
    )
    log.info("dataset %s: %d %s items for MONAI", view.name, len(items), level)
    return result


def open_view(dataset: str | Path | DatasetView) -> DatasetView:
    """Return ``dataset`` as a :class:`DatasetView`, opening a folder path."""
    if isinstance(dataset, DatasetView):
        return dataset
    return DatasetView.open(dataset)


def build_transform(
    view: DatasetView,
    level: str,
    transforms: Sequence[Callable[..., Any]] | Callable[..., Any] | None,
    *,
    mask: bool = False,
    dtype: Any = np.float32,
    space: str = "RAS",
) -> Any:
    """Return a ``Compose`` that reads pixels (and masks), then runs ``transforms``."""
    from monai.transforms import Compose

    from workbench.loaders.transforms import LoadMaskd, LoadZarrd

    chain: list[Callable[..., Any]] = [
        LoadZarrd(view, "image", level=level, dtype=dtype, space=space)
    ]
    if mask:
        chain.append(LoadMaskd("mask", level=level))
    if transforms is None:
        pass
    elif isinstance(transforms, Sequence):
        chain.extend(transforms)
    elif callable(transforms):
        chain.append(transforms)
    else:
        raise ConfigurationError(
            f"transforms must be a sequence of MONAI transforms or a Compose, not"
            f" {type(transforms).__name__}"
        )
    return Compose(chain)


def wrap_items(
    view: DatasetView,
    items: list[dict[str, Any]],
    transform: Any,
    level: str,
    *,
    cache: str | None = None,
    cache_dir: str | Path | None = None,
) -> Any:
    """Wrap items and transforms in the MONAI dataset class for ``cache``."""
    from monai.data import CacheDataset, Dataset, PersistentDataset
    from monai.data.utils import pickle_hashing

    _check_cache(cache)
    if cache is None:
        return Dataset(items, transform)
    if cache == "memory":
        return CacheDataset(items, transform, progress=False)
    folder = persistent_cache_folder(view, transform, level, cache_dir)
    log.info("persistent cache of dataset %s in %s", view.name, folder)
    return PersistentDataset(
        items,
        transform,
        cache_dir=folder,
        hash_transform=pickle_hashing,
        track_meta=True,
    )


def persistent_cache_folder(
    view: DatasetView,
    transform: Any,
    level: str,
    cache_dir: str | Path | None = None,
) -> Path:
    """Return the cache folder for ``transform`` on this dataset version and level.

    The name contains the hash of the pickled transforms up to the first random one
    (those ``PersistentDataset`` caches), so changing any of their arguments, or
    the dataset's content, selects another folder.

    Raises
    ------
    ConfigurationError
        When a transform cannot be pickled (a lambda, a local function).
    """
    from monai.data.utils import pickle_hashing
    from monai.transforms import Compose, RandomizableTrait, Transform

    chain = transform if isinstance(transform, Compose) else Compose([transform])
    cached = []
    for step in chain.flatten().transforms:
        if isinstance(step, RandomizableTrait) or not isinstance(step, Transform):
            break
        cached.append(step)
    try:
        digest = pickle_hashing(cached).decode("ascii")
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        raise ConfigurationError(
            f"a transform cannot be pickled ({exc}); the persistent cache needs"
            " transforms defined at module level, not lambdas or local functions"
        ) from exc
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / f"{view.name}-{view.version}" / f"{level}-{digest[:16]}"


def default_cache_dir() -> Path:
    """Return ``cache/monai`` in the workbench home."""
    from workbench.home import find_home

    return find_home() / "cache" / "monai"


def record_read(view: DatasetView, purpose: str, details: dict[str, Any]) -> None:
    """Append a ``dataset.read`` event for ``view`` to the audit log."""
    with open_audit_log() as audit:
        audit.append(
            AuditEvent(
                action="dataset.read",
                resource=f"dataset:{view.name}",
                purpose=purpose,
                details={"version": view.version, **details},
            )
        )


def transform_error_cause(error: BaseException) -> WorkbenchError | None:
    """Return the workbench error inside MONAI's wrapping, or None.

    MONAI re-raises every error of a transform as ``RuntimeError("applying
    transform ...")`` from the original, once per level of ``Compose``, so a
    missing stack or a mask of the wrong shape reaches the caller wrapped.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, WorkbenchError):
            return current
        seen.add(id(current))
        current = current.__cause__
    return None


def raise_transform_cause(error: BaseException) -> None:
    """Raise the configuration or dataset error that MONAI wrapped, if any.

    The error is raised anew, of the same class and message, from ``error``.
    Returns when ``error`` wraps no such error.
    """
    cause = transform_error_cause(error)
    if isinstance(cause, (ConfigurationError, DatasetError)):
        raise type(cause)(str(cause)) from error


def check_purpose(purpose: str) -> None:
    """Raise a ConfigurationError unless ``purpose`` is a non-empty text."""
    if not isinstance(purpose, str) or not purpose.strip():
        raise ConfigurationError(
            "purpose is required: say why the dataset is read, for example"
            " purpose='nodule classifier training'; the audit log records it"
        )


def _check_cache(cache: str | None) -> None:
    if cache not in CACHE_MODES:
        raise ConfigurationError(
            f"cache {cache!r} is not supported; use None, 'memory' or 'persistent'"
        )
