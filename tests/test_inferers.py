"""Test-time augmentation: every pass is undone before the average, on non-square images too."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SimpleInferer

from clinseg.pipelines.engine.inferers import FlipTTAInferer, MultiScaleInferer


def test_a_network_that_commutes_with_the_symmetries_is_unchanged_by_them():
    """A per-pixel network commutes with every flip and quarter turn: the average of the passes is its own output,
    only if each pass is undone exactly (a transposition left in place would not even have the input's shape)."""
    torch.manual_seed(0)
    network = torch.nn.Conv2d(1, 2, kernel_size=1)
    image = torch.rand(1, 1, 7, 5)
    plain = network(image)
    for rot90 in (False, True):
        augmented = FlipTTAInferer(SimpleInferer(), spatial_axes=[0, 1], rot90=rot90)(image, network)
        assert augmented.shape == plain.shape == (1, 2, 7, 5)
        torch.testing.assert_close(augmented, plain)


def test_the_eight_passes_average_the_symmetries_of_the_square():
    """A network that sees the orientation (a filter along the rows only): flips give four views, the swapped
    axes four more, and the average is the mean of exactly those eight."""
    network = torch.nn.Conv2d(1, 1, kernel_size=(3, 1), padding=(1, 0), bias=False)
    with torch.no_grad():
        network.weight.copy_(torch.tensor([1.0, 2.0, 4.0]).reshape(1, 1, 3, 1))

    image = torch.rand(1, 1, 6, 6)
    views = []
    for k in range(4):
        for mirrored in (False, True):
            turned = torch.rot90(torch.flip(image, [3]) if mirrored else image, k, [2, 3])
            back = torch.rot90(network(turned), -k, [2, 3])
            views.append(torch.flip(back, [3]) if mirrored else back)
    expected = torch.stack(views).mean(0).detach()
    torch.testing.assert_close(FlipTTAInferer(SimpleInferer(), [0, 1], rot90=True)(image, network).detach(), expected)
    flips_only = FlipTTAInferer(SimpleInferer(), [0, 1])(image, network).detach()
    assert not torch.allclose(flips_only, expected), "the quarter turns add views the flips do not have"


def test_quarter_turns_need_two_axes():
    with pytest.raises(ValueError, match="two spatial axes"):
        FlipTTAInferer(SimpleInferer(), spatial_axes=[1], rot90=True)


def test_scales_are_undone_onto_the_given_grid_and_keep_its_metadata():
    """A per-pixel network on a smooth image: each scale's logits come back onto the input's grid (an odd,
    non-square shape), close to the plain pass but not equal to it (the resampling is real), with the input's
    metadata (the inverse transforms of inference read it)."""
    torch.manual_seed(0)
    network = torch.nn.Conv2d(1, 2, kernel_size=1)
    rows, columns = torch.meshgrid(torch.linspace(0, 1, 37), torch.linspace(0, 1, 29), indexing="ij")
    image = MetaTensor(torch.sin(3 * rows + 2 * columns)[None, None], meta={"filename_or_obj": "a.png"})
    plain = network(image.as_tensor()).detach()
    averaged = MultiScaleInferer(SimpleInferer(), scales=[0.75, 1.0, 1.5])(image, network).detach()
    assert averaged.shape == (1, 2, 37, 29)
    assert isinstance(averaged, MetaTensor) and averaged.meta["filename_or_obj"] == "a.png"
    assert torch.allclose(averaged.as_tensor(), plain, atol=0.05)
    assert not torch.allclose(averaged.as_tensor(), plain, atol=1e-5)
    alone = MultiScaleInferer(SimpleInferer(), scales=[1.0])(image, network).detach()
    torch.testing.assert_close(alone.as_tensor(), plain)


def test_a_network_that_sees_scale_gets_the_mean_of_its_scales():
    """A network whose output depends on the scale (a fixed-size box filter): the average is the mean of the passes
    each resampled back, in the order given."""
    network = torch.nn.Conv2d(1, 1, kernel_size=5, padding=2, bias=False)
    with torch.no_grad():
        network.weight.fill_(1 / 25)
    image = torch.rand(1, 1, 40, 40)
    small = torch.nn.functional.interpolate(image, size=[20, 20], mode="bilinear", antialias=True)
    back = torch.nn.functional.interpolate(network(small), size=[40, 40], mode="bilinear")
    expected = ((network(image) + back) / 2).detach()
    torch.testing.assert_close(MultiScaleInferer(SimpleInferer(), [1.0, 0.5])(image, network).detach(), expected)


@pytest.mark.parametrize("scales", [[], [0.0], [10.0]])
def test_scales_out_of_range_are_refused(scales):
    with pytest.raises(ValueError, match="factors in"):
        MultiScaleInferer(SimpleInferer(), scales=scales)
