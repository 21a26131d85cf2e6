"""Read CT volumes of any release format into (array, RAS affine) pairs, and a MONAI ``ImageReader`` built on it.

Formats: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage (``.mha``, ``.mhd``), and DICOM
series folders (see :mod:`datasets.ct.dicom`). Every volume comes out indexed ``[i, j, k]`` with the affine that
maps voxel indices to RAS+ millimetres (MONAI's and NIfTI's convention), so the bundles' ``Orientationd`` and
``Spacingd`` work the same for all of them and predictions can be written back on the input's exact grid.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import ImageReader, MetaTensor
from monai.transforms import MapTransform
from monai.utils import MetaKeys, SpaceKeys, ensure_tuple

from clinseg.datasets.errors import DataError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
VOLUME_SUFFIXES = NIFTI_SUFFIXES + ITK_SUFFIXES
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_volume_file(path: str | os.PathLike) -> bool:
    return str(path).lower().endswith(VOLUME_SUFFIXES)


def looks_like_dicom(path: str | os.PathLike) -> bool:
    """A cheap test for a DICOM Part 10 file: the ``DICM`` preamble marker (or a ``.dcm`` suffix)."""
    path = Path(path)
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def case_id(path: str | os.PathLike) -> str:
    """A case's id from its file or folder name: extension and nnU-Net's ``_0000`` channel suffix removed."""
    name = Path(path).name
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    if len(name) > 5 and name[-5] == "_" and name[-4:].isdigit():
        name = name[:-5]
    return name


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    try:
        image = nib.load(path)
        array = np.asanyarray(image.dataobj)  # applies scl_slope/scl_inter when the header has them
    except FileNotFoundError as e:
        raise DataError(path, "does not exist.") from e
    except Exception as e:  # nibabel raises many types for truncated or non-NIfTI files (EOFError, zlib, header)
        raise DataError(path, f"cannot be read as NIfTI (empty, truncated or not a NIfTI file): {e}") from e
    return array, np.asarray(image.affine, dtype=np.float64)


def _read_itk(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import SimpleITK as sitk

    if not path.exists():
        raise DataError(path, "does not exist.")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        raise DataError(path, f"cannot be read as {path.suffix.lstrip('.').upper()} (empty or truncated?): {e}") from e
    if image.GetDimension() != 3:
        raise DataError(path, f"is {image.GetDimension()}-dimensional; a CT volume must be 3D.")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise DataError(path, f"has {image.GetNumberOfComponentsPerPixel()} components per voxel; expected 1.")
    array = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))  # ITK arrays are [k, j, i]
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine_lps = np.eye(4)
    affine_lps[:3, :3] = direction * np.asarray(image.GetSpacing(), dtype=np.float64)
    affine_lps[:3, 3] = image.GetOrigin()
    return array, LPS_TO_RAS @ affine_lps


def read_volume(
    path: str | os.PathLike,
    series_uid: str | None = None,
    series_description: str | None = None,
    check_finite: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read a CT volume (file or DICOM series folder) as ``(array [i, j, k], affine to RAS mm, metadata)``.

    DICOM series are converted to Hounsfield units with each slice's RescaleSlope/Intercept; NIfTI scaling is
    applied. ``series_uid``/``series_description`` select a series in a folder holding several.

    Raises:
        DataError: naming the file or folder and the problem (unreadable, not 3D, NaN/Inf values, ...).
    """
    path = Path(path)
    meta: dict = {}
    if path.is_dir():
        from clinseg.datasets.ct.dicom import read_ct_series

        volume = read_ct_series(path, series_uid=series_uid, series_description=series_description)
        array, affine = volume.hu, LPS_TO_RAS @ volume.affine_lps
        meta.update(source_format="dicom", series_uid=volume.series_uid, series_description=volume.description)
    elif str(path).lower().endswith(NIFTI_SUFFIXES):
        array, affine = _read_nifti(path)
        meta["source_format"] = "nifti"
    elif str(path).lower().endswith(ITK_SUFFIXES):
        array, affine = _read_itk(path)
        meta["source_format"] = path.suffix.lstrip(".").lower()
    elif not path.exists():
        raise DataError(path, "does not exist.")
    else:
        raise DataError(
            path, f"is not a supported volume: expected a DICOM series folder or one of {', '.join(VOLUME_SUFFIXES)}."
        )
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 3:
        raise DataError(path, f"has shape {tuple(array.shape)}; a CT volume must be 3D (one channel).")
    if min(array.shape) < 2:
        raise DataError(path, f"has shape {tuple(array.shape)}; a volume needs at least 2 voxels along every axis.")
    if check_finite and np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise DataError(path, f"holds {bad} NaN or infinite voxel values.")
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise DataError(path, f"has an invalid (singular or non-finite) voxel-to-world affine:\n{affine}")
    return array, affine, meta


