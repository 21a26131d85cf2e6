"""Checkpoints are identified before they are loaded: through the real command lines, a file that is not a
checkpoint, another bundle's checkpoint, one of another network size, and ``--resume True`` onto a checkpoint of
another network size each end in one line naming the file and what differs (exit 1, no traceback)."""

from __future__ import annotations

import json

import pytest
import torch
from monai.bundle import ConfigParser

from clinseg.datasets.errors import DataError
from clinseg.pipelines.engine.checkpoints import load_network_weights, shape_differences
from tests.conftest import REPO_ROOT, run_bundle, run_models

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")
OCT = REPO_ROOT / "bundles" / "oct_layers" / "configs"
TINY = {"image_size": "[32,48]", "network_def#channels": "[4,8]", "network_def#strides": "[2]"}


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
