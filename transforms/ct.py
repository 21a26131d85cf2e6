"""CT transforms: Hounsfield windowing, and bringing a label volume onto its image's voxel grid.

Hounsfield windowing is deliberately lossy and has no inverse: every value below the window's lower edge maps to
the output minimum and every value above its upper edge to the output maximum (with ``clip=True``), exactly as a
radiologist's display window does. Inference therefore never inverts it: predictions are label maps, and the
geometry (orientation, spacing, crop) is what gets inverted. Keep the original HU volume (e.g. ``CopyItemsd``)
when HU values are needed after windowing.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Literal

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, ResampleToMatch, ScaleIntensityRange, Transform

from clinseg.datasets.errors import DataError

# (level, width) in HU. Mediastinum, lung and bone are the usual radiology reading windows; "cardiac" is a
# CT-angiography window wide enough for fat (-100 HU), myocardium (~100 HU) and contrast-enhanced blood
# (250-450 HU) to stay apart; "full" keeps air to dense bone.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "mediastinum": (40.0, 400.0),
    "soft_tissue": (50.0, 350.0),
    "cardiac": (100.0, 700.0),
    "cta": (300.0, 600.0),
    "lung": (-600.0, 1500.0),
    "bone": (400.0, 1800.0),
    "brain": (40.0, 80.0),
    "full": (250.0, 2500.0),
}


def window_range(
    preset: str | None = None,
    level: float | None = None,
    width: float | None = None,
    hu_min: float | None = None,
    hu_max: float | None = None,
) -> tuple[float, float]:
    """The ``(lowest, highest)`` HU of a window given as a preset name, as level/width, or as min/max (one way only).

    Raises:
        ValueError: for an unknown preset, an incomplete or ambiguous specification, or a non-positive width.
    """
    given = [preset is not None, level is not None or width is not None, hu_min is not None or hu_max is not None]
    if sum(given) != 1:
        raise ValueError(
            "give the Hounsfield window one way: preset=NAME, or level= and width=, or hu_min= and hu_max= "
            f"(got preset={preset}, level={level}, width={width}, hu_min={hu_min}, hu_max={hu_max})."
        )
    if preset is not None:
        if preset not in WINDOW_PRESETS:
            raise ValueError(f"unknown Hounsfield window preset {preset!r}; known: {', '.join(WINDOW_PRESETS)}.")
        level, width = WINDOW_PRESETS[preset]
    if level is not None or width is not None:
        if level is None or width is None:
            raise ValueError(f"a window needs both level and width (got level={level}, width={width}).")
        hu_min, hu_max = level - width / 2.0, level + width / 2.0
    if hu_min is None or hu_max is None:
        raise ValueError(f"a window needs both hu_min and hu_max (got hu_min={hu_min}, hu_max={hu_max}).")
    if not hu_max > hu_min:
        raise ValueError(f"a window needs hu_max > hu_min (width > 0), got [{hu_min}, {hu_max}].")
    return float(hu_min), float(hu_max)


class HounsfieldWindow(Transform):
    """Map the HU window ``[lowest, highest]`` linearly onto ``output_range``, clipping outside it by default.

    Args:
        preset: a name from :data:`WINDOW_PRESETS` (``mediastinum``, ``cardiac``, ``cta``, ``lung``, ``bone``, ...).
        level, width: window centre and width in HU (the DICOM WindowCenter/WindowWidth convention).
        hu_min, hu_max: the window's edges in HU.
        output_range: values the lower and upper window edges map to.
        clip: clip to ``output_range`` (a display window); ``False`` keeps the linear map beyond the edges.

    The lower edge maps exactly to ``output_range[0]`` and the upper edge to ``output_range[1]``. There is no
    inverse (see the module documentation).
    """

    def __init__(
        self,
        preset: str | None = None,
        level: float | None = None,
        width: float | None = None,
        hu_min: float | None = None,
        hu_max: float | None = None,
        output_range: tuple[float, float] = (0.0, 1.0),
        clip: bool = True,
        dtype=np.float32,
    ):
        if preset is None and level is None and width is None and hu_min is None and hu_max is None:
            preset = "mediastinum"
        self.hu_min, self.hu_max = window_range(preset, level, width, hu_min, hu_max)
        self.output_range = (float(output_range[0]), float(output_range[1]))
        self.scaler = ScaleIntensityRange(
            a_min=self.hu_min,
            a_max=self.hu_max,
            b_min=self.output_range[0],
            b_max=self.output_range[1],
            clip=clip,
            dtype=dtype,
        )

    def __call__(self, img: NdarrayOrTensor) -> NdarrayOrTensor:
        return self.scaler(img)


class HounsfieldWindowd(MapTransform):
    """Dictionary wrapper of :class:`HounsfieldWindow`."""

    def __init__(
        self,
        keys: KeysCollection,
        preset: Literal[tuple(WINDOW_PRESETS)] | None = None,
        level: float | None = None,
        width: float | None = None,
        hu_min: float | None = None,
        hu_max: float | None = None,
        output_range: tuple[float, float] = (0.0, 1.0),
        clip: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.window = HounsfieldWindow(preset, level, width, hu_min, hu_max, output_range, clip)

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.window(d[key])
        return d


def same_grid(a: MetaTensor, b: MetaTensor, atol: float = 1e-3) -> bool:
    """Whether two channel-first volumes share spatial shape and affine (the same voxel grid)."""
    return tuple(a.shape[1:]) == tuple(b.shape[1:]) and torch.allclose(
        torch.as_tensor(a.affine, dtype=torch.float64), torch.as_tensor(b.affine, dtype=torch.float64), atol=atol
    )


def _affine(volume: MetaTensor) -> np.ndarray:
    return np.asarray(torch.as_tensor(volume.affine, dtype=torch.float64))


def world_box(volume: MetaTensor, to_voxels_of: MetaTensor | None = None) -> np.ndarray:
    """The corners' extent, ``[[min along each axis], [max ...]]``, of a channel-first volume's voxel centres: in
    world space (mm), or in the voxel coordinates of the volume ``to_voxels_of``."""
    last = np.array(volume.shape[1:], dtype=float) - 1
    corners = np.array(np.meshgrid(*[[0.0, n] for n in last], indexing="ij")).reshape(3, -1)
    affine = _affine(volume)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    if to_voxels_of is not None:
        inverse = np.linalg.inv(_affine(to_voxels_of))
        world = inverse[:3, :3] @ world + inverse[:3, 3:4]
    return np.stack([world.min(axis=1), world.max(axis=1)])


def misplaced_copy_problem(label: MetaTensor, image: MetaTensor) -> str | None:
    """Why ``label``, which has the image's voxel counts (in any axis order) but another grid, lies more than a voxel
    of the image (along any of its axes) away from the image's grid, or None. A label drawn on the image and saved
    with the image's array but another affine (an identity one, a shifted origin) or transposed (SimpleITK's z, y, x
    array under the image's affine) still overlaps the image, so resampling it through the affines gives a
    plausible label in the wrong place; the same voxels in another axis order or direction, with an affine to match,
    cover the image's box and are resampled. Labels on other grids (a crop, the scanner's full field, another
    spacing) are not judged here."""
    if sorted(label.shape[1:]) != sorted(image.shape[1:]):
        return None
    # in the image's voxels, so that a thick slice does not hide a shift of several thin in-plane voxels
    in_voxels = world_box(label, to_voxels_of=image)
    image_voxels = np.stack([np.zeros(3), np.array(image.shape[1:], dtype=float) - 1])
    if float(np.abs(in_voxels - image_voxels).max()) <= 1.0:
        return None
    label_box, image_box = world_box(label), world_box(image)
    offset = float(np.abs(label_box - image_box).max())
    spans = " x ".join(f"{lo:.1f}..{hi:.1f}" for lo, hi in zip(*label_box, strict=True))
    image_spans = " x ".join(f"{lo:.1f}..{hi:.1f}" for lo, hi in zip(*image_box, strict=True))
    return (
        f"its affine places it up to {offset:.1f} mm away from it (the label spans {spans} mm, the image "
        f"{image_spans} mm)"
    )


class AlignToImaged(MapTransform):
    """Resample volumes (labels) that lie on another voxel grid onto the image's grid, through the two affines.

    Both must be channel-first ``MetaTensor`` volumes in the same world (patient) space, as a label produced on
    the scanner's full field of view and a cropped CT are. Labels are resampled with nearest neighbour only, so
    no new label values appear; voxels of the image grid outside the label's field of view become 0. Volumes
    already on the image grid are returned unchanged.

    Raises:
        DataError: naming the file, when a volume does not overlap the image at all while it has
            foreground (the two files are then not in one world space).
    """

    def __init__(
        self, keys: KeysCollection, image_key: str = "image", mode: str = "nearest", allow_missing_keys: bool = False
    ):
        super().__init__(keys, allow_missing_keys)
        self.image_key = image_key
        self.resampler = ResampleToMatch(mode=mode, padding_mode="zeros")

    def __call__(self, data: Mapping[Hashable, MetaTensor]) -> dict[Hashable, MetaTensor]:
        d = dict(data)
        image = d[self.image_key]
        for key in self.key_iterator(d):
            volume = d[key]
            if not isinstance(volume, MetaTensor) or not isinstance(image, MetaTensor):
                raise ValueError(f"{key!r}: aligning to the image needs MetaTensor volumes with affines.")
            if same_grid(volume, image):
                continue
            source = volume.meta.get("filename_or_obj", key)
            problem = misplaced_copy_problem(volume, image)
            if problem is not None:
                raise DataError(
                    source,
                    f"has the voxel counts of the image ({image.meta.get('filename_or_obj', self.image_key)}), but "
                    f"{problem}: it was most likely saved with another affine (an identity one, a shifted origin) "
                    "or in another array order (z, y, x) than the image it was drawn on.",
                    "Save the label with the image's own header (affine) and array order; a label that truly lies "
                    "elsewhere has to be resampled onto the image before it is used.",
                )
            had_foreground = bool((volume != 0).any())
            aligned = self.resampler(volume, img_dst=image)
            aligned.meta["filename_or_obj"] = source
            if had_foreground and not bool((aligned != 0).any()):
                raise DataError(
                    source,
                    "the label has foreground but none of it lies inside the image's field of view "
                    f"({image.meta.get('filename_or_obj', self.image_key)}); the two are not in one world space.",
                )
            d[key] = aligned
        return d


class HeartFreeLabeld(MapTransform):
    """Give an item flagged ``flag_key`` (a CT known to hold no heart, see
    :func:`clinseg.datasets.ct.datalist.heart_free_cases`) an all-background label ``keys`` on its image's grid,
    and drop the flag; ``annotation_source`` says where the label came from, so every item of a batch has the
    same keys as a labelled one. Items without the flag are left as they are: a missing label is never filled in
    silently."""

    def __init__(
        self,
        keys: KeysCollection,
        image_key: str = "image",
        flag_key: str = "heart_free",
        annotation_key: str = "annotation_source",
    ):
        super().__init__(keys, allow_missing_keys=True)
        self.image_key, self.flag_key, self.annotation_key = image_key, flag_key, annotation_key

    def __call__(self, data: Mapping[Hashable, MetaTensor]) -> dict[Hashable, MetaTensor]:
        d = dict(data)
        if not d.pop(self.flag_key, False):
            return d
        image = d[self.image_key]
        for key in self.keys:
            d[key] = MetaTensor(torch.zeros_like(image.as_tensor(), dtype=torch.uint8), meta=dict(image.meta))
        d[self.annotation_key] = "heart-free CT: all background"
        return d
