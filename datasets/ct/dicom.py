"""Read a CT series from a folder of DICOM slice files into a Hounsfield-unit volume with its LPS affine, and write one.

Reading is done in two passes: all headers first (without pixel data) to group the files into series and to check
the geometry of the chosen series, then the pixel data of that series only. Slices are ordered by the projection
of ``ImagePositionPatient`` onto the slice normal, never by file name or ``InstanceNumber``, which exporters and
anonymisers do not keep meaningful. Every problem that would give a wrong volume (a mixed or incomplete series,
duplicated or missing slices, unequal spacing, undecodable pixel data) raises a :class:`~datasets.errors.DataError`
naming the folder or file and the problem, instead of returning a silently distorted volume.

Anonymised series may carry empty ``SeriesInstanceUID`` and ``SOPInstanceUID``; their slices are grouped by study,
series number and image geometry instead.

The writer makes one DICOM file per slice (CT Image Storage) from a volume and an LPS affine; the synthetic phantom
generator and the tests use it, and ``read_ct_series`` gives back what it wrote.
"""

from __future__ import annotations

import itertools
import logging
import os
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pydicom.valuerep import DSfloat

from clinseg.datasets.errors import DataError, NoUsableDataError
from clinseg.datasets.io import atomic_write, check_size_limit

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")
# one file holds a whole series, its geometry per frame in functional group sequences
MULTI_FRAME_CT_STORAGE = {
    UID("1.2.840.10008.5.1.4.1.1.2.1"),  # Enhanced CT Image Storage
    UID("1.2.840.10008.5.1.4.1.1.2.2"),  # Legacy Converted Enhanced CT Image Storage
}
DICOMDIR_STORAGE = UID("1.2.840.10008.1.3.10")
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic", ".ima"}

ORIENTATION_TOL = 1e-4  # direction cosines of one series agree to this (exporters print ~6 decimals)
PIXEL_SPACING_REL_TOL = 1e-4
DUPLICATE_TOL_MM = 0.01  # two slices closer than this along the normal are the same slice
GAP_FACTOR = 1.5  # a step this many times the median step means missing slices
SPACING_REL_TOL = 0.01  # steps may differ from the median by 1 % ...
SPACING_ABS_TOL_MM = 0.01  # ... or by 0.01 mm, whichever is larger (positions are rounded when printed)
IN_PLANE_TOL_MM = 0.05  # a slice origin off the line through the others by more than this is not stacked
# a slice may lie this fraction of the step away from where the evenly spaced volume puts it. Steps that each pass
# the spacing check can still add up (1.000 mm for half a series, 1.0098 mm for the other half: 1.5 mm in the middle
# of 600 slices). 3D Slicer corrects any misplacement above 0.001 mm with a grid transform and ITK warns above 1e-4
# of the step per step; a volume on one even grid cannot be corrected, so it is refused above a tenth of a slice,
# more than printed positions are rounded by and less than the interpolation to the network's spacing moves a value
GRID_TOL_STEPS = 0.1
SLICE_THICKNESS_REL_TOL = 1e-3  # two reconstructions of one series UID differ in SliceThickness (GDCM splits on it)

DECODER_HINT = (
    "Compressed pixel data needs a decoder plugin for pydicom: pylibjpeg with pylibjpeg-openjpeg (JPEG 2000) or "
    "pylibjpeg-libjpeg (JPEG, JPEG-LS), or python-gdcm. Install them into the environment that reads the data."
)


@dataclass
class CTVolume:
    """A CT volume in Hounsfield units with the affine that places it in DICOM patient space (LPS, mm).

    ``hu[i, j, k]`` is column ``i``, row ``j`` of slice ``k``; slices are sorted along the slice normal (the cross
    product of the row and column directions), increasing, so the affine is right-handed. ``files`` are the slice
    files in that order, ``intercepts`` their RescaleIntercept.
    """

    hu: np.ndarray
    affine_lps: np.ndarray
    series_uid: str
    description: str
    files: list[str]
    intercepts: list[float] = field(default_factory=list)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel size in mm along ``i`` (between columns), ``j`` (between rows) and ``k`` (between slices)."""
        return tuple(float(np.linalg.norm(self.affine_lps[:3, axis])) for axis in range(3))


@dataclass
class SeriesInfo:
    """One series found in a folder. ``uid`` is empty for anonymised series; ``files`` are sorted by name."""

    uid: str
    description: str
    modality: str
    number: int | None
    n_files: int
    files: list[str]


# --------------------------------------------------------------------------------------------------------------
# reading


def _read_header(path: Path) -> Dataset | None:
    """The header of a DICOM image file without its pixel data; None for a file that is not a DICOM image.

    Files without the ``DICM`` marker are skipped quietly (README, checksums, thumbnails), unless they are named like
    DICOM files: then they are damaged. DICOMDIR and other known non-image objects are skipped too.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as e:
        raise DataError(path, f"cannot be opened ({e.strerror}).") from e
    has_marker = head[128:132] == b"DICM"
    # some old exporters write no 128-byte preamble: the file starts directly with a group 0002 or 0008 tag
    bare = not has_marker and head[:2] in (b"\x02\x00", b"\x08\x00")
    if not has_marker and not bare:
        if path.suffix.lower() in DICOM_SUFFIXES:
            raise DataError(path, "is named like a DICOM file but has no 'DICM' marker (empty or truncated file?).")
        logger.debug(f"{path}: not a DICOM file, ignored")
        return None
    try:
        ds = _dcmread(path, stop_before_pixels=True, force=bare)
    except DataError:
        if bare and path.suffix.lower() not in DICOM_SUFFIXES:
            logger.debug(f"{path}: not a DICOM file, ignored")
            return None
        raise
    if "Rows" not in ds:
        sop_class = _sop_class(ds)
        # pydicom names the standard classes; image classes have "Image" in the name
        if sop_class == DICOMDIR_STORAGE or (sop_class.name != str(sop_class) and "Image" not in sop_class.name):
            logger.debug(f"{path}: {sop_class.name} is not an image, ignored")
            return None
        # pydicom stops quietly at the end of a truncated file, so a missing Rows is how truncation shows here
        raise DataError(path, "has an incomplete DICOM header (no Rows (0028,0010)): the file is truncated or damaged.")
    return ds


