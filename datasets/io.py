"""File-level helpers shared by the readers: every failure becomes a :class:`DataError` naming the file."""

from __future__ import annotations

import logging
import math
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from clinseg.datasets.errors import DataError, NoUsableDataError

logger = logging.getLogger(__name__)


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and decode an image file completely (so truncated files fail here, not later)."""
    path = Path(path)
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError as e:
        raise DataError(path, "does not exist.") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(path, f"cannot be read as an image (empty, truncated or not an image file): {e}") from e
    frames = getattr(image, "n_frames", 1)
    if frames > 1:  # e.g. a multi-page TIFF volume where one 2D image is expected; PIL would read page 1 only
        raise DataError(path, f"holds {frames} frames (pages); expected one 2D image.")
    if image.mode == "F" and not np.isfinite(np.asarray(image)).all():
        raise DataError(path, "contains NaN or infinite values.")
    return image


def resolve_layout(
    dataset_dir: Path,
    detect: Callable[[Path], str | None],
    what: str,
    accepted_layouts: str,
    demo_hint: str,
    generate: Callable[[Path], object] | None = None,
) -> str:
    """The layout ``detect`` finds in ``dataset_dir``, generating the phantom first if ``generate`` is given.

    Raises:
        NoUsableDataError: naming the folder searched, the accepted layouts and how to create demo data.
    """
    layout = detect(dataset_dir)
    if layout is None and generate is not None:
        logger.info(f"generating the embedded {what} phantom dataset in {dataset_dir} ...")
        generate(dataset_dir)
        layout = detect(dataset_dir)
    if layout is None:
        state = "does not exist" if not dataset_dir.exists() else f"holds no usable {what} data"
        raise NoUsableDataError(dataset_dir.resolve(), f"{state}.", f"{accepted_layouts}\n{demo_hint}")
    return layout


def split_by_group(items: list[dict], split: str, val_fraction: float, group_key: str = "id") -> list[dict]:
    """The fixed, written-down split of a layout without explicit splits: the last ``ceil(val_fraction * n)`` of
    the sorted groups (subjects, image ids) are validation, at least one and never all. ``"all"`` returns every
    item; ``"test"`` none (a test split is a folder of its own, read as such by the caller)."""
    if split == "all":
        return items
    groups = sorted({item[group_key] for item in items})
    n_val = min(len(groups) - 1, max(1, math.ceil(val_fraction * len(groups)))) if len(groups) > 1 else 0
    val_groups = set(groups[len(groups) - n_val :])
    if split not in ("train", "val"):
        return []
    return [item for item in items if (item[group_key] in val_groups) == (split == "val")]


def atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp)`` on a hidden temporary file beside ``path``, then rename it onto ``path``: a reader never
    sees a half-written file under the final name, and a failed write leaves the previous file intact. The temporary
    name ends with ``path``'s own name, so writers that choose the format from the suffix (nibabel) still do."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp{os.getpid()}-{uuid.uuid4().hex[:8]}.{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_nifti(path: str | os.PathLike, array, affine) -> Path:
    """Write a NIfTI volume atomically (temporary file renamed into place), with ``affine`` as both qform and sform
    (scanner space)."""
    import nibabel as nib

    image = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    return atomic_write(path, lambda tmp: nib.save(image, tmp))
