"""MONAI ``ImageReader`` s for 2D images, masks and label images, and the one input policy they all apply.

Data lists hold paths; these readers decode them inside the bundles' transforms (``ReadImaged``), so an image is in
memory only while a Dataset needs it, and every decoded item carries its metadata (source file, bit depth, EXIF
orientation applied, original shape). The policy, written once here for every 2D format:

- **Pixel depth read faithfully.** TIFFs are read with ``tifffile`` (16-bit colour TIFFs from fundus cameras stay
  16-bit), 16-bit PNGs with libpng (``imagecodecs``; Pillow keeps 8 bits of colour), everything else with Pillow.
  Integer images deeper than 8 bits are scaled to the 8-bit range by the depth they actually use (``bits_stored``:
  12-bit camera data in a 16-bit container is divided by 4095, not 65535), so a model trained on 8-bit photographs
  sees the same intensities; the depth is recorded in the metadata.
- **Orientation tags honoured** (EXIF orientation of a JPEG photograph, a PNG's eXIf chunk, a TIFF's orientation
  tag), so an image and its mask line up: decided once from the header and applied to the pixels of every decoder
  alike; pixels whose shape differs from the header's are refused.
- **Photometric interpretation honoured**: a TIFF's palette, CMYK and YCbCr are converted as Pillow converts those
  of PNGs, GIFs and JPEGs; min-is-white TIFFs and samples that are not colour or alpha are refused. A grey reader
  refuses a TIFF whose separate colour planes hold different images: tifffile stores a stack of 3 or 4 scans so by
  default, and their luminance would be one plausible blended scan.
- **The image of a file, not its preview**: a TIFF's reduced-resolution pages (thumbnails) are skipped wherever they
  are, and an ImageJ stack counts its images even when they are stored behind one page.
- **Palettes interpreted by their meaning**: a photograph's palette gives colours; a mask's palette gives the grey
  level of each index; a label image's palette is kept, so a colour table can map its colours to classes
  (:class:`clinseg.transforms.labels.LabelColorsToClassesd`).
- **Alpha never dropped unseen**: photographs are composited onto black, masks whose alpha holds content are read
  from it or refused (the readers' docstrings say why).
- **Size checked from the header** before anything is decoded (``max_pixels``), so a decompression bomb is a one-line
  error, not a stalled process.
- **DICOM** (``.dcm``), as hospitals store photographs and scans: single-frame Ophthalmic Photography, Ophthalmic
  Tomography, external-camera and secondary-capture images, decoded by pydicom (colour in YBR comes back as RGB, a
  palette through its lookup table, MONOCHROME1 inverted to display). Images of other modalities (a CT slice, an X-ray,
  a report) are refused, and so are several frames (an OCT volume) where one 2D image is expected. The modality and
  the pixel spacing (``pixel_spacing_um``: between rows, between columns; a frame's own in a multi-frame image) are
  kept in the metadata, for a bundle to judge and measure by.
- Every failure is a :class:`~clinseg.datasets.errors.DataError` naming the file and the problem.
"""

from __future__ import annotations

import functools
import os
import struct
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
from PIL import Image, UnidentifiedImageError

from clinseg.datasets.errors import DataError
from clinseg.datasets.io import check_size_limit
from clinseg.datasets.value_types import PositiveInt

DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".ppm", *DICOM_SUFFIXES)
PHOTOGRAPH_MODALITIES = {
    "OP": "ophthalmic photography",
    "OPT": "ophthalmic tomography",
    "XC": "external-camera photography",
    "OT": "other",
    "SC": "secondary capture",
}
"""DICOM modalities whose images are photographs or scans a 2D bundle reads; any other (CT, MR, DX, US, SR, SEG, ...)
is another kind of image, or not an image."""
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
def _orient(array: np.ndarray, orientation: int) -> np.ndarray:
    """``array`` (rows, cols[, samples]) as a viewer shows it under EXIF/TIFF orientation ``orientation`` (tag 0x0112;
    1 = as stored). Applied here to the decoded pixels, the same way whichever decoder gave them."""
    transpose = (1, 0, *range(2, array.ndim))
    if orientation in (5, 6, 7, 8):
        array = array.transpose(transpose)  # the stored rows become columns
    flips = {1: (), 2: (1,), 3: (0, 1), 4: (0,), 5: (), 6: (1,), 7: (0, 1), 8: (0,)}[orientation]
    return np.flip(array, flips) if flips else array


