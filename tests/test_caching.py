"""The disk cache serves from disk: a second pass over a ``cache: disk`` dataset decodes no image and rewrites no
entry (torch's weights-only loading refuses MetaTensor, which once made every entry look corrupt and be recomputed)."""

from __future__ import annotations

import warnings

import pytest
import torch
from monai.bundle import ConfigParser

from clinseg.datasets.fundus.phantom import write_drive_layout
from clinseg.datasets.readers import PhotoReader
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")


def test_a_disk_cache_is_read_back_not_recomputed(tmp_path, monkeypatch):
    write_drive_layout(tmp_path / "drive", n_images=4, shape=(48, 40), seed=1)
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundles" / "vessels" / "configs" / "train.json"))
    parser.update({"dataset_dir": str(tmp_path / "drive"), "cache": "disk", "cache_dir": str(tmp_path / "cache"),
                   "patch_size": [16, 16], "repeats_per_epoch": 1})  # fmt: skip
    dataset = parser.get_parsed_content("train#dataset")
    decoded = []
    original = PhotoReader.decode
    monkeypatch.setattr(PhotoReader, "decode", lambda self, path: decoded.append(path) or original(self, path))

    for _ in range(len(dataset)):
        dataset[_]
    assert len(decoded) == len(dataset) == 3, "the first pass decodes each training image once"
    entries = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.pt")}
    assert len(entries) == 3

    decoded.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for index in range(len(dataset)):
            assert dataset[index][0]["image"].shape[-2:] == (16, 16)
    assert decoded == [], "a cached item was decoded again"
    assert not [w for w in caught if "Corrupt cache" in str(w.message)]
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.pt")} == entries


@pytest.mark.parametrize(
    "setting, first, second",
    [("clahe", False, True), ("channels", "green", "rgb"), ("fov_diameter_px", 538, 30)],
)
def test_a_disk_cache_shared_by_runs_with_other_preprocessing_serves_each_its_own(setting, first, second, tmp_path):
    """Two runs on the same data share its cache folder (keyed by the data's fingerprint); the entries' names must
    carry the preprocessing's settings, not only its transforms' class names (MONAI's ``json_hashing`` falls back
    to those), or the second run trains on the first run's inputs while its model.json records its own."""
    write_drive_layout(tmp_path / "drive", n_images=4, shape=(48, 40), seed=1)

    def first_item(value):
        parser = ConfigParser()
        parser.read_config(str(REPO_ROOT / "bundles" / "vessels" / "configs" / "train.json"))
        parser.update({"dataset_dir": str(tmp_path / "drive"), "cache": "disk", "cache_dir": str(tmp_path / "cache"),
                       "patch_size": [16, 16], "repeats_per_epoch": 1, setting: value})  # fmt: skip
        dataset = parser.get_parsed_content("train#dataset")
        return dataset._cachecheck(dataset.data[0])["image"]

    without, with_setting = first_item(first), first_item(second)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2, "each preprocessing writes an entry of its own"
    assert without.shape != with_setting.shape or not torch.equal(without, with_setting)
    assert torch.equal(first_item(first), without), "the first preprocessing still reads its own entries"
