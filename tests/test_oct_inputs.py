"""OCT B-scans as scanners and viewers export them, through the oct_layers bundle's own inference preprocessing:
display scale in 8 bits, 16 bits and floats, linear intensity, padding bands, scanner sizes."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from clinseg.datasets.errors import DataError
from clinseg.datasets.oct import load_oct_images, synthesize_bscan
from clinseg.pipelines.cli import find_input_error
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


def test_tall_padding_bands_are_refused_naming_their_rows(tmp_path, bscan, preprocessing):
    # padded by 60 rows above and below, the phantom model's Dice falls from 0.93 to 0.78 and its OPL from 6.3 px
    # to 2.8 px, every layer in order: its JSON would look fine
    Image.fromarray(np.pad(bscan, ((60, 60), (0, 0)))).save(tmp_path / "padded.png")
    found = refusal(preprocessing, tmp_path / "padded.png")
    assert "uniform bands over 120 of its 376 rows (60 at the top, 60 at the bottom" in str(found)
    white = np.full((384, 384), 255, np.uint8)  # padded to a square page in white
    white[64:-64] = bscan
    Image.fromarray(white).save(tmp_path / "square.png")
    assert "128 of its 384 rows" in str(refusal(preprocessing, tmp_path / "square.png"))
