"""MONAI Deploy applications built from tiny trained bundles and run as the SDK documents, end to end.

The apps run in the deploy environment (``make deploy-env`` -> ``.venv-deploy``, or ``$DEPLOY_PYTHON``), from their
own folder, so they prove to be self-contained. Skipped with the reason when that environment is absent.

Every DICOM SEG an app writes is validated by ``dciodvfy`` (dicom3tools: no ``Error`` line) and read back with
highdicom (:func:`check_dicom_seg`: references, one frame per source slice at its position, segment codes, pixels
equal to the NIfTI mask of the same run). ``make test`` installs dicom3tools when ``dciodvfy`` is absent; without
it the SEG checks fail under ``CI=true`` and are skipped with the reason otherwise.

The error contract of the apps and of the build (one line ``error: <file or argument>: <problem>``, exit status 1,
no usage text, nothing left behind) is tested case by case.
"""

from __future__ import annotations

import json
import os
import shutil
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
from tests.conftest import REPO_ROOT, new_store, prerequisite_missing, run_bundle, shared_path

DEPLOY_PYTHON = Path(os.environ.get("DEPLOY_PYTHON", REPO_ROOT / ".venv-deploy" / "bin" / "python"))


@pytest.fixture(autouse=True)
def deploy_environment() -> Path:
    """The MONAI Deploy environment every test here runs its app in (``make test`` creates it)."""
    if not DEPLOY_PYTHON.is_file():
        prerequisite_missing(f"the MONAI Deploy environment ({DEPLOY_PYTHON}) is absent: `make deploy-env` creates it")
    return DEPLOY_PYTHON


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
        # the phantoms' own disc (about 68 px): enlarged 8 times to the default, the app would refuse them
        "fov_diameter_px": 68,
    },
}


# a model of one tiny epoch puts layers in no order yet, which the OCT app refuses unless told otherwise
INFERENCE_ONLY = {"oct_layers": {"max_layer_order_relabelled": 1.0, "max_retina_height_ratio": 100}}


def build_command(bundle: str, checkpoints: Path | list[Path], app: Path, *extra: str) -> list[str]:
    checkpoints = checkpoints if isinstance(checkpoints, list) else [checkpoints]
    command = [sys.executable, "-m", "clinseg.pipelines.deploy", bundle, "--out", str(app), "--checkpoint"]
    command += [*map(str, checkpoints), *extra]
    overrides = {**TINY[bundle], **INFERENCE_ONLY.get(bundle, {})}
    return command + ["--override", *(f"{key}={json.dumps(value)}" for key, value in overrides.items())]


def build(bundle: str, checkpoint: Path | list[Path], app: Path, *extra: str) -> Path:
    command = build_command(bundle, checkpoint, app, *extra)
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return app


def train(bundle: str, dataset_dir: Path, root: Path, seed: int = 0) -> Path:
    """Train the bundle for one tiny epoch; its model's path."""
    overrides = {key: json.dumps(value) for key, value in TINY[bundle].items()}
    overrides.update({"bundle_root": root / "bundle", "dataset_dir": dataset_dir, "train#trainer#max_epochs": 1})
    overrides.update({"val_interval": 1, "seed": seed})
    uri = new_store(root / "mlflow.db")
    run_bundle("training", [str(REPO_ROOT / "bundles" / bundle / "configs" / "train.json")], overrides,
               env={"MLFLOW_TRACKING_URI": uri})  # fmt: skip
    return root / "bundle" / "models" / "model.pt"


def train_and_build(bundle: str, dataset_dir: Path, root: Path) -> Path:
    """Train the bundle for one tiny epoch and build its application folder; the folder's path."""
    return build(bundle, train(bundle, dataset_dir, root), root / "app")


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


def run_app_args(app: Path, args: list[str], env: dict | None = None):
    """``python app.py ARGS`` from the app folder, without the HOLOSCAN_* variables unless ``env`` sets them."""
    command = ["bash", "-c", 'ulimit -s 32768; exec "$@"', "app", str(DEPLOY_PYTHON), "app.py", *map(str, args)]
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    base = {k: v for k, v in base.items() if not k.startswith("HOLOSCAN_")}
    return subprocess.run(command, cwd=app, capture_output=True, text=True, env={**base, **(env or {})}, timeout=600)


