"""What a CT's field of view holds, and whether a heart segmentation agrees with it.

A heart segmenter sees a patch of grey values; it cannot know that a bright liver dome in an abdominal scan is not
a heart. This module measures the anatomy around the prediction, independently of the network, so that a result
contradicting it is flagged or removed instead of being reported as a plausible volume:

- :func:`measure_field_of_view` finds the body (the convex hull of soft tissue in each axial slice, so a field of
  view that cuts the body still has one) and the lungs inside it (aerated parenchyma, -950 to -500 HU after a
  small mean filter: pure gas, outside air and bowel gas read lower, soft tissue higher). An axial slice is
  *thoracic* when lungs fill at least ``THORACIC_LUNG_FRACTION`` of its body area; the lowest thoracic slice is the
  lung base, the diaphragm's level.
- The verdict: ``field_of_view`` is ``chest`` (thoracic slices throughout or below a thin abdominal strip),
  ``chest_abdomen`` (a long thorax over a long abdomen), ``upper_abdomen`` (lung bases at the top of an abdominal
  field), ``abdomen`` (no lungs: nothing of the heart can be there), ``other`` (no lungs and a body smaller than a
  torso: a head, a neck, limbs) or ``unknown`` (no body found, or a field of view inside the body: below); and
  ``heart_expected`` is ``whole``, ``partial`` (an upper-abdominal field, or a slab thinner than a heart) or
  ``none``.
- A slice none of whose corners is air shows no outline of the body: the field lies inside it (a crop around an
  organ), and lungs just outside the field cannot be told from none. Such a slice without lungs is *undetermined*:
  it moves the lung base below it, and a field mostly of them without a thoracic slice is ``unknown``, so a crop
  around a heart does not lose its heart to a verdict of "no lungs".
- A scanner's padding outside its reconstruction circle (one constant filling the slices' corners) reads as air
  whatever its value, 0 HU included (recorded as ``padding_hu``): as tissue it would be a body filling the square.
- :class:`RemoveHeartOutsideAnatomyd` (before keeping the largest component) removes heart voxels where no heart
  can be: everything when ``heart_expected`` is ``none``, and what lies below the lung bases.
- :class:`CheckHeartAnatomyd` (on the final mask) flags a heart cut by the field of view, a heart outside the
  lungs' lateral extent and an implausible volume; it decides whether a volume may be reported.

The verdict travels with the sample as a JSON string under ``anatomy_key`` (strings pass MONAI's collation and
decollation unchanged) and ends in the results JSON. The measures are in millimetres and millilitres, so they do
not depend on the voxel grid. Anatomical landmarks are only as good as these thresholds: the flags say which rule
fired, so a reader can check it on the pictures.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage

from clinseg.datasets.ct.volumes import voxel_volume_ml

logger = logging.getLogger(__name__)

# soft tissue and bone; a convex hull of it per axial slice is the body even when the field of view cuts it
TISSUE_MIN_HU = -300.0
# aerated lung after a 3-voxel mean filter; pure gas (outside air, bowel, stomach) reads below the lower bound
LUNG_HU_RANGE = (-950.0, -500.0)
LUNG_MIN_COMPONENT_ML = 30.0  # smaller aerated pockets are partial-volume edges of bowel gas
THORACIC_LUNG_FRACTION = 0.08  # lungs fill 10-60 % of a thoracic slice's body area; bowel gas edges about 2 %
MIN_BODY_AREA_CM2 = 50.0
TORSO_AREA_CM2 = 300.0  # an adult abdomen's cross-section is 400-900 cm2; a head's or a limb's is smaller
NO_LUNG_ML = 20.0  # below this, the field holds no lung and therefore no heart
HEART_SPAN_MM = 100.0  # a slab thinner than this cannot hold a whole adult heart (about 12 cm long)
UPPER_ABDOMEN_MM = 60.0  # this much of the field below the lung bases makes it abdominal
DIAPHRAGM_MARGIN_MM = 10.0  # the heart rests on the diaphragm; it never reaches below the lung bases
HEART_VOLUME_RANGE_ML = (150.0, 1500.0)  # outside it, a whole adult heart is implausible
LATERAL_MARGIN_MM = 20.0
# A body's cross-section is round and an image square, so a slice that shows the body's outline has outside air in
# at least one corner (or the scanner's padding, lower still). A slice whose four corners (this fraction of each
# side) are all tissue or lung lies inside the body (a crop around an organ): lungs just outside its field cannot
# be told from their absence there. A corner is air when a fifth of its voxels are below the lungs' range (a field
# fitted tightly to the body leaves only a small triangle of air in its corners; aerated lung has few such voxels).
CORNER_FRACTION = 0.1
AIR_CORNER_SHARE = 0.2
# Outside its reconstruction circle (or outside the body, after an anonymiser or a resampling) a scanner writes one
# constant: usually -1024, -2048 or -3024 HU, which read as air, but also 0 HU (a resampling's default fill), which
# would read as soft tissue: a body filling the whole square and no outline of it. Such padding is one value in most
# of the slices' corner voxels (measured noise never is), joined to the slices' edges and filling over 1 % of the
# volume (as in ``clinseg.datasets.ct.volumes``); it is read as the air it replaces.
PADDING_CORNER_SHARE = 0.5
PADDING_MIN_FRACTION = 0.01
PADDING_TOLERANCE_HU = 0.5  # interpolation (a resampling to the network's spacing) moves a constant by rounding only
AIR_HU = -1024.0
OUTSIDE_TOLERANCE_ML = 1.0  # less than this outside the anatomy (a few boundary voxels) is removed but not flagged

FIELDS_OF_VIEW = ("chest", "chest_abdomen", "upper_abdomen", "abdomen", "other", "unknown")
HEART_EXPECTED = ("whole", "partial", "none", "unknown")


@dataclass
class FieldOfView:
    """The anatomy measured in one CT, in world (RAS) millimetres."""

    field_of_view: str
    heart_expected: str
    reasons: list[str]
    slab_mm: float
    body_found: bool
    lung_ml: float
    thoracic_mm: float
    lung_base_z_mm: float | None = None  # superior coordinate of the lowest thoracic slice
    lung_top_z_mm: float | None = None
    lung_x_range_mm: list[float] | None = None  # lateral (R+) extent of the lungs
    padding_hu: float | None = None  # the constant outside the reconstruction circle, read as air, when not air
    flags: list[str] = field(default_factory=list)
    outside_anatomy_ml: dict[str, float] = field(default_factory=dict)  # predicted heart where none can be, by rule
    constraints_applied: bool | None = None  # whether that part was removed (the default) or only flagged
    volume_reportable: bool = True

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> FieldOfView:
        return cls(**json.loads(text))


def _superior_axis(affine: np.ndarray) -> tuple[int, float]:
    """The voxel axis closest to the patient's superior direction, and the sign along it."""
    axis = int(np.argmax(np.abs(affine[2, :3])))
    return axis, float(np.sign(affine[2, axis]) or 1.0)


