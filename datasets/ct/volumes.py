"""Read CT volumes of any release format into (array, RAS affine) pairs, and a MONAI ``ImageReader`` built on it.

Formats: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``), and DICOM
series folders (see :mod:`datasets.ct.dicom`). Every volume comes out indexed ``[i, j, k]`` with the affine that
maps voxel indices to RAS+ millimetres (MONAI's and NIfTI's convention), so the bundles' ``Orientationd`` and
``Spacingd`` work the same for all of them and predictions can be written back on the input's exact grid.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.config import KeysCollection
from monai.data import ImageReader
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from clinseg.datasets.errors import DataError, InputError
from clinseg.datasets.io import check_size_limit
from clinseg.datasets.readers import ReadImaged
from clinseg.datasets.value_types import PositiveInt, PositiveSpacing

logger = logging.getLogger(__name__)

# more than any CT a scanner writes (a 512 x 512 x 2000 whole-body series is 0.5e9), and refused before a
# decompression bomb or a mistyped header can take the machine's memory: 1024^3 voxels are 4 GiB as float32
DEFAULT_MAX_VOXELS = 1024**3

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# the voxel sizes (mm) a CT of a patient or a specimen can have: from micro-CT to the thickest reconstructed slab
PLAUSIBLE_VOXEL_MM = (0.01, 50.0)
# millimetres per unit of a NIfTI header's spatial unit code (xyzt_units & 7); unknown (0) is read as millimetres,
# as ITK and nibabel do
NIFTI_MM_PER_UNIT = {1: 1000.0, 2: 1.0, 3: 0.001}
# millimetres per unit of a NRRD header's 'space units' (symbols and spelled-out names). ITK ignores the field and
# reads every NRRD in millimetres; an empty or unknown ("???") unit is read as millimetres, as for NIfTI
NRRD_MM_PER_UNIT = {
    **dict.fromkeys(("mm", "millimeter", "millimeters", "millimetre", "millimetres"), 1.0),
    **dict.fromkeys(("cm", "centimeter", "centimeters", "centimetre", "centimetres"), 10.0),
    **dict.fromkeys(("m", "meter", "meters", "metre", "metres"), 1000.0),
    **dict.fromkeys(("um", "\u00b5m", "\u03bcm", "micron", "microns", "micrometer", "micrometre"), 0.001),
    **dict.fromkeys(("micrometers", "micrometres"), 0.001),
    **dict.fromkeys(("", "???", "none"), 1.0),
}
# the NRRD 'space' values that name the patient's axes (the format's long and short names), for a 3D volume
NRRD_PATIENT_SPACES = {
    "left-posterior-superior",
    "lps",
    "right-anterior-superior",
    "ras",
    "left-anterior-superior",
    "las",
}
# the way out of a refusal by _hounsfield_problem
HU_HINT = (
    "If it is a CT, convert it again from the scanner's DICOM series with a tool that applies RescaleSlope and "
    "RescaleIntercept (e.g. dcm2niix), or give that series itself; CT in Hounsfield units is what is read here."
)


def is_volume_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(VOLUME_SUFFIXES)


def looks_like_dicom(path: str | os.PathLike) -> bool:
    """A cheap test for a DICOM file, from its name or its first 132 bytes: a DICOM suffix (``.dcm``, ``.dicom``,
    ``.dic``, ``.ima``), the ``DICM`` preamble marker, or, as some old exporters write files without a preamble, a
    first element of group 0002 or 0008 followed by an explicit VR or a short implicit length (the files the DICOM
    series reader accepts)."""
    from clinseg.datasets.ct.dicom import DICOM_SUFFIXES

    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    if head[128:132] == b"DICM":
        return True
    if len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    vr = head[4:6]
    return (vr.isalpha() and vr.isupper()) or int.from_bytes(head[4:8], "little") < 1024


def case_id(path: str | os.PathLike, channel_suffix: bool = True) -> str:
    """A case's id from its file or folder name: extension and (``channel_suffix``) nnU-Net's ``_0000`` channel
    suffix removed. Only ``_0000``: a CT has one channel, and case names of their own end in four digits
    (``heart_0001``); nnU-Net's labels never carry the suffix."""
    name = Path(path).name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if channel_suffix and len(name) > 5 and name.endswith("_0000"):
        name = name[:-5]
    return name


def _orientation_axes(orientation: str) -> np.ndarray:
    """The RAS+ unit vector each voxel axis points to, for an orientation code such as ``RAS`` or ``LPS``
    (NIfTI/nibabel convention: the first letter is where increasing ``i`` goes)."""
    code = str(orientation).upper()
    directions = {"R": (0, 1.0), "L": (0, -1.0), "A": (1, 1.0), "P": (1, -1.0), "S": (2, 1.0), "I": (2, -1.0)}
    if len(code) != 3 or any(c not in directions for c in code) or len({directions[c][0] for c in code}) != 3:
        raise InputError(
            f"assume_orientation {orientation!r}",
            "is not an orientation code: expected three letters, one of R/L, one of A/P and one of S/I "
            "(e.g. RAS, LPS), giving where increasing i, j and k point.",
        )
    axes = np.zeros((3, 3))
    for column, letter in enumerate(code):
        row, sign = directions[letter]
        axes[row, column] = sign
    return axes


