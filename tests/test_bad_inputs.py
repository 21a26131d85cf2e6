"""The bad-input matrix: every reader and every entry point, given a broken input, stops with an error that names
the file (or the config key) and the problem, and leaves every output already written as it was.

Three parts:
- file defects x readers: empty, truncated, another format behind the right extension, a folder, absent, no
  permission (as root, CI's user, read in a process without the capabilities that let root read any file);
- content defects: NaN/Inf, wrong channel or dimension count, label values outside the classes, image/label shape
  or geometry mismatch, and the empty label, which is allowed;
- entry points (training, evaluation, inference, run in-process through ``monai.bundle.run`` exactly as the command
  line does): a broken file in the data, a wrong label, a wrong-type override, an unwritable output folder, and an
  empty reference label that evaluation must report rather than crash on. The Deploy apps' cases are in
  ``tests/test_deploy.py``; DICOM-specific series defects (missing or duplicated slices, mixed series, tilt) in
  ``tests/test_ct_dicom.py``.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import scipy.io
import SimpleITK as sitk
import torch
from fire.parser import DefaultParseValue
from PIL import Image

from clinseg.datasets.ct import load_ct_datalist, read_volume
from clinseg.datasets.ct.dicom import write_ct_series
from clinseg.datasets.ct.phantom import write_msd_dataset
from clinseg.datasets.errors import DataError
from clinseg.datasets.fundus.datalist import load_vessel_datalist
from clinseg.datasets.fundus.phantom import write_drive_layout
from clinseg.datasets.io import save_nifti
from clinseg.datasets.oct.datalist import load_oct_datalist
from clinseg.datasets.oct.duke import duke_items
from clinseg.datasets.oct.phantom import write_phantom_dataset
from clinseg.datasets.readers import LabelImageReader, read_binary_mask, read_grayscale, read_rgb
from clinseg.pipelines.cli import ConfigError
from tests.conftest import REPO_ROOT, decode, new_store, where_permissions_apply

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")  # our own, trusted configs
RNG = np.random.default_rng(0)
OCT_CLASSES = ["background", "NFL", "GCL-IPL", "INL", "OPL", "ONL-ISM", "ISE", "OS-RPE"]


def read_label(path: Path) -> np.ndarray:
    return LabelImageReader().decode(Path(path))[0]


def read_duke_mat(path: Path) -> list[dict]:
    """The annotated B-scans of a Duke file, listed and decoded as the oct_layers bundle does."""
    return decode("oct_layers", duke_items(path))


CONFIGS = {bundle: REPO_ROOT / "bundles" / bundle / "configs" for bundle in ("oct_layers", "vessels", "ct_heart")}


def configs(bundle: str, workflow: str) -> list[str]:
    files = [str(CONFIGS[bundle] / "train.json")]
    return files + ([str(CONFIGS[bundle] / f"{workflow}.json")] if workflow != "train" else [])


# ---------------------------------------------------------------- valid files of each format, to be broken
def png_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(RNG.integers(0, 255, (24, 32), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def nifti_bytes() -> bytes:
    return nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)).to_bytes()


def write_grey(path: Path) -> Path:
    Image.fromarray(RNG.integers(0, 255, (24, 32), dtype=np.uint8)).save(path)
    return path


def write_rgb(path: Path) -> Path:
    Image.fromarray(RNG.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(path)
    return path


def write_mask_gif(path: Path) -> Path:
    mask = np.zeros((24, 32), dtype=np.uint8)
    mask[5:15, 5:25] = 255
    Image.fromarray(mask).save(path)
    return path


def write_label_png(path: Path) -> Path:
    Image.fromarray(RNG.integers(0, 8, (24, 32), dtype=np.uint8)).save(path)
    return path


def write_duke_mat(path: Path) -> Path:
    folder = path.parent / "duke"
    write_phantom_dataset(folder, n_subjects=1, n_bscans=2, height=32, width=48, seed=0)
    path.write_bytes(next(folder.glob("*.mat")).read_bytes())
    return path


def ct_array() -> np.ndarray:
    return RNG.normal(0, 300, (12, 10, 8)).astype(np.float32)


def write_nifti(path: Path) -> Path:
    return save_nifti(path, ct_array(), np.diag([1.5, 1.5, 3.0, 1.0]))


def write_itk(path: Path) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(ct_array()), str(path))
    return path


def write_dicom(folder: Path) -> Path:
    write_ct_series(ct_array(), np.diag([1.5, 1.5, 3.0, 1.0]), folder)
    return folder


FILE_READERS = {
    "OCT B-scan PNG": (".png", write_grey, read_grayscale),
    "OCT B-scan TIFF": (".tif", write_grey, read_grayscale),
    "OCT label PNG": (".png", write_label_png, read_label),
    "OCT Duke .mat": (".mat", write_duke_mat, read_duke_mat),
    "fundus photograph TIFF": (".tif", write_rgb, read_rgb),
    "fundus photograph JPEG": (".jpg", write_rgb, read_rgb),
    "fundus mask GIF": (".gif", write_mask_gif, read_binary_mask),
    "CT NIfTI": (".nii.gz", write_nifti, read_volume),
    "CT NRRD": (".nrrd", write_itk, read_volume),
    "CT MHA": (".mha", write_itk, read_volume),
    "CT DICOM series": ("", write_dicom, read_volume),
}


def break_file(path: Path, defect: str) -> None:
    if defect == "empty":
        path.write_bytes(b"")
    elif defect == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif defect == "wrong format":  # a valid file of another kind behind this extension: a volume for an image
        image_suffixes = (".png", ".tif", ".jpg", ".gif")
        path.write_bytes(nifti_bytes() if path.suffix in image_suffixes else png_bytes())
    elif defect == "folder":
        path.unlink()
        path.mkdir()
    elif defect == "absent":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    elif defect == "no permission":
        path.chmod(0)


FILE_DEFECTS = ["empty", "truncated", "wrong format", "folder", "absent", "no permission"]

READ_IN_SUBPROCESS = """
import sys
from clinseg.datasets.errors import DataError
from tests.test_bad_inputs import FILE_READERS
try:
    FILE_READERS[sys.argv[1]][2](sys.argv[2])
