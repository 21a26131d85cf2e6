"""Find CT volumes and their labels in a folder and split them: the ct_heart bundle's data lists.

Accepted layout of ``dataset_dir`` (Medical Segmentation Decathlon / nnU-Net):

- ``imagesTr/`` with one volume per case: a NIfTI/NRRD/MHA file or a DICOM series folder; nnU-Net's ``_0000``
  channel suffix is allowed (``case_0000.nii.gz`` pairs with ``labelsTr/case.nii.gz``);
- ``labelsTr/`` with one label volume per case, on the image's grid or any other grid in the same world space;
- optional ``dataset.json``: its ``training`` list (``{"image": "./imagesTr/x.nii.gz", "label": ...}``) is used
  when present, otherwise the folders are paired by case id;
- optional ``imagesTs/`` (+ ``labelsTs/``): the test split, used whole.

Without a split file, the last ``val_fraction`` of the sorted case ids are validation (``datasets.io.split_by_group``).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from clinseg.datasets.ct.volumes import VOLUME_SUFFIXES, case_id, is_volume_file, looks_like_dicom
from clinseg.datasets.errors import DataError, InputError
from clinseg.datasets.io import unique_ids
from clinseg.datasets.layouts import load_datalist, register_layout, register_phantom
from clinseg.datasets.value_types import Fraction, NonNegativeInt, PositiveInt

logger = logging.getLogger(__name__)


def _cases(folder: Path, labels: dict[str, Path] | None = None, channel_suffix: bool = True) -> dict[str, Path]:
    """The volumes (files and DICOM series folders) of a folder, by case id: an image named as its label
    (``heart_0000.nii.gz`` beside ``labelsTr/heart_0000.nii.gz``) keeps its whole name, others lose nnU-Net's
    ``_0000`` channel suffix (``channel_suffix``; labels have none)."""
    cases: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            continue
        if is_volume_file(path) or path.is_dir():
            key = case_id(path, channel_suffix=False)
            if channel_suffix and key not in (labels or {}):
                key = case_id(path)
            if key in cases:
                raise DataError(folder, f"holds two volumes for case {key!r}: {cases[key].name} and {path.name}.")
            cases[key] = path
    return cases


def _pair(images_dir: Path, labels_dir: Path | None, require_labels: bool = True) -> list[dict]:
    labels = _cases(labels_dir, channel_suffix=False) if labels_dir is not None and labels_dir.is_dir() else {}
    images = _cases(images_dir, labels)
    if require_labels:
        missing = sorted(set(images) - set(labels))
        if missing:
            raise DataError(
                labels_dir or images_dir.parent / "labelsTr",
                f"has no label for {len(missing)} case(s) of {images_dir}: {', '.join(missing[:10])}.",
            )
    items = []
    for key, image in images.items():
        item = {"image": str(image), "id": key, "source": str(image)}
        if key in labels:
            item["label"] = item["annotation_source"] = str(labels[key])
        items.append(item)
    return items


def _from_dataset_json(dataset_dir: Path) -> list[dict] | None:
    path = dataset_dir / "dataset.json"
    if not path.is_file():
        return None
    try:
        description = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"is not valid JSON: {e}") from e
    entries = description.get("training")
    if not isinstance(entries, list) or not entries or not isinstance(entries[0], dict):
        return None  # nnU-Net v2 dataset.json files describe channels and labels but list no cases
    items = []
    for entry in entries:
        if "image" not in entry or "label" not in entry:
            raise DataError(path, f"a 'training' entry lacks 'image' or 'label': {entry}.")
        image, label = dataset_dir / entry["image"], dataset_dir / entry["label"]
        for file in (image, label):
            if not file.exists():
                raise DataError(file, f"does not exist (listed in {path}).")
        items.append(
            {
                "image": str(image),
                "label": str(label),
                "id": case_id(image),
                "source": str(image),
                "annotation_source": str(label),
            }
        )
    return items


@register_layout(
    "ct",
    "msd",
    "Medical Segmentation Decathlon / nnU-Net: <dir>/imagesTr/<case>.nii.gz (or .nrrd, .mha, a DICOM series folder "
    "<case>/, nnU-Net <case>_0000.nii.gz) + <dir>/labelsTr/<case>.nii.gz; optional <dir>/dataset.json "
    '("training": [{"image": ..., "label": ...}]), <dir>/imagesTs/ + <dir>/labelsTs/',
    detect=lambda d: (d / "imagesTr").is_dir() and any(_cases(d / "imagesTr")),
)
def list_msd(dataset_dir: Path, split: str, **options) -> list[dict]:
    if split == "test":
        return _pair(dataset_dir / "imagesTs", dataset_dir / "labelsTs") if (dataset_dir / "imagesTs").is_dir() else []
    items = _from_dataset_json(dataset_dir) or _pair(dataset_dir / "imagesTr", dataset_dir / "labelsTr")
    return sorted(items, key=lambda item: item["id"])


def _write_phantom(folder: Path) -> None:
    from clinseg.datasets.ct.phantom import write_msd_dataset

    write_msd_dataset(folder, n_train=16)


register_phantom("ct", _write_phantom, "python -m clinseg.datasets.ct.phantom --out data/phantoms/ct_heart")


def load_ct_datalist(
    dataset_dir: str | os.PathLike,
    split: str = "train",
    val_fraction: Fraction = 0.25,
    phantom_if_missing: bool = False,
    folds: NonNegativeInt = 0,
    fold: NonNegativeInt = 0,
    split_file: str | os.PathLike | None = None,
) -> list[dict]:
    """The ``{"image", "label", "id"}`` items (paths) of one split (``train``, ``val``, ``test``, ``all``) of a CT
    dataset (detection, phantom, split and empty-split message are the layout registry's); ``folds`` and ``fold``
    choose a cross-validation fold instead of the fixed split; ``split_file`` (a training run's ``split.json``, or
    nnU-Net's ``splits_final.json`` with ``fold``) gives the split exactly."""
    return load_datalist(
        "ct", dataset_dir, split, val_fraction, phantom_if_missing, folds=folds, fold=fold, split_file=split_file
    )


def heart_free_cases(paths: list[str] | None, key: str = "negative_images") -> list[dict]:
    """Training items for real CT volumes known to hold no heart (abdominal or pelvic scans): ``{"image", "id",
    "source", "heart_free": True}``, given an empty label by :class:`clinseg.transforms.ct.HeartFreeLabeld`. They
    show the network real anatomy that is not heart (a liver dome, a stomach, a spleen at heart density).

    Raises:
        InputError: naming ``key`` and the path, when a path does not exist.
    """

    items = []
    for path in paths or []:
        if not Path(path).exists():
            raise InputError(key, f"{path} does not exist (a heart-free CT volume file or DICOM series folder).")
        items.append({"image": str(path), "id": f"heart_free_{case_id(path)}", "source": str(path), "heart_free": True})
    return unique_ids(items)  # ids apart, and ``original_id`` as every data list item has


def labelled_cases(cases: list[dict] | None, key: str = "extra_training_cases", repeats: PositiveInt = 1) -> list[dict]:
    """Data list items for labelled CT volumes given one by one (``[{"image": path, "label": path}]``), beside a
    dataset folder: real cases added to a phantom training (fine-tuning) or to its validation. A label may be on
    another grid in the same world space (resampled onto the image's by the bundle's loader). Each case appears
    ``repeats`` times (a small set of real cases weighed against many phantoms), the copies with ids of their own.

    Raises:
        InputError: naming ``key[i]`` (or ``key[i]#image``), when an entry is not such a pair or a path does not
            exist.
    """
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise InputError(f"{key} repeats", f"must be a whole number of at least 1, not {repeats!r}.")
    items = []
    for index, case in enumerate(cases or []):
        where = f"{key}[{index}]"
        if not isinstance(case, dict) or not {"image", "label"} <= set(case):
            raise InputError(where, f"must be {{'image': path, 'label': path}}, not {case!r}.")
        for field in ("image", "label"):
            if not Path(case[field]).exists():
                raise InputError(f"{where}#{field}", f"{case[field]} does not exist.")
        name = case.get("id") or case_id(case["image"])
        for copy in range(repeats):
            items.append(
                {
                    "image": str(case["image"]),
                    "label": str(case["label"]),
                    "id": name if repeats == 1 else f"{name}_copy{copy}",
                    "source": str(case["image"]),
                    "annotation_source": str(case["label"]),
                }
            )
    return unique_ids(items)


def _is_series_folder(folder: Path) -> bool:
    """Whether ``folder`` is a DICOM series folder: any of its files looks like DICOM. Every file is looked at
    (thumbnails, a README or a checksum list may come first, or the slices may have no suffix). A folder that also
    holds volume files is refused: read as a series, its volumes would be ignored; read as volumes, the series."""
    # dot files are hidden files and writers' unfinished temporary files, which the DICOM reader skips too
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    volumes = [f for f in files if is_volume_file(f)]
    others = (f for f in files if not is_volume_file(f))
    if not volumes:
        return any(looks_like_dicom(f) for f in others)
    dicom = [f for f in others if looks_like_dicom(f)]
    if dicom:
        raise DataError(
            folder,
            f"holds both volume files ({_names(volumes)}) and DICOM files ({_names(dicom)}), so it is neither a DICOM "
            "series nor a folder of volumes: move the DICOM files to a folder of their own.",
        )
    return False


def _names(paths: list[Path], most: int = 3) -> str:
    more = f" and {len(paths) - most} more" if len(paths) > most else ""
    return ", ".join(p.name for p in paths[:most]) + more


def load_ct_images(input_path: str | os.PathLike) -> list[dict]:
    """Inference inputs: one volume file, one DICOM series folder, or a folder of volume files and series folders.

    Results are named by ``id``: inputs of one stem (``a.nii.gz`` and ``a.nrrd``, or a series folder ``a``) are
    renamed apart by :func:`datasets.io.unique_ids` (``a_nii_gz``, ``a_nrrd``), which logs it.

    Raises:
        DataError: when the path does not exist or holds no volume, or when a folder holds both volume files and
            DICOM files (is it one series, or a folder of volumes?).
    """
    path = Path(input_path)
    if not path.exists():
        raise DataError(path, "does not exist.")
    if path.is_file():
        return unique_ids([{"image": str(path), "id": case_id(path), "source": str(path)}])
    if _is_series_folder(path):
        return unique_ids([{"image": str(path), "id": path.name, "source": str(path)}])
    items = []
    for child in sorted(path.iterdir()):
        if child.name.startswith("."):
            continue
        if is_volume_file(child):
            items.append({"image": str(child), "id": case_id(child), "source": str(child)})
        elif child.is_dir() and _is_series_folder(child):
            items.append({"image": str(child), "id": child.name, "source": str(child)})
    if not items:
        raise DataError(
            path, f"holds no CT volume: expected {', '.join(VOLUME_SUFFIXES)} files or DICOM series folders."
        )
    return unique_ids(items)
