"""Every run owns its state (``clinseg.pipelines.runs``), through the real command lines:

- two trainings of one bundle root at once keep their own checkpoints, and nothing one writes is replaced or
  deleted by the other; the bundle's ``models/model.pt`` ends as the better of the two, by promotion, with both
  metrics recorded;
- a worse run does not replace the model in place; one validated on other data is not compared with it;
  ``experiments promote`` replaces it on request;
- evaluation and inference say what they evaluated: the training run and the checkpoint's SHA-256.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from clinseg.pipelines import runs
from tests.conftest import REPO_ROOT, new_store

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")
TRAIN = REPO_ROOT / "bundles" / "oct_layers" / "configs" / "train.json"
TINY = {
    "image_size": "[32,48]",
    "network_def#channels": "[4,8]",
    "network_def#strides": "[2]",
    "num_workers": 0,
    "batch_size": 2,
    "val_interval": 1,
}


def command(overrides: dict, run_id: str = "training", files: list[Path] = (TRAIN,)) -> list[str]:
    line = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", str([str(f) for f in files])]
    for key, value in overrides.items():
        line += [f"--{key}", str(value)]
    return line


def start(overrides: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(command(overrides), cwd=REPO_ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)


def decision(run_folder: Path) -> dict:
    return json.loads((run_folder / "promotion.json").read_text())


@pytest.fixture()
def data_dir(tmp_path) -> Path:
    from clinseg.datasets.oct.phantom import write_phantom_dataset

    write_phantom_dataset(tmp_path / "data", n_subjects=3, n_bscans=2, height=48, width=64, seed=3)
    return tmp_path / "data"


class FolderWatcher(threading.Thread):
    """Records every file under a folder that disappears or changes content while the watched runs go on, by
    polling: a file replaced or deleted by another run shows as a path whose (size, mtime) changed after its run
    stopped writing it. Only the checkpoints of finished epochs are watched (a run replaces its own latest one)."""

    def __init__(self, folder: Path):
        super().__init__(daemon=True)
        self.folder, self.seen, self.stop = folder, {}, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for path in self.folder.glob("outputs/*/models/*"):
                try:
                    self.seen.setdefault(str(path), set()).add(path.stat().st_ino)
                except FileNotFoundError:
                    pass
            time.sleep(0.05)


def test_concurrent_trainings_keep_their_own_checkpoints_and_promote_the_better(tmp_path, data_dir):
    root = tmp_path / "bundle"
    store = new_store(tmp_path / "mlflow.db")
    base = {**TINY, "bundle_root": root, "dataset_dir": data_dir, "tracking_uri": store}
    watcher = FolderWatcher(root)
    watcher.start()
    short = start({**base, "train#trainer#max_epochs": 1, "seed": 1}, tmp_path / "short.log")
    long = start({**base, "train#trainer#max_epochs": 4, "seed": 2}, tmp_path / "long.log")
    assert short.wait(600) == 0, (tmp_path / "short.log").read_text()[-3000:]
    assert long.wait(600) == 0, (tmp_path / "long.log").read_text()[-3000:]
    watcher.stop.set()

    folders = sorted(root.glob("outputs/*/models"))
    assert len(folders) == 2, folders
    records = {}
    for models in folders:
        record = runs.read_record(models)
        assert record is not None, f"{models}: model.json no longer describes model.pt (replaced by another run?)"
        epochs = sorted(p.name for p in models.glob("latest_checkpoint_epoch=*.pt"))
        records[record["epoch"] if record["epoch"] else 0] = (models.parent, record, epochs)
    # each run's own latest checkpoint: epoch 1 for the short run, epoch 4 for the long one
    assert sorted(e for _, _, (e,) in records.values()) == [
        "latest_checkpoint_epoch=1.pt",
        "latest_checkpoint_epoch=4.pt",
    ]

    decisions = {folder.name: decision(folder) for folder, _, _ in records.values()}
    print(json.dumps({name: {k: d[k] for k in ("promoted", "reason")} for name, d in decisions.items()}, indent=1))
    best = max((r for _, r, _ in records.values()), key=lambda r: r["value"])
    in_place = runs.read_record(root / "models")
    assert in_place is not None and in_place["training_run_name"] == best["training_run_name"], (in_place, decisions)
    assert in_place["sha256"] == best["sha256"]
    assert any(d["promoted"] for d in decisions.values())
    for d in decisions.values():  # both metrics recorded wherever two models were compared
        if d["incumbent"] is not None:
            assert d["candidate"]["value"] is not None and d["incumbent"]["value"] is not None
    # no file of one run was ever replaced by another: a checkpoint's name is only ever written by its run, and
    # model.pt changes only in its own run folder (the record still matches it, checked above)
    for path, inodes in watcher.seen.items():
        if Path(path).name.startswith("latest_checkpoint"):
            assert len(inodes) == 1, f"{path} was written more than once"


def test_a_worse_run_keeps_the_model_in_place_and_promote_replaces_it(tmp_path, data_dir):
    root = tmp_path / "bundle"
    store = new_store(tmp_path / "mlflow.db")
    base = {**TINY, "bundle_root": root, "dataset_dir": data_dir, "tracking_uri": store}
    env = {**os.environ}

    logs = []

    def train(epochs: int, **extra) -> Path:
        before = set(root.glob("outputs/*"))
        result = subprocess.run(command({**base, "train#trainer#max_epochs": epochs, **extra}), cwd=REPO_ROOT,
                                capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        logs.append(result.stdout + result.stderr)
        (folder,) = set(root.glob("outputs/*")) - before
        return folder

    good = train(4)
    assert decision(good)["promoted"] and decision(good)["reason"] == "no model in place"
    worse = train(1)
    verdict = decision(worse)
    if verdict["candidate"]["value"] < verdict["incumbent"]["value"]:
        assert not verdict["promoted"] and "does not beat" in verdict["reason"], verdict
        assert runs.read_record(root / "models")["training_run_name"] == good.name
    # validated on other data: the validation fingerprint differs, so the two are not compared
    other = train(1, val_fraction=0.5)
    assert not decision(other)["promoted"] and "other data" in decision(other)["reason"], decision(other)

    # the command the log gives for promoting by hand is the one that works
    (hint,) = re.findall(r"To use this run's model: python -m clinseg\.pipelines\.experiments (.*)", logs[-1])
    assert hint.split() == ["promote", "oct_layers", other.name, "--bundle_root", str(root)], hint
    result = subprocess.run(
        [sys.executable, "-m", "clinseg.pipelines.experiments", "--tracking_uri", store, *hint.split()],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    record = runs.read_record(root / "models")
    assert record["training_run_name"] == other.name and record["promotion_reason"] == "promoted on request"
    assert record["replaced"]["training_run_name"] in (good.name, worse.name)


def test_the_promoted_model_is_listed_in_large_files_and_restored_from_it(tmp_path, data_dir):
    """The Model Zoo's ``large_files.yml`` written by the promotion restores exactly the promoted model."""
    root = tmp_path / "bundle"
    overrides = {**TINY, "bundle_root": root, "dataset_dir": data_dir, "train#trainer#max_epochs": 1,
                 "tracking_uri": new_store(tmp_path / "mlflow.db")}  # fmt: skip
    result = subprocess.run(command(overrides), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    promoted = (root / "models" / "model.pt").read_bytes()
    (root / "models" / "model.pt").unlink()
    restore = [sys.executable, "-m", "monai.bundle", "download_large_files", "--bundle_path", str(root)]
    result = subprocess.run(restore, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (root / "models" / "model.pt").read_bytes() == promoted
    assert runs.read_record(root / "models") is not None, "model.json describes the restored file"


def test_evaluation_and_inference_say_what_they_used(tmp_path, data_dir):
    """The training run id, the checkpoint and its SHA-256: in the outputs' JSON, and linked both ways in MLflow."""
    import mlflow

    root = tmp_path / "bundle"
    store = new_store(tmp_path / "mlflow.db")
    base = {**TINY, "bundle_root": root, "dataset_dir": data_dir, "tracking_uri": store}
    for run_id, files, extra in [
        ("training", [TRAIN], {"train#trainer#max_epochs": 1, "run_name": "the-training"}),
        ("evaluating", [TRAIN, TRAIN.parent / "evaluate.json"], {"run_name": "the-evaluation"}),
    ]:
        result = subprocess.run(command({**base, **extra}, run_id, files), cwd=REPO_ROOT, capture_output=True,
                                text=True, timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    inference = {k: v for k, v in TINY.items() if k.startswith(("image_size", "network_def", "num_workers"))}
    # (a model of one tiny epoch puts layers in no order yet, which inference refuses unless told otherwise)
    inference.update(bundle_root=root, input_dir=data_dir, output_dir=tmp_path / "predictions")
    inference["max_layer_order_relabelled"] = 1.0
    inference["max_retina_height_ratio"] = 100
    result = subprocess.run(command(inference, "inferring", [TRAIN.parent / "inference.json"]), cwd=REPO_ROOT,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]

    client = mlflow.MlflowClient(store)
    experiment = client.get_experiment_by_name("oct_layers")
    (training,) = client.search_runs([experiment.experiment_id], "tags.workflow = 'train'")
    (evaluation,) = client.search_runs([experiment.experiment_id], "tags.workflow = 'evaluate'")
    record = runs.read_record(root / "models")
    assert record["training_run_id"] == training.info.run_id and record["training_run_name"] == "the-training"
    assert training.data.tags["promotion"] == "promoted"
    assert training.data.tags["promotion_reason"] == "no model in place"

    expected = {"checkpoint": str((root / "models" / "model.pt").resolve()), "checkpoint_sha256": record["sha256"],
                "training_run_id": training.info.run_id, "training_run_name": "the-training"}  # fmt: skip
    metrics = json.loads((root / "outputs" / "the-evaluation" / "metrics.json").read_text())
    assert {k: metrics["model"][k] for k in expected} == expected
    assert {k: evaluation.data.tags[k] for k in expected} == expected
    assert training.data.tags[f"evaluate_run.{evaluation.info.run_id}"] == "the-evaluation", "linked back"
    summary = json.loads((tmp_path / "predictions" / "inference_summary.json").read_text())
    assert {k: summary["model"][k] for k in expected} == expected

    # the model evaluated against another store, which has no record of its training: the evaluation is recorded
    # in full there (it once stayed RUNNING without a metric, its records held back behind the refused link-back)
    elsewhere = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    evaluate = command({**base, "tracking_uri": elsewhere, "run_name": "elsewhere"}, "evaluating",
                       [TRAIN, TRAIN.parent / "evaluate.json"])  # fmt: skip
    result = subprocess.run(evaluate, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    said = result.stdout + result.stderr
    assert f"the model's training run {training.info.run_id} is not in" in said, said[-3000:]
    assert "tracking_spool" not in said, said[-3000:]
    client = mlflow.MlflowClient(elsewhere)
    (other,) = client.search_runs([client.get_experiment_by_name("oct_layers").experiment_id])
    assert other.info.status == "FINISHED" and other.data.metrics, (other.info.status, other.data.metrics)
    assert other.data.tags["training_run_id"] == training.info.run_id
    # the same store, its training run deleted in the UI: refused tags as an unknown run's, recorded in full too
    mlflow.MlflowClient(store).delete_run(training.info.run_id)
    again = command({**base, "run_name": "after-deletion"}, "evaluating", [TRAIN, TRAIN.parent / "evaluate.json"])
    result = subprocess.run(again, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    client = mlflow.MlflowClient(store)
    (after,) = client.search_runs([experiment.experiment_id], "tags.run_folder = 'after-deletion'")
    assert after.info.status == "FINISHED" and after.data.metrics, (after.info.status, after.data.metrics)


def test_the_cross_camera_benchmark_runs_a_model_with_its_recorded_settings(tmp_path):
    """A CLAHE-trained model is benchmarked with CLAHE, a model of another network size with that size; a
    condition's own setting is kept, never doubled."""
    from clinseg.pipelines.benchmarks.vessels_cross_camera import CONDITIONS, with_trained_settings

    models = tmp_path / "models"
    models.mkdir()
    (models / runs.MODEL_FILE).write_bytes(b"weights")
    runs.write_run_record(models, {"input_settings": {"clahe": True, "channels": "green", "scale_to_fov": True}})
    model = models / runs.MODEL_FILE
    default = with_trained_settings(CONDITIONS["estimated_fov_scaled_rule"], model)
    assert default == ["--clahe", "True", "--channels", "'green'", "--scale_to_fov", "True"]
    unscaled = with_trained_settings(CONDITIONS["estimated_fov"], model)
    assert unscaled.count("--scale_to_fov") == 1 and unscaled[unscaled.index("--scale_to_fov") + 1] == "False"
    assert unscaled[:2] == ["--clahe", "True"]
    # a training checkpoint beside model.pt is not what model.json describes: nothing is added
    assert with_trained_settings(["--tta", "True"], models / "latest_checkpoint_epoch=3.pt") == ["--tta", "True"]
    # the network's section is passed one config id at a time: a whole network_def given as one value would
    # replace the network's definition
    runs.write_run_record(models, {"input_settings": {"network_def": {"channels": [8, 16], "num_res_units": 3}}})
    options = with_trained_settings(["--channels", "'rgb'"], model)
    assert options == ["--network_def#channels", "[8, 16]", "--network_def#num_res_units", "3", "--channels", "'rgb'"]


def test_a_model_trained_with_a_setting_this_config_lacks_is_refused(tmp_path):
    """A model whose record holds an input setting the running config does not know (a later version's
    preprocessing, an option since taken out) would run without it: refused, naming the setting. Settings the record
    lacks (an earlier version's record) are not checked, and empty settings check nothing."""
    from clinseg.datasets.errors import ConfigError

    models = tmp_path / "models"
    models.mkdir()
    (models / runs.MODEL_FILE).write_bytes(b"weights")
    model = models / runs.MODEL_FILE
    settings = {"channels": "green", "network_def": {"channels": [8, 16]}}
    runs.write_run_record(models, {"input_settings": {**settings, "background_sigma": 25}})
    with pytest.raises(ConfigError, match="background_sigma.*25.*does not have") as refused:
        runs.require_input_settings(model, settings)
    assert refused.value.key == "background_sigma"
    with pytest.raises(ConfigError, match="background_sigma"):  # each member of an ensemble
        runs.require_input_settings([model, model], settings)
    assert runs.require_input_settings(model, {}) == model
    runs.write_run_record(models, {"input_settings": {"channels": "green"}})
    assert runs.require_input_settings(model, settings) == model
    runs.write_run_record(models, {"input_settings": {"channels": "green", "network_def": {"norm": "instance"}}})
    with pytest.raises(ConfigError, match="network_def#norm"):
        runs.require_input_settings(model, settings)


def _run_model(folder: Path, value, content: bytes) -> Path:
    """A run's models folder as the trainer leaves it: its model.pt and the model.json describing it."""
    models = folder / "models"
    models.mkdir(parents=True)
    (models / "model.pt").write_bytes(content)
    runs.write_run_record(models, {"training_run_name": folder.name, "key_metric": "val_mean_dice", "value": value,
                                   "mode": "max", "validation_fingerprint": "v1", "bundle": "oct_layers"})  # fmt: skip
    return models


def test_a_model_promoted_before_any_validation_gives_way_to_a_validated_one(tmp_path):
    """A one-epoch smoke training with no validation is promoted when nothing is in place (its value is null);
    the next, validated training must replace it, not fail on comparing with null after all its work."""
    bundle_models = tmp_path / "bundle" / "models"
    first = runs.promote(_run_model(tmp_path / "smoke", None, b"smoke"), bundle_models)
    assert first["promoted"] and runs.read_record(bundle_models)["value"] is None
    second = runs.promote(_run_model(tmp_path / "trained", 0.61, b"trained"), bundle_models)
    assert second["promoted"] and second["reason"] == "the model in place was never validated", second
    assert (bundle_models / "model.pt").read_bytes() == b"trained"
    third = runs.promote(_run_model(tmp_path / "worse", 0.42, b"worse"), bundle_models)
    assert not third["promoted"] and "does not beat" in third["reason"]


def test_a_deleted_experiment_is_one_line_naming_it_and_the_ways_out(tmp_path, data_dir):
    """MLflow keeps a deleted experiment's name taken: a training (and cv) under it must say so in one line, not
    end in MONAI's or MLflow's "must be in the 'active' state" traceback."""
    import mlflow

    store = new_store(tmp_path / "mlflow.db")
    client = mlflow.MlflowClient(store)
    client.delete_experiment(client.create_experiment("oct_layers"))
    overrides = {**TINY, "bundle_root": tmp_path / "bundle", "dataset_dir": data_dir, "tracking_uri": store,
                 "train#trainer#max_epochs": 1}  # fmt: skip
    for line in (
        command(overrides),
        [sys.executable, "-m", "clinseg.pipelines.experiments", "--tracking_uri", store, "cv", "oct_layers",
         "--folds", "2", "--set", f"dataset_dir={data_dir}", f"bundle_root={tmp_path / 'bundle'}"],
    ):  # fmt: skip
        result = subprocess.run(line, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        assert result.returncode == 1, result.stderr[-3000:]
        (message,) = [row for row in result.stderr.splitlines() if "is deleted" in row]
        assert "'oct_layers'" in message and "mlflow experiments restore" in result.stderr
        assert "mlflow gc" in result.stderr
        assert "Traceback" not in result.stderr
    assert not list((tmp_path / "bundle").glob("outputs/*/models/model.pt")), "nothing trained before the refusal"


def test_a_run_name_already_taken_is_refused_and_the_first_runs_files_are_kept(tmp_path, data_dir):
    """A second training given the first one's ``--run_name`` would write over its checkpoints and model.pt; it is
    refused before it writes anything, and ``--resume`` of a run still training is refused while that run holds it."""
    from filelock import FileLock

    root = tmp_path / "bundle"
    base = {**TINY, "bundle_root": root, "dataset_dir": data_dir, "train#trainer#max_epochs": 1,
            "tracking_uri": new_store(tmp_path / "mlflow.db"), "run_name": "shared"}  # fmt: skip
    first = subprocess.run(command(base), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    folder = root / "outputs" / "shared"
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != runs.RUN_LOCK}

    second = subprocess.run(command({**base, "seed": 5}), cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert second.returncode == 1 and "run name 'shared': is taken" in second.stderr, second.stderr[-3000:]
    assert "--resume shared" in second.stderr and "Traceback" not in second.stderr
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != runs.RUN_LOCK} == before

    with FileLock(str(folder / runs.RUN_LOCK), timeout=0):  # as a training of this run still going holds it
        resumed = subprocess.run(command({**base, "resume": "shared", "train#trainer#max_epochs": 2}),
                                 cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 1 and "still running in another process" in resumed.stderr, resumed.stderr[-3000:]
    assert {p: p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != runs.RUN_LOCK} == before
    resumed = subprocess.run(command({**base, "resume": "shared", "train#trainer#max_epochs": 2}), cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=600)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (folder / "models" / "latest_checkpoint_epoch=2.pt").is_file()

    # resumed on other validation data, or with other input settings, the run would go on against another yardstick
    for change, named in (
        ({"val_fraction": 0.5}, "validated on other data"),
        ({"image_size": "[48,64]"}, "image_size"),
    ):
        other = subprocess.run(command({**base, **change, "resume": "shared", "train#trainer#max_epochs": 3}),
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert other.returncode == 1 and named in other.stderr, other.stderr[-3000:]
        assert not (folder / "models" / "latest_checkpoint_epoch=3.pt").exists()


def test_a_promotion_killed_between_its_renames_is_completed_by_the_next_reader(tmp_path):
    """model.pt, model.json and large_files.yml are renamed one after the other; a process killed between two
    renames must not leave one run's model.pt beside another's model.json (the record no longer matches, every
    later promotion is kept out and the input-settings check is skipped)."""
    bundle_models = tmp_path / "bundle" / "models"
    runs.promote(_run_model(tmp_path / "first", 0.5, b"first"), bundle_models)
    better = _run_model(tmp_path / "better", 0.7, b"better")
    killed = subprocess.run(
        [sys.executable, "-c", (
            "import os, sys\n"
            "from clinseg.pipelines import runs\n"
            "replace, done = os.replace, []\n"
            "def dying_replace(src, dst):\n"
            "    replace(src, dst)\n"
            "    if str(dst).endswith('model.pt'):\n"
            "        os._exit(9)  # killed right after the first rename of the promotion\n"
            f"os.replace = dying_replace\nruns.promote({str(better)!r}, {str(bundle_models)!r})\n"
        )],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert (bundle_models / "model.pt").read_bytes() == b"better"
    assert json.loads((bundle_models / "model.json").read_text())["training_run_name"] == "first", "half-done"

    record = runs.read_record(bundle_models)
    assert record is not None and record["training_run_name"] == "better" and record["value"] == 0.7
    assert record["sha256"] == runs.sha256_of(bundle_models / "model.pt")
    assert "better" in (bundle_models.parent / "large_files.yml").read_text()
    assert not [p.name for p in bundle_models.iterdir() if p.name.endswith((".staged", ".json")) and
                p.name != "model.json"]  # fmt: skip
    assert not runs.promote(_run_model(tmp_path / "worse", 0.6, b"worse"), bundle_models)["promoted"]
