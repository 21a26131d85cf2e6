"""A training killed part-way resumes from its latest checkpoint with one override (``--resume True``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import mlflow
import torch

from tests.conftest import OCT_BUNDLE, REPO_ROOT, new_store, run_bundle, run_models

TRAIN = [str(OCT_BUNDLE / "configs" / "train.json")]


def tiny_training(bundle_root, dataset_dir, max_epochs: int) -> dict:
    """Overrides of a tiny OCT training, validated every epoch: 6 images, batch 2, so 3 steps per epoch."""
    return {
        "bundle_root": bundle_root,
        "dataset_dir": dataset_dir,
        "image_size": "[64,96]",
        "network_def#channels": "[8,16,32]",
        "network_def#strides": "[2,2]",
        "batch_size": 2,
        "val_interval": 1,
        "train#trainer#max_epochs": max_epochs,
    }


def test_killed_training_resumes_and_continues_its_history(tmp_path, tiny_oct_dir):
    uri = new_store(tmp_path / "mlflow.db")
    bundle = tmp_path / "bundle"
    overrides = tiny_training(bundle, tiny_oct_dir, max_epochs=6)
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(TRAIN)]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list(bundle.glob("outputs/*/models/latest_checkpoint_epoch=2.pt")) and process.poll() is None:
        assert time.time() < deadline, "no checkpoint of epoch 2 in time"
        time.sleep(0.05)
    time.sleep(0.3)  # into epoch 3
    process.send_signal(signal.SIGKILL)  # no chance to record anything: the hardest interruption
    process.wait()
    # one latest checkpoint is kept: epoch 2's may already be replaced by epoch 3's when the kill lands
    models = run_models(bundle)  # the run's own folder: outputs/<run name>/models
    saved = sorted(p.name for p in models.glob("latest_checkpoint_epoch=*.pt"))
    assert saved and saved[-1] != "latest_checkpoint_epoch=1.pt", process.stderr.read().decode()[-3000:]
    killed_at = int(saved[-1].split("=")[1].split(".")[0])
    assert killed_at < 6, "the run was interrupted before its end"
    state = torch.load(models / saved[-1], map_location="cpu", weights_only=False)
    iterations_done = state["trainer"]["iteration"]

    client = mlflow.MlflowClient(uri)
    (first,) = client.search_runs([client.get_experiment_by_name("oct_layers").experiment_id])
    first_losses = client.get_metric_history(first.info.run_id, "0_key/train_loss")

    result = run_bundle("training", TRAIN, {**overrides, "resume": True}, env={"MLFLOW_TRACKING_URI": uri})
    assert f"resuming from {models / saved[-1]}" in result.stdout + result.stderr
    assert run_models(bundle) == models, "the resumed run continues in its own folder"
    assert sorted(p.name for p in models.glob("latest_checkpoint_epoch=*.pt")) == ["latest_checkpoint_epoch=6.pt"], (
        "it ends at the configured number of epochs"
    )

    runs = client.search_runs([client.get_experiment_by_name("oct_layers").experiment_id], order_by=["start_time"])
    assert [r.info.run_id for r in runs][0] == first.info.run_id
    resumed = runs[1]
    assert resumed.data.tags["resumed_from_run"] == first.info.run_id
    assert client.get_run(first.info.run_id).info.status == "KILLED", "a SIGKILLed run is not left RUNNING"
    assert client.get_run(first.info.run_id).data.tags["resumed_by_run"] == resumed.info.run_id
    # the resumed run's record is the whole training that made its model.pt: the interrupted run's values up to the
    # checkpoint (what was logged after it is done again, not kept twice), then its own, each step once
    resumed_losses = client.get_metric_history(resumed.info.run_id, "0_key/train_loss")
    assert sorted(m.step for m in resumed_losses) == list(range(1, 6 * 3 + 1))  # 6 images / batch 2: 3 per epoch
    before = {m.step: m.value for m in first_losses if m.step <= iterations_done}
    assert {m.step: m.value for m in resumed_losses if m.step <= iterations_done} == before
    dice = client.get_metric_history(resumed.info.run_id, "0_key/val_mean_dice")
    assert [m.step for m in dice] == list(range(1, 7)), "the epochs of the interrupted run, then its own"
    first_dice = client.get_metric_history(first.info.run_id, "0_key/val_mean_dice")
    assert [m.value for m in dice[:killed_at]] == [m.value for m in first_dice if m.step <= killed_at]


# runs `python -m monai.bundle` (argv after the file name) and SIGKILLs itself the instant a file named argv[1] is
# renamed into place: the latest checkpoint of an epoch exists, nothing after it has run
KILLED_ONCE_A_CHECKPOINT_IS_IN_PLACE = """
import os, runpy, signal, sys