def _png_exif_after_data(path: Path) -> bytes | None:
    """The eXIf chunk of a PNG that stores it after the image data, found by stepping over the chunks' data (nothing is
    decoded): Pillow finds such a chunk only by decoding the whole image, which would undo the size check."""
    with open(path, "rb") as f:
        f.seek(8)  # the PNG signature
        while len(head := f.read(8)) == 8:
            length, tag = struct.unpack(">I4s", head)
            if tag == b"eXIf":
                return f.read(length)
            if tag == b"IEND":
                break
            f.seek(length + 4, os.SEEK_CUR)  # the data and its CRC
    return None


def _orientation(image: Image.Image, path: Path) -> int:
    """The EXIF orientation tag, read from the header only (a PNG's eXIf chunk wherever it sits, see above)."""
    if image.format == "PNG":
        raw = image.info.get("exif") or _png_exif_after_data(path)
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(0x0112, 1))
    if image.format in ("JPEG", "MPO", "WEBP", "TIFF"):
        return int(image.getexif().get(0x0112, 1))
    return 1


# TIFF photometric interpretations (TIFF 6.0, tag 262) and extra samples (tag 338) by their meaning
MINISWHITE, MINISBLACK, RGB, PALETTE, SEPARATED, YCBCR = 0, 1, 2, 3, 5, 6
ALPHA_SAMPLES = (1, 2)  # associated (premultiplied), unassociated alpha
TIFF_DIRECT = {MINISBLACK: ("grey", 1), RGB: ("RGB", 3)}


def _tiff_image_pages(tif) -> tuple[list[int], int]:
    """``(pages, frames)``: the full-resolution pages of an open TIFF, and how many images the file holds. A
    reduced-resolution page is not one; an ImageJ stack saved with one page (tifffile's ``truncate``, large stacks)
    holds as many as its metadata's ``images``, stored one after another behind that page."""
    if len(tif.pages) == 1:
        pages = [0]
    else:
        pages = [i for i, page in enumerate(tif.pages) if not getattr(page, "is_reduced", False)] or [0]
    frames = len(pages)
    if tif.is_imagej:
        frames = max(frames, int((tif.imagej_metadata or {}).get("images", 1) or 1))
    return pages, frames


def _unlike_pages(tif, pages: list[int]) -> str | None:
    """How the full-resolution pages of a multi-page TIFF differ from its first (size, samples, interpretation,
    bits), or None when every page is an image of the same kind: the frames of one volume."""
    first = tif.pages[pages[0]]
    kind = (first.shape, int(first.photometric), int(first.bitspersample))
    for index in pages[1:]:
        page = tif.pages[index]
        if (page.shape, int(page.photometric), int(page.bitspersample)) != kind:
            return (
                f"page {index} is of shape {tuple(page.shape)} ({int(page.bitspersample)} bits), page {pages[0]} of "
                f"{tuple(first.shape)} ({int(first.bitspersample)} bits)"
            )
    return None


def _tiff_header(path: Path) -> dict:
    """:func:`_tiff_header_of` the file as it is now (a copy the caller may change)."""
    status = path.stat()
    return dict(_tiff_header_of(path, status.st_mtime_ns, status.st_size))


