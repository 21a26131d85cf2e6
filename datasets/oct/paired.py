"""Paired image / label-image folders (e.g. the NR206 release: ``train/`` + ``train_labels/``)."""

from __future__ import annotations

import os
from pathlib import Path

from clinseg.datasets.errors import DataError
from clinseg.datasets.oct.images import IMAGE_SUFFIXES, read_grayscale, read_label

LABEL_SUFFIXES = ("", "_label", "_labels", "_mask", "_seg", "_gt")


def image_files(folder: str | os.PathLike) -> list[Path]:
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def find_label_file(image_path: Path, label_dir: Path) -> Path | None:
    """The label of ``image_path`` in ``label_dir``: same stem, optionally with a ``_label``/``_mask``... suffix."""
    candidates = {p.stem.lower(): p for p in image_files(label_dir)}
    for suffix in LABEL_SUFFIXES:
        match = candidates.get(f"{image_path.stem}{suffix}".lower())
        if match is not None:
            return match
    return None


def read_paired_folder(
    image_dir: str | os.PathLike, label_dir: str | os.PathLike, label_colors: list | None = None
) -> list[dict]:
    """Read every image of ``image_dir`` with its label from ``label_dir``.

    Raises:
        DataError: an image without label, a label of another size than its image, an unknown label colour.
    """
    image_dir, label_dir = Path(image_dir), Path(label_dir)
    items = []
    for image_path in image_files(image_dir):
        label_path = find_label_file(image_path, label_dir)
        if label_path is None:
            raise DataError(
                image_path,
                f"has no label in {label_dir} (looked for {image_path.stem}{{{','.join(LABEL_SUFFIXES)}}}"
                f" with suffix {'/'.join(IMAGE_SUFFIXES)}).",
            )
        image = read_grayscale(image_path)
        label = read_label(label_path, label_colors)
        if image.shape != label.shape:
            raise DataError(
                label_path,
                f"image/label shape mismatch: label is {label.shape[1:]} but image {image_path.name} "
                f"is {image.shape[1:]} (rows, cols).",
            )
        items.append(
            {
                "image": image,
                "label": label,
                "id": image_path.stem,
                "source": str(image_path),
                "label_source": str(label_path),
            }
        )
    return items
