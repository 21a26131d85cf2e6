"""The metrics the bundles report, against independent computations: numpy by hand, ``sklearn.metrics`` and
``scipy.ndimage`` distance transforms, on real labels (DRIVE, NR206, a TotalSegmentator heart) and on the edge cases
of unannotated pixels, empty masks and explicit spacings; and the per-class report and tables they end up in."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from PIL import Image
from scipy import ndimage

from clinseg.pipelines.engine.handlers.evaluation import AtomicMetricsSaver, EvaluationReport
from clinseg.pipelines.engine.metrics import (
    CenterlineDiceMetric,
    HausdorffDistanceMM,
    ROCAUCInMaskMetric,
    metric_handlers,
)
from tests.conftest import shared_path

NR206_COLOURS = [(0, 0, 0), (255, 0, 0), (128, 128, 0), (255, 255, 0), (0, 128, 0), (0, 255, 0), (0, 255, 255),
                 (0, 0, 255), (255, 0, 255)]  # fmt: skip
"""The NR206 release's label colours, background (black) first: class index = position."""


def onehot(labels, num_classes: int) -> torch.Tensor:
    """``(C, ...)`` one-hot of a label map; negative values are unannotated (all-zero channels)."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    out = torch.nn.functional.one_hot(labels.clamp(min=0), num_classes).movedim(-1, 0).float()
    return out * (labels >= 0)


def run_metrics(metrics: dict[str, str], cases: list[dict], ignore_index=None, report=None) -> Engine:
    """The metrics as an evaluator computes them: ignite handlers on decollated ``pred``/``label``/``prob`` items."""
    engine = Engine(lambda engine, index: {key: [value] for key, value in cases[index].items()})
    for name, handler in metric_handlers(metrics, ignore_index=ignore_index).items():
        handler.attach(engine, name)
    if report is not None:
        report.attach(engine)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns of the empty masks these cases hold on purpose
        engine.run(list(range(len(cases))), max_epochs=1)
    return engine


def surface(mask: np.ndarray) -> np.ndarray:
    """The boundary voxels of a mask: those an erosion by the face-connected cross removes."""
    return mask ^ ndimage.binary_erosion(mask)


def surface_distances(prediction: np.ndarray, reference: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """Distances (in the units of ``spacing``) from each surface voxel of one mask to the other's surface."""
    sp, sr = surface(prediction), surface(reference)
    to_reference = ndimage.distance_transform_edt(~sr, sampling=spacing)[sp]
    to_prediction = ndimage.distance_transform_edt(~sp, sampling=spacing)[sr]
    return to_reference, to_prediction


def hd95(prediction, reference, spacing=None) -> float:
    a, b = surface_distances(prediction, reference, spacing)
    return max(np.percentile(a, 95), np.percentile(b, 95))


