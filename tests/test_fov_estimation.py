"""The field of view estimated from fundus photographs as users have them: frames of any flat colour, padding,
JPEG, montages, crops whose periphery fades; each read from a real file as the vessels bundle reads it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from clinseg.datasets.errors import DataError
from clinseg.datasets.fundus.phantom import synthesize_fundus
from clinseg.datasets.readers import PhotoReader, ReadImaged, read_binary_mask
from clinseg.transforms.fundus import EstimateFOV, EstimateFOVd, ScaleToFOVd, fov_diameter
from tests.conftest import shared_path


def iou(a, b) -> float:
    return float((a & b).sum() / (a | b).sum())


def jpeg(photo: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(photo).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def estimate(tmp_path, photo: np.ndarray, name: str = "photo.png") -> dict:
    """The bundle's reading and estimation of a photograph saved as ``name``."""
    path = tmp_path / name
    Image.fromarray(photo).save(path)
    return EstimateFOVd("image")(ReadImaged("image", reader=PhotoReader(channels="rgb"))({"image": str(path)}))


def framed(frame, padding: int = 0):
    """A phantom photograph with its dark frame filled with ``frame`` (None: kept dark), then padded by ``padding``
    pixels of white, as an image exported for a report would be."""
    photo, _, fov = synthesize_fundus(np.random.default_rng([11, 0]), (584, 565))
    if frame is not None:
        photo = photo.copy()
        photo[~fov] = frame
    if padding:
        photo = np.pad(photo, ((padding, padding), (padding, padding), (0, 0)), constant_values=255)
        fov = np.pad(fov, padding)
    return photo, fov


@pytest.mark.parametrize(
    "frame, padding, quality",
    [
        (60, 0, None),  # a dark grey frame (a brightness offset of the export)
        (128, 0, None),
        ((255, 255, 255), 0, None),  # a white background
        ((20, 40, 120), 0, None),  # a coloured one
        (90, 0, 30),  # a grey frame through JPEG: its ringing along the rim is frame too
        (None, 40, None),  # white padding around the camera's dark frame
        (None, 40, 40),
    ],
)
def test_a_frame_of_any_flat_colour_is_frame(tmp_path, frame, padding, quality):
    """A frame that is not dark (grey, white, coloured) was taken for retina: the field was the whole photograph
    (IoU 0.68 to the true field, no disc to measure), its frame normalised and segmented with the retina, and the
    photograph left at its own scale."""
    photo, fov = framed(frame, padding)
    if quality:
        photo = jpeg(photo, quality)
    item = estimate(tmp_path, photo)
    estimated = np.asarray(item["fov"][0]) > 0
    assert iou(estimated, fov) > 0.97, iou(estimated, fov)
    assert fov_diameter(item["fov"]) == pytest.approx(fov_diameter(fov[None]), rel=0.015)


@pytest.mark.parametrize("frame, quality", [(60, None), (128, None), (128, 50), ((255, 255, 255), 50)])
def test_a_flat_frame_with_a_date_burned_into_one_corner_is_frame(tmp_path, frame, quality):
    """The date and eye an export writes into a corner of its grey frame: that corner was no longer the frame's
    colour, so the photograph was taken as frameless, its whole image the field (IoU 0.67 to the true field)."""
    photo, fov = framed(frame)
    image = Image.fromarray(photo)
    ink = (0, 0, 0) if frame == (255, 255, 255) else (255, 255, 255)
    ImageDraw.Draw(image).text((8, 560), "05/03/2019 10:22 OD", fill=ink, font=ImageFont.load_default(size=16))
    photo = np.asarray(image) if quality is None else jpeg(np.asarray(image), quality)
    item = estimate(tmp_path, photo)
    estimated = np.asarray(item["fov"][0]) > 0
    assert iou(estimated, fov) > 0.97, iou(estimated, fov)
    assert fov_diameter(item["fov"]) == pytest.approx(fov_diameter(fov[None]), rel=0.015)


@pytest.mark.parametrize("depth", [0.1, 0.2])
def test_a_dark_shadow_across_part_of_the_disc_stays_in_the_field(tmp_path, depth):
    """A shadow (a small pupil, the lid) darkening 40 % of the disc to a tenth or a fifth of its brightness was cut
    off as frame (IoU 0.6 to 0.7 to the true field): the camera's field is still the disc its round rim draws."""
    photo, _, fov = synthesize_fundus(np.random.default_rng([15, 0]), (584, 565))
    cols = np.flatnonzero(fov.any(axis=0))
    edge = cols[0] + 0.4 * (cols[-1] - cols[0])
    shade = np.clip(depth + (1 - depth) * (np.arange(photo.shape[1]) - edge + 40) / 80, depth, 1.0)
    shaded = (photo * shade[None, :, None]).round().astype(np.uint8)
    estimated = np.asarray(estimate(tmp_path, shaded)["fov"][0]) > 0
    assert iou(estimated, fov) > 0.97, iou(estimated, fov)


