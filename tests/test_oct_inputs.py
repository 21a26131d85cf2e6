"""OCT B-scans as scanners and viewers export them, through the oct_layers bundle's own inference preprocessing:
display scale in 8 bits, 16 bits and floats, linear intensity, padding bands, scanner sizes, stacks stored as colour
planes, colour images and photographs, DICOM B-scans with their own pixel spacing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from monai.transforms import Compose
from PIL import Image
from pydicom.dataset import Dataset

from clinseg.datasets.errors import DataError
from clinseg.datasets.oct import RequireBScand, load_oct_images, synthesize_bscan
from clinseg.datasets.readers import PhotoReader
from clinseg.pipelines.cli import find_input_error
from tests.test_dicom_photographs import OPHTHALMIC_TOMOGRAPHY, write_dicom
from tests.test_oct_readers import inference_preprocessing


@pytest.fixture(scope="module")
def bscan():
    """A phantom B-scan on the display scale, 8 bits, 256 x 384 (rows x cols)."""
    image, _ = synthesize_bscan(np.random.default_rng(11))
    return image


@pytest.fixture(scope="module")
def preprocessing():
    return inference_preprocessing()


def refusal(preprocessing, path) -> DataError:
    """The input error the preprocessing raises for the one image at ``path`` (listed as inference lists it)."""
    (item,) = load_oct_images(path)
    with pytest.raises(Exception) as error:
        preprocessing(item)
    found = find_input_error(error.value)
    assert isinstance(found, DataError) and found.path == str(path) and "\n" not in str(found)
    return found


def test_display_scale_bscans_pass_in_every_depth_and_scanner_size(tmp_path, bscan, preprocessing):
    display = bscan.astype(np.float32) / 255
    tifffile.imwrite(tmp_path / "float.tif", display)
    tifffile.imwrite(tmp_path / "sixteen.tif", bscan.astype(np.uint16) * 257)
    Image.fromarray(np.repeat(bscan[..., None], 3, axis=-1)).save(tmp_path / "screenshot.png")
    # Spectralis-like 496 x 768 and Cirrus-like 1024 x 512, and uniform bands of a few rows
    Image.fromarray(bscan).resize((768, 496), Image.BILINEAR).save(tmp_path / "spectralis.png")
    Image.fromarray(bscan).resize((512, 1024), Image.BILINEAR).save(tmp_path / "cirrus.png")
    Image.fromarray(np.pad(bscan, ((20, 20), (0, 0)))).save(tmp_path / "banded.png")
    Image.fromarray(np.pad(bscan, ((0, 0), (80, 80)))).save(tmp_path / "side_bands.png")
    for item in load_oct_images(tmp_path):
        assert tuple(preprocessing(item)["image"].shape) == (1, 256, 384), item["id"]


@pytest.mark.parametrize(
    "linear",
    [
        pytest.param(lambda display: display**4, id="fourth power"),  # Heidelberg's raw values
        pytest.param(lambda display: 10 ** (4 * display), id="40 dB"),
    ],
)
def test_a_linear_intensity_bscan_is_refused_naming_it(tmp_path, bscan, preprocessing, linear):
    # the model answers a linear 40 dB B-scan with 1.8 px of NFL and no other layer, its order check passing
    tifffile.imwrite(tmp_path / "raw.tif", linear(bscan.astype(np.float32) / 255).astype(np.float32))
    found = refusal(preprocessing, tmp_path / "raw.tif")
    assert "looks like linear intensity" in str(found) and "display (log) scale" in str(found)


def test_tall_padding_bands_are_cut_off_and_refused_when_framing_is_off(tmp_path, bscan, preprocessing):
    # padded by 60 rows above and below, the phantom model's Dice falls from 0.93 to 0.78 and its OPL from 6.3 px
    # to 2.8 px, every layer in order: its JSON would look fine. Inference frames the B-scan (FrameRetinad): the
    # network sees its rows between the bands, and the prediction comes back onto every row (the bands background)
    Image.fromarray(np.pad(bscan, ((60, 60), (0, 0)))).save(tmp_path / "padded.png")
    white = np.full((384, 384), 255, np.uint8)  # padded to a square page in white
    white[64:-64] = bscan
    Image.fromarray(white).save(tmp_path / "square.png")
    Image.fromarray(bscan).save(tmp_path / "plain.png")
    (plain,) = load_oct_images(tmp_path / "plain.png")
    for name, first in (("padded", 60), ("square", 64)):
        (item,) = load_oct_images(tmp_path / f"{name}.png")
        framed = preprocessing(item)["image"]
        assert framed.meta["retina_frame"] == {"first_row": first, "rows": 256, "of_rows": 256 + 2 * first}
        # the network sees the B-scan alone, scaled by its own intensities as the unpadded B-scan is
        np.testing.assert_allclose(framed, preprocessing(plain)["image"], atol=1e-5)
    # with the framing off, the bands are refused as before, naming their rows
    unframed = inference_preprocessing(frame_retina=False)
    found = refusal(unframed, tmp_path / "padded.png")
    assert "uniform bands over 120 of its 376 rows (60 at the top, 60 at the bottom" in str(found)
    assert "128 of its 384 rows" in str(refusal(unframed, tmp_path / "square.png"))
    # bands that leave too few rows of scan between them: a blank or failed export, refused naming it
    sliver = np.zeros((256, 384), np.uint8)
    sliver[120:140] = bscan[120:140]
    Image.fromarray(sliver).save(tmp_path / "sliver.png")
    assert "holds 20 rows of scan between uniform bands (120 rows at the top, 116" in str(
        refusal(preprocessing, tmp_path / "sliver.png")
    )


@pytest.mark.parametrize("scans", [3, 4])
def test_a_stack_of_bscans_in_the_colour_planes_of_one_tiff_is_refused(tmp_path, bscan, scans):
    # tifffile stores a (3 | 4, rows, cols) array as the separate planes of one RGB page by default: read as one grey
    # B-scan, three B-scans were blended into their luminance (and a fourth acted as opacity)
    stack = np.stack([np.roll(bscan, 7 * k, axis=1) for k in range(scans)])
    with pytest.warns(DeprecationWarning):  # tifffile's own: such data will be stored as pages in the future
        tifffile.imwrite(tmp_path / "volume.tif", stack)
    (item,) = load_oct_images(tmp_path / "volume.tif")
    with pytest.raises(DataError, match=f"stores {scans} different images in the separate planes") as error:
        PhotoReader("grey").decode(Path(item["image"]))
    assert str(error.value).startswith(f"{tmp_path / 'volume.tif'}: ") and "\n" not in str(error.value)
    # a grey B-scan stored in equal colour planes is that B-scan; a colour image in planes keeps its colours
    tifffile.imwrite(tmp_path / "grey.tif", np.stack([bscan] * 3), photometric="rgb", planarconfig="separate")
    np.testing.assert_allclose(PhotoReader("grey").decode(tmp_path / "grey.tif")[0][0], bscan, atol=1e-3)
    assert PhotoReader("rgb").decode(tmp_path / "volume.tif")[0].shape == (3, *bscan.shape)


def colour_mapped(bscan: np.ndarray) -> np.ndarray:
    """``bscan`` through a jet colour map (blue, cyan, yellow, red), as some viewers display B-scans."""
    x = bscan.astype(np.float32) / 255
    rgb = np.clip(np.stack([1.5 - np.abs(4 * x - 3), 1.5 - np.abs(4 * x - 2), 1.5 - np.abs(4 * x - 1)], -1), 0, 1)
    return (rgb * 255).astype(np.uint8)


def test_a_colour_image_is_refused_as_a_bscan_and_a_screenshot_passes(tmp_path, bscan, preprocessing):
    # a jet map's luminance is not monotonic in the signal (red, the brightest, is darker than cyan): the phantom
    # model moved the ISE from 4.1 to 5.9 px on it, and gave a fundus photograph a 30 px NFL, both accepted
    Image.fromarray(colour_mapped(bscan)).save(tmp_path / "jet.png")
    assert "is a colour image (100% of its pixels coloured" in str(refusal(preprocessing, tmp_path / "jet.png"))
    (jet,) = load_oct_images(tmp_path / "jet.png")  # a task on grey images of another kind turns the check off
    RequireBScand("image", max_colour_fraction=None)(Compose(preprocessing.transforms[:1])(jet))
    y, x = np.mgrid[:256, :384]
    fundus = np.where(((y - 128) ** 2 + (x - 192) ** 2 < 120**2)[..., None], [170, 80, 30], 0).astype(np.uint8)
    fundus = np.clip(fundus + np.random.default_rng(0).integers(0, 40, fundus.shape), 0, 255).astype(np.uint8)
    Image.fromarray(fundus).save(tmp_path / "fundus.png")
    assert "a photograph or a colour-mapped B-scan" in str(refusal(preprocessing, tmp_path / "fundus.png"))
    screenshot = np.repeat(bscan[..., None], 3, axis=-1)
    screenshot[100:102] = [0, 255, 0]  # a viewer's coloured lines and labels
    screenshot[8:24, 8:120] = [255, 255, 0]
    Image.fromarray(screenshot).save(tmp_path / "screenshot.png")
    (item,) = load_oct_images(tmp_path / "screenshot.png")
    assert tuple(preprocessing(item)["image"].shape) == (1, 256, 384)


def pixel_measures(row_mm: float, col_mm: float) -> Dataset:
    """A functional-group item with its Pixel Measures, as Ophthalmic Tomography stores a frame's spacing."""
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = [row_mm, col_mm], 0.12
    group = Dataset()
    group.PixelMeasuresSequence = [measures]
    return group


