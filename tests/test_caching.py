"""The disk cache serves from disk: a second pass over a ``cache: disk`` dataset decodes no image and rewrites no
entry (torch's weights-only loading refuses MetaTensor, which once made every entry look corrupt and be recomputed)."""

from __future__ import annotations

import warnings

import pytest
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