def test_real_photographs_with_a_dark_shadow_keep_their_field():
    root = shared_path("vessels", "DRIVE", "training")
    for number in (21, 30):
        photo = np.asarray(Image.open(root / "images" / f"{number}_training.tif").convert("RGB"))
        released = read_binary_mask(root / "mask" / f"{number}_training_mask.gif")
        cols = np.flatnonzero(released.any(axis=0))
        edge = cols[0] + 0.4 * (cols[-1] - cols[0])
        shade = np.clip(0.1 + 0.9 * (np.arange(photo.shape[1]) - edge + 40) / 80, 0.1, 1.0)
        estimated = EstimateFOV()((photo * shade[None, :, None]).round().astype(np.uint8).transpose(2, 0, 1))
        assert iou(estimated, released) > 0.97, (number, iou(estimated, released))


def test_grey_bars_padding_a_photograph_to_a_square_are_frame(tmp_path):
    photo, _, fov = synthesize_fundus(np.random.default_rng([12, 0]), (584, 565))
    bars = ((0, 0), (160, 160))
    item = estimate(tmp_path, np.pad(photo, (*bars, (0, 0)), constant_values=70))
    padded = np.pad(fov, bars)
    assert iou(np.asarray(item["fov"][0]) > 0, padded) > 0.97
    assert ScaleToFOVd("fov").factor(item) == pytest.approx(538 / fov_diameter(padded[None]), rel=0.015)


def test_a_montage_of_two_fields_is_refused_naming_the_file(tmp_path):
    """Two discs side by side: one was taken as the field and the other silently left unsegmented."""
    left, _, _ = synthesize_fundus(np.random.default_rng([13, 0]), (584, 565))
    right, _, _ = synthesize_fundus(np.random.default_rng([13, 1]), (584, 565))
    with pytest.raises(DataError, match="2 separate bright fields of view") as raised:
        estimate(tmp_path, np.concatenate([left, right], axis=1), "montage.png")
    first_line = str(raised.value).splitlines()[0]
    assert raised.value.path == str(tmp_path / "montage.png") and first_line.startswith(raised.value.path)
    assert "montage" in first_line


def test_a_page_of_text_is_refused_as_no_field_not_as_dark(tmp_path):
    """A scanned page given as a photograph was refused as "dark throughout": it is white. The refusal says what was
    found, bright lines too thin to be a disc."""
    page = Image.new("RGB", (565, 584), "white")
    draw = ImageDraw.Draw(page)
    for row in range(20, 570, 14):
        draw.text((20, row), "Patient report, page 1 of 2: findings and follow-up " * 2, fill="black")
    with pytest.raises(DataError, match=r"page\.png: field of view: holds no field of view: no bright region wider "
                       r"than \d+ pixels .*a page of text") as raised:  # fmt: skip
        estimate(tmp_path, np.asarray(page), "page.png")
    assert "dark throughout" not in str(raised.value)


def test_a_crop_whose_periphery_fades_into_one_dark_corner_is_its_own_field(tmp_path):
    """A crop inside the disc whose periphery fades dark in one corner (the green channel of a red-free photograph,
    vignetting): that corner was read as a frame and the darker quarter of the retina cut off as frame."""
    photo, _, _ = synthesize_fundus(np.random.default_rng([14, 0]), (584, 565))
    crop = photo[120:460, 110:450].astype(np.float32)
    rows, cols = np.mgrid[: crop.shape[0], : crop.shape[1]]
    fade = np.clip(0.08 + np.hypot(rows, cols) / crop.shape[0], 0.0, 1.0)
    faded = (crop * fade[..., None]).round().astype(np.uint8)
    assert estimate(tmp_path, faded)["fov"].all()
    # the same crop with a frame in two corners (a disc shifted to one side) keeps its frame
    photo, _, fov = synthesize_fundus(np.random.default_rng([14, 0]), (584, 565))
    shifted = photo[:, 120:]
    assert iou(np.asarray(estimate(tmp_path, shifted)["fov"][0]) > 0, fov[:, 120:]) > 0.97


def test_real_photographs_with_grey_and_white_frames_and_red_free_crops(tmp_path):
    """DRIVE's photographs with their frame filled grey or white against DRIVE's released masks; crops inside
    CHASE_DB1's discs, red-free (their green channel), are their own field."""
    root = shared_path("vessels", "DRIVE", "training")
    for number in (21, 30):
        photo = np.asarray(Image.open(root / "images" / f"{number}_training.tif").convert("RGB")).copy()
        released = read_binary_mask(root / "mask" / f"{number}_training_mask.gif")
        for frame in (60, 255):
            photo[~released] = frame
            estimated = EstimateFOV()(jpeg(photo, 50).transpose(2, 0, 1))
            assert iou(estimated, released) > 0.98, (number, frame, iou(estimated, released))
            assert fov_diameter(estimated[None]) == pytest.approx(fov_diameter(released[None]), rel=0.01)
    chase = shared_path("vessels", "CHASEDB1_x3", "images")
    for name in ("01R", "07L"):
        green = np.asarray(Image.open(chase / f"Image_{name}.jpg"))[500:2400, 560:2460, 1]
        assert EstimateFOV()(np.repeat(green[None], 3, axis=0)).all(), name