def assert_one_error_line(result, expected: str) -> None:
    """Exit status 1 and stderr one line starting with ``expected``: no usage text, no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert len(lines) == 1 and lines[0].startswith(expected), result.stderr[-3000:]
    assert "usage:" not in result.stdout + result.stderr


def result_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


DCIODVFY = shutil.which("dciodvfy")
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def dciodvfy(path: Path) -> list[str]:
    """``dciodvfy`` on ``path``: asserts that it reports no error; its warnings (printed with their count)."""
    if DCIODVFY is None:
        reason = (
            "dciodvfy (Debian package dicom3tools) is absent, so the DICOM SEG cannot be validated: "
            "`make test` installs it (apt-get install dicom3tools)"
        )
        prerequisite_missing(reason)
    result = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=300)
    lines = (result.stdout + result.stderr).splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    warnings = [line for line in lines if line.startswith("Warning")]
    print(f"dciodvfy {path.name}: {len(errors)} errors, {len(warnings)} warnings")
    for line in errors + warnings:
        print(f"  {line}")
    assert not errors, f"dciodvfy finds errors in {path}:\n" + "\n".join(errors)
    return warnings


def check_dicom_seg(seg_path: Path, series: Path, nifti: Path) -> hd.seg.Segmentation:
    """Read the SEG back with highdicom and check it against its source series and the NIfTI mask of the same run,
    then validate it with dciodvfy (last, since without dciodvfy the test is skipped there).

    The apps write one frame per source slice (``omit_empty_frames=False``), each referencing its source instance
    and at that slice's ImagePositionPatient; every pixel of every frame is compared with the NIfTI voxel at the
    same patient position (computed from the frame's geometry and the NIfTI affine, no axis order assumed)."""
    sources = [pydicom.dcmread(path, stop_before_pixels=True) for path in read_ct_series(series).files]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    first = sources[0]
    seg = hd.seg.segread(seg_path)
    assert seg.SOPClassUID == SEGMENTATION_STORAGE and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == first.StudyInstanceUID and seg.PatientID == first.PatientID
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.SeriesInstanceUID != first.SeriesInstanceUID and seg.Modality == "SEG"

    (referenced,) = seg.ReferencedSeriesSequence
    assert referenced.SeriesInstanceUID == first.SeriesInstanceUID
    instances = {str(item.ReferencedSOPInstanceUID): item for item in referenced.ReferencedInstanceSequence}
    assert set(instances) == set(by_uid), "the SEG references exactly the instances of the source series"
    assert {item.ReferencedSOPClassUID for item in instances.values()} == {CT_IMAGE_STORAGE}

    # one frame per source slice, each at its slice's position and orientation, with its spacing
    assert int(seg.NumberOfFrames) == len(sources), "one frame per source slice"
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    np.testing.assert_allclose(orientation, np.array(first.ImageOrientationPatient, dtype=float), atol=1e-6)
    spacing = np.array(shared.PixelMeasuresSequence[0].PixelSpacing, dtype=float)
    np.testing.assert_allclose(spacing, np.array(first.PixelSpacing, dtype=float), rtol=1e-6)
    assert (int(seg.Rows), int(seg.Columns)) == (int(first.Rows), int(first.Columns))
    frame_sources = []
    for frame in seg.PerFrameFunctionalGroupsSequence:
        (derivation,) = frame.DerivationImageSequence
        (source,) = derivation.SourceImageSequence
        ds = by_uid[str(source.ReferencedSOPInstanceUID)]
        frame_sources.append(ds)
        position = np.array(frame.PlanePositionSequence[0].ImagePositionPatient, dtype=float)
        np.testing.assert_allclose(position, np.array(ds.ImagePositionPatient, dtype=float), atol=1e-4)
        identification = frame if "SegmentIdentificationSequence" in frame else shared  # one segment: shared
        assert int(identification.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == 1
    assert sorted(str(ds.SOPInstanceUID) for ds in frame_sources) == sorted(by_uid), "each source slice once"

    # the segment: heart, an anatomical structure, by an automatic algorithm
    (segment,) = seg.SegmentSequence
    assert int(segment.SegmentNumber) == 1 and segment.SegmentLabel == "Heart"
    assert segment.SegmentAlgorithmType == "AUTOMATIC" and segment.SegmentAlgorithmName == "ct_heart"
    category = segment.SegmentedPropertyCategoryCodeSequence[0]
    assert (category.CodeValue, category.CodingSchemeDesignator, category.CodeMeaning) == (
        "123037004", "SCT", "Anatomical Structure",
    )  # fmt: skip
    kind = segment.SegmentedPropertyTypeCodeSequence[0]
    assert (kind.CodeValue, kind.CodingSchemeDesignator, kind.CodeMeaning) == ("80891009", "SCT", "Heart")

    # the pixels: every frame pixel equals the NIfTI voxel at the same patient position
    image = nib.load(nifti)
    mask = np.asarray(image.dataobj)
    to_voxel = np.linalg.inv(image.affine)
    rows, columns = np.meshgrid(np.arange(int(seg.Rows)), np.arange(int(seg.Columns)), indexing="ij")
    frames = seg.pixel_array.reshape(len(sources), int(seg.Rows), int(seg.Columns))
    along_row, along_column = orientation[:3], orientation[3:]  # LPS directions of increasing column / row
    for frame, ds in zip(frames, frame_sources, strict=True):
        origin = np.array(ds.ImagePositionPatient, dtype=float)
        lps = origin + columns[..., None] * spacing[1] * along_row + rows[..., None] * spacing[0] * along_column
        ras = lps * np.array([-1.0, -1.0, 1.0])
        voxels = ras @ to_voxel[:3, :3].T + to_voxel[:3, 3]
        index = np.rint(voxels).astype(int)
        assert np.abs(voxels - index).max() < 1e-3, "the frame's pixels lie on the NIfTI grid"
        assert (index >= 0).all() and (index < mask.shape).all()
        np.testing.assert_array_equal(frame, mask[index[..., 0], index[..., 1], index[..., 2]])
    # and read by source instance, in the order of the mask's slices
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], combine_segments=True, skip_overlap_checks=True
    )
    np.testing.assert_array_equal(pixels, np.transpose(mask, (2, 1, 0)), err_msg="SEG frames equal the NIfTI mask")
    assert (mask > 0).any(), "a segmentation to compare (the tiny model finds some heart)"

    dciodvfy(seg_path)
    return seg


@pytest.fixture(scope="module")
def ct_app(tmp_path_factory):
    # two test cases: ct_004 shows the abdomen (no heart), ct_005 the chest
    data = write_msd_dataset(tmp_path_factory.mktemp("ct_data"), n_train=4, n_test=2, voxel_scale=3.0, progress=False)
    return train_and_build("ct_heart", data, tmp_path_factory.mktemp("ct_app")), data