def _dcmread(path: Path, **kwargs) -> Dataset:
    """``pydicom.dcmread`` that fails on damaged and truncated files instead of returning what it could read."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, **kwargs)
        except Exception as e:  # pydicom raises InvalidDicomError, EOFError, struct.error, ValueError... on damage
            raise DataError(path, f"cannot be parsed as DICOM (truncated or damaged file): {e}") from e
    for warning in caught:
        # pydicom only warns when the file ends inside a sequence or the encapsulated pixel data
        if "end of file" in str(warning.message).lower():
            raise DataError(path, f"is truncated: {warning.message}")
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return ds


def _sop_class(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    value = (meta.get("MediaStorageSOPClassUID") if meta is not None else None) or ds.get("SOPClassUID") or ""
    return UID(str(value).strip())


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _int_or_none(value) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _rounded(value, decimals: int) -> tuple | str | None:
    """A hashable, rounded form of a multi-valued number, for grouping only (bad values group as their text)."""
    if value is None:
        return None
    try:
        return tuple(round(float(v), decimals) for v in (value if isinstance(value, Sequence) else [value]))
    except (TypeError, ValueError):
        return str(value)


def _floats(path: Path, ds: Dataset, keyword: str, tag: str, count: int, why: str) -> np.ndarray:
    """A required multi-valued decimal attribute as floats, or a DataError saying what is missing and why it matters."""
    value = ds.get(keyword)
    if value is None or value == "":
        raise DataError(path, f"has no {keyword} {tag}: {why}.")
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    try:
        numbers = np.array([float(v) for v in values], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(path, f"{keyword} {tag} is not numeric ({value!r}).") from e
    if numbers.size != count or not np.all(np.isfinite(numbers)):
        raise DataError(path, f"{keyword} {tag} must be {count} finite numbers, found {value!r}.")
    return numbers


def _float_or(ds: Dataset, keyword: str, default: float, path: Path) -> float:
    value = ds.get(keyword)
    if value is None or value == "":
        return default
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise DataError(path, f"{keyword} is not a number ({value!r}).") from e


def _series_key(ds: Dataset) -> tuple:
    """The series a slice belongs to: its SeriesInstanceUID, or for anonymised files what one series shares: its
    study, frame of reference, number, description, reconstruction kernel and geometry. Anonymisers that empty the
    UIDs often empty the study UID and the series number too; two reconstructions of one scan (a soft-tissue and a
    lung kernel, of one field of view) then differ only in description and kernel, and as one series their slices
    would interleave into one plausible volume."""
    uid = _text(ds, "SeriesInstanceUID")
    if uid:
        return ("uid", uid)
    return (
        "geometry",
        _text(ds, "StudyInstanceUID"),
        _text(ds, "FrameOfReferenceUID"),
        _int_or_none(ds.get("SeriesNumber")),
        _text(ds, "SeriesDescription"),
        _text(ds, "ConvolutionKernel"),
        _rounded(ds.get("ImageOrientationPatient"), 3),
        _int_or_none(ds.get("Rows")),
        _int_or_none(ds.get("Columns")),
        _rounded(ds.get("PixelSpacing"), 4),
    )


def _most_common(values: list[str]) -> str:
    return Counter(values).most_common(1)[0][0] if values else ""


def _scan(
    folder: str | os.PathLike, files: Sequence[str | os.PathLike] | None = None
) -> list[tuple[SeriesInfo, list[tuple[Path, Dataset]]]]:
    """All series in ``folder`` (not recursive), or among ``files`` (named as in ``folder`` in errors), each with
    its (file, header) pairs sorted by file name."""
    folder = Path(folder)
    if files is not None:
        candidates = sorted(Path(f) for f in files)
        missing = [p for p in candidates if not p.is_file()]
        if missing:
            raise DataError(missing[0], "does not exist (or is not a file).")
    else:
        if not folder.exists():
            raise DataError(folder, "does not exist.")
        if not folder.is_dir():
            raise DataError(folder, "is not a folder; pass the folder that holds the DICOM slice files.")
        # dot files are hidden files and the writer's unfinished temporary files
        candidates = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    groups: dict[tuple, list[tuple[Path, Dataset]]] = {}
    for path in candidates:
        ds = _read_header(path)
        if ds is not None:
            groups.setdefault(_series_key(ds), []).append((path, ds))
    if not groups:
        subfolders = [p.name for p in folder.iterdir() if p.is_dir()] if folder.is_dir() and files is None else []
        where = f"; its subfolders {sorted(subfolders)[:5]} are not searched" if subfolders else ""
        raise NoUsableDataError(folder, f"holds no DICOM image files ({len(candidates)} other files ignored{where}).")
    series = []
    for headers in groups.values():
        first = headers[0][1]
        info = SeriesInfo(
            uid=_text(first, "SeriesInstanceUID"),
            description=_most_common([_text(ds, "SeriesDescription") for _, ds in headers]),
            modality=_most_common([_text(ds, "Modality") for _, ds in headers]),
            number=_int_or_none(first.get("SeriesNumber")),
            n_files=len(headers),
            files=[str(path) for path, _ in headers],
        )
        series.append((info, headers))
    series.sort(key=lambda s: (s[0].number is None, s[0].number or 0, s[0].description, s[0].uid))
    return series


def list_ct_series(folder: str | os.PathLike) -> list[SeriesInfo]:
    """The series of DICOM images in ``folder`` (of any modality), sorted by series number.

    Files that are not DICOM images (DICOMDIR, README, ...) are ignored. Raises :class:`DataError` when the folder
    holds no DICOM image at all, or a file looks like DICOM but cannot be parsed.
    """
    return [info for info, _ in _scan(folder)]


def _describe(series: list[SeriesInfo]) -> str:
    lines = []
    for info in series:
        uid = info.uid or "'' (empty, anonymised)"
        number = "-" if info.number is None else info.number
        lines.append(
            f"  - series_uid={uid}  series_description={info.description!r}  number={number}  "
            f"modality={info.modality or '?'}  files={info.n_files}"
        )
    return "\n".join(lines)


def _select(
    folder: Path,
    series: list[tuple[SeriesInfo, list[tuple[Path, Dataset]]]],
    series_uid: str | None,
    series_description: str | None,
) -> tuple[SeriesInfo, list[tuple[Path, Dataset]]]:
    """The one series the selectors pick, or a DataError listing the series and how to pick one."""
    how = (
        "Select one with series_uid=... or series_description=... (exact, or a unique case-insensitive part), or "
        "move each series into a folder of its own."
    )
    infos = [info for info, _ in series]
    chosen = series
    if series_uid is not None:
        chosen = [s for s in chosen if s[0].uid == series_uid.strip()]
    if series_description is not None:
        exact = [s for s in chosen if s[0].description == series_description]
        part = [s for s in chosen if series_description.lower() in s[0].description.lower()]
        chosen = exact or part
    selectors = ", ".join(
        f"{name}={value!r}"
        for name, value in (("series_uid", series_uid), ("series_description", series_description))
        if value is not None
    )
    if not chosen:
        raise DataError(folder, f"no series matches {selectors}. The folder holds:\n{_describe(infos)}")
    if len(chosen) > 1:
        if selectors:
            problem = f"{len(chosen)} series match {selectors}:\n{_describe([s[0] for s in chosen])}"
        else:
            problem = f"holds {len(chosen)} series:\n{_describe(infos)}"
        raise DataError(folder, problem, how)
    return chosen[0]


def _image_types(image_type) -> set[str]:
    """The values of an ImageType (a list of strings, one backslash-separated string, or None), upper case."""
    if image_type is None:
        return set()
    values = image_type.split("\\") if isinstance(image_type, str) else [str(v) for v in image_type]
    return {v.strip().upper() for v in values}


def is_localizer(image_type) -> bool:
    """Whether an ImageType value (a list of strings, one backslash-separated string, or None) marks a localizer
    (scout, topogram)."""
    return "LOCALIZER" in _image_types(image_type)


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"  # the SOP classes of screenshots: 1.2.840.10008.5.1.4.1.1.7(.1-.4)
GREY = ("MONOCHROME1", "MONOCHROME2")


def is_capture(ds: Dataset) -> bool:
    """Whether a DICOM image is a screenshot saved beside the slices (a dose report's page, a 3D rendering): colour
    pixels, ImageType SCREEN SAVE, or a Secondary Capture without a place in space. Grey Secondary Capture slices
    with their geometry (what ITK and many converters write for a CT) are slices, and so are reformatted ones
    (ImageType DERIVED\\SECONDARY)."""
    sop_class = str(ds.get("SOPClassUID", "") or "")
    colour = _text(ds, "PhotometricInterpretation").upper() not in ("", *GREY)
    screen_save = "SCREEN SAVE" in _image_types(ds.get("ImageType"))
    placed = "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds
    return colour or screen_save or (sop_class.startswith(SECONDARY_CAPTURE) and not placed)


def _without_localizers(
    folder: Path, series: list[tuple[SeriesInfo, list[tuple[Path, Dataset]]]]
) -> list[tuple[SeriesInfo, list[tuple[Path, Dataset]]]]:
    """The series without their localizer images and screenshots. Exports put the scout beside the axial slices,
    and some a dose report's page or a rendering (Secondary Capture), as a series of their own or under the same
    SeriesInstanceUID; they are never part of the volume, and their other orientation or missing geometry would
    make the folder two series, or refuse the one series."""
    kept = []
    for info, headers in series:
        slices = [(p, ds) for p, ds in headers if not is_localizer(ds.get("ImageType")) and not is_capture(ds)]
        skipped = len(headers) - len(slices)
        if skipped:
            logger.warning(
                f"{folder}: {skipped} localizer (scout) or screenshot image(s) of series {info.description!r} left out"
            )
        if slices:
            files = [str(path) for path, _ in slices]
            kept.append((replace(info, n_files=len(slices), files=files) if skipped else info, slices))
    if not kept:
        raise DataError(
            folder,
            "holds only localizer (scout) images (ImageType LOCALIZER) or screenshots (Secondary Capture, colour), "
            "no CT series to read.",
        )
    return kept


def _majority_check(folder: Path, headers: list[tuple[Path, Dataset]], name: str, values: list, same) -> None:
    """Raise on the first file whose ``values`` entry differs from the most common one (a mixed series)."""
    reference_value = Counter(values).most_common(1)[0][0]
    for (path, _), value in zip(headers, values, strict=True):
        if not same(value, reference_value):
            others = sum(1 for v in values if same(v, reference_value))
            raise DataError(
                path,
                f"mixed series: {name} is {value} but {others} other files of the series in {folder} have "
                f"{reference_value}. Keep one series per folder (or select the right one).",
            )


def _check_geometry(folder: Path, headers: list[tuple[Path, Dataset]]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Check that the slices form one image stack; return orientation (6,), pixel spacing (2,), rows, columns."""
    why_position = "the slice cannot be placed in space (an enhanced multi-frame or a secondary-capture image?)"
    iops, spacings, shapes = [], [], []
    for path, ds in headers:
        iops.append(_floats(path, ds, "ImageOrientationPatient", "(0020,0037)", 6, why_position))
        _floats(path, ds, "ImagePositionPatient", "(0020,0032)", 3, why_position)
        spacings.append(_floats(path, ds, "PixelSpacing", "(0028,0030)", 2, "the voxel size is unknown"))
        shapes.append((_int_or_none(ds.get("Rows")), _int_or_none(ds.get("Columns"))))
    rows_values = [s[0] for s in shapes]
    cols_values = [s[1] for s in shapes]
    _majority_check(folder, headers, "Rows", rows_values, lambda a, b: a == b)
    _majority_check(folder, headers, "Columns", cols_values, lambda a, b: a == b)
    rounded_iops = [tuple(round(float(x), 6) for x in v) for v in iops]
    _majority_check(
        folder,
        headers,
        "ImageOrientationPatient",
        rounded_iops,
        lambda a, b: np.allclose(a, b, rtol=0, atol=ORIENTATION_TOL),
    )
    _majority_check(
        folder,
        headers,
        "PixelSpacing",
        [tuple(round(float(x), 6) for x in v) for v in spacings],
        lambda a, b: np.allclose(a, b, rtol=PIXEL_SPACING_REL_TOL, atol=0),
    )
    # two reconstructions of one scan (1 mm and 3 mm slices) exported with one SeriesInstanceUID and interleaved
    # positions would pass every position check as one finely stepped volume whose slices alternate in blur and noise
    # (an absent, empty or unreadable SliceThickness, type 2, says nothing and is left out)
    thick = [(item, _rounded(item[1].get("SliceThickness"), 6)) for item in headers]
    thick = [(item, v[0]) for item, v in thick if isinstance(v, tuple) and len(v) == 1 and np.isfinite(v[0])]
    if thick:
        _majority_check(
            folder,
            [item for item, _ in thick],
            "SliceThickness",
            [value for _, value in thick],
            lambda a, b: abs(a - b) <= SLICE_THICKNESS_REL_TOL * max(abs(a), abs(b)),
        )
    # the unrounded orientation of a file that agrees with the majority keeps the full precision of the header
    majority = Counter(rounded_iops).most_common(1)[0][0]
    iop = iops[rounded_iops.index(majority)]
    row_cos, col_cos = iop[:3], iop[3:]
    if (
        abs(np.linalg.norm(row_cos) - 1) > 1e-3
        or abs(np.linalg.norm(col_cos) - 1) > 1e-3
        or abs(np.dot(row_cos, col_cos)) > 1e-3
    ):
        raise DataError(
            headers[0][0], f"ImageOrientationPatient {list(iop)} is not two orthogonal unit vectors (damaged header)."
        )
    spacing = np.median(np.array(spacings), axis=0)
    if np.any(spacing <= 0):
        raise DataError(headers[0][0], f"PixelSpacing {list(spacing)} must be positive.")
    rows, cols = Counter(rows_values).most_common(1)[0][0], Counter(cols_values).most_common(1)[0][0]
    if not rows or not cols:
        raise DataError(headers[0][0], f"has an empty image (Rows {rows}, Columns {cols}).")
    return iop, spacing, rows, cols


# what tells the acquisitions of one series apart: a multi-phase cardiac CT, a dynamic series, two reconstructions
ACQUISITION_ATTRIBUTES = (
    "AcquisitionNumber",
    "TemporalPositionIndex",
    "NominalPercentageOfCardiacPhase",
    "TriggerTime",
    "AcquisitionTime",
    "ConvolutionKernel",
)
# those that number acquisitions (a trigger or acquisition time can differ from slice to slice within one)
ACQUISITION_GROUPS = ("AcquisitionNumber", "TemporalPositionIndex", "NominalPercentageOfCardiacPhase")


def _acquisition_differences(a: Dataset, b: Dataset) -> str:
    """The acquisition attributes two slices differ in, as ``AcquisitionNumber (1, 2)``; empty when none."""
    return ", ".join(
        f"{name} ({_text(a, name) or 'none'}, {_text(b, name) or 'none'})"
        for name in ACQUISITION_ATTRIBUTES
        if _text(a, name) != _text(b, name)
    )


def _check_acquisitions_apart(folder: Path, headers: list[tuple[Path, Dataset]], positions: np.ndarray) -> None:
    """Refuse slices of several acquisitions (different ``ACQUISITION_GROUPS`` values) whose position ranges
    interleave: two phases offset by half a slice sort into one evenly spaced stack of twice the slices, alternating
    between them, which reads as one plausible volume. Acquisitions one after another along the body (a scan in
    several rotations, each numbered) cover ranges that do not overlap, and are one volume."""
    ranges: dict[tuple[str, ...], list[float]] = {}
    for (_, ds), position in zip(headers, positions, strict=True):
        key = tuple(_text(ds, name) for name in ACQUISITION_GROUPS)
        low, high = ranges.setdefault(key, [position, position])
        ranges[key] = [min(low, position), max(high, position)]
    if len(ranges) < 2:
        return
    spans = sorted(ranges.items(), key=lambda item: item[1][0])
    for (first, (_, first_high)), (second, (second_low, _)) in itertools.pairwise(spans):
        if second_low < first_high - DUPLICATE_TOL_MM:

            def named(key: tuple[str, ...]) -> str:
                return ", ".join(f"{n} {v}" for n, v in zip(ACQUISITION_GROUPS, key, strict=True) if v) or "none"

            raise DataError(
                folder,
                f"the series interleaves slices of several acquisitions: those with {named(first)} span "
                f"{ranges[first][0]:.2f} to {first_high:.2f} mm along the slice normal and those with {named(second)} "
                f"{second_low:.2f} to {ranges[second][1]:.2f} mm. Stacked together they would alternate between "
                "them; one volume holds one acquisition.",
                "Copy the files of one acquisition into a folder of their own (or export it as its own series).",
            )


def _sort_slices(
    folder: Path, headers: list[tuple[Path, Dataset]], normal: np.ndarray
) -> tuple[list[tuple[Path, Dataset]], np.ndarray, float]:
    """Sort the slices along ``normal`` and check they are stacked evenly; return them, their origins and the step."""
    origins = np.array([[float(v) for v in ds.ImagePositionPatient] for _, ds in headers])
    positions = origins @ normal
    order = np.argsort(positions, kind="stable")
    headers = [headers[i] for i in order]
    origins, positions = origins[order], positions[order]
    names = [path.name for path, _ in headers]
    steps = np.diff(positions)

    duplicates = np.flatnonzero(steps < DUPLICATE_TOL_MM)
    if duplicates.size:
        i = int(duplicates[0])
        where = (
            f"{names[i]} and {names[i + 1]} are at the same position ({positions[i]:.3f} mm along the slice normal)"
            f"{f' ({duplicates.size} such pairs)' if duplicates.size > 1 else ''}"
        )
        differences = _acquisition_differences(headers[i][1], headers[i + 1][1])
        if differences:
            raise DataError(
                folder,
                f"the series holds several acquisitions at the same slice positions (cardiac phases, time points or "
                f"reconstructions): {where} and differ in {differences}. One volume holds one of them.",
                "Copy the files of one acquisition into a folder of their own (or export it as its own series).",
            )
        raise DataError(
            folder,
            f"duplicated slice: {where}. Remove the copies (or separate two series that share a SeriesInstanceUID).",
        )
    _check_acquisitions_apart(folder, headers, positions)

    # the slice origins must lie on one line along the normal; otherwise the stack is sheared (gantry tilt)
    offsets = origins - origins[0]
    in_plane = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1)
    if np.any(in_plane > IN_PLANE_TOL_MM):
        i = int(np.argmax(in_plane))
        raise DataError(
            headers[i][0],
            f"the slice origin is {in_plane[i]:.2f} mm off the line through the first slice along the slice normal: "
            "the stack is sheared (gantry tilt) or mixes series; such series are not supported.",
        )

    step = float(np.median(steps))
    gaps = np.flatnonzero(steps > GAP_FACTOR * step)
    if gaps.size:
        where = []
        for i in gaps[:5]:
            missing = max(1, int(round(steps[i] / step)) - 1)
            where.append(
                f"{missing} slice(s) missing between {positions[i]:.2f} mm ({names[i]}) and {positions[i + 1]:.2f} mm "
                f"({names[i + 1]})"
            )
        more = f"; and {gaps.size - 5} more gaps" if gaps.size > 5 else ""
        raise DataError(
            folder,
            f"missing slices (positions along the slice normal, step {step:.3f} mm): {'; '.join(where)}{more}. "
            "The series is incomplete: copy it again from the source.",
        )

    tolerance = max(SPACING_ABS_TOL_MM, SPACING_REL_TOL * step)
    uneven = np.flatnonzero(np.abs(steps - step) > tolerance)
    if uneven.size:
        i = int(uneven[np.argmax(np.abs(steps[uneven] - step))])
        raise DataError(
            folder,
            f"unequal slice spacing: steps range from {steps.min():.4f} to {steps.max():.4f} mm (median {step:.4f} "
            f"mm, tolerance {tolerance:.4f} mm); e.g. {steps[i]:.4f} mm between {names[i]} ({positions[i]:.3f} mm) "
            f"and {names[i + 1]} ({positions[i + 1]:.3f} mm). A volume needs equally spaced slices.",
        )
    mean_step = float((positions[-1] - positions[0]) / (len(positions) - 1))
    # where the evenly spaced volume puts each slice against where it was acquired: small step errors that each pass
    # the check above add up along a long series
    misplaced = np.abs(positions - (positions[0] + mean_step * np.arange(len(positions))))
    worst = int(np.argmax(misplaced))
    if misplaced[worst] > GRID_TOL_STEPS * mean_step:
        raise DataError(
            folder,
            f"uneven slice positions: slice {worst + 1} of {len(positions)} ({names[worst]}, at {positions[worst]:.3f} "
            f"mm along the slice normal) lies {misplaced[worst]:.2f} mm from where an evenly spaced volume "
            f"(step {mean_step:.4f} mm) puts it, more than {GRID_TOL_STEPS:g} of a slice; the steps drift from "
            f"{steps.min():.4f} to {steps.max():.4f} mm. A volume needs equally spaced slices.",
        )
    return headers, origins, mean_step


