"""The DRIVE benchmark's time to quality: the first validation reaching each F1 level, and its picture."""

from __future__ import annotations

import torch
from PIL import Image

from clinseg.pipelines.benchmarks.vessels_drive import draw_time_to_quality, time_to_quality
from tests.conftest import new_store

CURVE = [
    {"seconds": 12.0, "epoch": 2, "f1": 0.61},
    {"seconds": 25.5, "epoch": 4, "f1": 0.80},
    {"seconds": 38.0, "epoch": 6, "f1": 0.79},
    {"seconds": 51.2, "epoch": 8, "f1": 0.812},
]


def test_time_to_quality_is_the_first_validation_at_or_above_each_level():
    reached = time_to_quality(CURVE, levels=(0.6, 0.80, 0.81, 0.82))
    assert reached["0.600"] == {"seconds": 12.0, "epoch": 2}
    assert reached["0.800"] == {"seconds": 25.5, "epoch": 4}, "a level met exactly counts, the later dip does not"
    assert reached["0.810"] == {"seconds": 51.2, "epoch": 8}
    assert reached["0.820"] is None, "a level never reached is reported as such"
    assert time_to_quality([], levels=(0.8,)) == {"0.800": None}


def test_time_to_quality_picture_is_written(tmp_path):
    reached = time_to_quality(CURVE, levels=(0.80, 0.82))
    path = draw_time_to_quality(CURVE, reached, budget_s=60, path=tmp_path / "drive.png")
    with Image.open(path) as picture:
        assert picture.size[0] > 400 and picture.size[1] > 300


def test_the_benchmark_measures_its_choice_and_names_its_mlflow_run_by_it(tmp_path, monkeypatch):
    """A real (tiny) benchmark run in-process on a DRIVE-layout phantom: its JSON records the ``--set`` choice and
    the curve, and the MLflow run it trained is named by what it changed (``weight_average_decay=0``, the budget),
    as the same training from the command line would be, not "defaults"."""
    import json

    import mlflow

    from clinseg.datasets.fundus.phantom import write_drive_layout
    from clinseg.pipelines.benchmarks.vessels_drive import main

    write_drive_layout(tmp_path / "drive", n_images=4, shape=(96, 80), seed=1)
    store = new_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    out = tmp_path / "benchmark.json"
    code = main(["--dataset_dir", str(tmp_path / "drive" / "training"), "--budget_s", "8", "--plain_iterations", "2",
                 "--out", str(out), "--work_dir", str(tmp_path / "work"), "--set", "network_def#channels=[4,8]",
                 "network_def#strides=[2]", "patch_size=[32,32]", "sw_roi_size=[96,80]", "val_interval=1",
                 "weight_average_decay=0"])  # fmt: skip
    assert code == 0
    result = json.loads(out.read_text())
    assert result["overrides"]["weight_average_decay"] == 0 and result["time_to_quality"]["validations"]
    names = [run.info.run_name for run in mlflow.MlflowClient(store).search_runs(
        [e.experiment_id for e in mlflow.MlflowClient(store).search_experiments()])]  # fmt: skip
    trained = [name for name in names if name.startswith("vessels train:")]
    assert len(trained) == 1, names
    assert "weight_average_decay=0" in trained[0] and "train_time_limit_s=8" in trained[0], trained[0]


def test_the_plain_loop_steps_the_optimizer_the_config_gives(tmp_path):
    """The loop the bundle's throughput is compared with uses the config's optimizer, an override included (it
    once always built Adam, so an SGD choice was timed against an Adam loop)."""
    from monai.bundle import ConfigParser

    from clinseg.pipelines.benchmarks.vessels_drive import CONFIG, optimizer_like_the_config

    parser = ConfigParser()
    parser.read_config(str(CONFIG))
    parser["bundle_root"] = str(tmp_path)
    parser["network_def"]["channels"], parser["network_def"]["strides"] = [4, 8], [2]
    parser["optimizer"] = {"_target_": "torch.optim.SGD", "params": "$@network.parameters()", "lr": 0.01,
                           "momentum": 0.99, "nesterov": True, "weight_decay": 3e-5}  # fmt: skip
    network = torch.nn.Conv2d(1, 2, 3)
    optimizer = optimizer_like_the_config(parser, network)
    assert type(optimizer) is torch.optim.SGD
    (group,) = optimizer.param_groups
    assert (group["lr"], group["momentum"], group["nesterov"], group["weight_decay"]) == (0.01, 0.99, True, 3e-5)
    assert [id(p) for p in group["params"]] == [id(p) for p in network.parameters()]
