"""Fundus photograph preprocessing: the field of view (given, or estimated from the photograph), channel choice,
optional CLAHE, and normalisation inside the field of view."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Literal

import numpy as np
import torch
from monai.config import KeysCollection
from monai.config.type_definitions import NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform, Transform
from monai.utils import TraceKeys, convert_to_numpy, ensure_tuple_rep
from scipy import ndimage

from clinseg.datasets.errors import DataError, source_of
from clinseg.datasets.readers import MAX_PIXELS
from clinseg.datasets.value_types import AtLeastOne

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

    Raises:
        ValueError: (a ``DataError`` naming the file, from the dictionary transform) for an empty field of view, and
            when every chosen channel is constant inside it (a photograph stored in its red channel alone, read for
            its green one): normalised, it would be a blank field, in which the network finds nothing, plausibly.
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
        if not inside.any():
            raise ValueError("its field of view is empty: no pixel is left to normalise or segment.")
        selected = array[:, inside]
        if (selected.max(axis=1) == selected.min(axis=1)).all():
            # z-scored, a constant channel is 0 throughout: the network would see a blank field and find nothing
            raise ValueError(
                f"its {self.channels} channel{'s are' if len(array) > 1 else ' is'} constant "
                f"({float(selected[0, 0]):g}) inside the field of view: nothing to segment there; choose 'channels' "
                f"({', '.join(CHANNEL_CHOICES)}) that hold the picture."
            )
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
            try:
                d[key] = self.normalize(d[key], fov)
            except ValueError as e:
                image = d[key]
                source = source_of(image, key)
                raise DataError(str(source), str(e)) from None
        return d


# The check of grey images (EstimateFOV._check_fundus). Values measured (on the 256-pixel copy) in DRIVE's 20 and
# CHASE_DB1's 14 photographs made grey (green channel or luminance; whole, or cut inside the disc), and in the 4
# NR206 OCT B-scans and 22 axial slices of the TotalSegmentator CTs (soft-tissue and lung windows, crops to the heart
# and whole bodies), rendered to 8-bit PNG: each limit is far from the photographs, the side the check errs on.
CHECK_SIZE = 256  # the longer side of the copy a grey image is checked on: a B-scan's layers, not its speckle
COLOUR_SPREAD = 0.02  # of full scale: channels closer than this, on average, make a grey image (photographs: 0.18+)
MAX_COHERENCE = 0.6  # photographs: at most 0.36; OCT B-scans: 0.82 to 0.84
MAX_BLACK = 0.15  # photographs: at most 0.01; CT slices cut to the heart, soft-tissue window: 0.37 to 0.45
MAX_CLIPPED = 0.1  # photographs: at most 0.01; CT slices with bone, contrast or a lung window: 0.15 to 0.46
MAX_RIM_DEVIATION = 0.06  # photographs: at most 0.024 (CHASE_DB1's green channel); bodies in CT slices: 0.09 to 0.16
# Thin structures (grey top-hats of radius THIN_RADIUS, the field resampled to THIN_SIZE pixels across), colour or
# grey, measured on DRIVE's 20 and CHASE_DB1's 14 photographs and one of another camera (scikit-image's retina.jpg):
# whole, downsized to 0.5 and 0.3 of DRIVE's size, cut (45 % of each side, 5 places, and 35 % around the optic disc),
# each also as its green channel alone; the project's fundus phantoms; seven everyday colour photographs (scikit-
# image's astronaut, cat, coffee, immunohistochemistry slide, rocket, motorcycle pair):
THIN_SIZE, THIN_RADIUS, THIN_MIN_SIZE = 512, 5, 128
# The strongest tenth of dark thin structures over the strongest tenth of bright ones, in the vessel channel (green,
# or the grey image): vessels are darker than the retina around them. Photographs: at least 1.155 whole, 1.22
# downsized, 1.001 cut; phantoms 1.005 or more. Their negatives (grey or colour: an angiogram's polarity) at most
# 0.895, and the bundle's model segments them with F1 0.05 to 0.10 in a sparse map that looks like an answer.
MIN_VESSEL_POLARITY = 0.95
# The strongest tenth of dark thin structures relative to the vessel channel's level: vessels show. Photographs at
# least 0.076 whole, 0.043 downsized, 0.039 cut, 0.029 blurred by a Gaussian of 2 pixels (at DRIVE's size) and
# 0.0085 by one of 4 (where the thin vessels are gone); phantoms 0.057. A smooth colour gradient: 0, and a vessel map
# of 0.04 % of its field.
MIN_VESSEL_CONTRAST = 0.005
# The red channel's thin structures relative to its level, in a colour image without a camera's frame: the fundus
# reflects red from beneath the retina, smooth (photographs cut inside the disc: at most 0.047); a scene's edges show
# in every channel (the everyday photographs: 0.097 to 0.34).
MAX_RED_DETAIL = 0.07
# Checks of every photograph, its field given or estimated (EstimateFOVd), measured on the same photographs.
# The green channel (where vessels show) clipped at full scale: DRIVE's and CHASE_DB1's fields at most 0.4 % (their
# red channel up to 9 %, so the red one is not judged). DRIVE 21 brightened until 48 % of it clips loses a sixth of
# its F1 (0.84 to 0.70), at 94 % nearly all of it (0.31), with a map that looks normal.
MAX_GREEN_CLIPPED = 0.1
# The share of a given FOV mask outside the field estimated from its photograph, in the camera's dark frame: DRIVE's
# 20 masks at most 1 % (intersection over union 0.989 to 0.999); an inverted mask, another camera's or one shifted by
# a quarter of the image far more. A mask inside the field (a region to segment or score) is none of these.
MAX_GIVEN_FOV_OUTSIDE = 0.1


def _full_scale(top: float) -> float:
    """The full scale of an image whose brightest value is ``top``: [0, 1] floats, 8 or 16 bits."""
    return 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0


def _clipped_share(channel: np.ndarray, top: float) -> float:
    """The share of ``channel``'s values at the full scale of an image whose brightest value is ``top``."""
    return float((channel >= _full_scale(top)).mean())