def read_with_mask(tmp_path, photo: np.ndarray, fov: np.ndarray, name: str = "photo") -> dict:
    """The bundle's reading of a photograph and its given FOV mask, both from real files, then its field check."""
    Image.fromarray(photo).save(tmp_path / f"{name}.png")
    Image.fromarray(fov.astype(np.uint8) * 255).save(tmp_path / f"{name}_mask.gif")
    read = ReadImaged("image", reader=PhotoReader(channels="rgb"))({"image": str(tmp_path / f"{name}.png")})
    from clinseg.datasets.readers import BinaryMaskReader

    read = ReadImaged("fov", reader=BinaryMaskReader())({**read, "fov": str(tmp_path / f"{name}_mask.gif")})
    return EstimateFOVd("image")(read)


def brightened(photo: np.ndarray, gain: float) -> np.ndarray:
    return np.clip(photo.astype(np.float32) * gain, 0, 255).astype(np.uint8)


def test_a_given_mask_that_is_not_the_photographs_field_is_refused_naming_it(tmp_path):
    """An inverted mask (covering the frame and more than the 20 % an empty-ish mask is refused below) or one
    shifted by a quarter of the image would mask the prediction to the camera's frame: vessels drawn there, exit 0."""
    photo, _, fov = synthesize_fundus(np.random.default_rng([12, 0]), (584, 565))
    assert read_with_mask(tmp_path, photo, fov)["fov_source"] == "given"
    for name, wrong in {"inverted": ~fov, "shifted": np.roll(fov, 150, axis=1)}.items():
        with pytest.raises(DataError) as refused:
            read_with_mask(tmp_path, photo, wrong, name)
        message = str(refused.value)
        assert message.startswith(f"{tmp_path / f'{name}_mask.gif'}: FOV mask is not the field of view of"), message
        assert str(tmp_path / f"{name}.png") in message and "Inverted, shifted" in message
    # a grey image given with a mask is not judged by an estimate that cannot be made for it
    grey = np.repeat(photo[..., 1:2], 3, axis=2)
    assert read_with_mask(tmp_path, grey, fov, "grey")["fov_source"] == "given"


def test_an_overexposed_photograph_is_refused_with_its_field_given_or_estimated(tmp_path):
    photo, _, fov = synthesize_fundus(np.random.default_rng([13, 0]), (584, 565))
    green = photo[..., 1][fov].astype(np.float32)
    gain = 255 / np.percentile(green, 40)  # 60 % of the field's green at full scale
    for given in (True, False):
        name = "given" if given else "estimated"
        with pytest.raises(DataError, match="is overexposed: .* of its green channel inside the field of view is"):
            if given:
                read_with_mask(tmp_path, brightened(photo, gain), fov, name)
            else:
                estimate(tmp_path, brightened(photo, gain), f"{name}.png")
    # a photograph brightened a little (its optic disc clipped) is read
    assert estimate(tmp_path, brightened(photo, 1.2), "a_little.png")["fov_source"] == "estimated"


def test_real_photographs_keep_their_released_masks_and_are_refused_overexposed(tmp_path):
    """DRIVE's 20 released masks lie inside the estimated field (intersection over union 0.989 or more); an inverted
    mask and the same photograph brightened until its green channel clips are refused; the photograph brightened
    1.5 times (2 % clipped) is read."""
    root = shared_path("vessels", "DRIVE", "training")
    masks = {}
    for number in range(21, 41):
        photo = np.asarray(Image.open(root / "images" / f"{number}_training.tif").convert("RGB"))
        masks[number] = read_binary_mask(root / "mask" / f"{number}_training_mask.gif")
        assert read_with_mask(tmp_path, photo, masks[number], str(number))["fov_source"] == "given"
    photo = np.asarray(Image.open(root / "images" / "21_training.tif").convert("RGB"))
    with pytest.raises(DataError, match="FOV mask is not the field of view"):
        read_with_mask(tmp_path, photo, ~masks[21], "inverted")
    assert read_with_mask(tmp_path, brightened(photo, 1.5), masks[21], "brighter")["fov_source"] == "given"
    with pytest.raises(DataError, match="is overexposed"):
        read_with_mask(tmp_path, brightened(photo, 2.6), masks[21], "overexposed")