def _rescale(path: Path, ds: Dataset) -> tuple[float, float]:
    """RescaleSlope and RescaleIntercept of one slice. A CT image must have both (type 1 in the CT Image module): the
    stored values are not HU without them, and a missing intercept read as 0 gives HU + 1024, which reads as a
    plausible but wrong image. Other modalities (``allow_non_ct``) may lack them: 1 and 0."""
    ct = _text(ds, "Modality") == "CT"
    attributes = (("RescaleSlope", "(0028,1053)", 1.0), ("RescaleIntercept", "(0028,1052)", 0.0))
    missing = [f"{keyword} {tag}" for keyword, tag, _ in attributes if ds.get(keyword) in (None, "")]
    if ct and missing:
        raise DataError(
            path,
            f"has no {' and no '.join(missing)}: the stored values of a CT cannot be converted to Hounsfield units "
            "without them (read with slope 1 and intercept 0 they would typically be 1024 too high).",
        )
    values = {}
    for keyword, tag, default in attributes:
        values[keyword] = _float_or(ds, keyword, default, path)
        if not np.isfinite(values[keyword]):
            raise DataError(path, f"{keyword} {tag} is not a finite number ({ds.get(keyword)!r}).")
    slope, intercept = values["RescaleSlope"], values["RescaleIntercept"]
    if slope == 0:
        raise DataError(path, "RescaleSlope (0028,1053) is 0: every voxel would have the same value (the intercept).")
    rescale_type = _text(ds, "RescaleType")
    if ct and rescale_type and rescale_type.upper() != "HU":
        raise DataError(
            path,
            f"RescaleType (0028,1054) is {rescale_type!r}, not HU: its values are not Hounsfield units (a derived "
            "map, e.g. iodine or unspecified units), which this reader needs.",
        )
    return slope, intercept


