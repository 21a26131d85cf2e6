"""The layout registry: one registered function per release layout, and everything around it written once.

A *layout* is how a dataset release arranges its files (DRIVE's ``training/images`` + ``1st_manual`` + ``mask``,
Duke's ``Subject_NN.mat``, NR206's ``train`` + ``train_labels``, ...). Each is a function registered for a task
(``fundus``, ``oct``, ``ct``) that lists the items of a folder **as paths**: ``{"image": path, "label": path, "id",
"subject", "source", ...}``; decoding happens later, in the bundles' transforms, through the readers of
:mod:`clinseg.datasets.readers`. :func:`load_datalist` then does, once for every layout:

- detection (the first registered layout whose ``detect`` accepts the folder) and the message listing the accepted
  layouts when none does;
- the embedded phantom generated on first use, atomically (a temporary folder renamed into place, so ranks of a
  distributed run starting together never read a half-written dataset);
- the split: the layout's own split folders, or the fixed split by subject (:func:`clinseg.datasets.io.split_by_group`);
- the header checks of every listed file (exists, is an image, size limit, several frames, image and label of one
  shape, image at least as large as a training patch), before any pixel is decoded;
- the report of files that are not data (skipped, named in one log line) and the empty-split message.

A new release layout is one function::

    @register_layout("fundus", "my_release", "<dir>/imgs/ + <dir>/gt/", detect=lambda d: (d / "imgs").is_dir())
    def list_my_release(dataset_dir, split, **options):
        return [{"image": str(p), "label": str(dataset_dir / "gt" / p.name), "id": p.stem} for p in ...]
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from clinseg.datasets.errors import DataError, NoUsableDataError
from clinseg.datasets.io import split_by_group, unique_ids
from clinseg.datasets.readers import IMAGE_SUFFIXES, MAX_PIXELS, read_header, split_member
from clinseg.datasets.value_types import Fraction, NonNegativeInt, PositiveInt, PositiveSize

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "all")
FILE_KEYS = ("image", "label", "fov")
"""Item keys holding the path of a 2D file whose header is checked (a ``path::member`` entry is the layout's)."""


@dataclass(frozen=True)
class Layout:
    task: str
    name: str
    description: str
    detect: Callable[[Path], bool]
    list_items: Callable[..., list[dict]]
    own_splits: bool = False
    """The layout has split folders of its own: ``list_items`` gets the split; otherwise it lists everything."""
    group_key: str = "id"
    """What the fixed split keeps together (``subject``: every B-scan of one eye on one side)."""


@dataclass(frozen=True)
class Phantom:
    generate: Callable[[Path], object]
    command: str


LAYOUTS: dict[str, list[Layout]] = {}
PHANTOMS: dict[str, Phantom] = {}


def register_layout(
    task: str, name: str, description: str, detect: Callable[[Path], bool], own_splits=False, group_key="id"
):
    """Decorator registering ``list_items(dataset_dir, split, **options)`` as the reader of a release layout."""

    def register(list_items: Callable[..., list[dict]]):
        layouts = LAYOUTS.setdefault(task, [])
        layouts[:] = [layout for layout in layouts if layout.name != name]
        layouts.append(Layout(task, name, description, detect, list_items, own_splits, group_key))
        return list_items

    return register


def register_phantom(task: str, generate: Callable[[Path], object], command: str) -> None:
    """The generator of a task's embedded demo data, and the command that runs it by hand."""
    PHANTOMS[task] = Phantom(generate, command)


def accepted_layouts(task: str) -> str:
    layouts = LAYOUTS.get(task, [])
    return "Accepted layouts:\n" + "\n".join(f"  {i}. {lay.description}" for i, lay in enumerate(layouts, 1))


def detect_layout(task: str, dataset_dir: Path) -> Layout | None:
    if not dataset_dir.is_dir():
        return None
    return next((layout for layout in LAYOUTS.get(task, []) if layout.detect(dataset_dir)), None)


def generate_atomically(generate: Callable[[Path], object], dataset_dir: Path) -> None:
    """Run ``generate`` into a hidden sibling folder and rename it onto ``dataset_dir``: concurrent first runs (ranks
    of one ``torchrun``, two trainings) each see either nothing or the whole dataset; the slower one keeps the
    winner's copy."""
    dataset_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = dataset_dir.with_name(f".{dataset_dir.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        generate(staging)
        try:
            if dataset_dir.is_dir() and not any(dataset_dir.iterdir()):
                dataset_dir.rmdir()  # an empty folder made by hand is not a dataset
            os.rename(staging, dataset_dir)
        except OSError:
            if not dataset_dir.is_dir():
                raise
            logger.info(f"{dataset_dir} was generated by another process meanwhile; using that copy")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def demo_hint(task: str) -> str:
    phantom = PHANTOMS.get(task)
    if phantom is None:
        return ""
    return (
        f"To create the embedded demo data instead, run:\n  {phantom.command}\n"
        "(or leave 'dataset_dir' at its default, which generates it on first use)."
    )


def rank_zero_first(prepare: Callable[[], object]) -> None:
    """Run ``prepare`` on rank 0 of a distributed run while the other ranks wait, then let all go on; outside one,
    just run it. Every rank must call this at the same point (the ranks of one ``torchrun`` run one config)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        prepare()
        return
    try:
        if dist.get_rank() == 0:
            prepare()
    finally:  # a rank 0 that failed still releases the others, which then find no data and say so
        dist.barrier()


def resolve(task: str, dataset_dir: Path, phantom_if_missing: bool = False) -> Layout:
    """The layout of ``dataset_dir``, generating the task's phantom there first when asked and nothing is there
    (by rank 0 alone in a distributed run, the others waiting for it)."""
    if phantom_if_missing and task in PHANTOMS:

        def generate_if_missing() -> None:
            if detect_layout(task, dataset_dir) is None:
                logger.info(f"generating the embedded {task} phantom dataset in {dataset_dir} ...")
                generate_atomically(PHANTOMS[task].generate, dataset_dir)

        rank_zero_first(generate_if_missing)
    layout = detect_layout(task, dataset_dir)
    if layout is None:
        state = "does not exist" if not dataset_dir.exists() else f"holds no usable {task} data"
        hint = "\n".join(text for text in (accepted_layouts(task), demo_hint(task)) if text)
        raise NoUsableDataError(dataset_dir.resolve(), f"{state}.", hint)
    return layout


def data_files(folder: Path, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> list[Path]:
    """The files of ``folder`` with a data suffix, sorted; every other file is named in one log line and skipped
    (a ``Thumbs.db`` or a ``README.txt`` beside the images is not an error)."""
    if not folder.is_dir():
        return []
    files, others = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        (files if path.is_file() and path.suffix.lower() in suffixes else others).append(path)
    if others:
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in others[:5])
        logger.warning(f"{folder}: skipped {len(others)} entries that are not data files: {names}")
    return files


def files_by_stem(folder: Path | None, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> dict[str, Path]:
    """The data files of ``folder`` by lower-case stem, listed once (an absent folder: none), so that finding each
    image's mask or label is a lookup, not a folder listing per image."""
    if folder is None or not folder.is_dir():
        return {}
    return {p.stem.lower(): p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes}


def partner_file(files: dict[str, Path], stem: str, name_suffixes: Sequence[str]) -> Path | None:
    """The file of ``files`` (:func:`files_by_stem`) named ``stem`` plus the first of ``name_suffixes`` present
    (``""`` for the same name, ``"_mask"``, ...), any extension and case."""
    return next((files[f"{stem}{s}".lower()] for s in name_suffixes if f"{stem}{s}".lower() in files), None)


def check_headers(items: list[dict], min_shape: Sequence[int] | None = None, max_pixels: int | None = MAX_PIXELS):
    """Check each item's 2D files from their headers: readable, within ``max_pixels``, one frame, the label and FOV
    mask of the image's shape, and the image at least ``min_shape`` (a training patch) large.

    Raises:
        DataError: naming the file and the problem.
    """
    for item in items:
        shapes = {}
        for key in FILE_KEYS:
            value = item.get(key)
            if not isinstance(value, str) or split_member(value)[1] is not None:
                continue
            if not value.lower().endswith(IMAGE_SUFFIXES):  # volumes (CT) are checked by their own reader
                continue
            shapes[key] = (value, tuple(read_header(value, max_pixels)["shape"]))
        if "image" not in shapes:
            continue
        image_path, image_shape = shapes.pop("image")
        for path, shape in shapes.values():
            if shape != image_shape:
                raise DataError(
                    path,
                    f"is {shape[0]} x {shape[1]} but its image {Path(image_path).name} is {image_shape[0]} x "
                    f"{image_shape[1]} (rows x cols): a mask or label must have its image's size.",
                )
        if min_shape is not None and any(s < p for s, p in zip(image_shape, min_shape, strict=False)):
            raise DataError(
                image_path,
                f"is {image_shape[0]} x {image_shape[1]} pixels, smaller than the training patch "
                f"{list(min_shape)}; lower 'patch_size' to at most the smallest image.",
            )


def load_datalist(
    task: str,
    dataset_dir: str | os.PathLike,
    split: str = "train",
    val_fraction: Fraction = 0.2,
    phantom_if_missing: bool = False,
    min_shape: PositiveSize | None = None,
    max_pixels: PositiveInt | None = MAX_PIXELS,
    folds: NonNegativeInt = 0,
    fold: NonNegativeInt = 0,
    **options,
) -> list[dict]:
    """The items (paths) of one split (``train``, ``val``, ``test`` or ``all``) of the ``task`` dataset in
    ``dataset_dir``, in whichever registered layout it is. ``folds`` (2 or more) and ``fold`` choose the
    validation fold of a cross-validation instead of the fixed split (:func:`clinseg.datasets.io.split_by_group`).
    ``options`` go to the layout's lister (class names, colour table, grader, ...).

    Raises:
        NoUsableDataError: no accepted layout (the message lists them and how to make demo data), or an empty split.
        DataError: a file of the dataset is unusable (named).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    dataset_dir = Path(dataset_dir)
    layout = resolve(task, dataset_dir, phantom_if_missing)
    if folds and layout.own_splits and split != "test":
        raise NoUsableDataError(
            dataset_dir.resolve(),
            f"has train and validation folders of its own ({layout.name} layout): cross-validation deals one pool "
            "of cases to the folds.",
            "Put the cases in one folder of a layout without splits, or train with --folds 0.",
        )
    if layout.own_splits or split == "test":  # a test split is always a folder of its own, used whole
        items = layout.list_items(dataset_dir, split, **options)
        if not items and split == "test":
            raise NoUsableDataError(dataset_dir.resolve(), "has no test split (a test folder).", accepted_layouts(task))
    else:
        # unique ids first: results and metric rows are named by id, and the split keeps groups by it
        items = unique_ids(layout.list_items(dataset_dir, "all", **options))
        items = split_by_group(items, split, val_fraction, layout.group_key, folds, fold)
    if not items:
        raise NoUsableDataError(
            dataset_dir.resolve(),
            f"the '{split}' split of this {layout.name} dataset is empty (no annotated images).",
            accepted_layouts(task),
        )
    check_headers(items, min_shape, max_pixels)
    logger.info(f"{dataset_dir}: {layout.name} layout, {len(items)} images in the '{split}' split")
    return items
