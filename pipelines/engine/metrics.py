"""Metrics MONAI has no class for: pixel accuracy, retinal layer thickness error, ROC AUC inside a mask, clDice,
relative volume error, and MONAI's surface distances in millimetres (voxel spacing read from the reference).

Both follow MONAI's ``CumulativeIterationMetric`` protocol (one-hot ``y_pred`` and ``y``, shape ``(B, C, H, W)``)
and treat pixels whose one-hot label is all zero as unannotated, like MONAI's sentinel ``ignore_index``.
They are attached to engines with ``monai.handlers.IgniteMetricHandler``.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.data import MetaTensor
from monai.metrics import CumulativeIterationMetric, HausdorffDistanceMetric, SurfaceDistanceMetric
from monai.metrics.utils import do_metric_reduction
from monai.utils import MetricReduction


class _ReducedMetric(CumulativeIterationMetric):
    def __init__(self, reduction: MetricReduction | str = MetricReduction.MEAN, get_not_nans: bool = False):
        super().__init__()
        self.reduction, self.get_not_nans = reduction, get_not_nans

    def aggregate(self, reduction: MetricReduction | str | None = None):
        data = self.get_buffer()
        if not isinstance(data, torch.Tensor):
            raise ValueError("the data to aggregate must be a PyTorch Tensor.")
        f, not_nans = do_metric_reduction(data, reduction or self.reduction)
        return (f, not_nans) if self.get_not_nans else f


class PixelAccuracyMetric(_ReducedMetric):
    """Fraction of annotated pixels whose predicted class is the reference class, per image: ``(B, 1)``."""

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y_pred.shape != y.shape:
            raise ValueError(f"y_pred and y must have the same shape, got {y_pred.shape} and {y.shape}.")
        annotated = (y.sum(dim=1) > 0).float()
        correct = ((y_pred * y).sum(dim=1) > 0).float() * annotated
        dims = tuple(range(1, annotated.ndim))
        total = annotated.sum(dim=dims)
        accuracy = correct.sum(dim=dims) / total.clamp(min=1)
        return torch.where(total > 0, accuracy, torch.full_like(accuracy, float("nan")))[:, None]


class LayerThicknessError(_ReducedMetric):
    """Mean absolute error of each layer's thickness along the axial (row) axis: ``(B, C - 1)``.

    A layer's thickness in an A-scan (column) is the number of its pixels in that column. The error is averaged
    over annotated columns only and multiplied by ``axial_size`` (e.g. micrometres per pixel; 1 gives pixels).
    Background (channel 0) is excluded: layer thickness is the clinical biomarker of retinal disease.
    """

    def __init__(
        self,
        axial_size: float | None = 1.0,
        reduction: MetricReduction | str = MetricReduction.MEAN,
        get_not_nans: bool = False,
    ):
        super().__init__(reduction, get_not_nans)
        self.axial_size = 1.0 if axial_size is None else float(axial_size)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y_pred.shape != y.shape or y.ndim != 4:
            raise ValueError(f"expected y_pred and y of one shape (B, C, H, W), got {y_pred.shape} and {y.shape}.")
        annotated_columns = (y.sum(dim=(1, 2)) > 0).float()[:, None]  # (B, 1, W)
        annotated = (y.sum(dim=1, keepdim=True) > 0).to(y_pred.dtype)  # rows left unannotated in a column count not
        thickness_pred = (y_pred[:, 1:] * annotated).sum(dim=2)  # (B, C - 1, W)
        thickness_true = y[:, 1:].sum(dim=2)
        error = (thickness_pred - thickness_true).abs() * annotated_columns
        n_columns = annotated_columns.sum(dim=-1)
        mae = error.sum(dim=-1) / n_columns.clamp(min=1) * self.axial_size
        return torch.where(n_columns > 0, mae, torch.full_like(mae, float("nan")))


class ROCAUCInMaskMetric(_ReducedMetric):
    """Area under the ROC curve of a probability map, per image, over annotated pixels only: ``(B, 1)``.

    ``y_pred`` is ``(B, 1, ...)`` foreground probability (or ``(B, 2, ...)``: channel 1 is used); ``y`` is the
    ``(B, 2, ...)`` one-hot reference whose all-zero pixels (outside the FOV) are excluded.
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from monai.metrics import compute_roc_auc

        _require_binary("auc_in_mask (ROCAUCInMaskMetric)", y)
        probability = y_pred[:, -1]
        annotated = y.sum(dim=1) > 0
        scores = []
        for p, t, m in zip(probability, y[:, -1], annotated, strict=True):
            target = t[m]
            if target.numel() == 0 or target.min() == target.max():
                scores.append(float("nan"))  # AUC is undefined with one class only
            else:
                scores.append(float(compute_roc_auc(p[m].float(), target.float())))
        return torch.tensor(scores, dtype=torch.float32)[:, None]


