"""The concurrency soak: rounds of several short trainings and evaluations of one bundle root at once, against one
SQLite store and against a real ``mlflow server``, each round checked before the next.

    python -m clinseg.pipelines.benchmarks.soak [--parallel 4] [--rounds 3] [--max_minutes 20] [--stores sqlite server]
        [--out data/benchmarks/soak.json]

Each round starts ``parallel`` processes together: trainings (oct_layers, tiny network, a few epochs, each its own
seed) and, from the second round on, evaluations of the bundle's promoted ``models/model.pt``. After the round:

- every process exited 0, and its MLflow run is FINISHED;
- no metric lost: each training run holds one point per epoch of every validation metric and one ``train_loss``
  point per iteration; each evaluation run holds its metrics;
- no checkpoint crossed: each run folder's ``model.json`` still describes its ``model.pt`` (same SHA-256), its
  latest checkpoint is of its last epoch, and the bundle's ``models/model.pt`` is one of the runs' models, the best
  validated so far on the same validation data;
- evaluations name the checkpoint they evaluated (SHA-256 tag equal to the promoted model's at their start or a
  later one).

The loop is bounded by ``--rounds`` and ``--max_minutes``; the counts per store are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from clinseg.pipelines.paths import SOURCE_ROOT

CONFIGS = SOURCE_ROOT / "bundles" / "oct_layers" / "configs"
TINY = {
    "image_size": "[32,48]",
    "network_def#channels": "[4,8]",
    "network_def#strides": "[2]",
    "num_workers": 0,
    "batch_size": 2,
    "val_interval": 1,
}
EPOCHS, ITERATIONS_PER_EPOCH = 2, 2  # the data below: 4 training B-scans, batch 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "2", "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
         "--artifacts-destination", str(folder / "server_artifacts")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return server, uri
        except OSError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError(f"mlflow server on {uri} did not answer")


def launch(kind: str, seed: int, root: Path, data: Path, uri: str, log: Path) -> subprocess.Popen:
    files = [CONFIGS / "train.json"] + ([CONFIGS / "evaluate.json"] if kind == "evaluate" else [])
    command = [sys.executable, "-m", "monai.bundle", "run", "training" if kind == "train" else "evaluating"]
    command += ["--config_file", str([str(f) for f in files])]
    overrides = {**TINY, "bundle_root": root, "dataset_dir": data, "tracking_uri": uri, "seed": seed}
    if kind == "train":
        overrides["train#trainer#max_epochs"] = EPOCHS
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(command, cwd=SOURCE_ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)


def check_round(client, experiment_id: str, root: Path, known: set[str], counts: dict) -> list[str]:
    """The problems of the runs that finished since ``known`` (run ids), counted into ``counts``."""
    from clinseg.pipelines import runs

    problems = []
    for run in client.search_runs([experiment_id], max_results=1000):
        if run.info.run_id in known:
            continue
        known.add(run.info.run_id)
        workflow = run.data.tags.get("workflow")
        counts[f"{workflow}_runs"] = counts.get(f"{workflow}_runs", 0) + 1
        if run.info.status != "FINISHED":
            problems.append(f"{run.info.run_id} ({workflow}) is {run.info.status}")
        if workflow == "train":
            losses = client.get_metric_history(run.info.run_id, "0_key/train_loss")
            dice = client.get_metric_history(run.info.run_id, "0_key/val_mean_dice")
            counts["metric_points"] = counts.get("metric_points", 0) + len(losses) + len(dice)
            if sorted(m.step for m in dice) != list(range(1, EPOCHS + 1)):
                problems.append(f"{run.info.run_id}: val_mean_dice steps {[m.step for m in dice]}")
            if len(losses) != EPOCHS * ITERATIONS_PER_EPOCH:
                problems.append(f"{run.info.run_id}: {len(losses)} train_loss points")
        elif workflow == "evaluate":
            if "0_key/eval_mean_dice" not in run.data.metrics or "checkpoint_sha256" not in run.data.tags:
                problems.append(f"{run.info.run_id}: evaluation without its metric or checkpoint SHA-256")
    promoted = runs.read_record(root / "models")
    best = None
    for models in root.glob("outputs/*/models"):
        record = runs.read_record(models)
        if (models / "model.pt").is_file() and record is None:
            problems.append(f"{models}: model.json no longer describes model.pt (crossed)")
            continue
        if record is None:
            continue
        counts["run_models_checked"] = counts.get("run_models_checked", 0) + 1
        latest = sorted(p.name for p in models.glob("latest_checkpoint_epoch=*.pt"))
        if latest != [f"latest_checkpoint_epoch={EPOCHS}.pt"]:
            problems.append(f"{models}: latest checkpoints {latest}")
        if best is None or record["value"] > best["value"]:
            best = record
    if best is not None and (promoted is None or promoted["sha256"] != best["sha256"]):
        problems.append(f"the bundle's model is {promoted and promoted['training_run_name']}, the best run is "
                        f"{best['training_run_name']}")  # fmt: skip
    return problems


def soak(store: str, parallel: int, rounds: int, deadline: float, work: Path) -> dict:
    from clinseg.datasets.oct.phantom import write_phantom_dataset
    from clinseg.pipelines.tracking import client_for

    data, root = work / "data", work / "bundle"
    write_phantom_dataset(data, n_subjects=3, n_bscans=2, height=48, width=64, seed=3)
    server = None
    uri = f"sqlite:///{work / 'mlflow.db'}"
    if store == "server":
        server, uri = start_server(work)
    counts, problems, known, seconds = {"rounds": 0, "processes": 0, "failed_processes": 0}, [], set(), []
    try:
        for round_index in range(rounds):
            if time.time() > deadline:
                break
            started = time.time()
            kinds = ["train" if i % 2 == 0 or round_index == 0 else "evaluate" for i in range(parallel)]
            processes = []
            for i, kind in enumerate(kinds):
                log = work / f"round{round_index}-{i}-{kind}.log"
                processes.append((launch(kind, 100 * round_index + i, root, data, uri, log), log))
            for process, log in processes:
                if process.wait(1200) != 0:
                    counts["failed_processes"] += 1
                    problems.append(f"{log.name}: exit {process.returncode}: {log.read_text()[-400:]}")
            counts["processes"] += len(processes)
            counts["rounds"] += 1
            client = client_for(uri)
            experiment = client.get_experiment_by_name("oct_layers")
            problems += check_round(client, experiment.experiment_id, root, known, counts)
            seconds.append(round(time.time() - started, 1))
            print(f"{store}: round {round_index + 1}: {len(processes)} processes ({', '.join(kinds)}) in "
                  f"{seconds[-1]} s; problems so far: {len(problems)}", flush=True)  # fmt: skip
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
    return {"store": store, "parallel": parallel, **counts, "round_seconds": seconds, "problems": problems}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max_minutes", type=float, default=20)
    parser.add_argument("--stores", nargs="+", default=["sqlite", "server"], choices=["sqlite", "server"])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    deadline = time.time() + 60 * args.max_minutes
    results = []
    for store in args.stores:
        with tempfile.TemporaryDirectory(prefix=f"soak-{store}-") as work:
            results.append(soak(store, args.parallel, args.rounds, deadline, Path(work)))
    print(json.dumps(results, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))
    return 0 if all(not r["problems"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
