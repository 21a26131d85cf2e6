"""The oct_layers bundle on B-scans holding more rows around the retina than its training's: framed and not.

    python -m clinseg.pipelines.benchmarks.oct_depths --checkpoint PATH/models/model.pt [--depths 1 1.5 2 3]

A deeper scan (another scanner's depth range) or an export padded above and below shows the network, once resized
to its input, a retina thinner than any it learnt. Inference frames such a B-scan first (``FrameRetinad``: bands
cut off, then a window of rows that puts the retina at the learnt share of the rows); without it such B-scans are
refused (``RequireRetinaHeightd``). This measures what the framing gives against what the network gives unframed:

1. writes the validation B-scans of the dataset (the NR206 sample's by default, with the ``nr206.json`` overlay)
   with ``depth`` times their rows, under ``data/benchmarks/`` (never into the repository's tracked files): the
   rows added above and below are the scan's own background there (the vitreous above the retina and the tissue
   below it, mirrored outwards: a deeper scan of the same eye), or ``--padding uniform`` black bands;
2. runs the bundle's inference over each depth twice: ``framed`` (the defaults) and ``unframed`` (``--frame_retina
   False`` with the checks that would refuse it lifted, the retina's height and the layer order: what the network
   answers without the framing);
3. scores each label map on the B-scan's own grid against the labels given the same rows of background, with the
   bundle's own metrics: Dice per layer and the mean absolute error of each layer's thickness per column, the mean
   over the B-scans. Prints a line per depth and condition, writes the JSON and a captioned picture beside it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from clinseg.pipelines.benchmarks import save_panels, write_report
from clinseg.pipelines.benchmarks.oct_nr206 import CONFIGS, TRAINING, nr206_dir, run_bundle
from clinseg.pipelines.paths import PROJECT_ROOT
from clinseg.transforms.oct import IGNORE_INDEX, retina_rows

INFERENCE = [str(CONFIGS / "inference.json"), str(CONFIGS / "nr206.json")]
CONDITIONS = {
    "framed": {},
    "unframed": {
        "frame_retina": False,
        "max_retina_height_ratio": 100.0,
        "max_padding_fraction": 1.0,
        "max_layer_order_relabelled": 1.0,
    },
}


def validation_bscans(dataset_dir: str) -> list[dict]:
    """The validation B-scans of ``dataset_dir`` as the bundle reads them: ``{"id", "image", "label"}``, the image
    as its file holds it (grey) and the label map decoded by the overlay's own ``load_transforms``."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose
    from PIL import Image

    parser = ConfigParser()
    parser.read_config(TRAINING)
    parser["dataset_dir"] = dataset_dir
    load = Compose(parser.get_parsed_content("load_transforms"))
    scans = []
    for item in parser.get_parsed_content("validate#datalist"):
        loaded = load(dict(item))
        label = np.asarray(loaded["label"]).reshape(np.shape(loaded["label"])[-2:])
        image = np.asarray(Image.open(item["image"]).convert("L"))
        scans.append({"id": Path(item["image"]).stem, "image": image, "label": label.astype(np.int64)})
    return scans


def mirrored(band: np.ndarray, rows: int) -> np.ndarray:
    """``rows`` rows continuing ``band`` beyond its first row, the nearest first: the band, then upside down, and so
    on (a mirror tiling, so the texture runs on without a seam)."""
    tiles, flip = [], False
    while sum(len(tile) for tile in tiles) < rows:
        tiles.append(band[::-1] if flip else band)
        flip = not flip
    return np.concatenate(tiles)[:rows] if rows else band[:0]


def deepened(image: np.ndarray, label: np.ndarray, depth: float, padding: str) -> tuple[np.ndarray, np.ndarray]:
    """The B-scan and its labels with ``depth`` times the rows, the added rows split evenly above and below: the
    scan's own background beyond its retina mirrored outwards (``padding="background"``), or black."""
    added = round(label.shape[0] * (depth - 1))
    above, below = added // 2, added - added // 2
    if padding == "uniform":
        image = np.pad(image, ((above, below), (0, 0)))
    else:
        top, bottom = retina_rows(label)
        # the rows above every column's retina and below it, a few rows clear of it
        vitreous = image[: max(1, int(top.min()) - 3)]
        tissue = image[min(image.shape[0] - 1, int(bottom.max()) + 4) :]
        image = np.concatenate([mirrored(vitreous, above)[::-1], image, mirrored(tissue[::-1], below)])
    return image, np.pad(label, ((above, below), (0, 0)))


def scores(prediction: np.ndarray, label: np.ndarray, classes: list[str]) -> dict:
    """Dice of each layer and the mean absolute error of its thickness per column, scored by the bundle's own metrics
    (unannotated pixels left out, as evaluation leaves them); the means over the layers."""
    import torch

    from clinseg.pipelines.engine.metrics import METRIC_KINDS
    from clinseg.transforms.labels import OneHotWithIgnore

    truth = OneHotWithIgnore(len(classes), IGNORE_INDEX)(label[None])[None].as_subclass(torch.Tensor)
    found = torch.nn.functional.one_hot(torch.as_tensor(prediction), len(classes)).permute(2, 0, 1)[None].float()
    values = {
        measure: METRIC_KINDS[kind][0](IGNORE_INDEX)(found, truth)[0].tolist()
        for measure, kind in (("dice", "dice"), ("thickness_error_px", "layer_thickness_mae_px"))
    }
    per_layer = {measure: dict(zip(classes[1:], layers, strict=True)) for measure, layers in values.items()}
    return {
        "mean_dice": float(np.nanmean(values["dice"])),
        "mean_thickness_error_px": float(np.nanmean(values["thickness_error_px"])),
        **per_layer,
    }


