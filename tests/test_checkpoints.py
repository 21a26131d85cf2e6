"""Checkpoints are identified before they are loaded: through the real command lines, a file that is not a
checkpoint, another bundle's checkpoint, one of another network size, and ``--resume True`` onto a checkpoint of
another network size each end in one line naming the file and what differs (exit 1, no traceback). A training
started from another model's weights (``initial_weights``, fine-tuning) starts from exactly them and records them;
weights that do not fit, or given with ``--resume``, are refused the same way."""

from __future__ import annotations

import json

import pytest
import torch
from monai.bundle import ConfigParser

from clinseg.datasets.errors import DataError
from clinseg.pipelines import runs
from clinseg.pipelines.engine.checkpoints import load_network_weights, model_state, read_checkpoint, shape_differences
from tests.conftest import REPO_ROOT, new_store, run_bundle, run_models

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")
OCT = REPO_ROOT / "bundles" / "oct_layers" / "configs"
TINY = {"image_size": "[32,48]", "network_def#channels": "[4,8]", "network_def#strides": "[2]"}
OCT_CLASSES = json.loads((OCT / "train.json").read_text())["class_names"]


def network(bundle: str, **overrides):
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundles" / bundle / "configs" / "train.json"))
    for key, value in overrides.items():
        parser[key] = json.loads(value)
    return parser.get_parsed_content("network_def")


def one_line_error(result) -> str:
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    return next(line for line in result.stderr.splitlines() if line.startswith("error:"))


def test_shape_differences_say_what_differs():
    small, large = network("oct_layers", **TINY).state_dict(), network("oct_layers").state_dict()
    problems = shape_differences(small, large)
    assert problems and "other shapes" in problems[0] and "in the file" in problems[0]
    assert shape_differences(small, small) == []


@pytest.mark.parametrize("kind", ["not a checkpoint", "another bundle", "another network size"])
def test_evaluation_names_a_checkpoint_that_does_not_fit(kind, tmp_path, tiny_oct_dir, tracking_uri):
    checkpoint = tmp_path / "model.pt"
    if kind == "not a checkpoint":
        checkpoint.write_text("weights, honestly")
    elif kind == "another bundle":
        torch.save(network("vessels", **{k: v for k, v in TINY.items() if k != "image_size"}).state_dict(), checkpoint)
    else:
        torch.save(network("oct_layers", **{**TINY, "network_def#channels": "[8,16]"}).state_dict(), checkpoint)
    result = run_bundle(
        "evaluating",
        [str(OCT / "train.json"), str(OCT / "evaluate.json")],
        {**TINY, "bundle_root": tmp_path / "b", "dataset_dir": tiny_oct_dir, "checkpoint_path": checkpoint},
        check=False,
    )
    line = one_line_error(result)
    assert str(checkpoint) in line
    expected = "is not a PyTorch checkpoint" if kind == "not a checkpoint" else "does not fit this bundle's model"
    assert expected in line, line


def test_resume_onto_a_checkpoint_of_another_network_size_names_it(tmp_path, tiny_oct_dir, tracking_uri):
    root = tmp_path / "b"
    overrides = {**TINY, "bundle_root": root, "dataset_dir": tiny_oct_dir, "train#trainer#max_epochs": 1}
    run_bundle("training", [str(OCT / "train.json")], overrides)
    latest = next(run_models(root).glob("latest_checkpoint_epoch=*.pt"))
    result = run_bundle(
        "training",
        [str(OCT / "train.json")],
        {**overrides, "network_def#channels": "[8,16]", "train#trainer#max_epochs": 2, "resume": True},
        check=False,
    )
    line = one_line_error(result)
    assert str(latest) in line and "other shapes" in line, line
    assert latest.is_file(), "the checkpoint that did not fit is kept"


def test_export_and_deploy_loading_name_the_file(tmp_path):
    path = tmp_path / "model.pt"
    torch.save({"model": network("vessels").state_dict()}, path)
    with pytest.raises(DataError, match="does not fit this bundle's model") as error:
        load_network_weights(network("oct_layers"), path)
    assert str(path) in str(error.value)
    path.write_bytes(b"")
    with pytest.raises(DataError, match="is not a PyTorch checkpoint"):
        load_network_weights(network("oct_layers"), path)


@pytest.fixture(scope="module")
def trained_oct(tmp_path_factory, tiny_oct_dir) -> dict:
    """A tiny oct_layers training of 1 epoch (its own bundle root and MLflow store): the weights to start from."""
    folder = tmp_path_factory.mktemp("trained")
    overrides = {**TINY, "dataset_dir": tiny_oct_dir, "train#trainer#max_epochs": 1,
                 "tracking_uri": new_store(folder / "mlflow.db")}  # fmt: skip
    run_bundle("training", [str(OCT / "train.json")], {**overrides, "bundle_root": folder / "a"})
    return {"overrides": overrides, "root": folder / "a", "model": folder / "a" / "models" / "model.pt"}