def test_app_folder_is_self_contained(ct_app):
    app, _ = ct_app
    for name in ("app.py", "__main__.py", "app.yaml", "requirements.txt", "README.md", "series_rules.json"):
        assert (app / name).is_file(), name
    assert (app / "models" / "model.ts").is_file() and (app / "bundle" / "inference.json").is_file()
    config = json.loads((app / "bundle" / "inference.json").read_text())
    assert "%" not in json.dumps(config), "includes expanded: the app does not need the repository"
    assert config["network_def"]["channels"] == [4, 8, 16]
    # the config inside model.ts (what MONAI Deploy's bundle operator and `monai-deploy package -m` read) is the
    # one the app ships: the spacing and network the model was trained with, not the bundle's defaults
    import torch

    extra = {"inference.json": ""}
    torch.jit.load(str(app / "models" / "model.ts"), _extra_files=extra)
    embedded = json.loads(extra["inference.json"])
    assert (embedded["spacing"], embedded["network_def"]["channels"]) == ([6, 6, 6], [4, 8, 16])
    assert {key: embedded[key] for key in TINY["ct_heart"] if "#" not in key} == {
        key: config[key] for key in TINY["ct_heart"] if "#" not in key
    }
    export = json.loads((app / "models" / "export.json").read_text())
    assert export["max_abs_logit_difference"] <= 1e-4
    manifest = (app / "app.yaml").read_text()
    assert "title: CT heart segmentation" in manifest and "memory:" in manifest
    assert "monai-deploy-app-sdk==4.0.0" in (app / "requirements.txt").read_text()


def test_ct_app_reports_no_heart_in_an_abdominal_series(ct_app, tmp_path):
    """The app's JSON carries the anatomy verdict: an abdominal field holds no heart, the mask is empty and no
    volume is reported (the tiny model's false positives there are removed)."""
    app, data = ct_app
    result = run_app(app, data / "dicom" / "ct_004", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "out" / "series.json").read_text())
    assert (summary["field_of_view"], summary["heart_expected"]) == ("abdomen", "none")
    assert summary["volume_ml"]["heart"] is None and "no thoracic slice" in summary["volume_withheld"]
    assert not np.asarray(nib.load(tmp_path / "out" / "series_seg.nii.gz").dataobj).any()
    assert "heart volume withheld" in result.stdout + result.stderr


def test_ct_app_writes_dicom_seg_nifti_and_volume(ct_app, tmp_path):
    app, data = ct_app
    series = data / "dicom" / "ct_005"
    result = run_app(app, series, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-4000:]
    out = tmp_path / "out"
    summary = json.loads((out / "series.json").read_text())
    mask_image = nib.load(out / "series_seg.nii.gz")
    mask = np.asarray(mask_image.dataobj)
    hu, affine, _ = read_volume(series)
    assert mask.shape == hu.shape and np.allclose(mask_image.affine, affine, atol=1e-4)
    assert summary["voxels"]["heart"] == int((mask > 0).sum())
    measured = summary.get("segmented_volume_ml", summary["volume_ml"])["heart"]
    assert measured == pytest.approx(mask.sum() * np.prod(summary["spacing_mm"]) / 1000, 1e-3)
    # the app's JSON carries the anatomy verdict, and withholds a volume the anatomy does not support
    assert summary["field_of_view"] and summary["heart_expected"] in ("whole", "partial", "none", "unknown")
    assert (summary["volume_ml"]["heart"] is None) == (not summary["anatomy"]["volume_reportable"])

    (seg_path,) = (out / "dicom_seg").glob("*.dcm")
    first = pydicom.dcmread(read_ct_series(series).files[0], stop_before_pixels=True)
    assert summary["series_instance_uid"] == first.SeriesInstanceUID
    assert summary["dicom_seg"] == "written to dicom_seg/"
    palette = json.loads((app / "bundle" / "inference.json").read_text())["palette"]
    segment = pydicom.dcmread(seg_path, stop_before_pixels=True).SegmentSequence[0]
    shown = hd.color.CIELabColor.from_dicom_value(segment.RecommendedDisplayCIELabValue).to_rgb()
    assert np.abs(np.subtract(shown, palette[1])).max() <= 1, "the display colour is the bundle's heart colour"
    check_dicom_seg(seg_path, series, out / "series_seg.nii.gz")


def test_ct_app_writes_a_seg_for_a_series_with_an_empty_character_set(ct_app, tmp_path):
    """Some scanners write SpecificCharacterSet present but empty (the default repertoire); the SEG is still written
    and valid, and the NIfTI and JSON results are kept in any case."""
    app, data = ct_app
    series = tmp_path / "series"
    series.mkdir()
    for path in sorted((data / "dicom" / "ct_005").iterdir()):
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = ""
        ds.save_as(series / path.name)
    assert pydicom.dcmread(next(series.iterdir()), stop_before_pixels=True).SpecificCharacterSet == ""
    result = run_app(app, series, tmp_path / "out")
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((tmp_path / "out" / "series.json").read_text())
    assert summary["dicom_seg"] == "written to dicom_seg/", summary["dicom_seg"]
    (seg_path,) = (tmp_path / "out" / "dicom_seg").glob("*.dcm")
    seg = check_dicom_seg(seg_path, series, tmp_path / "out" / "series_seg.nii.gz")
    assert "SpecificCharacterSet" not in seg, "no value: the default repertoire, as the empty source element meant"


