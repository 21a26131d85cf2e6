"""The ct_heart bundle's model on real CT: quality against the reference mask, the anatomy verdict, time and memory.

    python -m clinseg.pipelines.benchmarks.ct_heart_real [--checkpoint bundles/ct_heart/models/model.pt] \\
        [--out bundles/ct_heart/outputs/benchmark_real_ct.json] [--override anatomy_constraints=false] [--no-large]

The model runs with the input settings its ``model.json`` records (spacing, window size, window preset), so a
fine-tuned 1.5 mm model needs no override.

Runs the bundle's own inference config (``inference.json``, self-contained, through MONAI's ``ConfigWorkflow``,
as ``python -m monai.bundle run inferring`` does), each volume in a process of its own (so its peak memory is its
own), on each real CT of the TotalSegmentator test files in ``$SHARED_DATA_DIR/ct/totalsegmentator`` (default
``../shared/data``):

- ``pulmonary_report/ct_cropped.nii.gz`` and ``aorta_report/ct_cropped.nii.gz`` (one patient, two fields of view),
  scored against ``pulmonary_report/heart.nii.gz`` resampled onto each CT's grid through the affines (nearest
  neighbour). That mask is a model output (TotalSegmentator), a silver standard, not a manual delineation.
- ``example_ct_dicom`` (a 40 mm abdominal slab, no heart) as a DICOM input, and ``example_ct.nii.gz`` (abdomen to
  femurs, no heart): the heart volume they are given, or the verdict that they hold none.
- unless ``--no-large``, a 512 x 512 x 200 phantom (a chest phantom resampled onto that grid), for the time a
  full-size CT takes.

Per volume: the anatomy verdict (``field_of_view``, ``heart_expected``, flags), the reported volume (or that it was
withheld) and the segmented volume in mL, Dice, 95th-percentile Hausdorff distance and average symmetric surface
distance in mm against the reference, wall time (reading, preprocessing, sliding window, inversion, checks,
writing) and peak resident memory. Prints a table, writes JSON; the orthogonal views of each result are in the
work folder (``<case>/<id>_views.png``).
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

from clinseg.datasets.ct.volumes import voxel_volume_ml
from clinseg.pipelines import runs
from clinseg.pipelines.benchmarks import shared_data_dir
from clinseg.pipelines.cli import parse_overrides
from clinseg.pipelines.export import require_trained_settings
from clinseg.pipelines.paths import SOURCE_ROOT

CONFIGS = SOURCE_ROOT / "bundles" / "ct_heart" / "configs"


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


def scores(prediction: np.ndarray, reference: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    from monai.metrics import compute_average_surface_distance, compute_dice, compute_hausdorff_distance

    def onehot(mask):
        return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))

    p, r = onehot(prediction), onehot(reference)
    spacing = [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)]
    voxel_ml = voxel_volume_ml(affine)  # as the writer reports volumes: the determinant (a sheared grid's too)
    predicted_ml, reference_ml = float(prediction.sum()) * voxel_ml, float(reference.sum()) * voxel_ml
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
        # a rerun with the same --work_dir writes over this benchmark's own earlier masks, by name
        **{"results_writer#overwrite": True},
        **overrides,
    )
    started = time.perf_counter()
    workflow.initialize()
    workflow.run()
    return time.perf_counter() - started


def _infer_in_child(queue, *args) -> None:
    try:
        seconds = infer(*args)
        queue.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, None))
    except BaseException as e:  # noqa: BLE001 - reported by the parent, with the case's name
        queue.put((None, None, f"{type(e).__name__}: {e}"))


def infer_isolated(source: Path, output_dir: Path, checkpoint: Path, overrides: dict) -> tuple[float, float]:
    """``infer`` in a fresh process: its wall time and its own peak resident memory (MiB)."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_infer_in_child, args=(queue, source, output_dir, checkpoint, overrides))
    process.start()
    seconds, peak_mib, error = queue.get()
    process.join()
    if error:
        raise RuntimeError(f"{source}: inference failed: {error}")
    return seconds, peak_mib


def large_phantom(folder: Path, shape=(512, 512, 200)) -> Path:
    """A chest phantom resampled onto a full-size CT grid (``shape``), written as NIfTI: a timing case."""
    from scipy import ndimage

    from clinseg.datasets.ct.phantom import synthesize_ct
    from clinseg.datasets.io import save_nifti

    path = folder / "large_phantom_512.nii.gz"
    if path.is_file():
        return path
    phantom = synthesize_ct(0, region="chest")
    factors = np.array(shape) / np.array(phantom.hu.shape)
    hu = ndimage.zoom(phantom.hu, factors, order=1)[: shape[0], : shape[1], : shape[2]]
    affine = phantom.affine.copy()
    affine[:3, :3] = affine[:3, :3] / factors
    folder.mkdir(parents=True, exist_ok=True)
    save_nifti(path, hu.astype(np.int16), affine)
    return path