def test_a_dicom_bscan_measures_its_pixels_by_its_own_spacing(tmp_path, bscan, preprocessing):
    volume = np.stack([bscan, np.roll(bscan, 5, axis=1)])
    tomography = {"modality": "OPT", "sop_class": OPHTHALMIC_TOMOGRAPHY}
    groups = {"SharedFunctionalGroupsSequence": [pixel_measures(0.0038716, 0.0115)],
              "PerFrameFunctionalGroupsSequence": [Dataset(), Dataset()]}  # fmt: skip
    write_dicom(tmp_path / "volume.dcm", volume, NumberOfFrames=2, **tomography, **groups)
    write_dicom(tmp_path / "single.dcm", bscan, PixelSpacing=[0.0039, 0.006], **tomography)
    Image.fromarray(bscan).save(tmp_path / "plain.png")
    items = {item["id"]: item for item in load_oct_images(tmp_path)}
    sizes = {name: preprocessing(item)["image"].meta.get("pixel_size_um") for name, item in items.items()}
    assert sizes == {"volume_bscan000": pytest.approx(3.8716), "volume_bscan001": pytest.approx(3.8716),
                     "single": pytest.approx(3.9), "plain": None}  # fmt: skip
    # a rounded value agrees; another scanner's (or the lateral spacing) is refused naming the B-scan
    given = RequireBScand("image", pixel_size_um=3.9)
    loaded = Compose(preprocessing.transforms[:1])
    assert given(loaded(items["volume_bscan001"]))["image"].meta["pixel_size_um"] == pytest.approx(3.8716)
    assert given(loaded(items["plain"]))["image"].meta["pixel_size_um"] == 3.9
    with pytest.raises(DataError) as error:
        RequireBScand("image", pixel_size_um=11.5)(loaded(items["volume_bscan001"]))
    message = str(error.value)
    assert message.startswith(f"{tmp_path / 'volume.dcm'}::1: records 3.872 um between its rows")
    assert "pixel_size_um is 11.5" in message and "\n" not in message


