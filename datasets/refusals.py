"""Inputs an inference refuses and goes on without.

An inference over a folder segments every input it can: an input that cannot be used (a damaged file, an image of
another modality, a prediction out of anatomical order) is named in one log line, listed under ``refused`` in the
run's summary, and the run goes on with the next one; it ends with exit status 1 once the others are written
(:meth:`clinseg.pipelines.engine.writers.ResultLedger.raise_if_refused`). Only an error naming one of the input's own
files counts as its refusal: anything else (the output folder, the model, the config, the disk) ends the run at once.

A data list keeps a refused input as an item carrying its reason (:func:`mark_refused`), so that the refusal reaches
the run's summary in the input's place; :class:`clinseg.pipelines.engine.refusals.RefusingDataset` passes such an
item on without reading it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from clinseg.datasets.errors import DataError, find_input_error
from clinseg.datasets.readers import split_member

logger = logging.getLogger(__name__)

REFUSED_KEY = "refused"  # an item's one-line reason for its refusal: "<file>: <problem>"
REFUSED_FILE_KEY = "refused_file"  # the file the reason names
REFUSED_HINT_KEY = "refused_hint"  # what to do about it ("" when the error gives no hint)
INPUT_KEYS = ("image", "label", "fov", "source")  # an item's keys that name the files it is read from


def mark_refused(item: Mapping, error: DataError) -> dict:
    """``item`` as a refused input: its names (``id``, ``source``, and the paths it was to be read from) and the
    reason, logged once here."""
    marked = {key: value for key, value in item.items() if isinstance(value, str)}
    marked[REFUSED_KEY] = f"{error.path}: {error.problem}"
    marked[REFUSED_FILE_KEY] = error.path
    marked[REFUSED_HINT_KEY] = error.hint or ""
    logger.warning(f"refused {marked[REFUSED_KEY]} (the other inputs go on)")
    return marked


def is_refused(item: Mapping) -> bool:
    return bool(item.get(REFUSED_KEY))


def refusal_error(item: Mapping) -> DataError:
    """A refused item's reason as the error it was (its file, problem and hint)."""
    path = str(item[REFUSED_FILE_KEY])
    return DataError(path, str(item[REFUSED_KEY])[len(path) + 2 :], item.get(REFUSED_HINT_KEY) or None)


def refusal(error: BaseException, item: Mapping) -> DataError | None:
    """The :class:`DataError` in ``error``'s cause chain when it names one of ``item``'s input files (the file
    itself, a frame of it, or a file inside an input folder such as a DICOM series), else None."""
    found = find_input_error(error, (DataError,))
    if found is None or not any(_names(found.path, path) for path in input_paths(item)):
        return None
    return found


def input_paths(item: Mapping) -> list[str]:
    """The paths ``item`` is read from."""
    return [os.fspath(item[key]) for key in INPUT_KEYS if isinstance(item.get(key), (str, os.PathLike))]


def _names(error_path: str, input_path: str) -> bool:
    error_file, error_member = split_member(error_path)
    input_file, input_member = split_member(input_path)
    if error_member is not None and input_member is not None and error_member != input_member:
        return False  # another frame of the same volume
    error_file, input_file = Path(error_file).absolute(), Path(input_file).absolute()
    return error_file == input_file or input_file in error_file.parents


def gather_items(
    paths: Iterable[str | os.PathLike], items_of: Callable[[Path], list[dict]], keep_refused: bool = False
) -> list[dict]:
    """The items of each path (``items_of(path)``); with ``keep_refused``, a path whose items cannot be listed
    (a ``DataError`` naming it) is kept as one refused item (``id``: its stem) instead of ending the listing."""
    items = []
    for path in map(Path, paths):
        try:
            items.extend(items_of(path))
        except DataError as error:
            item = {"image": str(path), "id": path.stem, "source": str(path)}
            if not keep_refused or refusal(error, item) is None:
                raise
            items.append(mark_refused(item, error))
    return items


def check_each(items: list[dict], check: Callable[[dict], object], keep_refused: bool = False) -> list[dict]:
    """Run ``check(item)`` on each item not already refused; with ``keep_refused``, an item it refuses (a
    ``DataError`` naming one of its files) is marked refused in place instead of ending the listing."""
    for index, item in enumerate(items):
        if is_refused(item):
            continue
        try:
            check(item)
        except DataError as error:
            if not keep_refused or refusal(error, item) is None:
                raise
            items[index] = mark_refused(item, error)
    return items
