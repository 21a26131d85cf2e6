"""One entry point that finds the OCT data in a folder, whatever accepted layout it is in, and splits it.

Accepted layouts of ``dataset_dir``:

1. Duke DME: ``Subject_NN.mat`` files (``images`` + ``manualLayers1``). The embedded phantom uses this layout.
2. Split folders of paired images and labels, as in the NR206 release: ``train/`` + ``train_labels/``,
   ``val/`` + ``val_labels/`` (and ``test/`` + ``test_labels/``).
3. One pair of folders: ``images/`` + ``labels/`` (or ``masks/``).
4. A VIA / makesense.ai VGG JSON export (``*.json``) beside its images.

Folders without explicit splits are split by subject (Duke: one ``.mat`` per subject) or by image, with the last
``val_fraction`` of the sorted subjects as validation, so B-scans of one eye never land on both sides.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from clinseg.datasets.errors import DataError, NoUsableDataError
from clinseg.datasets.io import resolve_layout, split_by_group
from clinseg.datasets.oct.duke import read_duke_mat, read_mat_bscans
from clinseg.datasets.oct.images import IMAGE_SUFFIXES, read_grayscale
from clinseg.datasets.oct.paired import image_files, read_paired_folder
from clinseg.datasets.oct.phantom import write_phantom_dataset
from clinseg.datasets.oct.via import read_via_json
from clinseg.transforms.oct import IGNORE_INDEX

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "all")

ACCEPTED_LAYOUTS = """Accepted layouts:
  1. Duke DME .mat files: <dir>/Subject_NN.mat with 'images' and 'manualLayers1'
  2. split folders (NR206): <dir>/train/ + <dir>/train_labels/, <dir>/val/ + <dir>/val_labels/
  3. one folder pair: <dir>/images/ + <dir>/labels/ (or masks/), PNG/TIFF/JPEG/BMP
  4. a VIA / makesense.ai VGG JSON export <dir>/*.json beside its images"""

DEMO_HINT = (
    "To create the embedded demo data instead, run:\n"
    "  python -m clinseg.datasets.oct.phantom --out data/phantoms/oct_layers\n"
    "(or leave 'dataset_dir' at its default, which generates it on first use)."
)


def _check_classes(items: list[dict], num_classes: int | None) -> None:
    if num_classes is None:
        return
    for item in items:
        values = np.unique(item["label"])
        bad = [int(v) for v in values if v >= num_classes and v != IGNORE_INDEX]
        if bad:
            raise DataError(
                item.get("label_source", item["source"]),
                f"label values {bad} are outside the {num_classes} configured classes (0..{num_classes - 1}); "
                "set 'class_names' to the classes of this dataset.",
            )


def detect_layout(dataset_dir: Path) -> str | None:
    if not dataset_dir.is_dir():
        return None
    if any(dataset_dir.glob("*.mat")):
        return "duke"
    if (dataset_dir / "train").is_dir() and (dataset_dir / "train_labels").is_dir():
        return "split_folders"
    if (dataset_dir / "images").is_dir() and any((dataset_dir / name).is_dir() for name in ("labels", "masks")):
        return "folder_pair"
    if any(dataset_dir.glob("*.json")) and any(p.suffix.lower() in IMAGE_SUFFIXES for p in dataset_dir.iterdir()):
        return "via_json"
    return None


def load_oct_datalist(
    dataset_dir: str | os.PathLike,
    split: str = "train",
    class_names: list[str] | None = None,
    label_colors: list | None = None,
    val_fraction: float = 0.2,
    grader: int = 1,
    phantom_if_missing: bool = False,
    phantom_subjects: int = 8,
) -> list[dict]:
    """The items of one split of the OCT dataset in ``dataset_dir``.

    Args:
        dataset_dir: the dataset folder, in one of the accepted layouts (module docstring).
        split: ``"train"``, ``"val"``, ``"test"`` (split folders only) or ``"all"``.
        class_names: the bundle's classes; labels with values beyond them are an error naming the file.
        label_colors: RGB colour of each class, for colour-coded label images.
        val_fraction: fraction of subjects (or images) held out for validation when the layout has no splits.
        grader: which Duke grader's boundaries to use (1 or 2).
        phantom_if_missing: generate the synthetic phantom into ``dataset_dir`` if the folder has no data yet
            (used for the bundle's default folder only, never for a folder the user named).
        phantom_subjects: number of phantom subjects to generate.

    Raises:
        NoUsableDataError: the folder holds no accepted layout (the message lists them and how to make demo data).
        DataError: a file in the folder is malformed (the message names it).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    dataset_dir = Path(dataset_dir)
    generate = (
        (lambda folder: write_phantom_dataset(folder, n_subjects=phantom_subjects)) if phantom_if_missing else None
    )
    layout = resolve_layout(dataset_dir, detect_layout, "OCT", ACCEPTED_LAYOUTS, DEMO_HINT, generate)

    if layout == "duke":
        items = [item for path in sorted(dataset_dir.glob("*.mat")) for item in read_duke_mat(path, grader)]
        items = split_by_group(items, split, val_fraction, "subject")
    elif layout == "split_folders":
        splits = ("train", "val", "test") if split == "all" else (split,)
        items = [
            item
            for name in splits
            if (dataset_dir / name).is_dir()
            for item in read_paired_folder(dataset_dir / name, dataset_dir / f"{name}_labels", label_colors)
        ]
    elif layout == "folder_pair":
        label_dir = dataset_dir / ("labels" if (dataset_dir / "labels").is_dir() else "masks")
        items = read_paired_folder(dataset_dir / "images", label_dir, label_colors)
        items = split_by_group(items, split, val_fraction, "id")
    else:
        if class_names is None:
            raise DataError(dataset_dir, "a VIA JSON export needs 'class_names' to map region classes to values.")
        items = [item for path in sorted(dataset_dir.glob("*.json")) for item in read_via_json(path, class_names)]
        items = split_by_group(items, split, val_fraction, "id")

    if not items:
        raise NoUsableDataError(
            dataset_dir.resolve(),
            f"the '{split}' split of this {layout} dataset is empty (no annotated images).",
            ACCEPTED_LAYOUTS,
        )
    _check_classes(items, None if class_names is None else len(class_names))
    logger.info(f"{dataset_dir}: {layout} layout, {len(items)} images in the '{split}' split")
    return items


def load_oct_images(input_path: str | os.PathLike) -> list[dict]:
    """Images to segment: one image file, a ``.mat`` file of B-scans, or a folder of either (no labels needed)."""
    input_path = Path(input_path)
    if input_path.is_file():
        paths = [input_path]
    elif input_path.is_dir():
        paths = sorted(p for p in input_path.iterdir() if p.suffix.lower() in (*IMAGE_SUFFIXES, ".mat"))
    else:
        raise DataError(input_path, "does not exist.", "Point 'input_dir' at an image, a .mat file or a folder.")
    if not paths:
        raise NoUsableDataError(
            input_path.resolve(), f"holds no images ({', '.join(IMAGE_SUFFIXES)}) or Duke .mat files to segment."
        )
    items = []
    for path in paths:
        if path.suffix.lower() == ".mat":
            items.extend(read_mat_bscans(path))
        else:
            items.append({"image": read_grayscale(path), "id": path.stem, "source": str(path)})
    return items


__all__ = ["ACCEPTED_LAYOUTS", "detect_layout", "image_files", "load_oct_datalist", "load_oct_images"]
