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
