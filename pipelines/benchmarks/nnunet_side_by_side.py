"""The vessels bundle and nnU-Net v2 side by side: same DRIVE split, same CPU, same training budget, same scoring.

    python -m clinseg.pipelines.benchmarks.nnunet_side_by_side --dataset_dir ../shared/data/vessels/DRIVE/training \\
        --budget_s 600

1. nnU-Net's environment: ``.venv-nnunet`` (``--nnunet_venv``), made from ``requirements-nnunet.txt`` when absent
   (torch pinned to the project's CPU build). The project's environment never imports nnU-Net.
2. The split is the bundle's own (``load_vessel_datalist``, ``val_fraction`` 0.25: DRIVE training ids 21-35 train,
   36-40 validation), converted to nnU-Net's raw layout: the RGB photographs as PNG (channels R, G, B, as a user
   would hand them over), the 1st observer's vessels as 0/1 PNG. nnU-Net plans and preprocesses it itself.
3. nnU-Net trains fold ``all`` (every training case, as the bundle does) with its own plan, network and
   augmentation, for ``--budget_s`` of wall time (``nnunet_budget_training.py``: its schedule shortened to what
   fits, the poly decay spanning it), then predicts the validation photographs with its test-time mirroring and
   without, keeping the probabilities.
4. The bundle trains with its defaults and ``--train_time_limit_s`` set to the same budget (it stops at its 60
   epochs when they take less), then its ``inference.json`` predicts the same photographs, plain and with flip TTA.
5. Every prediction is scored the same way, by the project's in-field scoring (``vessels_cross_camera.scores``):
   F1, sensitivity, specificity and AUC inside DRIVE's own FOV mask, per image, then the mean. Prediction time
   per image includes each tool's start-up (model load), as a user running it on a folder sees it.

Prints one table and writes one JSON with both tools' rows (``--out``). Long: about twice the budget plus a few
minutes, and the environment's installation the first time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from clinseg.datasets.readers import read_binary_mask
from clinseg.pipelines.benchmarks import drive_training_dir, write_report
from clinseg.pipelines.benchmarks.vessels_cross_camera import scores
from clinseg.pipelines.paths import PROJECT_ROOT, SOURCE_ROOT

CONFIGS = SOURCE_ROOT / "bundles" / "vessels" / "configs"
DATASET_ID, DATASET_NAME = 501, "Dataset501_DRIVE"
DRIVER = Path(__file__).with_name("nnunet_budget_training.py")


# the lines of a long step shown as it runs: the bundle's epoch lines, nnU-Net's epoch time and pseudo Dice
PROGRESS = re.compile(r"\| val_f1 |nnU-Net budget|Pseudo dice|Epoch time")


def run(command: list, what: str, env: dict | None = None, log: Path | None = None) -> tuple[str, float]:
    """Run ``command``, its output kept in ``log`` (and returned) and its progress lines shown as they come; stop
    the benchmark in one line if it fails."""
    print(f"  $ {' '.join(str(c) for c in command)}", flush=True)
    started = time.perf_counter()
    lines = []
    merged = {"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True}
    with subprocess.Popen([str(c) for c in command], cwd=SOURCE_ROOT, env=env, **merged) as child:
        for line in child.stdout:
            lines.append(line)
            if PROGRESS.search(line):
                print(f"    {line.strip()[-150:]}", flush=True)
    seconds = time.perf_counter() - started
    output = "".join(lines)
    if log is not None:
        log.write_text(output)
    if child.returncode != 0:
        raise SystemExit(f"error: {what} failed ({child.returncode}; log {log}):\n{output[-3000:]}")
    return output, seconds


def nnunet_environment(venv: Path) -> Path:
    """The Python of nnU-Net's environment, made from ``requirements-nnunet.txt`` when it has no nnU-Net yet."""
    python = venv / "bin" / "python"
    if not (venv / "bin" / "nnUNetv2_predict").is_file():
        print(f"installing nnU-Net into {venv} (requirements-nnunet.txt)", flush=True)
        run([sys.executable, "-m", "venv", venv], "making nnU-Net's environment")
        requirements = SOURCE_ROOT / "requirements-nnunet.txt"
        # torch first, on its own: the pinned CPU build, before nnunetv2's unpinned requirement can choose
        run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], "installing torch for nnU-Net")
        run([python, "-m", "pip", "install", "-q", "-r", requirements], "installing nnU-Net")
    return python


