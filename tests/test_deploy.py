"""MONAI Deploy applications built from tiny trained bundles and run as the SDK documents, end to end.

The apps run in the deploy environment (``make deploy-env`` -> ``.venv-deploy``, or ``$DEPLOY_PYTHON``), from their
own folder, so they prove to be self-contained. Skipped with the reason when that environment is absent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image

from clinseg.datasets.ct import read_volume, write_msd_dataset
from clinseg.datasets.ct.dicom import read_ct_series
from clinseg.datasets.fundus.phantom import write_drive_layout
from clinseg.datasets.oct.phantom import write_phantom_dataset
from tests.conftest import REPO_ROOT, run_bundle, shared_path

DEPLOY_PYTHON = Path(os.environ.get("DEPLOY_PYTHON", REPO_ROOT / ".venv-deploy" / "bin" / "python"))
pytestmark = pytest.mark.skipif(
    not DEPLOY_PYTHON.is_file(),
    reason=f"the MONAI Deploy environment is absent ({DEPLOY_PYTHON}); create it with `make deploy-env`",
)

TINY = {
    "ct_heart": {
        "spacing": [6, 6, 6],
        "patch_size": [16, 16, 16],
        "network_def#channels": [4, 8, 16],
        "network_def#strides": [2, 2],
        "network_def#num_res_units": 1,
    },
    "oct_layers": {"image_size": [64, 96], "network_def#channels": [8, 16, 32], "network_def#strides": [2, 2]},
    "vessels": {
        "patch_size": [32, 32],
        "patches_per_image": 2,
        "repeats_per_epoch": 1,
        "sw_roi_size": [80, 80],
        "network_def#channels": [8, 16, 32],
        "network_def#strides": [2, 2],
    },
}


def build(bundle: str, checkpoint: Path, app: Path, *extra: str) -> Path:
    command = [
        sys.executable,
        "-m",
        "clinseg.pipelines.deploy",
        bundle,
        "--out",
        str(app),
        "--checkpoint",
        str(checkpoint),
    ]
    command += [*extra, "--override", *(f"{key}={json.dumps(value)}" for key, value in TINY[bundle].items())]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return app


def train_and_build(bundle: str, dataset_dir: Path, root: Path) -> Path:
    """Train the bundle for one tiny epoch and build its application folder; the folder's path."""
    overrides = {key: json.dumps(value) for key, value in TINY[bundle].items()}
    overrides.update({"bundle_root": root / "bundle", "dataset_dir": dataset_dir, "train#trainer#max_epochs": 1})
    overrides["val_interval"] = 1
    uri = f"sqlite:///{root / 'mlflow.db'}"
    run_bundle("training", [str(REPO_ROOT / "bundles" / bundle / "configs" / "train.json")], overrides,
               env={"MLFLOW_TRACKING_URI": uri})  # fmt: skip
    return build(bundle, root / "bundle" / "models" / "model.pt", root / "app")


def run_app(
    app: Path,
    input_path: Path,
    output_path: Path,
    env_vars: bool = False,
    entry: str = "app.py",
    model: str = "models/model.ts",
):
    """``python app.py -i IN -o OUT -m models/model.ts`` from the app folder (or with the HOLOSCAN_* variables)."""
    command = ["bash", "-c", 'ulimit -s 32768; exec "$@"', "app", str(DEPLOY_PYTHON), entry]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    if env_vars:
        env.update(HOLOSCAN_INPUT_PATH=str(input_path), HOLOSCAN_OUTPUT_PATH=str(output_path))
        env["HOLOSCAN_MODEL_PATH"] = str(app / model)
    else:
        command += ["-i", str(input_path), "-o", str(output_path), "-m", model]
    return subprocess.run(command, cwd=app, capture_output=True, text=True, env=env, timeout=600)


def result_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture(scope="module")
def ct_app(tmp_path_factory):
    data = write_msd_dataset(tmp_path_factory.mktemp("ct_data"), n_train=4, n_test=1, voxel_scale=3.0, progress=False)
    return train_and_build("ct_heart", data, tmp_path_factory.mktemp("ct_app")), data


def test_app_folder_is_self_contained(ct_app):
    app, _ = ct_app
    for name in ("app.py", "__main__.py", "app.yaml", "requirements.txt", "README.md", "series_rules.json"):
        assert (app / name).is_file(), name
    assert (app / "models" / "model.ts").is_file() and (app / "bundle" / "inference.json").is_file()
    config = json.loads((app / "bundle" / "inference.json").read_text())
    assert "%" not in json.dumps(config), "includes expanded: the app does not need the repository"
    assert config["network_def"]["channels"] == [4, 8, 16]
    export = json.loads((app / "models" / "export.json").read_text())
    assert export["max_abs_logit_difference"] <= 1e-4
    manifest = (app / "app.yaml").read_text()
    assert "title: CT heart segmentation" in manifest and "memory:" in manifest
    assert "monai-deploy-app-sdk==4.0.0" in (app / "requirements.txt").read_text()