def test_ct_app_runs_with_environment_variables_and_as_a_folder(ct_app, tmp_path):
    app, data = ct_app
    for entry, env_vars in ((".", False), ("app.py", True)):
        out = tmp_path / f"out_{entry.strip('.') or 'folder'}"
        result = run_app(app, data / "dicom" / "ct_005", out, env_vars=env_vars, entry=entry)
        assert result.returncode == 0, result.stderr[-4000:]
        (seg_path,) = (out / "dicom_seg").glob("*.dcm")
        check_dicom_seg(seg_path, data / "dicom" / "ct_005", out / "series_seg.nii.gz")


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
        result = run_app(folder, data / "dicom" / "ct_005", out, model=command_model)
        assert result.returncode == 0, result.stderr[-4000:]
        outputs[name] = np.asarray(nib.load(out / "series_seg.nii.gz").dataobj)
        (seg_path,) = (out / "dicom_seg").glob("*.dcm")
        check_dicom_seg(seg_path, data / "dicom" / "ct_005", out / "series_seg.nii.gz")
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

    series = sorted((data / "dicom" / "ct_005").iterdir(), key=height)
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
        result = run_app(app, folder, out)
        assert result.returncode == 1, result.stderr[-3000:]
        assert f"error: {named}" in result.stderr and reason in result.stderr, result.stderr[-3000:]
        assert result_files(out) == [], f"a failed run wrote files: {result_files(out)}"
    # an output folder holding an earlier run's results is refused before anything is read, and left as it was
    earlier = tmp_path / "out_earlier"
    earlier.mkdir()
    (earlier / "series.json").write_text('{"an": "earlier result"}')
    result = run_app(app, data / "dicom" / "ct_005", earlier)
    refusal = f"error: {earlier}: the output folder holds an earlier run's results (1 in all"
    assert result.returncode == 1 and refusal in result.stderr, result.stderr[-3000:]
    assert result_files(earlier) == [earlier / "series.json"]
    assert (earlier / "series.json").read_text() == '{"an": "earlier result"}'
    for folder in (missing, empty):  # an output folder the failed run would have created is not left behind
        fresh = tmp_path / f"new_{folder.name}"
        result = run_app(app, folder, fresh / "out")
        assert result.returncode == 1 and f"error: {cases[folder][0]}" in result.stderr, result.stderr[-3000:]
        assert [line for line in result.stderr.splitlines() if line.startswith("error:")][-1:] == [
            result.stderr.strip().splitlines()[-1]
        ], "the error is the last line of stderr, and the only one"
        assert not fresh.exists(), "a failed run removes the output folder it created"
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the output folder should be")
    result = run_app(app, data / "dicom" / "ct_005", blocker / "out")
    assert result.returncode == 1 and f"error: {blocker / 'out'}" in result.stderr, result.stderr[-3000:]


def test_ct_app_argument_errors_are_one_line_and_create_nothing(ct_app, tmp_path):
    """A wrong argument, input, model or output folder: exit status 1 and one line naming it, before anything is
    loaded or created (the SDK's argparse would print its usage and exit 2, and create -o first)."""
    app, data = ct_app
    series = data / "dicom" / "ct_005"
    out = tmp_path / "new" / "out"
    (tmp_path / "a_file").write_text("a file")
    (tmp_path / "not_a_model.ts").write_text("not a model")
    (tmp_path / "two_models").mkdir()
    for name in ("a.ts", "b.pt"):
        (tmp_path / "two_models" / name).write_bytes(b"")
    inside = tmp_path / "input_copy"
    copy_series(sorted(series.iterdir()), inside)
    model = ["-m", "models/model.ts"]
    cases = {
        "unknown option": (["-i", series, "-o", out, *model, "--bogus"], {}, "error: --bogus: is not an option"),
        "no -i": (["-o", out, *model], {}, f"error: {app / 'input'}: the input does not exist (given by the default"),
        "-i absent": (["-i", tmp_path / "nope", "-o", out, *model], {}, f"error: {tmp_path / 'nope'}: the input "
                      "does not exist (given by -i)"),
        "HOLOSCAN_INPUT_PATH absent": (["-o", out, *model], {"HOLOSCAN_INPUT_PATH": str(tmp_path / "nope")},
                                       f"error: {tmp_path / 'nope'}: the input does not exist (given by HOLOSCAN"),
        "-i without value": (["-o", out, *model, "-i"], {}, "error: -i/--input: expected one argument"),
        "-m absent": (["-i", series, "-o", out, "-m", tmp_path / "nope.ts"], {}, f"error: {tmp_path / 'nope.ts'}: "
                      "the model does not exist (given by -m)"),
        "-m not a model": (["-i", series, "-o", out, "-m", tmp_path / "not_a_model.ts"], {},
                           f"error: {tmp_path / 'not_a_model.ts'}: is neither a TorchScript model nor a PyTorch"),
        "-m two models": (["-i", series, "-o", out, "-m", tmp_path / "two_models"], {},
                          f"error: {tmp_path / 'two_models'}: expected one model file"),
        "-o a file": (["-i", series, "-o", tmp_path / "a_file", *model], {}, f"error: {tmp_path / 'a_file'}: is a "
                      "file"),
        "-o under a file": (["-i", series, "-o", tmp_path / "a_file" / "out", *model], {},
                            f"error: {tmp_path / 'a_file' / 'out'}: the output folder cannot be created"),
        "-o inside -i": (["-i", inside, "-o", inside / "out", *model], {},
                         f"error: {inside / 'out'}: the output folder is inside the input folder"),
        "bad -l": (["-i", series, "-o", out, *model, "-l", "LOUD"], {}, "error: -l/--log-level: invalid choice"),
        "-t": (["-i", series, "-o", out, *model, "-t", "localhost:8000"], {},
               "error: --triton-server-netloc: is not supported"),
    }  # fmt: skip
    for case, (args, env, expected) in cases.items():
        result = run_app_args(app, args, env)
        assert_one_error_line(result, expected)
        assert not (tmp_path / "new").exists() and not (inside / "out").exists(), f"{case}: an output was created"
    assert sorted(p.name for p in inside.iterdir()) == sorted(p.name for p in series.iterdir())

    result = run_app_args(app, ["--help"])
    assert result.returncode == 0 and "usage: app.py" in result.stdout and "--input" in result.stdout


