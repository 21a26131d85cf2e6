"""A DRIVE-trained vessels model on photographs of another camera that come without FOV masks (CHASE_DB1).

    python -m clinseg.pipelines.benchmarks.vessels_cross_camera \\
        --chase_dir ../shared/data/vessels/CHASEDB1_x3 --checkpoint bundles/vessels/models/model.pt

1. Prepares the photographs as their data README says: the 3x enlarged JPEG release reduced by 3 (area) to the
   original 999 x 960 pixels, masks thresholded (> 127 of 255). The copy is written under ``data/benchmarks/``
   (never into the repository's tracked files), once.
2. Runs the bundle's own inference (``python -m monai.bundle run inferring --config_file inference.json``) over
   the photographs once per condition; a condition is a set of command-line overrides, so what it changes is
   exactly what a user would type: ``whole_image`` (no FOV estimation, no scaling: the pipeline before them),
   ``estimated_fov`` (the field estimated from each photograph), ``estimated_fov_scaled`` (also resampled so the
   disc is as wide as DRIVE's), ``estimated_fov_scaled_rule`` (the defaults: also the model's decision rule,
   chosen on its DRIVE validation cases, instead of the plain threshold of 0.5) and
   ``estimated_fov_scaled_rule_tta`` (with flip test-time augmentation) and ``estimated_fov_scaled_rule_tta_rot90``
   (flips and quarter turns, eight passes). ``--condition NAME='--key value ...'`` adds one (split as a shell would).
3. Scores every prediction on the photograph's own grid against its mask, inside the field that
   ``EstimateFOV`` finds in the photograph (the same field for every condition) and over the whole image; prints
   the mean F1, sensitivity, AUC and the worst images, and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clinseg.pipelines.benchmarks import write_report
from clinseg.pipelines.paths import PROJECT_ROOT, SOURCE_ROOT

CONFIGS = SOURCE_ROOT / "bundles" / "vessels" / "configs"
# what each condition types on the command line (the bundle's defaults last: FOV estimation and disc scaling on)
# one feature added at a time; the first three with the plain decision rule (threshold 0.5), the model's own rule
# (chosen on its DRIVE validation cases, clinseg.pipelines.engine.decision) from the fourth on
PLAIN_RULE = ["--decision_rule", "{'threshold': 0.5, 'min_component_fraction': 0.0}"]
# the first two conditions show the pipeline before disc scaling, so they run a model trained with it without it on
# purpose: an empty input_settings turns off the check that would refuse exactly that (and nothing else)
UNCHECKED = ["--input_settings", "{}"]
CONDITIONS = {
    "whole_image": ["--estimate_fov", "False", "--scale_to_fov", "False", *UNCHECKED, *PLAIN_RULE],
    "estimated_fov": ["--scale_to_fov", "False", *UNCHECKED, *PLAIN_RULE],
    "estimated_fov_scaled": [*PLAIN_RULE],
    "estimated_fov_scaled_rule": [],
    "estimated_fov_scaled_rule_tta": ["--tta", "True"],
    "estimated_fov_scaled_rule_tta_rot90": ["--tta", "True", "--tta_rot90", "True"],
}


def prepare(chase_dir: Path, target: Path, factor: int = 3) -> Path:
    """``target/images/*.png`` and ``target/masks/*.png``: each photograph and mask reduced by ``factor`` (area),
    masks thresholded at half; written once (a folder that is complete is reused)."""
    from PIL import Image

    images = sorted((chase_dir / "images").glob("*.jpg"))
    if not images:
        raise SystemExit(f"error: {chase_dir / 'images'}: no CHASE photographs (*.jpg) there.")
    done = target / "complete"
    if done.is_file() and done.read_text().split() == [p.stem for p in images]:
        return target
    for folder in ("images", "masks"):
        (target / folder).mkdir(parents=True, exist_ok=True)
    for path in images:
        mask_path = chase_dir / "masks" / path.name
        if not mask_path.is_file():
            raise SystemExit(f"error: {mask_path}: the mask of {path.name} is missing.")
        image = Image.open(path).convert("RGB")
        size = (image.width // factor, image.height // factor)
        image.resize(size, Image.Resampling.BOX).save(target / "images" / f"{path.stem}.png")
        mask = np.asarray(Image.open(mask_path).convert("L").resize(size, Image.Resampling.BOX)) > 127
        Image.fromarray(mask.astype(np.uint8) * 255).save(target / "masks" / f"{path.stem}.png")
    done.write_text("\n".join(p.stem for p in images))
    return target


def scores(prediction: np.ndarray, probability: np.ndarray, reference: np.ndarray, field: np.ndarray) -> dict:
    """F1, sensitivity, specificity and AUC of one prediction inside ``field``."""
    from monai.metrics import compute_roc_auc

    p, r = prediction[field], reference[field]
    tp, fp, fn = int((p & r).sum()), int((p & ~r).sum()), int((~p & r).sum())
    tn = int(p.size - tp - fp - fn)
    auc = compute_roc_auc(
        torch.as_tensor(probability[field], dtype=torch.float32), torch.as_tensor(r.astype(np.float32))
    )
    return {
        "f1": 2 * tp / max(2 * tp + fp + fn, 1),
        "sensitivity": tp / max(tp + fn, 1),
        "specificity": tn / max(tn + fp, 1),
        "auc": float(auc),
    }


def error_kinds(prediction: np.ndarray, reference: np.ndarray, field: np.ndarray) -> dict:
    """What kind of errors a prediction makes inside ``field``: vessels found but drawn wider or narrower, or vessels
    missed and invented. ``f1_within_1px`` counts a pixel as right within 1 pixel of the other mask (edges drawn
    differently forgiven); ``centreline_length_ratio`` is the predicted centre lines' length over the annotated
    ones'; ``median_width_px`` is measured along each mask's centre lines; ``false_positives_within_2px`` is the
    share of false positives that border an annotated vessel (a width difference, not an invented vessel)."""
    from scipy import ndimage
    from skimage.morphology import skeletonize

    p, r = prediction & field, reference & field
    to_reference, to_prediction = (
        ndimage.distance_transform_edt(~reference),
        ndimage.distance_transform_edt(~prediction),
    )
    precision_1px = float((p & (to_reference <= 1)).sum() / max(p.sum(), 1))
    recall_1px = float((r & (to_prediction <= 1)).sum() / max(r.sum(), 1))
    false_positive = p & ~r
    widths, lengths = {}, []
    for name, mask in (("prediction", p), ("reference", r)):
        centre = skeletonize(mask)
        widths[name] = float(np.median(2 * ndimage.distance_transform_edt(mask)[centre])) if centre.any() else None
        lengths.append(int(centre.sum()))
    return {
        "f1_within_1px": 2 * precision_1px * recall_1px / max(precision_1px + recall_1px, 1e-12),
        "centreline_length_ratio": lengths[0] / max(lengths[1], 1),
        "median_width_px": widths,
        "false_positives_within_2px": float(
            (false_positive & (to_reference <= 2)).sum() / max(false_positive.sum(), 1)
        ),
    }


def with_trained_settings(overrides: list[str], checkpoint: Path) -> list[str]:
    """``overrides`` preceded by the input settings the model's ``model.json`` records (a CLAHE model runs with
    CLAHE), for each setting the condition does not set itself."""
    from clinseg.pipelines import runs

    trained = runs.flat_settings((runs.record_of(checkpoint) or {}).get("input_settings"))
    given = {option[2:] for option in overrides if option.startswith("--")}
    recorded = [[f"--{key}", repr(value)] for key, value in trained.items() if key not in given]
    return [part for pair in recorded for part in pair] + overrides


def require_model(checkpoint: Path) -> None:
    """Stop, saying how to make one, when ``checkpoint`` is no file."""
    if not checkpoint.is_file():
        raise SystemExit(
            f"error: {checkpoint}: no model; train one on DRIVE first (python -m monai.bundle run training "
            "--config_file bundles/vessels/configs/train.json --dataset_dir ../shared/data/vessels/DRIVE/training)."
        )


def infer(dataset_dir: Path, checkpoint: Path, overrides: list[str], work: Path, name: str) -> dict:
    """One inference through the bundle's command line over the photographs; the predictions scored on the
    photographs' own grid against their masks, inside the field estimated from each photograph and over the
    whole image, with the seconds it took."""
    from PIL import Image

    from clinseg.transforms.fundus import EstimateFOV

    output_dir = work / name
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "inferring",
        "--config_file",
        str(CONFIGS / "inference.json"),
        "--input_dir",
        str(dataset_dir / "images"),
        "--checkpoint_path",
        str(checkpoint),
        "--output_dir",
        str(output_dir),
        # a rerun with the same --work_dir writes over this benchmark's own earlier predictions, by name
        "--results_writer#overwrite",
        "True",
        *overrides,
    ]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=SOURCE_ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"error: inference '{name}' failed ({done.returncode}):\n{done.stderr[-3000:]}")
    per_image: dict[str, dict] = {}
    for mask_path in sorted((dataset_dir / "masks").glob("*.png")):
        reference = np.asarray(Image.open(mask_path)) > 127
        photo = np.asarray(Image.open(dataset_dir / "images" / mask_path.name), dtype=np.float32).transpose(2, 0, 1)
        field = EstimateFOV()(photo)
        prediction = np.asarray(Image.open(output_dir / f"{mask_path.stem}_seg.png")) > 0
        probability = np.asarray(Image.open(output_dir / f"{mask_path.stem}_prob.png"), dtype=np.float32) / 255
        summary = json.loads((output_dir / f"{mask_path.stem}.json").read_text())
        per_image[mask_path.stem] = {
            "in_field": scores(prediction, probability, reference, field),
            "error_kinds": error_kinds(prediction, reference, field),
            "whole_image_f1": scores(prediction, probability, reference, np.ones_like(field))["f1"],
            "resampled_by": summary.get("resampled_by", 1.0),
        }
    mean = {
        metric: float(np.mean([v["in_field"][metric] for v in per_image.values()]))
        for metric in ("f1", "sensitivity", "specificity", "auc")
    }
    mean["whole_image_f1"] = float(np.mean([v["whole_image_f1"] for v in per_image.values()]))
    for kind in ("f1_within_1px", "centreline_length_ratio", "false_positives_within_2px"):
        mean[kind] = float(np.mean([v["error_kinds"][kind] for v in per_image.values()]))
    for name in ("prediction", "reference"):
        widths = [v["error_kinds"]["median_width_px"][name] for v in per_image.values()]
        mean[f"median_width_px_{name}"] = float(np.median([w for w in widths if w is not None] or [np.nan]))
    worst = sorted(per_image, key=lambda k: per_image[k]["in_field"]["f1"])[:3]
    return {
        "overrides": overrides,
        "mean": mean,
        "per_image": per_image,
        "worst": worst,
        "seconds": seconds,
        "seconds_per_image": seconds / len(per_image),
    }


PANEL_WIDTH = 560


def draw_worst_case(dataset_dir: Path, work: Path, results: dict, path: Path) -> Path:
    """One picture of the photograph the last condition scores worst on: the photograph with its estimated field
    outlined, then each condition's prediction over it (vessels in green) and the reference, each captioned."""
    from PIL import Image
    from scipy import ndimage

    from clinseg.pipelines.engine.pictures import overlay, with_caption
    from clinseg.transforms.fundus import EstimateFOV

    last = list(results)[-1]
    case = results[last]["worst"][0]
    photo = np.asarray(Image.open(dataset_dir / "images" / f"{case}.png").convert("RGB"))
    field = EstimateFOV()(photo.transpose(2, 0, 1).astype(np.float32))
    rim = field & ~ndimage.binary_erosion(field, iterations=3)
    outlined = photo.copy()
    outlined[rim] = (255, 255, 0)
    green = [(0, 0, 0), (0, 255, 0)]  # vessels in green: red ones vanish on a fundus

    def panel(rgb: np.ndarray, lines: list[str]) -> np.ndarray:
        small = Image.fromarray(rgb).resize((PANEL_WIDTH, round(rgb.shape[0] * PANEL_WIDTH / rgb.shape[1])))
        return with_caption(np.asarray(small), lines)  # captioned after the reduction: legible text

    panels = [panel(outlined, [f"{case}: photograph", "estimated field of view (yellow)"])]
    for name, result in results.items():
        prediction = (np.asarray(Image.open(work / name / f"{case}_seg.png")) > 0).astype(np.uint8)
        f1 = result["per_image"][case]["in_field"]["f1"]
        panels.append(panel(overlay(photo, prediction, green), [f"{name}: F1 {f1:.3f}", " ".join(result["overrides"])]))
    reference = (np.asarray(Image.open(dataset_dir / "masks" / f"{case}.png")) > 127).astype(np.uint8)
    panels.append(panel(overlay(photo, reference, green), ["reference (approximate labels)", ""]))
    height = max(p.shape[0] for p in panels)
    panels = [np.pad(p, ((0, height - p.shape[0]), (0, 0), (0, 0)), constant_values=255) for p in panels]
    panels += [np.full_like(panels[0], 255)] * (-len(panels) % 3)
    rows = [np.concatenate(panels[i : i + 3], axis=1) for i in range(0, len(panels), 3)]
    image = Image.fromarray(np.concatenate(rows, axis=0))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--chase_dir",
        default=os.environ.get("CHASE_DIR", str(SOURCE_ROOT.parent / "shared" / "data" / "vessels" / "CHASEDB1_x3")),
    )
    parser.add_argument("--checkpoint", default=str(SOURCE_ROOT / "bundles" / "vessels" / "models" / "model.pt"))
    parser.add_argument("--prepared_dir", default=None, help="default: data/benchmarks/chase_reduced_<factor>")
    parser.add_argument("--factor", type=int, default=3, help="reduction of the 3x release (3: its original size)")
    parser.add_argument(
        "--condition",
        action="append",
        default=None,
        metavar="NAME=OVERRIDES",
        help=f"an extra condition beside {', '.join(CONDITIONS)}, e.g. 'clahe=--clahe True'",
    )
    parser.add_argument("--out", default=str(PROJECT_ROOT / "data" / "benchmarks" / "vessels_cross_camera.json"))
    args = parser.parse_args(argv)
    chase_dir, checkpoint = Path(args.chase_dir), Path(args.checkpoint)
    if not chase_dir.is_dir():
        print(f"skipped: {chase_dir} is absent (set CHASE_DIR or --chase_dir)")
        return 0
    require_model(checkpoint)
    conditions = dict(CONDITIONS)
    for text in args.condition or []:
        name, _, overrides = text.partition("=")
        conditions[name] = shlex.split(overrides)
    prepared = args.prepared_dir or PROJECT_ROOT / "data" / "benchmarks" / f"chase_reduced_{args.factor}"
    dataset_dir = prepare(chase_dir, Path(prepared), args.factor)
    results = {}
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="cross_camera_") as work:
        for name, overrides in conditions.items():
            typed = with_trained_settings(overrides, checkpoint)  # what the command line gets, printed and kept
            print(f"[{len(results) + 1}/{len(conditions)}] {name}: inferring {dataset_dir} {' '.join(typed)}")
            results[name] = infer(dataset_dir, checkpoint, typed, Path(work), name)
            mean = results[name]["mean"]
            print(
                f"    F1 {mean['f1']:.4f} (whole image {mean['whole_image_f1']:.4f})  sensitivity "
                f"{mean['sensitivity']:.4f}  AUC {mean['auc']:.4f}  worst {', '.join(results[name]['worst'])}  "
                f"({results[name]['seconds_per_image']:.1f} s per image with start-up)\n    F1 within 1 px "
                f"{mean['f1_within_1px']:.4f}  centre lines {mean['centreline_length_ratio']:.2f} x the annotated  "
                f"width {mean['median_width_px_prediction']:.1f} px (annotated {mean['median_width_px_reference']:.1f})"
                f"  false positives within 2 px of a vessel {mean['false_positives_within_2px']:.0%}"
            )
        picture = draw_worst_case(dataset_dir, Path(work), results, out.with_suffix(".png"))
        print(f"picture: {picture}")
    summary = {
        "dataset": f"{chase_dir} reduced by {args.factor} (3: the original release size), "
        f"{len(results[name]['per_image'])} photographs, no FOV masks",
        "checkpoint": str(checkpoint),
        "conditions": results,
    }
    write_report(out, summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