def test_ct_app_writes_dicom_seg_nifti_and_volume(ct_app, tmp_path):
    app, data = ct_app
    series = data / "dicom" / "ct_004"
    result = run_app(app, series, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    summary = json.loads((out / "series.json").read_text())
    mask_image = nib.load(out / "series_seg.nii.gz")
    mask = np.asarray(mask_image.dataobj)
    hu, affine, _ = read_volume(series)
    assert mask.shape == hu.shape and np.allclose(mask_image.affine, affine, atol=1e-4)
    assert summary["voxels"]["heart"] == int((mask > 0).sum())
    assert summary["volume_ml"]["heart"] == pytest.approx(mask.sum() * np.prod(summary["spacing_mm"]) / 1000, 1e-3)

    (seg_path,) = (out / "dicom_seg").glob("*.dcm")
    seg = hd.seg.segread(seg_path)
    source = read_ct_series(series)  # slices sorted along the normal, as the mask's third axis
    first = pydicom.dcmread(source.files[0], stop_before_pixels=True)
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == first.SeriesInstanceUID
    assert summary["series_instance_uid"] == first.SeriesInstanceUID
    segment = seg.SegmentSequence[0]
    assert segment.SegmentLabel == "Heart"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "80891009"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodingSchemeDesignator == "SCT"
    assert segment.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "123037004"  # Anatomical Structure
    palette = json.loads((app / "bundle" / "inference.json").read_text())["palette"]
    shown = hd.color.CIELabColor.from_dicom_value(segment.RecommendedDisplayCIELabValue).to_rgb()
    assert np.abs(np.subtract(shown, palette[1])).max() <= 1, "the display colour is the bundle's heart colour"
    assert int(seg.NumberOfFrames) == hu.shape[2], "one frame per source slice"
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in source.files]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], combine_segments=True, skip_overlap_checks=True
    )
    np.testing.assert_array_equal(pixels, np.transpose(mask, (2, 1, 0)), err_msg="SEG frames equal the NIfTI mask")


def test_ct_app_writes_a_seg_for_a_series_with_an_empty_character_set(ct_app, tmp_path):
    """Some scanners write SpecificCharacterSet present but empty (the default repertoire); the SEG is still written
    and valid, and the NIfTI and JSON results are kept in any case."""
    app, data = ct_app
    series = tmp_path / "series"
    series.mkdir()
    for path in sorted((data / "dicom" / "ct_004").iterdir()):
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = ""
        ds.save_as(series / path.name)
    assert pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True).SpecificCharacterSet == ""
    result = run_app(app, series, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "out" / "series.json").read_text())
    assert summary["dicom_seg"] == "written to dicom_seg/", summary["dicom_seg"]
    (seg_path,) = (tmp_path / "out" / "dicom_seg").glob("*.dcm")
    seg = hd.seg.segread(seg_path)
    mask = np.asarray(nib.load(tmp_path / "out" / "series_seg.nii.gz").dataobj)
    uids = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in read_ct_series(series).files]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], combine_segments=True, skip_overlap_checks=True
    )
    np.testing.assert_array_equal(pixels, np.transpose(mask, (2, 1, 0)))


def test_ct_app_runs_with_environment_variables_and_as_a_folder(ct_app, tmp_path):
    app, data = ct_app
    for entry, env_vars in ((".", False), ("app.py", True)):
        out = tmp_path / f"out_{entry.strip('.') or 'folder'}"
        result = run_app(app, data / "dicom" / "ct_004", out, env_vars=env_vars, entry=entry)
        assert result.returncode == 0, result.stderr[-4000:]
        assert (out / "series_seg.nii.gz").is_file() and list((out / "dicom_seg").glob("*.dcm"))


