"""Images of another modality given to the vessels bundle: OCT B-scans and CT slices saved as PNG or TIFF are grey
images whose field of view looks plausible (the whole B-scan, the body in a CT slice), and vessels segmented in
them would look plausible too. They are refused naming the file; real fundus photographs, colour or red-free, whole
or cut inside the disc, are not."""

from __future__ import annotations

import functools
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

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


@functools.cache  # read once for the three tests that use them; none writes into them
def real_photographs() -> list[np.ndarray]:
    """Every DRIVE photograph and every CHASE_DB1 one (at the release's size), as ``(H, W, 3)`` uint8."""
    drive = sorted(shared_path("vessels", "DRIVE", "training", "images").glob("*.tif"))
    chase = sorted(shared_path("vessels", "CHASEDB1_x3", "images").glob("*.jpg"))
    assert len(drive) == 20 and len(chase) == 14
    photographs = []
    for source in drive + chase:
        photo = Image.open(source)
        if source in chase:
            photo.draft("RGB", (999, 960))  # JPEG decodes at half size at once
            photo = photo.convert("RGB").resize((999, 960), Image.Resampling.BOX)
        photographs.append(np.asarray(photo.convert("RGB")))
    return photographs


def test_real_photographs_are_not_refused_whole_downsized_or_cut(tmp_path):
    """Every DRIVE and CHASE_DB1 photograph, in colour and made red-free (the green channel; luminance for the
    whole one), whole, downsized to 0.3 of DRIVE's size, cut inside the disc, cut off centre (a corner of the
    camera's frame left in: its edge once read as a B-scan's layers) and cut around the optic disc (the brightest
    thin structures): none is refused."""
    for index, colour in enumerate(real_photographs()):
        rows, cols = colour.shape[:2]
        small = round(170 * rows / cols), 170
        bright = np.unravel_index(np.argmax(ndimage.uniform_filter(colour[..., 1].astype(float), 31)), (rows, cols))
        side = int(0.35 * rows)
        top, left = (int(np.clip(c - side // 2, 0, n - side)) for c, n in zip(bright, (rows, cols), strict=True))
        versions = {
            "whole": colour,
            "luminance": np.asarray(Image.fromarray(colour).convert("L")),
            "downsized": np.asarray(Image.fromarray(colour).resize(small[::-1], Image.Resampling.LANCZOS)),
            "crop": colour[rows // 4 : 3 * rows // 4, cols // 4 : 3 * cols // 4],  # inside the disc: no frame
            "off_centre": colour[rows // 8 : rows // 8 + 45 * rows // 100, cols // 8 : cols // 8 + 45 * cols // 100],
            "optic_disc": colour[top : top + side, left : left + side],
        }
        for version, pixels in versions.items():
            for channels, array in (("colour", pixels), ("green", pixels[..., 1] if pixels.ndim == 3 else pixels)):
                path = tmp_path / f"{index}_{version}_{channels}.png"
                Image.fromarray(np.ascontiguousarray(array)).save(path)
                fov = np.asarray(estimate(path)["fov"][0]) > 0
                framed = version in ("whole", "luminance", "downsized")
                assert 0.6 < fov.mean() < 0.75 if framed else fov.mean() > 0.5, (path.name, fov.mean())


def test_an_angiogram_or_a_negative_is_refused(tmp_path):
    """A fluorescein angiogram shows vessels brighter than the retina, a negative too: the model, which learnt dark
    vessels, segmented DRIVE's negatives with F1 0.05 to 0.10 in a sparse map that looked like an answer (exit 0).
    Each real photograph's negative inside its field (the frame kept dark, as an angiogram's), grey and in colour,
    is refused naming the file; the photograph itself is not."""
    for index, colour in enumerate(real_photographs()[::3]):
        field = np.asarray(estimate(_saved(tmp_path / f"{index}.png", colour))["fov"][0]) > 0
        negatives = {
            "grey": np.where(field, 255 - colour[..., 1], 0),
            "colour": np.where(field[..., None], 255 - colour, 0),
        }
        for kind, negative in negatives.items():
            path = _saved(tmp_path / f"{index}_negative_{kind}.png", negative.astype(np.uint8))
            with pytest.raises(DataError, match="brighter than their surroundings") as raised:
                estimate(path)
            assert raised.value.path == str(path) and "angiogram or a negative" in str(raised.value).splitlines()[0]


def test_an_image_that_shows_no_vessels_is_refused_and_a_blurred_photograph_is_not(tmp_path):
    """A smooth image in fundus colours, framed by a camera's dark disc or not, got a field and a vessel map of
    0.04 % of it (exit 0). Refused as showing no vessels; a real photograph blurred by a Gaussian of 2 pixels still
    shows its large vessels and passes."""
    rows, cols = np.mgrid[0:584, 0:565] / 584.0
    smooth = np.stack([150 + 60 * rows, 70 + 50 * cols, 30 + 20 * rows * cols], axis=-1)
    framed = np.where((np.hypot(rows - 0.5, cols - 0.48) < 0.46)[..., None], smooth, 2.0)
    for name, pixels in (("smooth", smooth), ("framed", framed)):
        path = _saved(tmp_path / f"{name}.png", pixels.astype(np.uint8))
        with pytest.raises(DataError, match="it shows no vessels") as raised:
            estimate(path)
        assert raised.value.path == str(path)
    for index, colour in enumerate(real_photographs()[::5]):
        blurred = ndimage.gaussian_filter(
            colour.astype(np.float32), (2 * colour.shape[1] / 565, 2 * colour.shape[1] / 565, 0)
        )
        fov = np.asarray(estimate(_saved(tmp_path / f"{index}_blurred.png", blurred.astype(np.uint8)))["fov"][0]) > 0
        assert 0.6 < fov.mean() < 0.75, (index, fov.mean())


@pytest.mark.parametrize(
    "name", ["astronaut.png", "chelsea.png", "coffee.png", "ihc.png", "rocket.jpg", "motorcycle_left.png"]
)
def test_an_everyday_colour_photograph_is_refused(tmp_path, name):
    """Colour images were not judged: a photograph of a person, a cat, a cup, a stained slide or a rocket (real
    photographs shipped with scikit-image) was taken as a fundus cut inside its disc and given a vessel map. Without
    a camera's frame, a colour image must have a fundus's smooth red channel."""
    import skimage

    path = _saved(
        tmp_path / name.replace(".jpg", ".png"),
        np.asarray(Image.open(Path(skimage.__file__).parent / "data" / name).convert("RGB")),
    )
    with pytest.raises(DataError, match="is a colour image that does not look like a fundus photograph") as raised:
        estimate(path)
    assert raised.value.path == str(path) and "red channel is as detailed" in str(raised.value)


def test_a_fundus_photograph_of_another_camera_is_not_refused(tmp_path):
    """scikit-image's fundus photograph (another camera, 1411 x 1411, JPEG), whole and cut inside its disc."""
    import skimage

    colour = np.asarray(Image.open(Path(skimage.__file__).parent / "data" / "retina.jpg").convert("RGB"))
    for name, pixels in (("whole", colour), ("cut", colour[400:1000, 400:1000])):
        fov = np.asarray(estimate(_saved(tmp_path / f"{name}.png", pixels))["fov"][0]) > 0
        assert 0.6 < fov.mean() < 0.85 if name == "whole" else fov.all(), (name, fov.mean())


def _saved(path: Path, pixels: np.ndarray) -> Path:
    Image.fromarray(np.ascontiguousarray(pixels)).save(path)
    return path


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
