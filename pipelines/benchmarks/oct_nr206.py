"""Quality of the oct_layers bundle on the real NR206 sample: per-layer Dice and thickness error over seeds.

    python -m clinseg.pipelines.benchmarks.oct_nr206 --seeds 0 1 2 \\
        --out bundles/oct_layers/outputs/benchmark_nr206.json [--set KEY=JSON ...]

For each seed, one after the other (the CPU is shared by nothing else):

1. trains the ``nr206.json`` overlay with ``python -m monai.bundle run training`` (the command a user runs), into
   a bundle root of its own under the work folder, tracked in MLflow like any training;
2. evaluates its best checkpoint with ``python -m monai.bundle run evaluating`` on the sample's validation B-scans,
   on each B-scan's own grid: Dice, HD95 and thickness error per layer;
3. reads the training's validation curve back from MLflow, so the best epoch can be told from the level: the mean
   of the last ten validations, overall and per layer, is what the recipe gives, where the best epoch is also its
   luckiest draw on the same two B-scans.

With two seeds or more the seeds' models are also evaluated as one ensemble (probabilities averaged). The report
(seeds, their mean, the lowest layer of any run, issue 16's targets and whether they are met) is printed and
written as JSON, with a captioned picture beside it (``<out>.png``): the validation curves and the per-layer Dice.
``--set`` measures one choice against the overlay, exactly as the bundle's command line would take it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clinseg.datasets.io import atomic_write
from clinseg.pipelines.benchmarks import shared_data_dir, write_report
from clinseg.pipelines.cli import add_set_argument, parse_overrides
from clinseg.pipelines.config_checks import check_override_keys
from clinseg.pipelines.paths import SOURCE_ROOT
from clinseg.pipelines.tracking import client_for, default_tracking_uri, mlflow_metric_name

CONFIGS = SOURCE_ROOT / "bundles" / "oct_layers" / "configs"
TRAINING = [str(CONFIGS / "train.json"), str(CONFIGS / "nr206.json")]
EVALUATION = [*TRAINING, str(CONFIGS / "evaluate.json")]
KEY_METRIC = "val_mean_dice"
# issue 16: the OCT seed's Dice with 80 training B-scans, and no layer left behind
TARGETS = {"mean_dice": 0.874, "lowest_layer_dice": 0.80}
LAST_VALIDATIONS = 10


def nr206_dir() -> str:
    """The NR206 sample: ``$NR206_DIR``, else in the shared real data (the overlay's own default)."""
    return os.environ.get("NR206_DIR", str(shared_data_dir() / "oct" / "NR206_sample"))


def run_bundle(workflow: str, configs: list[str], arguments: dict, log: Path, tracking_uri: str) -> None:
    """One ``python -m monai.bundle run`` in a process of its own, its output in ``log``; a failure stops the
    benchmark with the command's last line and the log's path."""
    command = [sys.executable, "-m", "monai.bundle", "run", workflow, "--config_file", str(configs)]
    for key, value in arguments.items():
        command += [f"--{key}", value if isinstance(value, str) else repr(value)]  # Python literals, as fire reads them
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri}
    with open(log, "w") as output:
        result = subprocess.run(command, cwd=SOURCE_ROOT, stdout=output, stderr=subprocess.STDOUT, env=env)
    if result.returncode:
        lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
        raise SystemExit(f"{workflow} failed (exit {result.returncode}): {lines[-1] if lines else ''} (log: {log})")


def only(paths: list[Path], what: str) -> Path:
    if len(paths) != 1:
        raise SystemExit(f"expected one {what}, found {len(paths)}: {[str(p) for p in paths]}")
    return paths[0]


def validation_curves(tracking_uri: str, run_id: str, layers: list[str]) -> dict[str, list[float]]:
    """The training's validation values per epoch, from its MLflow run: the key metric and each layer's Dice."""
    client = client_for(tracking_uri)
    names = {"mean": mlflow_metric_name(KEY_METRIC, key_metric=KEY_METRIC)}
    names.update({layer: mlflow_metric_name(f"{KEY_METRIC}/{layer}") for layer in layers})
    curves = {}
    for label, name in names.items():
        history = sorted(client.get_metric_history(run_id, name), key=lambda m: m.step)
        curves[label] = [m.value for m in history]
    return curves


def tail_mean(values: list[float], n: int = LAST_VALIDATIONS) -> float | None:
    return round(statistics.fmean(values[-n:]), 4) if values else None


def evaluate(root: Path, checkpoints: list[Path], args: argparse.Namespace, overrides: dict) -> dict:
    """The bundle's evaluation of one checkpoint, or of several as one ensemble: its ``metrics.json``."""
    checkpoint = str(checkpoints[0]) if len(checkpoints) == 1 else str([str(c) for c in checkpoints])
    arguments = {"bundle_root": str(root), "dataset_dir": args.dataset_dir, "checkpoint_path": checkpoint}
    arguments.update({"run_name": "eval", **overrides})
    run_bundle("evaluating", EVALUATION, arguments, root / "evaluation.log", args.tracking_uri)
    return json.loads((root / "outputs" / "eval" / "metrics.json").read_text())


