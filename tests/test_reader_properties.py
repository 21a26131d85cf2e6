"""Property-based tests of the 2D readers: generated images of every supported kind, bit depth, orientation and size,
written to real files by independent writers (Pillow, tifffile, a PNG encoder written here from the PNG
specification), must read back as exactly the pixels written (an independent reference computed here), or fail with
a :class:`DataError` naming the file.

Hypothesis runs ``EXAMPLES`` examples per property (``HYPOTHESIS_EXAMPLES`` overrides it); the database is off so
every run draws afresh from a fixed seed and CI is repeatable.
"""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from clinseg.datasets.errors import DataError
from clinseg.datasets.layouts import check_headers
from clinseg.datasets.readers import BinaryMaskReader, LabelImageReader, PhotoReader, read_header

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "40"))
SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
shapes = st.tuples(st.integers(1, 24), st.integers(1, 24))


# ---------------------------------------------------------------- independent writers and references
def png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)


def write_png_rgb16(path: Path, array: np.ndarray) -> None:
    """A 48-bit RGB PNG straight from the PNG specification (colour type 2, depth 16, filter 0 on every row)."""
    rows, cols, _ = array.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)
    header = struct.pack(">IIBBBBB", cols, rows, 16, 2, 0, 0, 0)
    signature = b"\x89PNG\r\n\x1a\n"
    path.write_bytes(
        signature + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")
    )


def expected_scale(array: np.ndarray) -> float:
    """255 / the full scale of the depth the values use: 8-bit containers as they are, deeper ones by the smallest
    of 10/12/14/16 bits that holds the largest value."""
    if array.dtype == np.uint8:
        return 1.0
    largest = int(array.max())
    depth = next(bits for bits in (8, 10, 12, 14, 16) if largest < 2**bits)
    return 255.0 / (2**depth - 1)


def oriented(array: np.ndarray, orientation: int) -> np.ndarray:
    """What a viewer shows for EXIF orientation ``orientation`` (TIFF/EXIF 2.3, tag 0x0112) of stored ``array``."""
    transforms = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: np.swapaxes(a, 0, 1),
        6: lambda a: np.swapaxes(a[::-1], 0, 1),  # rotate 90 degrees clockwise
        7: lambda a: np.swapaxes(a[::-1, ::-1], 0, 1),
        8: lambda a: np.swapaxes(a, 0, 1)[::-1],  # rotate 90 degrees counter-clockwise
    }
    return transforms[orientation](array)


def as_rgb_scaled(array: np.ndarray) -> np.ndarray:
    channels = array if array.ndim == 3 else np.repeat(array[..., None], 3, -1)
    return np.moveaxis(channels.astype(np.float64) * expected_scale(array), -1, 0)


# ---------------------------------------------------------------- strategies
@st.composite
def images(draw, depths=(np.uint8, np.uint16), colour=(False, True)):
    dtype = draw(st.sampled_from(depths))
    is_colour = draw(st.sampled_from(colour))
    rows, cols = draw(shapes)
    top = 255 if dtype == np.uint8 else draw(st.sampled_from([1023, 4095, 16383, 65535]))
    shape = (rows, cols, 3) if is_colour else (rows, cols)
    array = draw(arrays(dtype, shape, elements=st.integers(0, top)))
    return array


# ---------------------------------------------------------------- the properties
@seed(1)
@SETTINGS
@given(array=images(), planar=st.booleans())
def test_tiff_reads_every_depth_faithfully(tmp_path, array, planar):
    path = tmp_path / "image.tif"
    if array.ndim == 3 and planar:  # colour planes stored one after another: (samples, rows, cols)
        tifffile.imwrite(path, np.moveaxis(array, -1, 0), photometric="rgb", planarconfig="separate")
    else:
        tifffile.imwrite(path, array, **({"photometric": "rgb"} if array.ndim == 3 else {}))
    pixels = PhotoReader("rgb").decode(path)[0]
    np.testing.assert_allclose(pixels, as_rgb_scaled(array), rtol=1e-6, atol=1e-4)


