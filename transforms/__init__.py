"""The project's own dictionary transforms, for what MONAI has no transform for.

Each concept is an array transform plus a thin ``...d`` dictionary wrapper, as in MONAI.
"""

from .ct import WINDOW_PRESETS, AlignToImaged, HounsfieldWindow, HounsfieldWindowd, window_range
from .fundus import FundusNormalize, FundusNormalized
from .labels import (
    ColorToLabel,
    ColorToLabeld,
    MapLabelValues,
    MapLabelValuesd,
    OneHotWithIgnore,
    OneHotWithIgnored,
)
from .oct import IGNORE_INDEX, BoundariesToLabelMap, BoundariesToLabelMapd, boundaries_to_label_map

__all__ = [
    "WINDOW_PRESETS",
    "AlignToImaged",
    "HounsfieldWindow",
    "HounsfieldWindowd",
    "MapLabelValues",
    "MapLabelValuesd",
    "window_range",
    "FundusNormalize",
    "FundusNormalized",
    "IGNORE_INDEX",
    "BoundariesToLabelMap",
    "BoundariesToLabelMapd",
    "ColorToLabel",
    "ColorToLabeld",
    "OneHotWithIgnore",
    "OneHotWithIgnored",
    "boundaries_to_label_map",
]
