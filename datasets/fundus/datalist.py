"""Find the fundus vessel data in a folder, whatever accepted layout it is in, and split it.

Accepted layouts of ``dataset_dir``:

1. DRIVE as released: ``training/`` (and ``test/``) each with ``images/``, ``1st_manual/``, ``mask/``; or one
   such split folder itself (e.g. ``.../DRIVE/training``).
2. Kaggle "retina blood vessel": ``Data/train/image`` + ``Data/train/mask`` (+ ``Data/test/...``).
3. Generic binary folders: ``images/`` + ``masks/`` (+ optional ``fov/``), any other binary 2D task too.

Without explicit splits, the last ``val_fraction`` of the sorted image ids are validation: for the 20 DRIVE
training images (ids 21-40) and the default 0.25 this is ids 36-40, the fixed split the benchmark reports on.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from clinseg.datasets.errors import NoUsableDataError
from clinseg.datasets.fundus.phantom import write_drive_layout
from clinseg.datasets.fundus.readers import make_item, read_drive, read_image_mask_folders
from clinseg.datasets.io import resolve_layout, split_by_group

logger = logging.getLogger(__name__)

ACCEPTED_LAYOUTS = """Accepted layouts:
  1. DRIVE: <dir>/training/{images,1st_manual,mask}/ (or <dir> is such a split folder)
  2. Kaggle retina vessels: <dir>/Data/train/image/ + <dir>/Data/train/mask/
  3. generic: <dir>/images/ + <dir>/masks/ (+ optional <dir>/fov/), masks 0/255 or 0/1"""

DEMO_HINT = (
    "To create the embedded demo data instead, run:\n"
    "  python -m clinseg.datasets.fundus.phantom --out data/phantoms/vessels\n"
    "(or leave 'dataset_dir' at its default, which generates it on first use)."
)


def detect_layout(dataset_dir: Path) -> str | None:
    if not dataset_dir.is_dir():
        return None
    if all((dataset_dir / name).is_dir() for name in ("images", "mask")) and any(dataset_dir.glob("*_manual")):
        return "drive_split"
    if (dataset_dir / "training" / "images").is_dir():
        return "drive"
    if (dataset_dir / "Data" / "train" / "image").is_dir():
        return "kaggle"
    if (dataset_dir / "images").is_dir() and (dataset_dir / "masks").is_dir():
        return "folders"
    return None


def load_vessel_datalist(
    dataset_dir: str | os.PathLike,
    split: str = "train",
    val_fraction: float = 0.25,
    phantom_if_missing: bool = False,
    phantom_images: int = 12,
) -> list[dict]:
    """The items of one split (``train``, ``val``, ``test`` or ``all``) of the vessel dataset in ``dataset_dir``."""
    dataset_dir = Path(dataset_dir)
    generate = (lambda folder: write_drive_layout(folder, n_images=phantom_images)) if phantom_if_missing else None
    layout = resolve_layout(dataset_dir, detect_layout, "vessel", ACCEPTED_LAYOUTS, DEMO_HINT, generate)
    if split == "test":
        folders = {"drive": dataset_dir / "test", "kaggle": dataset_dir / "Data" / "test"}
        if layout not in folders or not folders[layout].is_dir():
            raise NoUsableDataError(dataset_dir.resolve(), "has no test split (a 'test' folder).", ACCEPTED_LAYOUTS)
    if layout == "drive_split":
        items = read_drive(dataset_dir)
    elif layout == "drive":
        items = read_drive(dataset_dir / ("test" if split == "test" else "training"))
    elif layout == "kaggle":
        root = dataset_dir / "Data" / ("test" if split == "test" else "train")
        items = read_image_mask_folders(root / "image", root / "mask")
    else:
        fov_dir = dataset_dir / "fov" if (dataset_dir / "fov").is_dir() else None
        items = read_image_mask_folders(dataset_dir / "images", dataset_dir / "masks", fov_dir)
    if split != "test":  # the test folder is used whole
        items = split_by_group(items, split, val_fraction)
    if not items:
        raise NoUsableDataError(dataset_dir.resolve(), f"the '{split}' split is empty.", ACCEPTED_LAYOUTS)
    logger.info(f"{dataset_dir}: {layout} layout, {len(items)} images in the '{split}' split")
    return items


def load_fundus_images(input_path: str | os.PathLike) -> list[dict]:
    """Photographs to segment: one image, a folder of images, or a DRIVE split folder (its FOV masks are used)."""
    input_path = Path(input_path)
    if input_path.is_dir() and (input_path / "images").is_dir() and (input_path / "mask").is_dir():
        return read_drive(input_path, with_labels=False)
    if input_path.is_file():
        return [make_item(input_path, None, None, input_path.stem)]
    if input_path.is_dir():
        items = read_image_mask_folders(input_path, None)
        if items:
            return items
    raise NoUsableDataError(input_path.resolve(), "holds no photographs to segment (or does not exist).")
