"""Reader of the Duke DME OCT release (Chiu et al., Biomed. Opt. Express 6(4), 2015).

Each ``Subject_NN.mat`` (MATLAB v5) holds ``images`` (rows x cols x n_bscans, uint8) and the manual boundaries of
two graders, ``manualLayers1``/``manualLayers2`` (8 x cols x n_bscans, 1-based row positions, NaN where a column
or a whole B-scan is not annotated). Only annotated B-scans are returned; columns with a missing boundary are
marked with the ignore value in the label map, so they drop out of the loss and the metrics instead of being
filled in.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import scipy.io

from clinseg.datasets.errors import DataError
from clinseg.transforms.oct import IGNORE_INDEX, boundaries_to_label_map

DUKE_CLASS_NAMES = ("background", "NFL", "GCL-IPL", "INL", "OPL", "ONL-ISM", "ISE", "OS-RPE")
"""Background plus the 7 layers between the 8 manual boundaries of the Duke DME release."""


def load_mat(path: str | os.PathLike) -> dict:
    """Load a MATLAB v5 file, turning every read failure into a :class:`DataError` that names the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(128)
    except FileNotFoundError as e:
        raise DataError(path, "does not exist.") from e
    except OSError as e:
        raise DataError(path, f"cannot be opened ({e.strerror}).") from e
    if head.startswith(b"\x89HDF"):
        raise DataError(path, "is a MATLAB v7.3 (HDF5) file; save it with `save(..., '-v7')` to read it here.")
    try:
        return scipy.io.loadmat(path)
    except Exception as e:  # scipy raises ValueError, TypeError, OSError... for damaged files
        raise DataError(path, f"cannot be read as a MATLAB .mat file (truncated or not a .mat file): {e}") from e


def read_duke_mat(path: str | os.PathLike, grader: int = 1, ignore_index: int = IGNORE_INDEX) -> list[dict]:
    """Read the annotated B-scans of one Duke ``.mat`` file.

    Returns:
        One item per annotated B-scan: ``image`` (1, rows, cols) float32, ``label`` (1, rows, cols) uint8 with
        ``ignore_index`` in unannotated columns, ``boundaries`` (n_boundaries, cols) 0-based rows, ``id``,
        ``subject``, ``bscan`` and ``source``.
    """
    path = Path(path)
    content = load_mat(path)
    layers_key = f"manualLayers{grader}"
    missing = [k for k in ("images", layers_key) if k not in content]
    if missing:
        present = sorted(k for k in content if not k.startswith("__"))
        raise DataError(path, f"missing key(s) {missing}; keys present: {present}.")
    images = np.asarray(content["images"])
    layers = np.asarray(content[layers_key], dtype=np.float64)
    if images.ndim == 2:
        images = images[..., None]
    if layers.ndim == 2:
        layers = layers[..., None]
    if images.ndim != 3 or layers.ndim != 3:
        raise DataError(
            path,
            f"'images' {images.shape} and '{layers_key}' {layers.shape} must be (rows, cols, n_bscans) and "
            "(n_boundaries, cols, n_bscans).",
        )
    rows, cols, n_bscans = images.shape
    if layers.shape[1:] != (cols, n_bscans):
        raise DataError(
            path,
            f"image/label shape mismatch: 'images' is {images.shape} (rows, cols, n_bscans) but "
            f"'{layers_key}' is {layers.shape} (boundaries, cols, n_bscans).",
        )
    if not np.isfinite(images).all():
        raise DataError(path, "'images' contains NaN or infinite values.")
    items = []
    for index in range(n_bscans):
        boundaries = layers[:, :, index] - 1.0  # MATLAB rows are 1-based
        if np.isnan(boundaries).all():
            continue  # this B-scan was not annotated
        finite = boundaries[np.isfinite(boundaries)]
        if finite.size and (finite.min() < -1 or finite.max() > rows + 1):
            raise DataError(path, f"B-scan {index}: boundary rows outside the image's {rows} rows.")
        label = boundaries_to_label_map(boundaries, rows, ignore_index)
        items.append(
            {
                "image": images[:, :, index].astype(np.float32)[None],
                "label": label[None],
                "boundaries": boundaries.astype(np.float32),
                "id": f"{path.stem}_bscan{index:02d}",
                "subject": path.stem,
                "bscan": index,
                "source": str(path),
            }
        )
    return items


def read_mat_bscans(path: str | os.PathLike) -> list[dict]:
    """All B-scans of a Duke-layout ``.mat`` file as images to segment (annotated or not), for inference."""
    path = Path(path)
    content = load_mat(path)
    if "images" not in content:
        raise DataError(
            path, f"missing key 'images'; keys present: {sorted(k for k in content if not k.startswith('__'))}."
        )
    images = np.asarray(content["images"])
    if images.ndim == 2:
        images = images[..., None]
    if images.ndim != 3:
        raise DataError(path, f"'images' has shape {images.shape}; expected rows x cols x n_bscans.")
    return [
        {"image": images[:, :, i].astype(np.float32)[None], "id": f"{path.stem}_bscan{i:02d}", "source": str(path)}
        for i in range(images.shape[2])
    ]
