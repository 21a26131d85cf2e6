"""What an image must be to be segmented as an OCT B-scan: large enough to hold retinal layers, not blank, grey (not
a photograph), on the display (log-compressed) intensity scale, and not mostly padding; and what one of its pixels
measures, where the file records it.

Inference resamples every image to the network's input size, so a 2 x 2 thumbnail or a blank (uniform) page would
come out as a plausible layer map with plausible thicknesses in its JSON: both are refused instead, naming the file.
So are two inputs whose layer maps come out wrong without looking it: a B-scan stored in linear intensity (a raw
export: the network learnt the log-compressed display scale every scanner shows), and one with tall uniform bands
above and below it (padded to a square or to a page): resized for the network with them, its retina reaches the
model thinner than any it learnt, and its layer thicknesses are off. The oct_layers inference cuts such bands off
instead (:class:`clinseg.transforms.oct.FrameRetinad`), and checks them here only with its framing off. The size is
checked from the header when the inputs are listed (:func:`check_bscan_size`), the content once decoded
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
from clinseg.datasets.value_types import PositiveFloat, Probability

MIN_BSCAN_SIZE = 32
"""The fewest rows and columns of a B-scan: twice the down-sampling of the default network (16), and far below any
scanner's B-scan (hundreds of pixels each way); anything smaller is a thumbnail, an icon or a strip."""

MAX_PADDING_FRACTION = 0.2
"""The largest share of a B-scan's rows that uniform bands at its top and bottom may take. Resizing to the network's
input scales the retina by the rows of the whole image: on the phantom model, bands of 13 % of the rows leave the
Dice at 0.92 (0.93 without), 25 % lower it to 0.90 and 32 % to 0.78 with thicknesses off by half."""

MIN_FLOOR_LEVEL = 0.01
"""The lowest median, as a fraction of the image's 0.5-99.5 percentile range, of the pixels above its darkest value.
On the display scale the speckle of vitreous and choroid sits well above black (0.04-0.11 on the phantom, the NR206
sample and a jet colour map); in linear intensity (the display's 4th power, or 10 to its power over 40 dB) nearly
every pixel lies within 0.1 % of black and only the brightest layers show."""

MAX_COLOUR_FRACTION = 0.1
"""The largest share of an image's pixels that may have a colour (:data:`clinseg.datasets.readers.COLOUR_CHROMA`).
B-scans are grey; a screenshot's coloured lines and labels take a few percent. A fundus photograph (69 % of DRIVE's
21_training) or a colour-mapped B-scan (a jet map: every pixel) read as luminance passes every other check and comes
out as a layer map with plausible thicknesses: the phantom model gives a DRIVE photograph an NFL of 30 px, and a jet
map's luminance, which is not monotonic in the signal, moves the ISE from 4.1 to 5.9 px."""

PHOTOGRAPH_MODALITIES = {"OP": "ophthalmic photography", "XC": "external-camera photography"}
"""DICOM modalities that say an image is a photograph, not a tomogram: a fundus or anterior-segment photograph."""

PIXEL_SIZE_TOLERANCE = 0.02
"""How far (relative) a given ``pixel_size_um`` may differ from a file's own row spacing: a rounded value passes
(3.9 for Spectralis' 3.87 um), another scanner's does not."""


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


def padding_rows(image: np.ndarray) -> tuple[int, int]:
    """How many rows at the top and at the bottom of a ``(rows, cols)`` image are uniform (every pixel one value):
    padding, not scan (speckle leaves no row of a B-scan uniform)."""
    uniform = (image == image[:, :1]).all(axis=1)
    if uniform.all():
        return len(uniform), 0
    return int(np.argmin(uniform)), int(np.argmin(uniform[::-1]))


def floor_level(image: np.ndarray) -> float | None:
    """The median of the pixels above the darkest value, as a fraction of the 0.5-99.5 percentile range (the range
    the bundle scales to [0, 1]); None when that range is empty."""
    low, high = np.percentile(image, [0.5, 99.5])
    above = image[image > image.min()]
    if high <= low or not above.size:
        return None
    return float((np.median(above) - low) / (high - low))