def test_drive_fov_metrics_match_numpy_and_sklearn():
    """Every vessel metric on real DRIVE labels, scored inside the FOV only (labels 255 outside), with a
    prediction that also marks vessels outside the FOV (which must not count) and probabilities with many ties."""
    from skimage.morphology import skeletonize
    from sklearn.metrics import roc_auc_score

    root = shared_path("vessels", "DRIVE", "training")
    rng = np.random.default_rng(0)
    cases, expected = [], {k: [] for k in ("f1", "iou", "sens", "spec", "acc", "auc", "cl", "hd95")}
    counts = np.zeros(3)
    for number in (21, 22):
        reference = np.array(Image.open(root / "1st_manual" / f"{number}_manual1.gif").convert("L")) > 127
        fov = np.array(Image.open(root / "mask" / f"{number}_training_mask.gif").convert("L")) > 127
        smooth = ndimage.gaussian_filter(reference.astype(float), 2) + rng.normal(0, 0.15, reference.shape)
        probability = np.clip(np.round(smooth * 20) / 20, 0, 1)  # 21 levels: ties everywhere
        prediction = (probability > 0.35) | (~fov & (rng.random(fov.shape) < 0.3))
        label = np.where(fov, reference, -1)
        cases.append({
            "pred": onehot(prediction, 2), "label": onehot(label, 2),
            "prob": torch.tensor(np.stack([1 - probability, probability]), dtype=torch.float32),
        })  # fmt: skip
        p, r = prediction & fov, reference & fov
        tp, fp, fn, tn = (p & r).sum(), (p & ~r).sum(), (~p & r).sum(), (~p & ~r & fov).sum()
        counts += [tp, fp, fn]
        expected["f1"].append(2 * tp / (2 * tp + fp + fn))
        expected["iou"].append(tp / (tp + fp + fn))
        expected["sens"].append(tp / (tp + fn))
        expected["spec"].append(tn / (tn + fp))
        expected["acc"].append((tp + tn) / fov.sum())
        expected["auc"].append(roc_auc_score(reference[fov], probability[fov]))
        skeleton_p, skeleton_r = skeletonize(p), skeletonize(r)
        t_prec, t_sens = (skeleton_p & r).sum() / skeleton_p.sum(), (skeleton_r & p).sum() / skeleton_r.sum()
        expected["cl"].append(2 * t_prec * t_sens / (t_prec + t_sens))
        expected["hd95"].append(hd95(p, r))
    kinds = {"f1": "dice", "iou": "iou", "sens": "sensitivity", "spec": "specificity", "acc": "accuracy",
             "auc": "auc_in_mask", "cl": "cldice", "hd95": "hd95", "pooled": "pooled_f1"}  # fmt: skip
    metrics = run_metrics(kinds, cases, ignore_index=255).state.metrics
    tp, fp, fn = counts
    expected["pooled"] = [2 * tp / (2 * tp + fp + fn)]
    for name in kinds:
        assert metrics[name] == pytest.approx(np.mean(expected[name]), abs=1e-5), name


def test_auc_in_mask_with_ties_and_with_one_class_only():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    label = rng.integers(0, 2, (12, 12))
    label[:, :3] = -1  # unannotated
    probability = np.round(rng.random((12, 12)) * 4) / 4  # five values: ties within and across the classes
    probability[:, :3] = 1.0 - label[:, :3].clip(0)  # unannotated pixels that would change the score
    prob = torch.tensor(np.stack([1 - probability, probability]), dtype=torch.float32)[None]
    annotated = label >= 0
    value = ROCAUCInMaskMetric()(prob, onehot(label, 2)[None]).item()
    assert value == pytest.approx(roc_auc_score(label[annotated], probability[annotated]), abs=1e-6)
    no_vessel = np.where(annotated, 0, -1)
    assert np.isnan(ROCAUCInMaskMetric()(prob, onehot(no_vessel, 2)[None]).item()), "undefined with one class"


