"""The input policy of the CT side, on real files (NIfTI written by nibabel, NRRD and MetaImage by SimpleITK or as
their text headers, DICOM series by the project's writer): geometry never assumed, sizes checked from the header
before decoding, results that cannot overwrite each other, and no output folder inside the input folder."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch

from clinseg.datasets.ct import LoadCTVolumed, load_ct_datalist, load_ct_images, read_volume, write_ct_series
from clinseg.datasets.errors import DataError, InputError
from clinseg.datasets.io import unique_ids
from clinseg.pipelines.paths import require_output_outside_input
from tests.conftest import REPO_ROOT, run_bundle, shared_path
from tests.test_ct_bundle import tiny

INFER = [str(REPO_ROOT / "bundles" / "ct_heart" / "configs" / "inference.json")]
SHAPE = (12, 10, 8)
PIXDIM_OFFSET = 76  # bytes into a NIfTI-1 header: pixdim, 8 float32


def volume(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1500, size=SHAPE).astype(np.int16)


def nifti_without_geometry(path: Path, array: np.ndarray, pixdim=(1.0, 1.0, 1.0)) -> Path:
    """A NIfTI as tools that drop the geometry write it: qform_code and sform_code 0, only pixdim."""
    image = nib.Nifti1Image(array, np.diag([*pixdim, 1.0]))
    image.set_qform(None, code=0)
    image.set_sform(None, code=0)
    nib.save(image, path)
    return path


def nifti_with_raw_pixdim(path: Path, array: np.ndarray, axis: int, value: float) -> Path:
    """A qform-only NIfTI whose pixdim[axis + 1] is ``value`` as stored (nibabel repairs 0 and negatives on save
    and on load, so the header bytes are written directly)."""
    image = nib.Nifti1Image(array, np.diag([2.0, 3.0, 4.0, 1.0]))
    image.set_qform(image.affine, code=1)
    image.set_sform(None, code=0)
    nib.save(image, path)
    raw = bytearray(path.read_bytes())
    offset = PIXDIM_OFFSET + 4 * (axis + 1)
    raw[offset : offset + 4] = struct.pack("<f", value)
    path.write_bytes(bytes(raw))
    return path


def text_header_nrrd(path: Path, array: np.ndarray, fields: list[str]) -> Path:
    header = f"NRRD0004\ntype: short\ndimension: 3\nsizes: {' '.join(map(str, array.shape))}\nendian: little\n"
    header += "encoding: raw\n" + "".join(f"{field}\n" for field in fields) + "\n"
    path.write_bytes(header.encode() + np.asfortranarray(array).tobytes(order="F"))
    return path


def text_header_mha(path: Path, array: np.ndarray, fields: list[str]) -> Path:
    header = f"ObjectType = Image\nNDims = 3\nDimSize = {' '.join(map(str, array.shape))}\nElementType = MET_SHORT\n"
    header += "".join(f"{field}\n" for field in fields) + "ElementDataFile = LOCAL\n"
    path.write_bytes(header.encode() + array.tobytes(order="F"))
    return path


def itk_volume(path: Path, array: np.ndarray, spacing=(0.8, 0.9, 2.5)) -> Path:
    image = sitk.GetImageFromArray(np.transpose(array, (2, 1, 0)))  # ITK arrays are [k, j, i]
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


# --- geometry never assumed


def test_nifti_without_coordinate_system_is_refused_naming_the_file_and_the_way_out(tmp_path):
    path = nifti_without_geometry(tmp_path / "dropped.nii.gz", volume())
    assert nib.load(path).affine[0, 0] != 0, "nibabel itself would give a plausible pixdim-only affine"
    with pytest.raises(DataError) as refused:
        read_volume(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: has no coordinate system (qform_code and sform_code are both 0")
    assert "--assume_spacing" in message and "assume_orientation" in message
    with pytest.raises(DataError, match="qform_code and sform_code are both 0"):
        LoadCTVolumed("image")({"image": str(path)})


def test_assumed_spacing_and_orientation_build_the_affine_and_are_recorded(tmp_path):
    array = volume()
    path = nifti_without_geometry(tmp_path / "dropped.nii.gz", array, pixdim=(2.0, 3.0, 4.0))
    read, affine, meta = read_volume(path, assume_spacing=(0.8, 0.9, 2.5))
    np.testing.assert_array_equal(read, array)
    np.testing.assert_allclose(affine, np.diag([0.8, 0.9, 2.5, 1.0]))
    assert meta["geometry_assumed"].startswith("spacing 0.8 x 0.9 x 2.5 mm, orientation RAS, assumed: the file has no")
    _, affine, meta = read_volume(path, assume_spacing=[0.8, 0.9, 2.5], assume_orientation="lps")
    np.testing.assert_allclose(affine, np.diag([-0.8, -0.9, 2.5, 1.0]))
    assert "orientation LPS" in meta["geometry_assumed"]

    loaded = LoadCTVolumed("image", assume_spacing=[0.8, 0.9, 2.5])({"image": str(path)})["image"]
    assert "spacing 0.8 x 0.9 x 2.5 mm" in loaded.meta["geometry_assumed"]
    np.testing.assert_allclose(loaded.affine.numpy(), np.diag([0.8, 0.9, 2.5, 1.0]))
    np.testing.assert_allclose(loaded.meta["pixdim"][1:4], [0.8, 0.9, 2.5])


def test_a_file_with_its_own_geometry_keeps_it_when_a_spacing_is_offered(tmp_path):
    affine = np.array([[-0.7, 0, 0, 10.0], [0, -0.7, 0, 5.0], [0, 0, 3.0, -20.0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(volume(), affine), tmp_path / "ct.nii.gz")
    itk_volume(tmp_path / "ct.nrrd", volume())
    _, read_affine, meta = read_volume(tmp_path / "ct.nii.gz", assume_spacing=(1, 1, 1))
    np.testing.assert_allclose(read_affine, affine)
    assert meta["geometry_assumed"] == ""
    _, read_affine, meta = read_volume(tmp_path / "ct.nrrd", assume_spacing=(1, 1, 1))
    np.testing.assert_allclose(np.linalg.norm(read_affine[:3, :3], axis=0), [0.8, 0.9, 2.5])
    assert meta["geometry_assumed"] == ""


@pytest.mark.parametrize("value", [0.0, -3.0, float("nan"), float("inf")])
def test_degenerate_nifti_pixdim_is_refused(tmp_path, value):
    path = nifti_with_raw_pixdim(tmp_path / "bad.nii", volume(), axis=1, value=value)
    with pytest.raises(DataError, match="degenerate voxel size: pixdim 2, (0|-3|nan|inf), 4") as refused:
        read_volume(path)
    assert str(path) in str(refused.value)
    _, affine, meta = read_volume(path, assume_spacing=(2, 3, 4))
    assert meta["geometry_assumed"] and np.allclose(affine, np.diag([2.0, 3.0, 4.0, 1.0]))


def test_nrrd_and_metaimage_without_or_with_degenerate_spacing_are_refused(tmp_path):
    array = volume()
    cases = {
        "bare.nrrd": (text_header_nrrd, [], "has no coordinate system: its NRRD header has no 'space directions'"),
        "spacings.nrrd": (text_header_nrrd, ["spacings: 2 3 4"], "only 'spacings: 2 3 4'"),
        "nan_spacings.nrrd": (text_header_nrrd, ["spacings: nan 1 1"], "no 'space directions'"),
        "bare.mha": (text_header_mha, [], "has no voxel size: its MetaImage header has no ElementSpacing"),
        "zero.mha": (text_header_mha, ["ElementSpacing = 0 1 1"], "degenerate voxel spacing 0, 1, 1"),
        "negative.mha": (text_header_mha, ["ElementSpacing = -1 1 1"], "degenerate voxel spacing -1, 1, 1"),
        "nan.mha": (text_header_mha, ["ElementSpacing = nan 1 1"], "degenerate voxel spacing"),
    }
    for name, (write, fields, problem) in cases.items():
        path = write(tmp_path / name, array, fields)
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        reader.ReadImageInformation()  # SimpleITK reads each of them, with some spacing it made up
        with pytest.raises(DataError, match=problem) as refused:
            read_volume(path)
        assert str(refused.value).startswith(f"{path}: "), name
        if name in ("zero.mha", "nan.mha"):  # ITK reads NaN as 0, and refuses to decode a zero spacing
            with pytest.raises(DataError, match="ITK refuses to decode a file with a zero spacing"):
                read_volume(path, assume_spacing=(1.5, 1.5, 3))
            continue
        read, affine, meta = read_volume(path, assume_spacing=(1.5, 1.5, 3))
        np.testing.assert_array_equal(read, array, err_msg=name)
        np.testing.assert_allclose(affine, np.diag([1.5, 1.5, 3.0, 1.0]), err_msg=name)
        assert meta["geometry_assumed"].startswith("spacing 1.5 x 1.5 x 3 mm"), name


def test_sitk_written_nrrd_and_mha_keep_their_geometry(tmp_path):
    array = volume()
    for suffix in ("nrrd", "mha"):
        read, affine, meta = read_volume(itk_volume(tmp_path / f"ct.{suffix}", array))
        np.testing.assert_array_equal(read, array)
        np.testing.assert_allclose(affine, np.diag([-0.8, -0.9, 2.5, 1.0]))  # LPS identity directions, in RAS
        assert meta["geometry_assumed"] == ""


@pytest.mark.parametrize(
    "kwargs, problem",
    [
        ({"assume_spacing": [1, 1]}, "three positive numbers"),
        ({"assume_spacing": [1, 0, 1]}, "three positive numbers"),
        ({"assume_spacing": "big"}, "three"),
        ({"assume_spacing": [1, 1, 1], "assume_orientation": "RAR"}, "not an orientation code"),
        ({"max_voxels": 0}, "positive integer"),
    ],
)
def test_unusable_assumptions_and_limits_are_refused_when_the_transform_is_built(kwargs, problem):
    with pytest.raises(InputError, match=problem):
        LoadCTVolumed("image", **kwargs)


# --- size limits before decoding


def truncate_voxels(path: Path, keep: int) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_voxel_limit_is_checked_from_the_header_before_decoding(tmp_path):
    array = volume()
    n = int(np.prod(SHAPE))
    nii = tmp_path / "ct.nii"
    nib.save(nib.Nifti1Image(array, np.diag([0.8, 0.8, 2.5, 1.0])), nii)
    nrrd = itk_volume(tmp_path / "ct.nrrd", array)
    for path, header_bytes in ((nii, 352), (nrrd, len(nrrd.read_bytes()) - array.nbytes)):
        with pytest.raises(DataError) as refused:
            read_volume(path, max_voxels=n - 1)
        message = str(refused.value)
        assert message.startswith(f"{path}: is 12 x 10 x 8 = 960 voxels, more than the limit of 959 voxels")
        assert "--max_voxels" in message
        read_volume(path, max_voxels=n)  # at the limit: read
        # with its voxels cut off, the file still fails on its size first: nothing was decoded
        truncate_voxels(path, header_bytes + 10)
        with pytest.raises(DataError, match="more than the limit"):
            read_volume(path, max_voxels=n - 1)
        with pytest.raises(DataError, match="cannot be read"):
            read_volume(path, max_voxels=n)
    with pytest.raises(DataError, match="more than the limit of 100 voxels"):
        LoadCTVolumed("image", max_voxels=100)({"image": str(itk_volume(tmp_path / "again.mha", array))})


def test_voxel_limit_of_a_dicom_series_uses_rows_columns_and_slices(tmp_path):
    hu = volume().astype(np.float32)
    series = tmp_path / "series"
    files = write_ct_series(hu, np.diag([-0.8, -0.8, 2.5, 1.0]), series)
    for file in files:  # pixel data unreadable: the limit must refuse before any of it is decoded
        raw = file.read_bytes()
        file.write_bytes(raw[: len(raw) - 8])
    with pytest.raises(DataError) as refused:
        read_volume(series, max_voxels=100)
    assert str(refused.value).startswith(f"{series}: is 12 x 10 x 8 = 960 voxels, more than the limit of 100")


# --- outputs that cannot collide


def test_unique_ids_renames_only_the_colliding_items_deterministically(tmp_path):
    items = [
        {"id": "a", "source": "/in/a.nii.gz"},
        {"id": "a", "source": "/in/a.nrrd"},
        {"id": "b0", "source": "/in/b0.png"},
        {"id": "B0", "source": "/in/B0.tif"},
        {"id": "c", "source": "/in/c.mha"},
        {"id": "d", "source": "/p/d.png"},
        {"id": "d", "source": "/q/d.png"},
        {"id": "inference_summary", "source": "/in/inference_summary.nii.gz"},
    ]
    renamed = unique_ids(items)
    assert [item["id"] for item in renamed] == [
        "a_nii_gz",
        "a_nrrd",
        "b0_png",
        "B0_tif",
        "c",
        "p_d_png",
        "q_d_png",
        "inference_summary_nii_gz",
    ]
    assert [item["original_id"] for item in renamed] == [item["id"] for item in items]
    assert unique_ids(list(reversed(items)))[::-1] == renamed, "independent of the order"
    assert items[0]["id"] == "a" and "original_id" not in items[0], "the input list is left as it was"


def test_inference_inputs_of_one_stem_get_distinct_ids(tmp_path):
    nib.save(nib.Nifti1Image(volume(), np.eye(4)), tmp_path / "a.nii.gz")
    itk_volume(tmp_path / "a.nrrd", volume())
    itk_volume(tmp_path / "b.mha", volume())
    assert [item["id"] for item in load_ct_images(tmp_path)] == ["a_nii_gz", "a_nrrd", "b"]


@pytest.mark.parametrize(
    "image_names, label_names",
    [
        (["ct_0001_0000", "ct_0002_0000", "ct_0003_0000"], ["ct_0001", "ct_0002", "ct_0003"]),  # nnU-Net raw
        (["heart_0000", "heart_0001", "heart_0002"], ["heart_0000", "heart_0001", "heart_0002"]),  # MSD-like
    ],
    ids=["nnunet", "msd"],
)
def test_case_names_ending_in_four_digits_pair_each_image_with_its_label(tmp_path, image_names, label_names):
    """Four-digit case numbers are not nnU-Net's channel suffix: read as one, every label was case 'ct'."""
    for folder, names in (("imagesTr", image_names), ("labelsTr", label_names)):
        (tmp_path / folder).mkdir()
        for name in names:
            nib.save(nib.Nifti1Image(volume(), np.eye(4)), tmp_path / folder / f"{name}.nii.gz")
    items = load_ct_datalist(tmp_path, split="all")
    pairs = [(Path(item["image"]).name, Path(item["label"]).name, item["id"]) for item in items]
    assert pairs == [(f"{i}.nii.gz", f"{lab}.nii.gz", lab) for i, lab in zip(image_names, label_names, strict=True)]


