"""The input policy of the 2D bundles through their real command lines: results that cannot collide, an output
folder that cannot feed back into the input, files that are not data skipped, deep pixels read faithfully, a patch
larger than the images refused before training (the CT side is in ``tests/test_input_policy_ct.py``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
from monai.bundle import ConfigParser
from PIL import Image

from clinseg.datasets.fundus.phantom import write_drive_layout
from tests.conftest import REPO_ROOT, decode, run_bundle

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")
TINY_NETWORK = {"network_def#channels": "[4,8]", "network_def#strides": "[2]"}


def inference_config(bundle: str) -> list[str]:
    return [str(REPO_ROOT / "bundles" / bundle / "configs" / "inference.json")]


def untrained_bundle(bundle: str, root) -> str:
    """A bundle root whose models/model.pt holds the tiny network's initial weights (inference needs a model)."""
    parser = ConfigParser()
    parser.read_config(inference_config(bundle))
    for key, value in TINY_NETWORK.items():
        parser[key] = json.loads(value)
    (root / "models").mkdir(parents=True)
    torch.save(parser.get_parsed_content("network_def").state_dict(), root / "models" / "model.pt")
    return str(root)


def grey(path, shape=(32, 48), seed=0):  # the smallest B-scan an OCT inference takes is 32 x 32
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, shape, dtype=np.uint8)).save(path)


def test_same_stem_inputs_get_results_of_their_own(tmp_path, tracking_uri):
    inputs = tmp_path / "scans"
    inputs.mkdir()
    grey(inputs / "b0.png", seed=1)
    grey(inputs / "b0.tif", seed=2)
    grey(inputs / "b1.png", seed=3)
    (inputs / "README.txt").write_text("scans of the left eye")  # not data: skipped, named in the log
    out = tmp_path / "results"
    result = run_bundle(
        "inferring",
        inference_config("oct_layers"),
        # an untrained network puts layers in no order, which inference refuses unless told otherwise
        {"bundle_root": untrained_bundle("oct_layers", tmp_path / "b"), "input_dir": inputs, "output_dir": out,
         "image_size": "[32,32]", "max_layer_order_relabelled": "1.0", "max_retina_height_ratio": "100",
         **TINY_NETWORK},
    )  # fmt: skip
    for name in ("b0_png", "b0_tif", "b1"):
        assert (out / f"{name}_seg.png").is_file() and json.loads((out / f"{name}.json").read_text())["id"] == name
    assert not (out / "b0_seg.png").exists()
    summary = json.loads((out / "inference_summary.json").read_text())
    assert summary["n_written"] == summary["n_inputs"] == 3
    assert "wrote 3 of 3" in result.stdout and "README.txt" in result.stdout + result.stderr


def test_an_output_folder_inside_the_input_folder_is_refused_before_anything_is_written(tmp_path, tracking_uri):
    inputs = tmp_path / "photos"
    inputs.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(inputs / "f0.png")
    result = run_bundle(
        "inferring",
        inference_config("vessels"),
        {"bundle_root": untrained_bundle("vessels", tmp_path / "b"), "input_dir": inputs,
         "output_dir": inputs / "results", "sw_roi_size": "[32,32]", **TINY_NETWORK},
        check=False,
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    error_line = next(line for line in result.stderr.splitlines() if line.startswith("error:"))
    assert str(inputs) in error_line and "results" in error_line, result.stderr
    assert sorted(p.name for p in inputs.iterdir()) == ["f0.png"]


def test_a_patch_larger_than_the_images_is_refused_before_training(tmp_path, tracking_uri):
    data = tmp_path / "drive"
    write_drive_layout(data, n_images=3, shape=(40, 36), seed=1)
    result = run_bundle(
        "training",
        [str(REPO_ROOT / "bundles" / "vessels" / "configs" / "train.json")],
        {"bundle_root": tmp_path / "b", "dataset_dir": data, "patch_size": "[64,64]", **TINY_NETWORK},
        check=False,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "smaller than the training patch [64, 64]" in result.stderr and "21_training.tif" in result.stderr
    assert not (tmp_path / "b" / "models").exists() or not any((tmp_path / "b" / "models").iterdir())


def test_a_12_bit_camera_photograph_keeps_its_grey_levels(tmp_path):
    """16-bit RGB TIFFs of 12-bit camera data: read through the vessels bundle, every level survives."""
    write_drive_layout(tmp_path, n_images=1, shape=(64, 64), seed=3)
    image_path = next((tmp_path / "training" / "images").iterdir())
    levels = np.random.default_rng(0).integers(0, 4096, (64, 64, 3)).astype(np.uint16)
    tifffile.imwrite(image_path, levels, photometric="rgb")
    item = {"image": str(image_path), "id": "21"}
    image = decode("vessels", [item])[0]["image"]
    np.testing.assert_allclose(image, np.moveaxis(levels, -1, 0) * (255 / 4095), rtol=1e-5)
    assert len(np.unique(image[1])) == len(np.unique(levels[..., 1])) > 2000  # not 16 levels (the high byte only)


def header_only_png(path, rows: int, cols: int) -> None:
    """A PNG whose header announces rows x cols grey pixels, with one row of data: a few hundred bytes."""
    import struct
    import zlib

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", cols, rows, 8, 0, 0, 0, 0)
    data = zlib.compress(b"\x00" * (cols + 1), 9)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))


@pytest.mark.parametrize(
    "bundle, config, datalist, layout",
    [
        ("vessels", "inference", "datalist", {"big.png": None}),
        ("oct_layers", "inference", "datalist", {"big.png": None}),
        ("vessels", "train", "train#datalist", {"images/big.png": "masks/big.png"}),
        ("oct_layers", "train", "train#datalist", {"images/big.png": "labels/big.png"}),
    ],
)
def test_raising_max_pixels_as_the_error_says_lets_the_images_be_listed(tmp_path, bundle, config, datalist, layout):
    """The size check at listing time obeys ``max_pixels``, as the readers do: the error's advice works."""
    from clinseg.datasets.errors import DataError
    from clinseg.pipelines.cli import find_input_error

    for image, label in layout.items():
        for name in filter(None, (image, label)):
            header_only_png(tmp_path / "data" / name, 15000, 15000)  # 225 million pixels, above the default limit
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundles" / bundle / "configs" / f"{config}.json"))
    parser["dataset_dir"] = parser["input_dir"] = str(tmp_path / "data")
    if config == "inference":  # the image is listed as refused, with the error and its advice, and the run goes on
        (item,) = parser.get_parsed_content(datalist)
        assert item["refused"].startswith(f"{tmp_path / 'data' / 'big.png'}: ")
        assert "--max_pixels 225000000" in item["refused"] + item["refused_hint"], item
    else:
        with pytest.raises(Exception) as error:
            parser.get_parsed_content(datalist)
        found = find_input_error(error.value)
        assert isinstance(found, DataError) and "--max_pixels 225000000" in str(found)
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundles" / bundle / "configs" / f"{config}.json"))
    parser["dataset_dir"] = parser["input_dir"] = str(tmp_path / "data")
    parser["max_pixels"] = 300_000_000
    items = parser.get_parsed_content(datalist)
    assert [item["image"] for item in items] == [str(tmp_path / "data" / next(iter(layout)))]
    assert not any("refused" in item for item in items)