def layer_scores(metrics: dict) -> dict:
    per_class = metrics["per_class"]
    dice = {layer: round(v, 4) for layer, v in per_class["val_mean_dice"].items()}
    lowest = min(dice, key=dice.get)
    return {
        "mean_dice": round(metrics["mean"]["val_mean_dice"], 4),
        "dice": dice,
        "thickness_mae_px": {k: round(v, 3) for k, v in per_class["val_thickness_mae_px"].items()},
        "hd95_px": round(metrics["mean"]["val_hd95"], 2),
        "lowest_layer": {"layer": lowest, "dice": dice[lowest]},
    }


def one_seed(seed: int, args: argparse.Namespace, overrides: dict, work_dir: Path) -> dict:
    root = work_dir / f"seed{seed}"
    root.mkdir(parents=True, exist_ok=False)  # a seed's folder is its own: never reused
    arguments = {"bundle_root": str(root), "dataset_dir": args.dataset_dir, "seed": seed, **overrides}
    print(f"seed {seed}: training (log {root / 'training.log'})", flush=True)
    started = time.perf_counter()
    run_bundle("training", TRAINING, arguments, root / "training.log", args.tracking_uri)
    training_s = time.perf_counter() - started
    models = only(sorted((root / "outputs").glob("train-*/models")), "training run folder")
    record = json.loads((models / "model.json").read_text())
    scores = layer_scores(evaluate(root, [models / "model.pt"], args, overrides))
    curves = validation_curves(args.tracking_uri, record["training_run_id"], list(scores["dice"]))
    result = {
        "seed": seed,
        "training_s": round(training_s, 1),
        "epochs": len(curves["mean"]),
        "best_epoch": record["epoch"],
        "checkpoint": str(models / "model.pt"),
        "training_run_id": record["training_run_id"],
        **scores,
        "last_validations": {
            "n": LAST_VALIDATIONS,
            "mean_dice": tail_mean(curves["mean"]),
            "dice": {layer: tail_mean(curves[layer]) for layer in scores["dice"]},
        },
        "validation_curve": [round(v, 4) for v in curves["mean"]],
    }
    print(
        f"seed {seed}: best mean Dice {result['mean_dice']:.4f} (epoch {result['best_epoch']} of "
        f"{result['epochs']}), last {LAST_VALIDATIONS} {result['last_validations']['mean_dice']:.4f}, lowest layer "
        f"{scores['lowest_layer']['layer']} {scores['lowest_layer']['dice']:.3f}, {training_s:.0f} s",
        flush=True,
    )
    return result


def summarise(seeds: list[dict], ensemble: dict | None) -> dict:
    layers = list(seeds[0]["dice"])
    mean_dice = round(statistics.fmean(s["mean_dice"] for s in seeds), 4)
    lowest = min(min(s["dice"].values()) for s in seeds)
    return {
        "mean_dice": mean_dice,
        "mean_dice_spread": [min(s["mean_dice"] for s in seeds), max(s["mean_dice"] for s in seeds)],
        "dice": {layer: round(statistics.fmean(s["dice"][layer] for s in seeds), 4) for layer in layers},
        "thickness_mae_px": {
            layer: round(statistics.fmean(s["thickness_mae_px"][layer] for s in seeds), 3) for layer in layers
        },
        "last_validations_mean_dice": round(statistics.fmean(s["last_validations"]["mean_dice"] for s in seeds), 4),
        "lowest_layer_dice_of_any_run": lowest,
        "targets": TARGETS,
        "met": {
            "mean_dice": mean_dice >= TARGETS["mean_dice"],
            "lowest_layer_dice": lowest >= TARGETS["lowest_layer_dice"],
            "ensemble_lowest_layer_dice": None
            if ensemble is None
            else ensemble["lowest_layer"]["dice"] >= TARGETS["lowest_layer_dice"],
        },
    }