def test_ct_app_internal_error_is_one_line_with_its_saved_traceback(ct_app, tmp_path):
    app, data = ct_app
    broken = tmp_path / "app"
    shutil.copytree(app, broken)
    config = json.loads((broken / "bundle" / "inference.json").read_text())
    del config["evaluator"]  # an application folder damaged after the build: not the user's input
    (broken / "bundle" / "inference.json").write_text(json.dumps(config))
    out = tmp_path / "new" / "out"
    args = ["-i", data / "dicom" / "ct_005", "-o", out, "-m", "models/model.ts"]
    result = run_app_args(broken, args, {"CLINSEG_ERROR_DIR": str(tmp_path / "errors")})
    assert result.returncode == 1, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("internal error: ") and "the traceback is saved in " in last, last
    (saved,) = (tmp_path / "errors").iterdir()
    assert str(saved) in last and "Traceback" in saved.read_text() and "Traceback" not in result.stderr
    assert not (tmp_path / "new").exists(), "a failed run removes the output folder it created"


def test_app_contract_helpers(tmp_path):
    """In-process, without the SDK (:mod:`clinseg.pipelines.deploy.apps` imports it only to run): a library's
    message-only FileNotFoundError is an input problem; only the folders a run created are removed."""
    from clinseg.pipelines.cli import describe_error
    from clinseg.pipelines.deploy.apps import first_missing, remove_created, reportable

    try:
        try:
            raise FileNotFoundError("/data/series: no DICOM files")
        except FileNotFoundError as e:
            raise RuntimeError("wrapped by a transform") from e
    except RuntimeError as e:
        assert describe_error(reportable(e)) == ("error: /data/series: no DICOM files", True)
    (tmp_path / "kept").mkdir()
    output = tmp_path / "kept" / "a" / "b"
    created = first_missing(output)
    assert created == tmp_path / "kept" / "a"
    output.mkdir(parents=True)
    remove_created(output, created)
    assert (tmp_path / "kept").is_dir() and not created.exists()
    output.mkdir(parents=True)
    (output / "result.json").write_text("{}")  # never removes a file
    remove_created(output, created)
    assert (output / "result.json").is_file()