def test_output_folder_equal_to_or_inside_the_input_folder_is_refused(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "a.nii.gz").write_bytes(b"")
    for output in (inputs, inputs / "results", inputs / "x" / ".." / "results"):
        with pytest.raises(InputError, match=f"is (the|inside the) input folder( {inputs})?: the next run") as refused:
            require_output_outside_input(output, inputs)
        assert str(output.resolve()) in str(refused.value)
    with pytest.raises(InputError, match="which holds the input a.nii.gz"):
        require_output_outside_input(inputs, inputs / "a.nii.gz")
    require_output_outside_input(tmp_path / "results", inputs)
    require_output_outside_input(tmp_path / "inputs_results", inputs)  # a sibling sharing the prefix
    require_output_outside_input(inputs / "results", inputs / "a.nii.gz")


def tiny_inference(bundle_root: Path, **extra) -> dict:
    """The tiny sizes of tests/test_ct_bundle.py, without the training-only dataset_dir (inference.json lacks it)."""
    return {k: v for k, v in tiny(bundle_root, None, **extra).items() if k != "dataset_dir"}


@pytest.fixture(scope="module")
def untrained_bundle(tmp_path_factory) -> Path:
    """A bundle folder whose checkpoint is the tiny network's initial weights: enough to run inference."""
    from monai.networks.nets import UNet

    root = tmp_path_factory.mktemp("ct_policy_bundle")
    (root / "models").mkdir()
    torch.manual_seed(0)
    network = UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1, norm="instance")
    torch.save(network.state_dict(), root / "models" / "model.pt")
    return root