def check_assumed_geometry(assume_spacing: Sequence[float] | None, assume_orientation: str = "RAS") -> None:
    """Refuse an unusable ``assume_spacing`` / ``assume_orientation`` when a reader is built, not at the first file."""
    if assume_spacing is None:
        return
    try:
        spacing = [float(s) for s in assume_spacing]
    except (TypeError, ValueError) as e:
        raise InputError(f"assume_spacing {assume_spacing!r}", "must be three numbers (mm along i, j, k).") from e
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise InputError(f"assume_spacing {assume_spacing!r}", "must be three positive numbers (mm along i, j, k).")
    _orientation_axes(assume_orientation)


def assumed_affine(assume_spacing: Sequence[float], assume_orientation: str = "RAS") -> np.ndarray:
    """The voxel-to-RAS affine of a volume given only its voxel spacing (mm along i, j, k) and orientation code;
    voxel (0, 0, 0) sits at the world origin."""
    check_assumed_geometry(assume_spacing, assume_orientation)
    affine = np.eye(4)
    affine[:3, :3] = _orientation_axes(assume_orientation) * np.asarray(assume_spacing, dtype=np.float64)
    return affine


def describe_assumption(assume_spacing: Sequence[float], assume_orientation: str, problem: str) -> str:
    """The text recorded as ``geometry_assumed`` in the metadata and in the results of a case."""
    spacing = " x ".join(f"{float(s):g}" for s in assume_spacing)
    return f"spacing {spacing} mm, orientation {assume_orientation.upper()}, assumed: the file {problem}"


