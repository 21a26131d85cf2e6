"""Annotated value types for the parameters users set in bundle configs.

The config checks (:mod:`clinseg.pipelines.config_checks`) validate a config value against the annotation of the
parameter it is passed to, so a range or a list of choices is written once, here or beside the constant that
holds the choices (``Literal[tuple(WINDOW_PRESETS)]``), and nowhere else.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

from annotated_types import Ge, Gt, Le, Lt, MinLen

PositiveInt = Annotated[int, Gt(0)]
NonNegativeInt = Annotated[int, Ge(0)]
PositiveFloat = Annotated[float, Gt(0)]
NonNegativeFloat = Annotated[float, Ge(0)]
Fraction = Annotated[float, Gt(0), Lt(1)]  # a share of something, strictly between none and all
Rate = Annotated[float, Gt(0), Le(1)]
Probability = Annotated[float, Ge(0), Le(1)]
AtLeastOne = Annotated[float, Ge(1)]  # a factor or ratio bounding how far from 1 something may be
PositiveSize = Sequence[PositiveInt]  # one positive extent per spatial axis
PositiveSpacing = Sequence[PositiveFloat]
# factors an image is resampled by at test time, within 4 times smaller or larger; the length bound makes it a list
# of any length for the config checks, where a plain Sequence of numbers is one item per spatial axis
RESAMPLING_FACTOR_RANGE = (0.25, 4.0)
ResamplingFactors = Annotated[
    Sequence[Annotated[float, Ge(RESAMPLING_FACTOR_RANGE[0]), Le(RESAMPLING_FACTOR_RANGE[1])]], MinLen(1)
]
