"""File-level helpers shared by the readers: every failure becomes a :class:`DataError` naming the file."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from clinseg.datasets.errors import DataError

logger = logging.getLogger(__name__)

# names the results writers (clinseg.pipelines.engine.writers) keep for run-level files beside the per-case ones
RESERVED_RESULT_NAMES = ("inference_summary",)


def split_by_group(
    items: list[dict], split: str, val_fraction: float, group_key: str = "id", folds: int = 0, fold: int = 0
) -> list[dict]:
    """The fixed, written-down split of a layout without explicit splits: the last ``ceil(val_fraction * n)`` of
    the sorted groups (subjects, image ids) are validation, at least one and never all. With ``folds`` (2 or more)
    the split of cross-validation fold ``fold`` instead: the sorted groups are dealt to the folds in turn (group
    ``i`` to fold ``i % folds``), and fold ``fold``'s groups are validation, so every group is validated exactly
    once over the folds and one subject's images stay together. ``"all"`` returns every item; ``"test"`` none (a
    test split is a folder of its own, read as such by the caller).

    Raises:
        InputError: ``folds`` of 1, a ``fold`` outside ``0..folds-1``, or fewer groups than folds.
    """
    if split == "all":
        return items
    groups = sorted({item[group_key] for item in items})
    if fold and not folds:
        from clinseg.datasets.errors import InputError

        raise InputError("fold", f"{fold} without --folds: the fixed split has no folds.", "Pass --folds K too.")
    if folds:
        from clinseg.datasets.errors import InputError

        if folds < 2 or not 0 <= fold < folds:
            raise InputError(
                "fold" if folds >= 2 else "folds",
                f"fold {fold} of {folds} folds: cross-validation needs 2 folds or more and a fold from 0 to folds - 1.",
                "--folds 0 keeps the fixed split by val_fraction.",
            )
        if len(groups) < folds:
            raise InputError("folds", f"{folds} folds need at least {folds} {group_key}s; the data has {len(groups)}.")
        val_groups = set(groups[fold::folds])
    else:
        n_val = min(len(groups) - 1, max(1, math.ceil(val_fraction * len(groups)))) if len(groups) > 1 else 0
        val_groups = set(groups[len(groups) - n_val :])
    if split not in ("train", "val"):
        return []
    return [item for item in items if (item[group_key] in val_groups) == (split == "val")]


# operating-system failures of a write that are the environment's (a full disk, a quota, no permission, a read-only
# mount, a file where a folder is expected): reported as a DataError naming the file that could not be written
WRITE_ERRNOS = {
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR,
    errno.ENOENT, errno.EEXIST, errno.ENAMETOOLONG, errno.EMFILE, errno.ENFILE, errno.EIO,
}  # fmt: skip
# a file system with less free than this (to an unprivileged user) is full: a write that runs out of space fills it
# to its last block before it fails
FULL_BELOW_BYTES = 2**20
# appended to the temporary file of a write that failed without saying why (torch.save), to ask the file system
PROBE_BYTES = 64 * 2**10


NAME_MAX_BYTES = 255
"""The longest file name the common file systems accept (ext4, XFS, btrfs, APFS, NTFS), in bytes."""


def hidden_sibling(path: Path, kind: str, keep_suffixes: bool = True) -> Path:
    """A fresh hidden name beside ``path`` for a temporary file or folder: a short prefix (``.<kind><pid>-`` and 8
    random hex digits), then ``path``'s last two suffixes (``.nii.gz``) where they fit, so writers that choose the
    format from the suffix (nibabel) still do. ``path``'s whole name is not repeated: beside a prefix, a name near the
    file system's limit would no longer fit, and a result the file system accepts could not be written."""
    name = f".{kind}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    suffixes = ("".join(path.suffixes[-2:]), path.suffix) if keep_suffixes else ()
    suffix = next((s for s in suffixes if len(os.fsencode(name + s)) <= NAME_MAX_BYTES), "")
    return path.with_name(name + suffix)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write(tmp)`` on a hidden temporary file beside ``path``, then rename it onto ``path``: a reader never
    sees a half-written file under the final name, and a failed write leaves the previous file intact. The temporary
    name is short and ends with ``path``'s suffixes (:func:`hidden_sibling`), so writers that choose the format from
    the suffix (nibabel) still do, and any name the file system accepts can be written.

    Raises:
        DataError: naming ``path`` (never the temporary file) and the cause, when the environment refuses the write:
            no space left, a quota, no permission, a read-only file system, a file where a folder is expected, a
            folder under the file's name. A writer that loses the reason (``torch.save`` raises a ``RuntimeError``
            without an errno) is asked after: the free space on the file system right after the failure, then a
            small write to the temporary file. Any other failure is re-raised as it is. The temporary file is
            removed in every case.
    """
    return atomic_write_all([(path, write)])[0]


def atomic_write_all(writes: Sequence[tuple[str | os.PathLike, Callable[[Path], object]]]) -> list[Path]:
    """:func:`atomic_write` for files that belong together (the results of one case): every ``write(tmp)`` is done on
    its own temporary file first, and the files are renamed into place only once all are written, so a failure leaves
    none of them and every earlier file under their names intact (one already renamed when a later rename fails gets
    its earlier version back). Returns the final paths.

    Raises:
        DataError: as :func:`atomic_write`, naming the file whose write failed.
    """
    targets = [Path(path) for path, _ in writes]
    for path in targets:
        if path.is_dir():  # the rename would refuse it, but only after every file is written
            raise DataError(path, "cannot be written: a folder of that name is in the way.")
    staged: list[tuple[Path, Path]] = []
    try:
        for path, (_, write) in zip(targets, writes, strict=True):
            staged.append((_stage(path, write), path))
        _commit(staged)
    finally:
        for tmp, _ in staged:
            _remove(tmp)
    return targets


def journaled_write_all(
    writes: Sequence[tuple[str | os.PathLike, Callable[[Path], object]]], journal: str | os.PathLike
) -> list[Path]:
    """:func:`atomic_write_all` that a process dying between its renames cannot leave half-done: each file is staged
    whole beside its target, then ``journal`` lists the renames (written atomically), then they are done and the
    journal removed. A journal left behind is completed by :func:`finish_journal` (the caller's next reader or
    writer, under the caller's lock). Returns the final paths.

    Raises:
        DataError: as :func:`atomic_write`, before anything under a final name has changed.
    """
    targets = [Path(path) for path, _ in writes]
    staged = [
        atomic_write(t.with_name(f".{t.name}.staged"), write) for t, (_, write) in zip(targets, writes, strict=True)
    ]
    text = json.dumps({"moves": [[str(s), str(t)] for s, t in zip(staged, targets, strict=True)]})
    atomic_write(journal, lambda tmp: Path(tmp).write_text(text))
    finish_journal(journal)
    return targets


def finish_journal(journal: str | os.PathLike) -> bool:
    """Do the renames ``journal`` lists that are not done yet (a staged file still there), then remove it. Returns
    whether there was one. The caller holds the lock that serialises its writers."""
    journal = Path(journal)
    try:
        moves = json.loads(journal.read_text())["moves"]
    except FileNotFoundError:
        return False
    for staged, target in moves:
        if os.path.exists(staged):  # a rename already done has left nothing under the staged name
            os.replace(staged, target)
    journal.unlink()
    return True


@contextmanager
def staged_folder(target: str | os.PathLike) -> Iterator[Path]:
    """A fresh hidden folder beside ``target`` to build a whole folder in (a dataset, a bundle, an application); when
    the block succeeds it is renamed onto ``target`` in one step, so nobody ever sees a half-built folder under the
    final name. An empty ``target`` is replaced. The staging folder is gone afterwards in every case, and a block that
    fails leaves ``target`` as it was.

    Raises:
        FileExistsError: ``target`` holds something by the time the block ends (another process built it meanwhile):
            the caller decides whether that copy will do.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = hidden_sibling(target, "stage", keep_suffixes=False)
    staging.mkdir()
    try:
        yield staging
        if target.is_dir() and not any(target.iterdir()):
            target.rmdir()  # an empty folder is no result: the built one takes its place
        try:
            os.rename(staging, target)
        except OSError as error:
            if target.exists():
                raise FileExistsError(errno.EEXIST, "was built meanwhile by another process", str(target)) from error
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _stage(path: Path, write: Callable[[Path], object]) -> Path:
    """``write`` done on a new temporary file beside ``path``; returns its name. Removed when the write fails."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        error = write_error(path, e)
        if error is None:
            raise
        raise error from e
    tmp = hidden_sibling(path, "tmp")
    try:
        try:
            with open(tmp, "xb"):  # made here, so that a refused creation keeps its reason (writers may lose it)
                pass
            write(tmp)
        except Exception as e:
            error = write_error(path, e, tmp)  # asked before the temporary file, which holds the space, is removed
            if error is None:
                raise
            raise error from e
    except BaseException:
        _remove(tmp)
        raise
    return tmp


def _commit(staged: list[tuple[Path, Path]]) -> None:
    """Rename each temporary file onto its final name. When a rename fails, the files renamed before it get their
    earlier versions back (kept meanwhile as hard links, for a set of several files) or, if they had none, are
    removed."""
    renamed: list[tuple[Path, Path | None]] = []
    try:
        for tmp, path in staged:
            earlier = _link_earlier(path) if len(staged) > 1 else None
            try:
                os.replace(tmp, path)
            except OSError as e:
                if earlier is not None:
                    _remove(earlier)
                for done, kept in reversed(renamed):
                    try:
                        os.replace(kept, done) if kept is not None else done.unlink()
                    except OSError as undo:
                        logger.warning(f"{done} could not be put back after a failed write ({undo.strerror or undo})")
                renamed = []
                error = write_error(path, e)
                if error is None:
                    raise
                raise error from e
            renamed.append((path, earlier))
    finally:
        for _, kept in renamed:
            if kept is not None:
                _remove(kept)


def _link_earlier(path: Path) -> Path | None:
    """A hard link to the file now under ``path``, if there is one and the file system makes links; else None."""
    if not path.is_file():
        return None
    link = hidden_sibling(path, "prev")
    try:
        os.link(path, link)
    except OSError:
        return None
    return link


def _remove(path: Path) -> None:
    if not os.path.lexists(path):  # never made (a read-only folder answers an unlink with EROFS, not ENOENT)
        return
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as e:
        logger.warning(f"the temporary file {path} could not be removed ({e.strerror or e})")


def write_error(path: str | os.PathLike, error: BaseException, tmp: Path | None = None) -> DataError | None:
    """The :class:`DataError` for a failed write of ``path``, if the environment refused it, else None.

    The reason is an ``OSError`` with one of :data:`WRITE_ERRNOS` in ``error``'s cause chain. A ``RuntimeError``
    or an ``OSError`` without an errno (``torch.save`` on a full disk) is looked into when the temporary file
    ``tmp`` is given, before it is removed: a file system with less than :data:`FULL_BELOW_BYTES` free is full;
    otherwise :data:`PROBE_BYTES` appended to ``tmp`` (and synced) say whether the file system refuses writes and
    why (a quota, a read-only remount). No reason found: None, and the caller re-raises ``error``.
    """
    path = Path(path)
    found = _os_error_in_chain(error)
    if found is None and tmp is not None and isinstance(error, (RuntimeError, OSError)):
        free = free_bytes(tmp.parent)
        if free is not None and free < FULL_BELOW_BYTES:
            found = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        else:
            found = _probe(tmp)
    if found is None:
        return None
    return DataError(path, f"cannot be written: {_cause(path, found)}.")


def _os_error_in_chain(error: BaseException | None) -> OSError | None:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _probe(tmp: Path) -> OSError | None:
    try:
        with open(tmp, "ab") as file:
            file.write(bytes(PROBE_BYTES))
            file.flush()
            os.fsync(file.fileno())
    except OSError as e:
        return e if e.errno in WRITE_ERRNOS else None
    return None


def free_bytes(folder: str | os.PathLike) -> int | None:
    """The space an unprivileged user may still write on ``folder``'s file system; None if it cannot be read."""
    try:
        stat = os.statvfs(folder)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the file system holding ``path`` (of its nearest existing folder), bind mounts included."""
    path = Path(os.path.realpath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        mounts = [
            Path(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), line.split()[4]))
            for line in Path("/proc/self/mountinfo").read_text().splitlines()
        ]
        return max((m for m in mounts if m == path or m in path.parents), key=lambda m: len(m.parts))
    except (OSError, IndexError, ValueError):
        while not os.path.ismount(path) and path != path.parent:
            path = path.parent
        return path


def _cause(path: Path, error: OSError) -> str:
    """``error``, the reason ``path`` could not be written, in words."""
    code = error.errno
    if code == errno.ENOSPC:
        free = free_bytes(_existing_folder(path))
        free = f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"
        return f"no space left on device ({free} on {mount_point(path)})"
    if code == errno.EDQUOT:
        return f"disk quota exceeded (on {mount_point(path)})"
    if code == errno.EFBIG:
        return f"file too large for the file system on {mount_point(path)}"
    if code == errno.EROFS:
        return f"read-only file system ({mount_point(path)} is mounted read-only)"
    if code in (errno.EACCES, errno.EPERM):
        return f"permission denied (writing in {_existing_folder(path)})"
    if code == errno.EISDIR:
        return "a folder of that name is in the way"
    if code in (errno.ENOTDIR, errno.EEXIST):
        blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
        if blocker is not None:
            return f"{blocker} is a file, not a folder"
    return (error.strerror or str(error)).lower()


def _existing_folder(path: Path) -> Path:
    return next((p for p in path.parents if p.is_dir()), Path("/"))


# how far (in voxels) the qform of a written volume may place a voxel from where its sform (the affine) does
QFORM_TOLERANCE_VOXELS = 0.01


def nifti_writer(array, affine) -> Callable[[Path], object]:
    """What writes ``array`` as a NIfTI volume to the file it is given (format from its suffix), with ``affine`` (in
    millimetres) as its sform and, where the qform can hold it, as its qform too (both scanner space).

    A qform is a rotation, voxel sizes and a shift: it cannot hold the shear of a grid whose slices were stacked
    along a tilted gantry. nibabel would write the nearest rotation instead, and the tools that read the qform
    (ITK-based viewers: 3D Slicer, ITK-SNAP) would place the volume tens of millimetres from the input's voxels.
    Such a volume has only its sform (qform_code 0), which those tools refuse as they refuse the input itself."""
    import nibabel as nib

    affine = np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_sform(affine, code=1)
    image.set_qform(affine, code=1)  # nibabel keeps the nearest rotation of a sheared affine
    corners = np.array(np.meshgrid(*[[0, max(n - 1, 0)] for n in array.shape[:3]], indexing="ij")).reshape(3, -1)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    drift = np.linalg.norm((image.get_qform() - affine)[:3] @ corners, axis=0).max()
    if drift > QFORM_TOLERANCE_VOXELS * float(np.linalg.norm(affine[:3, :3], axis=0).min()):
        image.set_qform(None, code=0)
    return lambda tmp: nib.save(image, tmp)


def save_nifti(path: str | os.PathLike, array, affine) -> Path:
    """Write a NIfTI volume atomically (temporary file renamed into place), with ``affine`` as its sform and qform
    (scanner space; :func:`nifti_writer`)."""
    return atomic_write(path, nifti_writer(array, affine))


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
