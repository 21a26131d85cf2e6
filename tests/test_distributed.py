"""The multi-GPU overlays run as users run them, with ``torchrun``, here on CPU with the Gloo backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from clinseg.pipelines.tracking import mlflow_metric_name
from tests.conftest import OCT_BUNDLE, REPO_ROOT, free_port, new_store, run_bundle, run_models

CONFIGS = OCT_BUNDLE / "configs"
TRAIN = [str(CONFIGS / "train.json")]
EVALUATE = TRAIN + [str(CONFIGS / "evaluate.json")]
TINY = {"image_size": "[64,96]", "network_def#channels": "[8,16,32]", "network_def#strides": "[2,2]", "batch_size": 2}
COMPARED = ("val_mean_dice", "val_mean_iou", "val_hd95", "val_pixel_accuracy", "val_thickness_mae_px")


def torchrun(
    run_id: str, config_files: list[str], overrides: dict, uri: str, env: dict | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    command += ["-m", "monai.bundle", "run", run_id, "--config_file", str(config_files)]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "OMP_NUM_THREADS": "1", **(env or {})}
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0 or not check, result.stdout[-3000:] + result.stderr[-6000:]
    return result


def runs(uri: str, workflow: str):
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("oct_layers")
    return client.search_runs([experiment.experiment_id], f"tags.workflow = '{workflow}'", order_by=["start_time"])


def test_two_process_training_equals_single_process_evaluation(tmp_path, tiny_oct_dir):
    uri = new_store(tmp_path / "mlflow.db")
    bundle = tmp_path / "bundle"
    overrides = {"bundle_root": bundle, "dataset_dir": tiny_oct_dir, **TINY, "train#trainer#max_epochs": 1}
    torchrun("training", TRAIN + [str(CONFIGS / "multi_gpu_train.json")], overrides, uri)

    own = sorted(p.name for p in run_models(bundle).iterdir())
    assert own == ["latest_checkpoint_epoch=1.pt", "model.json", "model.pt"], own
    assert (bundle / "models" / "model.pt").is_file(), "the first run's model is promoted"
    (train_run,) = runs(uri, "train")  # rank 0 alone tracks
    assert train_run.info.status == "FINISHED"

    evaluation = {"bundle_root": bundle, "dataset_dir": tiny_oct_dir, **TINY}
    run_bundle("evaluating", EVALUATE, {**evaluation, "run_name": "single"}, env={"MLFLOW_TRACKING_URI": uri})
    (single,) = runs(uri, "evaluate")
    for key in COMPARED:  # 3 validation images split 2 + 1 over the ranks, gathered before reduction
        trained, evaluated = (mlflow_metric_name(key, workflow, "val_mean_dice") for workflow in ("train", "evaluate"))
        assert train_run.data.metrics[trained] == pytest.approx(single.data.metrics[evaluated], rel=1e-5), key

    torchrun(
        "evaluating", EVALUATE + [str(CONFIGS / "multi_gpu_evaluate.json")], {**evaluation, "run_name": "multi"}, uri
    )
    _, distributed = runs(uri, "evaluate")
    for key in (mlflow_metric_name(k, "evaluate", "val_mean_dice") for k in COMPARED):
        assert distributed.data.metrics[key] == pytest.approx(single.data.metrics[key], rel=1e-5), key
    assert Path(distributed.data.params["checkpoint"]).name == "model.pt"
    assert_same_evaluation_files(bundle / "outputs" / "single", bundle / "outputs" / "multi")


def assert_same_evaluation_files(single: Path, distributed: Path) -> None:
    """A two-process evaluation writes what one process writes: every case once in the per-case tables, the report
    of every case, and the overlay of every case (each rank draws its own cases, none is left out)."""
    names = sorted(p.name for p in single.glob("*_raw.csv"))
    assert names and names == sorted(p.name for p in distributed.glob("*_raw.csv"))
    for name in names:
        rows = [(single / name).read_text().splitlines(), (distributed / name).read_text().splitlines()]
        assert rows[0][0] == rows[1][0], name  # the same columns
        # the ranks' cases are gathered rank by rank: the same rows, each case once, in another order
        cases = [sorted(line.split(",")[0] for line in table[1:]) for table in rows]
        assert cases[0] == cases[1] and len(set(cases[1])) == len(cases[1]) == 3, (name, cases)
        values = [{line.split(",")[0]: [float(v) for v in line.split(",")[1:]] for line in t[1:]} for t in rows]
        for case, expected in values[0].items():
            assert values[1][case] == pytest.approx(expected, rel=1e-5, nan_ok=True), (name, case)
    overlays = [sorted(p.name for p in (run / "overlays").iterdir()) for run in (single, distributed)]
    assert len(overlays[0]) == 3 and overlays[1] == overlays[0], overlays
    reports = [json.loads((run / "metrics.json").read_text()) for run in (single, distributed)]
    assert reports[1]["n_images"] == reports[0]["n_images"] == 3
    # per class, over the cases (JSON's null: a value no case defines)
    per_class = [{(m, c): v for m, values in r["per_class"].items() for c, v in values.items()} for r in reports]
    assert per_class[1].keys() == per_class[0].keys()
    for key, expected in per_class[0].items():
        assert per_class[1][key] == (expected if expected is None else pytest.approx(expected, rel=1e-5)), key
    assert not [p for p in distributed.rglob("*") if p.name.startswith(".tmp")], "no staging left behind"


def test_two_process_training_resumes_from_its_latest_checkpoint(tmp_path, tiny_oct_dir):
    uri = new_store(tmp_path / "mlflow.db")
    bundle = tmp_path / "bundle"
    overrides = {"bundle_root": bundle, "dataset_dir": tiny_oct_dir, **TINY, "val_interval": 1}
    multi_gpu = TRAIN + [str(CONFIGS / "multi_gpu_train.json")]
    torchrun("training", multi_gpu, {**overrides, "train#trainer#max_epochs": 1}, uri)
    (first,) = runs(uri, "train")
    client = mlflow.MlflowClient(uri)
    first_steps = [m.step for m in client.get_metric_history(first.info.run_id, "0_key/train_loss")]

    # the same job, asked for 3 epochs, continues from epoch 1 on both ranks
    result = torchrun("training", multi_gpu, {**overrides, "train#trainer#max_epochs": 3, "resume": True}, uri)
    assert f"resuming from {run_models(bundle) / 'latest_checkpoint_epoch=1.pt'}" in result.stdout + result.stderr
    models = sorted(p.name for p in run_models(bundle).iterdir())
    assert models == ["latest_checkpoint_epoch=3.pt", "model.json", "model.pt"], models
    _, resumed = runs(uri, "train")
    assert resumed.data.tags["resumed_from_run"] == first.info.run_id
    resumed_steps = [m.step for m in client.get_metric_history(resumed.info.run_id, "0_key/train_loss")]
    # the resumed run carries the interrupted run's history up to its checkpoint, then continues it: each step once
    assert sorted(resumed_steps) == list(range(1, 3 * max(first_steps) + 1)), resumed_steps
    epochs = [m.step for m in client.get_metric_history(resumed.info.run_id, "0_key/val_mean_dice")]
    assert sorted(epochs) == [1, 2, 3], "epoch 1's validation carried over, then validation continues at epoch 2"

    # one process would restore the two processes' epoch length (half its own): refused, the run left as it was
    single = {**overrides, "train#trainer#max_epochs": 4, "resume": True}
    refused = run_bundle("training", TRAIN, single, env={"MLFLOW_TRACKING_URI": uri}, check=False)
    assert refused.returncode != 0
    assert "was trained by 2 processes" in refused.stderr + refused.stdout, refused.stderr[-3000:]
    assert sorted(p.name for p in run_models(bundle).iterdir()) == models


def test_the_first_distributed_run_prepares_the_data_once_on_a_clean_folder(tmp_path):
    """A fresh checkout's first ``torchrun``: no phantom, no cache. Rank 0 generates the phantom while rank 1 waits
    (both used to generate it at once, and rank 1 read a half-written folder); both ranks fill one disk cache."""
    uri = new_store(tmp_path / "mlflow.db")
    home = tmp_path / "home"  # the project's state (phantoms) for this test alone: a clean data folder
    overrides = {"bundle_root": tmp_path / "bundle", **TINY, "train#trainer#max_epochs": 1, "cache": "disk"}
    command_env = {"CLINSEG_HOME": str(home)}
    result = torchrun("training", TRAIN + [str(CONFIGS / "multi_gpu_train.json")], overrides, uri, command_env)
    log = result.stdout + result.stderr
    assert log.count("generating the embedded oct phantom dataset") == 1, "rank 0 alone generates the phantom"
    phantom = home / "data" / "phantoms" / "oct_layers"
    assert phantom.is_dir() and not [p for p in phantom.parent.iterdir() if p.name.startswith(".")], "no staging left"
    cache = list((tmp_path / "bundle" / "cache").rglob("*.pt"))
    assert cache, "the disk cache was filled"
    assert (tmp_path / "bundle" / "models" / "model.pt").is_file()


def test_two_process_training_chooses_the_decision_rule_on_every_validation_case(tmp_path):
    """vessels chooses its threshold on the best epoch's validation cases; split over two ranks, each rank holds
    its share of them, and the rule is chosen on all of them (3), not on rank 0's share (2)."""
    from clinseg.datasets.fundus import load_vessel_datalist
    from clinseg.datasets.fundus.phantom import write_drive_layout

    drive = tmp_path / "drive"
    write_drive_layout(drive, n_images=8, shape=(80, 72), seed=2)
    assert len(load_vessel_datalist(drive, "val", val_fraction=0.375)) == 3
    configs = REPO_ROOT / "bundles" / "vessels" / "configs"
    overrides = {
        "bundle_root": tmp_path / "bundle",
        "dataset_dir": drive,
        "val_fraction": 0.375,
        "patch_size": "[32,32]",
        "patches_per_image": 2,
        "sw_roi_size": "[48,48]",
        "network_def#channels": "[8,16,32]",
        "network_def#strides": "[2,2]",
        "val_interval": 1,
        "train#trainer#max_epochs": 1,
    }
    uri = new_store(tmp_path / "mlflow.db")
    torchrun("training", [str(configs / "train.json"), str(configs / "multi_gpu_train.json")], overrides, uri)
    record = json.loads((run_models(tmp_path / "bundle") / "model.json").read_text())
    assert record["decision_rule"]["cases"] == 3, record["decision_rule"]


