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
- the split: a split file when one is given (:func:`read_split_file`, nnU-Net's ``splits_final.json`` form), else the
  layout's own split folders, or the fixed split by subject (:func:`clinseg.datasets.io.split_by_group`); either way
  it is recorded, so that a training writes down the split it trained with (:func:`write_split`);
- the header checks of every listed file (exists, is an image, size limit, several frames, image and label of one
  shape, image at least as large as a training patch), before any pixel is decoded;
- the report of files that are not data (skipped, named in one log line) and the empty-split message.

A new release layout is one function::

    @register_layout("fundus", "my_release", "<dir>/imgs/ + <dir>/gt/", detect=lambda d: (d / "imgs").is_dir())
    def list_my_release(dataset_dir, split, **options):
        return [{"image": str(p), "label": str(dataset_dir / "gt" / p.name), "id": p.stem} for p in ...]
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from clinseg.datasets.errors import DataError, NoUsableDataError
from clinseg.datasets.io import atomic_write, split_by_group, staged_folder, unique_ids
from clinseg.datasets.readers import IMAGE_SUFFIXES, MAX_PIXELS, read_header, split_member
from clinseg.datasets.refusals import check_each
from clinseg.datasets.value_types import Fraction, NonNegativeInt, PositiveInt, PositiveSize

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test", "all")
SPLIT_FILE = "split.json"
"""The name of the file in a training's run folder that holds the split it trained with (:func:`write_split`)."""
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
    """Run ``generate`` into a hidden sibling folder and rename it onto ``dataset_dir``
    (:func:`clinseg.datasets.io.staged_folder`): concurrent first runs (ranks of one ``torchrun``, two trainings) each
    see either nothing or the whole dataset; the slower one keeps the winner's copy."""
    try:
        with staged_folder(dataset_dir) as staging:
            generate(staging)
    except FileExistsError:
        logger.info(f"{dataset_dir} was generated by another process meanwhile; using that copy")


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
    files, others, broken = [], [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if path.is_symlink() and not path.exists():
            broken.append(path)
            continue
        (files if path.is_file() and path.suffix.lower() in suffixes else others).append(path)
    if broken:
        names = ", ".join(f"{p.name} -> {os.readlink(p)}" for p in broken[:5])
        logger.warning(f"{folder}: skipped {len(broken)} links whose target does not exist: {names}")
    if others:
        names = ", ".join(p.name + ("/" if p.is_dir() else "") for p in others[:5])
        logger.warning(f"{folder}: skipped {len(others)} entries that are not data files: {names}")
    return files


def files_by_stem(folder: Path | None, suffixes: Sequence[str] = IMAGE_SUFFIXES) -> dict[str, list[Path]]:
    """The data files of ``folder`` by lower-case stem (several where names differ only in case or extension:
    ``a.png``, ``A.tif``), listed once (an absent folder: none), so that finding each image's mask or label is a
    lookup, not a folder listing per image."""
    if folder is None or not folder.is_dir():
        return {}
    files: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes:
            files.setdefault(path.stem.lower(), []).append(path)
    return files


def partner_file(files: dict[str, list[Path]], stem: str, name_suffixes: Sequence[str]) -> Path | None:
    """The file of ``files`` (:func:`files_by_stem`) named ``stem`` plus one of ``name_suffixes`` (``""`` for the
    same name, ``"_mask"``, ...), any extension and case; None when there is none.

    Raises:
        DataError: several files would do (``a.png`` and ``A.tif``, ``a.png`` and ``a_mask.png``): which one belongs
            to the image cannot be told, and taking the first the file system lists would be a guess.
    """
    found = [path for s in name_suffixes for path in files.get(f"{stem}{s}".lower(), [])]
    if len(found) > 1:
        raise DataError(
            found[0].parent,
            f"holds {len(found)} candidates for {stem}: {', '.join(p.name for p in found)}; keep only the one that "
            "belongs to it.",
        )
    return found[0] if found else None


def check_headers(
    items: list[dict],
    min_shape: Sequence[int] | None = None,
    max_pixels: int | None = MAX_PIXELS,
    keep_refused: bool = False,
) -> list[dict]:
    """Check each item's 2D files from their headers: readable, within ``max_pixels``, one frame, the label and FOV
    mask of the image's shape, and the image at least ``min_shape`` (a training patch) large. With
    ``keep_refused`` (inference), an item that fails is marked refused (:mod:`clinseg.datasets.refusals`) and the
    others are still checked.

    Raises:
        DataError: naming the file and the problem (without ``keep_refused``).
    """

    def check_item(item: dict) -> None:
        shapes = {}
        for key in FILE_KEYS:
            value = item.get(key)
            if not isinstance(value, str) or split_member(value)[1] is not None:
                continue
            if not value.lower().endswith(IMAGE_SUFFIXES):  # volumes (CT) are checked by their own reader
                continue
            shapes[key] = (value, tuple(read_header(value, max_pixels)["shape"]))
        if "image" not in shapes:
            return
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

    return check_each(items, check_item, keep_refused)


def split_together(items: list[dict], group_key: str) -> list[str]:
    """Each item's split group: its ``group_key``, except that items whose images are one file's content under two
    names (a copy, found by SHA-256: :func:`clinseg.datasets.fingerprint.file_digests`, cached) make their groups
    one, so a copied image is never trained on and validated on; each such set is named in a log line."""
    from clinseg.datasets.fingerprint import file_digests

    groups = [item[group_key] for item in items]
    by_file: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        image = item.get("image")
        if isinstance(image, str) and split_member(image)[0].is_file():  # (not a DICOM series folder)
            by_file.setdefault(os.path.abspath(split_member(image)[0]), []).append(index)
    if len(by_file) < 2:
        return groups
    digests = file_digests(by_file)
    copies: dict[tuple[str, str | None], list[int]] = {}
    for path, indices in by_file.items():
        for index in indices:  # B-scan i of two copies of one .mat file are copies, B-scans i and j are not
            copies.setdefault((digests[path], split_member(items[index]["image"])[1]), []).append(index)
    merged: dict = {}  # a group -> the group it is one with (the smallest of them), followed to the end

    def one_with(group):
        while group in merged:
            group = merged[group]
        return group

    for indices in copies.values():
        names = sorted({Path(items[i]["image"]).name for i in indices})
        if len(names) > 1:
            together = sorted({one_with(groups[i]) for i in indices})
            merged.update((group, together[0]) for group in together[1:])
            logger.warning(f"{', '.join(names)} are the same image (identical files): kept on one side of the split")
    return [one_with(group) for group in groups]


def first_names(values: Sequence[str], most: int = 5) -> str:
    """The first ``most`` of ``values`` for a message, and how many there are when there are more."""
    return ", ".join(values[:most]) + (f" ... ({len(values)} in all)" if len(values) > most else "")


_logged: set[str] = set()


def log_once(message: str, level: int = logging.WARNING) -> None:
    """Log ``message`` the first time this process is to log it: a data list is listed once per split (and again by
    each evaluation in the process), and one finding about the folder is worth one line."""
    if message not in _logged:
        _logged.add(message)
        logger.log(level, message)


def read_split_file(path: str | os.PathLike, fold: int = 0, folds: int = 0) -> dict[str, list[str]]:
    """The split a split file decides: ``{"train": [ids], "val": [ids]}`` (the data list items' ``id``), or a list of
    such splits, one per cross-validation fold (nnU-Net's ``splits_final.json``), of which ``fold`` is taken.

    Raises:
        DataError: naming the file: absent, not JSON, not of that form, an id in both lists, a ``fold`` it has not,
            ``folds`` other than its number of splits, or ``folds``/``fold`` with a single split (each fold of a
            cross-validation would get that one split).
    """
    path = Path(path)
    expected = 'expected {"train": [ids], "val": [ids]} or a list of those, one per fold'
    try:
        content = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise DataError(path, f"does not exist (the split_file: {expected}).") from e
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(path, f"cannot be read as a split file: {e}".replace("\n", " ")) from e
    where = ""
    if isinstance(content, list):
        if folds and folds != len(content):
            raise DataError(path, f"holds {len(content)} folds, not the {folds} of --folds {folds}.")
        if not 0 <= fold < len(content):
            raise DataError(path, f"has no fold {fold}: it holds {len(content)} (fold 0 to {len(content) - 1}).")
        content, where = content[fold], f"fold {fold} "
    elif folds or fold:
        raise DataError(
            path,
            f"holds one split, not one per fold, so --folds {folds} --fold {fold} would get that split for every "
            "fold: drop --folds and --fold, or give a list of splits.",
        )

    def ids(side: str) -> list[str] | None:
        values = content.get(side) if isinstance(content, dict) else None
        if not isinstance(values, list) or not all(
            isinstance(v, (str, int)) and not isinstance(v, bool) for v in values
        ):
            return None
        return list(dict.fromkeys(str(v) for v in values))

    sides = {"train": ids("train"), "val": ids("val")}
    if None in sides.values():
        raise DataError(path, f"{where}is not a split: {expected}.")
    both = [i for i in sides["train"] if i in set(sides["val"])]
    if both:
        raise DataError(path, f"{where}lists {len(both)} ids in both 'train' and 'val': {first_names(both)}.")
    return sides


def split_from_file(
    items: list[dict], split_file: str | os.PathLike, group_key: str, fold: int = 0, folds: int = 0
) -> dict[str, list[dict]]:
    """``items`` (unique ids) on the sides a split file gives them (:func:`read_split_file`), each side in the
    items' order. The file decides exactly: every item must be on one side and every id of the file an item's.

    Raises:
        DataError: naming the file: a case of the dataset it assigns to neither side (a case added since it was
            written), an id it lists that the dataset has not, or copies of one image (:func:`split_together`) on
            both sides.
    """
    sides = read_split_file(split_file, fold, folds)
    side_of = {i: side for side, ids in sides.items() for i in ids}
    known = [str(item["id"]) for item in items]
    absent = [i for i in side_of if i not in set(known)]
    if absent:
        raise DataError(
            split_file, f"lists {len(absent)} ids that are not cases of the dataset: {first_names(absent)}."
        )
    unassigned = [i for i in known if i not in side_of]
    if unassigned:
        raise DataError(
            split_file,
            f"assigns {len(unassigned)} cases of the dataset to neither 'train' nor 'val': {first_names(unassigned)} "
            "(added since it was written?); add each to one of the lists.",
        )
    copies = split_together(items, "id")  # an item's id, or one shared by the copies of its image
    by_group: dict[str, set[str]] = {}
    for item, group in zip(items, copies, strict=True):
        by_group.setdefault(group, set()).add(side_of[str(item["id"])])
    split_copies = [str(item["id"]) for item, group in zip(items, copies, strict=True) if len(by_group[group]) > 1]
    if split_copies:
        raise DataError(
            split_file,
            f"puts copies of one image (identical files) on both sides: {first_names(split_copies)}; put them on "
            "one side.",
        )
    if group_key != "id":  # the file decides, but validating on the training cases' own subject is worth a line
        sides_of_group: dict[str, set[str]] = {}
        for item in items:
            sides_of_group.setdefault(str(item[group_key]), set()).add(side_of[str(item["id"])])
        shared = sorted(group for group, found in sides_of_group.items() if len(found) > 1)
        if shared:
            log_once(
                f"{split_file}: {len(shared)} {group_key}s have cases on both sides of the split: {first_names(shared)}"
            )
    return {side: [item for item in items if side_of[str(item["id"])] == side] for side in sides}


_decided: dict[str, dict[str, list[str]]] = {}
"""The ids of each side of the split this process's data lists used, by dataset folder (its real path)."""


def _record(dataset_dir: Path, sides: dict[str, list[dict]]) -> None:
    recorded = _decided.setdefault(os.path.realpath(dataset_dir), {})
    recorded.update({side: [str(item["id"]) for item in listed] for side, listed in sides.items()})


def decided_split(dataset_dir: str | os.PathLike) -> dict[str, list[str]] | None:
    """``{"train": ids, "val": ids}``: the split the data lists of ``dataset_dir`` were given in this process (the
    last one of each side); None while not both sides were listed."""
    recorded = _decided.get(os.path.realpath(dataset_dir), {})
    return {side: list(recorded[side]) for side in ("train", "val")} if {"train", "val"} <= recorded.keys() else None


def write_split(path: str | os.PathLike, dataset_dir: str | os.PathLike) -> Path | None:
    """Write the split the data lists of ``dataset_dir`` used (:func:`decided_split`) to ``path`` as a split file
    (atomically), so that passing it as ``split_file`` gives the same split later, where the fixed split would move
    with every case added to the folder (a case added since is refused until the file assigns it a side). Returns
    the path, or None when no split of ``dataset_dir`` was listed."""
    split = decided_split(dataset_dir)
    if split is None:
        return None
    text = json.dumps(split, indent=1) + "\n"
    path = atomic_write(path, lambda tmp: tmp.write_text(text))
    logger.info(
        f"the split ({len(split['train'])} train, {len(split['val'])} val) is written to {path}: pass "
        f"--split_file {path} to train or evaluate on it again"
    )
    return path


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
    split_file: str | os.PathLike | None = None,
    **options,
) -> list[dict]:
    """The items (paths) of one split (``train``, ``val``, ``test`` or ``all``) of the ``task`` dataset in
    ``dataset_dir``, in whichever registered layout it is. ``folds`` (2 or more) and ``fold`` choose the
    validation fold of a cross-validation instead of the fixed split (:func:`clinseg.datasets.io.split_by_group`).
    ``split_file`` (a training run's ``split.json``, or nnU-Net's ``splits_final.json`` with ``fold``) decides the
    ``train`` and ``val`` splits exactly instead (:func:`split_from_file`), the layout's split folders pooled.
    ``options`` go to the layout's lister (class names, colour table, grader, ...).

    Raises:
        NoUsableDataError: no accepted layout (the message lists them and how to make demo data), or an empty split.
        DataError: a file of the dataset is unusable (named), or the split file does not fit the dataset (named).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}.")
    dataset_dir = Path(dataset_dir)
    layout = resolve(task, dataset_dir, phantom_if_missing)
    if split_file and split in ("train", "val"):
        if layout.own_splits:  # the cases of its train and val folders, dealt as the file says
            pool = [item for side in ("train", "val") for item in layout.list_items(dataset_dir, side, **options)]
            counts = Counter(str(item["id"]) for item in pool)
            repeated = sorted(i for i, n in counts.items() if n > 1)
            if repeated:
                raise DataError(
                    dataset_dir,
                    f"has cases of one name in its split folders, which a split file cannot tell apart: "
                    f"{first_names(repeated)}.",
                )
        else:
            pool = unique_ids(layout.list_items(dataset_dir, "all", **options))
        sides = split_from_file(pool, split_file, layout.group_key, fold, folds)
        _record(dataset_dir, sides)
        items = sides[split]
        log_once(
            f"{dataset_dir}: the split of {split_file}: {len(sides['train'])} train, {len(sides['val'])} val",
            logging.INFO,
        )
    elif folds and layout.own_splits and split != "test":
        raise NoUsableDataError(
            dataset_dir.resolve(),
            f"has train and validation folders of its own ({layout.name} layout): cross-validation deals one pool "
            "of cases to the folds.",
            "Put the cases in one folder of a layout without splits, or train with --folds 0.",
        )
    elif layout.own_splits or split == "test":  # a test split is always a folder of its own, used whole
        items = layout.list_items(dataset_dir, split, **options)
        if not items and split == "test":
            raise NoUsableDataError(dataset_dir.resolve(), "has no test split (a test folder).", accepted_layouts(task))
        if split in ("train", "val"):
            _record(dataset_dir, {split: items})
    else:
        # unique ids first: results and metric rows are named by id, and the split keeps groups by it
        items = unique_ids(layout.list_items(dataset_dir, "all", **options))
        if split != "all":
            key = layout.group_key  # (named so in split_by_group's messages)
            groups = [{key: group, "index": index} for index, group in enumerate(split_together(items, key))]
            val = {entry["index"] for entry in split_by_group(groups, "val", val_fraction, key, folds, fold)}
            sides = {
                side: [it for i, it in enumerate(items) if (i in val) == (side == "val")] for side in ("train", "val")
            }
            _record(dataset_dir, sides)
            items = sides[split]
    if not items:
        raise NoUsableDataError(
            dataset_dir.resolve(),
            f"the '{split}' split of this {layout.name} dataset is empty (no annotated images).",
            accepted_layouts(task),
        )
    check_headers(items, min_shape, max_pixels)
    logger.info(f"{dataset_dir}: {layout.name} layout, {len(items)} images in the '{split}' split")
    return items