rename = os.replace
checkpoint_name = sys.argv[1]

def rename_then_die(source, target):
    rename(source, target)
    if os.path.basename(os.fspath(target)) == checkpoint_name:
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = rename_then_die
sys.argv = ["monai.bundle", *sys.argv[2:]]
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""


def test_a_checkpoint_is_written_only_after_the_record_of_its_epoch(tmp_path, tiny_oct_dir):
    """Killed the instant epoch 2's checkpoint is in place, the store already holds every loss of epochs 1-2, so
    the resumed run's history has no gap (the training records its losses in batches, written at each epoch's end)."""
    uri = new_store(tmp_path / "mlflow.db")
    overrides = tiny_training(tmp_path / "bundle", tiny_oct_dir, max_epochs=3)
    arguments = ["run", "training", "--config_file", str(TRAIN)]
    for key, value in overrides.items():
        arguments += [f"--{key}", str(value)]
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_ONCE_A_CHECKPOINT_IS_IN_PLACE, "latest_checkpoint_epoch=2.pt", *arguments],
        cwd=REPO_ROOT, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    models = run_models(tmp_path / "bundle")
    saved = sorted(p.name for p in models.glob("latest_checkpoint_epoch=*.pt"))
    assert saved == ["latest_checkpoint_epoch=1.pt", "latest_checkpoint_epoch=2.pt"], "epoch 1's goes after 2's is in"

    client = mlflow.MlflowClient(uri)
    (first,) = client.search_runs([client.get_experiment_by_name("oct_layers").experiment_id])
    losses = client.get_metric_history(first.info.run_id, "0_key/train_loss")
    assert sorted(m.step for m in losses) == list(range(1, 2 * 3 + 1)), "6 images / batch 2: 3 steps per epoch"

    run_bundle("training", TRAIN, {**overrides, "resume": True}, env={"MLFLOW_TRACKING_URI": uri})
    experiment_id = client.get_experiment_by_name("oct_layers").experiment_id
    resumed = client.search_runs([experiment_id], order_by=["start_time"])[1]
    resumed_losses = client.get_metric_history(resumed.info.run_id, "0_key/train_loss")
    assert sorted(m.step for m in resumed_losses) == list(range(1, 3 * 3 + 1))
    assert sorted(p.name for p in models.glob("latest_checkpoint_epoch=*.pt")) == ["latest_checkpoint_epoch=3.pt"]


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    """A save that dies half-way leaves the previous checkpoint intact and no partial file under the real name."""
    from ignite.engine import Engine

    from clinseg.pipelines.engine.handlers.checkpointing import AtomicCheckpointSaver

    network = torch.nn.Linear(2, 2)
    engine = Engine(lambda engine, batch: None)
    saver = AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict={"model": network}, save_final=True,
                                  final_filename="model.pt")  # fmt: skip
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    saved = (tmp_path / "model.pt").read_bytes()
    assert oct((tmp_path / "model.pt").stat().st_mode & 0o777) == "0o644"

    def dying_save(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with torch.no_grad():
        network.weight.add_(1.0)
    try:
        engine.run([0], max_epochs=2)
    except OSError:
        pass
    assert (tmp_path / "model.pt").read_bytes() == saved, "the previous checkpoint is intact"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"], "no temporary file left behind"


def train_until_killed(script: str, config_files: list[str], overrides: dict) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run training`` under ``script``, which kills it with SIGKILL at its chosen moment."""
    command = [sys.executable, "-c", script, "run", "training", "--config_file", str(config_files)]
    command += [f"--{k}={v}" for k, v in overrides.items()]
    killed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    return killed


# ``python -m monai.bundle`` with a SIGKILL right before the latest checkpoint of the first epoch (after the first)
# whose validation saved a better model.pt: that model is on disk, the latest checkpoint is still the epoch's before
KILL_BEFORE_THE_CHECKPOINT_OF_A_BETTER_MODEL = """
import hashlib, os, runpy, signal, sys
from clinseg.pipelines.engine.handlers.checkpointing import AtomicDiskSaver

save, models = AtomicDiskSaver.__call__, []

def save_or_die(self, checkpoint, filename, metadata=None):
    model = self.dirname / "model.pt"
    if filename.startswith("latest") and model.is_file():
        models.append(hashlib.sha256(model.read_bytes()).hexdigest())
        if len(models) > 1 and models[-1] != models[-2]:
            os.kill(os.getpid(), signal.SIGKILL)
    save(self, checkpoint, filename, metadata)

AtomicDiskSaver.__call__ = save_or_die
sys.argv = ["monai.bundle", *sys.argv[1:]]
runpy.run_module("monai.bundle", run_name="__main__")
"""


def test_a_run_killed_between_its_best_model_and_its_checkpoint_describes_that_model(tmp_path, tiny_oct_dir):
    """At the end of an epoch the better model is saved before the latest checkpoint. Killed between the two and
    resumed with nothing left to train, the run described the newer model.pt with the older epoch's number and
    metric value (the checkpoint's best), and promoted it so. model.pt and model.json are written together now, and a
    resumed run ranks against the model on disk."""
    import re

    from clinseg.pipelines import runs as run_records

    bundle = tmp_path / "bundle"
    overrides = {"bundle_root": bundle, "dataset_dir": tiny_oct_dir, "image_size": "[32,48]",
                 "network_def#channels": "[4,8]", "network_def#strides": "[2]", "val_interval": 1,
                 "train#trainer#max_epochs": 5, "tracking_uri": new_store(tmp_path / "mlflow.db")}  # fmt: skip
    killed = train_until_killed(KILL_BEFORE_THE_CHECKPOINT_OF_A_BETTER_MODEL, TRAIN, overrides)
    best = [float(v) for v in re.findall(r"Got new best metric of \S+: ([0-9.e-]+)", killed.stdout + killed.stderr)]
    models = run_models(bundle)
    (checkpoint,) = models.glob("latest_checkpoint_epoch=*.pt")
    checkpoint_epoch = int(checkpoint.stem.split("=")[1])
    record = run_records.read_record(models)
    assert record is not None, "the killed run's model.pt is described by its own model.json"
    assert (record["epoch"], record["value"]) == (checkpoint_epoch + 1, best[-1])

    # resumed with the epochs of its checkpoint: nothing is trained, the model on disk is what the run leaves
    result = run_bundle("training", TRAIN, {**overrides, "train#trainer#max_epochs": checkpoint_epoch, "resume": True})
    assert "saved after the latest checkpoint" in result.stdout + result.stderr, result.stderr[-3000:]
    for folder in (models, bundle / "models"):  # the run's model and the promoted one
        record = run_records.read_record(folder)
        assert record is not None and (record["epoch"], record["value"]) == (checkpoint_epoch + 1, best[-1]), folder


# ``python -m monai.bundle`` with a SIGKILL right after its first latest checkpoint (epoch 1, validated)
KILL_AFTER_THE_FIRST_CHECKPOINT = """
import os, runpy, signal, sys
from clinseg.pipelines.engine.handlers.checkpointing import AtomicDiskSaver

save = AtomicDiskSaver.__call__

def save_then_die(self, checkpoint, filename, metadata=None):
    save(self, checkpoint, filename, metadata)
    if filename.startswith("latest"):
        os.kill(os.getpid(), signal.SIGKILL)

AtomicDiskSaver.__call__ = save_then_die
sys.argv = ["monai.bundle", *sys.argv[1:]]
runpy.run_module("monai.bundle", run_name="__main__")
"""


def test_a_resumed_training_chooses_the_decision_rule_on_a_best_epoch_from_before_its_interruption(tmp_path):
    """vessels chooses its threshold on the best epoch's validation cases, at the end of the training. Killed after
    its best epoch and resumed, the run had lost those cases and left its model without a decision rule (inference
    then thresholds at 0.5 whatever validation said); the latest checkpoint keeps them now."""
    from clinseg.datasets.fundus.phantom import write_drive_layout
    from clinseg.pipelines import runs as run_records

    drive = tmp_path / "drive"
    write_drive_layout(drive, n_images=8, shape=(80, 72), seed=2)
    train = [str(REPO_ROOT / "bundles" / "vessels" / "configs" / "train.json")]
    overrides = {"bundle_root": tmp_path / "bundle", "dataset_dir": drive, "val_fraction": 0.375,
                 "patch_size": "[32,32]", "patches_per_image": 2, "sw_roi_size": "[48,48]",
                 "network_def#channels": "[8,16,32]", "network_def#strides": "[2,2]", "val_interval": 1,
                 "train#trainer#max_epochs": 3, "tracking_uri": new_store(tmp_path / "mlflow.db")}  # fmt: skip
    train_until_killed(KILL_AFTER_THE_FIRST_CHECKPOINT, train, overrides)
    models = run_models(tmp_path / "bundle")
    record = run_records.read_record(models)
    assert record["epoch"] == 1 and record["decision_rule"] is None, "the rule is chosen when the training ends"

    # resumed for one more epoch, which is not validated: the best epoch stays the one before the kill
    run_bundle("training", train, {**overrides, "train#trainer#max_epochs": 2, "val_interval": 5, "resume": True})
    for folder in (models, tmp_path / "bundle" / "models"):  # the run's model and the promoted one
        record = run_records.read_record(folder)
        assert record["epoch"] == 1 and record["decision_rule"] is not None, (folder, record)
        assert record["decision_rule"]["cases"] == 3, record["decision_rule"]