def _colour_spread(array: np.ndarray, full_scale: float, where: np.ndarray | None = None) -> float:
    """How far the channels of a ``(channels, H, W)`` image lie from their mean, on average over its pixels (those
    ``where`` is true), as a fraction of ``full_scale``: 0 for a grey image."""
    spread = np.abs(array - array.mean(axis=0)).max(axis=0)
    return float((spread if where is None else spread[where]).mean()) / full_scale


class NotFundusError(ValueError):
    """Raised by :class:`EstimateFOV` for an image of another modality (an OCT B-scan, a CT slice)."""


def _thin_structures(channel: np.ndarray, field: np.ndarray) -> tuple[np.ndarray, np.ndarray, float] | None:
    """``(dark, bright, level)`` of one channel inside ``field``: its black and white top-hats of radius
    ``THIN_RADIUS`` (structures narrower than a main vessel, darker or brighter than around them), pixel by pixel,
    and its median, away from the field's rim (whose edge is no structure). The field is resampled to ``THIN_SIZE``
    pixels across, so that a vessel is the same share of the radius in a photograph of any size; None for a field
    under ``THIN_MIN_SIZE`` pixels across, where the optic disc and the noise are as narrow as the radius."""
    from skimage.morphology import black_tophat, disk, white_tophat
    from skimage.transform import resize

    rows, cols = np.flatnonzero(field.any(axis=1)), np.flatnonzero(field.any(axis=0))
    extent = max(int(rows[-1] - rows[0]), int(cols[-1] - cols[0])) + 1 if rows.size else 0
    if extent < THIN_MIN_SIZE:
        return None
    scale = THIN_SIZE / extent
    working = [max(1, round(n * scale)) for n in channel.shape]
    small = resize(channel, working, order=1, anti_aliasing=scale < 1)
    inside = resize(field.astype(np.float32), working, order=1) >= 0.5
    inside = ndimage.binary_erosion(inside, iterations=THIN_RADIUS + 3, border_value=0)
    if inside.sum() < 100:
        return None
    footprint = disk(THIN_RADIUS)
    dark, bright = black_tophat(small, footprint)[inside], white_tophat(small, footprint)[inside]
    return dark, bright, float(np.median(small[inside]))