def infer(folder: Path, checkpoint: Path, overrides: dict, output_dir: Path, work: Path) -> None:
    arguments = {"input_dir": str(folder), "output_dir": str(output_dir), "checkpoint_path": str(checkpoint)}
    arguments.update({"bundle_root": str(work / "bundle"), "results_writer#overwrite": True, **overrides})
    run_bundle("inferring", INFERENCE, arguments, output_dir.with_suffix(".log"), f"sqlite:///{work / 'mlflow.db'}")


def draw(scan: dict, depth: float, outputs: dict[str, Path], results: dict, path: Path) -> Path:
    """One B-scan at the deepest depth: the image, its labels, and the label map of each condition."""
    from PIL import Image

    panels = [Image.fromarray(scan["image"]).convert("RGB")]
    titles = [f"{scan['id']} with {depth:g} times its rows"]
    palette = np.array([[0, 0, 0], *[[(37 * k) % 256, (91 * k) % 256, (173 * k) % 256] for k in range(1, 256)]])
    label = np.where(scan["label"] == IGNORE_INDEX, 0, scan["label"])
    panels.append(Image.fromarray(palette[label].astype(np.uint8)))
    titles.append("labels")
    for name, folder in outputs.items():
        predicted = np.asarray(Image.open(folder / f"{scan['id']}_seg.png"))
        panels.append(Image.fromarray(palette[predicted].astype(np.uint8)))
        score = results[name]["per_bscan"][scan["id"]]
        error = score["mean_thickness_error_px"]
        titles.append(f"{name}: Dice {score['mean_dice']:.3f}, thickness error {error:.2f} px")
    return save_panels(panels, titles, 300, path)


def main(argv: list[str] | None = None) -> int:
    from PIL import Image

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", default=nr206_dir(), help="default: $NR206_DIR or the shared data")
    parser.add_argument("--checkpoint", required=True, help="a model trained with the nr206.json overlay")
    parser.add_argument("--depths", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--padding", choices=["background", "uniform"], default="background")
    parser.add_argument("--out", default=str(PROJECT_ROOT / "data" / "benchmarks" / "oct_depths.json"))
    args = parser.parse_args(argv)
    if not Path(args.dataset_dir).is_dir():
        print(f"skipped: {args.dataset_dir} is absent (set NR206_DIR or --dataset_dir)")
        return 0
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise SystemExit(f"error: --checkpoint {checkpoint}: no model; train the nr206.json overlay first.")
    if any(depth < 1 for depth in args.depths):
        raise SystemExit(f"error: --depths {args.depths}: each must be at least 1 (the B-scan's own rows).")
    from monai.bundle import ConfigParser

    classes = ConfigParser.load_config_files(INFERENCE)["class_names"]
    scans = validation_bscans(args.dataset_dir)
    out, report = Path(args.out), {}
    with tempfile.TemporaryDirectory(prefix="oct_depths_") as work:
        work = Path(work)
        for depth in sorted(args.depths):
            folder = PROJECT_ROOT / "data" / "benchmarks" / f"oct_val_depth_{depth:g}_{args.padding}"
            folder.mkdir(parents=True, exist_ok=True)
            truths = {}
            for scan in scans:
                image, label = deepened(scan["image"], scan["label"], depth, args.padding)
                Image.fromarray(image).save(folder / f"{scan['id']}.png")
                truths[scan["id"]] = {"id": scan["id"], "image": image, "label": label}
            report[f"{depth:g}"], outputs = {}, {}
            for name, overrides in CONDITIONS.items():
                outputs[name] = work / f"{depth:g}_{name}"
                infer(folder, checkpoint, overrides, outputs[name], work)
                per_bscan = {}
                for key, truth in truths.items():
                    predicted = np.asarray(Image.open(outputs[name] / f"{key}_seg.png")).astype(np.int64)
                    per_bscan[key] = scores(predicted, truth["label"], classes)
                mean = {
                    measure: float(np.mean([s[measure] for s in per_bscan.values()]))
                    for measure in ("mean_dice", "mean_thickness_error_px")
                }
                layers = {
                    measure: {c: float(np.mean([s[measure][c] for s in per_bscan.values()])) for c in classes[1:]}
                    for measure in ("dice", "thickness_error_px")
                }
                report[f"{depth:g}"][name] = {"mean": mean, **layers, "per_bscan": per_bscan}
                print(
                    f"depth {depth:g} {name:>8}: mean Dice {mean['mean_dice']:.4f}, mean thickness error "
                    f"{mean['mean_thickness_error_px']:.2f} px, lowest layer "
                    f"{min(layers['dice'].values()):.3f}",
                    flush=True,
                )
        deepest = max(args.depths)
        picture = draw(truths[scans[0]["id"]], deepest, outputs, report[f"{deepest:g}"], out.with_suffix(".png"))
        print(f"picture: {picture}")
    write_report(
        out,
        {
            "dataset": f"{args.dataset_dir}: the validation B-scans of the nr206.json overlay's split",
            "checkpoint": str(checkpoint),
            "padding": args.padding,
            "depths": report,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