except DataError as error:
    print(error)
    sys.exit(0)
sys.exit(f"{sys.argv[2]}: read without an error")
"""


def read_without_permission_override(reader: str, source: Path) -> str:
    """The DataError message of ``reader`` on ``source`` in a process that file permissions apply to."""
    command = where_permissions_apply([sys.executable, "-c", READ_IN_SUBPROCESS])
    result = subprocess.run([*command, reader, str(source)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result.stdout.strip()


@pytest.mark.parametrize("defect", FILE_DEFECTS)
@pytest.mark.parametrize("reader", FILE_READERS)
def test_file_defects_name_the_file(reader, defect, tmp_path):
    suffix, write, read = FILE_READERS[reader]
    source = target = write(tmp_path / f"input{suffix}")
    if reader == "CT DICOM series" and defect == "folder":
        source = target = tmp_path / "a_file.dcm"  # a file where the series folder is expected
        target.write_bytes(b"")
    elif reader == "CT DICOM series" and defect != "absent":
        target = sorted(source.iterdir())[3]  # one slice file of the series folder that is read
        break_file(target, defect)
    else:
        break_file(target, defect)
    if defect == "no permission":  # root reads anything: the read runs where permissions apply
        message = read_without_permission_override(reader, source)
    else:
        with pytest.raises(DataError) as error:
            read(source)
        message = str(error.value)
    assert str(target) in message, message
    problem = message.split(str(target), 1)[1]
    assert len(problem.strip(" :.")) > 10, f"the error names no problem: {message}"
    if defect == "absent":
        assert "does not exist" in message


# ---------------------------------------------------------------- content defects
def float_tiff(path: Path, value: float) -> Path:
    array = RNG.random((24, 32)).astype(np.float32)
    array[3, 4] = value
    Image.fromarray(array, mode="F").save(path)
    return path


def multipage_tiff(path: Path, mode: str = "L") -> Path:
    shape = (24, 32) if mode == "L" else (24, 32, 3)
    pages = [Image.fromarray(RNG.integers(0, 255, shape, dtype=np.uint8)) for _ in range(3)]
    pages[0].save(path, save_all=True, append_images=pages[1:])
    return path


def nifti_with(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return path


def duke_with(path: Path, **changes) -> Path:
    write_duke_mat(path)
    content = {k: v for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    for key, value in changes.items():
        content[key] = value(content) if callable(value) else value
    scipy.io.savemat(path, content)
    return path


def with_nan(content):
    images = content["images"].astype(np.float64)
    images[2, 3, 0] = np.nan
    return images


def ct_with(value):
    array = ct_array()
    array[2, 3, 4] = value
    return array


CONTENT_DEFECTS = {
    # name: (make(tmp_path) -> path, read(path), expected words)
    "OCT TIFF with NaN": (lambda p: float_tiff(p / "b.tif", np.nan), read_grayscale, "NaN or infinite"),
    "OCT TIFF with Inf": (lambda p: float_tiff(p / "b.tif", np.inf), read_grayscale, "NaN or infinite"),
    "OCT .mat with NaN": (lambda p: duke_with(p / "s.mat", images=with_nan), read_duke_mat, "NaN or infinite"),
    "fundus TIFF with NaN": (lambda p: float_tiff(p / "f.tif", np.nan), read_rgb, "NaN or infinite"),
    "CT NIfTI with NaN": (lambda p: save_nifti(p / "c.nii.gz", ct_with(np.nan), np.eye(4)), read_volume, "NaN"),
    "CT NIfTI with Inf": (lambda p: save_nifti(p / "c.nii.gz", ct_with(np.inf), np.eye(4)), read_volume, "infinite"),
    "OCT B-scan TIFF with 3 pages": (lambda p: multipage_tiff(p / "b.tif"), read_grayscale, "3 frames"),
    "fundus TIFF with 3 pages": (lambda p: multipage_tiff(p / "f.tif", "RGB"), read_rgb, "3 frames"),
    "OCT .mat with 2D images": (
        lambda p: duke_with(p / "s.mat", images=lambda c: c["images"][..., 0]),
        read_duke_mat,
        "shape",
    ),
    "CT NIfTI with 2 channels": (
        lambda p: nifti_with(p / "c.nii.gz", np.stack([ct_array()] * 2, -1)),
        read_volume,
        "must be 3D (one channel)",
    ),
    "CT NIfTI in 2D": (lambda p: nifti_with(p / "c.nii.gz", ct_array()[..., 0]), read_volume, "must be 3D"),
    "CT MHA with 3 components": (
        lambda p: (
            sitk.WriteImage(sitk.GetImageFromArray(np.stack([ct_array()] * 3, -1), isVector=True), str(p / "c.mha"))
            or p / "c.mha"
        ),  # fmt: skip
        read_volume,
        "3 components per voxel",
    ),
    "fundus mask with 3 values": (
        lambda p: Image.fromarray(np.array([[0, 1, 2] * 8] * 6, dtype=np.uint8)).save(p / "m.png") or p / "m.png",
        read_binary_mask,
        "values [0, 1, 2]",
    ),
    "OCT label beyond 255": (
        lambda p: Image.fromarray(np.full((6, 8), 300, dtype=np.uint16)).save(p / "l.png") or p / "l.png",
        read_label,
        "300",
    ),
    "OCT .mat boundaries outside the image": (
        lambda p: duke_with(p / "s.mat", manualLayers1=lambda c: c["manualLayers1"] + 1000),
        read_duke_mat,
        "outside the image",
    ),
}


@pytest.mark.parametrize("case", CONTENT_DEFECTS)
def test_content_defects_name_the_file(case, tmp_path):
    make, read, words = CONTENT_DEFECTS[case]
    path = make(tmp_path)
    with pytest.raises(DataError) as error:
        read(path)
    assert str(path) in str(error.value) and words in str(error.value), str(error.value)


def paired_oct(folder: Path, label_values=(0, 8), label_shape=(24, 32)) -> Path:
    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for index in range(3):
        write_grey(folder / "images" / f"b{index}.png")
        # each column's values sorted top to bottom: layers in their anatomical order
        label = np.sort(RNG.integers(*label_values, label_shape), axis=0).astype(np.uint8)
        Image.fromarray(label).save(folder / "labels" / f"b{index}.png")
    return folder


def drive_with(folder: Path, change: str, index: int = 1) -> tuple[Path, Path]:
    """A DRIVE folder of 4 images whose ``index``-th manual (or FOV mask) is changed (the last is validation)."""
    write_drive_layout(folder, n_images=4, shape=(80, 72), seed=2)
    target = sorted((folder / "training" / ("mask" if change == "fov shape" else "1st_manual")).iterdir())[index]
    mask = np.asarray(Image.open(target).convert("L"))
    if change in ("label shape", "fov shape"):
        mask = mask[:-3]
    elif change == "label values":
        mask = (mask > 0).astype(np.uint8) * 2
        mask[0, :4], mask[5:9, 5:9] = 1, 2
    elif change == "empty label":
        mask = np.zeros_like(mask)
    Image.fromarray(mask).save(target)
    return folder, target


def ct_dataset(folder: Path, label_change: str) -> tuple[Path, Path]:
    """An MSD folder of 2 cases whose second label is changed."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    for case in ("a", "b"):
        save_nifti(folder / "imagesTr" / f"{case}.nii.gz", ct_array(), affine)
        label = np.zeros((12, 10, 8), dtype=np.uint8)
        label[4:8, 3:7, 2:6] = 1
        label_affine = affine
        if case == "b":
            if label_change == "values":
                label[5, 5, 3] = 2
            elif label_change == "outside":
                label_affine = affine.copy()
                label_affine[:3, 3] = [500.0, 0.0, 0.0]  # same grid size, 500 mm to the side
            elif label_change == "shape":
                label = np.pad(label, ((0, 4), (0, 0), (0, 0)))  # a larger grid of the same world: resampled
            elif label_change == "empty":
                label[:] = 0
        save_nifti(folder / "labelsTr" / f"{case}.nii.gz", label, label_affine)
    return folder, folder / "labelsTr" / "b.nii.gz"


