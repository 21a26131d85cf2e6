"""MONAI ``ImageReader`` s for 2D images, masks and label images, and the one input policy they all apply.

Data lists hold paths; these readers decode them inside the bundles' transforms (``ReadImaged``), so an image is in
memory only while a Dataset needs it, and every decoded item carries its metadata (source file, bit depth, EXIF
orientation applied, original shape). The policy, written once here for every 2D format:

- **Pixel depth read faithfully.** TIFFs are read with ``tifffile`` (16-bit colour TIFFs from fundus cameras stay
  16-bit), 16-bit colour PNGs with SimpleITK, everything else with Pillow. Integer images deeper than 8 bits are
  scaled to the 8-bit range by the depth they actually use (``bits_stored``: 12-bit camera data in a 16-bit
  container is divided by 4095, not 65535), so a model trained on 8-bit photographs sees the same intensities;
  the depth is recorded in the metadata.
- **Orientation tags honoured** (EXIF orientation of a JPEG photograph), so an image and its mask line up.
- **Palettes interpreted by their meaning**: a photograph's palette gives colours; a mask's palette gives the grey
  level of each index; a label image's palette is kept, so a colour table can map its colours to classes
  (:class:`clinseg.transforms.labels.LabelColorsToClassesd`).
- **Size checked from the header** before anything is decoded (``max_pixels``), so a decompression bomb is a one-line
  error, not a stalled process.
- Every failure is a :class:`~clinseg.datasets.errors.DataError` naming the file and the problem.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ImageReader, MetaTensor
from monai.transforms import MapTransform
from monai.utils import MetaKeys, ensure_tuple
from PIL import Image, ImageOps, UnidentifiedImageError

from clinseg.datasets.errors import DataError
from clinseg.datasets.io import check_size_limit
from clinseg.datasets.value_types import PositiveInt

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".ppm")
LOSSY_SUFFIXES = (".jpg", ".jpeg")
TIFF_SUFFIXES = (".tif", ".tiff")
MAX_PIXELS = 200_000_000
"""Default largest image (rows x columns) a reader decodes; a fundus photograph is 2-20 million pixels."""

MEMBER_SEPARATOR = "::"
"""Separates a file from one member inside it in a data-list path (``Subject_01.mat::12``, ``export.json::a.png``)."""


def member_path(path: str | os.PathLike, member: object) -> str:
    """The data-list path of one member (a B-scan, an image's regions) of a file holding several."""
    return f"{os.fspath(path)}{MEMBER_SEPARATOR}{member}"


def split_member(name: str | os.PathLike) -> tuple[Path, str | None]:
    """``(file, member)`` of a data-list path; ``member`` is None for a plain file."""
    text = os.fspath(name)
    if MEMBER_SEPARATOR in text:
        file, member = text.rsplit(MEMBER_SEPARATOR, 1)
        return Path(file), member
    return Path(text), None


# ---------------------------------------------------------------- header and pixels of one 2D file
def _tiff_header(path: Path) -> dict:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        pages = len(tif.pages)
        page = tif.pages[0]
        axes, shape = page.axes, page.shape
    rows, cols = shape[axes.index("Y")], shape[axes.index("X")]
    samples = shape[axes.index("S")] if "S" in axes else 1
    return {"shape": (rows, cols), "samples": samples, "frames": pages, "dtype": str(page.dtype), "format": "TIFF"}


def _orientation(image: Image.Image) -> int:
    """The EXIF orientation tag, read only where it sits in the header: Pillow's ``getexif`` decodes a whole PNG to
    look for a trailing eXIf chunk, which would undo the size check against decompression bombs."""
    if image.format == "PNG":
        raw = image.info.get("exif")
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(0x0112, 1))
    if image.format in ("JPEG", "MPO", "WEBP", "TIFF"):
        return int(image.getexif().get(0x0112, 1))
    return 1


def _header(path: Path) -> dict:
    """What the file's header says (shape after orientation, samples, frames, pixel type) without decoding pixels."""
    if path.suffix.lower() in TIFF_SUFFIXES:
        try:
            return _tiff_header(path)
        except Exception:  # not a TIFF inside (tifffile raises TiffFileError, ValueError, struct.error...): try Pillow
            pass
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies, below
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(path) as image:
            cols, rows = image.size
            # the raw mode first: reading a PNG's EXIF may decode it, which empties its tile list
            rawmode = image.tile[0][3] if image.tile and len(image.tile[0]) > 3 else None
            rawmode = rawmode[0] if isinstance(rawmode, tuple) else rawmode
            orientation = _orientation(image)
            if orientation in (5, 6, 7, 8):  # rotated by 90 degrees: rows and columns swap once honoured
                rows, cols = cols, rows
            return {
                "shape": (rows, cols),
                "mode": image.mode,
                "frames": getattr(image, "n_frames", 1),
                "format": image.format,
                "orientation": orientation,
                "wide_colour": image.format == "PNG" and isinstance(rawmode, str) and rawmode.endswith(";16B"),
            }