def voxel_volume_ml(affine: np.ndarray) -> float:
    """The volume of one voxel of a voxel-to-world ``affine``, in millilitres: the determinant of its axes, not the
    product of their lengths, which differ on a sheared grid (a CT with its gantry tilt kept in the affine: 10 % at
    25 degrees)."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def affine_problem(affine: np.ndarray) -> str | None:
    """What is wrong with a voxel-to-world affine (a non-finite entry, an axis of zero length, a singular matrix, a
    voxel size no CT has), or None. Zero-length or NaN axes come from headers whose spacing is 0 or NaN; voxels of
    micrometres or metres from a spacing written in other units than millimetres."""
    affine = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(affine).all():
        return f"has a voxel-to-world affine with non-finite entries:\n{affine}"
    lengths = np.linalg.norm(affine[:3, :3], axis=0)
    for axis, length in zip("ijk", lengths, strict=True):
        if length < 1e-6:
            return f"has a voxel-to-world affine whose {axis} axis has zero length (voxel spacing 0):\n{affine}"
    if abs(np.linalg.det(affine[:3, :3])) < 1e-9 * float(np.prod(lengths)):
        return f"has a singular voxel-to-world affine (its axes are parallel):\n{affine}"
    low, high = PLAUSIBLE_VOXEL_MM
    if lengths.min() < low or lengths.max() > high:
        # read as millimetres, a spacing in metres gives volumes a billion times too small, one in micrometres a grid
        # whose resampling to the network's spacing takes all memory
        size = " x ".join(f"{length:g}" for length in lengths)
        return (
            f"has voxels of {size} mm (along i, j, k), and a CT's are between {low:g} and {high:g} mm: its spacing "
            "is in other units than millimetres or is wrong"
        )
    return None


def _raw_nifti_header(path: Path, header_class):
    """The header exactly as stored. nibabel repairs headers as it loads them (a pixdim of 0 becomes 1, a negative
    one its absolute value, a scl_slope of NaN or 0 takes scl_inter with it) and gives a file without any coordinate
    system a pixdim-only affine: the checks read the header again, without those fixes."""
    from nibabel.openers import ImageOpener

    with ImageOpener(path) as f:
        return header_class.from_fileobj(f, check=False)


def _nifti_geometry_problem(header) -> tuple[str | None, np.ndarray | None]:
    """What makes a NIfTI header's geometry unusable, read from the header exactly as stored, or None.

    Returns the problem and the header's pixdim when it could be the voxel size (positive, not the default 1s).
    """
    qform_code, sform_code = int(header["qform_code"]), int(header["sform_code"])
    pixdim = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    pixdim_text = ", ".join(f"{p:g}" for p in pixdim)
    plausible = np.isfinite(pixdim).all() and (pixdim > 0).all()
    if qform_code == 0 and sform_code == 0:
        problem = (
            f"has no coordinate system (qform_code and sform_code are both 0; pixdim {pixdim_text}): its voxel "
            "size and orientation are unknown"
        )
        return problem, pixdim if plausible and not np.allclose(pixdim, 1) else None
    if sform_code == 0 and not plausible:
        # only the qform is used, and its voxel size is pixdim[1:4]
        return f"has a degenerate voxel size: pixdim {pixdim_text} (each must be a positive number)", None
    if qform_code > 0 and sform_code > 0:
        return _qform_sform_problem(header), None
    return None, None


def _qform_sform_problem(header) -> str | None:
    """What separates a NIfTI header's two coordinate systems when both are set and they disagree, or None.

    nibabel (read here) takes the sform, ITK-based tools may take the qform: a file whose two disagree opens with
    another orientation, voxel size or position in the viewer a user checks the mask in, and one of the two is wrong.
    Tools that write both (dcm2niix, ITK, nibabel) write the same geometry twice; the qform cannot hold a shear, so
    only what both can hold is compared: the axis directions, the voxel sizes (5 %) and the origin (one voxel).
    """
    import nibabel as nib

    try:
        qform, sform = np.asarray(header.get_qform(), np.float64), np.asarray(header.get_sform(), np.float64)
    except Exception:  # a quaternion that is not one: the qform alone is unusable, the sform is what is read
        return None
    if not (np.isfinite(qform).all() and np.isfinite(sform).all()):
        return None  # affine_problem names a non-finite sform; a non-finite qform is not used
    q_axes, s_axes = nib.aff2axcodes(qform), nib.aff2axcodes(sform)
    q_sizes, s_sizes = np.linalg.norm(qform[:3, :3], axis=0), np.linalg.norm(sform[:3, :3], axis=0)
    shift = float(np.linalg.norm(qform[:3, 3] - sform[:3, 3]))
    if q_axes == s_axes and np.allclose(q_sizes, s_sizes, rtol=0.05) and shift <= float(s_sizes.max()):
        return None
    return (
        "has two coordinate systems that disagree (qform: axes "
        f"{''.join(q_axes)}, voxel {', '.join(f'{v:g}' for v in q_sizes)} mm; sform: axes {''.join(s_axes)}, voxel "
        f"{', '.join(f'{v:g}' for v in s_sizes)} mm; origins {shift:.1f} mm apart): tools that read the qform and "
        "those that read the sform place it differently, and which one is right cannot be told from the file"
    )


def geometry_hint(spacing: Sequence[float] | None = None) -> str:
    """How to get past a refused geometry; ``spacing`` is what the header says, when it is a plausible guess."""
    example = ",".join(f"{s:g}" for s in spacing) if spacing is not None else "0.8,0.8,2.5"
    known = " (the header's pixdim, if it is right)" if spacing is not None else ""
    return (
        "Restore the geometry from the source scan (convert it again from DICOM with a tool that keeps it), or, if "
        "you know the voxel size and orientation, pass them: assume_spacing (mm along i, j, k) and "
        f"assume_orientation (default RAS), e.g. --assume_spacing [{example}]{known} --assume_orientation RAS. "
        "The assumption is then recorded in the results."
    )


def _read_nifti(
    path: Path, max_voxels: int | None, assume: tuple | None
) -> tuple[np.ndarray, np.ndarray, str | None, bool]:
    """The voxels, RAS affine, geometry note, and whether the voxels are the stored integers without an intercept."""
    import nibabel as nib

    try:
        image = nib.load(path)  # the header only: the voxels are decoded below, after the checks
        raw_header = _raw_nifti_header(path, type(image.header))
        problem, header_spacing = _nifti_geometry_problem(raw_header)
    except FileNotFoundError as e:
        raise DataError(path, "does not exist.") from e
    except Exception as e:  # nibabel raises many types for truncated or non-NIfTI files (EOFError, zlib, header)
        raise DataError(path, f"cannot be read as NIfTI (empty, truncated or not a NIfTI file): {e}") from e
    check_size_limit(path, image.shape, max_voxels)
    # nibabel gives the affine in the header's spatial units; the volumes, the network's spacing and every other
    # reader (ITK: 3D Slicer, ITK-SNAP) work in millimetres
    affine = np.diag([*[_nifti_mm_per_unit(raw_header)] * 3, 1.0]) @ np.asarray(image.affine, dtype=np.float64)
    affine, note = _apply_geometry_policy(path, problem or affine_problem(affine), affine, assume, header_spacing)
    try:
        array = np.asanyarray(image.dataobj)  # applies scl_slope/scl_inter when the header has them
    except Exception as e:
        raise DataError(path, f"cannot be read as NIfTI (empty, truncated or not a NIfTI file): {e}") from e
    scaling_problem = _nifti_scaling_problem(raw_header)
    if scaling_problem is not None:
        raise DataError(path, scaling_problem, HU_HINT)
    # nibabel reports no intercept (None) when scl_slope is 0 or NaN: the stored values are then used as they are
    intercept = image.header.get_slope_inter()[1]
    unscaled = np.issubdtype(image.get_data_dtype(), np.integer) and not (intercept and math.isfinite(intercept))
    return array, affine, note, unscaled


def _nifti_mm_per_unit(header) -> float:
    """Millimetres per unit of the header's spatial coordinates (its ``xyzt_units``): 1000 for metres, 0.001 for
    micrometres, 1 for millimetres and for no unit given."""
    return NIFTI_MM_PER_UNIT.get(int(header["xyzt_units"]) & 0x07, 1.0)


def _nifti_scaling_problem(header) -> str | None:
    """Why a NIfTI header's value scaling is ambiguous, or None.

    NIfTI scales the stored values only when scl_slope is a non-zero number; nibabel then also ignores a slope of NaN
    or infinity, and with it any intercept. An intercept (typically -1024) beside a slope of 0 or NaN is what an
    export that meant HU = stored + intercept but left the slope unset writes: read as stored, every value would be
    1024 HU too high, and other readers differ on whether the intercept applies.
    """
    slope, intercept = float(header["scl_slope"]), float(header["scl_inter"])
    if (slope == 0 or not math.isfinite(slope)) and math.isfinite(intercept) and intercept != 0:
        return (
            f"has scl_inter {intercept:g} but scl_slope {slope:g}: NIfTI then applies no scaling at all, so whether "
            "its values are stored or stored + intercept cannot be told from the file."
        )
    return None


def _text_header(path: Path) -> dict[str, str]:
    """The fields of a NRRD or MetaImage text header (names lower-cased), read without the voxel data."""
    with open(path, "rb") as f:
        head = f.read(1 << 16).decode("latin-1")
    fields: dict[str, str] = {}
    nrrd = path.suffix.lower() in (".nrrd", ".nhdr")
    for line in head.splitlines()[1 if nrrd else 0 :]:
        if nrrd:
            if not line.strip():
                break  # a blank line ends a NRRD header
            if line.startswith("#") or ":=" in line:
                continue  # comments and key/value pairs, not fields
            name, sep, value = line.partition(":")
        else:
            name, sep, value = line.partition("=")
        if sep:
            fields[name.strip().lower()] = value.strip()
        if not nrrd and name.strip().lower() == "elementdatafile":
            break  # the last line of a MetaImage header
    return fields


def _itk_reason(error: Exception) -> str:
    """The reason in an ITK exception, on one line: ITK's text spans several lines (where in ITK's source it was
    thrown, then the NRRD library's chain of "trouble" lines, the cause last)."""
    reasons = []
    for line in str(error).splitlines():
        line = re.sub(r"^(ITK ERROR|itk::ERROR): \w+\(0x[0-9a-fA-F]+\): ", "", line.strip())
        line = re.sub(r"^\[nrrd\] \w+: ?", "", line).strip()
        if line and not line.startswith(("Exception thrown in SimpleITK", "trouble")) and not line.endswith(":"):
            reasons.append(line)
    return "; ".join(reasons) or str(error).strip()


