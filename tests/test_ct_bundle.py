"""The ct_heart bundle run as users run it (``python -m monai.bundle run ...``), at tiny sizes: phantoms on a 3x
coarser grid, 6 mm resampling, 16^3 patches, a 3-level 3D U-Net, 2 epochs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest

from clinseg.datasets.ct import read_volume, write_msd_dataset
from clinseg.pipelines.tracking import mlflow_metric_name
from clinseg.transforms.ct_anatomy import FIELDS_OF_VIEW, HEART_EXPECTED
from tests.conftest import REPO_ROOT, new_store, run_bundle, run_models, shared_path

CONFIGS = REPO_ROOT / "bundles" / "ct_heart" / "configs"
TRAIN = [str(CONFIGS / "train.json")]
EVALUATE = TRAIN + [str(CONFIGS / "evaluate.json")]
INFER = [str(CONFIGS / "inference.json")]  # self-contained (the Model Zoo form)
METRICS = {"val_mean_dice", "val_iou", "val_hd95_mm", "val_assd_mm", "val_rve", "val_sensitivity", "val_precision"}


def recorded(metric: str) -> str:
    """A training run's MLflow name of a validation metric (ct_heart's key metric is val_mean_dice)."""
    return mlflow_metric_name(metric, "train", "val_mean_dice")


def tiny(bundle_root, dataset_dir, **extra):
    return {
        "bundle_root": bundle_root,
        "dataset_dir": dataset_dir,
        "spacing": "[6,6,6]",
        "patch_size": "[16,16,16]",
        "network_def#channels": "[4,8,16]",
        "network_def#strides": "[2,2]",
        "network_def#num_res_units": 1,
        **extra,
    }


@pytest.fixture(scope="module")
def ct_data(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ct_phantom")
    return write_msd_dataset(folder, n_train=4, n_test=1, voxel_scale=3.0, progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ct_data):
    root = tmp_path_factory.mktemp("ct_bundle")
    uri = new_store(root / "mlruns" / "mlflow.db")
    overrides = tiny(root / "bundle", ct_data, **{"train#trainer#max_epochs": 2, "val_interval": 1})
    result = run_bundle("training", TRAIN, overrides, env={"MLFLOW_TRACKING_URI": uri})
    return root / "bundle", uri, result


def runs(uri, workflow):
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("ct_heart")
    return client, client.search_runs([experiment.experiment_id], f"tags.workflow = '{workflow}'")


def test_training_tracks_mm_metrics_and_writes_checkpoints(trained):
    bundle, uri, _ = trained
    assert (bundle / "models" / "model.pt").is_file()
    assert list(run_models(bundle).glob("latest_checkpoint_epoch=2.pt")), "the run keeps its checkpoints"
    client, (run,) = runs(uri, "train")
    assert run.info.status == "FINISHED"
    # tagged as model training, so MLflow's UI opens the experiment on its runs, not its GenAI view
    assert client.get_experiment_by_name("ct_heart").tags["mlflow.experimentKind"] == "custom_model_development"
    assert {recorded(m) for m in METRICS} <= set(run.data.metrics)
    assert run.data.params["spacing"] == "[6, 6, 6]" and run.data.params["window_preset"] == "cardiac"
    history = client.get_metric_history(run.info.run_id, recorded("val_hd95_mm"))
    assert [m.step for m in history] == [1, 2] and all(m.value > 0 for m in history)
    report = json.loads(next((bundle / "outputs").glob("train-*/metrics.json")).read_text())
    assert 0 <= report["mean"]["val_mean_dice"] <= 1
    assert list((bundle / "outputs").glob("train-*/overlays/ct_003.png")), "a validation picture per case"
    # each validation case's anatomy verdict is in the report
    assert set(report["anatomy"]) == {"ct_003"}
    assert report["anatomy"]["ct_003"]["field_of_view"] in FIELDS_OF_VIEW


def test_evaluation_on_the_test_split_at_the_native_grid(trained, ct_data):
    bundle, uri, _ = trained
    overrides = tiny(bundle, ct_data, eval_split="test")
    result = run_bundle("evaluating", EVALUATE, overrides, env={"MLFLOW_TRACKING_URI": uri})
    assert "val_hd95_mm" in result.stdout + result.stderr
    report = json.loads(sorted((bundle / "outputs").glob("evaluate-*/metrics.json"))[-1].read_text())
    assert report["n_images"] == 1 and METRICS <= set(report["mean"])
    _, (run,) = runs(uri, "evaluate")
    assert run.data.params["eval_split"] == "test"
    logged, written = run.data.metrics["0_key/eval_mean_dice"], report["mean"]["val_mean_dice"]
    # undefined (no heart in the reference of the tiny grid's case): NaN in MLflow, null in the JSON, never 0
    assert (written is None and math.isnan(logged)) or logged == pytest.approx(written)
    assert not any(k.startswith("val_") for k in run.data.metrics), "an evaluation's metrics are named eval/..."


def check_masks_on_input_grid(output_dir: Path, inputs: dict[str, Path]):
    for case, source in inputs.items():
        array, affine, _ = read_volume(source)
        mask = nib.load(output_dir / f"{case}_seg.nii.gz")
        assert mask.shape == array.shape, case
        np.testing.assert_allclose(mask.affine, affine, atol=1e-4, err_msg=case)
        summary = json.loads((output_dir / f"{case}.json").read_text())
        voxels = int((np.asarray(mask.dataobj) > 0).sum())
        spacing = np.linalg.norm(affine[:3, :3], axis=0)
        assert summary["voxels"]["heart"] == voxels
        # a volume the anatomy does not support is withheld; the mask's own content stays, under its own name
        assert summary["field_of_view"] in FIELDS_OF_VIEW and summary["heart_expected"] in HEART_EXPECTED
        measured = summary.get("segmented_volume_ml", summary["volume_ml"])["heart"]
        assert measured == pytest.approx(voxels * np.prod(spacing) / 1000, abs=1e-3)
        if summary["anatomy"]["volume_reportable"]:
            assert summary["volume_ml"]["heart"] == measured
        else:
            assert summary["volume_ml"]["heart"] is None and summary["volume_withheld"]
        assert (output_dir / f"{case}_views.png").is_file()


def test_inference_on_dicom_and_nifti_writes_masks_on_the_input_grid(trained, ct_data, tmp_path):
    bundle, uri, _ = trained
    for name, source in {"dicom": ct_data / "dicom", "nifti": ct_data / "imagesTs"}.items():
        out = tmp_path / name
        run_bundle("inferring", INFER, tiny(bundle, ct_data, input_path=source, output_dir=out))
        check_masks_on_input_grid(out, {"ct_004": source / ("ct_004" if name == "dicom" else "ct_004.nii.gz")})


def test_missing_dataset_is_a_clear_error(tmp_path, tracking_uri):
    result = run_bundle("training", TRAIN, tiny(tmp_path / "bundle", tmp_path / "absent"), check=False)
    assert result.returncode != 0
    assert f"{tmp_path / 'absent'}: does not exist." in result.stderr
    assert "imagesTr" in result.stderr and "Traceback" not in result.stderr


def test_inference_on_the_real_dicom_series_and_chest_ct(trained, ct_data, tmp_path):
    folder = shared_path("ct", "totalsegmentator")
    bundle, _, _ = trained
    inputs = {
        "example_ct_dicom": folder / "example_ct_dicom",
        "ct_cropped": folder / "pulmonary_report" / "ct_cropped.nii.gz",
    }
    for case, source in inputs.items():
        out = tmp_path / case
        run_bundle("inferring", INFER, tiny(bundle, ct_data, input_path=source, output_dir=out))
        check_masks_on_input_grid(out, {case: source})


def test_torchscript_export_matches_the_checkpoint(trained, tmp_path):
    import subprocess
    import sys

    import torch

    bundle, _, _ = trained
    # the settings it was trained with: the export embeds the inference config, and refuses other input settings
    overrides = [
        "spacing=[6,6,6]",
        "patch_size=[16,16,16]",
        "network_def#channels=[4,8,16]",
        "network_def#strides=[2,2]",
    ]
    overrides.append("network_def#num_res_units=1")
    out = tmp_path / "model.ts"
    checkpoint = str(bundle / "models" / "model.pt")
    command = [
        sys.executable,
        "-m",
        "clinseg.pipelines.export",
        "ct_heart",
        "--checkpoint",
        checkpoint,
        "--out",
        str(out),
    ]
    result = subprocess.run([*command, "--override", *overrides], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "export.json").read_text())
    assert report["max_abs_logit_difference"] <= 1e-4 and report["same_argmax_fraction"] == 1.0
    extra = {"metadata.json": "", "inference.json": ""}
    torch.jit.load(str(out), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["name"] == "CT heart segmentation", "metadata embedded"
    embedded = json.loads(extra["inference.json"])  # the self-contained inference config, Zoo ids at the top level
    assert {"network_def", "preprocessing", "evaluator", "postprocessing"} <= set(embedded), "inference config embedded"
    # with the settings the model was trained with: a consumer of model.ts (MONAI Deploy's bundle operator) resamples
    # and builds the network from this config, and the bundle's defaults (2 mm) would give a plausible, wrong mask
    assert (embedded["spacing"], embedded["patch_size"]) == ([6, 6, 6], [16, 16, 16])
    assert embedded["network_def"]["channels"] == [4, 8, 16] and embedded["network_def"]["num_res_units"] == 1


def test_training_is_deterministic_on_cpu_with_a_fixed_seed(trained, ct_data, tmp_path):
    """Same config and seed, a second process: identical per-iteration losses and validation metrics."""
    _, uri, _ = trained
    overrides = tiny(tmp_path / "bundle", ct_data, **{"train#trainer#max_epochs": 2, "val_interval": 1})
    run_bundle("training", TRAIN, overrides, env={"MLFLOW_TRACKING_URI": uri})
    client, first_and_second = runs(uri, "train")
    assert len(first_and_second) == 2
    histories = [
        {
            key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, recorded(key))]
            for key in ["train_loss", *METRICS]
        }
        for run in first_and_second
    ]
    assert len(histories[0]["train_loss"]) > 2
    assert histories[0] == histories[1]
