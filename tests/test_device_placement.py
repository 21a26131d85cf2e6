"""The validation post-processing keeps its tensors on the device the network ran on.

A bundle's evaluator (``SupervisedEvaluator`` with its ``device``) hands the post-processing the prediction and the
label on the GPU; a transform that makes a tensor on the CPU and mixes it with them stops the first validation of a
GPU training. These tests run on the GPU where one is visible, and on the CPU elsewhere (CI has no GPU), where
they still check the same results; run them on a GPU machine after changing a transform.
"""

from __future__ import annotations

import torch
from monai.bundle import ConfigParser

from clinseg.datasets.fundus.phantom import write_drive_layout
from clinseg.datasets.readers import read_binary_mask
from clinseg.transforms.labels import OneHotWithIgnored
from tests.conftest import REPO_ROOT

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_one_hot_with_ignored_pixels_stays_on_the_labels_device():
    label = torch.tensor([[[0, 2], [255, 1]]], device=DEVICE)
    onehot = OneHotWithIgnored("label", num_classes=3)({"label": label})["label"]
    assert onehot.device.type == DEVICE.type
    assert onehot.argmax(0).tolist() == [[0, 2], [0, 1]]
    assert onehot[:, 1, 0].sum().item() == 0, "the ignored pixel has no class"


def test_vessels_validation_postprocessing_gives_the_cpus_results_on_the_networks_device(tmp_path):
    """On a photograph the preprocessing resampled (its disc scaled for the network), so that the prediction is
    inverted onto the photograph's own grid and scored against the annotation as read."""
    write_drive_layout(tmp_path, n_images=4, shape=(80, 72), seed=2)
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundles" / "vessels" / "configs" / "train.json"))
    parser["dataset_dir"], parser["fov_diameter_px"] = str(tmp_path), 40  # discs of ~70 px: resampled by ~0.6
    (case,) = parser.get_parsed_content("validate#datalist")
    item = parser.get_parsed_content("validate#preprocessing")(case)
    assert item["image"].shape[1:] != item["native_label"].shape[1:], "the photograph was resampled"
    postprocessing = parser.get_parsed_content("validate#postprocessing")
    logits = torch.randn(2, *item["image"].shape[1:], generator=torch.Generator().manual_seed(0))

    def on(device):
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in item.items()}
        return postprocessing({**moved, "pred": logits.to(device)})

    on_cpu, on_device = on("cpu"), on(DEVICE)
    for key in ("pred", "prob", "label"):
        assert on_device[key].device.type == DEVICE.type, key
        assert on_cpu[key].shape[1:] == (80, 72), "on the photograph's own grid"
        expected = on_cpu[key].as_subclass(torch.Tensor)
        torch.testing.assert_close(on_device[key].cpu().as_subclass(torch.Tensor), expected)
    outside = ~read_binary_mask(tmp_path / "training" / "mask" / f"{case['id']}_training_mask.gif")
    assert on_cpu["label"][:, torch.from_numpy(outside)].sum() == 0, "pixels outside the field of view: no class"