def test_build_errors_are_one_line_and_leave_nothing(ct_app, tmp_path):
    """``python -m clinseg.pipelines.deploy``: a wrong bundle, checkpoint, override or --out is one line and exit
    status 1, and nothing is left behind (no partial application folder, no folders created for --out)."""
    app, _ = ct_app
    checkpoint = app.parent / "bundle" / "models" / "model.pt"
    tiny = [f"{key}={json.dumps(value)}" for key, value in TINY["ct_heart"].items()]
    out = tmp_path / "new" / "deep" / "app"
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    (tmp_path / "a_file").write_text("a file")
    (tmp_path / "not_a_checkpoint.pt").write_text("not a checkpoint")
    base = ["ct_heart", "--checkpoint", checkpoint]
    refused_strides = [item for item in tiny if not item.startswith("network_def#strides")] + [
        "network_def#strides=[2]"
    ]
    cases = {
        "bundle": (["nosuch", "--out", out], "error: nosuch: is not a bundle of this project"),
        "not KEY=JSON": ([*base, "--out", out, "--override", "foo"], "error: --override foo: is not KEY=JSON"),
        "not JSON": ([*base, "--out", out, "--override", "patch_size=[16,"], "error: config key 'patch_size': the "
                     "value '[16,' is not JSON"),
        "unknown key": ([*base, "--out", out, "--override", *tiny, "batchsize=1"], "error: config key 'batchsize': "
                        "is not an id of this bundle's config"),
        "wrong kind": ([*base, "--out", out, "--override", *tiny, 'spacing="six"'], "error: config key 'spacing': "
                       "expected"),
        "network refuses": ([*base, "--out", out, "--override", *refused_strides], "error: the overrides "
                            "network_def#channels, network_def#num_res_units, network_def#strides: "
                            "monai.networks.nets.unet.UNet refused them: the length of `strides`"),
        "checkpoint absent": (["ct_heart", "--checkpoint", tmp_path / "nope.pt", "--out", out],
                              f"error: {tmp_path / 'nope.pt'}: does not exist"),
        "not a checkpoint": (["ct_heart", "--checkpoint", tmp_path / "not_a_checkpoint.pt", "--out", out,
                              "--override", *tiny], f"error: {tmp_path / 'not_a_checkpoint.pt'}: is not a PyTorch"),
        "other network": ([*base, "--out", out], f"error: {checkpoint}: does not fit this bundle's model"),
        "other input settings": ([*base, "--out", out, "--override", *tiny, "spacing=[2,2,2]"],
                                 f"error: config key 'spacing': is [2, 2, 2], but {checkpoint} was trained with "
                                 "[6, 6, 6] (its model.json). Pass --override 'spacing=[6, 6, 6]'"),
        "--out not empty": ([*base, "--out", kept, "--override", *tiny], f"error: {kept}: exists and is not empty"),
        "--out under a file": ([*base, "--out", tmp_path / "a_file" / "app", "--override", *tiny],
                               f"error: {tmp_path / 'a_file' / 'app'}: cannot be created"),
        "unknown option": ([*base, "--out", out, "--bogus"], "error: --bogus: is not an option"),
        "no --out": (base, "error: --out: is required"),
        "bad --model_format": ([*base, "--out", out, "--model_format", "onnx"], "error: --model_format: invalid "
                               "choice"),
    }  # fmt: skip
    before = sorted(p.name for p in tmp_path.iterdir())
    for case, (args, expected) in cases.items():
        command = [sys.executable, "-m", "clinseg.pipelines.deploy", *map(str, args)]
        result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
        assert_one_error_line(result, expected)
        assert sorted(p.name for p in tmp_path.iterdir()) == before, f"{case}: the build left something behind"
        assert [p.name for p in kept.iterdir()] == ["notes.txt"] and (kept / "notes.txt").read_text() == "mine"


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
    # the results name what made them: the model file run, and the checkpoint and training run it came from
    from clinseg.pipelines.runs import sha256_of

    model = json.loads((tmp_path / "out" / "inference_summary.json").read_text())["model"]
    assert model["sha256"] == sha256_of(app / "models" / "model.ts")
    checkpoint = tmp_path / "work" / "bundle" / "models" / "model.pt"
    assert model["exported_from"]["checkpoint_sha256"] == sha256_of(checkpoint)
    assert model["exported_from"]["training_run_id"], model
    if bundle == "oct_layers":
        # the model.json that holds the training labels' retina heights does not travel: the app carries them
        shipped = json.loads((app / "bundle" / "inference.json").read_text())["learnt_retina_height"]
        recorded = json.loads(checkpoint.with_suffix(".json").read_text())["training_labels"]["retina_height"]
        assert shipped == recorded and recorded["cases"] == 4, (shipped, recorded)
    for name in expected:
        summary = json.loads((tmp_path / "out" / f"{name}.json").read_text())
        label_map = np.asarray(Image.open(tmp_path / "out" / f"{name}_seg.png"))
        assert list(label_map.shape) == summary["shape"]
        assert (tmp_path / "out" / f"{name}_overlay.png").is_file()
        if bundle == "oct_layers":
            assert set(summary["mean_thickness_px"]) == {"NFL", "GCL-IPL", "INL", "OPL", "ONL-ISM", "ISE", "OS-RPE"}
            retina = (label_map > 0).any(axis=0)  # thickness over the columns the retina is in
            assert summary["mean_thickness_px"]["NFL"] == pytest.approx((label_map[:, retina] == 1).sum(axis=0).mean())
        else:
            assert 0 <= summary["area_fraction"]["vessel"] <= 1

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 16)
    result = run_app(app, broken, tmp_path / "out_broken")
    assert result.returncode == 1
    assert f"error: {broken / 'scan.png'}: cannot be read as an image" in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out_broken").exists(), "a failed run removes the output folder it created"