def test_checkpoint_path_without_torchscript_gives_the_same_masks(ct_app, tmp_path):
    app, data = ct_app
    checkpoint_app = build("ct_heart", app.parent / "bundle" / "models" / "model.pt", tmp_path / "app_pt",
                           "--model_format", "checkpoint")  # fmt: skip
    assert (checkpoint_app / "models" / "model.pt").is_file() and not (checkpoint_app / "models" / "model.ts").exists()
    outputs = {}
    for name, folder in {"pt": checkpoint_app, "ts": app}.items():
        out = tmp_path / f"out_{name}"
        command_model = "models/model.pt" if name == "pt" else "models/model.ts"
        assert command_model in (folder / "README.md").read_text()
        result = run_app(folder, data / "dicom" / "ct_004", out, model=command_model)
        assert result.returncode == 0, result.stderr[-4000:]
        outputs[name] = np.asarray(nib.load(out / "series_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(outputs["pt"], outputs["ts"])


def copy_series(series: list[Path], folder: Path, skip: int | None = None) -> Path:
    folder.mkdir()
    for index, path in enumerate(series):
        if index != skip:
            (folder / path.name).write_bytes(path.read_bytes())
    return folder


def test_ct_app_bad_inputs_fail_clearly_and_keep_earlier_results(ct_app, tmp_path):
    app, data = ct_app

    # by position along the slice normal (file names are UIDs): the middle slice is never an end of the series
    def height(path: Path) -> float:
        return float(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient[2])

    series = sorted((data / "dicom" / "ct_004").iterdir(), key=height)
    middle = len(series) // 2
    missing = copy_series(series, tmp_path / "missing_slice", skip=middle)
    empty_slice = copy_series(series, tmp_path / "empty_slice")
    (empty_slice / series[middle].name).write_bytes(b"")
    truncated = copy_series(series, tmp_path / "truncated_slice")
    (truncated / series[middle].name).write_bytes(series[middle].read_bytes()[:2000])
    mr = tmp_path / "mr_only"
    mr.mkdir()
    for path in series[:4]:
        ds = pydicom.dcmread(path)
        ds.Modality = "MR"
        ds.save_as(mr / path.name)
    empty = tmp_path / "no_dicom"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    cases = {
        missing: (missing, "slice(s) missing"),
        mr: (mr, "holds no CT series matching the selection rules (found: MR (4 files))"),
        empty: (empty, "holds no CT series"),
        empty_slice: (empty_slice / series[middle].name, ""),
        truncated: (truncated / series[middle].name, "truncated"),
    }
    for folder, (named, reason) in cases.items():
        out = tmp_path / f"out_{folder.name}"
        out.mkdir()
        (out / "series.json").write_text('{"an": "earlier result"}')
        result = run_app(app, folder, out)
        assert result.returncode == 1, result.stderr[-3000:]
        assert f"error: {named}" in result.stderr and reason in result.stderr, result.stderr[-3000:]
        assert result_files(out) == [out / "series.json"], f"a failed run wrote or removed files: {result_files(out)}"
        assert (out / "series.json").read_text() == '{"an": "earlier result"}'
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the output folder should be")
    result = run_app(app, data / "dicom" / "ct_004", blocker / "out")
    assert result.returncode == 1 and f"error: {blocker / 'out'}" in result.stderr, result.stderr[-3000:]


def test_ct_app_on_the_real_anonymised_dicom_series(ct_app, tmp_path):
    app, _ = ct_app
    series = shared_path("ct", "totalsegmentator", "example_ct_dicom")
    result = run_app(app, series, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "out" / "series.json").read_text())
    assert summary["shape"] == [512, 512, 20] and summary["dicom_seg"].startswith("not written")
    mask = nib.load(tmp_path / "out" / "series_seg.nii.gz")
    assert np.allclose(mask.affine, read_volume(series)[1], atol=1e-4)


@pytest.mark.parametrize("bundle", ["oct_layers", "vessels"])
def test_image_apps_write_label_maps_overlays_and_json(bundle, tmp_path):
    if bundle == "oct_layers":
        data = tmp_path / "data"
        write_phantom_dataset(data, n_subjects=3, n_bscans=2, height=64, width=96, seed=3)
        inputs = tmp_path / "inputs"
        inputs.mkdir()
        (inputs / "Subject_01.mat").write_bytes((data / "Subject_01.mat").read_bytes())
        expected = ["Subject_01_bscan00", "Subject_01_bscan01"]
    else:
        data = tmp_path / "data"
        write_drive_layout(data, n_images=4, shape=(80, 72), seed=2)
        inputs = data / "training"
        expected = ["21", "22", "23", "24"]
    app = train_and_build(bundle, data, tmp_path / "work")
    result = run_app(app, inputs, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-4000:]
    for name in expected:
        summary = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        label_map = np.asarray(Image.open(tmp_path / "out" / f"{name}_seg.png"))
        assert list(label_map.shape) == summary["shape"]
        assert (tmp_path / "out" / f"{name}_overlay.png").is_file()
        if bundle == "oct_layers":
            assert set(summary["mean_thickness_px"]) == {"NFL", "GCL-IPL", "INL", "OPL", "ONL-ISM", "ISE", "OS-RPE"}
            assert summary["mean_thickness_px"]["NFL"] == pytest.approx((label_map == 1).sum(axis=0).mean())
        else:
            assert 0 <= summary["area_fraction"]["vessel"] <= 1

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16)
    result = run_app(app, broken, tmp_path / "out_broken")
    assert result.returncode == 1
    assert f"error: {broken / 'scan.png'}: cannot be read as an image" in result.stderr, result.stderr[-3000:]
    assert result_files(tmp_path / "out_broken") == []
