"""The validation post-processing keeps its tensors on the device the network ran on.

A bundle's evaluator (``SupervisedEvaluator`` with its ``device``) hands the post-processing the prediction and the
label on the GPU; a transform that makes a tensor on the CPU and mixes it with them stops the first validation of a
GPU training. These tests run on the GPU where one is visible, and on the CPU elsewhere (CI has no GPU), where
they still check the same results; run them on a GPU machine after changing a transform.
"""

from __future__ import annotations

import torch
from monai.bundle import ConfigParser

from clinseg.transforms.labels import OneHotWithIgnored
from tests.conftest import REPO_ROOT

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_one_hot_with_ignored_pixels_stays_on_the_labels_device():
    label = torch.tensor([[[0, 2], [255, 1]]], device=DEVICE)
    onehot = OneHotWithIgnored("label", num_classes=3)({"label": label})["label"]
    assert onehot.device.type == DEVICE.type
    assert onehot.argmax(0).tolist() == [[0, 2], [0, 1]]
    assert onehot[:, 1, 0].sum().item() == 0, "the ignored pixel has no class"


def test_vessels_validation_postprocessing_gives_the_cpus_results_on_the_networks_device():
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundles" / "vessels" / "configs" / "train.json"))
    postprocessing = parser.get_parsed_content("validate#postprocessing")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 32, 40, generator=generator)
    label = (torch.rand(1, 32, 40, generator=generator) > 0.7).long()
    label[:, :4] = 255  # outside the field of view
    on_cpu = postprocessing({"pred": logits.clone(), "label": label.clone()})
    on_device = postprocessing({"pred": logits.to(DEVICE), "label": label.to(DEVICE)})
    for key in ("pred", "prob", "label"):
        assert on_device[key].device.type == DEVICE.type, key
        expected = on_cpu[key].as_subclass(torch.Tensor)
        torch.testing.assert_close(on_device[key].cpu().as_subclass(torch.Tensor), expected)
    assert on_cpu["label"][:, :4].sum() == 0, "pixels outside the field of view belong to no class"