def test_an_ensemble_ships_as_one_torchscript_model(tmp_path):
    data = tmp_path / "data"
    write_drive_layout(data, n_images=4, shape=(80, 72), seed=2)
    members = [train("vessels", data, tmp_path / f"seed{seed}", seed=seed) for seed in (0, 1)]
    assert members[0].read_bytes() != members[1].read_bytes(), "two seeds, two different models"

    refused = subprocess.run(
        build_command("vessels", members, tmp_path / "refused", "--model_format", "checkpoint"),
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert_one_error_line(refused, "error: --model_format checkpoint: ships one checkpoint; an ensemble of 2")
    assert not (tmp_path / "refused").exists()

    app = build("vessels", members, tmp_path / "app")
    export = json.loads((app / "models" / "export.json").read_text())
    assert export["ensemble_size"] == 2 and export["checkpoint"] == [str(m) for m in members]
    assert export["max_abs_logit_difference"] <= 1e-4 and export["same_argmax_fraction"] == 1.0
    config = json.loads((app / "bundle" / "inference.json").read_text())
    assert config["decision_rule"] == {"threshold": 0.5, "min_component_fraction": 0.0}, "an ensemble: the plain rule"
    result = run_app(app, data / "training", tmp_path / "out")
    assert result.returncode == 0, result.stderr[-4000:]
    for name in ("21", "22", "23", "24"):
        probability = np.asarray(Image.open(tmp_path / "out" / f"{name}_prob.png"))
        assert probability.shape == (80, 72) and (tmp_path / "out" / f"{name}_seg.png").is_file()


# --------------------------------------------------------------------------------------------------------------
# the CT app's graph (the SDK's loader, selector and DICOM SEG writer, the app's segmentation operator) with a stand-in
# for the bundle: it reads the selected files with the bundle's reader and writes a box mask on the read grid, so a
# run takes seconds and needs no trained model. Run in the deploy environment, with the repository importable as
# clinseg (as an app folder ships it).

STAND_IN_APP = r"""
import json, logging, os, sys
from pathlib import Path

import nibabel as nib
import numpy as np

from clinseg.datasets.ct.volumes import read_dicom_files
from clinseg.pipelines.deploy.operators import CTHeartApp

logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
args = json.loads(sys.argv[1])


class StandInRuntime:
    # what the app uses of BundleRuntime: run() writes the mask in the series' patient space and series.json
    bundle_name, class_names = "ct_heart", ["background", "heart"]
    config = {"_meta_": {"version": "0.1.0"}, "palette": [[0, 0, 0], [220, 20, 60]]}
    config_path = Path(args["app"]) / "bundle" / "inference.json"  # no series_rules.json beside it: CT_RULES

    def run(self, datalist, output_dir):
        _, affine, _ = read_dicom_files(datalist[0]["image"])  # the bundle's reader, and its checks
        affine[:3, 3] += args.get("shift_mask_mm", 0.0)  # a mask off the series' grid
        shape = tuple(int(n) for n in args["mask_shape"])
        mask = np.zeros(shape, np.uint8)
        mask[shape[0] // 4 : shape[0] // 2, shape[1] // 3 :, 1:-1] = 1
        nib.save(nib.Nifti1Image(mask, affine), Path(output_dir) / "series_seg.nii.gz")
        (Path(output_dir) / "series.json").write_text(json.dumps({"volume_ml": {"heart": 1.0}}))
        return "segmented 1 input"


if args.get("listdir"):  # the file-system order of the SDK loader's os.listdir, as another disk may give it
    listdir = os.listdir

    def ordered(path="."):
        names = listdir(path)
        key = {n: i for i, n in enumerate(args["listdir"])}
        return sorted(names, key=lambda n: key.get(n, len(key)))

    os.listdir = ordered
app = CTHeartApp(StandInRuntime(), Path(args["input"]), Path(args["output"]), [sys.executable])
app.run()
print(json.dumps({"failure": None if app.failure is None else f"{type(app.failure).__name__}: {app.failure}"}))
"""


def run_stand_in_app(tmp_path: Path, input_path: Path, output: Path, **args) -> tuple[str | None, str]:
    """The CT app with :data:`STAND_IN_APP`'s runtime on ``input_path``: the failure it recorded (or None) and its
    log (stderr)."""
    package = tmp_path / "pythonpath" / "clinseg"
    if not package.exists():
        package.mkdir(parents=True)
        for name in ("datasets", "pipelines", "transforms"):
            (package / name).symlink_to(REPO_ROOT / name)
    args = {"app": str(tmp_path / "app"), "input": str(input_path), "output": str(output), **args}
    command = ["bash", "-c", 'ulimit -s 32768; exec "$@"', "app", str(DEPLOY_PYTHON), "-c", STAND_IN_APP]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "MLFLOW_TRACKING_URI")}
    env["PYTHONPATH"] = str(package.parent)
    result = subprocess.run([*command, json.dumps(args)], cwd=tmp_path, capture_output=True, text=True, env=env,
                            timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])["failure"], result.stderr


def write_study_series(folder: Path, prefix: str, n_slices: int, step: float, **kwargs) -> list[Path]:
    """A CT series written into ``folder`` (beside others) as ``<prefix>_NNNN.dcm``; its files."""
    from clinseg.datasets.ct.dicom import write_ct_series

    hu = np.random.default_rng(n_slices).normal(0, 300, (24, 20, n_slices)).round().astype(np.float32)
    written = write_ct_series(hu, np.diag([0.7, 0.8, step, 1.0]), folder / f".{prefix}", file_names="index", **kwargs)
    files = []
    for path in written:
        files.append(folder / f"{prefix}_{path.name}")
        path.rename(files[-1])
    (folder / f".{prefix}").rmdir()
    return files


def add_localizer(folder: Path, like: Path) -> Path:
    """A one-image localizer (scout, topogram) of the same study in ``folder``: Modality CT, ImageType LOCALIZER,
    coronal."""
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(like)
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesNumber, ds.SeriesDescription = 1, "Topogram 0.6 T20s"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.save_as(folder / "scout.dcm")
    return folder / "scout.dcm"


def test_ct_app_never_segments_a_localizer_and_prefers_the_series_with_most_slices(tmp_path):
    """A study with a localizer (Modality CT, one image), a 5 mm series and the 2.5 mm axial volume: whatever order
    the file system lists them in, the axial volume is segmented, and the log and the JSON name the skipped ones."""
    from pydicom.uid import generate_uid

    study_uid, study = generate_uid(), tmp_path / "study"
    axial = write_study_series(study, "ax", 8, 2.5, study_uid=study_uid, series_number=2,
                               series_description="Axial 2.5mm")  # fmt: skip
    write_study_series(study, "th", 4, 5.0, study_uid=study_uid, series_number=3,
                       series_description="Axial 5mm")  # fmt: skip
    add_localizer(study, axial[0])
    axial_uid = str(pydicom.dcmread(axial[0]).SeriesInstanceUID)
    names = sorted(p.name for p in study.iterdir() if p.name != "scout.dcm")
    orders = {"localizer_first": ["scout.dcm", *names], "thick_first": sorted([*names, "scout.dcm"], reverse=True)}
    for case, order in orders.items():
        out = tmp_path / f"out_{case}"
        failure, log = run_stand_in_app(tmp_path, study, out, listdir=order, mask_shape=[24, 20, 8])
        assert failure is None, f"{case}: {failure}"
        summary = json.loads((out / "series.json").read_text())
        assert summary["series_instance_uid"] == axial_uid and summary["n_slices"] == 8, case
        selection = summary["series_selection"]
        assert selection["selected"]["series_description"] == "Axial 2.5mm"
        skipped = {s["series_description"]: s["reason"] for s in selection["skipped"]}
        assert skipped == {"Topogram 0.6 T20s": "localizer (ImageType LOCALIZER)",
                           "Axial 5mm": "fewer slices (4 < 8)"}, skipped  # fmt: skip
        assert "segmenting series 'Axial 2.5mm' (series 2, 8 slices" in log
        assert "skipped series 'Axial 5mm' (4 slices" in log and "skipped series 'Topogram 0.6 T20s'" in log
        (seg_path,) = (out / "dicom_seg").glob("*.dcm")
        (referenced,) = pydicom.dcmread(seg_path, stop_before_pixels=True).ReferencedSeriesSequence
        assert referenced.SeriesInstanceUID == axial_uid, "the SEG references the segmented series"