def _nrrd_quoted(value: str) -> list[str]:
    """The strings of a NRRD per-axis field written as quoted strings (``"mm" "mm" "mm"``)."""
    # the header is read as latin-1; a unit such as "\u00b5m" is UTF-8
    value = value.encode("latin-1").decode("utf-8", errors="replace")
    parts = value.split('"')
    return [part.strip() for part in parts[1::2]] if len(parts) > 2 else value.split()


def _nrrd_mm_per_unit(path: Path, fields: dict[str, str]) -> np.ndarray:
    """Millimetres per unit along each world axis of a NRRD header (its ``space units``): ITK reads the space
    directions and origin as millimetres whatever the header says, so a volume in centimetres would have voxels ten
    times too small, one in metres a thousand times too large. Units that are not lengths it knows are refused.
    (Per-axis ``units`` on an axis with a space direction are refused by ITK's NRRD reader itself.)"""
    scale = np.ones(3)
    if "space units" in fields:
        units = _nrrd_quoted(fields["space units"])
        if len(units) != 3:
            raise DataError(path, f"has 'space units: {fields['space units']}', which names {len(units)} units, not 3.")
        for axis, unit in enumerate(units):
            if unit.lower() not in NRRD_MM_PER_UNIT:
                raise DataError(
                    path,
                    f"has 'space units: {fields['space units']}': {unit!r} is not a unit of length that can be "
                    "converted to millimetres (mm, cm, m, um).",
                )
            scale[axis] = NRRD_MM_PER_UNIT[unit.lower()]
    return scale


def _itk_geometry_problem(path: Path, spacing: Sequence[float]) -> str | None:
    """What makes a NRRD or MetaImage header's geometry unusable, or None. ITK gives a header without spacing or
    without space directions 1 mm voxels along the scanner axes, silently; this looks at the header itself."""
    try:
        fields = _text_header(path)
    except OSError as e:
        raise DataError(path, f"cannot be opened ({e.strerror}).") from e
    if path.suffix.lower() in (".nrrd", ".nhdr"):
        if "space directions" not in fields:
            spacings = (
                f" (only 'spacings: {fields['spacings']}', which gives no orientation)" if "spacings" in fields else ""
            )
            return (
                f"has no coordinate system: its NRRD header has no 'space directions' field{spacings}, so its voxel "
                "size and orientation are unknown"
            )
        # ITK reads every space that is not one of these (none given, 'space dimension' only, scanner-xyz,
        # 3D-right-handed) as LPS without a word: a guess at which side is the patient's left
        space = fields.get("space", "")
        if space.lower() not in NRRD_PATIENT_SPACES:
            given = f"its 'space' is {space!r}" if space else "it has no 'space' field"
            if not space and "space dimension" in fields:
                given += f" (only 'space dimension: {fields['space dimension']}')"
            return (
                f"has no anatomical coordinate system: {given}, not a patient space (left-posterior-superior, "
                "right-anterior-superior or left-anterior-superior), so which side is the patient's left is unknown"
            )
    elif "elementspacing" not in fields and "elementsize" not in fields:
        return "has no voxel size: its MetaImage header has no ElementSpacing (or ElementSize)"
    spacing = np.asarray(spacing, dtype=np.float64)
    if not (np.isfinite(spacing).all() and (spacing > 0).all()):
        return f"has a degenerate voxel spacing {', '.join(f'{s:g}' for s in spacing)} (each must be a positive number)"
    return None