def load_ct_labels(folder: Path):
    """The ct_heart bundle's own load transforms (read, channel first, align label to image, check label values)."""
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    parser = ConfigParser()
    parser.read_config(configs("ct_heart", "train"))
    pipeline = Compose(parser.get_parsed_content("load_transforms"))
    return [pipeline(item) for item in load_ct_datalist(folder, "all")]


DATASET_DEFECTS = {
    # name: (make(tmp_path) -> (dataset, file to be named), load(dataset), expected words)
    "OCT label values outside the classes": (
        lambda p: (paired_oct(p / "d", label_values=(0, 12)), p / "d" / "labels" / "b0.png"),
        lambda d: decode("oct_layers", load_oct_datalist(d, "all"), class_names=OCT_CLASSES),
        "label values [8, 9, 10, 11] are not among the classes",
    ),
    "OCT image/label shape mismatch": (
        lambda p: (paired_oct(p / "d", label_shape=(20, 32)), p / "d" / "labels" / "b0.png"),
        lambda d: load_oct_datalist(d, "all", class_names=OCT_CLASSES),
        "is 20 x 32 but its image b0.png is 24 x 32",
    ),
    "fundus label shape mismatch": (
        lambda p: drive_with(p / "d", "label shape"),
        lambda d: load_vessel_datalist(d, "all"),
        "is 77 x 72 but its image 22_training.tif is 80 x 72",
    ),
    "fundus FOV shape mismatch": (
        lambda p: drive_with(p / "d", "fov shape"),
        lambda d: load_vessel_datalist(d, "all"),
        "is 77 x 72 but its image 22_training.tif",
    ),
    "fundus label values outside the classes": (
        lambda p: drive_with(p / "d", "label values"),
        lambda d: decode("vessels", load_vessel_datalist(d, "all")),
        "values [0, 1, 2]",
    ),
    "CT label values outside the classes": (
        lambda p: ct_dataset(p / "d", "values"),
        load_ct_labels,
        "label values [2] are not among the classes",
    ),
    "CT label in another place of the world": (
        lambda p: ct_dataset(p / "d", "outside"),
        load_ct_labels,
        "mm away from it",  # the image's voxel counts: the same array saved with another affine
    ),
}