def test_ct_app_refuses_an_arbitrary_choice_between_equal_series(tmp_path):
    """Two reconstructions with the same number of slices (two kernels): no rule tells which to segment, so the app
    refuses, naming both, instead of taking whichever the file system lists first; a localizer alone is refused
    as no volume."""
    from pydicom.uid import generate_uid

    study_uid, study = generate_uid(), tmp_path / "study"
    soft = write_study_series(study, "soft", 6, 2.5, study_uid=study_uid, series_number=2,
                              series_description="Soft tissue B30f")  # fmt: skip
    write_study_series(study, "lung", 6, 2.5, study_uid=study_uid, series_number=3, series_description="Lung B70f")
    failure, _ = run_stand_in_app(tmp_path, study, tmp_path / "out", mask_shape=[24, 20, 6])
    assert failure is not None and failure.startswith(f"DataError: {study}: holds 2 CT series with the same number"), (
        failure
    )
    assert "'Soft tissue B30f' (series 2, 6 slices" in failure and "'Lung B70f' (series 3, 6 slices" in failure
    assert "series_rules.json" in failure
    assert result_files(tmp_path / "out") == [], "a refused input writes no results"

    scout_only = tmp_path / "scout_only"
    scout_only.mkdir()
    add_localizer(scout_only, soft[0])
    failure, _ = run_stand_in_app(tmp_path, scout_only, tmp_path / "out_scout", mask_shape=[24, 20, 1])
    assert failure is not None and "holds only localizer (scout) images" in failure, failure
    assert "'Topogram 0.6 T20s' (series 1, 1 slice, UID" in failure


def jittered_series(folder: Path) -> list[Path]:
    """A CT series whose slice origins are as uneven as the series reader accepts: odd slices 0.04 mm off the
    stacking line (IN_PLANE_TOL_MM is 0.05), one slice 0.009 mm along it at 0.625 mm steps (steps may differ by
    0.01 mm)."""
    files = write_study_series(folder, "ct", 8, 0.625, series_description="Axial 0.625mm")
    for k, path in enumerate(files):
        ds = pydicom.dcmread(path)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        x += 0.04 * (k % 2)
        z += 0.009 * (k == 3)
        ds.ImagePositionPatient = [f"{v:.4f}" for v in (x, y, z)]
        ds.save_as(path)
    return files


def test_ct_app_writes_the_seg_of_a_series_with_jittered_slice_positions(tmp_path):
    """Slice positions that the reader accepts (and segments) also map onto the segmented grid for the DICOM SEG:
    each slice to its nearest grid plane, every frame equal to that plane of the NIfTI mask."""
    files = jittered_series(tmp_path / "series")
    hu, _, _ = read_volume(tmp_path / "series")  # the reader accepts this series
    out = tmp_path / "out"
    failure, log = run_stand_in_app(tmp_path, tmp_path / "series", out, mask_shape=list(hu.shape))
    assert failure is None, failure
    summary = json.loads((out / "series.json").read_text())
    assert summary["dicom_seg"] == "written to dicom_seg/", summary["dicom_seg"]
    (seg_path,) = (out / "dicom_seg").glob("*.dcm")
    seg = hd.seg.segread(seg_path)
    assert int(seg.NumberOfFrames) == len(files), "one frame per source slice"
    ordered = [str(pydicom.dcmread(path).SOPInstanceUID) for path in read_ct_series(tmp_path / "series").files]
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=ordered, segment_numbers=[1], combine_segments=True, skip_overlap_checks=True
    )
    mask = np.asarray(nib.load(out / "series_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(pixels, np.transpose(mask, (2, 1, 0)), err_msg="SEG frames equal the NIfTI mask")


def test_ct_app_keeps_the_nifti_and_json_when_no_seg_can_be_made(tmp_path):
    """A mask that does not lie on the series' grid (here 1 mm off) gives no DICOM SEG, but the NIfTI mask and the
    JSON result are written, the JSON saying why there is no SEG."""
    files = write_study_series(tmp_path / "series", "ct", 6, 2.5)
    out = tmp_path / "out"
    failure, log = run_stand_in_app(tmp_path, tmp_path / "series", out, mask_shape=[24, 20, 6], shift_mask_mm=1.0)
    assert failure is None, failure
    assert [p.name for p in result_files(out)] == ["series.json", "series_seg.nii.gz"]
    summary = json.loads((out / "series.json").read_text())
    assert summary["dicom_seg"].startswith("not written: no DICOM SEG could be made for this series (DataError: ")
    assert "does not lie on the segmented volume's grid" in summary["dicom_seg"]
    assert summary["series_selection"]["selected"]["n_slices"] == len(files)
    assert "NIfTI and JSON results are written" in log
