"""On a GPU: the validation post-processing keeps its tensors on the device the network ran on.

A bundle's evaluator (``SupervisedEvaluator`` with its ``device``) hands the post-processing the prediction and the
label on the GPU; a transform that makes a tensor on the CPU and mixes it with them stops the first validation of a
GPU training. These tests need CUDA and are skipped without it (CI has no GPU); they are run on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser

from clinseg.transforms.labels import OneHotWithIgnored
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none is visible here)")


def test_one_hot_with_ignored_pixels_stays_on_the_labels_device():
    label = torch.tensor([[[0, 2], [255, 1]]], device="cuda")
    onehot = OneHotWithIgnored("label", num_classes=3)({"label": label})["label"]
    assert onehot.device.type == "cuda"
    assert onehot.argmax(0).tolist() == [[0, 2], [0, 1]]
    assert onehot[:, 1, 0].sum().item() == 0, "the ignored pixel has no class"


def test_vessels_validation_postprocessing_runs_on_the_gpu_as_on_the_cpu():
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundles" / "vessels" / "configs" / "train.json"))
    postprocessing = parser.get_parsed_content("validate#postprocessing")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 32, 40, generator=generator)
    label = (torch.rand(1, 32, 40, generator=generator) > 0.7).long()
    label[:, :4] = 255  # outside the field of view
    on_cpu = postprocessing({"pred": logits.clone(), "label": label.clone()})
    on_gpu = postprocessing({"pred": logits.cuda(), "label": label.cuda()})
    for key in ("pred", "prob", "label"):
        assert on_gpu[key].device.type == "cuda", key
        torch.testing.assert_close(on_gpu[key].cpu().as_subclass(torch.Tensor), on_cpu[key].as_subclass(torch.Tensor))