def _check_stored_bits(path: Path, ds: Dataset, syntax: UID, stored: np.ndarray) -> None:
    """Refuse values that do not fit the file's BitsStored. The standard reads only those bits (pydicom masks the
    rest, or sign-extends from the high bit), so a padding of -3024 HU written whole into a slice that declares 12
    bits reads as +1072 HU: bone around the body, a plausible wrong input. Compared on the uncompressed 16-bit
    buffer as written."""
    bits, allocated = _int_or_none(ds.get("BitsStored")), _int_or_none(ds.get("BitsAllocated"))
    if not bits or allocated != 16 or bits >= 16 or (syntax and syntax.is_compressed):
        return
    signed = _int_or_none(ds.get("PixelRepresentation")) == 1
    dtype = np.dtype("<u2" if getattr(ds, "original_encoding", (None, True))[1] is not False else ">u2")
    buffer = bytes(ds.PixelData)
    if len(buffer) < stored.size * 2:
        return
    written = np.frombuffer(buffer[: stored.size * 2], dtype=dtype).reshape(stored.shape)
    # the standard leaves the unused high bits undefined: zero, or the sign's extension, carry nothing; other
    # high bits are part of a value the file meant (a whole -3024 written into 12 bits)
    high = written >> bits
    extension = (1 << (16 - bits)) - 1
    sign = (written >> (bits - 1)) & 1
    differ = (high != 0) & ~(signed & (high == extension) & (sign == 1))
    if differ.any():
        raw = int(written[differ][0].astype(np.int16 if signed else np.uint16))
        read = int(stored[differ][0])
        raise DataError(
            path,
            f"stores values that do not fit its BitsStored ({bits} of {allocated} bits): {int(differ.sum())} pixels, "
            f"e.g. {raw} written, read as {read} by the standard (a padding of -3024 HU turns into bone).",
            "Export the series again with BitsStored 16, or with values that fit its bits.",
        )


