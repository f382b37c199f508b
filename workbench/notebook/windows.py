"""Display windows: which range of pixel values maps to black and white on screen.

A window is a centre and a width in the units of the stored pixels (Hounsfield units
for CT, since the dataset applies RescaleSlope and RescaleIntercept). Values below the
window show black, values above it white, and values inside it a linear grey ramp,
as the DICOM standard defines for a LINEAR VOI LUT (PS3.3 C.11.2.1.2)::

    resolve_window("lung")                  # Window(center=-600, width=1500)
    resolve_window((40, 400))               # any centre and width
    resolve_window("auto", stored=(40, 400), pixels=volume)   # from the DICOM rows
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from workbench.errors import ConfigurationError

__all__ = ["WINDOW_PRESETS", "Window", "first_window_value", "resolve_window"]

# Common CT presets in HU (centre, width). Radiology departments vary these a little.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600.0, 1500.0),
    "mediastinum": (40.0, 400.0),
    "soft-tissue": (40.0, 400.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
}

# Percentiles of the pixel values that bound the window when no stored one exists.
FALLBACK_PERCENTILES = (1.0, 99.0)


@dataclass(frozen=True)
class Window:
    """A display window in the units of the pixel values.

    Attributes
    ----------
    center
        The value shown mid-grey (DICOM WindowCenter).
    width
        The range of values from black to white (DICOM WindowWidth), at least 1.
    source
        Where the window came from: a preset name, ``"given"``, ``"stored"``
        (WindowCenter and WindowWidth of the instances) or ``"pixels"``.
    """

    center: float
    width: float
    source: str = "given"

    @property
    def limits(self) -> tuple[float, float]:
        """The values shown black and white, by the DICOM LINEAR function."""
        low = self.center - 0.5 - (self.width - 1.0) / 2.0
        high = self.center - 0.5 + (self.width - 1.0) / 2.0
        return low, high

    def to_grey(self, pixels: Any) -> np.ndarray:
        """Map pixel values to 8-bit grey levels through the window."""
        low, high = self.limits
        values = np.asarray(pixels, dtype=np.float32)
        scaled = (values - low) / max(high - low, 1e-6)
        return (np.clip(scaled, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def resolve_window(
    window: str | Sequence[float],
    *,
    stored: tuple[float, float] | None = None,
    pixels: Any = None,
) -> Window:
    """Turn a window request into a :class:`Window`.

    Parameters
    ----------
    window
        A preset name from :data:`WINDOW_PRESETS`, ``"auto"``, or a
        ``(center, width)`` pair.
    stored
        WindowCenter and WindowWidth of the series, used by ``"auto"``.
    pixels
        Pixel values, used by ``"auto"`` when nothing is stored: the window then
        spans their 1st to 99th percentile.

    Raises
    ------
    ConfigurationError
        For an unknown name, a pair that is not two finite numbers, or a width
        below 1.
    """
    if isinstance(window, str):
        name = window.strip().lower()
        if name == "auto":
            return _auto_window(stored, pixels)
        if name not in WINDOW_PRESETS:
            raise ConfigurationError(
                f"window {window!r} is unknown; use one of"
                f" {', '.join(sorted(WINDOW_PRESETS))}, 'auto', or a (center, width)"
                " pair such as (40, 400)"
            )
        center, width = WINDOW_PRESETS[name]
        return Window(center, width, source=name)
    return _window_from_pair(window)


def first_window_value(value: Any) -> float | None:
    """Return the first WindowCenter or WindowWidth value of a Parquet cell, if any.

    The cells are lists (the attributes are multi-valued) or plain numbers.
    """
    if value is None:
        return None
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _window_from_pair(window: Sequence[float]) -> Window:
    try:
        center, width = (float(v) for v in window)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"window {window!r} is not a (center, width) pair of numbers; pass, for"
            " example, (40, 400) or a preset name such as 'lung'"
        ) from exc
    if not (math.isfinite(center) and math.isfinite(width)):
        raise ConfigurationError(
            f"window {window!r} must have finite center and width values"
        )
    if width < 1.0:
        raise ConfigurationError(
            f"window width {width} is below 1, the smallest width DICOM allows;"
            " pass a wider window"
        )
    return Window(center, width, source="given")


def _auto_window(stored: tuple[float, float] | None, pixels: Any) -> Window:
    if stored is not None and stored[1] >= 1.0:
        return Window(stored[0], stored[1], source="stored")
    if pixels is None:
        raise ConfigurationError(
            "window 'auto' needs WindowCenter and WindowWidth, or pixel values;"
            " pass a preset name or a (center, width) pair instead"
        )
    values = np.asarray(pixels, dtype=np.float32)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return Window(0.0, 1.0, source="pixels")
    low, high = np.percentile(values, FALLBACK_PERCENTILES)
    width = max(float(high - low), 1.0)
    return Window(float(low) + width / 2.0, width, source="pixels")