def test_fewer_validation_cases_than_processes_is_refused_naming_the_key(tmp_path):
    """One validation case for two processes: each rank stops at once with one line naming ``val_fraction`` (it
    stopped with an internal error from the sampler, naming nothing), before any training or tracking."""
    from clinseg.datasets.fundus import load_vessel_datalist
    from clinseg.datasets.fundus.phantom import write_drive_layout

    drive = tmp_path / "drive"
    write_drive_layout(drive, n_images=8, shape=(80, 72), seed=2)
    assert len(load_vessel_datalist(drive, "val", val_fraction=0.125)) == 1
    configs = REPO_ROOT / "bundles" / "vessels" / "configs"
    overrides = {"bundle_root": tmp_path / "bundle", "dataset_dir": drive, "val_fraction": 0.125,
                 "patch_size": "[32,32]", "sw_roi_size": "[48,48]", "train#trainer#max_epochs": 1}  # fmt: skip
    uri = new_store(tmp_path / "mlflow.db")
    result = torchrun(
        "training", [str(configs / "train.json"), str(configs / "multi_gpu_train.json")], overrides, uri, check=False
    )
    assert result.returncode != 0
    expected = "error: config key 'val_fraction': leaves 1 validation case(s) for the 2 processes of this run"
    assert result.stderr.count(expected) == 2, result.stderr[-6000:]
    assert "internal error" not in result.stderr
    assert not (tmp_path / "bundle" / "models" / "model.pt").exists()