def _read_slice_hu(path: Path, rows: int, cols: int) -> tuple[np.ndarray, float]:
    """One slice in HU, (rows, cols) float64: stored value * RescaleSlope + RescaleIntercept of this file; and that
    intercept."""
    ds = _dcmread(path, force=True)
    meta = getattr(ds, "file_meta", None)
    syntax = UID(str(meta.get("TransferSyntaxUID", "") if meta is not None else "") or "")
    implicit, little_endian = getattr(ds, "original_encoding", (None, None))
    if not syntax and little_endian:
        # an ACR-NEMA-style file (no preamble, no file meta): its encoding is what the reader found, uncompressed
        syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
        ds.file_meta = meta if meta is not None else FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
    syntax_text = f"{syntax.name} ({syntax})" if syntax else "no transfer syntax in the file meta"
    if "PixelData" not in ds:
        # pydicom drops a pixel data element cut short by the end of the file
        raise DataError(path, f"has no pixel data (truncated file?); transfer syntax {syntax_text}.")
    frames = _int_or_none(ds.get("NumberOfFrames")) or 1
    if frames != 1:
        raise DataError(path, f"is a multi-frame image ({frames} frames); only one slice per file is supported.")
    if (_int_or_none(ds.get("SamplesPerPixel")) or 1) != 1:
        raise DataError(path, f"is not a grey-scale image (SamplesPerPixel {ds.SamplesPerPixel}).")
    try:
        # raw stored values (sign handled by PixelRepresentation); pydicom applies no rescale here
        stored = ds.pixel_array
    except Exception as e:  # decoder plugins raise many types; the message says which plugin is missing
        compressed = bool(syntax) and syntax.is_compressed
        # pydicom lists the plugins it lacks on lines of their own: one line, as every problem is reported
        reason = "; ".join(line.strip() for line in str(e).splitlines() if line.strip()).replace(":;", ":")
        raise DataError(
            path,
            f"pixel data cannot be decoded (transfer syntax {syntax_text}): {reason}",
            DECODER_HINT if compressed else "The pixel data is shorter or longer than the header says (truncated?).",
        ) from e
    if stored.shape != (rows, cols):
        raise DataError(path, f"pixel data has shape {stored.shape}, expected ({rows}, {cols}) from the header.")
    _check_stored_bits(path, ds, syntax, stored)
    slope, intercept = _rescale(path, ds)
    return stored.astype(np.float64) * slope + intercept, intercept


