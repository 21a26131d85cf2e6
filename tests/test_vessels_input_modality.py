"""Images of another modality given to the vessels bundle: OCT B-scans and CT slices saved as PNG or TIFF are grey
images whose field of view looks plausible (the whole B-scan, the body in a CT slice), and vessels segmented in
them would look plausible too. They are refused naming the file; real fundus photographs, colour or red-free, whole
or cut inside the disc, are not."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from clinseg.datasets.ct.phantom import synthesize_ct
from clinseg.datasets.errors import DataError
from clinseg.datasets.readers import PhotoReader, ReadImaged
from clinseg.transforms.fundus import EstimateFOVd
from tests.conftest import shared_path
from tests.test_inference_outputs import error_line
from tests.test_write_errors import infer, inference_bundle, write_photos

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")  # our own, trusted configs
NOT_FUNDUS = "is a grey image that does not look like a red-free fundus photograph"


def estimate(path) -> dict:
    """The vessels bundle's reading of a photograph and the estimation of its field of view."""
    return EstimateFOVd("image")(ReadImaged("image", reader=PhotoReader(channels="rgb"))({"image": str(path)}))


def soft_tissue(hu: np.ndarray) -> np.ndarray:
    """A CT slice in Hounsfield units as a viewer exports it: window level 40, width 400, 8 bits."""
    return (np.clip((hu + 160) / 400, 0, 1) * 255).astype(np.uint8)


def assert_refused(path, why: str) -> None:
    with pytest.raises(DataError, match=NOT_FUNDUS) as raised:
        estimate(path)
    first_line = str(raised.value).splitlines()[0]
    assert raised.value.path == str(path) and first_line.startswith(str(path)) and why in first_line, first_line


def test_a_ct_slice_given_to_the_vessels_inference_is_refused_naming_it(tmp_path):
    """A CT slice saved as PNG was segmented as a fundus photograph: its field estimated as the whole image, and a
    vessel map written for it, with nothing to say it is not one."""
    inputs = write_photos(tmp_path / "inputs", n=1)
    phantom = synthesize_ct(0, contrast=True, voxel_scale=2.0, region="chest")
    Image.fromarray(np.rot90(soft_tissue(phantom.hu[:, :, phantom.hu.shape[2] // 2]))).save(inputs / "slice.png")
    result = infer(inference_bundle(tmp_path / "bundle"), inputs, tmp_path / "out")
    line = error_line(result)
    assert str(inputs / "slice.png") in line and NOT_FUNDUS in line, line
    assert "fundus photograph" in result.stderr.split(line, 1)[1], "the hint says how to go on for a real one"


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_real_oct_bscans_are_refused(tmp_path, suffix):
    """The NR206 B-scans were taken as frameless photographs: their whole image was the field."""
    for source in sorted(shared_path("oct", "NR206_sample").glob("*/NORMAL*.png")):
        if "labels" in source.parent.name:
            continue
        path = tmp_path / f"{source.parent.name}_{source.stem}{suffix}"
        Image.open(source).save(path)
        assert_refused(path, "the layers of an OCT B-scan")


@pytest.mark.parametrize(
    "name, why",
    [
        ("pulmonary_report/ct_cropped.nii.gz", "black"),  # cut to the heart: lungs inside the field
        ("aorta_report/ct_cropped.nii.gz", "black"),
        ("example_ct.nii.gz", "no circle"),  # a whole body against the air: a field, but no disc
    ],
)
def test_real_ct_slices_are_refused(tmp_path, name, why):
    """Axial slices of real CTs, soft-tissue window, as 8-bit PNG: each was given a plausible field (the whole
    slice, or the body outline) and segmented."""
    image = nib.as_closest_canonical(nib.load(shared_path("ct", "totalsegmentator", *name.split("/"))))
    volume = np.asarray(image.dataobj, dtype=np.float32)
    for fraction in (0.5, 0.7):
        path = tmp_path / f"{name.split('/')[0]}_{fraction}.png"
        Image.fromarray(np.rot90(soft_tissue(volume[:, :, int(fraction * volume.shape[2])]))).save(path)
        assert_refused(path, why)


def test_a_ct_slice_in_a_lung_window_is_refused(tmp_path):
    """Lungs grey and every soft tissue clipped white: no black and no disc to tell it by, but its clipped part."""
    image = nib.as_closest_canonical(
        nib.load(shared_path("ct", "totalsegmentator", "pulmonary_report", "ct_cropped.nii.gz"))
    )
    volume = np.asarray(image.dataobj, dtype=np.float32)
    hu = volume[:, :, volume.shape[2] // 2]
    Image.fromarray(np.rot90((np.clip((hu + 1350) / 1500, 0, 1) * 255).astype(np.uint8))).save(tmp_path / "lung.png")
    assert_refused(tmp_path / "lung.png", "clipped")


def test_real_red_free_photographs_are_not_refused(tmp_path):
    """Every DRIVE photograph and every CHASE_DB1 one (at the release's size) made red-free (the green channel;
    luminance), whole and cut inside the disc: none is refused. (A colour photograph is not checked.)"""
    drive = sorted(shared_path("vessels", "DRIVE", "training", "images").glob("*.tif"))
    chase = sorted(shared_path("vessels", "CHASEDB1_x3", "images").glob("*.jpg"))
    assert len(drive) == 20 and len(chase) == 14
    for source in drive + chase:
        photo = Image.open(source)
        if source in chase:
            photo.draft("RGB", (999, 960))  # JPEG decodes at half size at once
            photo = photo.convert("RGB").resize((999, 960), Image.Resampling.BOX)
        colour = np.asarray(photo.convert("RGB"))
        rows, cols = colour.shape[:2]
        versions = {
            "green": colour[..., 1],
            "luminance": np.asarray(photo.convert("L")),
            "crop": colour[rows // 4 : 3 * rows // 4, cols // 4 : 3 * cols // 4, 1],  # inside the disc: no frame
        }
        for version, pixels in versions.items():
            path = tmp_path / f"{source.stem}_{version}.png"
            Image.fromarray(np.ascontiguousarray(pixels)).save(path)
            fov = np.asarray(estimate(path)["fov"][0]) > 0
            assert fov.all() if version == "crop" else 0.6 < fov.mean() < 0.75, (path.name, fov.mean())


def test_a_dicom_oct_bscan_is_refused_by_its_modality_even_with_a_mask(tmp_path):
    """A DICOM Ophthalmic Tomography B-scan says what it is: refused as a fundus photograph by its modality, with or
    without a field-of-view mask (a mask skips the estimate and its look at the image)."""
    from clinseg.datasets.oct import synthesize_bscan
    from tests.test_dicom_photographs import OPHTHALMIC_TOMOGRAPHY, write_dicom

    bscan, _ = synthesize_bscan(np.random.default_rng(0))
    write_dicom(tmp_path / "bscan.dcm", bscan, modality="OPT", sop_class=OPHTHALMIC_TOMOGRAPHY)
    read = ReadImaged("image", reader=PhotoReader(channels="rgb"))({"image": str(tmp_path / "bscan.dcm")})
    for item in (read, {**read, "fov": np.ones((1, *bscan.shape), np.uint8)}):
        with pytest.raises(DataError, match="modality OPT") as raised:
            EstimateFOVd("image")(item)
        assert raised.value.path == str(tmp_path / "bscan.dcm") and "\n" not in str(raised.value)
    assert "fov" not in EstimateFOVd("image", estimate=False)(read), "a task of other images does not check"
