"""Pictures of pixel stacks for notebooks: a montage of slices and a slice viewer.

Both take pixel values that the caller has read already (or a function that reads
one slice), and a :class:`~workbench.notebook.windows.Window` for grey images. Colour
images (a trailing channel axis of 3 or 4 samples) are shown as they are.

The montage is a :class:`matplotlib.figure.Figure` made without pyplot, so Jupyter
shows it once, as the value of the cell, and it is not kept in pyplot's list of open
figures. IPython draws such a figure as an image only once pyplot's inline backend
has registered a PNG formatter for figures, so :func:`montage` registers one when
none is.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from workbench.notebook.windows import Window

__all__ = ["montage", "register_png_display", "slice_image_png", "slice_viewer"]

# Width of one montage panel, and of the viewer's image, on screen.
PANEL_INCHES = 2.0
VIEWER_WIDTH_PX = 420


def _is_colour(image: np.ndarray) -> bool:
    return image.ndim == 3 and image.shape[-1] in (3, 4)


def _colour_to_uint8(image: np.ndarray) -> np.ndarray:
    if image.dtype == np.uint8:
        return image
    values = image.astype(np.float32)
    top = float(np.nanmax(values)) if values.size else 0.0
    scale = 255.0 / top if top > 0 else 1.0
    return np.clip(values * scale, 0, 255).astype(np.uint8)


def _display_pixels(image: np.ndarray, window: Window, invert: bool) -> np.ndarray:
    """Return 8-bit pixels ready to draw: windowed grey or colour as stored."""
    if _is_colour(image):
        return _colour_to_uint8(image)
    grey = window.to_grey(image)
    return 255 - grey if invert else grey


def montage(
    images: Sequence[np.ndarray],
    *,
    window: Window,
    titles: Sequence[str] = (),
    columns: int = 6,
    extent: tuple[float, float, float, float] | None = None,
    invert: bool = False,
    title: str = "",
) -> Any:
    """Draw slices side by side in a grid.

    Parameters
    ----------
    images
        2-D grey slices, or 3-D colour slices with the samples last.
    window
        Display window for grey slices.
    titles
        One caption per slice, such as its position in mm.
    columns
        Slices per row.
    extent
        ``(left, right, bottom, top)`` in mm, so panels show the true pixel
        aspect ratio.
    invert
        Show high values dark, as MONOCHROME1 images require.
    title
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure

    count = max(len(images), 1)
    columns = max(1, min(columns, count))
    rows = math.ceil(count / columns)
    figure = Figure(
        figsize=(PANEL_INCHES * columns, PANEL_INCHES * rows + 0.4),
        layout="constrained",
    )
    axes = figure.subplots(rows, columns, squeeze=False)
    for index, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if index >= len(images):
            continue
        pixels = _display_pixels(np.asarray(images[index]), window, invert)
        ax.imshow(
            pixels,
            cmap=None if pixels.ndim == 3 else "gray",
            vmin=0,
            vmax=255,
            extent=extent,
            interpolation="nearest",
        )
        if index < len(titles):
            ax.set_title(titles[index], fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    register_png_display()
    return figure


def register_png_display() -> None:
    """Let IPython show figures as PNG even when pyplot was never imported."""
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    from IPython.core.pylabtools import print_figure
    from matplotlib.figure import Figure

    formatter = shell.display_formatter.formatters["image/png"]
    if formatter.for_type(Figure) is None:
        formatter.for_type(Figure, lambda figure: print_figure(figure, fmt="png"))


def slice_image_png(
    image: np.ndarray, *, window: Window, invert: bool = False
) -> bytes:
    """Encode one slice, windowed, as PNG bytes."""
    from matplotlib.image import imsave

    pixels = _display_pixels(np.asarray(image), window, invert)
    buffer = io.BytesIO()
    if pixels.ndim == 3:
        imsave(buffer, pixels, format="png")
    else:
        imsave(buffer, pixels, cmap="gray", vmin=0, vmax=255, format="png")
    return buffer.getvalue()


def slice_viewer(
    read_slice: Callable[[int], np.ndarray],
    *,
    count: int,
    window: Window,
    labels: Sequence[str] = (),
    aspect: float = 1.0,
    invert: bool = False,
    title: str = "",
) -> Any:
    """Build a slider and an image that shows the chosen slice.

    Parameters
    ----------
    read_slice
        Returns the pixels of slice ``k`` (0-based); called each time the slider
        moves, so only shown slices are read.
    count
        Number of slices.
    window
        Display window for grey slices.
    labels
        One caption per slice, such as its position in mm.
    aspect
        Height over width of the image on screen, in mm, so that pixels that are
        not square still show the anatomy undistorted.
    invert
        Show high values dark, as MONOCHROME1 images require.
    title
        Text above the image.

    Returns
    -------
    ipywidgets.VBox
        The title, the image, the slider and the current slice's caption.
    """
    import ipywidgets as widgets

    height = round(VIEWER_WIDTH_PX * aspect)
    image = widgets.Image(
        format="png",
        layout=widgets.Layout(
            width=f"{VIEWER_WIDTH_PX}px", height=f"{height}px", object_fit="fill"
        ),
    )
    slider = widgets.IntSlider(
        value=count // 2,
        min=0,
        max=max(count - 1, 0),
        description="slice",
        continuous_update=True,
    )
    caption = widgets.Label()

    def show(index: int) -> None:
        image.value = slice_image_png(read_slice(index), window=window, invert=invert)
        label = labels[index] if index < len(labels) else ""
        caption.value = f"slice {index + 1} of {count}  {label}".rstrip()

    slider.observe(lambda change: show(int(change["new"])), names="value")
    show(slider.value)
    children: list[Any] = [image, slider, caption]
    if title:
        children.insert(0, widgets.HTML(f"<b>{_escape(title)}</b>"))
    return widgets.VBox(children)


def _escape(text: str) -> str:
    import html

    return html.escape(text)