def test_nr206_per_class_report_matches_numpy(tmp_path):
    """Real NR206 layer labels with unannotated columns and a block, a layer missed in one image and a layer absent
    from another's reference: each metric's mean and its per-class values in metrics.json, by hand."""
    from clinseg.datasets.readers import LabelImageReader, ReadImaged
    from clinseg.transforms.labels import LabelColorsToClassesd

    root = shared_path("oct", "NR206_sample")
    paths = [root / "train_labels" / "NORMAL1.png", root / "val_labels" / "NORMAL129.png"]
    rng = np.random.default_rng(1)
    references, predictions = [], []
    for index, path in enumerate(paths):
        read = ReadImaged("label", reader=LabelImageReader())({"label": str(path)})
        label = np.asarray(LabelColorsToClassesd("label", colors=NR206_COLOURS)(read)["label"])[0].astype(int)
        label = label[:, :240]
        prediction = label.copy()
        for column in range(0, label.shape[1], 7):  # boundaries moved up or down by up to 3 rows
            prediction[:, column] = np.roll(label[:, column], rng.integers(-3, 4))
        label[:, 50:60] = -1
        label[100:110, 200:210] = -1
        if index == 0:
            prediction[prediction == 8] = 7  # the last layer missed
        else:
            label[label == 3] = 2  # a layer absent from the reference
        references.append(label)
        predictions.append(prediction)
    kinds = {"val_dice": "dice", "val_precision": "precision", "val_specificity": "specificity",
             "val_hd95": "hd95", "val_thickness_mae_px": "layer_thickness_mae_px"}  # fmt: skip
    class_names = ["background"] + [f"layer{k}" for k in range(1, 9)]
    cases = [{"pred": onehot(p, 9), "label": onehot(r, 9), "image": torch.zeros(1, *r.shape)}
             for p, r in zip(predictions, references, strict=True)]  # fmt: skip
    report = EvaluationReport(str(tmp_path), class_names, num_overlays=0, pixel_size_um=3.9)
    engine = run_metrics(kinds, cases, ignore_index=255, report=report)

    expected = {name: np.full((2, 8), np.nan) for name in kinds}
    for i, (prediction, reference) in enumerate(zip(predictions, references, strict=True)):
        annotated = reference >= 0
        for c in range(1, 9):
            p, r = (prediction == c) & annotated, reference == c
            tp, fp, fn, tn = (p & r).sum(), (p & ~r).sum(), (~p & r).sum(), (~p & ~r & annotated).sum()
            if r.any():
                expected["val_dice"][i, c - 1] = 2 * tp / (2 * tp + fp + fn)
                expected["val_hd95"][i, c - 1] = hd95(p, r) if p.any() else np.hypot(*r.shape)
            if tp + fp:
                expected["val_precision"][i, c - 1] = tp / (tp + fp)
            expected["val_specificity"][i, c - 1] = tn / (tn + fp)
            columns = annotated.any(axis=0)
            expected["val_thickness_mae_px"][i, c - 1] = np.abs(p.sum(0) - r.sum(0))[columns].mean()
    written = json.loads((tmp_path / "metrics.json").read_text())
    for name, values in expected.items():
        headline = np.nanmean(np.nanmean(values, axis=1))  # MONAI's mean: per image over classes, then images
        assert engine.state.metrics[name] == pytest.approx(headline, rel=1e-5), name
        assert written["mean"][name] == pytest.approx(headline, rel=1e-5), name
        per_class = [written["per_class"][name][n] for n in class_names[1:]]
        np.testing.assert_allclose(per_class, np.nanmean(values, axis=0), rtol=1e-5, err_msg=name)
    assert written["mean"]["val_thickness_mae_um"] == pytest.approx(written["mean"]["val_thickness_mae_px"] * 3.9)


def test_heart_surface_distances_on_a_rotated_anisotropic_grid_match_scipy():
    """HD95, ASSD and the volume error of a real heart mask (TotalSegmentator, resampled onto its CT by the
    affines), on a grid of 0.8 x 1.1 x 3 mm voxels rotated and flipped in space, against scipy's distance
    transforms with the same spacing; a missed heart costs the grid's diagonal in mm."""
    import nibabel as nib

    folder = shared_path("ct", "totalsegmentator", "pulmonary_report")
    ct, heart = nib.load(folder / "ct_cropped.nii.gz"), nib.load(folder / "heart.nii.gz")
    to_heart = np.linalg.inv(heart.affine) @ ct.affine
    reference = ndimage.affine_transform(
        np.asanyarray(heart.dataobj).astype(np.uint8), to_heart[:3, :3], to_heart[:3, 3], output_shape=ct.shape, order=0
    )[::2, ::2, ::2].astype(bool)
    assert reference.sum() > 10000
    spacing = np.array([0.8, 1.1, 3.0])
    angle = 0.4
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, -1]])
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = rotation @ np.diag(spacing), [10.0, -20.0, 30.0]

    def volume(mask):
        return MetaTensor(onehot(mask.astype(int), 2), affine=torch.tensor(affine))

    grown = np.roll(ndimage.binary_dilation(reference, iterations=2), 2, axis=2)
    kinds = {"hd95": "hd95_mm", "assd": "assd_mm", "rve": "relative_volume_error"}
    engine = run_metrics(kinds, [{"pred": volume(grown), "label": volume(reference)},
                                 {"pred": volume(np.zeros_like(reference)), "label": volume(reference)}])  # fmt: skip
    to_reference, to_prediction = surface_distances(grown, reference, spacing)
    diagonal = float(np.linalg.norm(np.array(reference.shape) * spacing))
    expected = {
        "hd95": [max(np.percentile(to_reference, 95), np.percentile(to_prediction, 95)), diagonal],
        "assd": [np.concatenate([to_reference, to_prediction]).mean(), diagonal],
        "rve": [(grown.sum() - reference.sum()) / reference.sum(), -1.0],
    }
    for name, values in expected.items():
        assert engine.state.metrics[name] == pytest.approx(np.mean(values), rel=1e-5), name