@seed(2)
@SETTINGS
@given(array=images())
def test_png_reads_every_depth_faithfully(tmp_path, array):
    path = tmp_path / "image.png"
    if array.ndim == 3 and array.dtype == np.uint16:
        write_png_rgb16(path, array)
    else:
        Image.fromarray(array).save(path)
    pixels, meta = PhotoReader("rgb").decode(path)
    np.testing.assert_allclose(pixels, as_rgb_scaled(array), rtol=1e-6, atol=1e-4)
    assert meta["original_dtype"] == str(array.dtype)


@seed(3)
@SETTINGS
@given(array=images(depths=(np.uint8,)), orientation=st.integers(1, 8))
def test_exif_orientation_is_honoured(tmp_path, array, orientation):
    path = tmp_path / "photo.png"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(array).save(path, exif=exif)
    shown = oriented(array, orientation)
    assert read_header(path)["shape"] == shown.shape[:2]
    np.testing.assert_array_equal(PhotoReader("rgb").decode(path)[0], as_rgb_scaled(shown))


@seed(4)
@SETTINGS
@given(
    rows_cols=shapes,
    levels=st.tuples(st.integers(0, 254), st.integers(1, 255)).filter(lambda lv: lv[0] < lv[1]),
    storage=st.sampled_from(["grey", "palette", "grey16"]),
    data=st.data(),
)
def test_binary_masks_read_by_meaning(tmp_path, rows_cols, levels, storage, data):
    mask = data.draw(arrays(bool, rows_cols))
    path = tmp_path / ("mask.gif" if storage == "palette" else "mask.png")
    low, high = levels
    if storage == "palette":  # indices 0/1 meaning two grey levels, as DRIVE's GIFs store them
        image = Image.fromarray(mask.astype(np.uint8), mode="P")
        image.putpalette([low] * 3 + [high] * 3 + [0] * 762)
    elif storage == "grey16":
        image = Image.fromarray(np.where(mask, high * 257, low * 257).astype(np.uint16))
    else:
        image = Image.fromarray(np.where(mask, high, low).astype(np.uint8))
    image.save(path)
    read = BinaryMaskReader().decode(path)[0][0].astype(bool)
    if mask.all() or not mask.any():  # one level only: foreground exactly when that level is not 0
        level = (high if mask.all() else low) * (257 if storage == "grey16" else 1)
        np.testing.assert_array_equal(read, np.full(mask.shape, level > 0))
    else:
        np.testing.assert_array_equal(read, mask)


@seed(5)
@SETTINGS
@given(label=st.integers(1, 20).flatmap(lambda k: arrays(np.uint8, shapes, elements=st.integers(0, k))))
def test_index_labels_read_exactly(tmp_path, label):
    path = tmp_path / "label.png"
    Image.fromarray(label).save(path)
    array, meta = LabelImageReader().decode(path)
    np.testing.assert_array_equal(array[0], label)
    assert meta["label_kind"] == "indices"


@seed(6)
@SETTINGS
@given(
    rows_cols=st.tuples(st.integers(1, 64), st.integers(1, 64)),
    limit=st.integers(1, 4096),
    kind=st.sampled_from(["png", "tif", "gif"]),
)
def test_the_size_limit_is_checked_from_the_header(tmp_path, rows_cols, limit, kind):
    path = tmp_path / f"image.{kind}"
    Image.fromarray(np.zeros(rows_cols, dtype=np.uint8)).save(path)
    rows, cols = rows_cols
    if rows * cols > limit:
        with pytest.raises(DataError, match="more than the limit") as error:
            PhotoReader("grey", max_pixels=limit).decode(path)
        assert str(path) in str(error.value)
    else:
        assert PhotoReader("grey", max_pixels=limit).decode(path)[0].shape == (1, rows, cols)


@seed(7)
@SETTINGS
@given(image_shape=shapes, mask_shape=shapes, orientation=st.sampled_from([1, 6]))
def test_image_and_mask_shapes_are_compared_as_displayed(tmp_path, image_shape, mask_shape, orientation):
    image_path, mask_path = tmp_path / "a.png", tmp_path / "a_mask.png"
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(np.zeros(image_shape, dtype=np.uint8)).save(image_path, exif=exif)
    Image.fromarray(np.zeros(mask_shape, dtype=np.uint8)).save(mask_path)
    shown = image_shape if orientation == 1 else image_shape[::-1]
    items = [{"image": str(image_path), "label": str(mask_path)}]
    if tuple(mask_shape) == tuple(shown):
        check_headers(items)
    else:
        with pytest.raises(DataError, match="must have its image's size") as error:
            check_headers(items)
        assert str(mask_path) in str(error.value)


