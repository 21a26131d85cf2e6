"""The ct_heart bundle's model on real chest CT: quality against the reference mask, time and memory per volume.

    python -m clinseg.pipelines.benchmarks.ct_heart_real [--checkpoint bundles/ct_heart/models/model.pt] \\
        [--out bundles/ct_heart/outputs/benchmark_real_ct.json]

Runs the bundle's own inference config (``inference.json``, self-contained, through MONAI's ``ConfigWorkflow``,
as ``python -m monai.bundle run inferring`` does) on each real CT of the TotalSegmentator test files in
``$SHARED_DATA_DIR/ct/totalsegmentator`` (default ``../shared/data``):

- ``pulmonary_report/ct_cropped.nii.gz`` and ``aorta_report/ct_cropped.nii.gz`` (one patient, two fields of view),
  scored against ``pulmonary_report/heart.nii.gz`` resampled onto each CT's grid through the affines (nearest
  neighbour). That mask is a model output (TotalSegmentator), a silver standard, not a manual delineation.
- ``example_ct_dicom`` (abdomen, no heart) as a DICOM input: timed, and its predicted heart volume reported.

Scores: Dice, 95th-percentile Hausdorff distance and average symmetric surface distance in mm (voxel spacing
honoured), predicted and reference heart volume in mL, relative volume error. Also wall time per volume (reading,
preprocessing, sliding window, inversion, writing) and the peak resident memory. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from clinseg.pipelines.cli import parse_overrides
from clinseg.pipelines.metrics import volume_ml
from clinseg.pipelines.paths import PROJECT_ROOT as REPO_ROOT

CONFIGS = REPO_ROOT / "bundles" / "ct_heart" / "configs"


def reference_on_grid(image_path: Path, label_path: Path) -> np.ndarray:
    """The reference mask on the image's grid, through the bundle's own loader and label alignment."""
    from monai.transforms import Compose, EnsureChannelFirstd

    from clinseg.datasets.ct import LoadCTVolumed
    from clinseg.transforms.ct import AlignToImaged

    load = Compose(
        [
            LoadCTVolumed(["image", "label"]),
            EnsureChannelFirstd(["image", "label"]),
            AlignToImaged("label"),
        ]
    )
    return load({"image": str(image_path), "label": str(label_path)})["label"][0].numpy() > 0


def scores(prediction: np.ndarray, reference: np.ndarray, spacing: np.ndarray) -> dict[str, float]:
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

    def onehot(mask):
        return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))

    p, r = onehot(prediction), onehot(reference)
    spacing = [float(s) for s in spacing]
    predicted_ml, reference_ml = volume_ml(prediction, spacing), volume_ml(reference, spacing)
    return {
        "dice": float(compute_dice(p, r, include_background=False)),
        "hd95_mm": float(compute_hausdorff_distance(p, r, percentile=95, spacing=spacing)),
        "assd_mm": float(compute_average_surface_distance(p, r, symmetric=True, spacing=spacing)),
        "predicted_volume_ml": round(predicted_ml, 2),
        "reference_volume_ml": round(reference_ml, 2),
        "relative_volume_error": (predicted_ml - reference_ml) / reference_ml,
    }


def infer(source: Path, output_dir: Path, checkpoint: Path, overrides: dict) -> float:
    """Run the bundle's inference on one input; its wall time in seconds."""
    from monai.bundle import ConfigWorkflow

    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"),
        workflow_type="infer",
        input_path=str(source),
        output_dir=str(output_dir),
        checkpoint_path=str(checkpoint),
        **overrides,
    )
    started = time.perf_counter()
    workflow.initialize()
    workflow.run()
    return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    import nibabel as nib

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = Path(os.environ.get("SHARED_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
    parser.add_argument("--data_dir", default=str(shared / "ct" / "totalsegmentator"))
    parser.add_argument("--checkpoint", default=str(REPO_ROOT / "bundles" / "ct_heart" / "models" / "model.pt"))
    parser.add_argument("--out", default=str(REPO_ROOT / "bundles" / "ct_heart" / "outputs" / "benchmark_real_ct.json"))
    parser.add_argument("--work_dir", default=None, help="where the masks and pictures go (default: a temp dir)")
    parser.add_argument("--override", nargs="*", default=[], help="config overrides KEY=JSON, as at training")
    args = parser.parse_args(argv)
    data_dir, checkpoint = Path(args.data_dir), Path(args.checkpoint)
    if not data_dir.is_dir():
        print(f"real CT folder not found: {data_dir} (pass --data_dir or set SHARED_DATA_DIR)")
        return 2
    if not checkpoint.is_file():
        print(
            f"no checkpoint at {checkpoint}: train first (python -m monai.bundle run training --config_file "
            "bundles/ct_heart/configs/train.json) or pass --checkpoint"
        )
        return 2
    overrides = parse_overrides(args.override)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="ct_heart_benchmark_"))
    heart = data_dir / "pulmonary_report" / "heart.nii.gz"
    cases = {
        "pulmonary_ct_cropped": (data_dir / "pulmonary_report" / "ct_cropped.nii.gz", heart),
        "aorta_ct_cropped": (data_dir / "aorta_report" / "ct_cropped.nii.gz", heart),
        "example_ct_dicom": (data_dir / "example_ct_dicom", None),
    }
    results = {}
    for name, (source, label) in cases.items():
        if not source.exists():
            print(f"skipping {name}: {source} is absent")
            continue
        out = work_dir / name
        seconds = infer(source, out, checkpoint, overrides)
        case_id = source.name if source.is_dir() else source.name.removesuffix(".nii.gz")
        mask_image = nib.load(out / f"{case_id}_seg.nii.gz")
        prediction = np.asarray(mask_image.dataobj) > 0
        spacing = np.linalg.norm(mask_image.affine[:3, :3], axis=0)
        entry = {
            "input": str(source),
            "shape": list(prediction.shape),
            "spacing_mm": spacing.round(4).tolist(),
            "inference_s": round(seconds, 2),
            "mask": str(out / f"{case_id}_seg.nii.gz"),
            "views": str(out / f"{case_id}_views.png"),
        }
        if label is not None:
            entry.update(scores(prediction, reference_on_grid(source, label), spacing))
        else:
            entry["predicted_volume_ml"] = round(volume_ml(prediction, spacing), 2)
        results[name] = entry
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    report = {
        "checkpoint": str(checkpoint),
        "checkpoint_mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(checkpoint.stat().st_mtime)),
        "overrides": overrides,
        "reference": "TotalSegmentator model output (silver standard), resampled to each CT grid by nearest neighbour",
        "cases": results,
        "peak_rss_mib": round(peak_mib, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    print(f"\n{'case':<22}{'dice':>7}{'hd95 mm':>9}{'assd mm':>9}{'pred mL':>9}{'ref mL':>9}{'time s':>8}")
    for name, entry in results.items():
        cells = [entry.get(k) for k in ("dice", "hd95_mm", "assd_mm", "predicted_volume_ml", "reference_volume_ml")]
        text = "".join(f"{c:>9.3f}" if isinstance(c, float) else f"{'-':>9}" for c in cells)
        print(f"{name:<22}{text}{entry['inference_s']:>8.1f}")
    print(f"peak resident memory {peak_mib:.0f} MiB; outputs in {work_dir}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
