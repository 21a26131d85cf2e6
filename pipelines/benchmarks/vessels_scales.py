"""A DRIVE-trained vessels model on photographs of fewer pixels than DRIVE's: its own scale against enlarged.

    python -m clinseg.pipelines.benchmarks.vessels_scales --checkpoint bundles/vessels/models/model.pt

1. Writes DRIVE's validation photographs (the default split: the photographs a default training validates on, never
   trains on) and their 1st-observer annotations at ``--scales`` of their size, as a camera of fewer pixels or a
   downsized export gives them (Lanczos for the photographs; the annotations resampled and thresholded at half),
   under ``data/benchmarks/`` (never into the repository's tracked files).
2. Runs the bundle's own inference over each size twice: ``own_scale`` (``--base_transforms#0#upscale False``: the
   photograph segmented at its size, its vessels narrower than any the network learnt) and ``enlarged`` (the
   defaults: the disc enlarged to ``fov_diameter_px``, the prediction brought back to the photograph's grid; past
   ``max_upscale`` too, which inference otherwise refuses).
3. Scores each prediction on the photograph's own grid inside its estimated field (as the cross-camera benchmark
   does), prints the mean F1 per size and condition, writes the JSON and a captioned picture of the smallest size.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from clinseg.pipelines.benchmarks import drive_training_dir, save_panels, write_report
from clinseg.pipelines.benchmarks.vessels_cross_camera import infer, require_model, with_trained_settings
from clinseg.pipelines.paths import PROJECT_ROOT, SOURCE_ROOT

# enlarged past inference's max_upscale too: the benchmark measures what that limit is chosen from
CONDITIONS = {"own_scale": ["--base_transforms#0#upscale", "False"], "enlarged": ["--max_upscale", "100"]}


def prepare(drive_dir: Path, target: Path, scale: float) -> Path:
    """``target/images/<id>.png`` and ``target/masks/<id>.png``: DRIVE's validation photographs and annotations at
    ``scale`` of their size."""
    from PIL import Image

    from clinseg.datasets.fundus import load_vessel_datalist

    for folder in ("images", "masks"):
        (target / folder).mkdir(parents=True, exist_ok=True)
    for item in load_vessel_datalist(drive_dir, "val"):
        photo = Image.open(item["image"]).convert("RGB")
        size = (max(1, round(photo.width * scale)), max(1, round(photo.height * scale)))
        mask = Image.open(item["label"]).convert("L")
        if scale != 1.0:
            photo = photo.resize(size, Image.Resampling.LANCZOS)
            mask = Image.fromarray(np.asarray(mask.resize(size, Image.Resampling.BILINEAR)) > 127)
        photo.save(target / "images" / f"{item['id']}.png")
        mask.convert("L").point(lambda v: 255 if v > 127 else 0).save(target / "masks" / f"{item['id']}.png")
    return target


def draw(dataset_dir: Path, work: Path, scale: float, results: dict, path: Path) -> Path:
    """The first photograph of the smallest size: photograph, annotation, prediction at its own scale, enlarged."""
    from PIL import Image

    stem = sorted(p.stem for p in (dataset_dir / "masks").glob("*.png"))[0]
    photo = Image.open(dataset_dir / "images" / f"{stem}.png").convert("RGB")
    panels = [photo, Image.open(dataset_dir / "masks" / f"{stem}.png").convert("RGB")]
    titles = [f"photograph {stem} at {scale:g} of DRIVE's size", "annotation"]
    for name in CONDITIONS:
        labels = np.asarray(Image.open(work / f"{scale:g}_{name}" / f"{stem}_seg.png")) > 0  # class indices
        panels.append(Image.fromarray(labels.astype(np.uint8) * 255).convert("RGB"))
        titles.append(f"{name}: F1 {results[name]['per_image'][stem]['in_field']['f1']:.3f}")
    return save_panels(panels, titles, 280, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", default=drive_training_dir(), help="default: $DRIVE_DIR or the shared data")
    parser.add_argument("--checkpoint", default=str(SOURCE_ROOT / "bundles" / "vessels" / "models" / "model.pt"))
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 0.3])
    parser.add_argument("--out", default=str(PROJECT_ROOT / "data" / "benchmarks" / "vessels_scales.json"))
    args = parser.parse_args(argv)
    drive_dir, checkpoint = Path(args.dataset_dir), Path(args.checkpoint)
    if not drive_dir.is_dir():
        print(f"skipped: {drive_dir} is absent (set DRIVE_DIR or --dataset_dir)")
        return 0
    require_model(checkpoint)
    if any(not 0 < scale <= 1 for scale in args.scales):
        raise SystemExit(f"error: --scales: {args.scales}: each must be above 0 and at most 1.")
    results: dict[str, dict] = {}
    out = Path(args.out)
    with tempfile.TemporaryDirectory(prefix="vessels_scales_") as work:
        for scale in sorted(args.scales, reverse=True):
            prepared = PROJECT_ROOT / "data" / "benchmarks" / f"drive_val_scaled_{scale:g}"
            dataset_dir = prepare(drive_dir, prepared, scale)
            results[f"{scale:g}"] = {}
            for name, overrides in CONDITIONS.items():
                typed = with_trained_settings(overrides, checkpoint)
                done = infer(dataset_dir, checkpoint, typed, Path(work), f"{scale:g}_{name}")
                results[f"{scale:g}"][name] = done
                print(
                    f"scale {scale:g} {name:>9}: F1 {done['mean']['f1']:.4f}  sensitivity "
                    f"{done['mean']['sensitivity']:.4f}  AUC {done['mean']['auc']:.4f}",
                    flush=True,
                )
        smallest = min(args.scales)
        picture = draw(dataset_dir, Path(work), smallest, results[f"{smallest:g}"], out.with_suffix(".png"))
        print(f"picture: {picture}")
    write_report(out, {"dataset": f"{drive_dir}: the default split's validation photographs", "scales": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
