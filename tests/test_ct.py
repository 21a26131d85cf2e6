"""CT building blocks: Hounsfield windowing, volume readers and the Decathlon layout, label alignment across grids,
millimetre metrics against hand-computed values, and the chest CT phantom."""

from __future__ import annotations

import gzip
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import EnsureChannelFirstd, LoadImaged

from clinseg.datasets.ct import (
    CTVolumeReader,
    load_ct_datalist,
    load_ct_images,
    read_volume,
    synthesize_ct,
    write_ct_series,
    write_msd_dataset,
)
from clinseg.datasets.ct.phantom import RAS_TO_LPS
from clinseg.datasets.ct.volumes import voxel_volume_ml
from clinseg.datasets.errors import DataError, NoUsableDataError
from clinseg.pipelines.engine.metrics import (
    AverageSurfaceDistanceMM,
    HausdorffDistanceMM,
    RelativeVolumeError,
)
from clinseg.transforms.ct import WINDOW_PRESETS, AlignToImaged, HounsfieldWindow, window_range
from clinseg.transforms.labels import MapLabelValues
from tests.conftest import shared_path

# --- Hounsfield windowing


@pytest.mark.parametrize("preset", sorted(WINDOW_PRESETS))
def test_window_edges_map_to_the_output_range(preset):
    level, width = WINDOW_PRESETS[preset]
    low, high = level - width / 2, level + width / 2
    window = HounsfieldWindow(preset=preset)
    hu = np.array([low - 500, low, level, high, high + 500], dtype=np.float32)
    np.testing.assert_allclose(np.asarray(window(hu)), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)


def test_window_level_width_equals_min_max_and_output_range():
    by_level = HounsfieldWindow(level=40, width=400, output_range=(-1, 1))
    by_edges = HounsfieldWindow(hu_min=-160, hu_max=240, output_range=(-1, 1))
    hu = np.linspace(-1200, 1200, 49, dtype=np.float32)
    np.testing.assert_allclose(np.asarray(by_level(hu)), np.asarray(by_edges(hu)), atol=1e-6)
    assert float(by_level(np.array([-160.0]))[0]) == pytest.approx(-1.0)
    assert float(by_level(np.array([240.0]))[0]) == pytest.approx(1.0)
    unclipped = HounsfieldWindow(hu_min=0, hu_max=100, clip=False)
    assert float(unclipped(np.array([200.0]))[0]) == pytest.approx(2.0), "clip=False keeps the linear map"
    assert window_range("lung") == (-1350.0, 150.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"preset": "heart"}, "unknown Hounsfield window preset"),
        ({"level": 40}, "both level and width"),
        ({"hu_min": 100, "hu_max": 100}, "hu_max > hu_min"),
        ({"preset": "lung", "level": 1, "width": 2}, "one way"),
    ],
)
def test_window_specification_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HounsfieldWindow(**kwargs)


# --- readers


def nifti(path, array, affine):
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def test_nifti_nrrd_mha_and_dicom_give_one_volume_in_one_world_space(tmp_path):
    rng = np.random.default_rng(0)
    hu = rng.integers(-1000, 1500, size=(9, 8, 6)).astype(np.int16)
    affine = np.array([[-0.8, 0, 0, 40.0], [0, -0.9, 0, 20.0], [0, 0, 2.5, -30.0], [0, 0, 0, 1]])
    nifti(tmp_path / "ct.nii.gz", hu, affine)
    image = sitk.GetImageFromArray(np.transpose(hu, (2, 1, 0)))  # ITK arrays are [k, j, i]
    lps = RAS_TO_LPS @ affine
    image.SetSpacing(np.linalg.norm(lps[:3, :3], axis=0).tolist())
    image.SetDirection((lps[:3, :3] / np.linalg.norm(lps[:3, :3], axis=0)).ravel().tolist())
    image.SetOrigin(lps[:3, 3].tolist())
    for suffix in ("nrrd", "mha"):
        sitk.WriteImage(image, str(tmp_path / f"ct.{suffix}"))
    write_ct_series(hu.astype(np.float32), lps, tmp_path / "series", file_names="shuffled")
    for source in ("ct.nii.gz", "ct.nrrd", "ct.mha", "series"):
        array, read_affine, meta = read_volume(tmp_path / source)
        np.testing.assert_array_equal(array, hu, err_msg=source)
        np.testing.assert_allclose(read_affine, affine, atol=1e-5, err_msg=source)
    assert read_volume(tmp_path / "series")[2]["source_format"] == "dicom"


