"""k-fold cross-validation as one parent run with a child per fold, and the fold models as one ensemble."""

from __future__ import annotations

import json
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from clinseg.datasets.errors import InputError
from clinseg.datasets.io import split_by_group
from clinseg.pipelines.engine.ensembles import ProbabilityEnsemble
from tests.conftest import OCT_BUNDLE, REPO_ROOT, run_bundle
from tests.test_experiments import experiments, refused, sweep_settings


def test_folds_validate_every_group_once_and_keep_groups_together():
    items = [{"id": f"s{subject}", "image": f"s{subject}_{scan}"} for subject in range(7) for scan in range(3)]
    validated = []
    for fold in range(3):
        train = split_by_group(items, "train", 0.2, folds=3, fold=fold)
        val = split_by_group(items, "val", 0.2, folds=3, fold=fold)
        assert len(train) + len(val) == len(items) and not {i["id"] for i in train} & {i["id"] for i in val}
        validated += sorted({i["id"] for i in val})
    assert sorted(validated) == sorted({i["id"] for i in items}), "each subject is validated exactly once"
    assert split_by_group(items, "val", 0.2) == items[-6:], "without folds: the fixed split, unchanged"
    for folds, fold in ((1, 0), (3, 3), (8, 0), (0, 1)):
        with pytest.raises(InputError):
            split_by_group(items, "val", 0.2, folds=folds, fold=fold)


def test_an_ensemble_averages_its_members_probabilities():
    torch.manual_seed(0)
    members = [torch.nn.Conv2d(1, 3, 3, padding=1) for _ in range(3)]
    image = torch.randn(2, 1, 8, 8)
    # what the bundles' post-processing does to a network's output: softmax
    probability = torch.softmax(ProbabilityEnsemble(members)(image), dim=1)
    expected = torch.stack([torch.softmax(m(image), dim=1) for m in members]).mean(0)
    assert torch.allclose(probability, expected, atol=1e-5)
    with pytest.raises(ValueError, match="at least 2"):
        ProbabilityEnsemble(members[:1])