def _read_itk(
    path: Path, max_voxels: int | None, assume: tuple | None
) -> tuple[np.ndarray, np.ndarray, str | None, bool]:
    """The voxels, RAS affine, geometry note, and whether the voxels are the stored integers without an intercept
    (always, for integer voxels: NRRD and MetaImage have no rescale)."""
    import SimpleITK as sitk

    if not path.exists():
        raise DataError(path, "does not exist.")
    what = path.suffix.lstrip(".").upper()
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()  # the header only: the voxels are decoded below, after the checks
    except RuntimeError as e:
        raise DataError(
            path, f"cannot be read as {what} (empty, truncated or damaged header?): {_itk_reason(e)}"
        ) from e
    if reader.GetDimension() != 3:
        raise DataError(path, f"is {reader.GetDimension()}-dimensional; a CT volume must be 3D.")
    if reader.GetNumberOfComponents() != 1:
        raise DataError(path, f"has {reader.GetNumberOfComponents()} components per voxel; expected 1.")
    check_size_limit(path, reader.GetSize(), max_voxels)
    direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction * np.asarray(reader.GetSpacing(), dtype=np.float64)
    affine_lps[:3, 3] = reader.GetOrigin()
    problem = _itk_geometry_problem(path, reader.GetSpacing())
    if problem is None and path.suffix.lower() in (".nrrd", ".nhdr"):
        # MetaImage has no unit field: its spacing is millimetres by definition
        affine_lps = np.diag([*_nrrd_mm_per_unit(path, _text_header(path)), 1.0]) @ affine_lps
    affine = LPS_TO_RAS @ affine_lps
    problem = problem or affine_problem(affine)
    affine, note = _apply_geometry_policy(path, problem, affine, assume)
    try:
        image = reader.Execute()
    except RuntimeError as e:
        if note and "Zero-valued spacing" in str(e):
            raise DataError(
                path,
                f"{problem}, and ITK refuses to decode a file with a zero spacing, so assume_spacing cannot stand in.",
                "Correct the spacing in its text header (ElementSpacing, or NRRD space directions).",
            ) from e
        raise DataError(path, f"cannot be read as {what} (empty or truncated?): {_itk_reason(e)}") from e
    array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))  # ITK arrays are [k, j, i]
    return array, affine, note, np.issubdtype(array.dtype, np.integer)


def _apply_geometry_policy(
    path: Path,
    problem: str | None,
    affine: np.ndarray,
    assume: tuple | None,
    header_spacing: Sequence[float] | None = None,
) -> tuple[np.ndarray, str | None]:
    """The file's own affine when its geometry is sound; else the assumed one (with the note recording it) when the
    user gave a spacing, else a :class:`DataError` naming the file, the problem and the way out."""
    if problem is None:
        return affine, None
    if assume is None:
        raise DataError(path, problem + ".", geometry_hint(header_spacing))
    spacing, orientation = assume
    note = describe_assumption(spacing, orientation, problem.split(":")[0])
    logger.warning(f"{path}: geometry assumed, {note}")
    return assumed_affine(spacing, orientation), note


def _voxel_type_problem(array: np.ndarray) -> str | None:
    """What makes the voxel type unusable as one real number per voxel, or None. nibabel gives RGB NIfTIs a
    structured type (R, G, B fields) and complex ones a complex type; a cast to float32 would fail on the first
    and silently drop the imaginary part of the second."""
    dtype = array.dtype
    if dtype.fields is not None:
        return f"has voxels of a structured type ({', '.join(dtype.names)}: e.g. RGB colour), not one number each"
    if np.issubdtype(dtype, np.complexfloating):
        return f"has complex voxels ({dtype}); a CT volume holds real numbers (its imaginary part would be dropped)"
    if not (np.issubdtype(dtype, np.integer) or np.issubdtype(dtype, np.floating) or dtype == np.bool_):
        return f"has voxels of type {dtype}, not real numbers"
    return None


def _hounsfield_problem(array: np.ndarray, unscaled: bool) -> str | None:
    """Why ``array`` cannot be a CT in Hounsfield units, or None.

    The rule rests on the storage, not on the content alone. A CT of a body holds air (-1000 HU: around the body, in
    the lungs, the bowel), but a tight crop inside the body need not (a box around the mediastinum or the liver), so
    "no voxel below -500 HU" would refuse real crops. What a crop still holds is fat (-100 HU) or air, so values
    below 0. Values that are the file's stored integers, with no intercept applied, none of them below 0, are what a
    CT exported without its intercept gives (HU + 1024 as uint16: air at 0, fat at 920, soft tissue at 1064), and
    also MR or other images stored as unsigned integers; the field-of-view check would read either as "not a torso,
    no heart". Computed values (floats, or an intercept applied) with nothing below 0 are refused too: no air, no
    fat and not even the noise of soft tissue around 0 HU is a normalised image (0..1), an MR or a PET volume. A crop
    of nothing but blood, muscle or bone, noiseless, would be refused with them: it holds no anatomy this bundle
    could report on.
    """
    if array.size == 0:
        return None
    low, high = array.min(), array.max()
    if low < 0:
        return _shifted_hounsfield_problem(array)
    if not unscaled:
        # computed values (floats, or integers with an intercept applied) with nothing below 0 either: no air, no
        # fat, not even the noise of soft tissue around 0 HU; a normalised image (0..1), an MR or a PET volume
        return (
            f"does not look like Hounsfield units: its values run from {low:g} to {high:g}, none below 0, where a CT "
            "has air at -1000 and fat at -100 HU (and noise below 0 in any soft tissue). Most likely the image is "
            "intensity-normalised or not a CT."
        )
    return (
        f"does not look like Hounsfield units: its values are stored integers ({array.dtype}) from {low} to {high} "
        "with no rescale intercept, none below 0, where a CT has air at -1000 and fat at -100 HU. Most likely the "
        "intercept (usually -1024) was lost when the scan was exported (DICOM RescaleIntercept, NIfTI scl_inter), "
        "or the image is not a CT."
    )