def parameters(path) -> dict[str, torch.Tensor]:
    names = {name for name, _ in network("oct_layers", **TINY).named_parameters()}  # not the norms' running stats
    return {name: value for name, value in model_state(read_checkpoint(path, "cpu")).items() if name in names}


def test_a_training_from_initial_weights_starts_from_them_and_says_so(tmp_path, trained_oct):
    """At a learning rate of 1e-12 the new run's model is the start model's; a start from scratch would end at the
    seed's initialisation, which the start model's epoch of lr 1e-3 left far behind. ``model.json`` names the file,
    its SHA-256 and the run it came from."""
    start = trained_oct["model"]
    overrides = {**trained_oct["overrides"], "bundle_root": tmp_path / "b", "learning_rate": 1e-12}
    run_bundle("training", [str(OCT / "train.json")], {**overrides, "initial_weights": start})
    before, after = parameters(start), parameters(tmp_path / "b" / "models" / "model.pt")
    assert before.keys() == after.keys() and before
    assert all(torch.allclose(before[name], after[name], atol=1e-6) for name in before)
    source = runs.read_record(tmp_path / "b" / "models")["initialized_from"]
    assert source["checkpoint"] == str(start.resolve()) and source["checkpoint_sha256"] == runs.sha256_of(start)
    assert source["training_run_name"] == runs.read_record(trained_oct["root"] / "models")["training_run_name"]

    run_bundle("training", [str(OCT / "train.json")], {**overrides, "bundle_root": tmp_path / "c"})
    scratch = parameters(tmp_path / "c" / "models" / "model.pt")
    assert max(float((scratch[name] - before[name]).abs().max()) for name in before) > 1e-4, "the check can fail"
    assert runs.read_record(tmp_path / "c" / "models")["initialized_from"] is None


def test_initial_weights_that_do_not_fit_or_come_with_resume_are_refused(tmp_path, trained_oct):
    start = trained_oct["model"]
    overrides = {**trained_oct["overrides"], "initial_weights": start}
    result = run_bundle(
        "training",
        [str(OCT / "train.json")],
        {**overrides, "bundle_root": tmp_path / "b", "network_def#channels": "[8,16]"},
        check=False,
    )
    line = one_line_error(result)
    assert str(start) in line, line
    assert "does not fit this bundle's model" in line, line
    assert not list((tmp_path / "b").glob("outputs/*/models/*.pt")), "nothing was trained"

    sha = runs.sha256_of(start)
    result = run_bundle("training", [str(OCT / "train.json")], {**overrides, "bundle_root": trained_oct["root"],
                        "resume": True}, check=False)  # fmt: skip
    line = one_line_error(result)
    assert "initial_weights" in line and "--resume" in line, line
    assert runs.sha256_of(start) == sha, "the resumed run's model is untouched"


# a model of one tiny epoch puts layers in no order yet, which OCT inference refuses unless told otherwise
UNORDERED_LAYERS_ALLOWED = {"max_layer_order_relabelled": "1.0", "max_retina_height_ratio": "100"}


def test_a_model_run_with_other_input_settings_than_it_was_trained_with_is_refused(tmp_path, trained_oct):
    """``model.json`` records the bundle's ``input_settings`` (here the image size); an evaluation, an inference or
    an export with other values is refused, naming the setting and the value to pass; with the same, it runs."""
    assert runs.read_record(trained_oct["model"].parent)["input_settings"] == {
        "class_names": OCT_CLASSES,
        "image_size": [32, 48],
        "network_def": {"channels": [4, 8], "strides": [2], "num_res_units": 1, "norm": "batch"},
    }
    overrides = {**trained_oct["overrides"], "bundle_root": trained_oct["root"], "image_size": "[48,64]"}
    result = run_bundle("evaluating", [str(OCT / "train.json"), str(OCT / "evaluate.json")], overrides, check=False)
    line = one_line_error(result)
    assert "'image_size'" in line and "is [48, 64]" in line and "trained with [32, 48]" in line, line
    inference = {k: v for k, v in TINY.items() if k != "image_size"}
    inference.update(bundle_root=trained_oct["root"], input_dir=trained_oct["overrides"]["dataset_dir"],
                     output_dir=tmp_path / "out", **UNORDERED_LAYERS_ALLOWED)  # fmt: skip
    result = run_bundle("inferring", [str(OCT / "inference.json")], inference, check=False)
    line = one_line_error(result)
    assert "'image_size'" in line and "--image_size '[32, 48]'" in result.stderr, result.stderr[-2000:]
    # the classes its output channels stand for: the same number of other names would label every mask wrongly
    swapped = [OCT_CLASSES[0], OCT_CLASSES[2], OCT_CLASSES[1], *OCT_CLASSES[3:]]
    renamed = {**inference, "image_size": "[32,48]", "class_names": json.dumps(swapped)}
    result = run_bundle("inferring", [str(OCT / "inference.json")], renamed, check=False)
    line = one_line_error(result)
    assert "'class_names'" in line and f"trained with {json.dumps(OCT_CLASSES)}" in line, line
    run_bundle("inferring", [str(OCT / "inference.json")], {**inference, "image_size": "[32,48]"})
    assert list((tmp_path / "out").glob("*")), "with the trained settings it runs"