def read_ct_series(
    folder: str | os.PathLike,
    series_uid: str | None = None,
    series_description: str | None = None,
    allow_non_ct: bool = False,
    files: Sequence[str | os.PathLike] | None = None,
    max_voxels: int | None = None,
) -> CTVolume:
    """Read one CT series from a folder of single-slice DICOM files into HU with its LPS affine.

    Args:
        folder: the folder holding the slice files (not searched recursively; other files are ignored).
        files: read exactly these files instead of the folder's (e.g. a series picked by a DICOM study loader);
            ``folder`` then only names the input in error messages.
        series_uid: the SeriesInstanceUID to read when the folder holds several series.
        series_description: alternatively, its SeriesDescription (exact, or a unique case-insensitive part).
        allow_non_ct: read a series whose Modality is not CT (its values are rescaled the same way).
        max_voxels: refuse a series of more voxels (Rows x Columns x slices, from the headers) before any pixel
            data is decoded; None: no limit.

    Raises:
        DataError: naming the folder or file and the problem, for anything that would give a wrong volume.
    """
    folder = Path(folder)
    info, headers = _select(folder, _without_localizers(folder, _scan(folder, files)), series_uid, series_description)
    # before anything else: an Enhanced CT file is a whole series whose geometry lives in per-frame sequences, so
    # every later check (one slice, no position) would name a wrong problem
    for path, ds in headers:
        frames = _int_or_none(ds.get("NumberOfFrames")) or 1
        sop_class = _sop_class(ds)
        if frames > 1 or sop_class in MULTI_FRAME_CT_STORAGE:
            raise DataError(
                path,
                f"is a multi-frame image ({sop_class.name or 'no SOP class'}, {frames} frame(s) in one file): "
                "multi-frame DICOM is not supported, only series of one file per slice (CT Image Storage).",
                "Export the series from the PACS or scanner as single-frame CT images, or convert it to NIfTI "
                "(e.g. with dcm2niix, which reads Enhanced CT) and pass the .nii.gz.",
            )
    if not allow_non_ct:
        modalities = [_text(ds, "Modality") for _, ds in headers]
        if all(m == modalities[0] for m in modalities):
            if modalities[0] != "CT":
                raise DataError(
                    folder,
                    f"modality {modalities[0] or '(empty)'}, expected CT (series {info.description!r}, "
                    f"{info.n_files} files).",
                    "Select the CT series, or pass allow_non_ct=True to read it anyway.",
                )
        else:
            path, modality = next((p, m) for (p, _), m in zip(headers, modalities, strict=True) if m != "CT")
            raise DataError(path, f"modality {modality or '(empty)'}, expected CT, in a series of CT files.")
    if len(headers) == 1:
        raise DataError(
            headers[0][0],
            f"is the only slice of its series in {folder}: a volume cannot be built from one slice "
            "(the slice spacing is unknown).",
        )
    iop, pixel_spacing, rows, cols = _check_geometry(folder, headers)
    check_size_limit(folder, (cols, rows, len(headers)), max_voxels)
    row_cos, col_cos = iop[:3], iop[3:]
    normal = np.cross(row_cos, col_cos)
    normal /= np.linalg.norm(normal)
    headers, origins, step = _sort_slices(folder, headers, normal)

    hu = np.empty((cols, rows, len(headers)), dtype=np.float32)
    intercepts = []
    for k, (path, _) in enumerate(headers):
        # pixel data is [row, column]; the volume is [i=col, j=row]
        slice_hu, intercept = _read_slice_hu(path, rows, cols)
        hu[:, :, k] = slice_hu.T
        intercepts.append(intercept)

    affine = np.eye(4)
    affine[:3, 0] = row_cos * pixel_spacing[1]  # along a row: columns advance, spaced by PixelSpacing[1]
    affine[:3, 1] = col_cos * pixel_spacing[0]  # down a column: rows advance, spaced by PixelSpacing[0]
    affine[:3, 2] = normal * step
    affine[:3, 3] = origins[0]
    logger.debug(f"{folder}: series {info.description!r}, {hu.shape} voxels")
    return CTVolume(
        hu=hu,
        affine_lps=affine,
        series_uid=info.uid,
        description=info.description,
        files=[str(path) for path, _ in headers],
        intercepts=intercepts,
    )


