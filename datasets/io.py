"""File-level helpers shared by the readers: every failure becomes a :class:`DataError` naming the file."""

from __future__ import annotations

import logging
import math
import os
import re
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from clinseg.datasets.errors import DataError

logger = logging.getLogger(__name__)

# names the results writers (clinseg.pipelines.reports) keep for run-level files beside the per-case ones
RESERVED_RESULT_NAMES = ("inference_summary",)


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


def check_size_limit(
    path: str | os.PathLike,
    shape: Sequence[int],
    limit: int | None,
    unit: str = "voxels",
    parameter: str = "max_voxels",
) -> None:
    """Refuse a file whose header declares more than ``limit`` ``unit`` (None: no limit), before it is decoded: a
    decompression bomb or a damaged header must end in a message, not in an exhausted machine.

    Raises:
        DataError: naming the file, its size, the limit and the parameter that raises it.
    """
    count = math.prod(int(n) for n in shape)
    if limit is not None and count > limit:
        size = " x ".join(str(int(n)) for n in shape)
        raise DataError(
            path,
            f"is {size} = {count:,} {unit}, more than the limit of {limit:,} {unit} (read from the header, nothing "
            "was decoded).",
            f"If the file is genuine and the machine has the memory for it, raise the limit: {parameter} "
            f"(--{parameter} {count} on the command line).",
        )


def _name_token(text: str) -> str:
    """``text`` with every run of characters other than letters, digits, ``-`` and ``_`` replaced by ``_``."""
    return re.sub(r"[^0-9A-Za-z_-]+", "_", text).strip("_")


def unique_ids(
    items: Sequence[Mapping],
    id_key: str = "id",
    source_key: str = "source",
    reserved: Iterable[str] = RESERVED_RESULT_NAMES,
) -> list[dict]:
    """The items with ids that cannot collide as output names: copies of ``items``, in their order.

    Results are named from an item's id, so two inputs with the same stem (``a.nii.gz`` and ``a.nrrd``, ``b0.png``
    and ``b0.tif``) would overwrite each other's results. Ids are compared ignoring case (outputs land on
    case-insensitive file systems too). Only the colliding items are renamed, deterministically, from their file
    name (``b0.png`` -> ``b0_png``; a folder ``a`` -> ``a_folder``), with their parent folder's name before it when
    the file names are alike too (``p/c.png``, ``q/c.png`` -> ``p_c_png``, ``q_c_png``), then a counter; never onto
    an id that another item (or ``reserved``: names the writers keep for themselves) has. Every item gets
    ``original_id`` (its id before, equal to ``id`` unless renamed: the items of one batch need the same keys to be
    collated), and each collision is logged naming the files.

    Args:
        items: data list entries with ``id_key``; the input's path is ``source_key`` (else ``image``), a path or a
            list of paths (the first names it).
        reserved: ids no item may have (compared ignoring case).
    """
    items = [{**item, "original_id": str(item[id_key])} for item in items]
    groups: dict[str, list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(str(item[id_key]).casefold(), []).append(index)
    reserved = {str(name).casefold() for name in reserved}
    colliding = {key for key, members in groups.items() if len(members) > 1 or key in reserved}
    taken = {key for key in groups if key not in colliding} | reserved

    def source_of(item: Mapping) -> Path:
        source = item.get(source_key) or item.get("image") or item[id_key]
        return Path(source[0] if isinstance(source, (list, tuple)) else source)

    for key in sorted(colliding, key=lambda k: groups[k][0]):
        members = [(index, source_of(items[index])) for index in groups[key]]
        by_name = {}
        for index, source in members:
            token = _name_token(source.name)
            if token.casefold() == key:
                token = f"{items[index][id_key]}_folder" if source.is_dir() else f"{items[index][id_key]}_file"
            by_name[index] = token
        # members whose file names are alike too (one name in several folders) all take their folder's name
        counts = Counter(token.casefold() for token in by_name.values())
        renamed = []
        for index, source in members:
            token = by_name[index]
            with_folder = f"{_name_token(source.parent.name)}_{token}".strip("_")
            candidates = [token, with_folder] if counts[token.casefold()] == 1 else [with_folder]
            candidates += [f"{candidates[-1]}_{n}" for n in range(2, len(items) + len(reserved) + 3)]
            new = next(c for c in candidates if c.casefold() not in taken)
            taken.add(new.casefold())
            items[index][id_key] = new
            renamed.append(f"{source} -> {new!r}")
        shared = items[groups[key][0]]["original_id"]
        logger.warning(f"inputs sharing the result name {shared!r} are renamed: {'; '.join(renamed)}")
    return items