def nnunet_env(work: Path) -> dict:
    """nnU-Net's three folders (it reads them from the environment) under the benchmark's work folder."""
    folders = {name: work / name for name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("nnUNet_")}
    return {**env, **{name: str(folder) for name, folder in folders.items()}}


def convert(train: list[dict], validation: list[dict], raw: Path) -> Path:
    """nnU-Net's raw layout of the split: ``imagesTr``/``labelsTr`` (training), ``imagesTs`` (validation)."""
    from PIL import Image

    dataset = raw / DATASET_NAME
    if dataset.exists():
        shutil.rmtree(dataset)
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (dataset / folder).mkdir(parents=True)
    for items, images in ((train, "imagesTr"), (validation, "imagesTs")):
        for item in items:
            Image.open(item["image"]).convert("RGB").save(dataset / images / f"DRIVE_{item['id']}_0000.png")
            if images == "imagesTr":
                vessels = read_binary_mask(item["label"]).astype(np.uint8)
                Image.fromarray(vessels).save(dataset / "labelsTr" / f"DRIVE_{item['id']}.png")
    description = {
        "channel_names": {"0": "R", "1": "G", "2": "B"},
        "labels": {"background": 0, "vessel": 1},
        "numTraining": len(train),
        "file_ending": ".png",
        "name": DATASET_NAME,
    }
    (dataset / "dataset.json").write_text(json.dumps(description, indent=2))
    return dataset


def score_folder(validation: list[dict], prediction: dict[str, Path], probability: dict[str, Path]) -> dict:
    """Each validation case's prediction (0/1 PNG) and vessel probability scored inside DRIVE's FOV mask (the
    reference and the field read as the bundle reads them)."""
    from PIL import Image

    per_image = {}
    for item in validation:
        reference, field = read_binary_mask(item["label"]), read_binary_mask(item["fov"])
        predicted = np.asarray(Image.open(prediction[item["id"]])) > 0
        path = probability[item["id"]]
        if path.suffix == ".npz":  # nnU-Net: (classes, 1, H, W) softmax
            vessel_probability = np.load(path)["probabilities"][1, 0].astype(np.float32)
        else:  # the bundle: vessel probability as an 8-bit PNG
            vessel_probability = np.asarray(Image.open(path), dtype=np.float32) / 255
        if predicted.shape != reference.shape or vessel_probability.shape != reference.shape:
            raise SystemExit(f"error: {prediction[item['id']]}: shape {predicted.shape}, reference {reference.shape}")
        per_image[item["id"]] = scores(predicted, vessel_probability, reference, field)
    mean = {k: round(float(np.mean([s[k] for s in per_image.values()])), 4) for k in next(iter(per_image.values()))}
    return {"mean": mean, "per_image": per_image}