@pytest.mark.parametrize("case", DATASET_DEFECTS)
def test_dataset_defects_name_the_file(case, tmp_path):
    make, load, words = DATASET_DEFECTS[case]
    dataset, bad_file = make(tmp_path)
    with pytest.raises(Exception) as error:  # MONAI's Compose wraps transform errors in a RuntimeError
        load(dataset)
    found = find_input_error(error.value)
    assert isinstance(found, DataError) and str(bad_file) in str(found) and words in str(found), str(found)


def test_empty_labels_and_resampled_labels_are_accepted(tmp_path):
    oct_items = decode("oct_layers", load_oct_datalist(paired_oct(tmp_path / "oct", label_values=(0, 1)), "all"))
    assert all(item["label"].max() == 0 for item in oct_items)
    folder, empty = drive_with(tmp_path / "fundus", "empty label")
    items = decode("vessels", load_vessel_datalist(folder, "all"))
    item = next(i for i in items if i["id"] == empty.stem.split("_")[0])
    assert item["label"][item["label"] != 255].max() == 0
    for change, voxels in (("empty", 0), ("shape", 4 * 4 * 4)):
        ct_items = load_ct_labels(ct_dataset(tmp_path / f"ct_{change}", change)[0])
        label = ct_items[1]["label"]
        assert tuple(label.shape[-3:]) == (12, 10, 8) and int(label.sum()) == voxels


# ---------------------------------------------------------------- entry points
TINY = {
    "oct_layers": {"image_size": "[32,48]", "network_def#channels": "[4,8]", "network_def#strides": "[2]"},
    "vessels": {
        "patch_size": "[16,16]",
        "patches_per_image": 1,
        "repeats_per_epoch": 1,
        "sw_roi_size": "[32,32]",
        "network_def#channels": "[4,8]",
        "network_def#strides": "[2]",
    },  # fmt: skip
    "ct_heart": {
        "spacing": "[6,6,6]",
        "patch_size": "[16,16,16]",
        "network_def#channels": "[4,8]",
        "network_def#strides": "[2]",
        "network_def#num_res_units": 1,
    },  # fmt: skip
}


