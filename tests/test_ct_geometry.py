"""Where the ct_heart bundle's masks lie in physical space, on real files: NIfTI written by nibabel in every
orientation, with oblique, sheared and anisotropic grids and in other spatial units, and DICOM series written by the
project's writer in other slice orders and planes. The bundle's own inference config runs in-process with a network
that segments a bright object, so the written mask must land on that object's voxels with the input's affine, and its
volume must be the object's."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor

from clinseg.datasets.ct import read_volume
from clinseg.datasets.ct.dicom import read_ct_series, write_ct_series
from clinseg.datasets.ct.volumes import LPS_TO_RAS
from clinseg.datasets.errors import DataError
from clinseg.pipelines.engine.writers import SaveVolumeSegmentationd
from tests.conftest import REPO_ROOT

SHAPE = (40, 36, 30)
OBJECT = (slice(5, 20), slice(8, 22), slice(10, 24))  # 15 x 14 x 14 voxels at 3000 HU
BRIGHT_HU = 3000


class BrightObjectNet(torch.nn.Module):
    """Class 1 where the windowed image is at its top: the bright object, whatever the grid."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        foreground = (x[:, :1] - 0.98) * 200.0
        return torch.cat([-foreground, foreground], dim=1)


def phantom() -> tuple[np.ndarray, np.ndarray]:
    """Air, a soft-tissue block (so the volume is in HU) and the bright object; and the object's mask."""
    hu = np.full(SHAPE, -1000, np.int16)
    hu[25:35, 5:30, 3:27] = 40
    hu[OBJECT] = BRIGHT_HU
    return hu, (hu == BRIGHT_HU).astype(np.uint8)


def reindexed(array: np.ndarray, affine: np.ndarray, perm=(0, 1, 2), flips=()) -> tuple[np.ndarray, np.ndarray]:
    """``array`` with its axes permuted then flipped, and the affine that keeps every voxel where it was in space."""
    out = np.transpose(array, perm)
    to_old = np.zeros((4, 4))
    to_old[3, 3] = 1
    for new, old in enumerate(perm):
        to_old[old, new] = 1
    flip = np.eye(4)
    for axis in flips:
        out = np.flip(out, axis)
        flip[axis, axis], flip[axis, 3] = -1, out.shape[axis] - 1
    return np.ascontiguousarray(out), affine @ to_old @ flip


def rotated(degrees: float, axis: int) -> np.ndarray:
    a, b = [x for x in range(3) if x != axis]
    turn, (c, s) = np.eye(4), (np.cos(np.radians(degrees)), np.sin(np.radians(degrees)))
    turn[a, a], turn[a, b], turn[b, a], turn[b, b] = c, -s, s, c
    return turn


def save_nifti(path: Path, array: np.ndarray, affine: np.ndarray, forms: str = "both", units: str = "mm") -> Path:
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units(xyz=units)
    image.set_qform(affine if forms in ("both", "qform") else None, code=1 if forms in ("both", "qform") else 0)
    image.set_sform(affine if forms in ("both", "sform") else None, code=1 if forms in ("both", "sform") else 0)
    nib.save(image, path)
    return path


def infer(input_path: Path, output_dir: Path) -> None:
    """The bundle's inference.json, in-process, with the bright-object network and no checkpoint."""
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundles" / "ct_heart" / "configs" / "inference.json"))
    parser.update(
        {
            "bundle_root": str(REPO_ROOT / "bundles" / "ct_heart"),
            "input_path": str(input_path),
            "output_dir": str(output_dir),
            "network": BrightObjectNet(),
            "handlers": [],
            "anatomy_constraints": False,
            "patch_size": [32, 32, 32],
            "device": "$torch.device('cpu')",
            "amp": False,
            "inferring": ["$@evaluator.run()", "$@results_writer.write_summary(@datalist, 'masks')"],
        }
    )
    parser.get_parsed_content("inferring")


