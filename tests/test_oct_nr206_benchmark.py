"""The NR206 benchmark, run for real (tiny network, three short epochs, two seeds) on the real sample: what it
reports per seed agrees with the training's own MLflow curve and evaluation, and the seeds are also scored as one
ensemble."""

from __future__ import annotations

import json

from PIL import Image

from clinseg.pipelines.benchmarks.oct_nr206 import TARGETS, main
from tests.conftest import shared_path

TINY = ["network_def#channels=[4,8,16,32,64]", "image_size=[256,384]", "train_crop_size=[128,192]",
        "repeats_per_epoch=6", "train#trainer#max_epochs=3"]  # fmt: skip


def test_two_seeds_and_their_ensemble_are_reported_per_layer(tmp_path, tracking_uri):
    sample = shared_path("oct", "NR206_sample")
    out = tmp_path / "nr206.json"
    code = main(["--dataset_dir", str(sample), "--seeds", "0", "1", "--out", str(out),
                 "--work_dir", str(tmp_path / "work"), "--set", *TINY])  # fmt: skip
    assert code == 0
    report = json.loads(out.read_text())
    assert report["overrides"]["image_size"] == [256, 384] and report["tracking_uri"] == tracking_uri
    seeds = report["seeds"]
    assert [s["seed"] for s in seeds] == [0, 1]
    assert seeds[0]["training_run_id"] != seeds[1]["training_run_id"], "each seed is a training of its own"
    for seed in seeds:
        assert seed["epochs"] == 3 and len(seed["validation_curve"]) == 3
        assert list(seed["dice"]) == [f"layer{i}" for i in range(1, 9)] == list(seed["thickness_mae_px"])
        # the evaluation of the best checkpoint scores what the training's validation scored at that epoch
        assert abs(seed["mean_dice"] - seed["validation_curve"][seed["best_epoch"] - 1]) < 2e-3, seed
        assert seed["lowest_layer"]["dice"] == min(seed["dice"].values())
    ensemble = report["ensemble"]
    assert ensemble["members"] == [0, 1] and 0.0 <= ensemble["mean_dice"] <= 1.0
    summary = report["summary"]
    assert summary["lowest_layer_dice_of_any_run"] == min(s["lowest_layer"]["dice"] for s in seeds)
    assert summary["met"]["mean_dice"] == (summary["mean_dice"] >= TARGETS["mean_dice"])
    with Image.open(out.with_suffix(".png")) as picture:
        assert picture.size[0] > 800 and picture.size[1] > 300


def test_a_missing_sample_is_one_line_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "nr206.json"
    assert main(["--dataset_dir", str(tmp_path / "absent"), "--out", str(out)]) == 2
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and "NR206 sample not found" in said[0] and str(tmp_path / "absent") in said[0]
    assert not out.exists()


def test_a_work_folder_of_an_earlier_run_is_refused_and_kept(tmp_path, capsys):
    sample = shared_path("oct", "NR206_sample")
    earlier = tmp_path / "work" / "seed1" / "training.log"
    earlier.parent.mkdir(parents=True)
    earlier.write_text("an earlier run")
    code = main(["--dataset_dir", str(sample), "--seeds", "0", "1", "--work_dir", str(tmp_path / "work"),
                 "--out", str(tmp_path / "nr206.json")])  # fmt: skip
    assert code == 2
    said = capsys.readouterr().out.strip().splitlines()
    assert len(said) == 1 and "seed1" in said[0] and "--work_dir" in said[0]
    assert earlier.read_text() == "an earlier run" and not (tmp_path / "work" / "seed0").exists()
