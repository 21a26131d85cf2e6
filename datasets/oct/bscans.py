"""What an image must be to be segmented as an OCT B-scan: large enough to hold retinal layers, and not blank.

Inference resamples every image to the network's input size, so a 2 x 2 thumbnail or a blank (uniform) page would
come out as a plausible layer map with plausible thicknesses in its JSON: both are refused instead, naming the file.
The size is checked from the header when the inputs are listed (:func:`check_bscan_size`), the content once decoded
(:class:`RequireBScand`).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform
from monai.utils import convert_to_numpy

from clinseg.datasets.errors import DataError

MIN_BSCAN_SIZE = 32
"""The fewest rows and columns of a B-scan: twice the down-sampling of the default network (16), and far below any
scanner's B-scan (hundreds of pixels each way); anything smaller is a thumbnail, an icon or a strip."""


def check_bscan_size(source: str, shape: Sequence[int], min_size: int = MIN_BSCAN_SIZE) -> None:
    """Refuse a B-scan of fewer than ``min_size`` rows or columns.

    Raises:
        DataError: naming ``source``.
    """
    rows, cols = (int(n) for n in shape[-2:])
    if min(rows, cols) < min_size:
        raise DataError(
            source,
            f"is {rows} x {cols} pixels (rows x cols), smaller than the {min_size} x {min_size} a B-scan needs at "
            "least: a thumbnail or a strip, whose layers would be invented by resampling.",
        )


class RequireBScand(MapTransform):
    """Refuse, naming the file, an image at ``keys`` that cannot be an OCT B-scan: fewer than ``min_size`` rows or
    columns (:func:`check_bscan_size`), or uniform (one value throughout: a blank or failed export, with no retina)."""

    def __init__(self, keys: KeysCollection, min_size: int = MIN_BSCAN_SIZE, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.min_size = min_size

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            source = str(image.meta.get("filename_or_obj", key)) if isinstance(image, MetaTensor) else str(key)
            check_bscan_size(source, np.shape(image), self.min_size)
            array = convert_to_numpy(image)
            if array.size and float(array.min()) == float(array.max()):
                raise DataError(
                    source,
                    f"is uniform (every pixel {float(array.min()):g}): a blank image holds no retina to segment.",
                )
        return d