# HU + 1024 puts air at 0 +- its noise and soft tissue (0-100 HU) at 1024-1124: this window catches the shifted soft
# tissue, where a CT in Hounsfield units holds only dense bone and metal (under 1 % of a torso in the real scans).
SHIFTED_SOFT_TISSUE = (900.0, 1200.0)
AIR = (-1100.0, -900.0)
# air with an intercept of -1024 applied twice (-2048 +- its noise): a scanner writes nothing here but its padding
# outside the reconstruction circle (-3024 or -2000 HU, the latter left out as the minimum) and, where a resampling
# blurred that padding into the air, a thin rim of voxels
AIR_TWICE = (-2300.0, -1800.0)
# z-scores and values scaled by 1/1000 lie within a few units of 0, where a CT in HU holds air (-1000), fat (-100)
# or soft tissue (20-80 HU, its noise a standard deviation of 10-30 HU): a CT has 1 % of its voxels outside this
NORMALISED_RANGE = 20.0


def _shifted_hounsfield_problem(array: np.ndarray) -> str | None:
    """Why ``array``, which has values below 0, still cannot be Hounsfield units, or None.

    Noise around air at 0 and a scanner's padding (-2000 for -3024 HU) put values below 0 into HU + 1024 stored
    without its intercept, so the storage rule of :func:`_hounsfield_problem` misses them. Their content gives them
    away: no air at all (-1000 HU) while a tenth or more of the voxels lies where soft tissue lands once 1024 is
    added. A CT in Hounsfield units has air or, cropped inside the body, fat and soft tissue around 0, with bone
    above 900 HU in a few per cent at most. The same content rules refuse an intercept applied twice (air at -2048)
    and values standardised or scaled down (z-scores, HU / 1000: within a few units of 0, where a CT holds air, fat
    or soft tissue). The padding (the minimum, when it fills more than 1 % of the volume) is left out of the fractions.
    """
    # every other voxel along each axis of a large scan (512 x 512 x 400): its fractions in a tenth of the time
    sample = (array[::2, ::2, ::2] if array.size > 8_000_000 else array).ravel()
    low = sample.min()
    padding = sample == low
    if padding.mean() > 0.01:
        sample = sample[~padding]
    if sample.size == 0:
        return None
    air_twice = float(((sample >= AIR_TWICE[0]) & (sample <= AIR_TWICE[1])).mean())
    if air_twice > 0.05:
        return (
            f"does not look like Hounsfield units: {air_twice:.0%} of its voxels lie between {AIR_TWICE[0]:g} and "
            f"{AIR_TWICE[1]:g}, under any air (-1000 HU) and apart from the scanner's padding. Most likely an "
            "intercept of -1024 was applied twice (air at -2048), or the image is not a CT."
        )
    p1, p99 = (float(v) for v in np.percentile(sample, [1, 99]))
    if -NORMALISED_RANGE < p1 and p99 < NORMALISED_RANGE:
        return (
            f"does not look like Hounsfield units: 98 % of its values lie between {p1:.3g} and {p99:.3g}, where a "
            "CT holds air (-1000 HU), fat (-100 HU) or soft tissue (20-80 HU). Most likely the image is "
            "intensity-normalised (z-scores, HU / 1000) or not a CT."
        )
    air = float(((sample >= AIR[0]) & (sample <= AIR[1])).mean())
    shifted = float(((sample >= SHIFTED_SOFT_TISSUE[0]) & (sample <= SHIFTED_SOFT_TISSUE[1])).mean())
    if air > 0.001 or shifted < 0.10:
        return None
    return (
        f"does not look like Hounsfield units: no air (under 0.1 % of its voxels between -1100 and -900) while "
        f"{shifted:.0%} lie between 900 and 1200, where soft tissue lies when 1024 is added to Hounsfield units. Most "
        "likely the scan was exported as HU + 1024 and its intercept (-1024) was lost (DICOM RescaleIntercept, NIfTI "
        "scl_inter)."
    )