def test_cv_runs_a_child_per_fold_and_its_models_infer_as_one_ensemble(tmp_path, tiny_oct_dir, tracking_uri):
    settings = [s.replace("max_epochs=2", "max_epochs=1") for s in sweep_settings(tmp_path, tiny_oct_dir)]
    out = experiments("cv", "oct_layers", "--folds", "3", "--set", *settings).stdout
    assert "3-fold cross-validation of oct_layers" in out and "standard deviation" in out, out
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("oct_layers")
    parent = client.search_runs([experiment.experiment_id], "tags.workflow = 'cv'")[0]
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED" and len(children) == 3
    assert sorted(c.data.params["fold"] for c in children) == ["0", "1", "2"]
    assert {c.data.params["folds"] for c in children} == {"3"}
    validated = [c.data.params["val_ids"].split(",") for c in children]
    assert len(sum(validated, [])) == len({i for v in validated for i in v}), "no B-scan in two folds"
    subjects = [{i.split("_bscan")[0] for i in v} for v in validated]
    assert all(len(s) == 1 for s in subjects) and len(set.union(*subjects)) == 3, "one whole subject per fold"

    best = [max(m.value for m in client.get_metric_history(c.info.run_id, "0_key/val_mean_dice")) for c in children]
    assert parent.data.metrics["cv_mean_val_mean_dice"] == pytest.approx(np.mean(best), abs=1e-6)
    assert parent.data.metrics["cv_std_val_mean_dice"] == pytest.approx(np.std(best), abs=1e-6)
    summary = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id, artifact_path="cv/folds.json", tracking_uri=tracking_uri
    )).read_text())  # fmt: skip
    checkpoints = [f["checkpoint"] for f in summary["per_fold"]]
    assert len(checkpoints) == 3 and all(Path(c).is_file() for c in checkpoints)
    assert "--checkpoint_path" in parent.data.tags["ensemble_command"]
    # a fold's model saw part of the data: none becomes the bundle's model (a later full training's would then be
    # kept out as "validated on other data")
    assert not (tmp_path / "bundle" / "models" / "model.pt").exists()
    assert not list((tmp_path / "bundle").glob("outputs/*/promotion.json"))

    images = tmp_path / "bscans"
    images.mkdir()
    for index in range(2):
        pixels = (np.random.default_rng(index).random((64, 96)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(images / f"b{index}.png")
    inference = [str(OCT_BUNDLE / "configs" / "inference.json")]
    tiny = {"image_size": "[64,96]", "network_def#channels": "[8,16,32]", "network_def#strides": "[2,2]"}
    output = tmp_path / "ensemble"
    # noise through models of one tiny epoch: layers in no order, which inference refuses unless told otherwise
    # the command the parent records, as a user copies it: it carries the folds' network settings, without which
    # inference builds the default network and refuses the fold models
    command = parent.data.tags["ensemble_command"].replace("IMAGES", str(images)).replace("OUT", str(output))
    assert command.startswith("python -m monai.bundle run inferring") and "--network_def#channels" in command
    assert "--dataset_dir" not in command and "--folds" not in command, "no setting that inference lacks"
    command = command.replace("python", shlex.quote(sys.executable), 1)
    # noise through models of one tiny epoch: layers in no order, which inference refuses unless told otherwise
    # and retinas at no height the folds' labels had
    unchecked = "--max_layer_order_relabelled 1.0 --max_retina_height_ratio 100"
    ran = subprocess.run(f"{command} {unchecked}", shell=True, cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert ran.returncode == 0, ran.stderr[-3000:]
    record = json.loads((output / "inference_summary.json").read_text())
    assert record["model"]["ensemble_size"] == 3, record["model"]
    assert [m["checkpoint"] for m in record["model"]["ensemble"]] == [str(Path(c).resolve()) for c in checkpoints]
    assert (output / "b0_seg.png").is_file() and (output / "b1_seg.png").is_file()

    # the fold models together trained on every case: evaluating them on a split of that data is refused
    evaluation = [str(OCT_BUNDLE / "configs" / "train.json"), str(OCT_BUNDLE / "configs" / "evaluate.json")]
    overrides = {**tiny, "dataset_dir": tiny_oct_dir, "bundle_root": tmp_path / "e"}
    scored = run_bundle(
        "evaluating", evaluation, {**overrides, "checkpoint_path": json.dumps(checkpoints)}, check=False
    )
    assert scored.returncode != 0 and "validated on different cases" in scored.stderr, scored.stderr[-2000:]
    assert "Traceback" not in scored.stderr

    # a checkpoint of the ensemble that is missing is named, before anything is written
    missing = str(tmp_path / "fold9.pt")
    failed = run_bundle("inferring", inference, {**tiny, "input_dir": images, "output_dir": tmp_path / "none",
                                                  "checkpoint_path": json.dumps([checkpoints[0], missing])},
                        check=False)  # fmt: skip
    assert failed.returncode != 0 and "fold9.pt" in failed.stderr and not (tmp_path / "none" / "b0_seg.png").exists()


def test_an_interrupted_cv_resumes_keeping_its_finished_folds(tmp_path, tiny_oct_dir, tracking_uri):
    """Stopped while its second fold trains, a cross-validation resumed by its parent run id keeps the finished
    fold (not trained again), continues the interrupted one from its latest checkpoint, and completes the parent."""
    # 40 epochs: the second fold must still train when the SIGTERM comes, after the "still running" check (a
    # process of its own, slow to start on a loaded machine); with 20, it once finished before it
    settings = [s.replace("max_epochs=2", "max_epochs=40") for s in sweep_settings(tmp_path, tiny_oct_dir)]
    command = [sys.executable, "-m", "clinseg.pipelines.experiments", "cv", "oct_layers", "--folds", "2", "--set"]
    cv = subprocess.Popen([*command, *settings], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)  # fmt: skip
    outputs, deadline = tmp_path / "bundle" / "outputs", time.time() + 600

    def wait_for_checkpoints(count):  # of the first epoch of the first `count` folds (one run folder each)
        while len({p.parents[1] for p in outputs.glob("*/models/latest_checkpoint_epoch=*.pt")}) < count:
            assert cv.poll() is None and time.time() < deadline, f"fold {count - 1} did not start in time"
            time.sleep(0.1)
        assert cv.poll() is None, cv.communicate()

    wait_for_checkpoints(1)
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name("oct_layers").experiment_id
    parent = client.search_runs([experiment_id], "tags.workflow = 'cv'")[0]
    # its own process still runs: a second one would train the same folds
    assert "is still running" in refused("cv", "oct_layers", "--resume", parent.info.run_id)
    wait_for_checkpoints(2)
    cv.send_signal(signal.SIGTERM)
    out, err = cv.communicate(timeout=300)
    assert cv.returncode != 0 and "incomplete: fold 1 did not finish" in out, out + err[-3000:]
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "KILLED" and f"--resume {parent.info.run_id}" in out, out

    def children():
        return client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                  order_by=["attributes.start_time"])  # fmt: skip

    first, interrupted = children()
    assert (first.data.params["fold"], first.info.status) == ("0", "FINISHED")
    assert (interrupted.data.params["fold"], interrupted.info.status) == ("1", "KILLED")
    # a resumed cross-validation keeps the settings its folds were trained with
    assert "keeps its settings" in refused("cv", "oct_layers", "--resume", parent.info.run_id, "--set",
                                           "train#trainer#max_epochs=9")  # fmt: skip
    assert "has 2 folds" in refused("cv", "oct_layers", "--resume", parent.info.run_id, "--folds", "3")
    assert "not a cross-validation of vessels" in refused("cv", "vessels", "--resume", parent.info.run_id)
    assert "is no run" in refused("cv", "oct_layers", "--resume", "0" * 32)

    out = experiments("cv", "oct_layers", "--resume", parent.info.run_id).stdout
    assert "fold=0: kept" in out and "fold=1: continues run" in out and "standard deviation" in out, out
    runs = children()
    assert [r.info.run_id for r in runs[:2]] == [first.info.run_id, interrupted.info.run_id] and len(runs) == 3
    resumed = runs[2]
    assert resumed.data.params["fold"] == "1" and resumed.info.status == "FINISHED"
    assert resumed.data.tags["resumed_from_run"] == interrupted.info.run_id
    dice = client.get_metric_history(resumed.info.run_id, "0_key/val_mean_dice")
    assert [m.step for m in dice] == list(range(1, 41)), "the interrupted fold's epochs, then its own"
    parent = client.get_run(parent.info.run_id)
    assert parent.info.status == "FINISHED" and parent.data.metrics["cv_folds_scored"] == 2
    summary = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=parent.info.run_id, artifact_path="cv/folds.json", tracking_uri=tracking_uri
    )).read_text())  # fmt: skip
    assert [f["run_id"] for f in summary["per_fold"]] == [first.info.run_id, resumed.info.run_id]
    assert summary["complete"] and parent.data.metrics["cv_mean_val_mean_dice"] == pytest.approx(summary["mean"])