def as_command_line_values(overrides: dict) -> dict:
    """Override values as ``python -m monai.bundle run`` receives them: text parsed as fire parses command-line
    values (``"four"`` stays text, ``"[1,2]"`` becomes a list), paths as text."""
    return {
        k: DefaultParseValue(v) if isinstance(v, str) else str(v) if isinstance(v, Path) else v
        for k, v in overrides.items()
    }


def run_in_process(bundle: str, workflow: str, overrides: dict) -> None:
    """``python -m monai.bundle run <workflow> ...`` in this process."""
    from monai.bundle import run

    run_id = {"train": "training", "evaluate": "evaluating", "inference": "inferring"}[workflow]
    run(run_id, config_file=configs(bundle, workflow), **as_command_line_values(overrides))


def make_dataset(bundle: str, folder: Path) -> Path:
    if bundle == "oct_layers":
        write_phantom_dataset(folder, n_subjects=3, n_bscans=2, height=32, width=48, seed=1)
    elif bundle == "vessels":
        write_drive_layout(folder, n_images=4, shape=(40, 36), seed=1)
    else:
        write_msd_dataset(folder, n_train=4, n_test=1, voxel_scale=4.0, progress=False)
    return folder


def a_data_file(bundle: str, dataset: Path) -> Path:
    """One input file of the training split (validation comes last in each layout's sorted order)."""
    pattern = {"oct_layers": "*.mat", "vessels": "training/images/*", "ct_heart": "imagesTr/*"}[bundle]
    return sorted(dataset.glob(pattern))[0]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its content hash."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture()