def main(argv: list[str] | None = None) -> int:
    import nibabel as nib

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=str(shared_data_dir() / "ct" / "totalsegmentator"))
    parser.add_argument("--checkpoint", default=str(SOURCE_ROOT / "bundles" / "ct_heart" / "models" / "model.pt"))
    parser.add_argument(
        "--out", default=str(SOURCE_ROOT / "bundles" / "ct_heart" / "outputs" / "benchmark_real_ct.json")
    )
    parser.add_argument("--work_dir", default=None, help="where the masks and pictures go (default: a temp dir)")
    parser.add_argument("--override", nargs="*", default=[], help="config overrides KEY=JSON, as at training")
    parser.add_argument("--no-large", action="store_true", help="skip the 512 x 512 x 200 timing case")
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
    # the model runs as it was trained (its model.json's input settings: a fine-tuned 1.5 mm model on the 1.5 mm
    # grid); an override that contradicts them is refused here, once, before any case runs
    record = runs.record_of(checkpoint) or {}
    overrides = {**runs.flat_settings(record.get("input_settings")), **parse_overrides(args.override)}
    require_trained_settings("ct_heart", checkpoint, overrides)
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="ct_heart_benchmark_"))
    heart = data_dir / "pulmonary_report" / "heart.nii.gz"
    cases = {
        "pulmonary_ct_cropped": (data_dir / "pulmonary_report" / "ct_cropped.nii.gz", heart),
        "aorta_ct_cropped": (data_dir / "aorta_report" / "ct_cropped.nii.gz", heart),
        "example_ct_dicom": (data_dir / "example_ct_dicom", None),
        "example_ct_abdomen": (data_dir / "example_ct.nii.gz", None),
    }
    if not args.no_large:
        cases["large_phantom_512"] = (large_phantom(work_dir / "inputs"), None)
    results = {}
    for name, (source, label) in cases.items():
        if not source.exists():
            print(f"skipping {name}: {source} is absent")
            continue
        out = work_dir / name
        print(f"{name}: {source}", flush=True)
        seconds, case_peak_mib = infer_isolated(source, out, checkpoint, overrides)
        case_id = source.name if source.is_dir() else source.name.removesuffix(".nii.gz")
        mask_image = nib.load(out / f"{case_id}_seg.nii.gz")
        prediction = np.asarray(mask_image.dataobj) > 0
        spacing = np.linalg.norm(mask_image.affine[:3, :3], axis=0)
        summary = json.loads((out / f"{case_id}.json").read_text())
        entry = {
            "input": str(source),
            "shape": list(prediction.shape),
            "spacing_mm": spacing.round(4).tolist(),
            "inference_s": round(seconds, 2),
            "peak_rss_mib": round(case_peak_mib, 1),
            "field_of_view": summary.get("field_of_view"),
            "heart_expected": summary.get("heart_expected"),
            "anatomy_flags": summary.get("anatomy_flags", []),
            "outside_anatomy_ml": (summary.get("anatomy") or {}).get("outside_anatomy_ml", {}),
            "constraints_applied": (summary.get("anatomy") or {}).get("constraints_applied"),
            "reported_volume_ml": summary["volume_ml"].get("heart"),
            "volume_withheld": summary.get("volume_withheld"),
            "mask": str(out / f"{case_id}_seg.nii.gz"),
            "views": str(out / f"{case_id}_views.png"),
        }
        if label is not None:
            entry.update(scores(prediction, reference_on_grid(source, label), mask_image.affine))
        else:
            entry["predicted_volume_ml"] = round(float(prediction.sum()) * voxel_volume_ml(mask_image.affine), 2)
        results[name] = entry
    report = {
        "checkpoint": str(checkpoint),
        "checkpoint_mtime": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(checkpoint.stat().st_mtime)),
        # the training run, and for a fine-tuned model what it started from and the settings it was trained with
        "model": {
            **runs.provenance(checkpoint),
            **{k: record.get(k) for k in ("initialized_from", "input_settings")},
        },  # fmt: skip
        "overrides": overrides,
        "reference": "TotalSegmentator model output (silver standard), resampled to each CT grid by nearest neighbour",
        "cases": results,
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": sys.version.split()[0],
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
    }
    header = f"{'case':<22}{'field':>15}{'heart':>9}{'dice':>7}{'hd95':>7}{'assd':>7}{'seg mL':>8}{'ref mL':>8}"
    print("\n" + header + f"{'reported':>10}{'s':>7}{'MiB':>7}")
    for name, entry in results.items():
        cells = [entry.get(k) for k in ("dice", "hd95_mm", "assd_mm")]
        text = "".join(f"{c:>7.3f}" if isinstance(c, float) else f"{'-':>7}" for c in cells)
        volumes = [entry.get(k) for k in ("predicted_volume_ml", "reference_volume_ml", "reported_volume_ml")]
        text += "".join(f"{v:>8.0f}" if isinstance(v, (int, float)) else f"{'-':>8}" for v in volumes[:2])
        reported = volumes[2]
        text += f"{reported:>10.0f}" if isinstance(reported, (int, float)) else f"{'withheld':>10}"
        print(
            f"{name:<22}{entry['field_of_view'] or '-':>15}{entry['heart_expected'] or '-':>9}{text}"
            f"{entry['inference_s']:>7.1f}{entry['peak_rss_mib']:>7.0f}"
        )
        if entry["anatomy_flags"]:
            done = "removed" if entry["constraints_applied"] else "flagged only"
            print(
                f"{'':<22}flags: {', '.join(entry['anatomy_flags'])}; outside the anatomy ({done}): "
                f"{entry['outside_anatomy_ml']} mL"
            )
    print(f"time and peak resident memory per volume, each in its own process; outputs in {work_dir}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
