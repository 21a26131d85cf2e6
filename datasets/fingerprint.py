"""The files a data list was read from: a manifest (names, sizes, SHA-256) and a short fingerprint of it.

Hashes are cached per file (keyed by absolute path, size and modification time) in ``data/.cache/sha256.json``,
so a large dataset is hashed once, not at every run.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from clinseg.datasets.io import atomic_write
from clinseg.datasets.locations import PROJECT_ROOT
from clinseg.datasets.readers import split_member

CACHE_FILE = PROJECT_ROOT / "data" / ".cache" / "sha256.json"


# item keys naming source files: the data list's paths (``file::member`` counts as the file) and the sources
SOURCE_KEYS = ("image", "label", "fov", "source", "annotation_source")


def _sources(items: Iterable[Mapping | str | os.PathLike]) -> list[str]:
    """The source files of the items; a folder (a DICOM series) stands for the files in it."""
    paths = set()
    for item in items:
        if isinstance(item, Mapping):
            found = [
                os.path.abspath(split_member(item[key])[0]) for key in SOURCE_KEYS if isinstance(item.get(key), str)
            ]
        else:
            found = [os.path.abspath(os.fspath(item))]
        for path in found:
            if os.path.isdir(path):
                paths.update(entry.path for entry in os.scandir(path) if entry.is_file())
            else:
                paths.add(path)
    return sorted(paths)


def image_digests(items: Iterable[Mapping], length: int = 16) -> dict[str, str]:
    """``{digest: file name}`` of the image files behind a data list (each item's ``image``; a DICOM series folder
    stands for its files, a ``file::member`` for the file), the digest a SHA-256 prefix of ``length`` hex digits:
    what a model was trained on, recorded so that an evaluation can tell the same images under any name or folder.
    Labels, masks and annotation files are left out (one VIA export holds the regions of training and other
    images alike)."""
    images = [{"image": item["image"]} for item in items if isinstance(item.get("image"), str)]
    return {digest[:length]: os.path.basename(path) for path, digest in file_digests(_sources(images)).items()}


def file_digests(paths: Iterable[str | os.PathLike]) -> dict[str, str]:
    """``{absolute path: SHA-256}`` of files, from the cache :func:`file_manifest` keeps."""
    paths = sorted({os.path.abspath(os.fspath(path)) for path in paths})
    return dict(zip(paths, (entry["sha256"] for entry in file_manifest(paths)), strict=True))  # both sorted


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_manifest(items: Iterable[Mapping | str | os.PathLike], cache_file: Path | None = CACHE_FILE) -> list[dict]:
    """``[{"path": relative path, "size": bytes, "sha256": hex}]`` of the source files behind ``items``.

    ``items`` is a data list (each item's ``source``/``label_source``) or a list of paths; paths are given relative
    to their common folder, so the manifest does not depend on where the dataset lives.
    """
    paths = _sources(items)
    cache = {}
    if cache_file is not None and cache_file.is_file():
        try:
            cache = json.loads(cache_file.read_text())
        except (OSError, json.JSONDecodeError):
            cache = {}  # a damaged cache is only a cache
    root = os.path.commonpath(paths) if paths else ""
    root = root if os.path.isdir(root) else os.path.dirname(root)
    manifest, changed = [], False
    for path in paths:
        stat = os.stat(path)
        key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
        if key not in cache:
            cache[key], changed = _sha256(path), True
        manifest.append({"path": os.path.relpath(path, root), "size": stat.st_size, "sha256": cache[key]})
    if changed and cache_file is not None:
        atomic_write(cache_file, lambda tmp: tmp.write_text(json.dumps(cache)))
    return manifest


def dataset_fingerprint(items: Iterable[Mapping | str | os.PathLike], length: int = 16) -> str:
    """A short hash of the manifest: the same files give the same fingerprint wherever the folder lives; a changed,
    added or removed file changes it."""
    is_manifest = isinstance(items, list) and items and isinstance(items[0], Mapping) and "sha256" in items[0]
    manifest = items if is_manifest else file_manifest(items)
    text = "\n".join(f"{entry['path']}\t{entry['size']}\t{entry['sha256']}" for entry in manifest)
    return hashlib.sha256(text.encode()).hexdigest()[:length]