def world_coordinates(affine: np.ndarray, shape, axis: int) -> np.ndarray:
    """World coordinate ``axis`` (0 = R, 1 = A, 2 = S) of every voxel of a grid."""
    a = np.asarray(affine, dtype=np.float64)
    grids = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij", sparse=True)
    return sum(np.float32(a[axis, d]) * grids[d] for d in range(3)) + np.float32(a[axis, 3])


def _body_hull(hu: np.ndarray, superior: int, spacing: np.ndarray) -> np.ndarray:
    from skimage.morphology import convex_hull_image

    in_plane = [d for d in range(3) if d != superior]
    tissue = hu > TISSUE_MIN_HU
    radius = max(1, int(round(2.0 / float(min(spacing[in_plane])))))
    structure = np.moveaxis(np.ones((3, 3, 1), dtype=bool), 2, superior)
    tissue = ndimage.binary_opening(tissue, structure=structure, iterations=radius)
    labels, count = ndimage.label(tissue)
    if count == 0:
        return np.zeros_like(tissue)
    tissue = labels == (int(np.argmax(np.bincount(labels.ravel())[1:])) + 1)  # the body, not the table
    hull = np.zeros_like(tissue)
    for k in range(hu.shape[superior]):
        index = tuple(k if d == superior else slice(None) for d in range(3))
        if tissue[index].sum() >= 20:
            hull[index] = convex_hull_image(tissue[index])
    return ndimage.binary_erosion(hull, structure=structure, iterations=radius)  # off the skin's partial volume


