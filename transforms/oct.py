"""OCT-specific transforms: layer boundaries (one row position per A-scan) to a layer label map."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import MetaKeys, convert_to_numpy

IGNORE_INDEX = 255
"""Label value of pixels without annotation (masked out of the loss and the metrics)."""


def boundaries_to_label_map(boundaries: np.ndarray, height: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Fill the layers between consecutive boundaries.

    Args:
        boundaries: ``(n_boundaries, width)`` row positions (0-based, sub-pixel allowed) of each boundary in each
            column, top to bottom; NaN where the boundary is not annotated.
        height: number of rows of the B-scan.
        ignore_index: value given to every pixel of a column in which any boundary is missing. Such columns are
            not guessed: they are excluded from training and evaluation.

    Returns:
        ``(height, width)`` uint8 map: 0 above the first and below the last boundary, ``k`` between boundary
        ``k-1`` and boundary ``k`` (so ``n_boundaries - 1`` layer classes), ``ignore_index`` in unannotated columns.
    """
    boundaries = np.asarray(boundaries, dtype=np.float64)
    if boundaries.ndim != 2 or boundaries.shape[0] < 2:
        raise ValueError(f"boundaries must have shape (n_boundaries>=2, width), got {boundaries.shape}.")
    n_boundaries = boundaries.shape[0]
    if n_boundaries > ignore_index:
        raise ValueError(f"{n_boundaries} boundaries give more classes than the ignore value {ignore_index} allows.")
    rows = np.arange(height, dtype=np.float64)[:, None]
    label = np.zeros((height, boundaries.shape[1]), dtype=np.uint8)
    # a pixel whose centre lies at or below boundary k-1 and above boundary k belongs to layer k
    for k in range(1, n_boundaries):
        with np.errstate(invalid="ignore"):
            inside = (rows >= boundaries[k - 1][None]) & (rows < boundaries[k][None])
        label[inside] = k
    label[:, np.isnan(boundaries).any(axis=0)] = ignore_index
    return label


class BoundariesToLabelMap(Transform):
    """Array transform: ``(n_boundaries, width)`` boundary rows to a ``(1, height, width)`` label map."""

    def __init__(self, height: int, ignore_index: int = IGNORE_INDEX):
        self.height = height
        self.ignore_index = ignore_index

    def __call__(self, boundaries: np.ndarray) -> np.ndarray:
        return boundaries_to_label_map(boundaries, self.height, self.ignore_index)[None]


class BoundariesToLabelMapd(MapTransform):
    """Dictionary wrapper of :class:`BoundariesToLabelMap`: each key's boundaries (``label_kind`` ``"boundaries"`` in
    the metadata, as ``DukeMatReader`` gives them) become a label map with the rows of ``image_key``; labels that are
    already label maps pass unchanged, so one pipeline serves boundary and label-image layouts."""

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        ignore_index: int = IGNORE_INDEX,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.ignore_index = ignore_index

    def __call__(self, data: Mapping[Hashable, np.ndarray]) -> dict[Hashable, np.ndarray]:
        d = dict(data)
        height = np.shape(d[self.image_key])[-2]
        converter = BoundariesToLabelMap(height, self.ignore_index)
        for key in self.key_iterator(d):
            boundaries = d[key]
            meta = getattr(boundaries, "meta", None)
            if meta is not None and meta.get("label_kind") != "boundaries":
                continue
            label = converter(convert_to_numpy(boundaries))
            if meta is not None:
                meta = {**meta, "label_kind": "indices", MetaKeys.SPATIAL_SHAPE: np.asarray(label.shape[1:])}
                label = MetaTensor(torch.as_tensor(label), meta=meta)
            d[key] = label
        return d