def _rim_points(field: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The columns and rows of the field's rim: its edge pixels, less the straight cuts of the image's edges (they
    lie on the sides of its bounding box)."""
    rows, cols = np.flatnonzero(field.any(axis=1)), np.flatnonzero(field.any(axis=0))
    rim = field & ~ndimage.binary_erosion(field, border_value=0)
    rim[[rows[0], rows[-1]], :] = False
    rim[:, [cols[0], cols[-1]]] = False
    y, x = np.nonzero(rim)
    return x, y


def _rim_circle(field: np.ndarray) -> tuple[float, float] | None:
    """``(radius, spread)`` of the circle through the field's rim (:func:`_rim_points`): the algebraic
    least-squares (Kasa) fit, and the root-mean-square distance of the rim from it. None where too little rim is
    left to fit."""
    x, y = _rim_points(field)
    if x.size < 50:
        return None
    # x^2 + y^2 = a x + b y + c, centre (a/2, b/2)
    design = np.stack([x, y, np.ones_like(x)], axis=1).astype(np.float64)
    (a, b, c), *_ = np.linalg.lstsq(design, (x**2 + y**2).astype(np.float64), rcond=None)
    radius = float(np.sqrt(max(c + (a / 2) ** 2 + (b / 2) ** 2, 0.0)))
    return radius, float(np.sqrt(np.mean((np.hypot(x - a / 2, y - b / 2) - radius) ** 2)))


def _rim_deviation(field: np.ndarray) -> float:
    """How far the field's rim strays from the circle through it, as a fraction of its radius. NaN where too
    little rim is left to fit."""
    circle = _rim_circle(field)
    if circle is None:
        return float("nan")
    radius, spread = circle
    return spread / radius if radius else float("inf")


FOV_SOURCE_SUFFIX = "_source"  # ``fov_source``: "given" (a mask file) or "estimated" (from the photograph)


class EstimateFOV(Transform):
    """The field of view of a colour fundus photograph: the bright disc (or cut disc) inside the camera's dark frame.

    Photographs come without FOV masks far more often than with them, and the dark frame must not enter the
    normalisation statistics, the metrics or the prediction (the bright rim of the disc reads as a vessel edge).
    On a working copy at most ``working_size`` pixels on its longer side: brightness is the largest channel
    (the red one in a fundus photograph, whatever the camera's colour balance), smoothed; the frame and the disc
    are told apart by Otsu's threshold, and the mask is taken where brightness exceeds the frame's level by
    ``rise`` of the way to the disc's; then the opened, hole-filled largest component, scaled back.

    A photograph with fewer than two dark corners has no frame (a crop inside the disc, or one whose periphery fades
    into one corner): the whole image is the field. One cut just inside its disc, dark only in its corners, is too
    little frame for Otsu's split: the frame's level is then read from the dark corners. A frame that is not dark (a
    grey, white or coloured one, or padding, filled in by software) is one flat colour in all four corners: it is
    made black first, and the field is then found as in the camera's own dark frame. MONAI's ``ForegroundMask``
    thresholds alone; it neither fills the dark lesions inside the disc nor keeps one component, and it would split
    a frameless photograph at its own median.

    A colour photograph whose rim is no circle, where a dark shadow across part of the disc was cut off as frame,
    gets the disc that the round part of its rim draws. A grey image must look like a red-free photograph (see
    ``_check_fundus``): an OCT B-scan or a CT slice saved as PNG would otherwise get a plausible field, and then
    plausible vessels.

    Raises:
        DataError: (from the dictionary transform, naming the file) a photograph with no bright field, one whose
            field would be under ``min_fraction`` of the image, or one with two or more separate fields of that size
            (a montage): a plausible mask cannot be made, so none is guessed; a grey image that is no red-free
            fundus photograph (:class:`NotFundusError`).
    """

    def __init__(
        self,
        working_size: int = 512,
        rise: float = 0.2,
        frame_contrast: float = 0.15,
        min_fraction: float = 0.2,
        padding_tolerance: float = 0.03,
    ):
        self.working_size, self.rise = working_size, rise
        self.frame_contrast, self.min_fraction = frame_contrast, min_fraction
        self.padding_tolerance = padding_tolerance

    def __call__(self, image: NdarrayOrTensor) -> np.ndarray:
        array = convert_to_numpy(image, dtype=np.float32)
        if array.ndim != 3:
            raise ValueError(f"expected a (channels, H, W) photograph, got shape {array.shape}.")
        mask = self._field(array)
        self._check_fundus(array, mask)
        return mask

    def _field(self, array: np.ndarray) -> np.ndarray:
        """The field of view of the ``(channels, H, W)`` photograph, at its own size."""
        from skimage.transform import resize

        brightness = array.max(axis=0)
        shape = brightness.shape
        scale = min(1.0, self.working_size / max(shape))
        working = [max(1, round(n * scale)) for n in shape]
        raw = resize(brightness, working, order=1, anti_aliasing=scale < 1)
        small = ndimage.gaussian_filter(raw, sigma=1.5)
        if not np.isfinite(small).all() or float(small.max()) <= float(small.min()):
            raise ValueError("is uniform: it holds no field of view.")
        top = float(brightness.max())
        full_scale = _full_scale(top)
        if np.percentile(small, 99) < 0.05 * full_scale:
            raise ValueError("is dark throughout (99 % of it below 5 % of full scale): it holds no field of view.")
        frame, disc, dark = self._levels(small)
        if not dark:
            padding = self._padding(array, working, full_scale)
            if padding is None:
                return np.ones(shape, bool)
            # a frame of one flat colour that is not dark (grey, white, coloured: filled in by the software that
            # exported or padded the photograph) is frame all the same: made black, it is told from the disc as the
            # camera's own dark frame is, which it may still surround
            raw = np.where(padding, 0.0, raw)
            small = ndimage.gaussian_filter(raw, sigma=1.5)
            frame, disc, dark = self._levels(small)
            if not dark:
                return np.ones(shape, bool)
        if frame > self.frame_contrast * disc:
            # Otsu's lower class is no dark frame: in a photograph cut just inside its disc, dark only in its
            # corners, the split falls inside the fundus, and the darker periphery would be cut off as frame; the
            # frame's level is then that of the dark corners
            frame = float(np.median(dark))
        mask = small > frame + self.rise * (disc - frame)
        radius = max(1, round(0.01 * max(small.shape)))
        mask = ndimage.binary_opening(mask, structure=np.ones((2 * radius + 1,) * 2, bool))
        labels, count = ndimage.label(mask)
        if count == 0:
            # nothing bright is wider than the opening: fine bright lines (a page of text, a strip one pixel high)
            # as much as a photograph too dark to show its disc
            share = float((small > frame + self.rise * (disc - frame)).mean())
            raise ValueError(
                f"holds no field of view: no bright region wider than {2 * radius + 1} pixels of its "
                f"{small.shape[0]} x {small.shape[1]} working copy ({share:.0%} of it bright, in thin lines or "
                "specks): a page of text, a strip, or a photograph too dark to show its disc?"
            )
        areas = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
        sizes = np.sort(areas)[::-1] / mask.size
        if count > 1 and sizes[1] >= self.min_fraction:
            # two discs side by side (a montage of two fields, a stereo pair): one chosen, the other would be left
            # unsegmented, and the two measured as one disc; which one is meant cannot be told
            many = int((sizes >= self.min_fraction).sum())
            raise ValueError(
                f"holds {many} separate bright fields of view, each over {self.min_fraction:.0%} of the image (a "
                "montage of photographs?): which one to segment cannot be told; give each field as its own image."
            )
        mask = ndimage.binary_fill_holes(labels == 1 + int(np.argmax(areas)))
        irregular = not mask.all() and _rim_deviation(mask) > MAX_RIM_DEVIATION
        if irregular and _colour_spread(array, full_scale) > COLOUR_SPREAD:
            mask = self._shadowed(mask, small, frame)
        if mask.mean() < self.min_fraction:
            raise ValueError(
                f"its bright field of view covers only {mask.mean():.0%} of the image (at least "
                f"{self.min_fraction:.0%} expected): it does not look like a fundus photograph."
            )
        return resize(mask.astype(np.float32), shape, order=1) >= 0.5

    @staticmethod
    def _shadowed(mask: np.ndarray, small: np.ndarray, frame: float) -> np.ndarray:
        """The field of a colour photograph whose rim is no circle: the disc through the round part of its rim, where
        a dark shadow (a small pupil, an eyelash, the lid) across part of the disc was cut off as frame.

        The camera's field is a disc: RANSAC finds the circle that most of the rim lies on (the rim left along the
        shadow's soft edge does not); the part of that disc that was left out is added when it is no darker than
        the frame. A field with too little round rim (half its rim off any one circle) is kept as it was found.
        """
        from skimage.measure import CircleModel, ransac

        x, y = _rim_points(mask)
        if x.size < 50:
            return mask
        points = np.stack([x, y], axis=1).astype(np.float64)
        threshold = 0.01 * max(mask.shape)
        model, inliers = ransac(points, CircleModel, min_samples=3, residual_threshold=threshold, max_trials=500, rng=0)
        if model is None or inliers is None or inliers.mean() < 0.5:
            return mask
        (centre_x, centre_y), radius = model.center, float(model.radius)
        grid_y, grid_x = np.mgrid[: mask.shape[0], : mask.shape[1]]
        added = (np.hypot(grid_x - centre_x, grid_y - centre_y) <= radius) & ~mask
        if not added.any() or float(np.median(small[added])) <= frame:
            return mask
        return mask | added

    def _levels(self, small: np.ndarray) -> tuple[float, float, list[float]]:
        """Otsu's frame and disc levels of the smoothed working copy, and the levels of its dark corners."""
        from skimage.filters import threshold_otsu

        split = threshold_otsu(small)
        frame, disc = float(np.median(small[small <= split])), float(np.median(small[small > split]))
        # a disc inside a rectangle leaves its four corners dark, however much of it the camera cuts, and a disc
        # shifted to one side still leaves the two of the far side dark; a crop inside the disc has bright corners,
        # or one dark corner where its periphery fades (the green channel of a red-free photograph): no frame, the
        # whole image is the field
        k = max(2, round(0.03 * min(small.shape)))
        corners = [small[:k, :k], small[:k, -k:], small[-k:, :k], small[-k:, -k:]]
        dark = [float(np.median(c)) for c in corners if float(np.median(c)) <= self.frame_contrast * disc]
        return frame, disc, dark if len(dark) >= 2 else []

    def _padding(self, array: np.ndarray, working: list[int], full_scale: float) -> np.ndarray | None:
        """The frame of one flat colour around the field, on the working grid, or None where the corners hold none.

        Software that fills the frame or pads the photograph fills it with one colour, the same in all four corners
        and flat there (JPEG keeps a flat block flat). A crop inside the disc has retina in its corners: darker or
        paler towards the periphery, each corner its own colour (they differ by 15 levels of 255 or more in DRIVE's
        and CHASE_DB1's colour photographs; in a red-free one three corners may agree, never all four), with vessels
        and choroid in them. Text burned into one corner (a date, a name) leaves three corners of the fill, which
        are then one colour to a level or two: retina never is. The frame is then grown, from the image's edge, over
        what is nearer its colour than ``rise`` of the way to the rest of the photograph: JPEG's ringing along the
        rim of the disc, which a flat tolerance would leave as a pale ring around the field.
        """
        from skimage.transform import resize

        tolerance = self.padding_tolerance * full_scale
        height, width = array.shape[1:]
        k = max(2, round(0.03 * min(height, width)))
        patches = [array[:, :k, :k], array[:, :k, -k:], array[:, -k:, :k], array[:, -k:, -k:]]
        patches = [p.reshape(len(array), -1) for p in patches]
        colour = np.median(np.stack([np.median(p, axis=1) for p in patches]), axis=0)
        if not all(float((np.abs(p - colour[:, None]).max(axis=0) <= tolerance).mean()) >= 0.95 for p in patches):
            # a date, a name or a logo burned into one corner of the fill: the other three are still the fill, one
            # colour to a level or two, as no retina is (at most 54 % of the corners of DRIVE's and CHASE_DB1's
            # photographs cut inside the disc, colour or grey, are within 1 % of full scale of their common colour)
            fill = [float((np.abs(p - colour[:, None]).max(axis=0) <= 0.01 * full_scale).mean()) for p in patches]
            if sorted(fill)[1] < 0.95:
                return None
        anti_aliasing = max(working) < max(height, width)
        distance = np.zeros(working, np.float32)
        for channel, value in zip(array, colour, strict=True):
            small = resize(channel, working, order=1, anti_aliasing=anti_aliasing)
            distance = np.maximum(distance, np.abs(small - value))
        flat = distance <= tolerance
        if flat.all():
            return None
        near = distance <= max(tolerance, self.rise * float(np.median(distance[~flat])))
        # the frame reaches the image's edge; the same colour inside the field (a pale lesion, a reflex) is no frame
        labels, _ = ndimage.label(near)
        edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
        return np.isin(labels, edge[edge > 0])

    def _check_fundus(self, array: np.ndarray, mask: np.ndarray) -> None:
        """Refuse a grey image that is no red-free fundus photograph (an OCT B-scan, a CT slice saved as PNG or
        TIFF): the field found in it is plausible, and so would be the vessels segmented there.

        In every image, colour or grey, vessels are darker than the retina around them: an image whose thin
        structures are mostly brighter than their surroundings (a fluorescein angiogram, a negative) is refused. A
        colour image inside a camera's round field is taken as a fundus photograph; one without a frame (a crop
        inside the disc, or an everyday photograph) must have the fundus's smooth red channel: red light returns
        from beneath the retina, and vessels show in green, whereas a scene's edges show in every channel. A grey
        image is a red-free photograph only if its field looks like one:
        retina is lit throughout, so the field holds no black (air, lungs, bowel gas in a CT slice windowed for soft
        tissue) and no large part clipped at full brightness (bone, contrast, or all soft tissue in a lung window);
        vessels run every way, whereas the layers of a B-scan all run across it; and the camera's field is a disc
        (cut or not by the image's edges), not the outline of a body. Each limit lies far from the values of
        DRIVE's and CHASE_DB1's photographs made grey (their green channel or luminance), whole or cut inside the
        disc, and from the values of real OCT B-scans and CT slices (given beside each limit).
        """
        from skimage.transform import resize

        brightness = array.max(axis=0)
        scale = min(1.0, CHECK_SIZE / max(brightness.shape))
        working = [max(1, round(n * scale)) for n in brightness.shape]
        channels = np.stack([resize(c, working, order=1, anti_aliasing=scale < 1) for c in array])
        field = resize(mask.astype(np.float32), working, order=1) >= 0.5
        top = float(brightness.max())
        full_scale = _full_scale(top)
        if not field.any():
            return
        colour = _colour_spread(channels, full_scale, field) > COLOUR_SPREAD
        # its channels differ by 18 % of full scale or more in DRIVE's and CHASE_DB1's photographs
        kind = (
            "a colour image that does not look like a fundus photograph"
            if colour
            else "a grey image that does not look like a red-free fundus photograph"
        )
        if colour:
            red = _thin_structures(array[0], mask) if mask.all() else None
            # a camera's round field vouches for a fundus; a frameless colour image must show one
            if red is not None:
                detail = float((red[0] + red[1]).mean()) / max(red[2], 1e-6 * full_scale)
                if detail > MAX_RED_DETAIL:
                    raise NotFundusError(
                        f"is {kind}: it has no camera's field of view, and its red channel is as detailed as its "
                        f"others (thin structures {detail:.3f} of its level; under {MAX_RED_DETAIL} in fundus "
                        "photographs, whose red light returns smooth from beneath the retina): an everyday "
                        "photograph, a slide or a screenshot?"
                    )
            self._check_vessels(array[1], mask, kind)
            return
        small = ndimage.gaussian_filter(channels.max(axis=0), sigma=1.0)
        inside = small[field]
        problem = None
        black = float((inside < 0.25 * float(np.median(inside))).mean())
        clipped = float((brightness[mask] >= top).mean())
        # the structures of the lit field: the edge of a dark corner (the camera's frame in a photograph cut off
        # centre, taken as frameless) runs one way and would make a crop of a red-free photograph look like a B-scan
        lit = field & (small > 0.5 * float(np.median(inside)))
        interior = ndimage.binary_erosion(lit, iterations=3, border_value=1)
        gy, gx = np.gradient(small)
        jxx, jyy, jxy = (gx * gx)[interior].sum(), (gy * gy)[interior].sum(), (gx * gy)[interior].sum()
        coherence = float(np.hypot(jxx - jyy, 2 * jxy) / max(float(jxx + jyy), 1e-12))
        rim = float("nan") if field.all() else _rim_deviation(field)
        if coherence > MAX_COHERENCE:
            problem = (
                f"its structures all run one way (orientation coherence {coherence:.2f}; vessels run every way, "
                f"under {MAX_COHERENCE} in red-free photographs), as the layers of an OCT B-scan do"
            )
        elif black > MAX_BLACK:
            problem = (
                f"{black:.0%} of its field is black (under a quarter of the field's median brightness), where retina "
                "is lit throughout: air, lungs or gas, as in a CT slice"
            )
        elif clipped > MAX_CLIPPED:
            problem = (
                f"{clipped:.0%} of its field is clipped at the image's full brightness ({top:g}), far more than an "
                "overexposed optic disc: bone, contrast or a narrow window, as in a CT slice"
            )
        elif rim > MAX_RIM_DEVIATION:
            problem = (
                f"the rim of its bright field is no circle (it strays {rim:.0%} of the radius from one; a fundus "
                "camera's field is a disc, cut or not by the image's edges): the outline of a body, as in a CT slice"
            )
        if problem:
            raise NotFundusError(f"is {kind}: {problem}.")
        self._check_vessels(array.mean(axis=0), mask, kind)

    @staticmethod
    def _check_vessels(vessel_channel: np.ndarray, mask: np.ndarray, kind: str) -> None:
        """Refuse an image that shows no dark thin structures (a smooth gradient, a blank image), or whose thin
        structures are mostly brighter than their surroundings: vessels are darker than the retina in any fundus
        photograph, colour or red-free, and brighter in a fluorescein angiogram or a negative. The model would give
        each a sparse or empty map that looks like an answer."""
        if _clipped_share(vessel_channel[mask], float(vessel_channel.max())) > MAX_GREEN_CLIPPED:
            return  # overexposed: EstimateFOVd.check_exposure names that, the cause of the missing vessels
        structures = _thin_structures(vessel_channel, mask)
        if structures is None:
            return
        dark, bright = (float(np.percentile(values, 90)) for values in structures[:2])
        level = max(abs(structures[2]), 1e-12)
        if dark <= MIN_VESSEL_CONTRAST * level:
            raise NotFundusError(
                f"is {kind}: it shows no vessels (its darkest thin structures reach {dark / level:.4f} "
                f"of its level; at least {MIN_VESSEL_CONTRAST} in fundus photographs, even blurred): a smooth or "
                "blank image, or a photograph blurred past recognition."
            )
        if bright > 0 and dark / bright < MIN_VESSEL_POLARITY:
            raise NotFundusError(
                f"is {kind}: its thin structures are brighter than their surroundings, not darker (dark over bright "
                f"{dark / bright:.2f}; vessels in fundus photographs make it {MIN_VESSEL_POLARITY} or more, 1.15 or "
                "more in whole ones): a fluorescein angiogram or a negative, whose vessels the model does not know."
            )


TOMOGRAPHY_MODALITIES = ("OPT",)
"""DICOM modalities the readers accept (an OCT B-scan, Ophthalmic Tomography) that are no fundus photograph; the
readers refuse CT and other radiology modalities themselves."""
GIVE_FOV = "Give its FOV mask (beside images/: a fov/ folder for training, a mask/ folder for inference)."
NOT_CHECKED = (
    "give its FOV mask (beside images/: a fov/ folder for training, a mask/ folder for inference), or run with "
    "--estimate_fov False (its whole image is then the field); neither checks what the image shows."
)


class EstimateFOVd(MapTransform):
    """Give every item a field-of-view mask at ``fov_key``: the given one (a mask file, already read), or one
    estimated from the photograph at ``keys`` (:class:`EstimateFOV`). ``<fov_key>_source`` records which, so the
    results say when the field was estimated (and the inference writes the estimated mask beside them). With
    ``estimate=False`` (photographs that are not fundus photographs) an item without a mask keeps none: its whole
    image is the field.

    Raises:
        DataError: naming the photograph, when no plausible field of view can be estimated, or when its green
            channel is clipped in more than ``MAX_GREEN_CLIPPED`` of the field (overexposed); naming the mask file,
            when a given one is empty, covers less than ``min_fraction`` of the image, or lies more than
            ``MAX_GIVEN_FOV_OUTSIDE`` outside the field found in its photograph (both only with ``estimate``).
    """

    def __init__(
        self,
        keys: KeysCollection,
        fov_key: str = "fov",
        working_size: int = 512,
        min_fraction: float = 0.2,
        estimate: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.fov_key, self.min_fraction = fov_key, min_fraction
        self.estimator = EstimateFOV(working_size=working_size, min_fraction=min_fraction) if estimate else None

    def check_given(self, fov: NdarrayOrTensor) -> None:
        """Refuse a given FOV mask that an estimate would not be accepted as: an empty one leaves nothing to segment
        or score (every metric of the image would be empty, every prediction masked away), and one under
        ``min_fraction`` of the image is no fundus field (an inverted or wrong mask, most likely)."""
        fraction = float((convert_to_numpy(fov) > 0).mean()) if np.size(fov) else 0.0
        if fraction >= self.min_fraction:
            return
        source = source_of(fov, self.fov_key)
        problem = "is empty" if fraction == 0 else f"covers only {fraction:.1%} of its image"
        raise DataError(
            source,
            f"FOV mask {problem} (at least {self.min_fraction:.0%} expected, as for an estimated field of view): "
            "it leaves no plausible field to segment; check that it is the right mask and not inverted.",
        )

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        if self.estimator is not None:  # fundus photographs: a file that says it is a tomogram is none
            for key in self.key_iterator(d):
                meta = d[key].meta if isinstance(d[key], MetaTensor) else {}
                if str(meta.get("modality") or "") in TOMOGRAPHY_MODALITIES:
                    raise DataError(
                        meta.get("filename_or_obj", key),
                        f"is a DICOM image of modality {meta['modality']} (a tomogram: an OCT B-scan), not a fundus "
                        "photograph.",
                    )
        if d.get(self.fov_key) is not None:
            self.check_given(d[self.fov_key])
            if self.estimator is not None:  # fundus photographs (estimate=False: other photographs, not judged)
                for key in self.key_iterator(d):
                    self.check_given_against(d[key], d[self.fov_key])
                    break
                self.check_exposure(d)
            d.setdefault(self.fov_key + FOV_SOURCE_SUFFIX, "given")
            return d
        if self.estimator is None:
            return d
        for key in self.key_iterator(d):
            image = d[key]
            try:
                mask = self.estimator(image)
            except NotFundusError as e:
                source = source_of(image, key)
                raise DataError(source, str(e), f"If it is a fundus photograph: {NOT_CHECKED}") from None
            except ValueError as e:
                source = source_of(image, key)
                raise DataError(source, f"field of view: {e}", GIVE_FOV) from None
            fov = torch.as_tensor(mask[None].astype(np.uint8))
            d[self.fov_key] = MetaTensor(fov, meta=dict(image.meta)) if isinstance(image, MetaTensor) else fov
            d[self.fov_key + FOV_SOURCE_SUFFIX] = "estimated"
            break  # one field per item, from its first photograph
        self.check_exposure(d)
        return d

    def check_given_against(self, image: NdarrayOrTensor, fov: NdarrayOrTensor) -> None:
        """Refuse a given FOV mask that is not this photograph's field: an inverted one (which ``check_given``
        misses when it covers more than ``min_fraction``), one shifted, or another camera's. The prediction is
        masked to it, so vessels would be drawn in the camera's frame and scored there. A mask inside the field (a
        region to segment or score) is kept. The check needs a field to compare with: a photograph whose field
        cannot be estimated (the reason a mask may be given) is not judged."""
        given = convert_to_numpy(fov) > 0
        given = given.reshape(given.shape[-2:])
        try:
            estimated = self.estimator(image)
        except ValueError:  # NotFundusError too: the given mask is what the user has for it
            return
        if estimated.shape != given.shape:
            return
        outside = float((given & ~estimated).sum() / max(int(given.sum()), 1))
        if outside <= MAX_GIVEN_FOV_OUTSIDE:
            return
        source = source_of(fov, self.fov_key)
        photograph = source_of(image, "it")
        raise DataError(
            source,
            f"FOV mask is not the field of view of {photograph}: {outside:.0%} of it lies outside the bright field "
            f"found in the photograph, in the camera's dark frame (at most {MAX_GIVEN_FOV_OUTSIDE:.0%} expected; "
            "DRIVE's masks: 1 %). Inverted, shifted or another photograph's?",
            "Give this photograph's own mask, or none (the field is then estimated from the photograph); "
            "--estimate_fov False takes given masks as they are.",
        )

    def check_exposure(self, d: Mapping[Hashable, NdarrayOrTensor]) -> None:
        """Refuse an overexposed photograph: where its green channel is clipped at full scale, vessels cannot be
        seen, and the vessel map comes out thin or empty while it looks normal (one line naming the file)."""
        fov = d.get(self.fov_key)
        for key in self.key_iterator(d):
            image = d[key]
            array = convert_to_numpy(image)
            if array.ndim != 3 or array.shape[0] not in (3, 4):
                continue  # grey images are judged by EstimateFOV._check_fundus, with their other limits
            green = array[1].astype(np.float32, copy=False)
            field = np.ones(green.shape, bool) if fov is None else convert_to_numpy(fov) > 0
            if field.size != green.size:
                continue  # a mask of another size is refused where it is paired with its photograph
            field = field.reshape(green.shape)
            if not field.any():
                continue
            top = float(array[:3].max())
            full_scale, clipped = _full_scale(top), _clipped_share(green[field], top)
            if clipped > MAX_GREEN_CLIPPED:
                source = source_of(image, key)
                raise DataError(
                    source,
                    f"is overexposed: {clipped:.0%} of its green channel inside the field of view is clipped at full "
                    f"brightness ({full_scale:g}), where vessels cannot be seen (DRIVE's and CHASE_DB1's photographs: "
                    f"under 1 %; at most {MAX_GREEN_CLIPPED:.0%} is accepted).",
                    "Export the photograph again from the camera without brightening it.",
                )


def fov_diameter(fov: NdarrayOrTensor) -> float | None:
    """The diameter in pixels of the field-of-view disc: the circle through its round rim, so a disc cut by the
    camera or a crop, at the top and bottom or on every side, still measures its full width. A rim that is no
    circle (an irregular field) falls back to the longer side of the bounding box. None for a field that fills the
    whole image (a frameless crop), whose disc, and so whose scale, cannot be seen."""
    mask = convert_to_numpy(fov).reshape(convert_to_numpy(fov).shape[-2:]) > 0
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0 or mask.all():
        return None
    box = float(max(rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1))
    circle = _rim_circle(mask)
    if circle is None:
        return box
    radius, spread = circle
    diameter = 2 * radius + 1  # edge pixel centre to edge pixel centre, plus the pixel
    if radius == 0 or spread > 0.02 * radius or diameter < 0.97 * box:
        return box
    return diameter


class ScaleToFOVd(MapTransform, InvertibleTransform):
    """Resample every key so the field-of-view disc is ``diameter`` pixels across, the scale the network learnt.

    Cameras differ in resolution far more than retinas in size: the disc of a DRIVE photograph is about 538 pixels
    across, that of a CHASE_DB1 photograph about 920, so its vessels are 1.7 times wider in pixels than any the
    network saw. Resampling by the disc brings them back to the learnt calibre. A smaller disc (a low-resolution
    camera, a downsized export) is enlarged for the same reason: the network finds vessels of the calibre it learnt.
    DRIVE's validation photographs downsized to half their size, segmented at that size, scored F1 0.75 (0.81 at
    full size), at 0.3 of it 0.65; enlarged to the learnt disc, 0.80 and 0.75 (the vessels README). A disc within
    ``tolerance`` of ``diameter`` is left untouched (no resampling of data at its native scale), as is a field with
    no visible disc. Invertible: ``Invertd`` brings predictions back to the photograph's own grid. The factor is
    kept in the metadata (``fov_scale``) for the results.

    Args:
        keys: the photograph, its FOV mask and labels.
        fov_key: the FOV mask that gives the scale (given or estimated: :class:`EstimateFOVd` first).
        diameter: the disc diameter in pixels to resample to.
        mode: per key, ``"bilinear"`` (images, probabilities) or ``"nearest"`` (masks, labels).
        tolerance: relative difference of the diameter below which nothing is resampled.
        upscale: enlarge photographs whose disc is smaller than ``diameter`` (default); ``False`` segments them at
            their own scale.
        max_upscale: refuse a photograph whose disc would be enlarged more than this many times (a thumbnail, a
            preview), rather than write a vessel map that looks like an answer: below a quarter of the learnt disc
            its capillaries are under a pixel wide, and the map comes out thin or empty. DRIVE's validation
            photographs downsized and enlarged back (``pipelines/benchmarks/vessels_scales.py``): F1 0.81 at full
            size, 0.728 enlarged 4 times, 0.671 at 5; thumbnails enlarged 8 to 16 times 0.00 to 0.11. Inference
            sets 4. ``None``: no bound (training and evaluation, whose labels show what is lost).
        max_pixels: refuse a photograph that enlarged would have more pixels than this, rather than run out of
            memory on it. A safety net: a field covers at least a fifth of its image (:class:`EstimateFOVd`'s
            ``min_fraction``), so an enlarged photograph has at most about 1.1 million pixels at the default
            ``diameter``; a lower ``min_fraction`` or a larger ``diameter`` lifts that bound.
        enabled: ``False`` leaves every photograph at its own scale (and ``inverse`` changes nothing).

    Raises:
        DataError: naming the photograph, when its disc would be enlarged more than ``max_upscale`` times, or
            enlarged it would exceed ``max_pixels``.
    """

    def __init__(
        self,
        keys: KeysCollection,
        fov_key: str = "fov",
        diameter: float = 538.0,
        mode: Sequence[str] | str = "bilinear",
        tolerance: float = 0.1,
        upscale: bool = True,
        max_upscale: AtLeastOne | None = None,
        max_pixels: int | None = MAX_PIXELS,
        enabled: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.fov_key, self.diameter, self.tolerance = fov_key, float(diameter), tolerance
        self.upscale, self.max_upscale, self.max_pixels, self.enabled = upscale, max_upscale, max_pixels, enabled
        self.mode = ensure_tuple_rep(mode, len(self.keys))

    def factor(self, data: Mapping[Hashable, NdarrayOrTensor]) -> float:
        fov = data.get(self.fov_key)
        measured = fov_diameter(fov) if fov is not None else None
        if measured is None or abs(self.diameter / measured - 1.0) <= self.tolerance:
            return 1.0
        if measured < self.diameter and not self.upscale:
            return 1.0
        return self.diameter / measured

    @staticmethod
    def _resample(image: torch.Tensor, size: Sequence[int], mode: str) -> torch.Tensor:
        values = image.as_subclass(torch.Tensor) if isinstance(image, MetaTensor) else torch.as_tensor(image)
        # "nearest-exact" samples pixel centres, as bilinear does: masks stay aligned with the image
        resized = torch.nn.functional.interpolate(
            values[None].float(),
            size=tuple(size),
            mode="nearest-exact" if mode == "nearest" else mode,
            **({} if mode == "nearest" else {"antialias": True}),
        )[0]
        return resized.to(values.dtype) if mode == "nearest" else resized

    def __call__(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        if not self.enabled:
            return d
        factor = self.factor(d)
        self._check_enlarged_size(d, factor)
        for key, mode in self.key_iterator(d, self.mode):
            image = d[key] if isinstance(d[key], MetaTensor) else MetaTensor(torch.as_tensor(d[key]))
            size = list(image.shape[1:])
            original_affine = image.affine.clone()
            if factor != 1.0:
                target = [max(1, round(n * factor)) for n in size]
                resized = MetaTensor(self._resample(image, target, mode), meta=dict(image.meta))
                resized.applied_operations = list(image.applied_operations)
                affine = original_affine.clone()
                for axis in range(2):  # each pixel now covers orig / new of a source pixel, centres kept aligned
                    step = size[axis] / target[axis]
                    affine[:, -1] += affine[:, axis] * (step - 1) / 2  # 3 x 3 (2D readers) or 4 x 4
                    affine[:, axis] = affine[:, axis] * step
                resized.affine = affine
                image = resized
            image.meta["fov_scale"] = factor
            extra = {"mode": mode, "factor": factor, "affine": original_affine.tolist()}
            self.push_transform(image, orig_size=size, extra_info=extra)
            d[key] = image
        return d

    def _check_enlarged_size(self, data: Mapping[Hashable, NdarrayOrTensor], factor: float) -> None:
        if factor <= 1.0:
            return
        for key in self.key_iterator(data):
            image = data[key]
            if self.max_upscale is not None and factor > self.max_upscale:
                raise DataError(
                    str(source_of(image, key)),
                    f"is too small to segment: its field of view is {self.diameter / factor:.0f} pixels across, and "
                    f"enlarged {factor:.2f} times to the {self.diameter:g}-pixel disc the network learnt (over "
                    f"max_upscale, {self.max_upscale:g}) its narrow vessels are lost and the map comes out thin or "
                    f"empty (a thumbnail or a downsized export?).",
                    f"Segment the full-resolution photograph; --max_upscale {math.ceil(factor)} segments this one "
                    "anyway.",
                )
            if self.max_pixels is None:
                continue
            size = [max(1, round(n * factor)) for n in image.shape[1:]]
            if size[0] * size[1] > self.max_pixels:
                source = source_of(image, key)
                raise DataError(
                    str(source),
                    f"its field of view is {self.diameter / factor:.0f} pixels across in a {image.shape[-2]} x "
                    f"{image.shape[-1]} image: enlarged {factor:.1f} times to the {self.diameter:g}-pixel disc the "
                    f"network learnt, it would be {size[0]} x {size[1]} pixels, over max_pixels ({self.max_pixels}).",
                    "Crop the photograph to its field of view, or raise max_pixels.",
                )

    def inverse(self, data: Mapping[Hashable, NdarrayOrTensor]) -> dict[Hashable, NdarrayOrTensor]:
        d = dict(data)
        if not self.enabled:
            return d
        for key in self.key_iterator(d):
            record = self.pop_transform(d[key])
            image = d[key]
            if record[TraceKeys.EXTRA_INFO]["factor"] != 1.0:
                mode = record[TraceKeys.EXTRA_INFO]["mode"]
                restored = MetaTensor(self._resample(image, record[TraceKeys.ORIG_SIZE], mode), meta=dict(image.meta))
                restored.applied_operations = list(image.applied_operations)
                restored.affine = torch.as_tensor(record[TraceKeys.EXTRA_INFO]["affine"], dtype=torch.float64)
                image = restored
            d[key] = image
        return d