LPS_2MM = np.diag([-2.0, -2.0, 2.0, 1.0])
LPS_2MM[:3, 3] = (60.0, 150.0, -300.0)
TILTED = np.array([[1, 0, 0, 0], [0, 1, np.tan(np.radians(15)), 0], [0, 0, 1, 0], [0, 0, 0, 1]])  # j moves with k
NIFTI_CASES = {  # name: (axis permutation, flipped axes, affine before reindexing, forms, units)
    "lps": ((0, 1, 2), (), LPS_2MM, "sform", "mm"),
    "ras": ((0, 1, 2), (0, 1), LPS_2MM, "both", "mm"),
    "las_qform_only": ((0, 1, 2), (1,), LPS_2MM, "qform", "mm"),
    "permuted_and_flipped": ((2, 0, 1), (0,), LPS_2MM, "both", "mm"),
    "oblique": ((0, 1, 2), (), rotated(20, 0) @ rotated(15, 2) @ LPS_2MM, "both", "mm"),
    "anisotropic": ((0, 1, 2), (), LPS_2MM @ np.diag([0.6, 0.8, 2.5, 1.0]), "both", "mm"),
    "sheared": ((0, 1, 2), (), LPS_2MM @ TILTED, "sform", "mm"),
    "in_metres": ((0, 1, 2), (), np.diag([0.001, 0.001, 0.001, 1.0]) @ LPS_2MM, "both", "meter"),
}


@pytest.mark.parametrize("case", list(NIFTI_CASES))
def test_a_nifti_mask_lands_on_the_object_with_the_input_affine_and_its_volume(case, tmp_path):
    perm, flips, affine, forms, units = NIFTI_CASES[case]
    hu, truth = phantom()
    hu, file_affine = reindexed(hu, affine, perm, flips)
    truth, _ = reindexed(truth, affine, perm, flips)
    (tmp_path / "in").mkdir()
    save_nifti(tmp_path / "in" / "ct.nii.gz", hu, file_affine, forms, units)
    infer(tmp_path / "in", tmp_path / "out")

    mask_image = nib.load(tmp_path / "out" / "ct_seg.nii.gz")
    mask = np.asarray(mask_image.dataobj)
    in_mm = file_affine * np.array([[1000.0 if units == "meter" else 1.0]] * 3 + [[1.0]])
    np.testing.assert_allclose(mask_image.affine, in_mm, atol=1e-3)
    voxel_ml = abs(np.linalg.det(in_mm[:3, :3])) / 1000
    summary = json.loads((tmp_path / "out" / "ct.json").read_text())
    reported = summary["volume_ml"]["heart"] or summary["segmented_volume_ml"]["heart"]
    if case in ("anisotropic", "sheared"):  # resampled to 2 mm and back: the object's edges move by up to a voxel
        assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.85
        assert reported == pytest.approx(truth.sum() * voxel_ml, rel=0.25)
    else:  # a 2 mm grid in any orientation is the network's grid: voxel for voxel
        np.testing.assert_array_equal(mask, truth)
        assert reported == pytest.approx(truth.sum() * voxel_ml, rel=1e-3)
    assert summary["spacing_mm"] == pytest.approx(np.linalg.norm(in_mm[:3, :3], axis=0), abs=1e-3)


DICOM_CASES = {  # name: (axis permutation, flipped axes): the slices' plane and order
    "axial_ascending": ((0, 1, 2), ()),
    "axial_descending": ((0, 1, 2), (2,)),
    "feet_first": ((0, 1, 2), (0, 2)),
    "sagittal": ((1, 2, 0), (1,)),
    "coronal": ((0, 2, 1), (1,)),
}


@pytest.mark.parametrize("case", list(DICOM_CASES))
def test_a_dicom_mask_lands_on_the_object_in_patient_space(case, tmp_path):
    perm, flips = DICOM_CASES[case]
    hu, truth = phantom()
    hu, affine = reindexed(hu, LPS_2MM, perm, flips)
    truth, _ = reindexed(truth, LPS_2MM, perm, flips)
    write_ct_series(hu, LPS_TO_RAS @ affine, tmp_path / "in" / "series", file_names="shuffled")
    infer(tmp_path / "in", tmp_path / "out")

    mask_image = nib.load(tmp_path / "out" / "series_seg.nii.gz")
    mask = np.asarray(mask_image.dataobj)
    # the truth, carried voxel by voxel onto the grid the series reader built (slices sorted along their normal)
    to_truth = np.rint(np.linalg.inv(affine) @ mask_image.affine).astype(int)
    indices = np.indices(mask.shape).reshape(3, -1)
    expected = truth[tuple((to_truth[:3, :3] @ indices) + to_truth[:3, 3:])].reshape(mask.shape)
    np.testing.assert_array_equal(mask, expected)
    summary = json.loads((tmp_path / "out" / "series.json").read_text())
    reported = summary["volume_ml"]["heart"] or summary["segmented_volume_ml"]["heart"]
    assert reported == pytest.approx(truth.sum() * 8 / 1000, rel=1e-3)