# --------------------------------------------------------------------------------------------------------------
# writing


def _ds(values) -> list[DSfloat]:
    # DS values are limited to 16 characters; auto_format keeps as many digits as fit
    return [DSfloat(float(v), auto_format=True) for v in values]


def _file_names(mode: str, n: int, uids: list[str], seed: int) -> tuple[list[str], list[int]]:
    """File names and InstanceNumbers; "shuffled" makes both disagree with the slice order, for tests."""
    if mode == "uid":
        return [f"{uid}.dcm" for uid in uids], list(range(1, n + 1))
    if mode == "index":
        return [f"slice_{k:04d}.dcm" for k in range(n)], list(range(1, n + 1))
    if mode == "shuffled":
        rng = np.random.default_rng(seed)
        while True:
            names = [f"{int(v):08x}.dcm" for v in rng.integers(0, 16**8, size=n)]
            if len(set(names)) == n and (n < 2 or sorted(names) != names):
                return names, list(range(n, 0, -1))
    raise ValueError(f"file_names must be 'uid', 'index' or 'shuffled', not {mode!r}")


def _save_atomic(ds: FileDataset, path: Path) -> None:
    """Write to a hidden temporary file beside ``path`` and rename it, so no half-written file gets the final name."""
    atomic_write(path, lambda temporary: ds.save_as(temporary, enforce_file_format=True))


