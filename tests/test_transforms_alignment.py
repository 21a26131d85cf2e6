"""Predictions land on the pixels they were made for: what the preprocessing resamples and the inversion brings back
(the fundus photograph's scale to its field of view, the B-scan's resize) is shifted by no fraction of a pixel, on
odd and non-square sizes and on real photographs and B-scans."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.transforms import Compose, CopyItemsd, Invertd
from PIL import Image

from clinseg.datasets.readers import PhotoReader, ReadImaged
from clinseg.transforms.fundus import EstimateFOVd, ScaleToFOVd, fov_diameter
from tests.conftest import OCT_BUNDLE, shared_path


def centroid(weights: np.ndarray) -> np.ndarray:
    weights = np.asarray(weights, dtype=np.float64)
    rows, cols = np.indices(weights.shape)
    return np.array([(weights * rows).sum(), (weights * cols).sum()]) / weights.sum()


def blobs(shape: tuple[int, int], centres: list[tuple[float, float]], sigma: float = 8.0) -> np.ndarray:
    rows, cols = np.indices(shape)
    return sum(np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * sigma**2)) for r, c in centres).astype(np.float32)


def disc(shape: tuple[int, int], radius: float) -> np.ndarray:
    rows, cols = np.indices(shape)
    return ((rows - (shape[0] - 1) / 2) ** 2 + (cols - (shape[1] - 1) / 2) ** 2 < radius**2).astype(np.uint8)


@pytest.mark.parametrize("shape", [(961, 1001), (1001, 700), (583, 1203)])
def test_scaling_to_the_fov_and_back_shifts_nothing(shape):
    """Odd, portrait and cut-disc (wider than tall) photographs: a blob at a sub-pixel position lies, on the
    resampled grid read through its affine, where it lies in the photograph, and comes back there."""
    centres = [(shape[0] / 4 + 0.3, shape[1] / 3 + 0.7), (0.7 * shape[0] + 0.5, 0.6 * shape[1] + 0.2)]
    image = blobs(shape, centres)[None]
    fov = disc(shape, 0.47 * max(shape))[None]  # larger than the short side: cut at two edges
    preprocessing = Compose([ScaleToFOVd(["image", "fov"], mode=["bilinear", "nearest"])])
    item = preprocessing({"image": MetaTensor(torch.as_tensor(image)), "fov": MetaTensor(torch.as_tensor(fov))})
    factor = item["image"].meta["fov_scale"]
    assert factor < 0.9 and fov_diameter(item["fov"]) == pytest.approx(538, abs=2)
    small = item["image"][0].numpy()
    affine = item["image"].affine.numpy()
    rows, cols = np.indices(small.shape)
    for r, c in centres:
        near = (rows - r * factor) ** 2 + (cols - c * factor) ** 2 < (30 * factor) ** 2
        found = affine @ np.array([*centroid(np.where(near, small, 0)), 0.0, 1.0])
        np.testing.assert_allclose(found[:2], [r, c], atol=0.05)
    item["pred"] = item["image"].clone()
    back = Invertd(["pred", "fov"], preprocessing, orig_keys=["image", "fov"], nearest_interp=[False, True])(item)
    assert back["pred"].shape == image.shape and back["fov"].shape == fov.shape
    rows, cols = np.indices(shape)
    for r, c in centres:
        near = (rows - r) ** 2 + (cols - c) ** 2 < 30**2
        restored, original = (centroid(np.where(near, a, 0)) for a in (back["pred"][0].numpy(), image[0]))
        np.testing.assert_allclose(restored, original, atol=0.02)
    # nearest-neighbour both ways: the disc's rim moves by up to a source pixel per row, not the disc
    np.testing.assert_allclose(centroid(back["fov"][0].numpy()), centroid(fov[0]), atol=0.25)
    overlap = (back["fov"][0].numpy() > 0) & (fov[0] > 0)
    assert overlap.sum() / ((back["fov"][0].numpy() > 0) | (fov[0] > 0)).sum() > 0.99


def test_a_real_photograph_scaled_to_its_fov_comes_back_onto_its_own_pixels():
    """A CHASE_DB1 photograph enlarged 3x (2997 x 2880, disc about 2760 pixels): its vessel mask, as a prediction
    made at the network's scale, inverted onto the photograph's grid, lies on the mask (no shift between them)."""
    root = shared_path("vessels", "CHASEDB1_x3")
    photograph, mask = root / "images" / "Image_01L.jpg", root / "masks" / "Image_01L.jpg"
    vessels = (np.asarray(Image.open(mask).convert("L")) > 127).astype(np.float32)
    preprocessing = Compose(
        [
            ReadImaged("image", reader=PhotoReader(channels="rgb")),
            EstimateFOVd("image"),
            CopyItemsd(["image", "fov"], names=["photo", "native_fov"]),
            ScaleToFOVd(["image", "fov"], mode=["bilinear", "nearest"]),
        ]
    )
    item = preprocessing({"image": str(photograph)})
    assert item["photo"].shape[1:] == vessels.shape and item["image"].meta["fov_scale"] < 0.25
    # the mask resampled as the photograph was: a prediction that is exactly right at the network's scale
    vessel_map = MetaTensor(torch.as_tensor(vessels[None]))
    scaled = ScaleToFOVd("image")({"image": vessel_map, "fov": item["native_fov"]})
    assert scaled["image"].shape[1:] == item["image"].shape[1:]
    item["pred"] = MetaTensor(scaled["image"].as_tensor(), meta=dict(item["image"].meta))
    back = Invertd("pred", preprocessing, orig_keys="image", nearest_interp=False)(item)["pred"][0].numpy()
    assert back.shape == vessels.shape
    # the vessels' centre of mass: a symmetric blur keeps it where it was, a shift of the grid moves it
    shift = centroid(back) - centroid(vessels)
    assert np.abs(shift).max() < 0.02, f"the inverted prediction is shifted by {shift} pixels"
    inside = np.asarray(item["native_fov"][0]) > 0
    dice = 2 * ((back > 0.5) & (vessels > 0) & inside).sum() / (((back > 0.5) & inside).sum() + (vessels > 0).sum())
    assert dice > 0.75, dice  # what a 5x smaller copy of 1 to 6 pixel wide vessels can hold of them


def test_a_real_bscan_prediction_comes_back_onto_its_labels():
    """An NR206 B-scan (500 x 750) resized for the network (256 x 384) as validation and inference resize it: its
    label, as a perfect prediction on the network's grid, inverted to the B-scan's grid lies on the label: the layers
    (3 to 30 rows thick) keep their rows."""
    from clinseg.transforms.labels import ColorToLabel

    root = shared_path("oct", "NR206_sample")
    parser = ConfigParser()
    parser.read_config([str(OCT_BUNDLE / "configs" / "train.json"), str(OCT_BUNDLE / "configs" / "nr206.json")])
    colours = parser.get_parsed_content("label_colors")
    label = ColorToLabel(colours)(np.asarray(Image.open(root / "val_labels" / "NORMAL129.png")))
    classes = len(colours)
    resize = parser.get_parsed_content("validate#preprocessing").transforms[-1]  # the image's Resized
    preprocessing = Compose([ReadImaged("image", reader=PhotoReader(channels="grey")), resize])
    item = preprocessing({"image": str(root / "val" / "NORMAL129.png")})
    assert item["image"].shape[1:] == tuple(parser.get_parsed_content("image_size"))
    one_hot = torch.nn.functional.one_hot(torch.as_tensor(label, dtype=torch.long), classes).permute(2, 0, 1).float()
    on_network_grid = torch.nn.functional.interpolate(one_hot[None], size=item["image"].shape[1:], mode="area")[0]
    item["pred"] = MetaTensor(on_network_grid, meta=dict(item["image"].meta))
    back = Invertd("pred", preprocessing, orig_keys="image", nearest_interp=False)(item)["pred"]
    assert back.shape[1:] == label.shape
    predicted = back.argmax(0).numpy()
    for layer in range(1, classes):
        truth = label == layer
        dice = 2 * (truth & (predicted == layer)).sum() / (truth.sum() + (predicted == layer).sum())
        # the mean row of each layer in each column: no systematic shift up or down
        rows = np.arange(label.shape[0])[:, None]
        shift = np.nanmean(
            np.where(
                truth.any(0), (rows * (predicted == layer)).sum(0) / np.maximum((predicted == layer).sum(0), 1), np.nan
            )
            - np.where(truth.any(0), (rows * truth).sum(0) / np.maximum(truth.sum(0), 1), np.nan)
        )
        assert dice > 0.85 and abs(shift) < 0.25, f"layer {layer}: Dice {dice:.3f}, mean row shift {shift:+.2f}"