# --- the spatial units of a NIfTI header


@pytest.mark.parametrize("units, scale", [("meter", 0.001), ("micron", 1000.0)])
def test_nifti_coordinates_in_metres_or_micrometres_are_read_in_millimetres(units, scale, tmp_path):
    hu, _ = phantom()
    affine_mm = np.diag([0.8, 0.8, 2.5, 1.0])
    affine_mm[:3, 3] = (-120.0, 40.0, 300.0)
    path = save_nifti(tmp_path / "ct.nii.gz", hu, np.diag([scale, scale, scale, 1.0]) @ affine_mm, units=units)
    _, affine, _ = read_volume(path)
    np.testing.assert_allclose(affine, affine_mm, rtol=1e-5, atol=1e-3)
    itk = sitk.ReadImage(str(path))  # ITK (3D Slicer, ITK-SNAP) reads the header's units the same way
    np.testing.assert_allclose(itk.GetSpacing(), (0.8, 0.8, 2.5), rtol=1e-5)
    np.testing.assert_allclose(LPS_TO_RAS[:3, :3] @ itk.GetOrigin(), affine_mm[:3, 3], atol=1e-3)


@pytest.mark.parametrize("scale, size", [(0.001, "0.0008 x 0.0008 x 0.0025 mm"), (1000.0, "800 x 800 x 2500 mm")])
def test_a_voxel_size_no_ct_has_is_refused_naming_the_file(scale, size, tmp_path):
    """Metres or micrometres written as millimetres (or with no unit): volumes a billion times off, or a grid whose
    resampling takes all memory."""
    hu, _ = phantom()
    path = save_nifti(tmp_path / "ct.nii.gz", hu, np.diag([0.8 * scale, 0.8 * scale, 2.5 * scale, 1.0]))
    with pytest.raises(DataError, match=f"has voxels of {size}") as error:
        read_volume(path)
    assert error.value.path == str(path) and str(error.value).startswith(str(path))
    _, affine, meta = read_volume(path, assume_spacing=[0.8, 0.8, 2.5])  # the user's word is the way out
    np.testing.assert_allclose(np.diag(affine)[:3], (0.8, 0.8, 2.5))
    assert meta["geometry_assumed"].startswith("spacing 0.8 x 0.8 x 2.5 mm")


# --- the written mask's two coordinate systems


def write_mask(tmp_path: Path, affine: np.ndarray) -> nib.Nifti1Image:
    hu, truth = phantom()
    writer = SaveVolumeSegmentationd("pred", tmp_path / "out", ["background", "heart"])
    image = MetaTensor(torch.as_tensor(hu[None], dtype=torch.float32), affine=torch.as_tensor(affine))
    pred = MetaTensor(torch.as_tensor(truth[None]), affine=torch.as_tensor(affine))
    writer({"pred": pred, "image": image, "id": "case", "source": "case.nii.gz"})
    return nib.load(tmp_path / "out" / "case_seg.nii.gz")


def test_a_mask_on_a_sheared_grid_has_no_qform_that_would_place_it_elsewhere(tmp_path):
    """A qform cannot hold a shear (a gantry tilt kept in the affine): the nearest rotation nibabel would write puts
    the far voxels 14 mm from the input's in every tool that reads the qform."""
    sheared = LPS_2MM @ TILTED
    mask = write_mask(tmp_path, sheared)
    np.testing.assert_allclose(mask.get_sform(), sheared, atol=1e-4)
    assert int(mask.header["sform_code"]) == 1 and int(mask.header["qform_code"]) == 0
    assert mask.header.get_xyzt_units()[0] == "mm"
    with pytest.raises(RuntimeError, match="orthonormal"):  # ITK refuses it as it refuses the sheared input
        sitk.ReadImage(str(tmp_path / "out" / "case_seg.nii.gz"))


