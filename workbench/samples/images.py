"""Geometry and pixel data of the synthetic CT and MR series.

Both series of a study image the same phantom in one frame of reference: an
elliptical body, infinite along the patient's head-foot axis, holding a bright
sphere whose centre and radius vary by patient. The CT series is axial, the MR
series sagittal, so the ingest must use ImageOrientationPatient and
ImagePositionPatient to place slices rather than assume an axis.

Coordinates are DICOM patient coordinates in millimetres (x towards the patient's
left, y towards the back, z towards the head).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from pydicom.valuerep import DSfloat

__all__ = [
    "CT_HU_AIR",
    "CT_HU_BODY",
    "CT_HU_SPHERE",
    "CT_RESCALE_INTERCEPT",
    "Phantom",
    "SeriesGeometry",
    "ct_geometry",
    "ct_pixels",
    "ds_text",
    "invent_phantom",
    "mr_geometry",
    "mr_pixels",
]

CT_RESCALE_INTERCEPT = -1024
CT_HU_AIR = -1000
CT_HU_BODY = 40
CT_HU_SPHERE = 700
MR_BODY_SIGNAL = 600
MR_SPHERE_SIGNAL = 1800
# Half axes of the elliptical body in x and y, in millimetres.
BODY_HALF_AXES = (150.0, 110.0)


def ds_text(value: float) -> str:
    """Format ``value`` as a DS string of at most 16 characters."""
    return str(DSfloat(value, auto_format=True))


@dataclass(frozen=True)
class Phantom:
    """The imaged object: a body ellipse and a sphere, in patient coordinates."""

    sphere_centre: tuple[float, float, float]
    sphere_radius: float


def invent_phantom(rng: random.Random) -> Phantom:
    """Place the sphere somewhere the CT and the MR series both cover."""
    centre = (
        float(rng.randrange(-20, 21)),
        float(rng.randrange(-30, 31)),
        float(rng.randrange(-30, 31)),
    )
    return Phantom(sphere_centre=centre, sphere_radius=float(rng.randrange(15, 31)))


@dataclass(frozen=True)
class SeriesGeometry:
    """Slice geometry of one series.

    Parameters
    ----------
    rows, columns, slices
        Image size and number of slices.
    row_spacing, column_spacing
        Pixel Spacing: millimetres between rows and between columns.
    slice_thickness, spacing_between_slices
        Slice Thickness and Spacing Between Slices in millimetres.
    row_direction, column_direction
        The two direction cosines of ImageOrientationPatient: along a row
        (increasing column index) and along a column (increasing row index).
    first_position
        ImagePositionPatient of the first slice along the normal.
    """

    rows: int
    columns: int
    slices: int
    row_spacing: float
    column_spacing: float
    slice_thickness: float
    spacing_between_slices: float
    row_direction: tuple[float, float, float]
    column_direction: tuple[float, float, float]
    first_position: tuple[float, float, float]

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal: row direction cross column direction."""
        return np.cross(self.row_direction, self.column_direction)

    @property
    def orientation(self) -> list[float]:
        """ImageOrientationPatient."""
        return [*self.row_direction, *self.column_direction]

    @property
    def pixel_spacing(self) -> list[str]:
        """PixelSpacing as DS strings."""
        return [ds_text(self.row_spacing), ds_text(self.column_spacing)]

    def position(self, index: int) -> list[float]:
        """ImagePositionPatient of slice ``index`` along the normal."""
        offset = index * self.spacing_between_slices * self.normal
        return [float(v) for v in np.asarray(self.first_position) + offset]

    def voxel_centres(self, index: int) -> np.ndarray:
        """Return the patient coordinates of each pixel centre of slice ``index``.

        The array has shape (rows, columns, 3).
        """
        row_index = np.arange(self.rows, dtype=np.float64)[:, None, None]
        column_index = np.arange(self.columns, dtype=np.float64)[None, :, None]
        along_row = np.asarray(self.row_direction) * self.column_spacing
        along_column = np.asarray(self.column_direction) * self.row_spacing
        origin = np.asarray(self.position(index))
        return origin + column_index * along_row + row_index * along_column


def ct_geometry(rows: int, columns: int, slices: int) -> SeriesGeometry:
    """Axial CT geometry: 360 mm field of view, 5 mm slices without gap."""
    spacing = 360.0 / max(rows, columns)
    thickness = 5.0
    return SeriesGeometry(
        rows=rows,
        columns=columns,
        slices=slices,
        row_spacing=spacing,
        column_spacing=spacing,
        slice_thickness=thickness,
        spacing_between_slices=thickness,
        row_direction=(1.0, 0.0, 0.0),
        column_direction=(0.0, 1.0, 0.0),
        first_position=(
            -spacing * (columns - 1) / 2,
            -spacing * (rows - 1) / 2,
            -thickness * (slices - 1) / 2,
        ),
    )


def mr_geometry(rows: int, columns: int, slices: int) -> SeriesGeometry:
    """Sagittal MR geometry: 300 mm field of view, 6 mm slices 7.2 mm apart.

    Rows run from the head down and columns from front to back, so the normal
    points to the patient's right (-x).
    """
    spacing = 300.0 / max(rows, columns)
    gap = 7.2
    return SeriesGeometry(
        rows=rows,
        columns=columns,
        slices=slices,
        row_spacing=spacing,
        column_spacing=spacing,
        slice_thickness=6.0,
        spacing_between_slices=gap,
        row_direction=(0.0, 1.0, 0.0),
        column_direction=(0.0, 0.0, -1.0),
        first_position=(
            gap * (slices - 1) / 2,
            -spacing * (columns - 1) / 2,
            spacing * (rows - 1) / 2,
        ),
    )


def _masks(
    geometry: SeriesGeometry, phantom: Phantom, index: int
) -> tuple[np.ndarray, np.ndarray]:
    centres = geometry.voxel_centres(index)
    x, y = centres[..., 0], centres[..., 1]
    body = (x / BODY_HALF_AXES[0]) ** 2 + (y / BODY_HALF_AXES[1]) ** 2 <= 1.0
    distance = np.linalg.norm(centres - np.asarray(phantom.sphere_centre), axis=-1)
    return body, distance <= phantom.sphere_radius


def ct_pixels(
    geometry: SeriesGeometry, phantom: Phantom, index: int, noise: np.random.Generator
) -> np.ndarray:
    """Return stored CT values (HU minus the rescale intercept) as int16."""
    body, sphere = _masks(geometry, phantom, index)
    hounsfield = np.full(body.shape, CT_HU_AIR, dtype=np.int32)
    hounsfield[body] = CT_HU_BODY
    hounsfield[sphere] = CT_HU_SPHERE
    hounsfield += noise.integers(-8, 9, size=body.shape, dtype=np.int32)
    return (hounsfield - CT_RESCALE_INTERCEPT).astype(np.int16)


def mr_pixels(
    geometry: SeriesGeometry, phantom: Phantom, index: int, noise: np.random.Generator
) -> np.ndarray:
    """Return MR signal as uint16 within 12 bits."""
    body, sphere = _masks(geometry, phantom, index)
    signal = noise.integers(0, 20, size=body.shape, dtype=np.int32)
    signal[body] += MR_BODY_SIGNAL
    signal[sphere] += MR_SPHERE_SIGNAL - MR_BODY_SIGNAL
    return np.clip(signal, 0, 4095).astype(np.uint16)
