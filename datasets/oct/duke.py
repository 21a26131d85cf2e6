"""Reader of the Duke DME OCT release (Chiu et al., Biomed. Opt. Express 6(4), 2015).

Each ``Subject_NN.mat`` (MATLAB v5) holds ``images`` (rows x cols x n_bscans, uint8) and the manual boundaries of
two graders, ``manualLayers1``/``manualLayers2`` (8 x cols x n_bscans, 1-based row positions, NaN where a column
or a whole B-scan is not annotated). A data list names one B-scan as ``Subject_NN.mat::index``; the
:class:`DukeMatReader` gives its image or its boundaries, and the bundle's ``BoundariesToLabelMapd`` builds the
label map, in which columns with a missing boundary get the ignore value (they drop out of the loss and the metrics
instead of being filled in).
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import scipy.io
from monai.data import ImageReader
from monai.utils import MetaKeys, ensure_tuple

from clinseg.datasets.errors import DataError
from clinseg.datasets.readers import member_path, split_member

DUKE_CLASS_NAMES = ("background", "NFL", "GCL-IPL", "INL", "OPL", "ONL-ISM", "ISE", "OS-RPE")
"""Background plus the 7 layers between the 8 manual boundaries of the Duke DME release."""


def load_mat(path: str | os.PathLike) -> dict:
    """Load a MATLAB v5 file, turning every read failure into a :class:`DataError` that names the file."""
    path = Path(path)
    try:
        stat = path.stat()
    except FileNotFoundError as e:
        raise DataError(path, "does not exist.") from e
    if path.is_dir():
        raise DataError(path, "is a folder; expected a MATLAB .mat file.")
    return _load_mat(path, stat.st_mtime_ns, stat.st_size, stat.st_ino)


@functools.lru_cache(maxsize=2)  # the B-scans of one subject are read one after another: decode its file once
def _load_mat(path: Path, mtime_ns: int, size: int, inode: int) -> dict:
    try:
        with open(path, "rb") as f:
            head = f.read(128)
    except OSError as e:
        raise DataError(path, f"cannot be opened ({e.strerror}).") from e
    # MATLAB 7.3 writes HDF5 behind a 512-byte user block that starts with its text header
    if head.startswith((b"\x89HDF", b"MATLAB 7.3 MAT-file")):
        raise DataError(
            path,
            "is a MATLAB v7.3 file (HDF5 inside), a version this bundle does not read.",
            "Save it again with save(..., '-v7') in MATLAB, or export its B-scans as PNG or TIFF.",
        )
    try:
        return scipy.io.loadmat(path)
    except Exception as e:  # scipy raises ValueError, TypeError, OSError... for damaged files
        raise DataError(path, f"cannot be read as a MATLAB .mat file (truncated or not a .mat file): {e}") from e


def _bscan_stack(path: Path, content: dict) -> np.ndarray:
    if "images" not in content:
        present = sorted(k for k in content if not k.startswith("__"))
        raise DataError(path, f"missing key 'images'; keys present: {present}.")
    images = np.asarray(content["images"])
    images = images[..., None] if images.ndim == 2 else images
    if images.ndim != 3:
        raise DataError(path, f"'images' has shape {images.shape}; it must be (rows, cols, n_bscans).")
    if not np.issubdtype(images.dtype, np.number):
        raise DataError(path, f"'images' holds {images.dtype} values; expected numbers.")
    if np.issubdtype(images.dtype, np.floating) and not np.isfinite(images).all():
        raise DataError(path, "'images' contains NaN or infinite values.")
    return images


def _boundary_stack(path: Path, content: dict, grader: int, images: np.ndarray) -> np.ndarray:
    key = f"manualLayers{grader}"
    if key not in content:
        present = sorted(k for k in content if not k.startswith("__"))
        raise DataError(path, f"missing key(s) ['{key}']; keys present: {present}.")
    layers = np.asarray(content[key], dtype=np.float64)
    layers = layers[..., None] if layers.ndim == 2 else layers
    if layers.ndim != 3:
        raise DataError(path, f"'{key}' {layers.shape} must be (n_boundaries, cols, n_bscans).")
    if layers.shape[1:] != images.shape[1:]:
        transposed = layers.shape[1:] == (images.shape[2], images.shape[0])
        raise DataError(
            path,
            f"image/label shape mismatch: 'images' is {images.shape} (rows, cols, n_bscans) but "
            f"'{key}' is {layers.shape} (boundaries, cols, n_bscans)"
            + (": 'images' looks saved as (n_bscans, rows, cols)." if transposed else "."),
            "Save 'images' as (rows, cols, n_bscans), as the Duke release stores it (MATLAB: permute(images, [2 3 1]))."
            if transposed
            else None,
        )
    return layers - 1.0  # MATLAB rows are 1-based


CROSSING_TOLERANCE = 1.0
"""How far (rows) a boundary may lie above the one before it and still count as touching it (a layer thinned to
nothing, drawn with a grader's sub-pixel slip); further above, the two cross and the column's layers are unknown."""


def crossing_columns(boundaries: np.ndarray, tolerance: float = CROSSING_TOLERANCE) -> np.ndarray:
    """The columns of ``(n_boundaries, cols)`` boundary rows (top first) in which a boundary lies more than
    ``tolerance`` rows above the one before it; unannotated (NaN) boundaries are skipped."""
    boundaries = np.asarray(boundaries, dtype=np.float64)
    above = np.fmax.accumulate(boundaries, axis=0)  # the lowest boundary so far, NaN skipped
    with np.errstate(invalid="ignore"):
        return (boundaries[1:] < above[:-1] - tolerance).any(axis=0)


def annotated_bscans(path: str | os.PathLike, grader: int = 1, class_names: Sequence[str] | None = None) -> list[int]:
    """The indices of the B-scans of a Duke file that ``grader`` annotated, checking the file's structure: boundaries
    inside the image, in top-to-bottom order in every column, and (with ``class_names``) as many as the classes
    need (``n`` boundaries bound ``n - 1`` layers; with background, ``n`` classes).

    Raises:
        DataError: naming the file (and the B-scan) and the problem.
    """
    path = Path(path)
    content = load_mat(path)
    images = _bscan_stack(path, content)
    layers = _boundary_stack(path, content, grader, images)
    if class_names is not None and layers.shape[0] != len(class_names):
        # the label map's values would be other layers than the classes name, or some classes never drawn
        raise DataError(
            path,
            f"'manualLayers{grader}' holds {layers.shape[0]} boundaries per B-scan, which bound "
            f"{layers.shape[0] - 1} layers, but the bundle has {len(class_names) - 1} layer classes ({class_names}); "
            f"set 'class_names' to background plus the {layers.shape[0] - 1} layers of this file.",
        )
    rows = images.shape[0]
    indices = []
    for index in range(images.shape[2]):
        boundaries = layers[:, :, index]
        if np.isnan(boundaries).all():
            continue
        finite = boundaries[np.isfinite(boundaries)]
        if finite.size and (finite.min() < -1 or finite.max() > rows + 1):
            raise DataError(path, f"B-scan {index}: boundary rows outside the image's {rows} rows.")
        crossed, annotated = crossing_columns(boundaries), ~np.isnan(boundaries).any(axis=0)
        if crossed.sum() > annotated.sum() / 2:
            raise DataError(
                path,
                f"B-scan {index}: boundaries out of top-to-bottom order in {int(crossed.sum())} of "
                f"{int(annotated.sum())} annotated columns (first at column {int(np.argmax(crossed))}): the layers "
                "between them cannot be told; boundaries must be stored top (ILM) first.",
            )
        indices.append(index)
    return indices


def duke_items(path: str | os.PathLike, grader: int = 1, class_names: Sequence[str] | None = None) -> list[dict]:
    """The data-list items (paths) of the annotated B-scans of one Duke file (checked by :func:`annotated_bscans`)."""
    path = Path(path)
    return [
        {
            "image": member_path(path, index),
            "label": member_path(path, index),
            "id": f"{path.stem}_bscan{index:02d}",
            "subject": path.stem,
            "bscan": index,
            "source": str(path),
        }
        for index in annotated_bscans(path, grader, class_names)
    ]


def bscan_items(path: str | os.PathLike) -> list[dict]:
    """Every B-scan of a Duke-layout ``.mat`` file (annotated or not), as images to segment. Boundaries in the file
    (``manualLayers1``/``2``, not needed here) must still fit its images: a file whose ``images`` were saved in
    another axis order would otherwise be segmented slice by slice across its B-scans, each "B-scan" a plausible
    image of the wrong plane.

    Raises:
        DataError: naming the file and the problem.
    """
    path = Path(path)
    content = load_mat(path)
    images = _bscan_stack(path, content)
    for grader in sorted(int(m[1]) for k in content if (m := re.fullmatch(r"manualLayers(\d+)", k))):
        _boundary_stack(path, content, grader, images)
    return [
        {"image": member_path(path, i), "id": f"{path.stem}_bscan{i:02d}", "source": str(path)}
        for i in range(images.shape[2])
    ]


class DukeMatReader(ImageReader):
    """MONAI ``ImageReader`` of one B-scan of a Duke ``.mat`` file named ``Subject_NN.mat::index``.

    Args:
        content: ``"image"``: the B-scan, ``(1, rows, cols)`` float32 (8-bit scale, as released); ``"boundaries"``:
            the grader's boundaries, ``(n_boundaries, cols)`` float32 0-based rows, NaN where not annotated, with
            ``label_kind`` ``"boundaries"`` in the metadata (``BoundariesToLabelMapd`` turns them into a label map).
        grader: which grader's boundaries (1 or 2).
    """

    def __init__(self, content: str = "image", grader: int = 1):
        if content not in ("image", "boundaries"):
            raise ValueError(f"content must be 'image' or 'boundaries', got {content!r}.")
        super().__init__()
        self.content, self.grader = content, grader

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        return all(str(split_member(f)[0]).lower().endswith(".mat") for f in ensure_tuple(filename))

    def read(self, data, **kwargs):
        path, member = split_member(ensure_tuple(data)[0])
        content = load_mat(path)
        images = _bscan_stack(path, content)
        index = 0 if member is None else int(member)
        if not 0 <= index < images.shape[2]:
            raise DataError(path, f"has {images.shape[2]} B-scans; B-scan {index} does not exist.")
        if self.content == "image":
            return path, index, images[:, :, index].astype(np.float32)[None], {}
        boundaries = _boundary_stack(path, content, self.grader, images)[:, :, index].astype(np.float32)
        return path, index, boundaries, {"label_kind": "boundaries", "rows": images.shape[0]}

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        path, index, array, extra = img
        shape = array.shape[1:] if self.content == "image" else (extra["rows"], array.shape[1])
        meta = {
            MetaKeys.SPATIAL_SHAPE: np.asarray(shape),
            MetaKeys.ORIGINAL_CHANNEL_DIM: 0,
            MetaKeys.AFFINE: np.eye(3),
            MetaKeys.ORIGINAL_AFFINE: np.eye(3),
            "filename_or_obj": member_path(path, index),
            "bscan": index,
            **extra,
        }
        return array, meta