def test_a_structure_predicted_only_where_nothing_is_annotated_is_a_miss():
    """A layer (or vessel) predicted only in unannotated pixels is missed where it is scored: it costs the image's
    diagonal, as an empty prediction does, instead of being undefined and left out of the mean (0.0: perfect)."""
    reference = np.zeros((10, 10), int)
    reference[2:4, 1:5] = 1
    reference[:, 6:] = -1  # unannotated columns
    elsewhere = np.zeros((10, 10), int)
    elsewhere[2:4, 7:9] = 1
    diagonal = float(np.hypot(10, 10))
    case = [{"pred": onehot(elsewhere, 2), "label": onehot(reference, 2)}]
    for kind in ("hd95", "hd95_mm", "assd_mm"):
        value = run_metrics({"distance": kind}, case, ignore_index=255).state.metrics["distance"]
        assert value == pytest.approx(diagonal, rel=1e-5), kind


def test_millimetre_distances_leave_unannotated_pixels_out():
    """``hd95_mm`` and ``assd_mm`` honour the bundle's ``ignore_index`` as every other metric does: a prediction
    exact where annotated, with a false structure where nothing is annotated, is at distance 0."""
    reference = np.zeros((10, 10), int)
    reference[2:4, 1:5] = 1
    reference[:, 6:] = -1
    prediction = np.zeros((10, 10), int)
    prediction[2:4, 1:5] = 1
    prediction[8:10, 8:10] = 1  # unannotated: not scored
    case = [{"pred": onehot(prediction, 2), "label": onehot(reference, 2)}]
    for kind in ("hd95", "hd95_mm", "assd_mm"):
        assert run_metrics({"distance": kind}, case, ignore_index=255).state.metrics["distance"] == 0.0, kind


def test_an_explicit_spacing_takes_every_form_monai_accepts():
    reference = torch.zeros(1, 2, 5, 5, 5)
    reference[0, 1, 2, 2, 3] = 1
    reference[0, 0] = 1 - reference[0, 1]
    prediction = reference.roll(-1, dims=-1)
    missed = torch.cat([torch.ones_like(reference[:, :1]), torch.zeros_like(reference[:, :1])], dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for spacing in (2.0, [2.0, 2.0, 2.0], [[2.0, 2.0, 2.0]]):
            metric = HausdorffDistanceMM(include_background=False)
            assert metric(prediction, reference, spacing=spacing).item() == pytest.approx(2.0), spacing
            assert metric(missed, reference, spacing=spacing).item() == pytest.approx(10 * np.sqrt(3)), spacing


@pytest.mark.parametrize("metric", [ROCAUCInMaskMetric, CenterlineDiceMetric])
def test_binary_metrics_refuse_a_multi_class_reference(metric):
    """AUC and clDice score channel 1 against the rest: on OCT layers they would report the last layer alone."""
    label = onehot(np.arange(16).reshape(4, 4) % 3, 3)[None]
    with pytest.raises(ValueError, match=r"binary one-hot reference \(B, 2, \.\.\.\), got shape \(1, 3, 4, 4\)"):
        metric()(label, label)


def test_a_per_image_table_of_one_value_over_all_classes_names_no_class(tmp_path):
    """Pixel accuracy of a multi-class task is one value per image over every class: its table's column is not
    headed with the last class's name (it would read as that layer's accuracy); per-class metrics keep theirs."""
    class_names = ["background", "NFL", "GCL-IPL", "OS-RPE"]
    details = {"val_pixel_accuracy": torch.tensor([[0.97], [0.95]]), "val_dice": torch.rand(2, 3)}
    engine = SimpleNamespace(state=SimpleNamespace(metric_details=details, metrics={"val_dice": 0.5}, epoch=1))
    saver = AtomicMetricsSaver(save_dir=str(tmp_path), metrics="*", metric_details="*", class_names=class_names)
    saver._filenames = ["scan1", "scan2"]
    saver(engine)
    header = (tmp_path / "val_pixel_accuracy_raw.csv").read_text().splitlines()[0]
    assert header == "filename,all_classes,mean", header
    header = (tmp_path / "val_dice_raw.csv").read_text().splitlines()[0]
    assert header == "filename,NFL,GCL-IPL,OS-RPE,mean", header
