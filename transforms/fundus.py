"""Fundus photograph preprocessing: channel choice, optional CLAHE, and normalisation inside the field of view."""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Literal

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_numpy

CHANNELS = {"red": [0], "green": [1], "blue": [2], "rgb": [0, 1, 2]}
CHANNEL_CHOICES = (*CHANNELS, "grey")  # "grey": luminance of the three


class FundusNormalize(Transform):
    """Select channels, optionally equalise contrast, and z-score the image using only pixels inside the FOV.

    Vessels contrast best in the green channel of a colour fundus photograph; statistics are taken inside the FOV
    because the black border outside it would otherwise dominate them. Pixels outside the FOV are set to 0 (the
    FOV mean), so the network sees no edge there.

    Args:
        channels: ``"green"`` (default), ``"red"``, ``"blue"``, ``"rgb"``, or ``"grey"`` (luminance).
        clahe: apply contrast-limited adaptive histogram equalisation (scikit-image) to each channel first.
        clip_limit: CLAHE clip limit.
    """

    def __init__(self, channels: Literal[CHANNEL_CHOICES] = "green", clahe: bool = False, clip_limit: float = 0.01):
        if channels not in CHANNEL_CHOICES:
            raise ValueError(f"channels must be one of {list(CHANNEL_CHOICES)}, got {channels!r}.")
        self.channels, self.clahe, self.clip_limit = channels, clahe, clip_limit

    def __call__(self, image: NdarrayOrTensor, fov: NdarrayOrTensor | None = None) -> NdarrayOrTensor:
        array = convert_to_numpy(image, dtype=np.float32)
        if array.ndim != 3 or array.shape[0] not in (1, 3):
            raise ValueError(f"expected a (1|3, H, W) photograph, got shape {array.shape}.")
        if array.shape[0] == 1:
            array = np.repeat(array, 3, axis=0)
        if self.channels == "grey":
            array = (0.299 * array[0] + 0.587 * array[1] + 0.114 * array[2])[None]
        else:
            array = array[CHANNELS[self.channels]]
        inside = np.ones(array.shape[1:], bool) if fov is None else convert_to_numpy(fov).reshape(array.shape[1:]) > 0
        if self.clahe:
            from skimage.exposure import equalize_adapthist

            scale = max(float(array.max()), 1.0)
            array = np.stack([equalize_adapthist(c / scale, clip_limit=self.clip_limit) for c in array]).astype(
                np.float32
            )
        out = np.zeros_like(array)
        for index, channel in enumerate(array):
            values = channel[inside]
            mean, std = (values.mean(), values.std()) if values.size else (0.0, 1.0)
            out[index] = np.where(inside, (channel - mean) / max(std, 1e-6), 0.0)
        if isinstance(image, MetaTensor):
            return MetaTensor(torch.as_tensor(out), meta=image.meta, applied_operations=image.applied_operations)
        return torch.as_tensor(out) if isinstance(image, torch.Tensor) else out


class FundusNormalized(MapTransform):
    """Dictionary wrapper of :class:`FundusNormalize`; the FOV mask is read from ``fov_key`` if present."""

    def __init__(
        self,
        keys: KeysCollection,
        fov_key: str | None = "fov",
        channels: Literal[CHANNEL_CHOICES] = "green",
        clahe: bool = False,
        clip_limit: float = 0.01,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.fov_key = fov_key
        self.normalize = FundusNormalize(channels, clahe, clip_limit)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        fov = d.get(self.fov_key) if self.fov_key else None
        for key in self.key_iterator(d):
            d[key] = self.normalize(d[key], fov)
        return d