def test_volume_reader_errors_name_the_file(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    with gzip.open(tmp_path / "truncated.nii.gz", "wb") as f:
        f.write(b"\x5c\x01\x00\x00" + b"\x00" * 100)
    bad = np.ones((4, 4, 4), np.float32)
    bad[1, 2, 3] = np.nan
    nifti(tmp_path / "nan.nii.gz", bad, np.eye(4))
    nifti(tmp_path / "flat.nii.gz", np.ones((4, 4), np.float32), np.eye(4))
    (tmp_path / "notes.txt").write_text("not a volume")
    cases = {
        "empty.nii.gz": "cannot be read as NIfTI",
        "truncated.nii.gz": "cannot be read as NIfTI",
        "nan.nii.gz": "1 NaN or infinite",
        "flat.nii.gz": "must be 3D",
        "notes.txt": "not a supported volume",
        "absent.nii.gz": "does not exist",
    }
    for name, problem in cases.items():
        with pytest.raises(DataError, match=problem) as error:
            read_volume(tmp_path / name)
        assert str(tmp_path / name) in str(error.value)


def test_msd_layout_pairs_by_case_id_and_splits(tmp_path):
    for value, case in enumerate(("a", "b", "c", "d")):
        (tmp_path / "imagesTr").mkdir(exist_ok=True)
        (tmp_path / "labelsTr").mkdir(exist_ok=True)
        # distinct scans: copies of one file are kept on one side of the split
        nifti(tmp_path / "imagesTr" / f"{case}_0000.nii.gz", np.full((4, 4, 4), value, np.int16), np.eye(4))
        nifti(tmp_path / "labelsTr" / f"{case}.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
    train = load_ct_datalist(tmp_path, "train", val_fraction=0.25)
    val = load_ct_datalist(tmp_path, "val", val_fraction=0.25)
    assert [i["id"] for i in train] == ["a", "b", "c"] and [i["id"] for i in val] == ["d"]
    assert val[0]["label"].endswith("labelsTr/d.nii.gz") and val[0]["image"].endswith("imagesTr/d_0000.nii.gz")
    (tmp_path / "labelsTr" / "b.nii.gz").unlink()
    with pytest.raises(DataError, match="no label for 1 case"):
        load_ct_datalist(tmp_path, "train")
    with pytest.raises(NoUsableDataError, match="does not exist"):
        load_ct_datalist(tmp_path / "nowhere", "train")


def test_dataset_json_lists_cases_and_missing_files_are_named(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    nifti(tmp_path / "imagesTr" / "x.nii.gz", np.zeros((4, 4, 4), np.int16), np.eye(4))
    nifti(tmp_path / "labelsTr" / "x.nii.gz", np.zeros((4, 4, 4), np.uint8), np.eye(4))
    listing = {"training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(listing))
    assert [i["id"] for i in load_ct_datalist(tmp_path, "all")] == ["x"]
    listing["training"].append({"image": "./imagesTr/y.nii.gz", "label": "./labelsTr/y.nii.gz"})
    (tmp_path / "dataset.json").write_text(json.dumps(listing))
    with pytest.raises(DataError, match=r"y\.nii\.gz: does not exist \(listed in"):
        load_ct_datalist(tmp_path, "all")


def test_inference_inputs_file_series_folder_or_mixed_folder(tmp_path):
    hu = np.zeros((6, 5, 4), np.float32)
    write_ct_series(hu, np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "mixed" / "patient1")
    nifti(tmp_path / "mixed" / "patient2.nii.gz", hu.astype(np.int16), np.eye(4))
    assert [i["id"] for i in load_ct_images(tmp_path / "mixed")] == ["patient1", "patient2"]
    assert [i["id"] for i in load_ct_images(tmp_path / "mixed" / "patient1")] == ["patient1"]
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DataError, match="holds no CT volume"):
        load_ct_images(tmp_path / "nothing")


def test_inference_inputs_folder_mixing_volumes_and_dicom_files_is_refused(tmp_path):
    folder = tmp_path / "inputs"
    folder.mkdir()
    for case in ("a", "b"):
        nifti(folder / f"{case}.nii.gz", np.zeros((6, 5, 4), np.int16), np.eye(4))
    (folder / "report.dcm").write_bytes(b"\0" * 128 + b"DICM")  # sorted after the volumes
    with pytest.raises(DataError) as error:
        load_ct_images(folder)
    message = str(error.value)
    assert message.startswith(f"{folder}: holds both volume files (a.nii.gz, b.nii.gz) and DICOM files (report.dcm)")
    assert "\n" not in message
    (folder / "report.dcm").unlink()
    assert [i["id"] for i in load_ct_images(folder)] == ["a", "b"]


def test_inference_inputs_find_a_series_behind_other_files_and_without_preamble(tmp_path):
    hu = np.full((6, 5, 4), -1000.0, np.float32)
    for folder in (tmp_path / "series", tmp_path / "study" / "series"):
        write_ct_series(hu, np.diag([1.0, 1.0, 2.0, 1.0]), folder, file_names="index")
        for i in range(25):  # sorted before the slices
            (folder / f"a_preview_{i:02d}.jpg").write_bytes(b"\xff\xd8 not a slice")
    assert [i["image"] for i in load_ct_images(tmp_path / "series")] == [str(tmp_path / "series")]
    assert [i["image"] for i in load_ct_images(tmp_path / "study")] == [str(tmp_path / "study" / "series")]
    bare = tmp_path / "bare"  # files named IM0000... without the 128-byte preamble and DICM marker
    bare.mkdir()
    for i, path in enumerate(write_ct_series(hu, np.diag([1.0, 1.0, 2.0, 1.0]), tmp_path / "full")):
        (bare / f"IM{i:04d}").write_bytes(path.read_bytes()[132:])
    assert [i["image"] for i in load_ct_images(bare)] == [str(bare)]
    assert read_volume(bare)[0].shape == (6, 5, 4)


# --- labels on another grid, label values


def load(image_path, label_path):
    loader = LoadImaged(["image", "label"], reader=CTVolumeReader(), image_only=True)
    return EnsureChannelFirstd(["image", "label"])(loader({"image": str(image_path), "label": str(label_path)}))


def test_label_on_a_larger_grid_is_resampled_through_the_affines(tmp_path):
    # the image is a crop (offset 5, 3, 2 voxels) of the label's grid; a second label grid has half the spacing
    image_affine = np.array([[-1.5, 0, 0, 10.0], [0, -1.5, 0, 20.0], [0, 0, 1.5, 30.0], [0, 0, 0, 1]])
    label_affine = image_affine.copy()
    label_affine[:3, 3] = image_affine[:3, :3] @ [-5, -3, -2] + image_affine[:3, 3]
    big = np.zeros((30, 25, 20), np.uint8)
    big[9:15, 6:12, 4:10] = 1  # image voxels 4..9, 3..8, 2..7
    nifti(tmp_path / "image.nii.gz", np.zeros((12, 10, 9), np.int16), image_affine)
    nifti(tmp_path / "label.nii.gz", big, label_affine)
    data = AlignToImaged("label")(load(tmp_path / "image.nii.gz", tmp_path / "label.nii.gz"))
    aligned = data["label"][0].numpy()
    expected = np.zeros((12, 10, 9), np.uint8)
    expected[4:10, 3:9, 2:8] = 1
    assert aligned.shape == (12, 10, 9)
    np.testing.assert_array_equal(aligned, expected)
    np.testing.assert_allclose(data["label"].affine, image_affine, atol=1e-6)

    fine_affine = label_affine.copy()
    fine_affine[:3, :3] /= 2
    fine = np.zeros((60, 50, 40), np.uint8)
    fine[18:30, 12:24, 8:20] = 3  # the same box in world space, value 3
    nifti(tmp_path / "fine.nii.gz", fine, fine_affine)
    aligned = AlignToImaged("label")(load(tmp_path / "image.nii.gz", tmp_path / "fine.nii.gz"))["label"][0].numpy()
    assert set(np.unique(aligned)) == {0, 3}, "nearest neighbour creates no new label values"
    assert abs(int((aligned == 3).sum()) - expected.sum()) <= expected.sum() * 0.35


def test_label_outside_the_image_world_is_an_error(tmp_path):
    nifti(tmp_path / "image.nii.gz", np.zeros((8, 8, 8), np.int16), np.eye(4))
    far = np.eye(4)
    far[:3, 3] = 500
    nifti(tmp_path / "label.nii.gz", np.ones((9, 8, 8), np.uint8), far)  # another grid: the one rule is overlap
    with pytest.raises(ValueError, match="label.nii.gz: the label has foreground but none of it lies inside"):
        AlignToImaged("label")(load(tmp_path / "image.nii.gz", tmp_path / "label.nii.gz"))


def test_a_label_with_the_image_voxels_but_another_placement_is_refused_naming_both(tmp_path):
    """A label saved from the image's array with an identity affine, a shifted origin or in SimpleITK's z, y, x
    order still overlaps the image: resampled through the affines it is a plausible label in the wrong place (Dice
    0.0-0.7 against the right one, and no word about it). The same voxels stored in another axis order or direction
    with an affine to match lie where the image does, and are aligned."""
    image_affine = np.array([[-0.8, 0, 0, 90.0], [0, -0.8, 0, 120.0], [0, 0, 2.5, -40.0], [0, 0, 0, 1]])
    heart = np.zeros((16, 14, 10), np.uint8)
    heart[4:10, 5:11, 3:7] = 1
    nifti(tmp_path / "image.nii.gz", np.zeros(heart.shape, np.int16), image_affine)
    shifted = image_affine.copy()
    shifted[:3, 3] += [0.0, 30.0, 0.0]
    wrong = {
        "identity.nii.gz": (heart, np.eye(4)),
        "shifted.nii.gz": (heart, shifted),
        "zyx.nii.gz": (heart.transpose(2, 1, 0).copy(), image_affine),
    }
    for name, (array, affine) in wrong.items():
        nifti(tmp_path / name, array, affine)
        with pytest.raises(DataError) as refused:
            AlignToImaged("label")(load(tmp_path / "image.nii.gz", tmp_path / name))
        message = str(refused.value)
        assert message.startswith(f"{tmp_path / name}: has the voxel counts of the image ({tmp_path / 'image.nii.gz'})")
        assert "its affine places it up to" in message and "mm away from it" in message, message
    # the same voxels transposed and flipped, with the affine that keeps them in place: aligned onto the image
    permute = np.zeros((4, 4))
    permute[2, 0] = permute[1, 1] = permute[0, 2] = permute[3, 3] = 1  # label index (k, j, i) -> image index (i, j, k)
    flip = np.eye(4)
    flip[1, 1], flip[1, 3] = -1, heart.shape[1] - 1
    stored = np.flip(heart.transpose(2, 1, 0), axis=1).copy()
    nifti(tmp_path / "kji.nii.gz", stored, image_affine @ permute @ flip)
    aligned = AlignToImaged("label")(load(tmp_path / "image.nii.gz", tmp_path / "kji.nii.gz"))["label"][0].numpy()
    np.testing.assert_array_equal(aligned, heart)


def test_label_values_map_and_unknown_values_are_named():
    label = MetaTensor(torch.tensor([[[0, 51, 7], [51, 0, 0]]]), meta={"filename_or_obj": "seg.nii.gz"})
    heart = MapLabelValues({51: 1}, strict=False)(label)
    assert heart.tolist() == [[[0, 1, 0], [1, 0, 0]]]
    with pytest.raises(ValueError, match=r"seg.nii.gz: label values \[7, 51\] are not among the classes"):
        MapLabelValues(num_classes=2)(label)
    empty = MapLabelValues(num_classes=2)(MetaTensor(torch.zeros(1, 3, 3)))
    assert int(empty.sum()) == 0, "an empty label is allowed"


# --- millimetre metrics, by hand


def single_voxel(shape, index, spacing):
    volume = torch.zeros(2, *shape)
    volume[1][index] = 1
    volume[0] = 1 - volume[1]
    return MetaTensor(volume, affine=torch.diag(torch.tensor([*spacing, 1.0], dtype=torch.float64)))


@pytest.mark.parametrize(
    "offset, spacing, distance",
    [
        ((0, 0, 1), (1.0, 1.0, 3.0), 3.0),
        ((2, 0, 0), (0.5, 2.0, 3.0), 1.0),
        ((1, 0, 1), (0.5, 2.0, 3.0), float(np.hypot(0.5, 3.0))),
        ((0, 1, 0), (0.7, 0.7, 5.0), 0.7),
    ],
)
def test_surface_distances_use_the_voxel_spacing(offset, spacing, distance):
    reference = single_voxel((8, 8, 8), (3, 3, 3), spacing)
    prediction = single_voxel((8, 8, 8), tuple(3 + o for o in offset), spacing)
    for metric in (HausdorffDistanceMM(include_background=False), AverageSurfaceDistanceMM(include_background=False)):
        metric([prediction], [reference])  # as the ignite handler calls it: decollated items, no spacing argument
        assert float(metric.aggregate()) == pytest.approx(distance, rel=1e-5), type(metric).__name__


def test_surface_distances_of_empty_masks_are_undefined_or_the_diagonal():
    spacing = (1.0, 2.0, 2.0)
    reference = single_voxel((6, 8, 4), (2, 2, 2), spacing)
    empty = reference.clone()
    empty[1] = 0
    empty[0] = 1
    diagonal = float(np.linalg.norm([6 * 1.0, 8 * 2.0, 4 * 2.0]))
    for metric_class in (HausdorffDistanceMM, AverageSurfaceDistanceMM):
        metric = metric_class(include_background=False)
        metric([reference, empty], [empty, reference])  # a false positive without reference; a missed structure
        values = metric.get_buffer()[:, 0]
        assert torch.isnan(values[0]), "undefined without a reference: left out of the mean"
        assert float(values[1]) == pytest.approx(diagonal), "a missed structure costs the largest distance"
        assert float(metric.aggregate()) == pytest.approx(diagonal)


def test_relative_volume_error_and_volume_in_millilitres():
    spacing = (0.5, 2.0, 3.0)
    reference = single_voxel((6, 6, 6), (2, 2, 2), spacing)
    prediction = reference.clone()
    prediction[1, 2, 2, 3] = 1
    prediction[0] = 1 - prediction[1]
    metric = RelativeVolumeError()
    metric([prediction], [reference])
    assert float(metric.aggregate()) == pytest.approx(1.0)  # 2 voxels predicted for 1
    assert float(prediction[1].sum()) * voxel_volume_ml(np.diag([*spacing, 1.0])) == pytest.approx(2 * 3.0 / 1000)
    empty = single_voxel((6, 6, 6), (2, 2, 2), spacing)
    empty[1] = 0
    metric.reset()
    metric([prediction], [empty])
    assert torch.isnan(metric.get_buffer()).all(), "undefined without a reference volume"


# --- phantom


def test_phantom_tissues_sit_at_their_hounsfield_units():
    phantom = synthesize_ct(3, contrast=True, voxel_scale=2.0, region="chest")
    heart = phantom.heart.astype(bool)
    assert 250 < phantom.heart_volume_ml < 1500
    assert phantom.hu.min() <= -900 and phantom.hu.max() >= 500, "air and bone present"
    lungs = (phantom.hu < -700).sum()
    assert lungs > heart.sum() * 0.5
    assert np.median(phantom.hu[heart]) > 100, "contrast-enhanced blood pool"
    plain = synthesize_ct(3, contrast=False, voxel_scale=2.0, region="chest")
    assert -20 < np.median(plain.hu[plain.heart.astype(bool)]) < 100, "non-contrast heart near soft tissue HU"
    abdomen = synthesize_ct(3, contrast=True, voxel_scale=2.0, region="abdomen")
    assert abdomen.heart_volume_ml < 0.2 * phantom.heart_volume_ml, "an abdominal field of view shows little heart"
    assert ((abdomen.hu > 80) & (abdomen.hu < 300)).mean() > 0.02, "enhancing organs (liver, spleen, kidneys)"


def test_phantom_dataset_writes_msd_and_dicom_in_one_world_space(tmp_path):
    write_msd_dataset(tmp_path, n_train=2, n_test=1, voxel_scale=3.0, progress=False)
    description = json.loads((tmp_path / "dataset.json").read_text())
    assert description["numTraining"] == 2 and description["labels"]["1"] == "heart"
    assert len(load_ct_datalist(tmp_path, "all")) == 2 and len(load_ct_datalist(tmp_path, "test")) == 1
    nifti_hu, nifti_affine, _ = read_volume(tmp_path / "imagesTs" / "ct_002.nii.gz")
    dicom_hu, dicom_affine, _ = read_volume(tmp_path / "dicom" / "ct_002")
    # the DICOM series may store the slices in the opposite order (same voxels, mirrored index, adjusted affine)
    shape = np.array(nifti_hu.shape)
    for axes in [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]:
        flip = np.eye(4)
        for axis in axes:
            flip[axis, axis], flip[axis, 3] = -1, shape[axis] - 1
        if np.allclose(nifti_affine @ flip, dicom_affine, atol=1e-3):
            np.testing.assert_array_equal(np.flip(nifti_hu, axes) if axes else nifti_hu, dicom_hu)
            break
    else:
        pytest.fail(f"the DICOM series is not the NIfTI volume's grid:\n{nifti_affine}\n{dicom_affine}")


# --- real data (skipped without ../shared)


def test_real_heart_mask_is_resampled_onto_the_chest_ct_grid():
    folder = shared_path("ct", "totalsegmentator", "pulmonary_report")
    data = load(folder / "ct_cropped.nii.gz", folder / "heart.nii.gz")
    assert tuple(data["label"].shape[1:]) == (233, 167, 191)
    aligned = AlignToImaged("label")(data)["label"]
    assert tuple(aligned.shape[1:]) == tuple(data["image"].shape[1:]) == (122, 102, 112)
    assert int((aligned > 0).sum()) == 198176, "all heart voxels lie inside the crop (same 1.5 mm lattice)"