def test_a_dicom_photograph_is_refused_as_a_bscan(tmp_path, bscan, preprocessing):
    write_dicom(tmp_path / "photo.dcm", bscan)  # grey Ophthalmic Photography: a red-free fundus photograph
    found = refusal(preprocessing, tmp_path / "photo.dcm")
    assert "modality OP (ophthalmic photography), a photograph, not an OCT B-scan" in str(found)


def test_a_tiff_is_read_from_its_image_page(tmp_path, bscan):
    # a preview page written first (NewSubfileType: reduced resolution) was read as the B-scan, at 64 x 96
    preview = np.asarray(Image.fromarray(bscan).resize((96, 64)))
    with tifffile.TiffWriter(tmp_path / "preview_first.tif") as tif:
        tif.write(preview, subfiletype=1)
        tif.write(bscan)
    (item,) = load_oct_images(tmp_path / "preview_first.tif")
    np.testing.assert_array_equal(PhotoReader("grey").decode(Path(item["image"]))[0][0], bscan)


def test_a_multi_page_tiff_is_a_volume_of_bscans_as_exported(tmp_path, bscan, preprocessing):
    """A volume exported as one TIFF, one B-scan per page (a plain multi-page TIFF, an ImageJ stack with a page per
    B-scan, an ImageJ stack stored behind one page, a stack with a preview page first) is segmented B-scan by
    B-scan (``<file>_bscan000``, ...), each read from its own page (it was refused as several frames; the one-page
    ImageJ stack was read as its first B-scan before). Pages of different sizes are no volume: refused."""
    stack = np.stack([np.roll(bscan, 9 * k, axis=1) for k in range(3)])
    with tifffile.TiffWriter(tmp_path / "pages.tif") as tif:
        for page in stack:
            tif.write(page)
    tifffile.imwrite(tmp_path / "imagej.tif", stack, imagej=True)
    tifffile.imwrite(tmp_path / "imagej_one_page.tif", stack, imagej=True, truncate=True)
    with tifffile.TiffWriter(tmp_path / "preview_first.tif") as tif:
        tif.write(np.asarray(Image.fromarray(bscan).resize((96, 64))), subfiletype=1)
        for page in stack:
            tif.write(page)
    items = load_oct_images(tmp_path)
    names = ("imagej", "imagej_one_page", "pages", "preview_first")
    assert [item["id"] for item in items] == [f"{name}_bscan{k:03d}" for name in names for k in range(3)]
    for item in items:
        frame = int(item["image"].rsplit("::", 1)[1])
        np.testing.assert_array_equal(PhotoReader("grey").decode(Path(item["image"]))[0][0], stack[frame])
        assert tuple(preprocessing(item)["image"].shape) == (1, 256, 384), item["id"]

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    with tifffile.TiffWriter(mixed / "mixed.tif") as tif:
        tif.write(bscan)
        tif.write(bscan[:, :300])
    with pytest.raises(DataError, match="holds pages of different kinds, not the frames of one volume") as error:
        load_oct_images(mixed)
    assert str(error.value).startswith(f"{mixed / 'mixed.tif'}: ")