def read_volume(
    path: str | os.PathLike,
    series_uid: str | None = None,
    series_description: str | None = None,
    check_finite: bool = True,
    assume_spacing: PositiveSpacing | None = None,
    assume_orientation: str = "RAS",
    max_voxels: PositiveInt | None = DEFAULT_MAX_VOXELS,
    check_hu: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read a CT volume (file or DICOM series folder) as ``(array [i, j, k], affine to RAS mm, metadata)``.

    DICOM series are converted to Hounsfield units with each slice's RescaleSlope/Intercept; NIfTI scaling is
    applied. ``series_uid``/``series_description`` select a series in a folder holding several. Floating-point
    voxels come out as float32 (what every loader hands on), integer ones keep their type; structured (RGB) and
    complex voxels are refused, and so are values that are not finite as float32 (``check_finite``).

    ``check_hu``: refuse a volume whose values cannot be Hounsfield units: stored integers with no rescale intercept,
    none below 0 (a CT exported as HU + 1024 without its intercept, or not a CT; see :func:`_hounsfield_problem`).
    Turn it off for label volumes.

    Geometry is never assumed: a file without a coordinate system (NIfTI with qform and sform codes 0, NRRD without
    space directions, MetaImage without spacing) or with a degenerate one (a spacing of 0, negative or NaN, an axis
    of zero length) is refused, unless ``assume_spacing`` (mm along i, j, k) is given; that file's affine is then
    built from it and ``assume_orientation``, and ``metadata["geometry_assumed"]`` says so (it is empty otherwise).
    Files with a sound geometry keep their own. ``max_voxels`` is checked against the header's size before any
    voxel is decoded (None: no limit).

    Raises:
        DataError: naming the file or folder and the problem (unreadable, not 3D, no geometry, too large, NaN/Inf
            values, not Hounsfield units, ...).
    """
    path = Path(path)
    check_assumed_geometry(assume_spacing, assume_orientation)
    assume = None if assume_spacing is None else (tuple(float(s) for s in assume_spacing), assume_orientation)
    meta: dict = {}
    note = None
    if path.is_dir():
        from clinseg.datasets.ct.dicom import read_ct_series

        volume = read_ct_series(
            path, series_uid=series_uid, series_description=series_description, max_voxels=max_voxels
        )
        array, affine = volume.hu, LPS_TO_RAS @ volume.affine_lps
        unscaled = not any(volume.intercepts)  # DICOM pixel data are integers
        meta.update(source_format="dicom", series_uid=volume.series_uid, series_description=volume.description)
    elif str(path).lower().endswith(NIFTI_SUFFIXES):
        array, affine, note, unscaled = _read_nifti(path, max_voxels, assume)
        meta["source_format"] = "nifti"
    elif str(path).lower().endswith(ITK_SUFFIXES):
        array, affine, note, unscaled = _read_itk(path, max_voxels, assume)
        meta["source_format"] = path.suffix.lstrip(".").lower()
    elif not path.exists():
        raise DataError(path, "does not exist.")
    else:
        raise DataError(
            path, f"is not a supported volume: expected a DICOM series folder or one of {', '.join(VOLUME_SUFFIXES)}."
        )
    # an empty string, not None, when nothing was assumed: collation needs the same keys with collatable values
    meta["geometry_assumed"] = note or ""
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError(path, f"has shape {tuple(array.shape)}; a CT volume must be 3D (one channel).")
    if min(array.shape) < 2:
        raise DataError(path, f"has shape {tuple(array.shape)}; a volume needs at least 2 voxels along every axis.")
    return _checked_voxels(path, array, affine, unscaled, check_finite, check_hu), affine, meta


def _checked_voxels(
    path: Path, array: np.ndarray, affine: np.ndarray, unscaled: bool, check_finite: bool, check_hu: bool
) -> np.ndarray:
    """The checks on the voxels every reader shares; returns the array, floats as float32."""
    problem = _voxel_type_problem(array)
    if problem is not None:
        raise DataError(path, problem + ".")
    if np.issubdtype(array.dtype, np.floating) and array.dtype != np.float32:
        # the finiteness check comes after this cast: a float64 value beyond float32's range (a 1e39, or an int16
        # NIfTI with scl_slope 1e38) would otherwise pass it and become inf in the loader's cast
        with np.errstate(over="ignore"):
            array = array.astype(np.float32)
    if check_finite and np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise DataError(path, f"holds {bad} NaN or infinite voxel values (as float32).")
    problem = affine_problem(affine)
    if problem is not None:
        raise DataError(path, problem)
    if check_hu:
        problem = _hounsfield_problem(array, unscaled)
        if problem is not None:
            raise DataError(path, problem, HU_HINT)
    return array


def read_dicom_files(
    files: Sequence[str | os.PathLike], max_voxels: PositiveInt | None = DEFAULT_MAX_VOXELS, check_hu: bool = True
) -> tuple[np.ndarray, np.ndarray, dict]:
    """One CT series given as its slice files (all checks of :func:`datasets.ct.dicom.read_ct_series` apply, and
    those of :func:`read_volume` on the voxels)."""
    from clinseg.datasets.ct.dicom import read_ct_series

    files = [Path(f) for f in files]
    folder = Path(os.path.commonpath([str(f.parent) for f in files]))
    volume = read_ct_series(folder, files=files, max_voxels=max_voxels)
    meta = {
        "source_format": "dicom",
        "series_uid": volume.series_uid,
        "series_description": volume.description,
        "geometry_assumed": "",
    }
    affine = LPS_TO_RAS @ volume.affine_lps
    hu = _checked_voxels(folder, volume.hu, affine, not any(volume.intercepts), True, check_hu)
    return hu, affine, meta


class CTVolumeReader(ImageReader):
    """MONAI ``ImageReader`` for CT volumes of every supported format, DICOM series folders included.

    Use as ``LoadImaged(keys, reader=CTVolumeReader())``. Images come out in float32 (HU for CT), labels keep
    their values; the metadata carries ``affine``/``original_affine`` (RAS), ``spatial_shape``, the source
    format and ``geometry_assumed`` (see :func:`read_volume`, which also describes ``assume_spacing``,
    ``assume_orientation``, ``max_voxels`` and ``check_hu``), so ``Invertd`` and ``SaveImaged`` restore the input's
    grid. ``check_hu`` is off by default because one reader often loads the labels too; :class:`LoadCTVolumed`
    turns it on for the image keys.
    """

    def __init__(
        self,
        series_uid: str | None = None,
        series_description: str | None = None,
        dtype=np.float32,
        assume_spacing: PositiveSpacing | None = None,
        assume_orientation: str = "RAS",
        max_voxels: PositiveInt | None = DEFAULT_MAX_VOXELS,
        check_hu: bool = False,
    ):
        super().__init__()
        check_assumed_geometry(assume_spacing, assume_orientation)
        if max_voxels is not None and (
            isinstance(max_voxels, bool) or not isinstance(max_voxels, int) or max_voxels < 1
        ):
            raise InputError(f"max_voxels {max_voxels!r}", "must be a positive integer (or None for no limit).")
        self.series_uid, self.series_description, self.dtype = series_uid, series_description, dtype
        self.assume_spacing, self.assume_orientation, self.max_voxels = assume_spacing, assume_orientation, max_voxels
        self.check_hu = check_hu

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        return all(Path(f).is_dir() or is_volume_file(f) for f in ensure_tuple(filename))

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs):
        paths = [Path(p) for p in ensure_tuple(data)]
        if len(paths) > 1 and all(p.is_file() and looks_like_dicom(p) for p in paths):
            # one series' slice files, e.g. from a study loader
            return read_dicom_files(paths, self.max_voxels, check_hu=self.check_hu)
        volumes = [
            read_volume(
                p,
                self.series_uid,
                self.series_description,
                assume_spacing=self.assume_spacing,
                assume_orientation=self.assume_orientation,
                max_voxels=self.max_voxels,
                check_hu=self.check_hu,
            )
            for p in paths
        ]
        return volumes if len(volumes) > 1 else volumes[0]

    def get_data(self, img) -> tuple[np.ndarray, dict]:
        volumes = img if isinstance(img, list) else [img]
        arrays = [np.asarray(array, dtype=self.dtype) for array, _, _ in volumes]
        _, affine, extra = volumes[0]
        meta = {
            MetaKeys.AFFINE: affine.copy(),
            MetaKeys.ORIGINAL_AFFINE: affine.copy(),
            MetaKeys.SPATIAL_SHAPE: np.asarray(arrays[0].shape),
            MetaKeys.SPACE: SpaceKeys.RAS,
            MetaKeys.ORIGINAL_CHANNEL_DIM: float("nan") if len(arrays) == 1 else 0,
            "pixdim": np.concatenate([[1.0], np.linalg.norm(affine[:3, :3], axis=0), [1.0] * 4]),
            **extra,
        }
        return (arrays[0] if len(arrays) == 1 else np.stack(arrays)), meta


class LoadCTVolumed(ReadImaged):
    """Load CT volumes (files, DICOM series folders, or lists of one series' slice files) as ``MetaTensor``:
    :class:`~clinseg.datasets.readers.ReadImaged` with a :class:`CTVolumeReader`, so an unusable input raises the
    reader's :class:`~datasets.errors.DataError`, which names the file and the problem. The metadata is the reader's
    (RAS affine, spatial shape, source, ``geometry_assumed``). ``assume_spacing``, ``assume_orientation`` and
    ``max_voxels``: see :func:`read_volume`. The volumes of ``hu_keys`` (default ``image``; None: none) must be CT in
    Hounsfield units (``check_hu`` of :func:`read_volume`); the other keys (labels) are read as they are.
    """

    def __init__(
        self,
        keys: KeysCollection,
        series_uid: str | None = None,
        series_description: str | None = None,
        dtype=np.float32,
        allow_missing_keys: bool = False,
        assume_spacing: PositiveSpacing | None = None,
        assume_orientation: str = "RAS",
        max_voxels: PositiveInt | None = DEFAULT_MAX_VOXELS,
        hu_keys: KeysCollection | None = "image",
    ):
        options = (series_uid, series_description, dtype, assume_spacing, assume_orientation, max_voxels)
        reader = CTVolumeReader(*options)
        super().__init__(keys, reader, allow_missing_keys=allow_missing_keys)
        self.reader = reader
        self.hu_keys = set(ensure_tuple(hu_keys)) if hu_keys is not None else set()
        # ReadImaged picks a reader by a path's name; whether a volume must be in HU depends on its key instead
        hu_reader = CTVolumeReader(*options, check_hu=True)
        parts = (
            ([k for k in self.keys if k in self.hu_keys], hu_reader),
            ([k for k in self.keys if k not in self.hu_keys], reader),
        )
        self.parts = [
            ReadImaged(part_keys, part_reader, allow_missing_keys=allow_missing_keys)
            for part_keys, part_reader in parts
            if part_keys
        ]

    def __call__(self, data) -> dict:
        d = dict(data)
        for part in self.parts:
            d = part(d)
        return d