def _no_outline(hu: np.ndarray, superior: int) -> np.ndarray:
    """Which axial slices show no outline of the body: none of their four corners is air (see ``CORNER_FRACTION``)."""
    planes = np.moveaxis(hu, superior, 0)
    rows, cols = (max(2, int(round(n * CORNER_FRACTION))) for n in planes.shape[1:])
    corners = [
        planes[:, r, c] for r in (slice(0, rows), slice(-rows, None)) for c in (slice(0, cols), slice(-cols, None))
    ]
    air = [(corner < LUNG_HU_RANGE[0]).mean(axis=(1, 2)) >= AIR_CORNER_SHARE for corner in corners]
    return ~np.any(air, axis=0)


def _padding(hu: np.ndarray, superior: int) -> tuple[float | None, np.ndarray | None]:
    """The scanner's padding where it would not read as air (see ``PADDING_CORNER_SHARE``): its value and where it
    lies, or ``(None, None)``. The rim that interpolation blends between padding and image is left as it is: thin, it
    is no body (the hull's opening) and no lung (the lungs' opening), as it is beside padding of -1024."""
    planes = np.moveaxis(hu, superior, 0)
    rows, cols = (max(2, int(round(n * CORNER_FRACTION))) for n in planes.shape[1:])
    corners = np.concatenate(
        [
            planes[:, r, c].ravel()
            for r in (slice(0, rows), slice(-rows, None))
            for c in (slice(0, cols), slice(-cols, None))
        ]
    )
    values, counts = np.unique(np.round(corners), return_counts=True)
    value = float(values[np.argmax(counts)])
    if counts.max() < PADDING_CORNER_SHARE * corners.size or value < LUNG_HU_RANGE[0]:
        return None, None  # no constant in the corners, or one that reads as air already
    constant = np.abs(planes - value) <= PADDING_TOLERANCE_HU
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    labels, _ = ndimage.label(constant, structure=in_plane)
    edges = np.concatenate(
        [labels[:, 0].ravel(), labels[:, -1].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]
    )
    padding = np.isin(labels, np.unique(edges[edges > 0]))
    if padding.mean() < PADDING_MIN_FRACTION:
        return None, None
    return value, np.moveaxis(padding, 0, superior)