@functools.lru_cache(maxsize=64)
def _tiff_header_of(path: Path, mtime_ns: int, size: int) -> dict:
    """What a TIFF's image page (its first full-resolution page) says, and which decoder gives its pixels by their
    meaning (``decoder``): tifffile for grey and RGB (with at most an alpha sample besides) and palette pages, Pillow
    for CMYK and YCbCr, which it converts to RGB as it does JPEGs. Every other interpretation is refused.

    Kept per file version (``mtime_ns``, ``size``): every page of a multi-page TIFF is looked at (which pages are
    previews, whether all are alike), and each of its frames is read through its header, so an OCT volume of N
    pages would parse N x N page headers.

    Raises:
        DataError: an interpretation whose pixels would read as something else (min-is-white, a stack of images in
            the samples of one page, unspecified extra samples, other ink sets or colour spaces).
        tifffile.TiffFileError: not a TIFF inside (the caller tries Pillow).
    """
    import tifffile

    with tifffile.TiffFile(path) as tif:
        # a reduced-resolution page (NewSubfileType bit 0: a thumbnail, a pyramid level) previews the image: no frame,
        # and not the image either where a writer put it first
        pages, frames = _tiff_image_pages(tif)
        index = pages[0]
        page = tif.pages[index]
        unlike = _unlike_pages(tif, pages) if len(pages) > 1 else None
        axes, shape = page.axes, page.shape
        photometric, extras = int(page.photometric), tuple(int(e) for e in page.extrasamples)
        orientation = int(page.tags.valueof(274, 1) or 1)
        inkset, bits = int(page.tags.valueof(332, 1) or 1), int(page.bitspersample)
        planar = int(page.planarconfig) == 2  # PlanarConfiguration SEPARATE: each sample an image of its own
    rows, cols = shape[axes.index("Y")], shape[axes.index("X")]
    samples = shape[axes.index("S")] if "S" in axes else 1
    header = {"shape": (rows, cols), "samples": samples, "frames": frames, "format": "TIFF", "page": index}
    header.update(pages=pages, unlike_pages=unlike)
    header["planar"] = planar and samples > 1
    header.update(orientation=orientation, photometric=photometric, alpha=bool(extras), decoder="tifffile")
    if photometric == MINISWHITE and bits == 1:
        # a bilevel page (tifffile writes every bool array so; fax images): a set bit is ink, the drawn mark, as
        # tifffile reads it; only grey levels are ambiguous
        photometric = header["photometric"] = MINISBLACK
    elif photometric == MINISWHITE:
        raise DataError(
            path,
            "is a min-is-white TIFF (0 means white): ImageJ stores masks so on purpose, other programs store inverted "
            "grey images so, and which is meant cannot be told; save it as a min-is-black TIFF or a PNG.",
        )
    if photometric in TIFF_DIRECT:  # (after the bilevel case above)
        kind, colours = TIFF_DIRECT[photometric]
        if samples - len(extras) != colours or any(e not in ALPHA_SAMPLES for e in extras) or len(extras) > 1:
            raise DataError(
                path,
                f"is a {kind} TIFF with {samples} samples per pixel (extra samples of kinds {list(extras)}); expected "
                f"{colours} {kind} sample(s) and at most an alpha sample: images stored in the samples of one page are "
                "not one image.",
            )
    elif photometric == PALETTE:
        if samples != 1:
            raise DataError(path, f"is a palette TIFF with {samples} samples per pixel; expected 1 (the index).")
    elif photometric == SEPARATED and inkset == 1 and samples == 4 and bits == 8:
        header["decoder"] = "pillow"  # CMYK, converted to RGB as a CMYK JPEG is
    elif photometric == YCBCR and samples == 3:
        header["decoder"] = "pillow"
    else:
        try:
            name = tifffile.PHOTOMETRIC(photometric).name
        except ValueError:
            name = str(photometric)
        raise DataError(
            path,
            f"is a TIFF of photometric interpretation {name} with {samples} samples of {bits} bits; "
            "expected grey, RGB (with or without alpha), palette, 8-bit CMYK or YCbCr: save it as an RGB or grey TIFF.",
        )
    return header