class CenterlineDiceMetric(_ReducedMetric):
    """clDice (Shit et al., CVPR 2021), the topology-aware overlap of thin tubular structures: ``(B, 1)``.

    ``clDice = 2 Tprec Tsens / (Tprec + Tsens)``, with ``Tprec`` the fraction of the predicted skeleton inside the
    reference and ``Tsens`` the fraction of the reference skeleton inside the prediction. Binary one-hot inputs
    ``(B, 2, H, W)``; pixels whose reference is all zero (outside the FOV) are removed from both first.
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from skimage.morphology import skeletonize

        _require_binary("cldice (CenterlineDiceMetric)", y)
        annotated = (y.sum(dim=1) > 0).cpu().numpy()
        predicted = (y_pred[:, -1] > 0.5).cpu().numpy() & annotated
        reference = (y[:, -1] > 0.5).cpu().numpy() & annotated
        scores = []
        for p, r in zip(predicted, reference, strict=True):
            if not p.any() or not r.any():
                scores.append(float("nan") if not p.any() and not r.any() else 0.0)
                continue
            skeleton_p, skeleton_r = skeletonize(p), skeletonize(r)
            precision = (skeleton_p & r).sum() / max(skeleton_p.sum(), 1)
            sensitivity = (skeleton_r & p).sum() / max(skeleton_r.sum(), 1)
            total = precision + sensitivity
            scores.append(float(2 * precision * sensitivity / total) if total > 0 else 0.0)
        return torch.tensor(scores, dtype=torch.float32)[:, None]


def _require_binary(metric: str, y: torch.Tensor) -> None:
    """Refuse a multi-class reference: the metric scores channel 1 against the rest, so on more classes it would
    report the last class alone under the metric's plain name."""
    if y.ndim < 3 or y.shape[1] != 2:
        raise ValueError(
            f"{metric} needs a binary one-hot reference (B, 2, ...), got shape {tuple(y.shape)}: "
            "it is defined for one foreground class."
        )


def voxel_spacing(volume: torch.Tensor, batch_size: int) -> list[list[float]] | None:
    """Per-item voxel spacing (mm) of a batched ``MetaTensor`` from its affine(s), or None without one."""
    if not isinstance(volume, MetaTensor) or volume.affine is None:
        return None
    affine = volume.affine.detach().cpu().double()
    affines = affine if affine.ndim == 3 else affine[None].expand(batch_size, *affine.shape)
    spatial_dims = volume.ndim - 2
    return [torch.linalg.norm(a[:spatial_dims, :spatial_dims], dim=0).tolist() for a in affines]


class _MillimetreDistance:
    """Mixin for MONAI's surface-distance metrics: spacing from the reference's affine, empty masks made explicit."""

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        kwargs.setdefault("spacing", voxel_spacing(y, y.shape[0]))
        y_pred = _annotated_only(y_pred, y, self.ignore_index)
        distances = super()._compute_tensor(y_pred, y, **kwargs)
        return _defined_distances(distances, y_pred, y, kwargs["spacing"], self.include_background)


class HausdorffDistanceMM(_MillimetreDistance, HausdorffDistanceMetric):
    """MONAI's Hausdorff distance (default: 95th percentile) in millimetres: the spacing of each volume is read from
    the reference's affine (``MetaTensor``), so anisotropic voxels are measured correctly when the metric runs
    inside an ignite handler, which passes no ``spacing``. An explicit ``spacing=`` still wins. Empty masks: NaN
    without reference, the volume's diagonal for a missed structure (see :func:`_defined_distances`)."""

    def __init__(self, percentile: float | None = 95.0, **kwargs):
        super().__init__(percentile=percentile, **kwargs)


