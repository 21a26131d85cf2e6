"""Inferers beyond MONAI's: flip test-time augmentation around any inferer."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from monai.inferers import Inferer


class FlipTTAInferer(Inferer):
    """Average the logits of ``inferer`` over every combination of flips along ``spatial_axes``.

    With two axes this is four passes (identity, each flip, both), a common gain of about 0.5 F1 point for vessel
    segmentation at four times the inference cost. ``spatial_axes`` count spatial dimensions only (0 = rows).
    """

    def __init__(self, inferer: Inferer, spatial_axes: Sequence[int] = (0, 1)):
        super().__init__()
        self.inferer = inferer
        self.spatial_axes = list(spatial_axes)

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs) -> torch.Tensor:
        total, count = None, 0
        for n in range(len(self.spatial_axes) + 1):
            for axes in itertools.combinations(self.spatial_axes, n):
                dims = [axis + 2 for axis in axes]
                flipped = torch.flip(inputs, dims) if dims else inputs
                output = self.inferer(flipped, network, *args, **kwargs)
                output = torch.flip(output, dims) if dims else output
                total = output if total is None else total + output
                count += 1
        return total / count