def test_a_model_run_with_other_network_settings_than_it_was_trained_with_is_refused_by_name(tmp_path, trained_oct):
    """``model.json`` records the network's structure with the input settings: an inference or an evaluation whose
    ``network_def`` differs from the model's is refused naming the setting and the exact option to pass, where the
    weights alone could only say that tensors are missing. Models recorded before the network was (their
    ``model.json`` without ``network_def``) still run."""
    inference = {k: v for k, v in TINY.items() if k != "image_size"}
    inference.update(image_size="[32,48]", bundle_root=trained_oct["root"], **UNORDERED_LAYERS_ALLOWED,
                     input_dir=trained_oct["overrides"]["dataset_dir"], output_dir=tmp_path / "out")  # fmt: skip
    result = run_bundle("inferring", [str(OCT / "inference.json")], {**inference, "network_def#num_res_units": 2},
                        check=False)  # fmt: skip
    line = one_line_error(result)
    assert "'network_def#num_res_units'" in line and "is 2" in line and "trained with 1" in line, line
    assert "--network_def#num_res_units '1'" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*")), "nothing was written"

    evaluation = {**trained_oct["overrides"], "bundle_root": trained_oct["root"], "network_def#channels": "[4,16]"}
    result = run_bundle("evaluating", [str(OCT / "train.json"), str(OCT / "evaluate.json")], evaluation, check=False)
    line = one_line_error(result)
    assert "'network_def#channels'" in line and "trained with [4, 8]" in line, line

    older = tmp_path / "older"  # the same model with the record of an earlier version: input settings only
    older.mkdir()
    (older / "model.pt").write_bytes(trained_oct["model"].read_bytes())
    record = runs.read_record(trained_oct["model"].parent)
    record["input_settings"].pop("network_def")
    (older / "model.json").write_text(json.dumps(record))
    run_bundle("inferring", [str(OCT / "inference.json")], {**inference, "checkpoint_path": older / "model.pt"})
    assert list((tmp_path / "out").glob("*")), "a model recorded without its network settings runs as before"


# writes a model.pt and its model.json, then again a newer pair, killed once the newer model.pt is in place
KILLED_BETWEEN_THE_MODEL_AND_ITS_RECORD = """
import os, signal, sys, torch
from clinseg.pipelines.engine.handlers.checkpointing import write_described_model

write_described_model(sys.argv[1], {"w": torch.zeros(3)}, {"epoch": 1, "value": 0.5})
rename = os.replace

def rename_then_die(source, target):
    rename(source, target)
    if str(target).endswith("model.pt"):
        os.kill(os.getpid(), signal.SIGKILL)

os.replace = rename_then_die
write_described_model(sys.argv[1], {"w": torch.ones(3)}, {"epoch": 2, "value": 0.7})
"""


def test_a_model_and_its_record_are_written_as_one_step(tmp_path):
    """A run's best model and its model.json: a process killed between the two renames leaves a journal that the
    next reader completes, so the model is never read beside the record of another."""
    import subprocess
    import sys

    killed = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_THE_MODEL_AND_ITS_RECORD, str(tmp_path)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert json.loads((tmp_path / "model.json").read_text())["epoch"] == 1, "killed between the two renames"
    record = runs.read_record(tmp_path)
    assert record is not None and (record["epoch"], record["value"]) == (2, 0.7)
    assert torch.equal(read_checkpoint(tmp_path / "model.pt")["w"], torch.ones(3))
    left = sorted(p.name for p in tmp_path.iterdir() if p.name != runs.PROMOTION_LOCK)  # the lock the kill held
    assert left == ["model.json", "model.pt"], "nothing staged is left behind"