def test_a_mask_on_an_oblique_grid_keeps_its_qform_where_itk_reads_it(tmp_path):
    oblique = rotated(25, 0) @ rotated(-10, 1) @ LPS_2MM @ np.diag([0.7, 0.9, 2.5, 1.0])
    mask = write_mask(tmp_path, oblique)
    assert int(mask.header["sform_code"]) == 1 and int(mask.header["qform_code"]) == 1
    np.testing.assert_allclose(mask.get_qform(), oblique, atol=1e-4)
    itk = sitk.ReadImage(str(tmp_path / "out" / "case_seg.nii.gz"))
    itk_affine = np.eye(4)
    itk_affine[:3, :3] = np.reshape(itk.GetDirection(), (3, 3)) * np.asarray(itk.GetSpacing())
    itk_affine[:3, 3] = itk.GetOrigin()
    np.testing.assert_allclose(LPS_TO_RAS @ itk_affine, oblique, atol=1e-3)


# --- DICOM series that share a folder


def test_two_anonymised_reconstructions_in_one_folder_are_two_series(tmp_path):
    """Empty UIDs, no study UID, the same series number and field of view, slices offset by half a step: taken as one
    series, the two kernels would interleave into one evenly spaced volume of twice the slices."""
    hu, _ = phantom()
    soft = np.diag([-2.0, -2.0, 2.0, 1.0])
    lung = soft.copy()
    lung[2, 3] += 1.0
    common = {"anonymise_uids": True, "series_number": 1}
    files = write_ct_series(hu, LPS_TO_RAS @ soft, tmp_path, series_description="CT Body 3.0", **common)
    files += write_ct_series(
        hu, LPS_TO_RAS @ lung, tmp_path, series_description="CT Lung 1.0", file_names="index", **common
    )
    for path in files:  # one scan, its study UID emptied too (as in the real anonymised series of the shared data)
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.FrameOfReferenceUID = "", "1.2.3.4"
        ds.save_as(path)
    with pytest.raises(DataError, match="holds 2 series") as error:
        read_ct_series(tmp_path)
    assert "'CT Body 3.0'" in str(error.value) and "'CT Lung 1.0'" in str(error.value)
    volume = read_ct_series(tmp_path, series_description="lung")
    assert volume.hu.shape == SHAPE and volume.spacing == pytest.approx((2.0, 2.0, 2.0))
    assert volume.affine_lps[2, 3] == pytest.approx(1.0)


# --- DICOM series whose slices cannot be one evenly spaced volume


def restacked(folder: Path, positions: np.ndarray, n_slices: int) -> list[Path]:
    """A small CT series whose slices lie at ``positions`` (mm along z) instead of the writer's even steps."""
    hu = np.full((6, 5, n_slices), -1000, np.int16)
    hu[1:4, 1:4] = 40
    files = write_ct_series(hu, np.diag([0.8, 0.8, 1.0, 1.0]), folder, file_names="index")
    for path, z in zip(files, positions, strict=True):
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [0.0, 0.0, pydicom.valuerep.DSfloat(float(z), auto_format=True)]
        ds.save_as(path)
    return files


