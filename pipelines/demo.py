"""The main job on the embedded default data: phantom -> train -> evaluate -> infer, tracked in ``mlruns/``.

    python -m clinseg.pipelines.demo [--epochs 8]

Every step runs the bundle exactly as a user would (``python -m monai.bundle run ...`` from the repository root),
so the demo proves the same commands the README documents. At the end it prints where everything is.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from clinseg.datasets.oct.phantom import write_phantom_dataset, write_png_bscans
from clinseg.pipelines import cli
from clinseg.pipelines.paths import PROJECT_ROOT, SOURCE_ROOT
from clinseg.pipelines.tracking import DEFAULT_STORE, default_tracking_uri, unique_run_name

BUNDLE = "oct_layers"


def bundle_run(run_id: str, configs: list[str], **overrides) -> None:
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", str(configs)]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    print(f"\n$ python {' '.join(command[1:])}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=SOURCE_ROOT, check=True)
    print(f"({run_id} took {time.perf_counter() - started:.0f} s)", flush=True)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8, help="training epochs (the bundle default is 40)")
    args = parser.parse_args(argv)

    bundle_root = Path("bundles") / BUNDLE
    configs = bundle_root / "configs"
    data_dir = PROJECT_ROOT / "data" / "phantoms" / BUNDLE
    if not any(data_dir.glob("*.mat")):
        print(f"generating the OCT phantom dataset in {data_dir} ...", flush=True)
        write_phantom_dataset(data_dir)
    png_dir = PROJECT_ROOT / "data" / "phantoms" / f"{BUNDLE}_png"
    write_png_bscans(data_dir / "Subject_08.mat", png_dir, limit=3)

    train_run, eval_run, infer_run = (unique_run_name(w) for w in ("train", "evaluate", "infer"))
    train = [str(configs / "train.json")]
    bundle_run("training", train, **{"train#trainer#max_epochs": args.epochs, "run_name": train_run})
    run_model = SOURCE_ROOT / bundle_root / "outputs" / train_run / "models" / "model.pt"  # this run's, promoted or not
    bundle_run("evaluating", train + [str(configs / "evaluate.json")], run_name=eval_run, checkpoint_path=run_model)
    bundle_run("inferring", [str(configs / "inference.json")], run_name=infer_run, input_dir=png_dir)

    outputs = SOURCE_ROOT / bundle_root / "outputs"
    metrics = json.loads((outputs / eval_run / "metrics.json").read_text())["mean"]
    print("\n" + "=" * 78)
    print(
        f"oct_layers demo finished: mean Dice {metrics['val_mean_dice']:.3f}, HD95 {metrics['val_hd95']:.1f} px, "
        f"pixel accuracy {metrics['val_pixel_accuracy']:.3f} on the validation subjects"
    )
    promotion = json.loads((outputs / train_run / "promotion.json").read_text())
    print(f"  this run's best model:    {run_model}")
    print(
        f"  the bundle's model:       {SOURCE_ROOT / bundle_root / 'models' / 'model.pt'} "
        f"({'promoted' if promotion['promoted'] else 'kept'}: {promotion['reason']})"
    )
    print(f"  training outputs:         {outputs / train_run}  (learning_curves.png, overlays/)")
    print(f"  evaluation metrics:       {outputs / eval_run / 'metrics.json'}  (+ per-image CSV, overlays/)")
    print(f"  inference outputs:        {outputs / infer_run}  (*_seg.png, *_overlay.png, *.json)")
    print(f"  MLflow store:             {default_tracking_uri()}  (runs {train_run}, {eval_run})")
    if default_tracking_uri().startswith("sqlite:///") and DEFAULT_STORE.exists():
        print(
            "  look at the runs with:    .venv/bin/mlflow ui --backend-store-uri sqlite:///mlruns/mlflow.db --port 5000"
        )
        print("                            then open http://127.0.0.1:5000")
    print("=" * 78)
    return 0


if __name__ == "__main__":
    sys.exit(main())