def measure_field_of_view(hu: np.ndarray, affine: np.ndarray) -> tuple[FieldOfView, np.ndarray]:
    """The field-of-view verdict of a HU volume ``[i, j, k]`` with its voxel-to-RAS affine, and the lung mask."""
    hu = np.asarray(hu, dtype=np.float32)
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    voxel_ml = voxel_volume_ml(affine)
    superior, sign = _superior_axis(affine)
    in_plane = tuple(d for d in range(3) if d != superior)
    slab_mm = float(hu.shape[superior] * spacing[superior])
    slice_z = affine[2, superior] * np.arange(hu.shape[superior]) + affine[2, 3]  # superior mm of each slice
    slice_z = slice_z + sum(affine[2, d] * (hu.shape[d] - 1) / 2 for d in in_plane)
    padding_hu, padding = _padding(hu, superior)
    if padding is not None:
        hu = np.where(padding, np.float32(AIR_HU), hu)

    hull = _body_hull(hu, superior, spacing)
    pixel_cm2 = float(np.prod(spacing[list(in_plane)])) / 100.0
    body_area_cm2 = hull.sum(axis=in_plane) * pixel_cm2
    if body_area_cm2.max(initial=0.0) < MIN_BODY_AREA_CM2:
        verdict = FieldOfView("unknown", "unknown", ["no body found in the field of view"], slab_mm, False, 0.0, 0.0)
        verdict.volume_reportable = False
        verdict.padding_hu = padding_hu
        return verdict, np.zeros(hu.shape, dtype=bool)

    smoothed = ndimage.uniform_filter(hu, 3)
    enclosed = _no_outline(hu, superior)
    lung = (smoothed > LUNG_HU_RANGE[0]) & (smoothed < LUNG_HU_RANGE[1]) & hull
    if float(min(spacing)) <= 3.0:
        lung = ndimage.binary_opening(lung)
    labels, count = ndimage.label(lung)
    sizes_ml = np.bincount(labels.ravel())[1:] * voxel_ml
    lung = np.isin(labels, np.flatnonzero(sizes_ml >= LUNG_MIN_COMPONENT_ML) + 1)
    lung_ml = float(lung.sum()) * voxel_ml
    lung_area_cm2 = lung.sum(axis=in_plane) * pixel_cm2
    thoracic = (lung_area_cm2 >= THORACIC_LUNG_FRACTION * np.maximum(body_area_cm2, 1e-6)) & (
        body_area_cm2 >= MIN_BODY_AREA_CM2
    )
    thoracic_mm = float(thoracic.sum() * spacing[superior])
    has_body = body_area_cm2 >= MIN_BODY_AREA_CM2
    # a slice without lungs inside a field that lies inside the body may have them just outside the field: it is
    # neither thoracic nor abdominal, and no verdict that removes a heart rests on it
    undetermined = enclosed & has_body & ~thoracic
    if lung_ml < NO_LUNG_ML or not thoracic.any():
        if undetermined.sum() >= 0.5 * has_body.sum():
            fov, expected = "unknown", "unknown"
            reasons = [
                f"the field of view lies inside the body on {int(undetermined.sum())} of {int(has_body.sum())} "
                "slices (no outline of the body): lungs just outside it cannot be told from none, so whether a "
                "heart can be there is unknown"
            ]
        else:
            torso = float(np.median(body_area_cm2[has_body])) >= TORSO_AREA_CM2
            fov, expected = ("abdomen" if torso else "other"), "none"
            reasons = [
                f"no thoracic slice in the field of view (lungs fill less than {THORACIC_LUNG_FRACTION:.0%} of every "
                f"axial slice; {lung_ml:.0f} mL of aerated lung in all): the heart lies between the lungs"
            ] + ([] if torso else [f"the body's cross-section is under {TORSO_AREA_CM2:.0f} cm2: not a torso"])
        verdict = FieldOfView(fov, expected, reasons, slab_mm, True, round(lung_ml, 1), thoracic_mm)
        verdict.volume_reportable = False
        verdict.padding_hu = padding_hu
        return verdict, lung

    z_thoracic = slice_z[thoracic]
    base_z, top_z = float(z_thoracic.min()), float(z_thoracic.max())
    # the lung bases may lie lower, outside the field, where the slices below the lowest thoracic one are
    # undetermined: the diaphragm is placed at the lowest of those joined to it, so nothing above it is removed
    by_height = np.argsort(-slice_z)
    lowest = int(np.flatnonzero(thoracic[by_height]).max())
    for k in by_height[lowest + 1 :]:
        if not undetermined[k]:
            break
        base_z = float(slice_z[k])
    bottom_z, roof_z = float(slice_z.min()), float(slice_z.max())
    below_mm = base_z - bottom_z
    lung_x = world_coordinates(affine, hu.shape, 0)
    lung_x = np.broadcast_to(lung_x, hu.shape)[lung]
    reasons = []
    if below_mm >= UPPER_ABDOMEN_MM and thoracic_mm < HEART_SPAN_MM:
        fov, expected = "upper_abdomen", "partial"
        reasons.append(
            f"lung bases in the top {thoracic_mm:.0f} mm over {below_mm:.0f} mm of abdomen: at most the heart's "
            "inferior part can be in the field"
        )
    elif below_mm >= UPPER_ABDOMEN_MM:
        fov, expected = "chest_abdomen", "whole"
        reasons.append(f"{thoracic_mm:.0f} mm of thorax over {below_mm:.0f} mm of abdomen")
    else:
        fov, expected = "chest", "whole"
        reasons.append(f"lungs in {thoracic_mm:.0f} mm of a {slab_mm:.0f} mm slab")
    if expected == "whole" and min(slab_mm, roof_z - base_z + DIAPHRAGM_MARGIN_MM) < HEART_SPAN_MM:
        expected = "partial"
        reasons.append(f"the slab above the diaphragm is thinner than a heart ({HEART_SPAN_MM:.0f} mm)")
    verdict = FieldOfView(
        fov,
        expected,
        reasons,
        slab_mm,
        True,
        round(lung_ml, 1),
        thoracic_mm,
        lung_base_z_mm=round(base_z, 2),
        lung_top_z_mm=round(top_z, 2),
        lung_x_range_mm=[round(float(lung_x.min()), 2), round(float(lung_x.max()), 2)],
        padding_hu=padding_hu,
    )
    verdict.volume_reportable = expected == "whole"
    return verdict, lung