def nnunet_row(python: Path, train: list, validation: list, work: Path, budget_s: float, iterations: int) -> dict:
    env = nnunet_env(work)
    dataset = convert(train, validation, Path(env["nnUNet_raw"]))
    bin_dir = python.parent
    _, plan_s = run(
        [bin_dir / "nnUNetv2_plan_and_preprocess", "-d", DATASET_ID, "-c", "2d", "-np", 2]
        + ["--verify_dataset_integrity"],
        "nnU-Net planning and preprocessing",
        env,
        work / "nnunet_plan.log",
    )
    print(f"  nnU-Net planned and preprocessed in {plan_s:.0f} s; training for {budget_s:.0f} s", flush=True)
    output, train_s = run(
        [python, DRIVER, DATASET_ID, "--budget_s", budget_s, "--iterations_per_epoch", iterations],
        "nnU-Net training",
        env,
        work / "nnunet_train.log",
    )
    # the driver's last line is its summary; what nnU-Net's workers write to stderr on exit may follow it
    training = json.loads(next(line for line in reversed(output.splitlines()) if line.startswith("{")))
    plans = json.loads((Path(env["nnUNet_preprocessed"]) / DATASET_NAME / "nnUNetPlans.json").read_text())
    plan_2d = plans["configurations"]["2d"]
    predictions = {}
    for name, extra in (("mirroring", []), ("no_mirroring", ["--disable_tta"])):
        out = work / f"nnunet_{name}"
        shutil.rmtree(out, ignore_errors=True)
        command = [bin_dir / "nnUNetv2_predict", "-i", dataset / "imagesTs", "-o", out, "-d", DATASET_ID]
        command += ["-c", "2d", "-f", "all", "-chk", "checkpoint_final.pth", "-device", "cpu", "--save_probabilities"]
        _, seconds = run(command + extra, f"nnU-Net prediction ({name})", env, work / f"nnunet_{name}.log")
        ids = [item["id"] for item in validation]
        scored = score_folder(
            validation, {i: out / f"DRIVE_{i}.png" for i in ids}, {i: out / f"DRIVE_{i}.npz" for i in ids}
        )
        predictions[name] = {**scored, "seconds_per_image": round(seconds / len(validation), 2)}
        print(f"  nnU-Net {name}: F1 {scored['mean']['f1']:.4f}, AUC {scored['mean']['auc']:.4f}", flush=True)
    return {
        "tool": "nnU-Net v2 (nnunetv2 2.8.1, nnUNetTrainer, nnUNetPlans 2d, fold all)",
        "plan": {
            "patch_size": plan_2d.get("patch_size"),
            "batch_size": plan_2d.get("batch_size"),
            "features_per_stage": (plan_2d.get("architecture") or {}).get("arch_kwargs", {}).get("features_per_stage"),
        },
        "training": {**training, "wall_s_with_start_up": round(train_s, 1), "planning_s": round(plan_s, 1)},
        "predictions": predictions,
    }