def test_slice_steps_that_drift_within_the_step_tolerance_are_refused_naming_the_worst_slice(tmp_path):
    """Every step is within 1 % of the median (1.000 mm, then 1.0098 mm), yet an evenly spaced volume of the mean step
    puts the middle slice 0.29 mm (0.29 slices) from where it was acquired; over 600 slices, 1.5 mm."""
    n = 120
    steps = np.where(np.arange(n - 1) < n // 2, 1.0, 1.0098)
    restacked(tmp_path / "drift", np.concatenate([[0.0], np.cumsum(steps)]), n)
    with pytest.raises(DataError) as error:
        read_volume(tmp_path / "drift")
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'drift'}: uneven slice positions: slice 61 of 120 (slice_0060.dcm, ")
    assert "lies 0.29 mm from where an evenly spaced volume" in message

    # positions rounded as scanners print them (0.005 mm either way) are one even grid
    jitter = np.random.default_rng(0).uniform(-0.005, 0.005, n)
    restacked(tmp_path / "rounded", np.arange(n) * 1.0 + jitter, n)
    hu, affine, _ = read_volume(tmp_path / "rounded")
    assert hu.shape == (6, 5, n) and affine[2, 2] == pytest.approx(1.0, abs=1e-4)


def test_two_reconstructions_with_one_series_uid_are_refused_by_their_slice_thickness(tmp_path):
    """A 1 mm and a 3 mm reconstruction exported with one SeriesInstanceUID, their positions offset by half a step:
    every position check passes, and the volume alternates between the two every slice."""
    hu, _ = phantom()
    uid = pydicom.uid.generate_uid()
    offset = np.diag([-2.0, -2.0, 2.0, 1.0])
    offset[2, 3] = 1.0
    thin = write_ct_series(hu, np.diag([-2.0, -2.0, 2.0, 1.0]), tmp_path, series_uid=uid, file_names="index")
    thick = write_ct_series(hu, offset, tmp_path, series_uid=uid)
    for paths, thickness in ((thin, 1.0), (thick, 3.0)):
        for path in paths:
            ds = pydicom.dcmread(path)
            ds.SliceThickness = thickness
            ds.save_as(path)
    with pytest.raises(DataError) as error:
        read_volume(tmp_path)
    message = str(error.value)
    assert "mixed series: SliceThickness is " in message and "\n" not in message
    assert message.split(":")[0] in {str(p) for p in thin + thick}


def test_compressed_slices_without_a_decoder_are_refused_in_one_line_naming_the_file(tmp_path, monkeypatch):
    """JPEG 2000 (as the real anonymised series of the shared data is stored) read where no decoder plugin is
    installed: pydicom lists the plugins it lacks on lines of their own."""
    from pydicom.pixels.decoders import JPEG2000LosslessDecoder

    hu, _ = phantom()
    files = write_ct_series(hu, LPS_2MM, tmp_path, transfer_syntax=pydicom.uid.JPEG2000Lossless, file_names="index")
    monkeypatch.setattr(JPEG2000LosslessDecoder, "_available", {})
    monkeypatch.setattr(
        JPEG2000LosslessDecoder,
        "_unavailable",
        {"gdcm": ("gdcm>=3.0.10",), "pylibjpeg": ("pylibjpeg>=2.0", "pylibjpeg-openjpeg>=2.0")},
    )
    with pytest.raises(DataError) as error:
        read_volume(tmp_path)
    problem, hint = str(error.value).split("\n")
    assert problem.startswith(f"{files[0]}: pixel data cannot be decoded (transfer syntax JPEG 2000")
    assert "pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0" in problem
    assert hint.startswith("Compressed pixel data needs a decoder plugin")


@pytest.mark.parametrize("own_series", [False, True], ids=["same-series-uid", "own-series-uid"])
def test_a_localizer_beside_the_slices_is_left_out(tmp_path, own_series):
    """A scanner export puts the coronal scout (ImageType LOCALIZER) beside the axial slices, under their series UID or
    its own: it is not part of the volume, and it made the folder a mixed series or two series."""
    hu, _ = phantom()
    files = write_ct_series(hu, LPS_2MM, tmp_path, file_names="index")
    scout = pydicom.dcmread(files[0])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    scout.SOPInstanceUID = pydicom.uid.generate_uid()
    if own_series:
        scout.SeriesInstanceUID = pydicom.uid.generate_uid()
    scout.save_as(tmp_path / "scout.dcm")
    read, affine, _ = read_volume(tmp_path)
    np.testing.assert_array_equal(read, hu)
    np.testing.assert_allclose(affine, LPS_TO_RAS @ LPS_2MM)

    for path in files:
        path.unlink()
    with pytest.raises(DataError, match="holds only localizer"):
        read_volume(tmp_path)