def _annotated_only(y_pred: torch.Tensor, y: torch.Tensor, ignore_index: int | None) -> torch.Tensor:
    """``y_pred`` without the pixels that ``ignore_index`` leaves unscored (MONAI's mask, as its distance metrics
    apply it). Whether the prediction is empty must be judged on this: a structure predicted only where nothing is
    annotated is a miss, not an undefined case left out of the mean."""
    from monai.metrics.utils import create_ignore_mask

    mask = create_ignore_mask(y, ignore_index)
    return y_pred if mask is None else y_pred * mask


def _defined_distances(distances, y_pred, y, spacing, include_background: bool) -> torch.Tensor:
    """Surface distances with MONAI's infinities and NaNs for empty masks made explicit: NaN (undefined, left out
    of means) where the reference class is empty; the volume's diagonal in mm (the largest possible distance) where
    the (annotated part of the) prediction is empty but the reference is not, so that a missed structure is a large,
    finite error. ``spacing`` takes every form MONAI's metrics accept (None, a number, per axis, per item)."""
    from monai.metrics.utils import prepare_spacing

    first = 0 if include_background else 1
    dims = tuple(range(2, y.ndim))
    reference_empty = y[:, first:].sum(dim=dims) == 0
    prediction_empty = y_pred[:, first:].sum(dim=dims) == 0
    spacings = [
        np.broadcast_to(np.asarray(1.0 if s is None else s, dtype=float), (len(dims),))
        for s in prepare_spacing(spacing=spacing, batch_size=y.shape[0], img_dim=len(dims))
    ]
    diagonal = torch.tensor(
        [float(np.linalg.norm(np.asarray(y.shape[2:]) * s)) for s in spacings],
        dtype=distances.dtype,
        device=distances.device,
    )[:, None].expand_as(distances)
    distances = torch.where(prediction_empty & ~reference_empty, diagonal, distances)
    return torch.where(reference_empty, torch.full_like(distances, float("nan")), distances)


class HausdorffDistancePx(HausdorffDistanceMetric):
    """MONAI's Hausdorff distance (default: 95th percentile) in pixels, empty masks made explicit as in
    :class:`HausdorffDistanceMM`: a missed structure costs the image's diagonal in pixels. MONAI's own gives NaN
    there, which its mean leaves out, so a model that misses a layer (or everything: 0.0) would read as better."""

    def __init__(self, percentile: float | None = 95.0, **kwargs):
        super().__init__(percentile=percentile, **kwargs)

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        y_pred = _annotated_only(y_pred, y, self.ignore_index)
        distances = super()._compute_tensor(y_pred, y, **kwargs)
        return _defined_distances(distances, y_pred, y, None, self.include_background)


class AverageSurfaceDistanceMM(_MillimetreDistance, SurfaceDistanceMetric):
    """Average symmetric surface distance (ASSD) in millimetres, spacing from the reference's affine as in
    :class:`HausdorffDistanceMM`."""

    def __init__(self, symmetric: bool = True, **kwargs):
        super().__init__(symmetric=symmetric, **kwargs)