def bundle_env(tmp_path, monkeypatch):
    """A bundle root with an earlier checkpoint and earlier outputs, which no failing run may change."""
    uri = new_store(tmp_path / "mlruns" / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(REPO_ROOT)
    root = tmp_path / "bundle"
    (root / "models").mkdir(parents=True)
    (root / "models" / "latest_checkpoint_epoch=3.pt").write_bytes(b"an earlier run's latest checkpoint")
    (root / "outputs" / "earlier-run").mkdir(parents=True)
    (root / "outputs" / "earlier-run" / "metrics.json").write_text('{"val_mean_dice": 0.9}')
    return root


def save_untrained_checkpoint(bundle: str, root: Path) -> None:
    """A model.pt of the tiny network (weights at initialisation: evaluation and inference only need a model)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(configs(bundle, "train"))
    for key, value in as_command_line_values(TINY[bundle]).items():
        parser[key] = value
    torch.save(parser.get_parsed_content("network_def").state_dict(), root / "models" / "model.pt")


BUNDLES = ["oct_layers", "vessels", "ct_heart"]


@pytest.mark.parametrize("bundle", BUNDLES)
def test_training_on_a_broken_file_names_it_and_keeps_the_checkpoints(bundle, bundle_env, tmp_path):
    dataset = make_dataset(bundle, tmp_path / "data")
    broken = a_data_file(bundle, dataset)
    broken.write_bytes(broken.read_bytes()[:100])
    before = snapshot(bundle_env)
    with pytest.raises(Exception) as error:
        run_in_process(bundle, "train", {**TINY[bundle], "bundle_root": bundle_env, "dataset_dir": dataset,
                                         "cache": "none", "train#trainer#max_epochs": 1})  # fmt: skip
    assert str(broken) in str(find_input_error(error.value)), str(error.value)
    after = snapshot(bundle_env)
    assert {k: v for k, v in after.items() if k in before} == before, "a failed run changed earlier outputs"


def find_input_error(error: BaseException):
    from clinseg.pipelines.cli import find_input_error as find

    found = find(error)
    assert found is not None, f"no DataError/ConfigError behind {type(error).__name__}: {error}"
    return found


@pytest.mark.parametrize("bundle", BUNDLES)
def test_evaluation_with_out_of_range_labels_names_the_file(bundle, bundle_env, tmp_path):
    if bundle == "oct_layers":
        dataset, bad = paired_oct(tmp_path / "data", label_values=(0, 12)), tmp_path / "data" / "labels" / "b0.png"
    elif bundle == "vessels":
        dataset, bad = drive_with(tmp_path / "data", "label values", index=-1)  # a validation image's manual
    else:
        dataset, bad = ct_dataset(tmp_path / "data", "values")
    save_untrained_checkpoint(bundle, bundle_env)
    before = snapshot(bundle_env)
    with pytest.raises(Exception) as error:
        run_in_process(bundle, "evaluate", {**TINY[bundle], "bundle_root": bundle_env, "dataset_dir": dataset,
                                            "eval_split": "all" if bundle != "vessels" else "val"})  # fmt: skip
    assert str(bad) in str(find_input_error(error.value))
    assert {k: v for k, v in snapshot(bundle_env).items() if k in before} == before


def inference_inputs(bundle: str, folder: Path) -> tuple[Path, Path]:
    """A folder of good inputs plus one empty file that looks like an input; returns (folder, bad file)."""
    folder.mkdir()
    if bundle == "oct_layers":
        for index in range(2):  # B-scans of at least 32 x 32 pixels (a smaller image is refused as a thumbnail)
            Image.fromarray(RNG.integers(0, 255, (40, 48), dtype=np.uint8)).save(folder / f"b{index}.png")
        bad = folder / "b9.png"
    elif bundle == "vessels":
        for index in range(2):
            write_rgb(folder / f"f{index}.png")
        bad = folder / "f9.png"
    else:
        write_nifti(folder / "a.nii.gz")
        bad = folder / "z.nii.gz"
    bad.write_bytes(b"")
    return folder, bad


@pytest.mark.parametrize("bundle", BUNDLES)
def test_inference_on_an_empty_file_names_it_segments_the_others_and_keeps_earlier_results(
    bundle, bundle_env, tmp_path
):
    """The empty file ends the run with its own error, once the good inputs are written and the summary lists the
    refusal; an earlier result in the folder is left as it was."""
    inputs, bad = inference_inputs(bundle, tmp_path / "inputs")
    save_untrained_checkpoint(bundle, bundle_env)
    out = tmp_path / "results"
    out.mkdir()
    (out / "earlier_seg.png").write_bytes(b"an earlier result")
    before = snapshot(out)
    key = "input_path" if bundle == "ct_heart" else "input_dir"
    with pytest.raises(Exception) as error:  # asked to write beside the earlier result (else it is refused first)
        # an untrained OCT model puts layers in no order, which inference refuses unless told otherwise
        unordered = {"max_layer_order_relabelled": 1.0, "max_retina_height_ratio": 100}
        unordered = unordered if bundle == "oct_layers" else {}
        run_in_process(bundle, "inference", {**TINY[bundle], "bundle_root": bundle_env, key: inputs, **unordered,
                                             "output_dir": out, "results_writer#overwrite": True})  # fmt: skip
    assert str(bad) in str(find_input_error(error.value))
    after = snapshot(out)
    assert {k: v for k, v in after.items() if k in before} == before
    assert not [k for k in after if ".tmp" in k or "staging" in k], f"partial files left: {list(after)}"
    summary = json.loads((out / "inference_summary.json").read_text())
    good = sorted(p for p in inputs.iterdir() if p != bad)
    assert sorted(case["source"] for case in summary["cases"]) == [str(p) for p in good]
    assert [item["source"] for item in summary["refused"]] == [str(bad)] and not summary["not_written"]
    assert all(name in after for case in summary["cases"] for name in case["files"])


WRONG_OVERRIDES = [
    ("oct_layers", "batch_size", "four"),
    ("oct_layers", "image_size", "[64]"),
    ("oct_layers", "learning_rate", "-0.1"),
    ("oct_layers", "resume", "true"),
    ("oct_layers", "train#trainer#max_epochs", "0"),
    ("oct_layers", "pixel_size_um", "-3.87"),  # thicknesses in negative micrometres
    ("oct_layers", "pixel_size_um", "0"),  # read as "not given" before
    ("vessels", "patch_size", "[96,96,96]"),
    ("vessels", "channels", "cmyk"),
    ("vessels", "val_fraction", "1.5"),
    ("vessels", "num_workers", "-1"),
    ("ct_heart", "cache", "ram"),
    ("ct_heart", "spacing", "[2,2]"),
    ("ct_heart", "flip_prob", "2"),
    ("ct_heart", "cache_rate", "0"),
    ("ct_heart", "largest_component", "yes"),
    ("ct_heart", "window_preset", "heart"),
]


@pytest.mark.parametrize("bundle,key,value", WRONG_OVERRIDES)
def test_a_wrong_type_override_names_the_key_before_anything_runs(bundle, key, value, bundle_env):
    before = snapshot(bundle_env)
    with pytest.raises(Exception) as error:
        run_in_process(bundle, "train", {**TINY[bundle], "bundle_root": bundle_env, key: value,
                                         "dataset_dir": bundle_env / "never_read"})  # fmt: skip
    found = find_input_error(error.value)
    assert isinstance(found, ConfigError) and found.key == key, str(found)
    assert repr(DefaultParseValue(value)) in str(found)
    assert snapshot(bundle_env) == before and not (bundle_env / "never_read").exists()


@pytest.mark.parametrize("workflow", ["evaluate", "inference"])
@pytest.mark.parametrize("value", ["1.25", "[]", "[0.8, 10]", "[1, 'x']"])
def test_test_time_scales_are_any_number_of_factors_in_range(workflow, value, bundle_env, tmp_path):
    """``tta_scales`` is a list of numbers, but not one per axis: any length passes the checks (the real inference
    of tests/test_vessels.py runs two scales), and a factor outside [0.25, 4], an empty list or a number alone is
    refused naming the key before anything runs."""
    before = snapshot(bundle_env)
    overrides = {"bundle_root": bundle_env, "tta": True, "tta_scales": value}
    if workflow == "inference":
        overrides.update(input_dir=tmp_path / "never_read", output_dir=tmp_path / "never_written")
    with pytest.raises(Exception) as error:
        run_in_process("vessels", workflow, overrides)
    found = find_input_error(error.value)
    assert isinstance(found, ConfigError) and found.key == "tta_scales", str(found)
    assert snapshot(bundle_env) == before and not (tmp_path / "never_written").exists()


def test_a_wrong_override_on_the_command_line_is_one_line_naming_the_key(tmp_path):
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file",
               str(configs("oct_layers", "train")), "--bundle_root", str(tmp_path), "--batch_size", "four"]  # fmt: skip
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "error: config key 'batch_size': expected an integer, got 'four' (str)." in result.stderr
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


def test_components_given_as_overrides_pass_the_checks_and_are_what_the_run_trains_with(bundle_env, tmp_path):
    """A component (``--lr_scheduler '{"_target_": ...}'``, how the READMEs give other schedules) and an expression
    over components (``--optimizer '$torch.optim.SGD(@network.parameters(), ...)'``) are built by the run; the checks
    before it once resolved them unbuilt and stopped every such run with an internal error."""
    dataset = make_dataset("oct_layers", tmp_path / "data")
    scheduler = json.dumps({"_target_": "torch.optim.lr_scheduler.StepLR", "optimizer": "@optimizer", "step_size": 1,
                            "gamma": 0.5})  # fmt: skip
    optimizer = "$torch.optim.SGD(@network.parameters(), lr=@learning_rate, momentum=0.9)"
    run_in_process("oct_layers", "train", {**TINY["oct_layers"], "bundle_root": bundle_env, "dataset_dir": dataset,
                                           "train#trainer#max_epochs": 2, "learning_rate": 0.01,
                                           "lr_scheduler": scheduler, "optimizer": optimizer})  # fmt: skip
    (checkpoint,) = (bundle_env / "outputs").glob("*/models/latest_checkpoint_epoch=2.pt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert (state["lr_scheduler"]["step_size"], state["lr_scheduler"]["gamma"]) == (1, 0.5)
    (group,) = state["optimizer"]["param_groups"]
    assert group["momentum"] == 0.9 and group["lr"] == pytest.approx(0.01 * 0.5**2)
    # a plain value that is wrong is still refused before anything runs, beside a component
    with pytest.raises(Exception) as error:
        run_in_process("oct_layers", "train", {**TINY["oct_layers"], "bundle_root": bundle_env, "dataset_dir": dataset,
                                               "lr_scheduler": scheduler, "batch_size": "four"})  # fmt: skip
    assert find_input_error(error.value).key == "batch_size"


@pytest.mark.parametrize("workflow", ["train", "evaluate", "inference"])
def test_an_unwritable_output_folder_is_named_before_anything_runs(workflow, bundle_env, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where a folder is needed")
    save_untrained_checkpoint("oct_layers", bundle_env)
    before = snapshot(bundle_env)
    with pytest.raises(Exception) as error:
        run_in_process("oct_layers", workflow, {**TINY["oct_layers"], "bundle_root": bundle_env,
                                                "output_dir": blocker / "results",
                                                "dataset_dir": tmp_path / "never_read"})  # fmt: skip
    found = find_input_error(error.value)
    assert str(blocker / "results") in str(found) and "cannot be created or written" in str(found)
    assert snapshot(bundle_env) == before


@pytest.mark.parametrize("bundle", BUNDLES)
def test_evaluation_reports_an_empty_reference_label_instead_of_crashing(bundle, bundle_env, tmp_path):
    if bundle == "oct_layers":
        dataset = paired_oct(tmp_path / "data", label_values=(0, 8))
        Image.fromarray(np.zeros((24, 32), dtype=np.uint8)).save(dataset / "labels" / "b1.png")
        split, empty_id = "all", "b1"
    elif bundle == "vessels":
        dataset, empty = drive_with(tmp_path / "data", "empty label")
        split, empty_id = "all", empty.stem.split("_")[0]
    else:
        dataset, _ = ct_dataset(tmp_path / "data", "empty")
        split, empty_id = "all", "b"
    save_untrained_checkpoint(bundle, bundle_env)
    run_in_process(bundle, "evaluate", {**TINY[bundle], "bundle_root": bundle_env, "dataset_dir": dataset,
                                        "eval_split": split, "run_name": "eval-empty"})  # fmt: skip
    outputs = bundle_env / "outputs" / "eval-empty"
    key = "val_mean_dice" if bundle != "vessels" else "val_f1"
    mean = json.loads((outputs / "metrics.json").read_text())["mean"][key]
    assert np.isfinite(mean), f"the mean over the images with a reference is defined, got {mean}"
    rows = [row.split(",") for row in (outputs / f"{key}_raw.csv").read_text().splitlines()[1:]]
    scores = {row[0]: row[-1] for row in rows}
    assert scores[empty_id] == "nan", f"an image without reference has no Dice, reported as NaN: {scores}"
    assert all(np.isfinite(float(v)) for k, v in scores.items() if k != empty_id), scores


def test_the_choices_checked_are_read_from_the_transforms_constants(bundle_env):
    """A wrong choice is refused with the choices of the Python constant the transform uses, not a copy."""
    from clinseg.transforms.ct import WINDOW_PRESETS
    from clinseg.transforms.fundus import CHANNEL_CHOICES

    for bundle, key, choices in [
        ("ct_heart", "window_preset", WINDOW_PRESETS),
        ("vessels", "channels", CHANNEL_CHOICES),
    ]:
        with pytest.raises(Exception) as error:
            run_in_process(bundle, "train", {**TINY[bundle], "bundle_root": bundle_env, key: "nonsense"})
        found = find_input_error(error.value)
        assert isinstance(found, ConfigError) and found.key == key, str(found)
        assert all(repr(choice) in str(found) for choice in choices), str(found)


MONAI_MAIN = str(Path(sys.modules["monai"].__file__).parent / "bundle" / "__main__.py")


@pytest.mark.parametrize("bundle", ["oct_layers", "vessels", "ct_heart"])
def test_override_ids_the_config_lacks_are_refused_with_the_nearest_one(bundle):
    from clinseg.pipelines.cli import ConfigError
    from clinseg.pipelines.config_checks import check_override_keys, command_line_overrides

    def check(*overrides: str, files=("train.json",)):
        config_files = str([str(CONFIGS[bundle] / name) for name in files])
        check_override_keys(
            *command_line_overrides([MONAI_MAIN, "run", "training", "--config_file", config_files, *overrides])
        )

    check("--batch_size", "1", "--train#trainer#max_epochs=2", "--network_def#channels", "[8,16]")
    check("--train#handlers#0#_disabled_", "True")  # a new setting inside an existing component
    input_key = "--input_path" if bundle == "ct_heart" else "--input_dir"
    check(input_key, "/x", files=("inference.json",))
    check("--network_def#act", "PRELU")  # a parameter the network takes, not in the config yet
    # a parameter of the class given in the same command (SGD takes a momentum, the config's Adam does not)
    check("--optimizer#_target_", "torch.optim.SGD", "--optimizer#momentum", "0.99", "--optimizer#nesterov", "True")
    with pytest.raises(ConfigError, match="optimizer#momentum"):
        check("--optimizer#momentum", "0.99")
    with pytest.raises(ConfigError, match="batchsize.*not an id") as refused:
        check("--batchsize", "1")
    assert "--batch_size" in str(refused.value)
    with pytest.raises(ConfigError, match="network_def#chanels"):
        check("--network_def#chanels", "[8,16]")
    with pytest.raises(ConfigError, match=input_key[2:]):
        check(input_key, "/x", files=("train.json",))  # an inference id, not a training one


def test_an_unknown_override_stops_the_run_before_anything_is_written(tmp_path):
    command = [
        sys.executable,
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        str(CONFIGS["vessels"] / "train.json"),
        "--bundle_root",
        str(tmp_path / "bundle"),
        "--batchsize",
        "1",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "error: config key 'batchsize': is not an id" in result.stderr and "--batch_size" in result.stderr
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize("name", ["L" * 251 + ".png", "é" * 119 + "_seg.nii.gz", "case.nii.gz"])
def test_any_name_the_file_system_accepts_is_written_atomically(tmp_path, name):
    """The hidden temporary file beside a result has a short name of its own: a result named near the file system's
    limit of 255 bytes (an input's long name plus ``_seg.png``) is still written, and its suffixes, by which writers
    choose the format, are kept."""
    from clinseg.datasets.io import atomic_write, atomic_write_all

    seen = []
    target = tmp_path / name
    atomic_write(target, lambda tmp: (seen.append(tmp.name), tmp.write_bytes(b"result")))
    assert target.read_bytes() == b"result" and seen[0].endswith(".nii.gz" if "nii" in name else ".png")
    atomic_write_all(
        [(target, lambda tmp: tmp.write_bytes(b"again")), (tmp_path / "b.json", lambda t: t.write_text("{}"))]
    )
    assert target.read_bytes() == b"again"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "b.json"]), "no temporary file left"
