"""The OCT layouts, registered for the ``oct`` task, and the bundle's data lists (paths).

Accepted layouts of ``dataset_dir``:

1. Duke DME: ``Subject_NN.mat`` files (``images`` + ``manualLayers1``). The embedded phantom uses this layout.
2. Split folders of paired images and labels, as in the NR206 release: ``train/`` + ``train_labels/``,
   ``val/`` + ``val_labels/`` (and ``test/`` + ``test_labels/``).
3. One pair of folders: ``images/`` + ``labels/`` (or ``masks/``).
4. A VIA / makesense.ai VGG JSON export (``*.json``) beside its images.

Folders without explicit splits are split by subject (Duke: one ``.mat`` per subject) or by volume (images named
with a trailing B-scan index, ``vol3_bscan012.png``: :func:`group_by_volume`), with the last ``val_fraction`` of
the sorted subjects or volumes as validation, so B-scans of one eye never land on both sides. Items are
paths; the bundle's transforms decode them (``DukeMatReader``, ``PhotoReader``, ``LabelImageReader``,
``ViaLabelReader``) and build the label maps (``BoundariesToLabelMapd``, ``LabelColorsToClassesd``).
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from pathlib import Path

from clinseg.datasets.errors import DataError, NoUsableDataError
from clinseg.datasets.io import unique_ids
from clinseg.datasets.layouts import (
    check_headers,
    data_files,
    files_by_stem,
    first_names,
    load_datalist,
    log_once,
    partner_file,
    register_layout,
    register_phantom,
)
from clinseg.datasets.oct.bscans import MIN_BSCAN_SIZE, check_bscan_size
from clinseg.datasets.oct.duke import bscan_items, duke_items
from clinseg.datasets.oct.phantom import write_phantom_dataset
from clinseg.datasets.oct.via import via_filenames, via_items
from clinseg.datasets.readers import (
    DICOM_SUFFIXES,
    MAX_PIXELS,
    TIFF_SUFFIXES,
    image_frames,
    member_path,
    read_header,
    split_member,
)
from clinseg.datasets.refusals import check_each, gather_items
from clinseg.datasets.value_types import Fraction, NonNegativeInt, PositiveInt

IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp")
LABEL_SUFFIXES = ("", "_label", "_labels", "_mask", "_seg", "_gt")


def paired_items(image_dir: Path, label_dir: Path) -> list[dict]:
    """Every image of ``image_dir`` with its label image from ``label_dir``.

    Raises:
        DataError: an image without a label.
    """
    labels = files_by_stem(label_dir, IMAGE_SUFFIXES)
    items = []
    for image_path in data_files(image_dir, IMAGE_SUFFIXES):
        label_path = partner_file(labels, image_path.stem, LABEL_SUFFIXES)
        if label_path is None:
            raise DataError(
                image_path,
                f"has no label in {label_dir} (looked for {image_path.stem}{{{','.join(LABEL_SUFFIXES)}}}"
                f" with suffix {'/'.join(IMAGE_SUFFIXES)}).",
            )
        items.append(
            {
                "image": str(image_path),
                "label": str(label_path),
                "id": image_path.stem,
                "source": str(image_path),
                "annotation_source": str(label_path),
            }
        )
    return items


BSCAN_INDEX = re.compile(r"^(?P<volume>.+)[-_. ](?:b-?scan|slice|frame|b)?\d+$", re.IGNORECASE)
"""A B-scan's name: its volume's name, a separator, an optional word and its index in the volume
(``Subject01_012``, ``vol3_bscan012``, ``patientA-5``, ``eye2_slice_40``)."""


MIN_VOLUMES = 5
"""The fewest volumes the names must give for the split to keep volumes together: with fewer, one volume would be
the whole validation set, and names such as ``AMD_001`` ... ``NORMAL_040`` (a class and an image number, not a
volume and a B-scan) would hold one class out of training entirely."""


def group_by_volume(items: list[dict], folder: Path) -> list[dict]:
    """``items`` with a ``volume``: the name without its trailing B-scan index (:data:`BSCAN_INDEX`) where several
    items share it, else the item's ``id``. The split keeps a volume's B-scans together: neighbouring B-scans of one
    volume are nearly the same image, and validating on them would score memory, not generalisation.

    Names are only a guess at volumes, so the split trusts them where the guess gives a plausible split: at least
    :data:`MIN_VOLUMES` groups, none holding more than half of the B-scans. Otherwise (one volume cut into B-scans,
    three class names, one large group among single images) the B-scans are dealt one by one as before, and a
    warning says that validation may then be on neighbours of training B-scans, and how to decide the split
    (``split_file``). Each finding is logged once."""
    volumes = [match.group("volume") if (match := BSCAN_INDEX.match(item["id"])) else None for item in items]
    counts = Counter(volume for volume in volumes if volume is not None)
    groups = [volume if counts[volume] > 1 else item["id"] for volume, item in zip(volumes, items, strict=True)]
    shared = sorted(volume for volume, n in counts.items() if n > 1)
    if not shared:
        return [{**item, "volume": item["id"]} for item in items]
    sizes = first_names([f"{volume} ({counts[volume]})" for volume in shared])
    largest = max(Counter(groups).values())
    if len(set(groups)) < MIN_VOLUMES or largest > len(items) / 2:
        log_once(
            f"{folder}: the names of the {len(items)} B-scans give {len(set(groups))} volume(s) ({sizes}), too few "
            f"(or one too large) to split by, so they are split image by image: validation B-scans may neighbour "
            "training ones of their volume. Pass --split_file to decide the split (a training's split.json form)."
        )
        groups = [item["id"] for item in items]
    else:
        log_once(
            f"{folder}: {len(items)} B-scans split by volume (the name without its B-scan index), "
            f"{len(set(groups))} volumes: {sizes}",
            logging.INFO,
        )
    return [{**item, "volume": group} for item, group in zip(items, groups, strict=True)]


@register_layout(
    "oct",
    "duke",
    "Duke DME .mat files: <dir>/Subject_NN.mat with 'images' and 'manualLayers1'",
    detect=lambda d: any(d.glob("*.mat")),
    group_key="subject",
)
def list_duke(
    dataset_dir: Path, split: str, grader: int = 1, class_names: list[str] | None = None, **options
) -> list[dict]:
    if split == "test":
        return []
    return [item for path in data_files(dataset_dir, (".mat",)) for item in duke_items(path, grader, class_names)]


@register_layout(
    "oct",
    "split_folders",
    "split folders (NR206): <dir>/train/ + <dir>/train_labels/, <dir>/val/ + <dir>/val_labels/",
    detect=lambda d: (d / "train").is_dir() and (d / "train_labels").is_dir(),
    own_splits=True,
)
def list_split_folders(dataset_dir: Path, split: str, **options) -> list[dict]:
    splits = ("train", "val", "test") if split == "all" else (split,)
    return [
        item
        for name in splits
        if (dataset_dir / name).is_dir()
        for item in paired_items(dataset_dir / name, dataset_dir / f"{name}_labels")
    ]


@register_layout(
    "oct",
    "folder_pair",
    "one folder pair: <dir>/images/ + <dir>/labels/ (or masks/), PNG/TIFF/JPEG/BMP",
    detect=lambda d: (d / "images").is_dir() and any((d / name).is_dir() for name in ("labels", "masks")),
    group_key="volume",
)
def list_folder_pair(dataset_dir: Path, split: str, **options) -> list[dict]:
    if split == "test":
        return []
    label_dir = dataset_dir / ("labels" if (dataset_dir / "labels").is_dir() else "masks")
    return group_by_volume(paired_items(dataset_dir / "images", label_dir), dataset_dir / "images")


@register_layout(
    "oct",
    "via_json",
    "a VIA / makesense.ai VGG JSON export <dir>/*.json beside its images",
    detect=lambda d: any(d.glob("*.json")) and any(p.suffix.lower() in IMAGE_SUFFIXES for p in d.iterdir()),
    group_key="volume",
)
def list_via_json(dataset_dir: Path, split: str, class_names: list[str] | None = None, **options) -> list[dict]:
    if split == "test":
        return []
    if class_names is None:
        raise DataError(dataset_dir, "a VIA JSON export needs 'class_names' to map region classes to values.")
    exports = sorted(dataset_dir.glob("*.json"))
    listed = {Path(name).name for path in exports for name in via_filenames(path)}
    beside = sorted(
        path.name
        for path in dataset_dir.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and path.name not in listed
    )
    if beside:  # not annotated (or exported from another project): an image is never guessed to be background
        log_once(
            f"{dataset_dir}: {len(beside)} images beside the VIA export{'s' if len(exports) > 1 else ''} are not in "
            f"{'any of them' if len(exports) > 1 else 'it'} (not annotated), left out: {first_names(beside)}"
        )
    return group_by_volume([item for path in exports for item in via_items(path)], dataset_dir)


register_phantom(
    "oct",
    lambda folder: write_phantom_dataset(folder, n_subjects=8),
    "python -m clinseg.datasets.oct.phantom --out data/phantoms/oct_layers",
)


def load_oct_datalist(
    dataset_dir: str | os.PathLike,
    split: str = "train",
    class_names: list[str] | None = None,
    val_fraction: Fraction = 0.2,
    grader: int = 1,
    phantom_if_missing: bool = False,
    folds: NonNegativeInt = 0,
    fold: NonNegativeInt = 0,
    max_pixels: PositiveInt | None = MAX_PIXELS,
    split_file: str | os.PathLike | None = None,
) -> list[dict]:
    """The items (paths) of one split (``train``, ``val``, ``test`` or ``all``) of the OCT dataset in ``dataset_dir``.

    Args:
        dataset_dir: the dataset folder, in one of the accepted layouts (module docstring).
        split: ``"train"``, ``"val"``, ``"test"`` (split folders only) or ``"all"``.
        class_names: the bundle's classes (a VIA export's region classes are looked up in them).
        val_fraction: fraction of subjects (or images) held out for validation when the layout has no splits.
        grader: which Duke grader's boundaries to use (1 or 2).
        phantom_if_missing: generate the synthetic phantom into ``dataset_dir`` if the folder has no data yet
            (used for the bundle's default folder only, never for a folder the user named).
        folds, fold: a cross-validation fold's split instead of the fixed one (``folds`` 2 or more).
        max_pixels: the largest image accepted, checked from every file's header.
        split_file: a training run's ``split.json`` (or nnU-Net's ``splits_final.json``, with ``fold``): the split,
            exactly (:func:`clinseg.datasets.layouts.split_from_file`).
    """
    return load_datalist(
        "oct",
        dataset_dir,
        split,
        val_fraction,
        phantom_if_missing,
        max_pixels=max_pixels,
        folds=folds,
        fold=fold,
        split_file=split_file,
        class_names=class_names,
        grader=grader,
    )


def load_oct_images(
    input_path: str | os.PathLike,
    max_pixels: PositiveInt | None = MAX_PIXELS,
    min_size: PositiveInt = MIN_BSCAN_SIZE,
    keep_refused: bool = False,
) -> list[dict]:
    """Images to segment (paths): one image file, a ``.mat`` file of B-scans, a multi-frame DICOM OCT volume (each
    frame a B-scan, ``scan.dcm::12``), or a folder of these; inputs of one name (``b0.png``, ``b0.tif``) get distinct
    result ids. Each image file is checked from its header: within
    ``max_pixels``, and at least ``min_size`` rows and columns (a thumbnail is no B-scan). With ``keep_refused``, a
    file that fails stays in the list marked refused (:mod:`clinseg.datasets.refusals`) and the others are listed."""
    input_path = Path(input_path)
    if input_path.is_file():
        paths = [input_path]
    elif input_path.is_dir():
        paths = data_files(input_path, (*IMAGE_SUFFIXES, *DICOM_SUFFIXES, ".mat"))
    else:
        raise DataError(input_path, "does not exist.", "Point 'input_dir' at an image, a .mat file or a folder.")
    if not paths:
        raise NoUsableDataError(
            input_path.resolve(),
            f"holds no images ({', '.join(IMAGE_SUFFIXES + DICOM_SUFFIXES)}) or Duke .mat files to segment.",
        )

    def items_of(path: Path) -> list[dict]:
        if path.suffix.lower() == ".mat":
            return bscan_items(path)
        if path.suffix.lower() in DICOM_SUFFIXES + TIFF_SUFFIXES and (volume := image_frames(path, max_pixels))[0] > 1:
            # a multi-frame Ophthalmic Tomography image or a multi-page TIFF: an OCT volume, one B-scan per frame
            frames, shape = volume
            check_bscan_size(str(path), shape, min_size)
            return [
                {"image": member_path(path, i), "id": f"{path.stem}_bscan{i:03d}", "source": str(path)}
                for i in range(frames)
            ]
        return [{"image": str(path), "id": path.stem, "source": str(path)}]

    def check_size(item: dict) -> None:
        if split_member(item["image"])[1] is None:  # a .mat B-scan's size is checked once it is read
            check_bscan_size(item["image"], read_header(item["image"], max_pixels)["shape"], min_size)

    items = gather_items(paths, items_of, keep_refused)
    check_headers(items, max_pixels=max_pixels, keep_refused=keep_refused)
    return unique_ids(check_each(items, check_size, keep_refused))