def write_ct_series(
    hu: np.ndarray,
    affine_lps: np.ndarray,
    out_dir: str | os.PathLike,
    *,
    series_description: str = "Synthetic CT phantom",
    patient_id: str = "PHANTOM",
    study_uid: str | None = None,
    series_uid: str | None = None,
    series_number: int = 1,
    slope: float | Sequence[float] = 1.0,
    intercept: float | Sequence[float] = -1024.0,
    file_names: str = "uid",
    seed: int = 0,
    anonymise_uids: bool = False,
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> list[Path]:
    """Write a volume as a CT series, one DICOM file (CT Image Storage) per slice ``k``.

    Args:
        hu: (n_cols, n_rows, n_slices) values in HU, indexed as :attr:`CTVolume.hu`.
        affine_lps: 4x4 map from (i, j, k, 1) to LPS mm. Its first two columns (direction times spacing) must be
            orthogonal and its third perpendicular to them, as DICOM slices require; any rotation is allowed.
        out_dir: created if needed; files already there are left alone.
        slope, intercept: rescale to stored integers, ``stored = round((hu - intercept) / slope)``, clipped to
            int16 (if any stored value is negative) or uint16. A sequence gives one value per slice.
        file_names: "uid" (``<SOPInstanceUID>.dcm``), "index" (``slice_0000.dcm``...) or "shuffled" (random names
            and reversed InstanceNumbers, so that neither gives the slice order; for tests).
        seed: seed of the "shuffled" names.
        anonymise_uids: write empty SeriesInstanceUID and SOPInstanceUID, as some anonymisers do.
        transfer_syntax: Explicit or Implicit VR Little Endian, or a compressed syntax pydicom can encode
            (RLE Lossless; JPEG 2000 Lossless with pylibjpeg-openjpeg, which needs at least 32 x 32 pixels).

    Returns:
        The written files, in slice order. If the third affine column points against the slice normal (a
        left-handed affine), :func:`read_ct_series` returns the slices reversed with the equivalent affine.
    """
    hu = np.asarray(hu)
    affine = np.asarray(affine_lps, dtype=np.float64)
    if hu.ndim != 3 or min(hu.shape) < 1:
        raise ValueError(f"hu must be a 3-D array (n_cols, n_rows, n_slices), got shape {hu.shape}")
    if not np.all(np.isfinite(hu)):
        raise ValueError("hu holds NaN or infinite values")
    if affine.shape != (4, 4) or not np.all(np.isfinite(affine)):
        raise ValueError(f"affine_lps must be a finite 4x4 matrix, got shape {affine.shape}")
    n_cols, n_rows, n_slices = hu.shape
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if np.any(spacing <= 0):
        raise ValueError(f"affine_lps has a zero-length axis (spacing {spacing})")
    row_cos, col_cos, slice_dir = (affine[:3, :3] / spacing).T
    if abs(np.dot(row_cos, col_cos)) > 1e-6:
        raise ValueError("the first two affine columns are not orthogonal; DICOM needs orthogonal row/column axes")
    normal = np.cross(row_cos, col_cos)
    if abs(abs(np.dot(normal, slice_dir)) - 1) > 1e-6:
        raise ValueError("the third affine column is not perpendicular to the image plane (a sheared affine)")

    slopes = np.broadcast_to(np.asarray(slope, dtype=np.float64), (n_slices,))
    intercepts = np.broadcast_to(np.asarray(intercept, dtype=np.float64), (n_slices,))
    if np.any(slopes == 0) or not np.all(np.isfinite(slopes)) or not np.all(np.isfinite(intercepts)):
        raise ValueError("slope must be non-zero and slope and intercept finite")
    stored = np.rint((hu.astype(np.float64) - intercepts) / slopes)
    dtype = np.dtype("<i2") if stored.min() < 0 else np.dtype("<u2")
    limits = np.iinfo(dtype)
    stored = np.clip(stored, limits.min, limits.max).astype(dtype)

    syntax = UID(transfer_syntax)
    if not syntax.is_compressed and syntax not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        raise ValueError(f"transfer syntax {syntax.name} is not supported; use a little-endian or compressed one")

    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    sop_uids = [generate_uid() for _ in range(n_slices)]
    names, instance_numbers = _file_names(file_names, n_slices, sop_uids, seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    step = float(spacing[2])

    paths = []
    for k in range(n_slices):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
        meta.MediaStorageSOPInstanceUID = sop_uids[k]  # kept even when anonymised: the file meta requires it
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if syntax.is_compressed else syntax
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        meta.ImplementationVersionName = "CTPHANTOM"
        path = out_dir / names[k]
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = "" if anonymise_uids else sop_uids[k]
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = time
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "synthetic"
        ds.ReferringPhysicianName = ""
        ds.SeriesDescription = series_description
        ds.PatientName = patient_id
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.SliceThickness = _ds([step])[0]
        ds.SpacingBetweenSlices = _ds([step])[0]
        ds.KVP = ""
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = "" if anonymise_uids else series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = instance_numbers[k]
        origin = affine @ np.array([0.0, 0.0, k, 1.0])
        ds.ImagePositionPatient = _ds(origin[:3])
        ds.ImageOrientationPatient = _ds(np.concatenate([row_cos, col_cos]))
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds([origin[:3] @ normal])[0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = n_rows
        ds.Columns = n_cols
        ds.PixelSpacing = _ds([spacing[1], spacing[0]])  # [between rows, between columns]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1 if dtype.kind == "i" else 0
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.RescaleIntercept = _ds([intercepts[k]])[0]
        ds.RescaleSlope = _ds([slopes[k]])[0]
        ds.RescaleType = "HU"
        pixels = np.ascontiguousarray(stored[:, :, k].T)  # DICOM pixel data is [row, column]
        if syntax.is_compressed:
            ds.compress(syntax, pixels, generate_instance_uid=False)
        else:
            ds.PixelData = pixels.tobytes()
        _save_atomic(ds, path)
        paths.append(path)
    return paths