class RequireBScand(MapTransform):
    """Refuse, naming the file, an image at ``keys`` that cannot be segmented as an OCT B-scan: fewer than
    ``min_size`` rows or columns (:func:`check_bscan_size`); uniform (one value throughout: a blank or failed export,
    with no retina); uniform bands at its top and bottom over more than ``max_padding_fraction`` of its rows
    (:data:`MAX_PADDING_FRACTION`; crop them off); or its pixels above black with a median below ``min_floor_level``
    of its range (:data:`MIN_FLOOR_LEVEL`: linear intensity; convert it to the log scale the scanner displays); in
    colour over more than ``max_colour_fraction`` of its pixels (:data:`MAX_COLOUR_FRACTION`: a photograph or a
    colour-mapped B-scan, whose luminance is not the scan's signal) or a DICOM photograph
    (:data:`PHOTOGRAPH_MODALITIES`). ``None`` turns any of the padding, scale and photograph checks off (a task on
    grey images of another kind than B-scans).

    The micrometres of a pixel along the A-scan (between rows, what a layer's thickness is counted in) are recorded
    as ``pixel_size_um`` in the image's metadata: a DICOM B-scan's own (its PixelSpacing, or its frame's in an OCT
    volume) where it has one, else ``pixel_size_um`` as given. A given value that contradicts a file's own by more
    than :data:`PIXEL_SIZE_TOLERANCE` is refused naming the file: one of them is wrong, and its micrometres would be.
    """

    def __init__(
        self,
        keys: KeysCollection,
        min_size: int = MIN_BSCAN_SIZE,
        max_padding_fraction: Probability | None = MAX_PADDING_FRACTION,
        min_floor_level: Probability | None = MIN_FLOOR_LEVEL,
        max_colour_fraction: Probability | None = MAX_COLOUR_FRACTION,
        pixel_size_um: PositiveFloat | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.min_size = min_size
        self.max_padding_fraction = max_padding_fraction
        self.min_floor_level = min_floor_level
        self.max_colour_fraction = max_colour_fraction
        self.pixel_size_um = pixel_size_um

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            source = str(image.meta.get("filename_or_obj", key)) if isinstance(image, MetaTensor) else str(key)
            check_bscan_size(source, np.shape(image), self.min_size)
            meta = image.meta if isinstance(image, MetaTensor) else {}
            self._check_kind(source, meta)
            array = convert_to_numpy(image)
            if array.size and float(array.min()) == float(array.max()):
                raise DataError(
                    source,
                    f"is uniform (every pixel {float(array.min()):g}): a blank image holds no retina to segment.",
                )
            grey = array.reshape(-1, *array.shape[-2:]).mean(axis=0) if array.ndim > 2 else array
            self._check_padding(source, grey)
            self._check_scale(source, grey)
            pixel_size = self._pixel_size(source, meta)
            if pixel_size is not None and isinstance(image, MetaTensor):
                image.meta["pixel_size_um"] = pixel_size
        return d

    def _check_kind(self, source: str, meta: Mapping) -> None:
        if self.max_colour_fraction is None:
            return
        modality = str(meta.get("modality") or "")
        if modality in PHOTOGRAPH_MODALITIES:
            raise DataError(
                source,
                f"is a DICOM image of modality {modality} ({PHOTOGRAPH_MODALITIES[modality]}), a photograph, not an "
                "OCT B-scan (Ophthalmic Tomography, OPT).",
            )
        colour = meta.get("colour_fraction")
        if colour is not None and colour > self.max_colour_fraction:
            raise DataError(
                source,
                f"is a colour image ({colour:.0%} of its pixels coloured, at most {self.max_colour_fraction:.0%} "
                "expected): a photograph or a colour-mapped B-scan, whose luminance is not the scan's signal; "
                "export the B-scan in grey.",
            )

    def _pixel_size(self, source: str, meta: Mapping) -> float | None:
        spacing = meta.get("pixel_spacing_um")
        own = None if spacing is None else float(spacing[0])
        if own is not None and self.pixel_size_um is not None:
            if abs(self.pixel_size_um - own) > PIXEL_SIZE_TOLERANCE * own:
                raise DataError(
                    source,
                    f"records {own:.4g} um between its rows (its PixelSpacing) but pixel_size_um is "
                    f"{self.pixel_size_um:g}: one of them is wrong, and its thicknesses in micrometres would be off "
                    f"by {self.pixel_size_um / own:.2f} times; leave pixel_size_um unset to use each file's own.",
                )
        return own if own is not None else self.pixel_size_um

    def _check_padding(self, source: str, grey: np.ndarray) -> None:
        if self.max_padding_fraction is None:
            return
        top, bottom = padding_rows(grey)
        rows = grey.shape[0]
        if top + bottom > self.max_padding_fraction * rows:
            raise DataError(
                source,
                f"has uniform bands over {top + bottom} of its {rows} rows ({top} at the top, {bottom} at the bottom; "
                f"at most {self.max_padding_fraction:.0%} expected): padding, which would shrink its retina when it "
                "is resized for the network and make its layer thicknesses wrong; crop the bands off.",
            )

    def _check_scale(self, source: str, grey: np.ndarray) -> None:
        if self.min_floor_level is None:
            return
        level = floor_level(grey)
        if level is not None and level < self.min_floor_level:
            raise DataError(
                source,
                f"looks like linear intensity, not the log-compressed display scale of a B-scan: half of its pixels "
                f"above black lie within {level * 100:.2g} % of its intensity range (at least "
                f"{self.min_floor_level:.0%} expected); convert it to the scanner's display (log) scale.",
            )
