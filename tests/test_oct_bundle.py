"""The oct_layers bundle run as users run it: ``python -m monai.bundle run ...`` from the repository root.

Tiny sizes through config overrides: 64 x 96 B-scans, a 3-level U-Net, 2 epochs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlflow
import numpy as np
import pytest
import tifffile
from PIL import Image

from clinseg.pipelines.tracking import run_folder
from tests.conftest import (
    OCT_BUNDLE,
    REPO_ROOT,
    decode,
    is_in_layer_order,
    new_store,
    run_bundle,
    run_models,
    shared_path,
)
from tests.test_dicom_photographs import OPHTHALMIC_TOMOGRAPHY, write_dicom

CONFIGS = OCT_BUNDLE / "configs"
TRAIN = [str(CONFIGS / "train.json")]
EVALUATE = TRAIN + [str(CONFIGS / "evaluate.json")]
INFER = [str(CONFIGS / "inference.json")]  # self-contained (the Model Zoo form)
LAYERS = {"NFL", "GCL-IPL", "INL", "OPL", "ONL-ISM", "ISE", "OS-RPE"}


def tiny_inference(bundle_root, dataset_dir, **extra):
    """The tiny sizes for inference.json, which has no batch size (an id a config lacks is refused); a model of two
    tiny epochs puts layers in no order yet, and its retina at no height the training labels had, which inference
    refuses unless told otherwise (tested on its own)."""
    overrides = tiny(bundle_root, dataset_dir, **extra)
    del overrides["batch_size"]
    return {"max_layer_order_relabelled": "1.0", "max_retina_height_ratio": "100", **overrides}


def tiny(bundle_root, dataset_dir, **extra):
    return {
        "bundle_root": bundle_root,
        "dataset_dir": dataset_dir,
        "image_size": "[64,96]",
        "network_def#channels": "[8,16,32]",
        "network_def#strides": "[2,2]",
        "batch_size": 4,
        **extra,
    }


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_oct_dir):
    """One tiny training run shared by the tests of this module: (bundle_root, tracking_uri, process result)."""
    root = tmp_path_factory.mktemp("oct_bundle")
    uri = new_store(root / "mlruns" / "mlflow.db")
    result = run_bundle(
        "training",
        TRAIN,
        tiny(root / "bundle", tiny_oct_dir, **{"train#trainer#max_epochs": 2}),
        # a sample of the system metrics every second, so that a tiny run has some
        env={"MLFLOW_TRACKING_URI": uri, "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL": "1"},
    )
    return root / "bundle", uri, result


def latest_run(uri, workflow):
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("oct_layers")
    runs = client.search_runs([experiment.experiment_id], f"tags.workflow = '{workflow}'", order_by=["start_time DESC"])
    return client, runs[0]


def artifact_paths(client, run_id, path=""):
    found = []
    for entry in client.list_artifacts(run_id, path):
        found += artifact_paths(client, run_id, entry.path) if entry.is_dir else [entry.path]
    return found


def test_training_writes_checkpoints_and_an_mlflow_run(trained):
    bundle_root, uri, result = trained
    assert (bundle_root / "models" / "model.pt").is_file()
    assert any(p.name.startswith("latest_checkpoint") for p in run_models(bundle_root).iterdir()), "the run's own"
    assert "epoch 2/2" in result.stdout + result.stderr, "the per-epoch summary is shown"

    client, run = latest_run(uri, "train")
    assert run.info.status == "FINISHED"
    assert client.get_experiment_by_name("oct_layers").artifact_location.endswith("/mlruns/artifacts/oct_layers")
    params = run.data.params
    assert params["max_epochs"] == "2" and params["batch_size"] == "4" and params["learning_rate"] == "0.002"
    assert params["image_size"] == "[64, 96]" and params["network_channels"] == "[8, 16, 32]"
    assert params["loss_lambda_dice"] == "0.7" and params["seed"] == "0" and len(params["dataset_fingerprint"]) == 16
    assert params["num_train_images"] == "6" and params["num_val_images"] == "3"  # 3 subjects, 3 of 4 B-scans each

    loss = client.get_metric_history(run.info.run_id, "0_key/train_loss")
    assert len(loss) == 2 * 2, "one loss per iteration (6 images / batch 4 = 2 iterations, 2 epochs)"
    dice = client.get_metric_history(run.info.run_id, "0_key/val_mean_dice")
    assert [m.step for m in dice] == [1, 2] and all(0.0 <= m.value <= 1.0 for m in dice)
    for key in (
        # the key curves first, then the other averages, then one section per metric of its per-class values
        "1_validation/val_mean_iou",
        "1_validation/val_hd95",
        "1_validation/val_precision",
        "1_validation/val_recall",
        "1_validation/val_specificity",
        "1_validation/val_pixel_accuracy",
        "1_validation/val_thickness_mae_px",
        "val_mean_dice by class/NFL",
        "val_mean_dice by class/OS-RPE",
    ):
        assert key in run.data.metrics, key

    artifacts = artifact_paths(client, run.info.run_id)
    for expected in (
        "checkpoint/model.pt",
        "config/executed_config.json",
        "metrics.json",
        "learning_curves.png",
        "dataset/manifest.json",
    ):
        assert expected in artifacts, (expected, artifacts)
    assert sum(a.startswith("overlays/") for a in artifacts) == 3
    assert "split.json" in artifacts and not [a for a in artifacts if a.endswith(".lock")], artifacts
    config = json.loads(Path(client.download_artifacts(run.info.run_id, "config/executed_config.json")).read_text())
    assert config["train"]["trainer"]["max_epochs"] == 2 and config["image_size"] == [64, 96]
    manifest = json.loads(Path(client.download_artifacts(run.info.run_id, "dataset/manifest.json")).read_text())
    assert sorted(entry["path"] for entry in manifest) == ["Subject_01.mat", "Subject_02.mat", "Subject_03.mat"]
    assert all(len(entry["sha256"]) == 64 and entry["size"] > 0 for entry in manifest)
    tags = run.data.tags
    assert tags["version.monai"] and tags["version.torch"] and tags["device"] == "cpu" and "git_commit" in tags
    assert tags["command"].startswith("python -m monai.bundle run training --config_file "), tags["command"]
    # ignite's lr_group_0 under its own name, at each iteration, with the value the optimizer used
    learning_rate = client.get_metric_history(run.info.run_id, "0_key/learning_rate")
    assert len(learning_rate) == len(loss) and learning_rate[0].value == pytest.approx(0.002)
    assert not any(k.startswith("lr_group") for k in run.data.metrics)
    system = {k for k in run.data.metrics if k.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system, system
    metrics = json.loads(Path(client.download_artifacts(run.info.run_id, "metrics.json")).read_text())
    assert metrics["n_images"] == 3 and set(metrics["per_class"]["val_mean_dice"]) >= {"NFL", "OS-RPE"}
    assert metrics["best"]["value"] == pytest.approx(max(m.value for m in dice))


def test_evaluation_reproduces_validation_and_records_a_run(trained, tiny_oct_dir):
    bundle_root, uri, _ = trained
    result = run_bundle("evaluating", EVALUATE, tiny(bundle_root, tiny_oct_dir), env={"MLFLOW_TRACKING_URI": uri})
    client, run = latest_run(uri, "evaluate")
    assert run.info.status == "FINISHED"
    _, train_run = latest_run(uri, "train")
    best = max(m.value for m in client.get_metric_history(train_run.info.run_id, "0_key/val_mean_dice"))
    assert run.data.metrics["0_key/eval_mean_dice"] == pytest.approx(best, abs=1e-5), "the best checkpoint is evaluated"
    assert "eval_mean_dice by class/NFL" in run.data.metrics and "1_evaluation/eval_hd95" in run.data.metrics
    assert not any(k.startswith("val_") or "/val_" in k for k in run.data.metrics), "evaluations are eval_..."
    out = bundle_root / "outputs" / run_folder(run)
    report = json.loads((out / "metrics.json").read_text())
    assert report["n_images"] == 3
    assert set(report["per_class"]["val_thickness_mae_px"]) == LAYERS
    assert (out / "val_mean_dice_raw.csv").is_file() and len(list((out / "overlays").glob("*.png"))) == 3
    panel = np.asarray(Image.open(next((out / "overlays").glob("*.png"))))
    # image | prediction | reference at the input's resolution, over a white caption strip saying so
    assert panel.shape[1:] == (3 * 96 + 2 * 4, 3) and panel.shape[0] > 64, panel.shape
    assert (panel[64:, :3] == 255).all(), "the caption strip starts below the 64 rows of the images"
    assert "val_mean_dice" in result.stdout + result.stderr


def test_inference_writes_label_maps_on_the_input_grid(trained, tiny_oct_dir, tmp_path, tracking_uri):
    bundle_root, _, _ = trained
    # an image of another size than the network input: outputs come back on the input's grid
    scans = tmp_path / "scans"  # the output folder may not lie inside the input folder
    scans.mkdir()
    scan = np.random.default_rng(0).integers(0, 255, (70, 110), dtype=np.uint8)
    Image.fromarray(scan).save(scans / "scan.png")
    # the same B-scan as frame 0 of a DICOM OCT volume (Ophthalmic Tomography, one B-scan per frame)
    volume = np.stack([scan, scan[::-1]])
    # its rows 3.9 um apart (PixelSpacing): thicknesses in micrometres by the file's own spacing
    write_dicom(scans / "volume.dcm", volume, modality="OPT", sop_class=OPHTHALMIC_TOMOGRAPHY, NumberOfFrames=2,
                PixelSpacing=[0.0039, 0.0115])  # fmt: skip
    out = tmp_path / "predictions"
    run_bundle("inferring", INFER, tiny_inference(bundle_root, tiny_oct_dir, input_dir=scans, output_dir=out))
    label = np.asarray(Image.open(out / "scan_seg.png"))
    assert label.shape == (70, 110) and label.max() < 8
    np.testing.assert_array_equal(np.asarray(Image.open(out / "volume_bscan000_seg.png")), label)
    assert np.asarray(Image.open(out / "volume_bscan001_seg.png")).shape == (70, 110)
    assert np.asarray(Image.open(out / "scan_overlay.png")).shape == (70, 110, 3)
    summary = json.loads((out / "scan.json").read_text())
    assert summary["shape"] == [70, 110] and set(summary["mean_thickness_px"]) == LAYERS
    assert 0 <= summary["layer_order_relabelled"] <= 1
    assert "mean_thickness_um" not in summary, "a PNG says nothing of its pixel size, and none was given"
    frame = json.loads((out / "volume_bscan000.json").read_text())
    assert frame["pixel_size_um"] == pytest.approx(3.9) and frame["pixel_size_from"] == "the file's PixelSpacing"
    for layer, pixels in frame["mean_thickness_px"].items():
        assert frame["mean_thickness_um"][layer] == pytest.approx(None if pixels is None else pixels * 3.9)
    # the same volume as a multi-page TIFF, one B-scan per page: segmented page by page as the DICOM frames are
    pages = tmp_path / "pages"
    pages.mkdir()
    with tifffile.TiffWriter(pages / "volume.tif") as tif:
        for bscan in volume:
            tif.write(bscan)
    tiff_out = tmp_path / "tiff_predictions"
    run_bundle("inferring", INFER, tiny_inference(bundle_root, tiny_oct_dir, input_dir=pages, output_dir=tiff_out))
    for name in ("volume_bscan000", "volume_bscan001"):
        np.testing.assert_array_equal(
            np.asarray(Image.open(tiff_out / f"{name}_seg.png")), np.asarray(Image.open(out / f"{name}_seg.png"))
        )
    # the lateral spacing given as the pixel size contradicts the file's own: refused naming the frame
    lateral = tiny_inference(bundle_root, tiny_oct_dir, input_dir=scans, output_dir=tmp_path / "lateral")
    contradicted = run_bundle("inferring", INFER, {**lateral, "pixel_size_um": 11.5}, check=False)
    assert contradicted.returncode == 1 and "Traceback" not in contradicted.stderr, contradicted.stderr[-3000:]
    assert "volume.dcm::0: records 3.9 um between its rows" in contradicted.stdout + contradicted.stderr
    # with the default limit, a prediction the layer order had to rebuild is refused, naming its image: a map with
    # every layer in order, made from a jumble, would look plausible
    defaults = tiny_inference(bundle_root, tiny_oct_dir, input_dir=scans, output_dir=tmp_path / "refused")
    del defaults["max_layer_order_relabelled"]
    refused = run_bundle("inferring", INFER, defaults, check=False)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert f"error: {scans}" in refused.stderr and "out of their top-to-bottom order in" in refused.stdout
    # a limit between the B-scans' shares relabelled: the B-scan above it is refused after its prediction, and the
    # run goes on with the others, then fails
    shares = {
        name: json.loads((out / f"{name}.json").read_text())["layer_order_relabelled"]
        for name in ("scan", "volume_bscan000", "volume_bscan001")
    }
    limit = (min(shares.values()) + max(shares.values())) / 2
    assert min(shares.values()) < limit < max(shares.values()), shares
    split = tiny_inference(bundle_root, tiny_oct_dir, input_dir=scans, output_dir=tmp_path / "split")
    result = run_bundle("inferring", INFER, {**split, "max_layer_order_relabelled": limit}, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    summary = json.loads((tmp_path / "split" / "inference_summary.json").read_text())
    assert sorted(case["id"] for case in summary["cases"]) == sorted(k for k, v in shares.items() if v <= limit)
    assert sorted(item["id"] for item in summary["refused"]) == sorted(k for k, v in shares.items() if v > limit)
    assert all("out of their top-to-bottom order" in item["problem"] for item in summary["refused"]), summary
    run_bundle(
        "inferring",
        INFER,
        tiny_inference(
            bundle_root, tiny_oct_dir, input_dir=tiny_oct_dir / "Subject_02.mat", output_dir=tmp_path / "mat"
        ),
    )
    assert len(list((tmp_path / "mat").glob("*_seg.png"))) == 4, "every B-scan of the .mat file is segmented"


def test_missing_data_gives_a_clear_message_not_a_stack_trace(tmp_path, tracking_uri):
    result = run_bundle(
        "training",
        TRAIN,
        tiny(tmp_path / "bundle", tmp_path / "no_such_dataset"),
        check=False,
    )
    assert result.returncode != 0
    assert f"error: {tmp_path / 'no_such_dataset'}: does not exist." in result.stderr
    assert "Accepted layouts" in result.stderr and "python -m clinseg.datasets.oct.phantom" in result.stderr
    assert "Traceback" not in result.stderr
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("oct_layers")
    if experiment is not None:  # nothing may be left RUNNING
        assert all(r.info.status != "RUNNING" for r in client.search_runs([experiment.experiment_id]))


def test_a_crash_during_training_marks_the_run_failed(tmp_path, tiny_oct_dir, tracking_uri):
    # a NaN learning rate passes construction; a loss that raises on the first iteration is a real crash
    result = run_bundle(
        "training",
        TRAIN,
        tiny(tmp_path / "bundle", tiny_oct_dir, **{"loss#lambda_dice": "-1"}),
        check=False,
    )
    assert result.returncode != 0
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("oct_layers")
    statuses = [r.info.status for r in client.search_runs([experiment.experiment_id])] if experiment else []
    assert "RUNNING" not in statuses


def test_evaluation_without_checkpoint_names_the_missing_file(tmp_path, tiny_oct_dir, tracking_uri):
    result = run_bundle("evaluating", EVALUATE, tiny(tmp_path / "bundle", tiny_oct_dir), check=False)
    assert result.returncode != 0
    assert "model.pt: the checkpoint to evaluate does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert os.path.isdir(REPO_ROOT / "bundles" / "oct_layers" / "configs")


def test_the_nr206_overlay_trains_at_its_size_and_answers_on_each_b_scans_own_grid(tmp_path, tracking_uri):
    """The real NR206 sample through the overlay's own sizes (twice the rows of a B-scan, 1024 x 768, and crops of
    512 x 384), a tiny network for one epoch: the model records that size, and its label maps come back on the
    500 x 750 grid of each B-scan, the layers in anatomical order in every column."""
    sample = shared_path("oct", "NR206_sample")
    overlay = TRAIN + [str(CONFIGS / "nr206.json")]
    bundle_root = tmp_path / "bundle"
    network = {"network_def#channels": "[4,8,16,32,64]", "bundle_root": bundle_root, "dataset_dir": sample}
    # with the loss's optional column term too (off in the overlay), so its config key runs in a real bundle run
    training = {**network, "train#trainer#max_epochs": 1, "repeats_per_epoch": 1, "loss#lambda_column_w1": 0.02}
    run_bundle("training", overlay, training)
    record = json.loads((run_models(bundle_root) / "model.json").read_text())
    assert record["input_settings"]["image_size"] == [1024, 768]
    out = tmp_path / "predictions"
    infer = INFER + [str(CONFIGS / "nr206.json")]
    # the model of one epoch finds layers from the top row to the bottom one: far thicker than the retinas its
    # training labels hold (15-16 % of the rows), which inference refuses unless told otherwise
    assert record["training_labels"]["retina_height"]["cases"] == 2
    unchecked = {"max_retina_height_ratio": 100}
    run_bundle("inferring", infer, {**network, **unchecked, "input_dir": sample / "val", "output_dir": out})
    for scan in sorted((sample / "val").glob("*.png")):
        label = np.asarray(Image.open(out / f"{scan.stem}_seg.png"))
        assert label.shape == np.asarray(Image.open(scan)).shape[:2] == (500, 750)
        assert label.max() <= 8 and is_in_layer_order(label)


def test_inference_refuses_a_retina_at_a_scale_the_model_never_learnt(trained, tiny_oct_dir, tmp_path):
    """Training records the retina heights of its labels in model.json (read by the bundle's load_transforms);
    inference reads them from there and refuses a B-scan whose predicted retina spans a share of its rows beyond
    max_retina_height_ratio (1.3) times that range, naming it. The tiny model's prediction is what it is: the learnt
    range is set around it, through the config key the record fills, thicker, thinner and alike."""
    from monai.bundle import ConfigParser

    from clinseg.datasets.oct.phantom import write_png_bscans
    from clinseg.transforms.oct import retina_height_fraction, retina_heights

    bundle_root, _, _ = trained
    record = json.loads((bundle_root / "models" / "model.json").read_text())
    learnt = record["training_labels"]["retina_height"]
    parser = ConfigParser()
    parser.read_config(TRAIN)
    parser.update({"bundle_root": str(bundle_root), "dataset_dir": str(tiny_oct_dir)})
    training = parser.get_parsed_content("train#datalist")
    assert learnt == retina_heights(training, parser.get_parsed_content("load_transforms"))
    assert learnt["cases"] == len(training) and 0.2 < learnt["min"] <= learnt["median"] <= learnt["max"] < 0.45
    inference = ConfigParser()
    inference.read_config(INFER)
    # the settings the model was trained with (its model.json's), as the command line gives them
    inference.update({"bundle_root": str(bundle_root), "image_size": [64, 96], "network_def#channels": [8, 16, 32],
                      "network_def#strides": [2, 2]})  # fmt: skip
    assert inference.get_parsed_content("learnt_retina_height") == learnt

    scans = tmp_path / "scans"
    scans.mkdir()
    write_png_bscans(tiny_oct_dir / "Subject_03.mat", scans, limit=1)
    (name,) = [path.stem for path in scans.glob("*.png")]
    run_bundle(
        "inferring", INFER, tiny_inference(bundle_root, tiny_oct_dir, input_dir=scans, output_dir=tmp_path / "u")
    )
    predicted = retina_height_fraction(np.asarray(Image.open(tmp_path / "u" / f"{name}_seg.png")))
    assert predicted is not None and predicted < 0.6, predicted
    for share, outcome in ((predicted * 1.5, "thinner"), (predicted / 1.5, "thicker"), (predicted, None)):
        overrides = tiny_inference(bundle_root, tiny_oct_dir, input_dir=scans, output_dir=tmp_path / str(outcome))
        del overrides["max_retina_height_ratio"]
        overrides["learnt_retina_height"] = json.dumps({"min": share, "median": share, "max": share})
        overrides["frame_retina"] = "False"  # the framing would cut a thinner retina's rows to fit (tested below)
        result = run_bundle("inferring", INFER, overrides, check=outcome is None)
        if outcome is None:
            continue
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
        output = result.stdout + result.stderr
        assert f"{name}.png: its retina spans" in output and f"(at most 1.3 times {outcome} accepted)" in output
        assert "wrote none of 1 label maps" in output


@pytest.fixture(scope="module")
def located(tmp_path_factory, tiny_oct_dir):
    """A tiny model trained long enough (12 epochs) to find where the retina lies, if not its layers: bundle root."""
    root = tmp_path_factory.mktemp("oct_located") / "bundle"
    run_bundle("training", TRAIN, tiny(root, tiny_oct_dir, **{"train#trainer#max_epochs": 12}),
               env={"MLFLOW_TRACKING_URI": new_store(root.parent / "mlflow.db")})  # fmt: skip
    return root


def test_inference_frames_a_deeper_scan_to_the_retina_share_the_model_learnt(located, tiny_oct_dir, tmp_path):
    """A B-scan with more rows around its retina than the training's (a deeper scan: its own background mirrored
    outwards, 1.5 to 3 times its rows) is framed before the network sees it (FrameRetinad): a pass of the model
    finds the retina, a window of rows puts it at the learnt share, and the label map comes back onto every row,
    background outside the window, which its JSON names. Framed, the model scores on the deeper scans what it
    scores on the B-scan itself; unframed (--frame_retina False, the check that refuses it lifted) it fails as
    the scan deepens."""
    from clinseg.datasets.oct import load_oct_datalist
    from clinseg.pipelines.benchmarks.oct_depths import deepened, scores

    (scan,) = decode("oct_layers", load_oct_datalist(tiny_oct_dir, "all"))[-1:]
    image, label = np.asarray(scan["image"][0]).astype(np.uint8), np.asarray(scan["label"][0]).astype(np.int64)
    scans, truths = tmp_path / "scans", {}
    scans.mkdir()
    for depth in (1.0, 1.5, 3.0):
        deeper, truths[f"{depth:g}"] = deepened(image, label, depth, "background")
        Image.fromarray(deeper).save(scans / f"{depth:g}.png")
    classes = json.loads((CONFIGS / "inference.json").read_text())["class_names"]
    dice = {}
    for framing in (True, False):
        out = tmp_path / str(framing)
        overrides = tiny_inference(located, tiny_oct_dir, input_dir=scans, output_dir=out, frame_retina=framing)
        if framing:
            del overrides["max_retina_height_ratio"]  # framed, the retina is at a learnt share: the check passes
        run_bundle("inferring", INFER, overrides)
        for name, truth in truths.items():
            predicted = np.asarray(Image.open(out / f"{name}_seg.png")).astype(np.int64)
            assert predicted.shape == truth.shape
            dice[framing, name] = scores(predicted, truth, classes)["mean_dice"]
            summary = json.loads((out / f"{name}.json").read_text())
            if not framing or name == "1":
                assert "rows_segmented" not in summary, (framing, name)
                continue
            first, last = summary["rows_segmented"]["first"], summary["rows_segmented"]["last"]
            assert 0 < first < last < truth.shape[0] - 1, summary["rows_segmented"]
            assert not predicted[:first].any() and not predicted[last + 1 :].any(), "background outside the window"
            retina = np.flatnonzero(((truth > 0) & (truth != 255)).any(axis=1))
            assert first < retina[0] and retina[-1] < last, "the whole retina inside the window"
    assert dice[True, "1"] == dice[False, "1"], "at the learnt share, nothing is framed"
    for name in ("1.5", "3"):
        assert dice[True, name] > dice[True, "1"] - 0.1, dice
    assert dice[True, "3"] > dice[False, "3"] + 0.2, dice
