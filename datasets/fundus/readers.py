"""Readers of fundus vessel datasets: the DRIVE release layout and generic image / mask folders.

Items are ``{"image": (3, H, W) float32 RGB, "label": (1, H, W) uint8, "fov": (1, H, W) uint8, "id", "source"}``
with label 1 = vessel, 0 = background and 255 = outside the field of view (FOV), so that the loss and every metric
only see pixels inside the FOV, as DRIVE's evaluation protocol requires.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from clinseg.datasets.errors import DataError
from clinseg.datasets.io import open_image
from clinseg.transforms.oct import IGNORE_INDEX

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".ppm")
LOSSY_SUFFIXES = (".jpg", ".jpeg")


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """A colour photograph as ``(3, H, W)`` float32 in [0, 255]; grey images are repeated to three channels."""
    path = Path(path)
    array = np.asarray(open_image(path).convert("RGB"), dtype=np.float32)
    return np.moveaxis(array, -1, 0)


def read_binary_mask(path: str | os.PathLike) -> np.ndarray:
    """A binary mask as ``(H, W)`` bool, whatever its storage: 0/255, 0/1, or a palette GIF.

    Palette images are converted to grey first and thresholded at 127 (DRIVE's ``2nd_manual`` GIFs store indices
    {0, 1} that map to grey 3 / 253, so comparing raw values with 255 would find no vessel). Masks stored as 0/1
    are recognised by their maximum.
    """
    path = Path(path)
    image = open_image(path)
    grey = np.asarray(image.convert("L"))
    values = np.unique(grey)
    if len(values) > 2 and path.suffix.lower() not in LOSSY_SUFFIXES:
        # a multi-class label map (0/1/2...) thresholded at 127 would silently lose every class; JPEG masks are
        # thresholded as before, since compression blurs their two values
        listed = values[:8].tolist()
        raise DataError(
            path,
            f"is not a binary mask: it holds values {listed}{' ...' if len(values) > 8 else ''}; "
            "expected two (0/1 or 0/255).",
        )
    if grey.max(initial=0) <= 1 and image.mode not in ("P",):
        return grey > 0
    return grey > 127


def make_item(image_path: Path, label_path: Path | None, fov_path: Path | None, item_id: str) -> dict:
    image = read_rgb(image_path)
    shape = image.shape[1:]
    fov = np.ones(shape, dtype=bool)
    if fov_path is not None:
        fov = read_binary_mask(fov_path)
        if fov.shape != shape:
            raise DataError(fov_path, f"FOV mask is {fov.shape} but image {image_path.name} is {shape} (rows, cols).")
    item = {"image": image, "fov": fov.astype(np.uint8)[None], "id": item_id, "source": str(image_path)}
    if label_path is not None:
        vessels = read_binary_mask(label_path)
        if vessels.shape != shape:
            raise DataError(
                label_path,
                f"mask is {vessels.shape} but image {image_path.name} is {shape} (rows, cols): a mask "
                "must have its image's size.",
            )
        label = np.where(fov, vessels.astype(np.uint8), IGNORE_INDEX).astype(np.uint8)
        item.update(label=label[None], label_source=str(label_path))
    return item


DRIVE_IMAGE = re.compile(r"^(\d+)_(training|test)\.(tif|tiff)$", re.IGNORECASE)


def read_drive(split_dir: str | os.PathLike, annotator: int = 1, with_labels: bool = True) -> list[dict]:
    """Read one split of DRIVE as released: ``images/NN_<split>.tif``, ``1st_manual/NN_manual1.gif``,
    ``mask/NN_<split>_mask.gif`` (``2nd_manual`` with ``annotator=2``, test split only).

    Raises:
        DataError: a missing manual or FOV mask (named), an unreadable file, masks of another size.
    """
    split_dir = Path(split_dir)
    image_dir = split_dir / "images"
    if not image_dir.is_dir():
        raise DataError(split_dir, "has no 'images' folder; not a DRIVE split folder.")
    items = []
    for image_path in sorted(image_dir.iterdir()):
        match = DRIVE_IMAGE.match(image_path.name)
        if match is None:
            continue
        number, split = match.group(1), match.group(2)
        fov_path = split_dir / "mask" / f"{number}_{split}_mask.gif"
        if not fov_path.is_file():
            raise DataError(fov_path, f"FOV mask of {image_path.name} is missing.")
        label_path = None
        if with_labels:
            label_path = split_dir / f"{'1st' if annotator == 1 else '2nd'}_manual" / f"{number}_manual{annotator}.gif"
            if not label_path.is_file():
                raise DataError(label_path, f"manual annotation of {image_path.name} is missing.")
        items.append(make_item(image_path, label_path, fov_path, number))
    if not items:
        raise DataError(image_dir, "holds no DRIVE images named NN_training.tif or NN_test.tif.")
    return items


def _match(folder: Path, stem: str, suffixes: tuple[str, ...] = ("", "_mask", "_manual1", "_label", "_fov")):
    if not folder.is_dir():
        return None
    candidates = {p.stem.lower(): p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    for suffix in suffixes:
        if f"{stem}{suffix}".lower() in candidates:
            return candidates[f"{stem}{suffix}".lower()]
    return None


def read_image_mask_folders(
    image_dir: str | os.PathLike, mask_dir: str | os.PathLike | None, fov_dir: str | os.PathLike | None = None
) -> list[dict]:
    """Generic binary segmentation folders: ``images/`` + ``masks/`` (+ optional ``fov/``).

    A mask is matched to its image by stem, optionally with a ``_mask`` suffix; masks stored as 0/255 or 0/1 are
    both accepted. This also reads the Kaggle "retina blood vessel" layout (``image/`` + ``mask/``).
    """
    image_dir = Path(image_dir)
    items = []
    for image_path in sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        mask_path = _match(Path(mask_dir), image_path.stem, ("", "_mask", "_label", "_manual1")) if mask_dir else None
        if mask_dir is not None and mask_path is None:
            raise DataError(image_path, f"has no mask in {mask_dir} (same name, or with a '_mask' suffix).")
        fov_path = _match(Path(fov_dir), image_path.stem, ("", "_fov", "_mask")) if fov_dir else None
        items.append(make_item(image_path, mask_path, fov_path, image_path.stem))
    return items
