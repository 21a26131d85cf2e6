"""The fundus vessel layouts, registered for the ``fundus`` task, and the bundle's data lists (paths).

Accepted layouts of ``dataset_dir``:

1. DRIVE as released: ``training/`` (and ``test/``) each with ``images/``, ``1st_manual/``, ``mask/``; or one
   such split folder itself (e.g. ``.../DRIVE/training``).
2. Kaggle "retina blood vessel": ``Data/train/image`` + ``Data/train/mask`` (+ ``Data/test/...``).
3. Generic binary folders: ``images/`` + ``masks/`` (+ optional ``fov/``), any other binary 2D task too.

Items are paths: ``{"image", "label", "fov" (when the layout has FOV masks), "id", "source", "annotation_source"}``.
The bundle's transforms decode them (``PhotoReader``, ``BinaryMaskReader``) and set pixels outside the field of view
to the ignore value (``MaskOutsideFOVd``), so the loss and every metric see only the FOV, as DRIVE's evaluation
protocol requires. Without explicit splits the last ``val_fraction`` of the sorted image ids are validation: for the
20 DRIVE training images (ids 21-40) and the default 0.25 this is ids 36-40, the fixed split the benchmark reports.
In the generic and Kaggle layouts the split keeps both eyes of one person together (``subject``: the name without a
trailing eye marker, CHASE_DB1's ``Image_01L`` and ``Image_01R``).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from clinseg.datasets.errors import DataError, NoUsableDataError
from clinseg.datasets.fundus.phantom import write_drive_layout
from clinseg.datasets.io import unique_ids
from clinseg.datasets.layouts import (
    data_files,
    files_by_stem,
    load_datalist,
    partner_file,
    register_layout,
    register_phantom,
)
from clinseg.datasets.readers import MAX_PIXELS, read_header
from clinseg.datasets.value_types import Fraction, NonNegativeInt, PositiveInt, PositiveSize

logger = logging.getLogger(__name__)

DRIVE_IMAGE = re.compile(r"^(\d+)_(training|test)\.(tif|tiff)$", re.IGNORECASE)
MASK_SUFFIXES = ("", "_mask", "_label", "_manual1")
FOV_SUFFIXES = ("", "_fov", "_mask")
CHASE_ANNOTATIONS = {1: "_1stHO", 2: "_2ndHO"}
"""CHASE_DB1's manual annotations beside each photograph (``Image_01L.jpg``, ``Image_01L_1stHO.png``): the first
and second human observer."""
ANNOTATION_SUFFIXES = (*MASK_SUFFIXES[1:], *FOV_SUFFIXES[1:], "_manual2", *CHASE_ANNOTATIONS.values())
"""Name suffixes of the masks, FOV masks and annotations that releases keep beside their photographs."""
EYE_SUFFIX = re.compile(r"^(?P<subject>.+?)(?:(?<=\d)[_-]?[LR]|[_-](?:L|R|OD|OS|left|right))$", re.IGNORECASE)
"""A name ending in the eye it shows (CHASE_DB1's ``Image_01L``/``Image_01R``, ``p3_OD``/``p3_OS``): both eyes of a
person share the rest of the name."""


def subject_of(stem: str) -> str:
    """The person a fundus photograph shows, from its name: the name without a trailing eye marker (:data:`EYE_SUFFIX`),
    so that the split keeps both eyes of one person on one side (they share anatomy, camera and session)."""
    match = EYE_SUFFIX.match(stem)
    return match.group("subject") if match else stem


def drive_split_items(
    split_dir: Path, annotator: int = 1, with_labels: bool = True, other_images: bool = False
) -> list[dict]:
    """One split of DRIVE as released: ``images/NN_<split>.tif``, ``1st_manual/NN_manual1.gif``,
    ``mask/NN_<split>_mask.gif`` (``2nd_manual`` with ``annotator=2``, test split only).

    Images not named as DRIVE names them have no manual to pair with: with ``other_images`` (photographs to
    segment, which need none) they are items too, with a FOV mask from ``mask/`` when one has their name (plus
    ``_fov`` or ``_mask``), else none (it is estimated); otherwise each is named in a log line and left out.

    Raises:
        DataError: a missing manual, or a missing FOV mask of a DRIVE-named image without ``other_images`` (named);
            with ``other_images`` (photographs to segment) a mask of its name in another format is taken, else its
            field is estimated.
    """
    image_dir = split_dir / "images"
    if not image_dir.is_dir():
        raise DataError(split_dir, "has no 'images' folder; not a DRIVE split folder.")
    items, skipped, fovs = [], 0, files_by_stem(split_dir / "mask") if other_images else {}
    for image_path in data_files(image_dir):
        match = DRIVE_IMAGE.match(image_path.name)
        if match is None:
            if not other_images:
                logger.warning(f"{image_path}: skipped, not named as DRIVE images are (NN_training.tif, NN_test.tif)")
                skipped += 1
                continue
            item = {"image": str(image_path), "id": image_path.stem, "source": str(image_path)}
            fov_path = partner_file(fovs, image_path.stem, FOV_SUFFIXES)
            if fov_path is not None:
                item["fov"] = str(fov_path)
            items.append(item)
            continue
        number, split = match.group(1), match.group(2)
        fov_path = split_dir / "mask" / f"{number}_{split}_mask.gif"
        item = {"image": str(image_path), "id": number, "source": str(image_path)}
        if fov_path.is_file():
            item["fov"] = str(fov_path)
        elif other_images:  # photographs to segment: a mask in another format, else the field is estimated
            found = partner_file(fovs, image_path.stem, FOV_SUFFIXES)
            if found is not None:
                item["fov"] = str(found)
            else:
                logger.warning(f"{fov_path}: missing; the field of view of {image_path.name} is estimated instead")
        else:  # training and evaluation score inside the released mask: an incomplete copy of the split
            raise DataError(fov_path, f"FOV mask of {image_path.name} is missing.")
        if with_labels:
            label_path = split_dir / f"{'1st' if annotator == 1 else '2nd'}_manual" / f"{number}_manual{annotator}.gif"
            if not label_path.is_file():
                raise DataError(label_path, f"manual annotation of {image_path.name} is missing.")
            item.update(label=str(label_path), annotation_source=str(label_path))
        items.append(item)
    if not items:
        raise DataError(image_dir, "holds no DRIVE images named NN_training.tif or NN_test.tif.")
    if skipped:
        logger.warning(f"{image_dir}: {skipped} image(s) skipped, not named as DRIVE images are (named above)")
    return items


def image_mask_items(image_dir: Path, mask_dir: Path | None, fov_dir: Path | None = None) -> list[dict]:
    """Generic binary segmentation folders: every image of ``image_dir`` with its mask from ``mask_dir`` (same stem,
    optionally with a ``_mask`` suffix) and, when ``fov_dir`` is given, its FOV mask.

    Raises:
        DataError: an image without a mask.
    """
    masks, fovs = files_by_stem(mask_dir), files_by_stem(fov_dir)
    items = []
    for image_path in photographs(data_files(image_dir)):
        item = {"image": str(image_path), "id": image_path.stem, "subject": subject_of(image_path.stem)}
        item["source"] = str(image_path)
        if mask_dir is not None:
            mask_path = partner_file(masks, image_path.stem, MASK_SUFFIXES)
            if mask_path is None:
                raise DataError(image_path, f"has no mask in {mask_dir} (same name, or with a '_mask' suffix).")
            item.update(label=str(mask_path), annotation_source=str(mask_path))
        fov_path = partner_file(fovs, image_path.stem, FOV_SUFFIXES)
        if fov_path is not None:
            item["fov"] = str(fov_path)
        items.append(item)
    return items


@register_layout(
    "fundus",
    "drive_split",
    "DRIVE split folder: <dir>/{images,1st_manual,mask}/",
    detect=lambda d: (d / "images").is_dir() and (d / "mask").is_dir() and any(d.glob("*_manual")),
)
def list_drive_split(dataset_dir: Path, split: str, **options) -> list[dict]:
    return [] if split == "test" else drive_split_items(dataset_dir)


@register_layout(
    "fundus",
    "drive",
    "DRIVE: <dir>/training/{images,1st_manual,mask}/",
    detect=lambda d: (d / "training" / "images").is_dir(),
)
def list_drive(dataset_dir: Path, split: str, **options) -> list[dict]:
    if split == "test":
        return drive_split_items(dataset_dir / "test") if (dataset_dir / "test").is_dir() else []
    return drive_split_items(dataset_dir / "training")


@register_layout(
    "fundus",
    "kaggle",
    "Kaggle retina vessels: <dir>/Data/train/image/ + <dir>/Data/train/mask/",
    detect=lambda d: (d / "Data" / "train" / "image").is_dir(),
    group_key="subject",
)
def list_kaggle(dataset_dir: Path, split: str, **options) -> list[dict]:
    root = dataset_dir / "Data" / ("test" if split == "test" else "train")
    return image_mask_items(root / "image", root / "mask") if root.is_dir() else []


@register_layout(
    "fundus",
    "folders",
    "generic: <dir>/images/ + <dir>/masks/ (+ optional <dir>/fov/), masks 0/255 or 0/1",
    detect=lambda d: (d / "images").is_dir() and (d / "masks").is_dir(),
    group_key="subject",
)
def list_image_mask_folders(dataset_dir: Path, split: str, **options) -> list[dict]:
    if split == "test":
        return []
    return image_mask_items(dataset_dir / "images", dataset_dir / "masks", dataset_dir / "fov")


def chase_items(folder: Path, annotator: int = 1) -> list[dict]:
    """CHASE_DB1 as released: the photographs and both observers' annotations in one folder (``Image_01L.jpg``,
    ``Image_01L_1stHO.png``, ``Image_01L_2ndHO.png``), no FOV masks (the field of view is estimated). Each
    photograph is an item with the ``annotator``'s annotation; both eyes of a person are one subject.

    Raises:
        DataError: a photograph without that annotation (named).
    """
    suffix = CHASE_ANNOTATIONS[annotator]
    files = files_by_stem(folder)
    items = []
    for image_path in photographs(data_files(folder)):
        label_path = partner_file(files, image_path.stem, (suffix,))
        if label_path is None:
            raise DataError(image_path, f"has no annotation {image_path.stem}{suffix}.png beside it (CHASE_DB1).")
        items.append(
            {
                "image": str(image_path),
                "label": str(label_path),
                "annotation_source": str(label_path),
                "id": image_path.stem,
                "subject": subject_of(image_path.stem),
                "source": str(image_path),
            }
        )
    return items


def photographs(paths: list[Path]) -> list[Path]:
    """``paths`` without the masks and annotations of other files among them (``a_mask.png`` beside ``a.jpg``,
    CHASE_DB1's ``Image_01L_1stHO.png`` beside ``Image_01L.jpg``), named in one log line: segmented as photographs,
    they would give a plausible vessel map of a vessel map."""
    stems = {path.stem.lower() for path in paths}
    kept, annotations = [], []
    for path in paths:
        stem = path.stem.lower()
        is_annotation = any(
            stem.endswith(suffix.lower()) and stem[: -len(suffix)] in stems for suffix in ANNOTATION_SUFFIXES
        )
        (annotations if is_annotation else kept).append(path)
    if annotations:
        names = ", ".join(path.name for path in annotations[:5]) + (" ..." if len(annotations) > 5 else "")
        logger.warning(
            f"{paths[0].parent}: {len(annotations)} masks or annotations of photographs beside them are not "
            f"photographs, left out: {names}"
        )
    return kept


@register_layout(
    "fundus",
    "chase_db1",
    "CHASE_DB1: <dir>/Image_NN{L,R}.jpg beside Image_NN{L,R}_1stHO.png (and _2ndHO.png), no FOV masks",
    detect=lambda d: any(d.glob("*_1stHO.png")),
    group_key="subject",
)
def list_chase(dataset_dir: Path, split: str, **options) -> list[dict]:
    return [] if split == "test" else chase_items(dataset_dir)


register_phantom(
    "fundus",
    lambda folder: write_drive_layout(folder, n_images=12),
    "python -m clinseg.datasets.fundus.phantom --out data/phantoms/vessels",
)


def load_vessel_datalist(
    dataset_dir: str | os.PathLike,
    split: str = "train",
    val_fraction: Fraction = 0.25,
    phantom_if_missing: bool = False,
    min_shape: PositiveSize | None = None,
    folds: NonNegativeInt = 0,
    fold: NonNegativeInt = 0,
    max_pixels: PositiveInt | None = MAX_PIXELS,
    split_file: str | os.PathLike | None = None,
) -> list[dict]:
    """The items (paths) of one split (``train``, ``val``, ``test`` or ``all``) of the vessel dataset in
    ``dataset_dir``; ``min_shape`` (the training patch) and ``max_pixels`` are checked against every image's header;
    ``folds`` and ``fold`` choose a cross-validation fold instead of the fixed split; ``split_file`` (a training
    run's ``split.json``) gives the split exactly (:func:`clinseg.datasets.layouts.split_from_file`)."""
    return load_datalist(
        "fundus",
        dataset_dir,
        split,
        val_fraction,
        phantom_if_missing,
        min_shape=min_shape,
        max_pixels=max_pixels,
        folds=folds,
        fold=fold,
        split_file=split_file,
    )


def load_fundus_images(
    input_path: str | os.PathLike, max_pixels: PositiveInt | None = MAX_PIXELS, keep_refused: bool = False
) -> list[dict]:
    """Photographs to segment (paths): one image, a folder of images, or a DRIVE split folder (its FOV masks are
    used; every photograph in its ``images/`` is segmented, DRIVE's names or not); each is checked from its header
    (within ``max_pixels``; with ``keep_refused``, one that fails stays in the list marked refused, see
    :mod:`clinseg.datasets.refusals`), and inputs of one name (``a.png``, ``a.tif``) get distinct result ids."""
    from clinseg.datasets.layouts import check_headers

    input_path = Path(input_path)
    if input_path.is_dir() and (input_path / "images").is_dir() and (input_path / "mask").is_dir():
        items = drive_split_items(input_path, with_labels=False, other_images=True)
    elif input_path.is_file():
        read_header(input_path, max_pixels)
        items = [{"image": str(input_path), "id": input_path.stem, "source": str(input_path)}]
    elif input_path.is_dir():
        items = image_mask_items(input_path, None)
    else:
        items = []
    if not items:
        raise NoUsableDataError(input_path.resolve(), "holds no photographs to segment (or does not exist).")
    check_headers(items, max_pixels=max_pixels, keep_refused=keep_refused)
    return unique_ids(items)