class CTFieldOfViewd(MapTransform):
    """Measure the field of view of the HU image ``keys`` (before any windowing) and store the verdict as JSON
    under ``anatomy_key``. With ``label_key``, a reference heart that contradicts the anatomy (present where none
    can be, or below the lung bases) is logged as a warning naming the case: a label to check, not to learn."""

    def __init__(
        self,
        keys: KeysCollection,
        anatomy_key: str = "anatomy",
        label_key: str | None = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.anatomy_key, self.label_key = anatomy_key, label_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            hu = np.asarray(image[0] if image.ndim == 4 else image, dtype=np.float32)
            affine = np.asarray(image.affine, dtype=np.float64)
            verdict, _ = measure_field_of_view(hu, affine)
            label = d.get(self.label_key) if self.label_key else None
            if label is not None:
                problem = _heart_contradiction(np.asarray(label[0] if label.ndim == 4 else label) > 0, affine, verdict)
                if problem:
                    logger.warning(f"{_source(image)}: the reference heart {problem}")
            d[self.anatomy_key] = verdict.to_json()
        return d


def _source(image) -> str:
    meta = getattr(image, "meta", {}) or {}
    return str(meta.get("filename_or_obj", "volume"))


def _below_diaphragm(mask: np.ndarray, affine: np.ndarray, verdict: FieldOfView) -> np.ndarray:
    if verdict.lung_base_z_mm is None:
        return np.zeros_like(mask)
    z = world_coordinates(affine, mask.shape, 2)
    return mask & (z < verdict.lung_base_z_mm - DIAPHRAGM_MARGIN_MM)


def _heart_contradiction(mask: np.ndarray, affine: np.ndarray, verdict: FieldOfView) -> str | None:
    voxel_ml = voxel_volume_ml(affine)
    if verdict.heart_expected == "none" and mask.any():
        return f"holds {mask.sum() * voxel_ml:.0f} mL in a field of view without lungs ({verdict.field_of_view})"
    below = _below_diaphragm(mask, affine, verdict)
    if below.any():
        return f"reaches {below.sum() * voxel_ml:.0f} mL below the lung bases"
    return None


def _heart_mask(pred, channel: int) -> tuple[np.ndarray, bool]:
    """The boolean heart mask of a prediction, one-hot ``(C, ...)`` or a label map ``(1, ...)``."""
    array = np.asarray(pred.detach().cpu() if hasattr(pred, "detach") else pred)
    if array.shape[0] > 1:
        return array[channel] > 0.5, True
    return array[0] == channel, False


def _set_heart(pred, mask_removed: np.ndarray, channel: int, onehot: bool):
    import torch

    removed = torch.as_tensor(mask_removed, device=pred.device)
    out = pred.clone()
    if onehot:
        out[channel][removed] = 0
        out[0][removed] = 1
    else:
        out[0][removed] = 0
    return out


class _HeartAnatomyTransform(MapTransform):
    """A step on the heart prediction ``keys`` that reads and updates the verdict under ``anatomy_key``; without a
    verdict (a config without the check) the data pass unchanged."""

    def __init__(
        self,
        keys: KeysCollection,
        anatomy_key: str = "anatomy",
        heart_class: int = 1,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.anatomy_key, self.heart_class = anatomy_key, heart_class

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        if self.anatomy_key not in d:
            return d
        verdict = FieldOfView.from_json(d[self.anatomy_key])
        for key in self.key_iterator(d):
            pred = d[key]
            mask, onehot = _heart_mask(pred, self.heart_class)
            d[key] = self.apply(pred, mask, onehot, np.asarray(pred.affine, dtype=np.float64), verdict)
        d[self.anatomy_key] = verdict.to_json()
        return d

    def apply(self, pred, mask: np.ndarray, onehot: bool, affine: np.ndarray, verdict: FieldOfView):
        raise NotImplementedError


class RemoveHeartOutsideAnatomyd(_HeartAnatomyTransform):
    """Remove predicted heart voxels (class ``heart_class``) where the measured anatomy holds no heart: all of them
    when the field of view has no lungs, and those below the lung bases otherwise. The verdict under
    ``anatomy_key`` records how much was outside the anatomy, in mL, and whether it was removed (``enabled``) or
    only flagged; less than ``OUTSIDE_TOLERANCE_ML`` (boundary voxels) is not flagged. Use on the prediction on its
    image's grid (after ``Invertd``), before keeping the largest component: a large false positive must not
    outvote the heart."""

    def __init__(
        self,
        keys: KeysCollection,
        anatomy_key: str = "anatomy",
        heart_class: int = 1,
        enabled: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, anatomy_key, heart_class, allow_missing_keys)
        self.enabled = enabled

    def apply(self, pred, mask: np.ndarray, onehot: bool, affine: np.ndarray, verdict: FieldOfView):
        voxel_ml = voxel_volume_ml(affine)
        if verdict.heart_expected == "none":
            outside, rule = mask, "no_heart_expected"
        else:
            outside, rule = _below_diaphragm(mask, affine, verdict), "below_diaphragm"
        verdict.constraints_applied = self.enabled
        if not outside.any():
            return pred
        outside_ml = float(outside.sum()) * voxel_ml
        verdict.outside_anatomy_ml[rule] = round(outside_ml, 2)
        if outside_ml >= OUTSIDE_TOLERANCE_ML or rule == "no_heart_expected":
            verdict.flags.append(rule)
            if not self.enabled:
                verdict.volume_reportable = False
        return _set_heart(pred, outside, self.heart_class, onehot) if self.enabled else pred


class CheckHeartAnatomyd(_HeartAnatomyTransform):
    """Flag a final heart mask that the anatomy does not support, and decide whether its volume is reportable:
    ``cut_by_field_of_view`` (heart voxels on a face of the volume: only part of it was imaged),
    ``outside_lungs_laterally`` (the heart's centre beyond the lungs' left-right extent) and ``implausible_volume``
    (a whole heart outside ``HEART_VOLUME_RANGE_ML``). A cut heart's volume is withheld."""

    def apply(self, pred, mask: np.ndarray, onehot: bool, affine: np.ndarray, verdict: FieldOfView):
        if mask.any():
            self.check(mask, affine, verdict)
        return pred

    def check(self, mask: np.ndarray, affine: np.ndarray, verdict: FieldOfView) -> None:
        faces = [np.take(mask, index, axis=axis).any() for axis in range(3) for index in (0, -1)]
        if any(faces):
            verdict.flags.append("cut_by_field_of_view")
            verdict.reasons.append("the heart touches the edge of the field of view: only part of it was imaged")
            if verdict.heart_expected == "whole":
                verdict.heart_expected = "partial"
            verdict.volume_reportable = False
        if verdict.lung_x_range_mm is not None:
            centre = affine @ np.append(np.argwhere(mask).mean(axis=0), 1.0)
            low, high = verdict.lung_x_range_mm
            if not low - LATERAL_MARGIN_MM <= centre[0] <= high + LATERAL_MARGIN_MM:
                verdict.flags.append("outside_lungs_laterally")
                verdict.volume_reportable = False
        volume = float(mask.sum()) * voxel_volume_ml(affine)
        low, high = HEART_VOLUME_RANGE_ML
        if verdict.heart_expected == "whole" and not low <= volume <= high:
            verdict.flags.append("implausible_volume")
            verdict.reasons.append(f"{volume:.0f} mL is outside {low:.0f}-{high:.0f} mL for a whole heart")
            verdict.volume_reportable = False
