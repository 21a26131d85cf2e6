"""A short, stable fingerprint of the files a data list was read from."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping


def _sources(items: Iterable[Mapping | str]) -> list[str]:
    paths = set()
    for item in items:
        if isinstance(item, Mapping):
            for key in ("source", "label_source"):
                if isinstance(item.get(key), str):
                    paths.add(os.path.abspath(item[key]))
        else:
            paths.add(os.path.abspath(os.fspath(item)))
    return sorted(paths)


def dataset_fingerprint(items: Iterable[Mapping | str], length: int = 16) -> str:
    """Hash the names, sizes and contents of the source files behind ``items``.

    ``items`` is a data list (the ``source``/``label_source`` paths of each item are used) or a list of paths.
    Two runs on the same files get the same fingerprint, wherever the folder lives; a changed, added or removed
    file changes it.
    """
    paths = _sources(items)
    digest = hashlib.sha256()
    root = os.path.commonpath(paths) if paths else ""
    for path in paths:
        digest.update(os.path.relpath(path, root if os.path.isdir(root) else os.path.dirname(root)).encode())
        digest.update(str(os.path.getsize(path)).encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:length]