def test_inference_of_inputs_with_one_stem_writes_both_and_records_assumed_geometry(untrained_bundle, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    nifti_without_geometry(inputs / "a.nii.gz", volume(1))
    itk_volume(inputs / "a.nrrd", volume(2), spacing=(3.0, 3.0, 4.0))
    out = tmp_path / "out"
    overrides = tiny_inference(untrained_bundle, input_path=inputs, output_dir=out, assume_spacing="[2,2,3]")
    result = run_bundle("inferring", INFER, overrides)
    assert f"wrote 2 of 2 heart masks (NIfTI on the input grid), JSON volumes and pictures to {out}" in result.stdout
    assert "a.nii.gz -> a_nii_gz, a.nrrd -> a_nrrd" in result.stdout
    for case, source, spacing in (("a_nii_gz", "a.nii.gz", [2, 2, 3]), ("a_nrrd", "a.nrrd", [3, 3, 4])):
        summary = json.loads((out / f"{case}.json").read_text())
        assert summary["original_id"] == "a" and summary["source"] == str(inputs / source)
        assert summary["spacing_mm"] == spacing
        assert nib.load(out / f"{case}_seg.nii.gz").shape == SHAPE and (out / f"{case}_views.png").is_file()
    assert json.loads((out / "a_nii_gz.json").read_text())["geometry_assumed"].startswith("spacing 2 x 2 x 3 mm")
    assert "geometry_assumed" not in json.loads((out / "a_nrrd.json").read_text())
    run = json.loads((out / "inference_summary.json").read_text())
    assert run["n_inputs"] == run["n_written"] == 2 and run["not_written"] == []
    assert [case["id"] for case in run["geometry_assumed"]] == ["a_nii_gz"]
    assert {(r["original_id"], r["id"]) for r in run["renamed"]} == {("a", "a_nii_gz"), ("a", "a_nrrd")}


def test_inference_refuses_a_file_without_geometry_and_an_output_folder_inside_the_input(untrained_bundle, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    path = nifti_without_geometry(inputs / "dropped.nii.gz", volume())
    result = run_bundle(
        "inferring", INFER, tiny_inference(untrained_bundle, input_path=inputs, output_dir=tmp_path / "o"), check=False
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"error: {path}: has no coordinate system" in result.stderr
    assert not list((tmp_path / "o").glob("*")), "nothing written"

    out = inputs / "results"
    result = run_bundle(
        "inferring", INFER, tiny_inference(untrained_bundle, input_path=inputs, output_dir=out), check=False
    )
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert f"error: the output folder {out}: is inside the input folder {inputs}" in result.stderr
    assert not out.exists(), "refused before the output folder was made"


# --- anatomical space, voxel types and Hounsfield units


@pytest.mark.parametrize(
    "space, shown",
    [(None, "it has no 'space' field (only 'space dimension: 3')"), ("scanner-xyz", "its 'space' is 'scanner-xyz'")],
    ids=["space-dimension-only", "scanner-xyz"],
)
def test_nrrd_without_an_anatomical_space_is_refused(tmp_path, space, shown):
    array = volume()
    fields = ["space directions: (0.7,0,0) (0,0.8,0) (0,0,2.5)", "space origin: (10,20,30)"]
    fields.insert(0, f"space: {space}" if space else "space dimension: 3")
    path = text_header_nrrd(tmp_path / "scanner.nrrd", array, fields)
    with pytest.raises(DataError) as refused:
        read_volume(path)  # ITK alone reads it as LPS
    message = str(refused.value)
    assert message.startswith(f"{path}: has no anatomical coordinate system: {shown}")
    assert "--assume_orientation" in message
    read, affine, meta = read_volume(path, assume_spacing=(0.7, 0.8, 2.5), assume_orientation="LPS")
    np.testing.assert_array_equal(read, array)
    np.testing.assert_allclose(affine, np.diag([-0.7, -0.8, 2.5, 1.0]))
    assert "has no anatomical coordinate system" in meta["geometry_assumed"]


@pytest.mark.parametrize(
    "space, diagonal",
    [
        ("left-posterior-superior", [-0.7, -0.8, 2.5]),
        ("RAS", [0.7, 0.8, 2.5]),
        ("left-anterior-superior", [-0.7, 0.8, 2.5]),
    ],
)
def test_nrrd_in_a_patient_space_keeps_its_geometry(tmp_path, space, diagonal):
    fields = [f"space: {space}", "space directions: (0.7,0,0) (0,0.8,0) (0,0,2.5)"]
    _, affine, meta = read_volume(text_header_nrrd(tmp_path / "ct.nrrd", volume(), fields))
    np.testing.assert_allclose(affine, np.diag([*diagonal, 1.0]))
    assert meta["geometry_assumed"] == ""


@pytest.mark.parametrize(
    "unit, per_mm",
    [("cm", 0.1), ("m", 0.001), ("um", 1000.0), ("\u00b5m", 1000.0)],
    ids=["cm", "m", "um", "micro-sign"],
)
def test_nrrd_space_units_are_read_in_millimetres(tmp_path, unit, per_mm):
    """ITK reads every NRRD in millimetres: 0.07 cm voxels would be 0.07 mm, a heart a thousand times too small."""
    directions = " ".join(f"({','.join(f'{v * per_mm:g}' for v in row)})" for row in np.diag([0.7, 0.8, 2.5]))
    fields = [
        "space: left-posterior-superior",
        f"space directions: {directions}",
        f"space origin: ({-120 * per_mm:g},{40 * per_mm:g},{300 * per_mm:g})",
        f'space units: "{unit}" "{unit}" "{unit}"',
    ]
    _, affine, _ = read_volume(text_header_nrrd(tmp_path / "ct.nrrd", volume(), fields))
    expected = np.diag([-0.7, -0.8, 2.5, 1.0])
    expected[:3, 3] = (120.0, -40.0, 300.0)
    np.testing.assert_allclose(affine, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(
    "field, shown",
    [
        ('space units: "mm" "inch" "mm"', "'inch' is not a unit of length that can be converted to millimetres"),
        # ITK's NRRD reader refuses these itself, with a reason several lines long
        ('units: "cm" "cm" "cm"', "has a direction vector, and so can't have min, max, spacing, or units set"),
    ],
    ids=["unknown-space-unit", "per-axis-units"],
)
def test_nrrd_units_that_cannot_be_converted_are_refused_in_one_line_naming_the_file(tmp_path, field, shown):
    fields = ["space: left-posterior-superior", "space directions: (0.7,0,0) (0,0.8,0) (0,0,2.5)", field]
    path = text_header_nrrd(tmp_path / "ct.nrrd", volume(), fields)
    with pytest.raises(DataError) as refused:
        read_volume(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and shown in message and "\n" not in message


@pytest.mark.parametrize("suffix, shown", [(".nrrd", "fread got only"), (".mha", "File cannot be read")])
def test_truncated_nrrd_and_metaimage_are_refused_in_one_line_naming_the_file(tmp_path, suffix, shown):
    path = itk_volume(tmp_path / f"ct{suffix}", volume())
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError) as refused:
        read_volume(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: cannot be read as {suffix[1:].upper()}") and "\n" not in message, message
    assert shown in message, message


def test_float64_beyond_float32_range_is_refused_not_made_infinite(tmp_path):
    array = volume().astype(np.float64)
    array[0, 0, 0] = 1e39
    nib.save(nib.Nifti1Image(array, np.diag([0.8, 0.8, 2.5, 1.0])), tmp_path / "big.nii.gz")
    scaled = nib.Nifti1Image(volume(), np.diag([0.8, 0.8, 2.5, 1.0]))
    scaled.header.set_slope_inter(1e38, 0)  # int16 voxels times 1e38: finite in float64 only
    nib.save(scaled, tmp_path / "slope.nii.gz")
    for name in ("big.nii.gz", "slope.nii.gz"):
        path = tmp_path / name
        with pytest.raises(DataError, match="NaN or infinite voxel values") as refused:
            LoadCTVolumed("image")({"image": str(path)})
        assert str(refused.value).startswith(f"{path}: holds "), name
    read, _, _ = read_volume(tmp_path / "big.nii.gz", check_finite=False)
    assert read.dtype == np.float32  # what the loaders hand on


def test_rgb_and_complex_nifti_are_refused_naming_the_file(tmp_path):
    rgb = np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    nib.save(nib.Nifti1Image(rgb, np.eye(4)), tmp_path / "rgb.nii.gz")
    real = volume().astype(np.float32)
    nib.save(nib.Nifti1Image((real + 1j * real).astype(np.complex64), np.eye(4)), tmp_path / "complex.nii.gz")
    for name, problem in (("rgb.nii.gz", "structured type (R, G, B"), ("complex.nii.gz", "complex voxels")):
        path = tmp_path / name
        with pytest.raises(DataError, match=re.escape(problem)) as refused:
            LoadCTVolumed(["image", "label"])({"image": str(path), "label": str(path)})
        assert str(refused.value).startswith(f"{path}: has "), name
        with pytest.raises(DataError, match=re.escape(problem)):
            LoadCTVolumed("label", hu_keys=None)({"label": str(path)})  # not a label either


def hu_plus_1024(path: Path, array: np.ndarray, dtype=np.uint16, intercept: float | None = None) -> Path:
    """A CT as some exporters write it: the stored values HU + 1024, with or without scl_inter saying so."""
    image = nib.Nifti1Image((array.astype(np.int32) + 1024).astype(dtype), np.diag([0.8, 0.8, 2.5, 1.0]))
    if intercept is not None:
        image.header.set_slope_inter(1.0, intercept)
    nib.save(image, path)
    return path


def test_integers_without_intercept_and_nothing_below_zero_are_refused_as_not_hounsfield_units(tmp_path):
    hu = volume()
    cases = {
        "u16.nii.gz": hu_plus_1024(tmp_path / "u16.nii.gz", hu),
        "i16.nii.gz": hu_plus_1024(tmp_path / "i16.nii.gz", hu, np.int16),
        "u16.nrrd": itk_volume(tmp_path / "u16.nrrd", (hu.astype(np.int32) + 1024).astype(np.uint16)),
    }
    for name, path in cases.items():
        with pytest.raises(DataError) as refused:
            read_volume(path)
        message = str(refused.value)
        assert message.startswith(f"{path}: does not look like Hounsfield units: its values are stored integers")
        assert "intercept" in message and "not a CT" in message, name
        with pytest.raises(DataError, match="does not look like Hounsfield units"):
            LoadCTVolumed(["image", "label"])({"image": str(path), "label": str(path)})
    # the same stored values with scl_inter -1024 are HU; a label is integers from 0 and is read as it is
    read, _, _ = read_volume(hu_plus_1024(tmp_path / "scaled.nii.gz", hu, intercept=-1024.0))
    np.testing.assert_array_equal(read, hu)
    label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image((hu > 0).astype(np.uint8), np.diag([0.8, 0.8, 2.5, 1.0])), label)
    loaded = LoadCTVolumed(["image", "label"])({"image": str(tmp_path / "scaled.nii.gz"), "label": str(label)})
    np.testing.assert_array_equal(loaded["label"].numpy(), hu > 0)


def test_normalised_and_non_ct_floats_with_nothing_below_zero_are_refused(tmp_path):
    """A CT normalised to 0..1 (or an MR, a PET volume) saved as floats carries no intercept to miss, but nothing
    below 0 either: no air, no fat, not even soft tissue's noise. Read as HU it would be called "not a torso"."""
    hu = volume()
    for name, values in {"unit.nii.gz": (hu - hu.min()) / (hu.max() - hu.min()), "mr.nii.gz": hu - hu.min()}.items():
        path = tmp_path / name
        nib.save(nib.Nifti1Image(values.astype(np.float32), np.diag([0.8, 0.8, 2.5, 1.0])), path)
        with pytest.raises(DataError, match="does not look like Hounsfield units.*intensity-normalised or not a CT"):
            read_volume(path)
    path = tmp_path / "hu.nii.gz"
    nib.save(nib.Nifti1Image(hu.astype(np.float32), np.diag([0.8, 0.8, 2.5, 1.0])), path)
    np.testing.assert_array_equal(read_volume(path)[0], hu.astype(np.float32))


def test_a_tight_crop_inside_the_body_without_air_is_hounsfield_units(tmp_path):
    """A box inside the body can hold no air (nothing below -500 HU); it holds fat, so values below 0: read."""
    crop = np.random.default_rng(3).integers(-120, 400, size=SHAPE).astype(np.int16)
    nib.save(nib.Nifti1Image(crop, np.diag([0.8, 0.8, 2.5, 1.0])), tmp_path / "crop.nii.gz")
    np.testing.assert_array_equal(LoadCTVolumed("image")({"image": str(tmp_path / "crop.nii.gz")})["image"], crop)


def noisy_phantom_hu(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A phantom chest in HU with a scanner's noise (sigma 15 HU) and its affine."""
    from clinseg.datasets.ct.phantom import synthesize_ct

    phantom = synthesize_ct(seed=seed, voxel_scale=3, region="chest")
    noise = np.random.default_rng(seed).normal(0.0, 15.0, phantom.hu.shape)
    return np.round(phantom.hu + noise).astype(np.int16), phantom.affine


@pytest.mark.parametrize("padding", [None, -3024], ids=["noise", "padding"])
def test_hu_plus_1024_with_values_below_zero_is_refused_as_not_hounsfield_units(tmp_path, padding):
    """HU + 1024 stored without its intercept holds values below 0 as soon as the air around 0 has noise, or the
    scanner's padding (-3024 HU, stored -2000) is left in: its content gives it away (no air, soft tissue at 1024)."""
    hu, affine = noisy_phantom_hu()
    if padding is not None:
        hu[:3, :3, :] = padding  # outside the reconstruction circle
    shifted = tmp_path / "shifted.nii.gz"
    nib.save(nib.Nifti1Image((hu.astype(np.int32) + 1024).astype(np.int16), affine), shifted)
    assert np.asanyarray(nib.load(shifted).dataobj).min() < 0
    with pytest.raises(DataError) as refused:
        LoadCTVolumed("image")({"image": str(shifted)})
    message = str(refused.value)
    assert message.startswith(f"{shifted}: does not look like Hounsfield units: no air"), message
    assert "HU + 1024" in message and "intercept" in message
    # the same scan in HU is read as it is
    kept = tmp_path / "hu.nii.gz"
    nib.save(nib.Nifti1Image(hu, affine), kept)
    np.testing.assert_array_equal(read_volume(kept)[0], hu)


def write_raw_scaling(path: Path, array: np.ndarray, slope: float, intercept: float) -> Path:
    """A NIfTI whose scl_slope and scl_inter are stored as given (nibabel resets odd ones on save and on load)."""
    nib.save(nib.Nifti1Image(array, np.diag([0.8, 0.8, 2.5, 1.0])), path)
    raw = bytearray(path.read_bytes())
    raw[SCALING_OFFSET : SCALING_OFFSET + 8] = struct.pack("<ff", slope, intercept)
    path.write_bytes(bytes(raw))
    return path


SCALING_OFFSET = 112  # bytes into a NIfTI-1 header: scl_slope, scl_inter (float32)


@pytest.mark.parametrize("slope", [0.0, float("nan")], ids=["zero", "nan"])
def test_an_intercept_beside_a_slope_that_turns_scaling_off_is_refused(tmp_path, slope):
    """scl_inter -1024 with scl_slope 0 or NaN: NIfTI (and nibabel) apply no scaling, so the values would be read
    1024 HU too high, or not, depending on the reader."""
    hu, _ = noisy_phantom_hu()
    path = write_raw_scaling(tmp_path / "scaled.nii", (hu.astype(np.int32) + 1024).astype(np.int16), slope, -1024.0)
    with pytest.raises(DataError) as refused:
        read_volume(path)
    assert str(refused.value).startswith(f"{path}: has scl_inter -1024 but scl_slope {slope:g}"), str(refused.value)
    # a slope that applies is read with its intercept; NaN in both (nibabel's "no scaling") is read as stored
    applied = write_raw_scaling(tmp_path / "applied.nii", (hu.astype(np.int32) + 1024).astype(np.int16), 1.0, -1024)
    np.testing.assert_array_equal(read_volume(applied)[0], hu)
    unscaled = write_raw_scaling(tmp_path / "unscaled.nii", hu, float("nan"), float("nan"))
    np.testing.assert_array_equal(read_volume(unscaled)[0], hu)


@pytest.mark.parametrize("change", ["flip", "shift", "voxel"])
def test_a_nifti_whose_qform_and_sform_disagree_is_refused(tmp_path, change):
    """nibabel reads the sform, ITK-based viewers may read the qform: when they place the scan differently, the
    mask would be checked against another geometry than the one it was computed in."""
    hu, affine = noisy_phantom_hu()
    other = affine.copy()
    if change == "flip":
        other[:, 0] *= -1
    elif change == "shift":
        other[:3, 3] += 30.0
    else:
        other[:3, 2] *= 1.5
    path = tmp_path / f"{change}.nii.gz"
    image = nib.Nifti1Image(hu, affine)
    image.set_sform(affine, code=1)
    image.set_qform(other, code=1)
    nib.save(image, path)
    with pytest.raises(DataError) as refused:
        read_volume(path)
    message = str(refused.value)
    assert message.startswith(f"{path}: has two coordinate systems that disagree (qform: axes"), message
    assert "assume_spacing" in message  # the way out: state the geometry
    # both set and equal (as dcm2niix, ITK and nibabel write them), or only one set: read with that geometry
    for name, qform_code in (("same.nii.gz", 1), ("sform_only.nii.gz", 0)):
        image = nib.Nifti1Image(hu, affine)
        image.set_qform(affine, code=qform_code)
        nib.save(image, tmp_path / name)
        np.testing.assert_allclose(read_volume(tmp_path / name)[1], affine, atol=1e-4)


REAL_CT = [
    ("totalsegmentator", "pulmonary_report", "ct_cropped.nii.gz"),
    ("totalsegmentator", "aorta_report", "ct_cropped.nii.gz"),
    ("totalsegmentator", "example_ct_sm.nii.gz"),
    ("totalsegmentator", "example_ct_dicom"),
    ("dcmqi_ct3slice", "ct-3slice"),
]
"""The real CTs of the shared data (chest, aorta, abdomen; NIfTI and DICOM)."""


def real_ct_id(parts) -> str:
    return "/".join(parts[1:]) or parts[0]


NOT_HU = {  # what a CT in HU becomes when it is exported wrongly, as a volume of floats (or int16 where integers)
    "hu_plus_1024": (lambda hu: (hu + 1024).astype(np.int16), "does not look like Hounsfield units"),
    "intercept_twice": (lambda hu: (hu - 1024).astype(np.int16), "an intercept of -1024 was applied twice"),
    "z_scores": (lambda hu: ((hu - hu.mean()) / hu.std()).astype(np.float32), "intensity-normalised"),
    "hu_over_1000": (lambda hu: (np.clip(hu, -1000, 1000) / 1000).astype(np.float32), "intensity-normalised"),
}


@pytest.mark.parametrize("parts", REAL_CT, ids=real_ct_id)
@pytest.mark.parametrize("export", NOT_HU)
def test_real_ct_exported_as_other_values_than_hu_is_refused(parts, export, tmp_path):
    array, affine, _ = read_volume(shared_path("ct", *parts))
    convert, problem = NOT_HU[export]
    exported = tmp_path / f"{export}.nii.gz"
    nib.save(nib.Nifti1Image(convert(array.astype(np.float64)), affine), exported)
    with pytest.raises(DataError, match=problem) as refused:
        read_volume(exported)
    assert str(refused.value).startswith(f"{exported}: does not look like Hounsfield units")


@pytest.mark.parametrize("export", [e for e in NOT_HU if e != "hu_plus_1024"])
def test_values_standardised_or_shifted_below_air_are_refused_with_padding_and_noise(tmp_path, export):
    """Values below 0 pass the storage rule; z-scores and HU / 1000 lie within a few units of 0, where a CT holds
    air, fat or soft tissue, and an intercept applied twice puts the air at -2048, below anything a scanner writes
    but its padding. A model would segment either as if it were HU (a 6-10 mL heart, exit status 0)."""
    hu, affine = noisy_phantom_hu()
    hu[:3, :3, :] = -3024  # the scanner's padding outside the reconstruction circle
    convert, problem = NOT_HU[export]
    path = tmp_path / f"{export}.nii.gz"
    nib.save(nib.Nifti1Image(convert(hu.astype(np.float64)), affine), path)
    with pytest.raises(DataError, match=problem):
        LoadCTVolumed("image")({"image": str(path)})
    # the same scan in HU, its padding blurred into a rim by a resampling (-3024 fading to air): read
    blurred = hu.astype(np.float32)
    blurred[3:4, :4, :] = blurred[:4, 3:4, :] = -2000.0
    path = tmp_path / "resampled.nii.gz"
    nib.save(nib.Nifti1Image(blurred, affine), path)
    np.testing.assert_array_equal(read_volume(path)[0], blurred)
    # a tight crop of soft tissue in HU, its noise reaching below 0, spans more than z-scores do, and is read
    crop = np.round(np.random.default_rng(1).normal(20.0, 12.0, SHAPE)).astype(np.int16)
    nib.save(nib.Nifti1Image(crop, affine), tmp_path / "soft_tissue.nii.gz")
    np.testing.assert_array_equal(read_volume(tmp_path / "soft_tissue.nii.gz")[0], crop)


@pytest.mark.parametrize("parts", REAL_CT, ids=real_ct_id)
def test_real_ct_is_hounsfield_units(parts):
    array, _, _ = read_volume(shared_path("ct", *parts))
    assert array.min() < -500