def read_dicom_files(files: Sequence[str | os.PathLike]) -> tuple[np.ndarray, np.ndarray, dict]:
    """One CT series given as its slice files (all checks of :func:`datasets.ct.dicom.read_ct_series` apply)."""
    from clinseg.datasets.ct.dicom import read_ct_series

    files = [Path(f) for f in files]
    folder = Path(os.path.commonpath([str(f.parent) for f in files]))
    volume = read_ct_series(folder, files=files)
    meta = {"source_format": "dicom", "series_uid": volume.series_uid, "series_description": volume.description}
    return volume.hu, LPS_TO_RAS @ volume.affine_lps, meta


class CTVolumeReader(ImageReader):
    """MONAI ``ImageReader`` for CT volumes of every supported format, DICOM series folders included.

    Use as ``LoadImaged(keys, reader=CTVolumeReader())``. Images come out in float32 (HU for CT), labels keep
    their values; the metadata carries ``affine``/``original_affine`` (RAS), ``spatial_shape`` and the source
    format, so ``Invertd`` and ``SaveImaged`` restore the input's grid.
    """

    def __init__(self, series_uid: str | None = None, series_description: str | None = None, dtype=np.float32):
        super().__init__()
        self.series_uid, self.series_description, self.dtype = series_uid, series_description, dtype

    def verify_suffix(self, filename: Sequence[os.PathLike] | os.PathLike) -> bool:
        return all(Path(f).is_dir() or is_volume_file(f) for f in ensure_tuple(filename))

    def read(self, data: Sequence[os.PathLike] | os.PathLike, **kwargs):
        paths = [Path(p) for p in ensure_tuple(data)]
        if len(paths) > 1 and all(p.is_file() and looks_like_dicom(p) for p in paths):
            return read_dicom_files(paths)  # the slice files of one series, e.g. from a DICOM study loader
        volumes = [read_volume(p, self.series_uid, self.series_description) for p in paths]
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


class LoadCTVolumed(MapTransform):
    """Load CT volumes (files, DICOM series folders, or lists of one series' slice files) as ``MetaTensor``.

    Like ``LoadImaged(keys, reader=CTVolumeReader())`` but without MONAI's fallback to other readers: an unusable
    input raises the reader's :class:`~datasets.errors.DataError`, which names the file and the problem, instead of
    a generic "cannot find a suitable reader". The metadata is the reader's (RAS affine, spatial shape, source).
    """

    def __init__(
        self,
        keys: KeysCollection,
        series_uid: str | None = None,
        series_description: str | None = None,
        dtype=np.float32,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.reader = CTVolumeReader(series_uid, series_description, dtype)

    def __call__(self, data: Mapping[Hashable, object]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            source = d[key]
            array, meta = self.reader.get_data(self.reader.read(source))
            first = source[0] if isinstance(source, (list, tuple)) else source
            meta["filename_or_obj"] = str(first)
            d[key] = MetaTensor(torch.as_tensor(array), affine=torch.as_tensor(meta[MetaKeys.AFFINE]), meta=meta)
        return d