# ---------------------------------------------------------------- single cases the generators do not reach
def test_a_jpeg_photograph_is_turned_upright_before_its_mask_is_applied(tmp_path):
    stored = np.zeros((30, 40, 3), dtype=np.uint8)
    stored[:10, :10] = 255  # bright top-left corner as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was rotated: a viewer turns the picture 90 degrees clockwise
    Image.fromarray(stored).save(tmp_path / "photo.jpg", quality=95, exif=exif)
    pixels = PhotoReader("rgb").decode(tmp_path / "photo.jpg")[0]
    assert pixels.shape == (3, 40, 30)
    assert pixels[:, :10, -10:].mean() > 200 and pixels[:, -10:, :10].mean() < 50  # now top-right


def test_a_decompression_bomb_is_refused_from_its_header(tmp_path):
    path = tmp_path / "bomb.png"
    cols = rows = 20000  # 400 million pixels, a few hundred bytes compressed
    raw = zlib.compress(b"\x00" * (cols + 1), 9)  # one row; the decoder would need every row
    header = struct.pack(">IIBBBBB", cols, rows, 8, 0, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", raw) + png_chunk(b"IEND", b"")
    )
    with pytest.raises(DataError, match="400,000,000 pixels, more than the limit") as error:
        PhotoReader("rgb").decode(path)
    assert str(path) in str(error.value)