def read_header(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS) -> dict:
    """The header of a 2D image file (``shape`` (rows, cols) as it will be decoded, ``frames``, ...), checked against
    ``max_pixels`` and for being a single 2D image.

    Raises:
        DataError: the file is absent, not an image, holds several frames, or is larger than ``max_pixels``.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(path, "is a folder; expected an image file.")
    try:
        header = _header(path)
    except FileNotFoundError as e:
        raise DataError(path, "does not exist.") from e
    except PermissionError as e:
        raise DataError(path, "cannot be read (no permission).") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(path, f"cannot be read as an image (empty, truncated or not an image file): {e}") from e
    if header["frames"] > 1:  # e.g. a multi-page TIFF volume where one 2D image is expected
        raise DataError(path, f"holds {header['frames']} frames (pages); expected one 2D image.")
    check_size_limit(path, header["shape"], max_pixels, unit="pixels", parameter="max_pixels")
    return header


def decode_image(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS) -> tuple[np.ndarray, dict]:
    """The pixels of a 2D image file as stored, ``(rows, cols)`` or ``(rows, cols, samples)``, and its metadata.

    Palette images come back as indices with the palette in ``meta["palette"]``; EXIF orientation is applied.
    """
    path = Path(path)
    header = read_header(path, max_pixels)
    meta = {"format": header["format"], "exif_orientation": header.get("orientation", 1)}
    try:
        if header["format"] == "TIFF" and "samples" in header:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                array = page.asarray()
                if "S" in page.axes and page.axes.index("S") < page.axes.index("Y"):  # planar (S, Y, X) storage
                    array = np.moveaxis(array, 0, -1)
        elif header["wide_colour"]:  # 48/64-bit colour PNG: Pillow keeps only 8 bits per sample
            import SimpleITK as sitk

            array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    image.load()
                    image = ImageOps.exif_transpose(image)
                    if image.mode == "P":
                        palette = np.zeros((256, 3), dtype=np.uint8)  # entries a short palette lacks are black
                        colours = np.asarray(image.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)[:256]
                        palette[: len(colours)] = colours
                        meta["palette"] = palette
                        array = np.asarray(image)
                    elif image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
                        array = np.asarray(image.convert("RGB"))
                    elif image.mode == "1":
                        array = np.asarray(image, dtype=np.uint8)
                    else:
                        array = np.asarray(image)
    except DataError:
        raise
    except Exception as e:  # decoders raise OSError, ValueError, zlib/struct errors... for damaged files
        raise DataError(path, f"cannot be decoded (truncated or damaged image data): {e}") from e
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise DataError(path, f"has shape {array.shape}; expected a 2D image (rows, cols[, channels]).")
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise DataError(path, "contains NaN or infinite values.")
    meta["original_dtype"] = str(array.dtype)
    return array, meta


def bits_stored(array: np.ndarray) -> int:
    """The depth an integer image uses: 8 for 8-bit containers, else the smallest of 10/12/14/16/.../32 bits that
    holds its largest value (a 12-bit camera in a 16-bit container reports 12)."""
    if array.dtype.itemsize == 1:
        return 8
    largest = int(array.max(initial=0))
    return next((bits for bits in (8, 10, 12, 14, 16, 24, 32) if largest < 2**bits), 32)


# ---------------------------------------------------------------- the readers
class _File2DReader(ImageReader):
    """Shared parts of the 2D readers: one file per item, channel-first arrays, metadata with the source."""

    suffixes: tuple[str, ...] = IMAGE_SUFFIXES

    def __init__(self, max_pixels: PositiveInt | None = MAX_PIXELS):
        super().__init__()
        self.max_pixels = max_pixels

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        return all(str(f).lower().endswith(self.suffixes) for f in ensure_tuple(filename))

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs):
        paths = ensure_tuple(data)
        if len(paths) != 1:
            raise DataError(paths[0], f"{type(self).__name__} reads one file per item, got {len(paths)}.")
        return Path(paths[0])

    def get_data(self, img: Path) -> tuple[np.ndarray, dict]:
        array, meta = self.decode(img)
        meta.update(
            {
                MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape[1:]),
                MetaKeys.ORIGINAL_CHANNEL_DIM: 0,
                MetaKeys.AFFINE: np.eye(3),
                MetaKeys.ORIGINAL_AFFINE: np.eye(3),
                "filename_or_obj": str(img),
            }
        )
        return array, meta

    def decode(self, path: Path) -> tuple[np.ndarray, dict]:
        raise NotImplementedError


PHOTO_CHANNELS = ("rgb", "grey")


class PhotoReader(_File2DReader):
    """Photographs and scans (fundus photographs, OCT B-scans) as ``(C, rows, cols)`` float32 on the 8-bit scale.

    Args:
        channels: ``"rgb"`` (3 channels; grey images are repeated) or ``"grey"`` (1 channel; colour images become
            luminance, ITU-R 601).
        max_pixels: the largest image decoded (checked from the header).
    """

    def __init__(self, channels: Literal[PHOTO_CHANNELS] = "rgb", max_pixels: PositiveInt | None = MAX_PIXELS):
        if channels not in PHOTO_CHANNELS:
            raise ValueError(f"channels must be 'rgb' or 'grey', got {channels!r}.")
        super().__init__(max_pixels)
        self.channels = channels

    def decode(self, path: Path) -> tuple[np.ndarray, dict]:
        array, meta = decode_image(path, self.max_pixels)
        if "palette" in meta:  # a palette photograph: its indices mean the palette's colours
            array = meta.pop("palette")[array]
        if array.ndim == 3:
            if array.shape[-1] in (2, 4):  # grey or colour with alpha: the alpha channel is not image content
                array = array[..., :-1]
            if array.shape[-1] not in (1, 3):
                raise DataError(path, f"has {array.shape[-1]} channels; expected a grey or RGB image.")
        if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
            depth = 8 if array.dtype == bool else bits_stored(array)
            scale = 255.0 / (2**depth - 1) if depth > 8 else (255.0 if array.dtype == bool else 1.0)
            meta["bits_stored"] = depth
            pixels = array.astype(np.float32) * np.float32(scale)
        else:
            pixels = array.astype(np.float32)
        pixels = pixels if pixels.ndim == 3 else pixels[..., None]
        if self.channels == "grey":
            pixels = pixels if pixels.shape[-1] == 1 else pixels @ np.asarray([0.299, 0.587, 0.114], np.float32)
            pixels = pixels.reshape(*pixels.shape[:2], 1)
        elif pixels.shape[-1] == 1:
            pixels = np.repeat(pixels, 3, axis=-1)
        return np.ascontiguousarray(np.moveaxis(pixels, -1, 0)), meta


class BinaryMaskReader(_File2DReader):
    """A binary mask (a vessel annotation, a field-of-view mask) as ``(1, rows, cols)`` uint8 in {0, 1}.

    Masks are stored in many ways: 0/255, 0/1, 0/65535, palette GIFs (DRIVE's ``2nd_manual`` GIFs store indices
    {0, 1} that mean grey 3 / 253, so raw indices would find no vessel). Each is read by its meaning: the grey level
    of each pixel, the higher of the two levels is foreground. A mask with more than two levels is refused (a
    multi-class label map thresholded would silently lose its classes), except JPEG masks, whose compression blurs
    the two levels: they are thresholded at half their range.
    """

    def decode(self, path: Path) -> tuple[np.ndarray, dict]:
        array, meta = decode_image(path, self.max_pixels)
        if "palette" in meta:
            palette = meta.pop("palette").astype(np.float32)
            array = (palette @ np.asarray([0.299, 0.587, 0.114], np.float32))[array]
        elif array.ndim == 3:
            if array.shape[-1] in (2, 4):
                array = array[..., :-1]
            array = array.astype(np.float32) @ np.full(array.shape[-1], 1.0 / array.shape[-1], np.float32)
        values = np.unique(array)
        if len(values) > 2 and path.suffix.lower() not in LOSSY_SUFFIXES:
            listed = [int(v) if float(v).is_integer() else float(v) for v in values[:8]]
            raise DataError(
                path,
                f"is not a binary mask: it holds values {listed}{' ...' if len(values) > 8 else ''}; "
                "expected two (0/1 or 0/255).",
            )
        if len(values) > 2:  # lossy: halfway between darkest and brightest
            mask = array > (float(values[0]) + float(values[-1])) / 2
        else:
            mask = array > float(values[0]) if len(values) == 2 else np.full(array.shape, values[0] > 0)
        return mask.astype(np.uint8)[None], meta


class LabelImageReader(_File2DReader):
    """A label image as stored: class indices ``(1, rows, cols)`` uint8, or a colour-coded label ``(3, rows, cols)``
    uint8 that :class:`~clinseg.transforms.labels.LabelColorsToClassesd` maps to classes with the bundle's colour
    table. A palette image keeps its indices and carries its palette in the metadata, for that same table.
    """

    suffixes = (".png", ".tif", ".tiff", ".bmp", ".gif")

    def decode(self, path: Path) -> tuple[np.ndarray, dict]:
        array, meta = decode_image(path, self.max_pixels)
        if path.suffix.lower() in LOSSY_SUFFIXES:
            raise DataError(path, "is a JPEG; a label image must be stored losslessly (PNG, TIFF, BMP).")
        if np.issubdtype(array.dtype, np.floating):
            if not np.all(array == np.round(array)):
                raise DataError(path, "holds non-integer label values.")
            array = array.astype(np.int64)
        if array.ndim == 3:
            if array.shape[-1] in (2, 4):
                array = array[..., :-1]
            if array.shape[-1] == 1:
                array = array[..., 0]
        if array.ndim == 3:
            if array.dtype != np.uint8:
                raise DataError(path, f"is a {array.dtype} colour image; colour-coded labels must be 8-bit RGB.")
            meta["label_kind"] = "colour"
            return np.ascontiguousarray(np.moveaxis(array, -1, 0)), meta
        if array.min(initial=0) < 0 or array.max(initial=0) > 255:
            raise DataError(path, f"label value {int(array.max())} is too large for a class index (0..254).")
        meta["label_kind"] = "palette" if "palette" in meta else "indices"
        return array.astype(np.uint8)[None], meta


# ---------------------------------------------------------------- the loading transform
class ReadImaged(MapTransform):
    """Load each key's path with exactly one ``ImageReader``, as a ``MetaTensor`` with the reader's metadata.

    Like ``LoadImaged(keys, reader=...)``, but without MONAI's fallback to other readers: an unusable input raises the
    reader's :class:`~clinseg.datasets.errors.DataError`, which names the file and the problem, instead of a generic
    "cannot find a suitable reader". ``reader`` is one ``ImageReader`` or a list, from which each path gets the first
    whose ``verify_suffix`` accepts it (a Duke ``.mat`` B-scan or a PNG, say).
    """

    def __init__(
        self,
        keys: KeysCollection,
        reader: ImageReader | Sequence[ImageReader],
        dtype: object = None,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.readers = list(reader) if isinstance(reader, Sequence) else [reader]
        self.dtype = dtype

    def select(self, path) -> ImageReader:
        """The first reader that accepts ``path`` by its name (several readers: one per format a key may hold)."""
        if len(self.readers) == 1:
            return self.readers[0]
        for reader in self.readers:
            if reader.verify_suffix(path):
                return reader
        accepted = ", ".join(type(r).__name__ for r in self.readers)
        raise DataError(path, f"is not a format this bundle reads here (readers: {accepted}).")

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            if d[key] is None and self.allow_missing_keys:
                del d[key]
                continue
            reader = self.select(d[key])
            array, meta = reader.get_data(reader.read(d[key]))
            first = d[key][0] if isinstance(d[key], (list, tuple)) else d[key]  # a series given as its slice files
            meta.setdefault("filename_or_obj", str(first))
            tensor = torch.as_tensor(np.ascontiguousarray(array))
            if self.dtype is not None:
                tensor = tensor.to(self.dtype)
            d[key] = MetaTensor(tensor, meta=meta)
        return d


# ---------------------------------------------------------------- functional forms, for scripts and tests
def read_rgb(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """A colour photograph as ``(3, rows, cols)`` float32 on the 8-bit scale."""
    return PhotoReader("rgb", max_pixels).decode(Path(path))[0]


def read_grayscale(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """A grey scan (an OCT B-scan) as ``(1, rows, cols)`` float32 on the 8-bit scale; colour becomes luminance."""
    return PhotoReader("grey", max_pixels).decode(Path(path))[0]


def read_binary_mask(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS) -> np.ndarray:
    """A binary mask as ``(rows, cols)`` bool."""
    return BinaryMaskReader(max_pixels).decode(Path(path))[0][0] > 0