def test_cv_refuses_too_few_folds_and_a_fold_of_its_own(tmp_path, tiny_oct_dir, tracking_uri):
    assert "needs 2 folds or more" in refused("cv", "oct_layers", "--folds", "1")
    assert "chosen by cv itself" in refused("cv", "oct_layers", "--folds", "3", "--set", "fold=1")
    assert "chosen by cv itself" in refused("cv", "oct_layers", "--folds", "3", "--set", "folds=4")


def test_an_incomplete_cv_records_no_mean_as_its_estimate(tmp_path, tracking_uri):
    """A fold that failed, or finished without a validation, leaves the cross-validation incomplete: the parent
    records which folds are missing, and no mean of the others as the k-fold estimate."""
    from clinseg.pipelines.experiments import cv_summary
    from tests.test_experiments import recorded_training

    client = mlflow.MlflowClient(tracking_uri)
    # its artifacts (cv/folds.json) beside the test's store, not in the project's mlruns/ (the default, relative)
    experiment_id = client.create_experiment("oct_layers", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment_id, tags={"workflow": "cv"}).info.run_id
    nan = float("nan")
    for fold, dice in ((0, [0.4, 0.6]), (1, [0.8, 0.9]), (2, [nan, nan])):  # fold 2 validated nothing
        recorded_training(client, experiment_id, f"f{fold}", {"0_key/val_mean_dice": dice}, parent, fold=fold,
                          folds=4, val_ids=f"Subject_0{fold}_bscan00")  # fmt: skip
    failed = recorded_training(client, experiment_id, "f3", {}, parent, fold=3, folds=4)
    client.set_terminated(failed, "FAILED")

    summary = cv_summary(client, "oct_layers", 4, parent)
    assert not summary["complete"] and set(summary["missing_folds"]) == {"2", "3"}, summary
    assert "mean" not in summary and summary["partial_mean"] == pytest.approx(0.75)
    metrics = client.get_run(parent).data.metrics
    assert "cv_mean_val_mean_dice" not in metrics and "cv_std_val_mean_dice" not in metrics, metrics
    assert metrics["cv_folds_scored"] == 2 and metrics["fold_1_val_mean_dice"] == pytest.approx(0.9)


def test_the_ensemble_command_names_each_bundle_s_input_and_keeps_the_model_settings():
    from clinseg.pipelines.experiments import ensemble_command

    settings = {"network_def#channels": "[8, 16]", "dataset_dir": "/data/ct", "folds": "5", "learning_rate": "0.01"}
    command = ensemble_command("ct_heart", ["/runs/a b/model.pt", "/runs/c/model.pt"], settings)
    assert " --input_path IMAGES " in command and "--input_dir" not in command, "a CT is a folder or a file"
    assert " --network_def#channels '[8, 16]'" in command
    assert "--dataset_dir" not in command and "--folds" not in command and "--learning_rate" not in command
    assert """--checkpoint_path '["/runs/a b/model.pt", "/runs/c/model.pt"]'""" in command
    assert " --input_dir IMAGES " in ensemble_command("vessels", ["a", "b"], {})


def test_the_ensemble_command_of_a_bundle_copied_elsewhere_runs_its_own_inference_config(tmp_path):
    from clinseg.pipelines.experiments import ensemble_command

    copy = tmp_path / "my bundles" / "vessels"
    shutil.copytree(REPO_ROOT / "bundles" / "vessels" / "configs", copy / "configs")
    command = ensemble_command("vessels", ["a", "b"], {}, str(copy / "configs" / "train.json"))
    assert f"--config_file '{copy / 'configs' / 'inference.json'}' " in command
    # an overlay kept outside a bundle folder: the repository bundle's inference config
    (tmp_path / "overlay.json").write_text("{}")
    command = ensemble_command("vessels", ["a", "b"], {}, str(tmp_path / "overlay.json"))
    assert "--config_file bundles/vessels/configs/inference.json " in command