# ---------------------------------------------------------------- orientation: decided once, applied by every decoder
def write_oriented(path: Path, array: np.ndarray, orientation: int, kind: str) -> None:
    """``array`` stored with orientation ``orientation``, by the writer of ``kind``."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    if kind == "tif":
        tifffile.imwrite(path, array, extratags=[(274, "H", 1, orientation, True)],
                         **({"photometric": "rgb"} if array.ndim == 3 else {}))  # fmt: skip
    elif kind == "png16-rgb":  # 48-bit colour, eXIf chunk before the data, from the specification
        rows, cols, _ = array.shape
        raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in array)
        header = struct.pack(">IIBBBBB", cols, rows, 16, 2, 0, 0, 0)
        exif_bytes = exif.tobytes()
        exif_bytes = exif_bytes[6:] if exif_bytes.startswith(b"Exif\x00\x00") else exif_bytes
        path.write_bytes(
            b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"eXIf", exif_bytes)
            + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")
        )  # fmt: skip
    else:
        Image.fromarray(array).save(path, exif=exif)


@seed(8)
@SETTINGS
@given(
    kind_and_array=st.sampled_from(["png8", "png16-grey", "png16-rgb", "tif"]).flatmap(
        lambda kind: st.tuples(
            st.just(kind),
            images(
                depths=(np.uint8,) if kind == "png8" else (np.uint16,),
                colour=(True,) if kind == "png16-rgb" else (False,) if kind == "png16-grey" else (False, True),
            ),
        )
    ),
    orientation=st.integers(1, 8),
)
def test_orientation_is_applied_alike_by_every_decoder(tmp_path, kind_and_array, orientation):
    """16-bit PNGs and TIFFs have decoders of their own (libpng, tifffile): they are turned as Pillow's are, and
    the header announces the shape they decode to."""
    kind, array = kind_and_array
    path = tmp_path / f"image.{'tif' if kind == 'tif' else 'png'}"
    write_oriented(path, array, orientation, kind)
    shown = oriented(array, orientation)
    assert read_header(path)["shape"] == shown.shape[:2]
    pixels, meta = PhotoReader("rgb").decode(path)
    np.testing.assert_allclose(pixels, as_rgb_scaled(shown), rtol=1e-6, atol=1e-4)
    assert meta["exif_orientation"] == orientation


def test_an_exif_chunk_after_the_image_data_is_read_from_the_header(tmp_path):
    stored = np.zeros((20, 30), dtype=np.uint8)
    stored[:5, :5] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    exif_bytes = exif.tobytes()
    exif_bytes = exif_bytes[6:] if exif_bytes.startswith(b"Exif\x00\x00") else exif_bytes
    raw = b"".join(b"\x00" + row.tobytes() for row in stored)
    header = struct.pack(">IIBBBBB", 30, 20, 8, 0, 0, 0, 0)
    path = tmp_path / "late_exif.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"eXIf", exif_bytes) + png_chunk(b"IEND", b"")
    )  # fmt: skip
    assert read_header(path)["shape"] == (30, 20)
    np.testing.assert_array_equal(PhotoReader("grey").decode(path)[0][0], oriented(stored, 6))


def test_pixels_of_another_shape_than_the_header_announced_are_refused(tmp_path, monkeypatch):
    """A decoder that ignores the orientation the header applied (as SimpleITK did for 16-bit PNGs) is caught."""
    from clinseg.datasets import readers

    path = tmp_path / "rotated.png"
    write_oriented(path, np.zeros((20, 30), dtype=np.uint8), 6, "png8")
    monkeypatch.setattr(readers, "_orient", lambda array, orientation: array)
    with pytest.raises(DataError, match="decodes to 20 x 30 pixels but its header announces 30 x 20") as error:
        PhotoReader("grey").decode(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


# ---------------------------------------------------------------- TIFF photometric interpretation
RGB_ROWS = np.array([[200, 100, 50], [30, 160, 90]], dtype=np.uint8)  # two colours, one per half


def two_colour_photo() -> np.ndarray:
    return np.repeat(np.repeat(RGB_ROWS[:, None], 16, axis=0), 24, axis=1)


def test_a_palette_tiff_is_read_by_its_palette_as_png_and_gif_are(tmp_path):
    photo = two_colour_photo()
    palette_image = Image.fromarray(photo).quantize(2)
    for suffix in ("tif", "png", "gif"):
        palette_image.save(tmp_path / f"photo.{suffix}")
        np.testing.assert_array_equal(
            PhotoReader("rgb").decode(tmp_path / f"photo.{suffix}")[0], photo.transpose(2, 0, 1)
        )
    # a mask whose palette inverts its indices (index 0 white): read by the grey level each index means
    indices = np.zeros((8, 8), dtype=np.uint8)
    indices[2:5, 2:5] = 1
    mask = Image.fromarray(indices, mode="P")
    mask.putpalette([255, 255, 255, 0, 0, 0] + [0] * 762)
    mask.save(tmp_path / "mask.tif")
    np.testing.assert_array_equal(BinaryMaskReader().decode(tmp_path / "mask.tif")[0][0], indices == 0)
    # a label keeps its indices and its palette, for the colour table
    label = Image.fromarray(np.array([[0, 1], [2, 1]], dtype=np.uint8), mode="P")
    label.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    label.save(tmp_path / "label.tif")
    array, meta = LabelImageReader().decode(tmp_path / "label.tif")
    assert meta["label_kind"] == "palette" and meta["palette"][1].tolist() == [255, 0, 0]
    np.testing.assert_array_equal(array[0], [[0, 1], [2, 1]])


def test_a_cmyk_tiff_is_converted_as_a_cmyk_jpeg_is(tmp_path):
    photo = two_colour_photo()
    Image.fromarray(photo).convert("CMYK").save(tmp_path / "pillow.tif")
    cmyk = np.asarray(Image.fromarray(photo).convert("CMYK"))
    tifffile.imwrite(tmp_path / "tifffile.tif", cmyk, photometric="separated")
    for name in ("pillow.tif", "tifffile.tif"):
        np.testing.assert_array_equal(PhotoReader("rgb").decode(tmp_path / name)[0], photo.transpose(2, 0, 1))


@pytest.mark.parametrize(
    "write, problem",
    [
        (lambda p: tifffile.imwrite(p, np.full((8, 9), 30, np.uint8), photometric="miniswhite"), "min-is-white"),
        (lambda p: tifffile.imwrite(p, np.zeros((3, 8, 9), np.uint8), photometric="minisblack",
                                    planarconfig="separate"), "grey TIFF with 3 samples per pixel"),
        (lambda p: tifffile.imwrite(p, np.zeros((8, 9, 4), np.uint8), photometric="rgb", extrasamples=["unspecified"]),
         "RGB TIFF with 4 samples per pixel"),
        (lambda p: tifffile.imwrite(p, np.zeros((8, 9, 3), np.uint8), photometric="cielab"), "CIELAB"),
    ],
)  # fmt: skip
def test_tiffs_whose_samples_would_read_as_something_else_are_refused_in_one_line(tmp_path, write, problem):
    path = tmp_path / "scan.tif"
    write(path)
    for reader in (PhotoReader("grey"), BinaryMaskReader(), LabelImageReader()):
        with pytest.raises(DataError, match=problem) as error:
            reader.decode(path)
        assert str(error.value).startswith(f"{path}: ") and "\n" not in str(error.value)
    with pytest.raises(DataError, match=problem):
        read_header(path)  # already when the data are listed


def test_a_bool_mask_written_by_tifffile_reads_as_written(tmp_path):
    """tifffile writes every bool array as a bilevel min-is-white page; its set bits are the mask (the ink), not an
    inverted grey image: read as stored, not refused with the grey min-is-white TIFFs."""
    mask = np.zeros((40, 48), bool)
    mask[10:20, 5:30] = True
    tifffile.imwrite(tmp_path / "mask.tif", mask)
    with tifffile.TiffFile(tmp_path / "mask.tif") as tif:
        assert int(tif.pages[0].photometric) == 0 and tif.pages[0].bitspersample == 1
    read = BinaryMaskReader().decode(tmp_path / "mask.tif")[0]
    np.testing.assert_array_equal(np.squeeze(np.asarray(read)) > 0, mask)


# ---------------------------------------------------------------- alpha channels
def disc(rows: int = 40, cols: int = 40) -> np.ndarray:
    yy, xx = np.mgrid[:rows, :cols]
    return (yy - rows / 2) ** 2 + (xx - cols / 2) ** 2 < (0.4 * rows) ** 2


def test_a_transparent_frame_of_a_photograph_becomes_black(tmp_path):
    inside = disc()
    rgba = np.zeros((*inside.shape, 4), dtype=np.uint8)
    rgba[inside] = [180, 90, 40, 255]
    rgba[~inside] = [255, 255, 255, 0]  # the frame made transparent; the colour under it white
    Image.fromarray(rgba).save(tmp_path / "photo.png")
    pixels, meta = PhotoReader("rgb").decode(tmp_path / "photo.png")
    assert (pixels[:, ~inside] == 0).all() and (pixels[:, inside] == [[180], [90], [40]]).all()
    assert meta["alpha_composited"]
    half = rgba.copy()
    half[..., 3] = 128
    Image.fromarray(half).save(tmp_path / "half.png")
    np.testing.assert_allclose(
        PhotoReader("rgb").decode(tmp_path / "half.png")[0][:, 20, 20], [90.4, 45.2, 20.1], atol=0.1
    )
    rgba[..., 3] = 0
    Image.fromarray(rgba).save(tmp_path / "invisible.png")
    with pytest.raises(DataError, match="fully transparent"):
        PhotoReader("rgb").decode(tmp_path / "invisible.png")


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_a_mask_drawn_in_the_alpha_channel_is_read_from_it(tmp_path, mode):
    inside = disc()
    if mode == "P":  # one palette entry, transparent where the mask is not (a GIF's transparent index)
        image = Image.fromarray(np.where(inside, 1, 0).astype(np.uint8), mode="P")
        image.putpalette([0, 0, 0] * 2 + [0] * 762)
        image.info["transparency"] = 0
        image.save(tmp_path / "mask.gif", transparency=0)
        path = tmp_path / "mask.gif"
    else:
        channels = 4 if mode == "RGBA" else 2
        array = np.zeros((*inside.shape, channels), dtype=np.uint8)
        array[..., :-1] = 255 if mode == "RGBA" else 0  # white or black ink: one colour throughout
        array[..., -1] = inside * 255
        path = tmp_path / "mask.png"
        Image.fromarray(array, mode=mode).save(path)
    np.testing.assert_array_equal(BinaryMaskReader().decode(path)[0][0], inside)


def test_a_mask_whose_alpha_and_colour_disagree_is_refused(tmp_path):
    inside = disc()
    agree = np.zeros((*inside.shape, 2), dtype=np.uint8)
    agree[..., 0] = agree[..., 1] = inside * 255  # white on black, the black made transparent: both say the same
    Image.fromarray(agree, mode="LA").save(tmp_path / "agree.png")
    np.testing.assert_array_equal(BinaryMaskReader().decode(tmp_path / "agree.png")[0][0], inside)
    disagree = agree.copy()
    disagree[:, :10, 1] = 0  # part of the white field made transparent
    Image.fromarray(disagree, mode="LA").save(tmp_path / "disagree.png")
    with pytest.raises(DataError, match="alpha channel carries content") as error:
        BinaryMaskReader().decode(tmp_path / "disagree.png")
    assert str(error.value).startswith(str(tmp_path / "disagree.png")) and "\n" not in str(error.value)


def test_a_label_drawn_in_the_alpha_channel_is_refused(tmp_path):
    rgba = np.zeros((10, 12, 4), dtype=np.uint8)
    rgba[..., :3] = 255
    rgba[3:6, :, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "label.png")
    with pytest.raises(DataError, match="alpha channel carries content"):
        LabelImageReader().decode(tmp_path / "label.png")


def test_a_16_bit_grey_and_alpha_png_is_decoded(tmp_path):
    grey_alpha = np.zeros((10, 12, 2), dtype=np.uint16)
    grey_alpha[..., 0] = np.arange(12) * 5000
    grey_alpha[..., 1] = 65535
    grey_alpha[:, 6:, 1] = 0  # the right half transparent: composited onto black
    rows, cols, _ = grey_alpha.shape
    raw = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in grey_alpha)
    header = struct.pack(">IIBBBBB", cols, rows, 16, 4, 0, 0, 0)  # colour type 4: grey + alpha
    path = tmp_path / "la16.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )  # fmt: skip
    pixels, meta = PhotoReader("grey").decode(path)
    expected = np.where(np.arange(12) < 6, np.arange(12) * 5000 * 255 / 65535, 0)
    np.testing.assert_allclose(pixels[0], np.broadcast_to(expected, (10, 12)), rtol=1e-5, atol=1e-3)
    assert meta["bits_stored"] == 16


# ---------------------------------------------------------------- further frames that are not further images
def test_an_mpo_photograph_reads_its_first_image(tmp_path):
    photo = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    first = Image.fromarray(photo)
    first.save(tmp_path / "photo.jpg", format="MPO", save_all=True, append_images=[first.resize((16, 20))])
    assert Image.open(tmp_path / "photo.jpg").n_frames == 2
    expected = np.asarray(Image.open(tmp_path / "photo.jpg").convert("RGB"))  # frame 0, as a viewer shows it
    np.testing.assert_array_equal(PhotoReader("rgb").decode(tmp_path / "photo.jpg")[0], expected.transpose(2, 0, 1))


def test_a_reduced_resolution_tiff_page_is_no_frame_but_a_second_image_is(tmp_path):
    photo = np.random.default_rng(0).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    with tifffile.TiffWriter(tmp_path / "thumb.tif") as tif:
        tif.write(photo, photometric="rgb")
        tif.write(photo[::4, ::4], photometric="rgb", subfiletype=1)  # NewSubfileType: reduced-resolution image
    np.testing.assert_array_equal(PhotoReader("rgb").decode(tmp_path / "thumb.tif")[0], photo.transpose(2, 0, 1))
    with tifffile.TiffWriter(tmp_path / "two.tif") as tif:
        tif.write(photo, photometric="rgb")
        tif.write(photo, photometric="rgb")
    with pytest.raises(DataError, match="holds 2 frames"):
        read_header(tmp_path / "two.tif")


def test_a_negative_label_value_is_named_as_it_is(tmp_path):
    tifffile.imwrite(tmp_path / "label.tif", np.array([[-1, 0], [3, 5]], dtype=np.int16))
    with pytest.raises(DataError, match=r"label value -1, outside the class indices 0\.\.254"):
        LabelImageReader().decode(tmp_path / "label.tif")