def draw(report: dict, path: Path) -> Path:
    """Left: each seed's validation mean Dice per epoch (its best epoch marked). Right: the per-layer Dice of each
    seed's best checkpoint and of the ensemble, with the 0.80 floor. A caption says what is shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (curves, layers) = plt.subplots(1, 2, figsize=(11, 4.4))
    for seed in report["seeds"]:
        epochs = range(1, len(seed["validation_curve"]) + 1)
        (line,) = curves.plot(epochs, seed["validation_curve"], linewidth=1, label=f"seed {seed['seed']}")
        best = seed["best_epoch"]
        if 1 <= best <= len(seed["validation_curve"]):
            curves.plot([best], [seed["validation_curve"][best - 1]], "o", color=line.get_color())
    curves.axhline(TARGETS["mean_dice"], linestyle=":", color="grey", linewidth=0.8)
    curves.set_xlabel("epoch")
    curves.xaxis.get_major_locator().set_params(integer=True)
    curves.set_ylabel("validation mean layer Dice")
    all_values = [v for s in report["seeds"] for v in s["validation_curve"][len(s["validation_curve"]) // 4 :]]
    curves.set_ylim(max(0.0, min(all_values + [TARGETS["mean_dice"]]) - 0.01), min(1.0, max(all_values + [0.0]) + 0.02))
    curves.legend(fontsize=8)

    names = list(report["seeds"][0]["dice"])
    rows = [(f"seed {s['seed']}", s["dice"]) for s in report["seeds"]]
    if report.get("ensemble"):
        rows.append(("ensemble", report["ensemble"]["dice"]))
    width = 0.8 / len(rows)
    for i, (label, dice) in enumerate(rows):
        positions = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(names))]
        layers.bar(positions, [dice[name] for name in names], width=width, label=label)
    layers.axhline(TARGETS["lowest_layer_dice"], linestyle=":", color="grey", linewidth=0.8)
    layers.set_xticks(range(len(names)), names, fontsize=8)
    lowest = min(min(dice.values()) for _, dice in rows)
    layers.set_ylim(max(0.0, min(0.6, lowest - 0.05)), 1.0)
    layers.set_ylabel("Dice, best checkpoint")
    layers.legend(fontsize=7, ncol=2)
    summary = report["summary"]
    caption = (
        f"oct_layers on the NR206 sample ({len(report['seeds'])} seeds, validation B-scans on their own grid): "
        f"mean layer Dice {summary['mean_dice']:.3f} at the best epoch, {summary['last_validations_mean_dice']:.3f} "
        f"over the last {LAST_VALIDATIONS} epochs; lowest layer of any run "
        f"{summary['lowest_layer_dice_of_any_run']:.3f} "
        f"(dotted: the targets {TARGETS['mean_dice']} and {TARGETS['lowest_layer_dice']})."
    )
    figure.text(0.01, 0.01, caption, fontsize=8, wrap=True)
    figure.tight_layout(rect=(0, 0.07, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return atomic_write(path, lambda tmp: figure.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", default=nr206_dir(), help="default: $NR206_DIR or the shared data")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no_ensemble", action="store_true", help="skip the evaluation of the seeds as one ensemble")
    parser.add_argument(
        "--out", default=str(SOURCE_ROOT / "bundles" / "oct_layers" / "outputs" / "benchmark_nr206.json")
    )
    parser.add_argument("--work_dir", default=None, help="where the seeds' bundle roots go (default: a temp dir)")
    parser.add_argument("--tracking_uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or mlruns/)")
    add_set_argument(parser, "the overlay", "speckle_prob=0.3")
    args = parser.parse_args(argv)
    overrides = parse_overrides(args.set)
    check_override_keys(TRAINING, overrides)
    if not (Path(args.dataset_dir) / "train").is_dir():
        print(f"NR206 sample not found: {args.dataset_dir} (pass --dataset_dir or set NR206_DIR)")
        return 2
    if len(set(args.seeds)) != len(args.seeds):
        print(f"--seeds: each seed once, got {args.seeds}")
        return 2
    args.tracking_uri = args.tracking_uri or default_tracking_uri()
    work_dir = Path(args.work_dir or tempfile.mkdtemp(prefix="oct_nr206_benchmark_"))
    work_dir.mkdir(parents=True, exist_ok=True)
    taken = [name for name in [f"seed{seed}" for seed in args.seeds] + ["ensemble"] if (work_dir / name).exists()]
    if taken:  # each run owns its folder: an earlier benchmark's results are never written over
        print(f"{work_dir}: already holds {', '.join(taken)} of an earlier run; pass another --work_dir")
        return 2

    seeds = [one_seed(seed, args, overrides, work_dir) for seed in args.seeds]
    ensemble = None
    if len(seeds) > 1 and not args.no_ensemble:
        root = work_dir / "ensemble"
        root.mkdir(exist_ok=False)
        members = [Path(s["checkpoint"]) for s in seeds]
        ensemble = {"members": [s["seed"] for s in seeds], **layer_scores(evaluate(root, members, args, overrides))}
        print(
            f"ensemble of seeds {ensemble['members']}: mean Dice {ensemble['mean_dice']:.4f}, lowest layer "
            f"{ensemble['lowest_layer']['layer']} {ensemble['lowest_layer']['dice']:.3f}",
            flush=True,
        )
    report = {
        "dataset_dir": str(Path(args.dataset_dir).resolve()),
        "configs": [str(Path(c).relative_to(SOURCE_ROOT)) for c in TRAINING],
        "overrides": overrides,
        "tracking_uri": args.tracking_uri,
        "seeds": seeds,
        "ensemble": ensemble,
        "summary": summarise(seeds, ensemble),
        "work_dir": str(work_dir),
    }
    out = write_report(args.out, report)
    picture = draw(report, out.with_suffix(".png"))
    summary = report["summary"]
    print(
        f"mean layer Dice {summary['mean_dice']:.4f} (seeds {summary['mean_dice_spread'][0]:.4f}-"
        f"{summary['mean_dice_spread'][1]:.4f}), last {LAST_VALIDATIONS} epochs "
        f"{summary['last_validations_mean_dice']:.4f}; per layer "
        + " ".join(f"{v:.3f}" for v in summary["dice"].values())
        + f"; lowest layer of any run {summary['lowest_layer_dice_of_any_run']:.3f}; targets met: {summary['met']}"
    )
    print(f"picture: {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
