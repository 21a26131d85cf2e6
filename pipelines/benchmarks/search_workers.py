"""Wall time of one Optuna search with one worker and with several, on the same machine and the same trials budget.

    python -m clinseg.pipelines.benchmarks.search_workers [--workers 1 2] [--n_trials 6] [--epochs 4]
        [--out data/benchmarks/search_workers.json]

Each search runs ``pipelines.experiments search oct_layers`` over ``learning_rate`` and ``batch_size`` on a
generated OCT phantom (3 subjects of 4 B-scans, 64 x 96 pixels), tiny networks, validation every epoch and the
default median pruner, into a temporary MLflow store and study database (the project's ``mlruns/`` is not touched).
Per worker count it prints and writes the wall time, the trials per state, the trainings' epochs in all (pruning
saves epochs), and the best value. On a 2-core machine the workers share the cores: the gain is what one training
leaves idle (process start-up, data loading, validation), not a doubling.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clinseg.pipelines.benchmarks import write_report
from clinseg.pipelines.paths import PROJECT_ROOT, SOURCE_ROOT

SPACE = ["learning_rate=loguniform:0.0005:0.01", "batch_size=choice:2,4"]
TINY = ["image_size=[64,96]", "network_def#channels=[8,16,32]", "network_def#strides=[2,2]"]


def measure(workers: int, n_trials: int, epochs: int, seed: int) -> dict:
    import optuna

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        from clinseg.datasets.oct.phantom import write_phantom_dataset

        write_phantom_dataset(tmp / "oct", n_subjects=3, n_bscans=4, height=64, width=96, seed=1)
        uri = f"sqlite:///{tmp / 'mlruns' / 'mlflow.db'}"
        fixed = [*TINY, f"train#trainer#max_epochs={epochs}", f"dataset_dir={tmp / 'oct'}", f"bundle_root={tmp / 'b'}"]
        command = [sys.executable, "-m", "clinseg.pipelines.experiments", "--tracking_uri", uri, "search", "oct_layers"]
        command += ["--space", *SPACE, "--n_trials", str(n_trials), "--workers", str(workers), "--seed", str(seed)]
        command += ["--study", "bench", "--set", *fixed]
        started = time.time()
        result = subprocess.run(command, cwd=SOURCE_ROOT, capture_output=True, text=True, env=os.environ.copy())
        wall = time.time() - started
        if result.returncode not in (0, 1):
            raise SystemExit(f"search with {workers} workers failed: {result.stderr[-2000:]}")
        study = optuna.load_study(study_name="bench", storage=f"sqlite:///{tmp / 'mlruns' / 'optuna.db'}")
        trials = [t for t in study.get_trials() if not t.user_attrs.get("surplus")]
        complete = [t for t in trials if t.state.name == "COMPLETE"]
        return {
            "workers": workers,
            "wall_s": round(wall, 1),
            "trials": len(trials),
            "states": {s: sum(t.state.name == s for t in trials) for s in ("COMPLETE", "PRUNED", "FAIL")},
            "epochs_trained": sum(len(t.intermediate_values) for t in trials),
            "best_value": max(t.value for t in complete) if complete else None,
            "best_params": max(complete, key=lambda t: t.value).params if complete else None,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--n_trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(PROJECT_ROOT / "data" / "benchmarks" / "search_workers.json"))
    args = parser.parse_args(argv)
    rows = []
    for workers in args.workers:
        row = measure(workers, args.n_trials, args.epochs, args.seed)
        rows.append(row)
        print(
            f"{workers} worker(s): {row['wall_s']:.0f} s for {row['trials']} trials {row['states']}, "
            f"{row['epochs_trained']} epochs trained, best {row['best_value']}",
            flush=True,
        )
    report = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}, "n_trials": args.n_trials}
    report["epochs"], report["results"] = args.epochs, rows
    write_report(args.out, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