def _dicom_header(path: Path) -> dict:
    """The header of a DICOM image file read without its pixel data, checked for being a photograph or a scan."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError as e:
        raise DataError(path, f"is named as DICOM but is not a DICOM file (no 'DICM' marker): {e}") from e
    except (FileNotFoundError, PermissionError):
        raise
    except Exception as e:  # pydicom raises EOFError, struct.error, ValueError... for truncated or damaged headers
        raise DataError(path, f"cannot be read as DICOM (truncated or damaged header): {e}") from e
    modality = str(ds.get("Modality", "") or "").upper()
    if modality not in PHOTOGRAPH_MODALITIES:
        kinds = ", ".join(f"{code} ({name})" for code, name in PHOTOGRAPH_MODALITIES.items())
        raise DataError(
            path,
            f"is a DICOM {'image of modality ' + modality if modality else 'file without a Modality'}, not a "
            f"photograph or a scan: expected one of {kinds}.",
        )
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if not rows or not cols:
        raise DataError(path, "is a DICOM file without an image (no Rows/Columns): a report, a structure or a key.")
    if int(ds.get("PixelRepresentation", 0) or 0) == 1:
        raise DataError(path, "stores signed pixel values; a photograph or scan stores unsigned ones.")
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    return {
        "shape": (rows, cols),
        "mode": photometric,
        "frames": frames,
        "format": "DICOM",
        "modality": modality,
        "orientation": 1,  # DICOM images are stored as displayed (no orientation tag to honour)
        "decoder": "dicom",
        "pixel_spacing_mm": _dicom_pixel_spacing(ds, frames),
    }


def _spacing_of(item) -> tuple[float, float] | None:
    """``PixelSpacing`` of a dataset or a functional group's item as (row, column) spacing in mm; None if absent or
    not two positive numbers (then nothing is measured by it: the image itself is still usable)."""
    if item is None or "PixelSpacing" not in item:
        return None
    try:
        spacing = tuple(float(v) for v in item.PixelSpacing)
    except (TypeError, ValueError):
        return None
    if len(spacing) != 2 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
        return None
    return spacing


def _pixel_measures(sequence, index: int = 0):
    """The Pixel Measures item of functional-group item ``index`` of ``sequence`` (None where there is none)."""
    if sequence is None or len(sequence) <= index:
        return None
    measures = sequence[index].get("PixelMeasuresSequence")
    return measures[0] if measures else None


def _dicom_pixel_spacing(ds, frames: int) -> list[tuple[float, float] | None]:
    """Each frame's (row, column) pixel spacing in mm, as an Ophthalmic Tomography image records it: the Pixel
    Measures of the frame's own functional groups, else of the shared ones, else the top-level PixelSpacing (a
    single-frame image); None for a frame without one."""
    shared = _spacing_of(_pixel_measures(ds.get("SharedFunctionalGroupsSequence")))
    top = _spacing_of(ds)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    return [_spacing_of(_pixel_measures(per_frame, k)) or shared or top for k in range(frames)]


def _dicom_pixels(path: Path, frame: int | None = None) -> np.ndarray:
    """A DICOM image's pixels (of one ``frame`` of several) as displayed: YBR colour as RGB (pydicom 3's default), a
    palette through its lookup table, MONOCHROME1 (0 is white) inverted."""
    import pydicom
    from pydicom.pixels import apply_color_lut, pixel_array

    ds = pydicom.dcmread(path)
    array = ds.pixel_array if frame is None else pixel_array(ds, index=frame)  # decodes that frame alone
    photometric = str(ds.get("PhotometricInterpretation", "") or "")
    if photometric == "PALETTE COLOR":
        array = apply_color_lut(array, ds)
    elif photometric == "MONOCHROME1":
        array = (2 ** int(ds.BitsStored) - 1) - array
    return array


def _header(path: Path) -> dict:
    """What the file's header says (shape after orientation, samples, frames, orientation, which decoder) without
    decoding pixels."""
    header = None
    if path.suffix.lower() in DICOM_SUFFIXES:
        header = _dicom_header(path)
    elif path.suffix.lower() in TIFF_SUFFIXES:
        try:
            header = _tiff_header(path)
        except DataError:
            raise
        except Exception:  # not a TIFF inside (tifffile raises TiffFileError, ValueError, struct.error...): Pillow
            pass
    if header is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies, below
            Image.MAX_IMAGE_PIXELS = None
            with Image.open(path) as image:
                cols, rows = image.size
                # the raw mode first: reading a PNG's EXIF may decode it, which empties its tile list
                rawmode = image.tile[0][3] if image.tile and len(image.tile[0]) > 3 else None
                rawmode = rawmode[0] if isinstance(rawmode, tuple) else rawmode
                header = {
                    "shape": (rows, cols),
                    "mode": image.mode,
                    # an MPO is a JPEG followed by further images (a preview, a stereo partner): the first is the photo
                    "frames": 1 if image.format == "MPO" else getattr(image, "n_frames", 1),
                    "format": image.format,
                    "orientation": _orientation(image, path),
                    # 16 bits per sample: Pillow keeps 8 of them for colour and grey+alpha, so libpng decodes these
                    "decoder": "png16"
                    if image.format == "PNG" and isinstance(rawmode, str) and rawmode.endswith(";16B")
                    else "pillow",
                }
    if header["orientation"] == 0:  # "not set", as some cameras write it: shown as stored
        header["orientation"] = 1
    if header["orientation"] not in range(1, 9):
        raise DataError(path, f"has EXIF orientation {header['orientation']}, not one of 1-8: its metadata is damaged.")
    if header["orientation"] in (5, 6, 7, 8):  # rotated by 90 degrees: rows and columns swap once honoured
        header["shape"] = header["shape"][::-1]
    return header


def read_header(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS) -> dict:
    """The header of a 2D image file (``shape`` (rows, cols) as it will be decoded, ``frames``, ...), checked against
    ``max_pixels`` and for being a single 2D image.

    Raises:
        DataError: the file is absent, not an image, holds several frames, is larger than ``max_pixels``, or stores
            its pixels in a way that would read as something else (a TIFF's photometric interpretation).
    """
    path, frame = _frame_of(path)
    if path.is_dir():
        raise DataError(path, "is a folder; expected an image file.")
    try:
        header = _header(path)
    except DataError:
        raise
    except FileNotFoundError as e:
        raise DataError(path, "does not exist.") from e
    except PermissionError as e:
        raise DataError(path, "cannot be read (no permission).") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, struct.error) as e:
        raise DataError(path, f"cannot be read as an image (empty, truncated or not an image file): {e}") from e
    if frame is not None:
        if not 0 <= frame < header["frames"]:
            raise DataError(path, f"has {header['frames']} frames; frame {frame} does not exist.")
        if header["format"] == "TIFF" or path.suffix.lower() in TIFF_SUFFIXES:
            _tiff_frame(path, header, frame)
        header.update(frames=1, frame=frame, frames_in_file=header["frames"])
    if "pixel_spacing_mm" in header:  # one spacing per frame: the frame read's (the first of a single image)
        header["pixel_spacing_mm"] = header["pixel_spacing_mm"][frame or 0]
    if header["frames"] > 1:  # e.g. a multi-page TIFF volume where one 2D image is expected
        raise DataError(path, f"holds {header['frames']} frames (pages); expected one 2D image.")
    check_size_limit(path, header["shape"], max_pixels, unit="pixels", parameter="max_pixels")
    return header


def _tiff_frame(path: Path, header: dict, frame: int) -> None:
    """Point ``header`` at frame ``frame`` of a multi-page TIFF: its page, or its place in an ImageJ stack stored
    behind one page (``stack_frame``).

    Raises:
        DataError: when the pages are not the frames of one volume (of other sizes or kinds), or a stack's frames
            would be decoded by Pillow.
    """
    if header.get("unlike_pages"):
        unlike = header["unlike_pages"]
        raise DataError(path, f"holds pages of different kinds, not the frames of one volume: {unlike}.")
    pages = header.get("pages")
    if pages is None:  # a TIFF Pillow reads (tifffile could not): its pages are its frames
        header["page"] = frame
    elif header["frames"] == len(pages):
        header["page"] = pages[frame]
    elif header["decoder"] == "tifffile":
        header["stack_frame"] = frame
    else:
        frames = header["frames"]
        raise DataError(path, f"is an ImageJ stack of {frames} frames in a colour space tifffile cannot read.")


def _frame_of(path: str | os.PathLike) -> tuple[Path, int | None]:
    """``(file, frame)`` of a 2D image path: ``scan.dcm::12`` names frame 12 of a multi-frame DICOM file (an OCT
    volume's B-scan), ``scan.tif::12`` page 12 of a multi-page TIFF (reduced-resolution pages not counted); a plain
    path has no frame."""
    path, member = split_member(path)
    if member is None:
        return path, None
    if path.suffix.lower() not in DICOM_SUFFIXES + TIFF_SUFFIXES or not member.isdigit():
        raise DataError(
            member_path(path, member),
            "names a frame of a file that is not a multi-frame DICOM or a multi-page TIFF image.",
        )
    return path, int(member)


def image_frames(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS) -> tuple[int, tuple[int, int]]:
    """How many frames a DICOM or TIFF image file holds (an OCT volume's B-scans) and their shape, from one read of
    its header, checked as for one image (every frame of a multi-frame DICOM image has its Rows and Columns; the
    pages of a TIFF must all be alike)."""
    header = read_header(member_path(path, 0), max_pixels)
    return header["frames_in_file"], tuple(header["shape"])


def _tiff_pixels(path: Path, meta: dict, index: int = 0, stack_frame: int | None = None) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        page = tif.pages[index]
        if stack_frame is None:
            array = page.asarray()
        else:  # an ImageJ stack behind one page: uncompressed frames one after another (ImageJ writes no other)
            stack = tifffile.memmap(path, series=0, mode="r")
            array = np.array(stack.reshape(-1, *page.shape)[stack_frame])
        if "S" in page.axes and page.axes.index("S") < page.axes.index("Y"):  # planar (S, Y, X) storage
            array = np.moveaxis(array, 0, -1)
        if int(page.photometric) == PALETTE:
            # TIFF colour maps hold 16-bit levels; some writers put 8-bit ones there (tifffile's asrgb tells them
            # apart the same way)
            colormap = page.colormap.T
            colormap = colormap >> 8 if colormap.max() > 255 else colormap
            palette = np.zeros((max(256, len(colormap)), 3), dtype=np.uint8)
            palette[: len(colormap)] = colormap
            meta["palette"] = palette
        elif page.extrasamples and page.extrasamples[0] == 1 and np.issubdtype(array.dtype, np.integer):
            # associated (premultiplied) alpha: back to straight colours, as every other decoder gives them
            alpha = array[..., -1:].astype(np.float64)
            top = np.iinfo(array.dtype).max
            colour = np.where(alpha > 0, array[..., :-1] * (top / np.maximum(alpha, 1)), 0)
            array = np.concatenate([np.clip(np.rint(colour), 0, top).astype(array.dtype), array[..., -1:]], axis=-1)
    return array


def _pillow_pixels(path: Path, meta: dict, index: int = 0) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as image:
            if index:  # a TIFF's image behind its preview page (the header chose it)
                image.seek(index)
            image.load()
            if image.mode in ("PA", "La", "RGBa"):  # palette + alpha, premultiplied alpha: straight colour + alpha
                image = image.convert("LA" if image.mode == "La" else "RGBA")
            if image.mode == "P":
                palette = np.zeros((256, 3), dtype=np.uint8)  # entries a short palette lacks are black
                colours = np.asarray(image.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)[:256]
                palette[: len(colours)] = colours
                meta["palette"] = palette
                transparency = image.info.get("transparency")
                if transparency is not None:  # a transparent index (GIF), or an opacity per index (PNG tRNS)
                    opacity = np.full(256, 255, dtype=np.uint8)
                    if isinstance(transparency, int):
                        opacity[transparency] = 0
                    else:
                        given = np.frombuffer(bytes(transparency), dtype=np.uint8)[:256]
                        opacity[: len(given)] = given
                    meta["palette_alpha"] = opacity
                return np.asarray(image)
            if image.mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
                return np.asarray(image.convert("RGB"))
            if image.mode == "1":
                return np.asarray(image, dtype=np.uint8)
            meta["alpha"] = image.mode in ("LA", "RGBA")
            return np.asarray(image)


def decode_image(path: str | os.PathLike, max_pixels: int | None = MAX_PIXELS) -> tuple[np.ndarray, dict]:
    """The pixels of a 2D image file, ``(rows, cols)`` or ``(rows, cols, samples)``, as displayed, and its metadata.

    The orientation is decided once, from the header (:func:`read_header`), and applied here to the pixels of every
    decoder alike; pixels whose shape differs from the one the header announced are refused. Palette images come
    back as indices with the palette in ``meta["palette"]`` (and ``meta["palette_alpha"]``, the opacity of each
    index, when the palette has transparency); ``meta["alpha"]`` is True when the last sample is an alpha channel.
    """
    header = read_header(path, max_pixels)
    path = _frame_of(path)[0]
    orientation = header["orientation"]
    meta = {"format": header["format"], "exif_orientation": orientation}
    if header.get("modality"):
        meta["modality"] = header["modality"]
    if header.get("pixel_spacing_mm"):  # (row, column): between rows is along the A-scan (a layer's thickness)
        meta["pixel_spacing_um"] = tuple(1000.0 * v for v in header["pixel_spacing_mm"])
    if header.get("planar"):
        meta["planar"] = True
    try:
        if header["decoder"] == "tifffile":
            meta["alpha"] = header["alpha"]
            array = _tiff_pixels(path, meta, header.get("page", 0), header.get("stack_frame"))
        elif header["decoder"] == "dicom":
            array = _dicom_pixels(path, header.get("frame"))
        elif header["decoder"] == "png16":  # 16 bits per sample, every colour type, as stored (no EXIF applied)
            import imagecodecs

            array = imagecodecs.png_decode(path.read_bytes())
            meta["alpha"] = array.ndim == 3 and array.shape[-1] in (2, 4)
        else:
            array = _pillow_pixels(path, meta, header.get("page", 0))
    except DataError:
        raise
    except Exception as e:  # decoders raise OSError, ValueError, zlib/struct errors... for damaged files
        raise DataError(path, f"cannot be decoded (truncated or damaged image data): {e}") from e
    if not meta.get("alpha"):
        meta.pop("alpha", None)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3):
        raise DataError(path, f"has shape {array.shape}; expected a 2D image (rows, cols[, channels]).")
    array = _orient(array, orientation)
    if tuple(array.shape[:2]) != tuple(header["shape"]):
        raise DataError(
            path,
            f"decodes to {array.shape[0]} x {array.shape[1]} pixels but its header announces {header['shape'][0]} x "
            f"{header['shape'][1]} (rows x cols, orientation {orientation} applied): the file is inconsistent.",
        )
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise DataError(path, "contains NaN or infinite values.")
    meta["original_dtype"] = str(array.dtype)
    return np.ascontiguousarray(array), meta


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
        # a frame of a multi-frame DICOM file (``scan.dcm::12``) by its file's suffix
        return all(str(split_member(f)[0]).lower().endswith(self.suffixes) for f in ensure_tuple(filename))

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
LUMA = np.asarray([0.299, 0.587, 0.114], np.float32)  # ITU-R 601
COLOUR_CHROMA = 24.0
"""The spread between a pixel's largest and smallest channel (8-bit scale) above which it has a colour: a grey image
saved as colour, or through JPEG's chroma subsampling, stays at a few levels."""


def _split_alpha(array: np.ndarray, meta: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """``(colour, alpha)`` of a decoded image: alpha None when the image has no alpha channel."""
    if meta.pop("alpha", False) and array.ndim == 3:
        colour = array[..., :-1]
        return (colour[..., 0] if colour.shape[-1] == 1 else colour), array[..., -1]
    return array, None


def _opacity(alpha: np.ndarray | None) -> np.ndarray | None:
    """An alpha channel as opacity in [0, 1]; None when there is none or every pixel is fully opaque (it then says
    nothing, and dropping it loses nothing)."""
    if alpha is None:
        return None
    top = np.iinfo(alpha.dtype).max if np.issubdtype(alpha.dtype, np.integer) else 1.0
    opacity = alpha.astype(np.float32) / np.float32(top)
    return None if (opacity >= 1).all() else opacity


def _one_image(samples: np.ndarray) -> bool:
    """Every sample of a ``(rows, cols, samples)`` image holds the same picture (a grey image stored as colour)."""
    return samples.ndim < 3 or bool((samples == samples[..., :1]).all())


def _one_colour(colour: np.ndarray) -> bool:
    """Every pixel has the same colour (the same value in each channel)."""
    return bool((colour == colour.reshape(-1, *colour.shape[2:])[0]).all())


class PhotoReader(_File2DReader):
    """Photographs and scans (fundus photographs, OCT B-scans) as ``(C, rows, cols)`` float32 on the 8-bit scale.

    An image with an alpha channel that is not fully opaque is composited onto black: a fundus camera's frame and
    an OCT scan's background are dark, so a frame made transparent becomes what the camera recorded there, whereas
    the colour left under transparent pixels is whatever the editing program kept (often white), which read as it
    is passes for a bright field of view. A fully transparent image shows nothing and is refused.

    Args:
        channels: ``"rgb"`` (3 channels; grey images are repeated) or ``"grey"`` (1 channel; colour images become
            luminance, ITU-R 601, and ``colour_fraction`` in the metadata is the share of their pixels that had a
            colour, :data:`COLOUR_CHROMA`; a TIFF holding different images in separate colour planes is refused).
        max_pixels: the largest image decoded (checked from the header).
    """

    def __init__(self, channels: Literal[PHOTO_CHANNELS] = "rgb", max_pixels: PositiveInt | None = MAX_PIXELS):
        if channels not in PHOTO_CHANNELS:
            raise ValueError(f"channels must be 'rgb' or 'grey', got {channels!r}.")
        super().__init__(max_pixels)
        self.channels = channels

    def decode(self, path: Path) -> tuple[np.ndarray, dict]:
        array, meta = decode_image(path, self.max_pixels)
        colour = array[..., :-1] if meta.get("alpha") else array
        if self.channels == "grey" and meta.get("planar") and not _one_image(colour):
            # tifffile stores a (3, rows, cols) or (4, rows, cols) array (a stack of grey scans: B-scans of a volume)
            # as the separate colour planes of one RGB page by default; its luminance would blend them into one
            # plausible scan, and the 4th would act as opacity. A grey scan in colour planes has equal planes.
            raise DataError(
                path,
                f"stores {array.shape[-1]} different images in the separate planes of one RGB page, as tifffile "
                f"writes a ({array.shape[-1]}, rows, cols) array (a stack of scans) by default; read as one grey "
                "scan they would be blended: save each scan as its own grey image (or a volume as multi-frame DICOM).",
            )
        if "palette" in meta:  # a palette photograph: its indices mean the palette's colours (and opacities)
            opacities = meta.pop("palette_alpha", None)
            alpha = None if opacities is None else opacities[array]
            array = meta.pop("palette")[array]
        else:
            array, alpha = _split_alpha(array, meta)
        if array.ndim == 3 and array.shape[-1] not in (1, 3):
            raise DataError(path, f"has {array.shape[-1]} channels; expected a grey or RGB image.")
        if np.issubdtype(array.dtype, np.integer) or array.dtype == bool:
            depth = 8 if array.dtype == bool else bits_stored(array)
            scale = 255.0 / (2**depth - 1) if depth > 8 else (255.0 if array.dtype == bool else 1.0)
            meta["bits_stored"] = depth
            pixels = array.astype(np.float32) * np.float32(scale)
        else:
            pixels = array.astype(np.float32)
        pixels = pixels if pixels.ndim == 3 else pixels[..., None]
        opacity = _opacity(alpha)
        if opacity is not None:
            if not opacity.any():
                raise DataError(path, "is fully transparent (its alpha channel is 0 everywhere): it shows nothing.")
            pixels = pixels * opacity[..., None]
            meta["alpha_composited"] = True
        if self.channels == "grey":
            if pixels.shape[-1] == 3:  # how much real colour the luminance drops, for the caller to judge
                chroma = pixels.max(axis=-1) - pixels.min(axis=-1)
                meta["colour_fraction"] = float((chroma > COLOUR_CHROMA).mean())
            pixels = pixels if pixels.shape[-1] == 1 else pixels @ LUMA
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

    An alpha channel that is not fully opaque may hold the mask itself (ink drawn on a transparent layer: one colour
    throughout, the mask in the alpha), so it is read as the mask when the colour channels are one colour, and
    accepted when it splits the image exactly as the colour does. Any other alpha is refused: taking either the
    colour or the alpha could give a mask that looks plausible and is the wrong one.
    """

    def decode(self, path: Path) -> tuple[np.ndarray, dict]:
        array, meta = decode_image(path, self.max_pixels)
        if "palette" in meta:
            opacities = meta.pop("palette_alpha", None)
            alpha = None if opacities is None else opacities[array]
            palette = meta.pop("palette")
            colour = palette[array]
            # the grey of each palette entry, then looked up: one colour is one grey level (a matrix product over the
            # pixels may round one colour to two levels an ulp apart, which read as a third mask value)
            array = (palette.astype(np.float32) @ LUMA)[array]
        else:
            colour, alpha = _split_alpha(array, meta)
            array = colour
            if array.ndim == 3:  # the channels' mean, pixel by pixel (not a matrix product, as above)
                array = sum(array[..., c].astype(np.float32) for c in range(array.shape[-1])) / np.float32(
                    array.shape[-1]
                )
        if _opacity(alpha) is not None:
            array = self._mask_with_alpha(path, colour, array, alpha)
            meta["alpha_mask"] = True
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

    @staticmethod
    def _mask_with_alpha(path: Path, colour: np.ndarray, grey: np.ndarray, alpha: np.ndarray) -> np.ndarray:
        if _one_colour(colour):
            return alpha
        grey_levels, alpha_levels = np.unique(grey), np.unique(alpha)
        if len(grey_levels) == 2 and len(alpha_levels) == 2:
            if np.array_equal(grey > grey_levels[0], alpha > alpha_levels[0]):
                return grey
        raise DataError(
            path,
            "alpha channel carries content: it is not fully opaque and does not match the colour channels, so "
            "which of them holds the mask cannot be told; save the mask as a grey image without alpha.",
        )


class LabelImageReader(_File2DReader):
    """A label image as stored: class indices ``(1, rows, cols)`` uint8, or a colour-coded label ``(3, rows, cols)``
    uint8 that :class:`~clinseg.transforms.labels.LabelColorsToClassesd` maps to classes with the bundle's colour
    table. A palette image keeps its indices and carries its palette in the metadata, for that same table.

    An alpha channel is dropped: a colour-coded label goes through the colour table, which refuses every colour it
    does not know, and an index label's values are its classes whatever their display opacity. Only a label of one
    colour with a varying alpha is refused: its classes are drawn in the alpha channel, which no table reads.
    """

    # JPEG is taken so that its own refusal names the problem, not "a format this bundle does not read"
    suffixes = (".png", ".tif", ".tiff", ".bmp", ".gif", *LOSSY_SUFFIXES)

    def decode(self, path: Path) -> tuple[np.ndarray, dict]:
        if path.suffix.lower() in LOSSY_SUFFIXES:
            raise DataError(
                path,
                "is a JPEG; a label image must be stored losslessly (PNG, TIFF, BMP): JPEG compression blurs the "
                "class values and colours into others along every edge.",
                "Export the annotation again as PNG.",
            )
        array, meta = decode_image(path, self.max_pixels)
        meta.pop("palette_alpha", None)  # a palette index is its class, however transparent it is shown
        array, alpha = _split_alpha(array, meta)
        if _opacity(alpha) is not None and _one_colour(array):
            raise DataError(
                path,
                "alpha channel carries content: the label is one colour throughout and its shapes are in the alpha "
                "channel; save the classes as indices or colours without alpha.",
            )
        if np.issubdtype(array.dtype, np.floating):
            if not np.all(array == np.round(array)):
                raise DataError(path, "holds non-integer label values.")
            array = array.astype(np.int64)
        if array.ndim == 3:
            if array.dtype != np.uint8:
                raise DataError(path, f"is a {array.dtype} colour image; colour-coded labels must be 8-bit RGB.")
            meta["label_kind"] = "colour"
            return np.ascontiguousarray(np.moveaxis(array, -1, 0)), meta
        low, high = int(array.min(initial=0)), int(array.max(initial=0))
        if low < 0 or high > 255:
            raise DataError(
                path,
                f"holds label value {low if low < 0 else high}, outside the class indices 0..254 (255: unannotated).",
            )
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