class RelativeVolumeError(_ReducedMetric):
    """Signed relative volume error ``(V_pred - V_ref) / V_ref`` per class (background excluded): ``(B, C - 1)``.

    Positive means over-segmentation. NaN when the reference class is empty (the error is undefined; an empty
    prediction there is correct, a non-empty one is counted by Dice). Annotated voxels only, as elsewhere.
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if y_pred.shape != y.shape:
            raise ValueError(f"y_pred and y must have the same shape, got {y_pred.shape} and {y.shape}.")
        annotated = (y.sum(dim=1, keepdim=True) > 0).float()
        dims = tuple(range(2, y.ndim))
        predicted = (y_pred[:, 1:] * annotated).sum(dim=dims)
        reference = y[:, 1:].sum(dim=dims)
        error = (predicted - reference) / reference.clamp(min=1)
        return torch.where(reference > 0, error, torch.full_like(error, float("nan")))


def _confusion(name: str, compute_sample: bool = True):
    def build(ignore_index):
        from monai.metrics import ConfusionMatrixMetric

        return ConfusionMatrixMetric(
            include_background=False, metric_name=name, compute_sample=compute_sample, ignore_index=ignore_index
        )

    return build


def _monai(cls_name: str, **kwargs):
    def build(ignore_index):
        import monai.metrics

        return getattr(monai.metrics, cls_name)(include_background=False, ignore_index=ignore_index, **kwargs)

    return build


def _hd95_px(ignore_index):
    return HausdorffDistancePx(include_background=False, ignore_index=ignore_index)


# the metric kinds a bundle names in its configs: kind -> (metric built for an ignore index, engine output keys)
METRIC_KINDS = {
    "dice": (_monai("DiceMetric"), ("pred", "label")),
    "iou": (_monai("MeanIoU"), ("pred", "label")),
    "hd95": (_hd95_px, ("pred", "label")),
    "hd95_mm": (
        lambda ignore_index: HausdorffDistanceMM(include_background=False, percentile=95, ignore_index=ignore_index),
        ("pred", "label"),
    ),
    "assd_mm": (
        lambda ignore_index: AverageSurfaceDistanceMM(include_background=False, ignore_index=ignore_index),
        ("pred", "label"),
    ),
    "relative_volume_error": (lambda ignore_index: RelativeVolumeError(), ("pred", "label")),
    "sensitivity": (_confusion("sensitivity"), ("pred", "label")),
    "recall": (_confusion("recall"), ("pred", "label")),
    "specificity": (_confusion("specificity"), ("pred", "label")),
    "precision": (_confusion("precision"), ("pred", "label")),
    "accuracy": (_confusion("accuracy"), ("pred", "label")),
    "pooled_f1": (_confusion("f1 score", compute_sample=False), ("pred", "label")),
    "auc_in_mask": (lambda ignore_index: ROCAUCInMaskMetric(), ("prob", "label")),
    "cldice": (lambda ignore_index: CenterlineDiceMetric(), ("pred", "label")),
    "pixel_accuracy": (lambda ignore_index: PixelAccuracyMetric(), ("pred", "label")),
    "layer_thickness_mae_px": (lambda ignore_index: LayerThicknessError(), ("pred", "label")),
}


def _undefined_throughout(metric) -> bool:
    """Whether every value ``metric`` collected is NaN (undefined: no reference structure in any case). MONAI's
    mean of such values is 0.0, which reads as a perfect distance or no volume error; it is reported as NaN (null
    in JSON) instead. Confusion-matrix metrics collect counts: their value is undefined where its denominator is 0
    (sensitivity of cases without a reference structure), per case, or for the pooled counts."""
    from monai.metrics import ConfusionMatrixMetric
    from monai.metrics.confusion_matrix import compute_confusion_matrix_metric

    try:
        data = metric.get_buffer()
    except Exception:  # noqa: BLE001 - nothing collected yet
        return False
    if not isinstance(data, torch.Tensor) or data.numel() == 0:
        return False
    if isinstance(metric, ConfusionMatrixMetric):  # (batch, classes, [tp, fp, tn, fn])
        counts = data.float() if metric.compute_sample else data.float().sum(dim=0, keepdim=True)
        data = compute_confusion_matrix_metric(metric.metric_name[0], counts)
    return bool(torch.isnan(data.float()).all())


def metric_handlers(metrics: dict[str, str | None], ignore_index: int | None = None) -> dict:
    """The evaluator's metrics from a ``{tracked name: kind}`` mapping (kinds: :data:`METRIC_KINDS`), each an
    ``IgniteMetricHandler`` on the engine's one-hot ``pred`` (or ``prob``) and ``label``; background excluded, and
    pixels labelled ``ignore_index`` not scored. A metric undefined in every case is NaN, not MONAI's 0.0. A kind
    of ``None`` leaves the metric out (one a setting switches off, e.g. layer thickness where the classes are not
    layers)."""
    from monai.handlers import IgniteMetricHandler, from_engine

    class DefinedMetricHandler(IgniteMetricHandler):
        def compute(self):
            value = super().compute()
            return float("nan") if _undefined_throughout(self.metric_fn) else value

    from clinseg.pipelines.cli import ConfigError

    handlers = {}
    for name, kind in metrics.items():
        if kind is None:
            continue
        if kind not in METRIC_KINDS:
            raise ConfigError(name, f"unknown metric kind {kind!r}.", f"Choose one of {sorted(METRIC_KINDS)}.")
        build, keys = METRIC_KINDS[kind]
        handlers[name] = DefinedMetricHandler(metric_fn=build(ignore_index), output_transform=from_engine(list(keys)))
    return handlers
