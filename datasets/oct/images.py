"""Reading 2D images and label images (PNG, TIFF, JPEG, BMP) with errors that name the file."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from clinseg.datasets.errors import DataError
from clinseg.datasets.io import open_image
from clinseg.transforms.labels import ColorToLabel

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")


def read_grayscale(path: str | os.PathLike) -> np.ndarray:
    """A B-scan as ``(1, rows, cols)`` float32; colour images are converted to luminance."""
    path = Path(path)
    image = open_image(path)
    if image.mode not in ("L", "I", "I;16", "F"):
        image = image.convert("L")
    array = np.asarray(image, dtype=np.float32)
    if array.ndim != 2:
        raise DataError(path, f"expected a 2D image, got shape {array.shape}.")
    return array[None]


def read_label(path: str | os.PathLike, colors: list | None = None) -> np.ndarray:
    """A label image as ``(1, rows, cols)`` uint8 class indices.

    Index images (mode L or P, or 16-bit) are taken as class indices. Colour-coded images (RGB, RGBA) need the
    ``colors`` table (``colors[k]`` = RGB of class ``k``).
    """
    path = Path(path)
    image = open_image(path)
    if image.mode in ("RGB", "RGBA"):
        if colors is None:
            raise DataError(
                path,
                f"is a colour-coded ({image.mode}) label, but no colour table was configured; set 'label_colors' "
                "to the RGB colour of each class (class 0 first).",
            )
        try:
            return ColorToLabel(colors)(np.asarray(image))[None]
        except ValueError as e:
            raise DataError(path, f"unknown label colour: {e}") from e
    if image.mode not in ("L", "P", "I", "I;16", "1"):
        raise DataError(path, f"unsupported label image mode {image.mode!r}; use index PNGs or RGB colour PNGs.")
    array = np.asarray(image)
    if array.max(initial=0) > 255:
        raise DataError(path, f"label value {int(array.max())} is too large for a class index.")
    return array.astype(np.uint8)[None]