def pipeline_row(dataset_dir: Path, validation: list, work: Path, budget_s: float) -> dict:
    bundle_root = work / "vessels"
    shutil.rmtree(bundle_root, ignore_errors=True)
    tracking = f"sqlite:///{work / 'mlflow.db'}"  # the benchmark's own store, not the project's mlruns/
    common = ["--bundle_root", bundle_root]
    print(f"  the vessels bundle: training for at most {budget_s:.0f} s", flush=True)
    output, train_s = run(
        [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", CONFIGS / "train.json", *common]
        + ["--tracking_uri", tracking, "--dataset_dir", dataset_dir, "--train_time_limit_s", int(budget_s)],
        "the bundle's training",
        None,
        work / "pipeline_train.log",
    )
    checkpoint = bundle_root / "models" / "model.pt"
    record = json.loads((bundle_root / "models" / "model.json").read_text())
    images = work / "validation_images"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir()
    for item in validation:
        (images / Path(item["image"]).name).symlink_to(Path(item["image"]).resolve())
    predictions = {}
    for name, extra in (("plain", []), ("flip_tta", ["--tta", "True"])):
        out = work / f"pipeline_{name}"
        shutil.rmtree(out, ignore_errors=True)
        command = [sys.executable, "-m", "monai.bundle", "run", "inferring"]
        command += ["--config_file", CONFIGS / "inference.json", *common, "--input_dir", images]
        command += ["--checkpoint_path", checkpoint, "--output_dir", out, *extra]
        _, seconds = run(command, f"the bundle's inference ({name})", None, work / f"pipeline_{name}.log")
        stems = {item["id"]: Path(item["image"]).stem for item in validation}
        scored = score_folder(
            validation,
            {i: out / f"{stem}_seg.png" for i, stem in stems.items()},
            {i: out / f"{stem}_prob.png" for i, stem in stems.items()},
        )
        predictions[name] = {**scored, "seconds_per_image": round(seconds / len(validation), 2)}
        print(f"  the bundle {name}: F1 {scored['mean']['f1']:.4f}, AUC {scored['mean']['auc']:.4f}", flush=True)
    epochs = [int(e) for e in re.findall(r"Epoch\[(\d+)\] Complete", output)]
    return {
        "tool": "the vessels bundle (train.json defaults)",
        "training": {
            "wall_s_with_start_up": round(train_s, 1),
            "epochs": max(epochs, default=0),
            "best_validation": {k: record.get(k) for k in ("key_metric", "value", "epoch", "decision_rule")},
        },
        "predictions": predictions,
    }


def main(argv: list[str] | None = None) -> int:
    from clinseg.datasets import fundus

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset_dir", default=drive_training_dir(), help="default: $DRIVE_DIR or the shared data")
    parser.add_argument("--budget_s", type=float, default=600.0, help="each tool's training wall time, in seconds")
    parser.add_argument("--iterations_per_epoch", type=int, default=10, help="nnU-Net's shortened epoch")
    parser.add_argument("--nnunet_venv", default=str(SOURCE_ROOT / ".venv-nnunet"))
    parser.add_argument("--work_dir", default=str(PROJECT_ROOT / "data" / "benchmarks" / "nnunet_side_by_side"))
    parser.add_argument("--out", default=str(PROJECT_ROOT / "data" / "benchmarks" / "nnunet_side_by_side.json"))
    parser.add_argument("--only", choices=("pipeline", "nnunet"), default=None, help="run one tool's row only")
    args = parser.parse_args(argv)
    dataset_dir = Path(args.dataset_dir)
    if not dataset_dir.is_dir():
        print(f"skipped: {dataset_dir} is absent (set DRIVE_DIR or --dataset_dir)")
        return 0
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    train = fundus.load_vessel_datalist(str(dataset_dir), "train", val_fraction=0.25)
    validation = fundus.load_vessel_datalist(str(dataset_dir), "val", val_fraction=0.25)
    print(
        f"split: {len(train)} training ({', '.join(i['id'] for i in train)}), "
        f"{len(validation)} validation ({', '.join(i['id'] for i in validation)})"
    )
    import torch

    rows = {}
    if args.only in (None, "pipeline"):
        print("[1/2] the vessels bundle", flush=True)
        rows["pipeline"] = pipeline_row(dataset_dir, validation, work, args.budget_s)
    if args.only in (None, "nnunet"):
        print("[2/2] nnU-Net v2", flush=True)
        python = nnunet_environment(Path(args.nnunet_venv))
        rows["nnunet"] = nnunet_row(python, train, validation, work, args.budget_s, args.iterations_per_epoch)

    print(f"\n{'tool, prediction':<34} {'F1':>7} {'sens.':>7} {'spec.':>7} {'AUC':>7} {'s/image':>8}")
    for tool, row in rows.items():
        for name, result in row["predictions"].items():
            m = result["mean"]
            print(
                f"{tool + ', ' + name:<34} {m['f1']:>7.4f} {m['sensitivity']:>7.4f} {m['specificity']:>7.4f} "
                f"{m['auc']:>7.4f} {result['seconds_per_image']:>8.2f}"
            )
    report = {
        "dataset_dir": str(dataset_dir.resolve()),
        "split": {"train_ids": [i["id"] for i in train], "validation_ids": [i["id"] for i in validation]},
        "budget_s": args.budget_s,
        "scoring": "per image inside DRIVE's FOV mask, then the mean (vessels_cross_camera.scores)",
        "rows": rows,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": sys.version.split()[0],
            "platform": platform.platform(),
        },
    }
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
