"""Transforms (label values survive augmentation), the ignore-aware loss, and the metrics against hand values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from PIL import Image

from clinseg.datasets.errors import ConfigError, DataError
from clinseg.datasets.fundus.phantom import synthesize_fundus
from clinseg.datasets.oct import load_oct_datalist
from clinseg.datasets.readers import LabelImageReader, PhotoReader, ReadImaged
from clinseg.pipelines.engine.losses import DiceCELossWithIgnore
from clinseg.pipelines.engine.metrics import LayerThicknessError, PixelAccuracyMetric
from clinseg.transforms.fundus import EstimateFOVd, FundusNormalized
from clinseg.transforms.labels import ColorToLabeld, LabelColorsToClassesd, MapLabelValues, OneHotWithIgnored
from clinseg.transforms.oct import OrderLayersd, RandSpeckleNoised, boundaries_to_label_map, order_layers
from tests.conftest import OCT_BUNDLE, decode, is_in_layer_order, shared_path


def test_boundaries_to_label_map_fills_layers_and_ignores_missing_columns():
    boundaries = np.array([[1.0, 1.0, np.nan], [3.0, 2.5, 2.0], [5.0, 4.0, 4.0]])
    label = boundaries_to_label_map(boundaries, height=6)
    np.testing.assert_array_equal(label[:, 0], [0, 1, 1, 2, 2, 0])
    np.testing.assert_array_equal(label[:, 1], [0, 1, 1, 2, 0, 0])
    assert (label[:, 2] == 255).all()


def test_layer_order_fixes_what_breaks_the_anatomy_and_keeps_what_does_not():
    rng = np.random.default_rng(0)
    n_classes, height, width = 6, 60, 40
    bounds = np.sort(rng.integers(5, 55, size=(n_classes, width)), axis=0)
    truth = np.zeros((height, width), np.int64)
    for k in range(1, n_classes):
        truth[(np.arange(height)[:, None] >= bounds[k - 1]) & (np.arange(height)[:, None] < bounds[k])] = k
    assert is_in_layer_order(truth)
    clean = np.where(np.arange(n_classes)[:, None, None] == truth[None], 3.0, 0.0)
    np.testing.assert_array_equal(order_layers(clean), truth)  # an ordered prediction is kept as it is
    noisy = clean + rng.normal(0, 1.2, size=clean.shape)
    assert not is_in_layer_order(noisy.argmax(0))
    ordered = order_layers(noisy)
    assert is_in_layer_order(ordered)
    assert (ordered == truth).mean() > (noisy.argmax(0) == truth).mean() + 0.05
    # a layer mistaken inside another (a swapped island) is relabelled by its column
    island = clean.copy()
    column, row = 7, int(bounds[1, 7] + bounds[2, 7]) // 2
    island[:, row, column] = 0.0
    island[4, row, column] = 5.0
    if truth[row, column] == 2:
        assert island.argmax(0)[row, column] == 4 and order_layers(island)[row, column] == 2
    out = OrderLayersd("pred")({"pred": torch.as_tensor(noisy, dtype=torch.float32)})["pred"]
    assert out.shape == (n_classes, height, width) and torch.equal(out.argmax(0), torch.as_tensor(ordered))
    off = OrderLayersd("pred", enabled=False)({"pred": torch.as_tensor(noisy)})["pred"]
    assert torch.equal(off, torch.as_tensor(noisy))


def test_speckle_is_multiplicative_correlated_and_leaves_other_keys_alone():
    rng = np.random.default_rng(0)
    image = torch.as_tensor(rng.uniform(0.2, 0.8, size=(1, 96, 128)), dtype=torch.float32)
    image[:, :, :16] = 0.0  # a black margin, as above the retina
    label = torch.randint(0, 3, (1, 96, 128))

    def speckle(**kwargs):
        transform = RandSpeckleNoised("image", prob=1.0, **kwargs)
        transform.set_random_state(seed=1)
        return transform({"image": image.clone(), "label": label.clone()})

    out = speckle()
    assert torch.equal(out["label"], label) and out["image"].dtype == torch.float32
    assert torch.equal(out["image"][:, :, :16], image[:, :, :16]), "multiplicative: black stays black"
    assert out["image"].min() >= image.min() and out["image"].max() <= image.max(), "clipped to the image's range"
    ratio = (out["image"] / image)[:, :, 16:]
    assert 0.97 < float(ratio.mean()) < 1.03 and float(ratio.std()) > 0.05, "noise of mean 1 that changes pixels"

    # the grain: neighbouring pixels share their noise when blurred, not when grain_sigma is 0
    def neighbour_correlation(r):
        centred = r - r.mean()
        return float((centred[..., 1:] * centred[..., :-1]).mean() / centred.var())

    assert neighbour_correlation((speckle(grain_sigma=(1.5, 1.5))["image"] / image)[:, :, 16:]) > 0.3
    assert abs(neighbour_correlation((speckle(grain_sigma=(0.0, 0.0))["image"] / image)[:, :, 16:])) < 0.1
    assert torch.equal(speckle()["image"], out["image"]), "the same seed gives the same speckle"
    untouched = RandSpeckleNoised("image", prob=0.0)({"image": image})
    assert torch.equal(untouched["image"], image)
    missing = RandSpeckleNoised(["image", "other"], prob=1.0, allow_missing_keys=True)({"image": image})
    assert set(missing) == {"image"}
    with pytest.raises(ValueError, match="looks"):
        RandSpeckleNoised("image", looks=(0.0, 1.0))


def test_colour_and_onehot_transforms():
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    rgb[0, 1] = (255, 0, 0)
    out = ColorToLabeld("label", [[0, 0, 0], [255, 0, 0]])({"label": rgb})["label"]
    np.testing.assert_array_equal(out, [[[0, 1], [0, 0]]])
    onehot = OneHotWithIgnored("label", num_classes=3)({"label": np.array([[[0, 2], [255, 1]]])})["label"]
    np.testing.assert_array_equal(onehot.numpy().argmax(0), [[0, 2], [0, 1]])
    assert onehot[:, 1, 0].sum() == 0, "the ignored pixel has no class"
    with pytest.raises(ValueError, match=r"label values \[7\]"):
        OneHotWithIgnored("label", num_classes=3)({"label": np.array([[[7]]])})


NR206_COLOURS = [[0, 0, 0], [255, 0, 0], [128, 128, 0], [255, 255, 0], [0, 128, 0], [0, 255, 0], [0, 255, 255],
                 [0, 0, 255], [255, 0, 255]]  # fmt: skip


def test_a_colour_table_is_read_one_colour_per_entry(tmp_path):
    """NR206's labels are RGBA, and a viewer shows their colours as [r, g, b, 255]: a table written so was cut into
    colours of three values each (12 "colours" for 9 classes, none of them the classes'), and refused as repeating a
    colour it never held. Each entry is one colour, its alpha ignored as the label's is; a table that is not one
    colour per class, or holds values outside 0..255 ([0, 256, 0] was the colour (1, 0, 0)), is refused naming it."""
    label = np.zeros((6, 9, 4), np.uint8)
    label[..., 3] = 255
    for row, colour in enumerate(NR206_COLOURS[1:6], start=1):
        label[row] = [*colour, 255]
    Image.fromarray(label).save(tmp_path / "label.png")
    read = ReadImaged("label", reader=LabelImageReader())({"label": str(tmp_path / "label.png")})
    rgba_table = [[*colour, 255] for colour in NR206_COLOURS]
    classes = LabelColorsToClassesd("label", colors=rgba_table)(read)["label"]
    np.testing.assert_array_equal(np.asarray(classes)[0, :, 0], [0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(classes, LabelColorsToClassesd("label", colors=NR206_COLOURS)(read)["label"])
    for table, problem in (([[0, 0, 0], [0, 256, 0]], "outside the 8-bit range"),
                           ([[0, 0, 0], [255, 0]], "one \\[r, g, b\\] colour per class"),
                           ([[0, 0, 0, 255], [255, 0, 0]], "one \\[r, g, b\\] colour per class")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"config key 'label_colors': .*{problem}"):
            LabelColorsToClassesd("label", colors=table)


def test_value_mapping_keeps_unannotated_pixels_unannotated():
    """Mapped values to classes, the unannotated pixels became background: scored and learnt as background."""
    label = MetaTensor(torch.tensor([[[0, 7, 9, 255]]]), meta={"filename_or_obj": "labels/a.png"})
    mapped = MapLabelValues({7: 1, 9: 2}, num_classes=3, ignore_index=255)(label)
    assert mapped.tolist() == [[[0, 1, 2, 255]]]
    assert MapLabelValues({7: 1}, strict=False)(label).tolist() == [[[0, 1, 0, 0]]], "without one, all else is 0"


def test_a_binary_mask_stored_0_255_is_refused_as_a_label_map(tmp_path):
    """A bundle made from the oct_layers template (new_task fluid --from oct_layers) reads label values as stored:
    a mask saved 0/255 had its whole foreground read as unannotated (255), and trained on background alone."""
    image = np.random.default_rng(0).integers(0, 255, (64, 96), dtype=np.uint8)
    mask = np.zeros((64, 96), np.uint8)
    mask[20:40, 30:60] = 255
    Image.fromarray(image).save(tmp_path / "a.png")
    Image.fromarray(mask).save(tmp_path / "a_label.png")
    item = {"image": str(tmp_path / "a.png"), "label": str(tmp_path / "a_label.png")}
    with pytest.raises(DataError, match="holds only the values 0 and 255") as error:
        decode("oct_layers", [item], class_names=["background", "fluid"])
    assert error.value.path == item["label"] and "\n" not in str(error.value)
    Image.fromarray((mask > 0).astype(np.uint8)).save(tmp_path / "a_label.png")  # the same mask as class indices
    assert int(decode("oct_layers", [item], class_names=["background", "fluid"])[0]["label"].sum()) == 600
    mask[:, :3] = 255  # a multi-class label with unannotated columns is what 255 is for
    mask[20:40, 30:60] = 1
    Image.fromarray(mask).save(tmp_path / "a_label.png")
    assert set(np.unique(decode("oct_layers", [item], class_names=["background", "fluid"])[0]["label"])) == {0, 1, 255}


def test_layer_order_reports_and_can_refuse_what_it_had_to_reorder():
    """On an upside-down B-scan the network's layers come out of order, and the ordering makes a map of them in which
    every layer is present, in order, with plausible thicknesses (a phantom-trained network on a flipped phantom
    B-scan: 43 % of the retina relabelled, against 0.4 % upright). The share is kept in the metadata; with
    ``max_relabelled`` the prediction is refused naming the image."""
    rng = np.random.default_rng(2)
    width, n_classes = 48, 8
    tops = 12 + np.cumsum(rng.integers(2, 7, size=(n_classes, width)), axis=0).astype(float)
    truth = boundaries_to_label_map(tops, height=64).astype(np.int64)
    logits = 4.0 * torch.nn.functional.one_hot(torch.as_tensor(truth), n_classes).permute(2, 0, 1).float()
    logits += torch.as_tensor(rng.normal(0, 0.5, logits.shape), dtype=torch.float32)
    meta = {"filename_or_obj": "bscans/upright.png"}
    upright = OrderLayersd("pred", max_relabelled=0.2)({"pred": MetaTensor(logits, meta=meta)})["pred"]
    assert upright.meta["layer_order_relabelled"] < 0.02 and (upright.argmax(0).numpy() == truth).mean() > 0.98
    flipped = MetaTensor(logits.flip(1), meta={"filename_or_obj": "bscans/flipped.png"})  # layers bottom to top
    reordered = OrderLayersd("pred")({"pred": flipped})["pred"]
    assert is_in_layer_order(reordered.argmax(0).numpy()) and reordered.meta["layer_order_relabelled"] > 0.5
    with pytest.raises(DataError, match=r"bscans/flipped.png: the predicted layers are out of .* order in \d+%"):
        OrderLayersd("pred", max_relabelled=0.2)({"pred": flipped})


def test_fundus_normalisation_refuses_a_channel_that_holds_nothing(tmp_path):
    """A photograph stored in its red channel alone (green and blue 0), read for its green channel: z-scored inside
    the field of view, a constant channel is 0 throughout, a blank field in which the network finds no vessel."""
    photo, _, _ = synthesize_fundus(np.random.default_rng([7, 0]), (96, 88))
    photo[..., 1:] = 0
    Image.fromarray(photo).save(tmp_path / "red_only.png")
    item = ReadImaged("image", reader=PhotoReader(channels="rgb"))({"image": str(tmp_path / "red_only.png")})
    item = EstimateFOVd("image")(item)
    with pytest.raises(DataError, match="red_only.png: its green channel is constant") as error:
        FundusNormalized("image", channels="green")(dict(item))
    assert "\n" not in str(error.value)
    out = FundusNormalized("image", channels="red")(dict(item))["image"]  # the channel that holds the picture
    assert float(out[0][np.asarray(item["fov"][0]) > 0].std()) == pytest.approx(1.0, abs=1e-3)
    empty = {**item, "fov": torch.zeros_like(item["fov"])}
    with pytest.raises(DataError, match="field of view is empty"):
        FundusNormalized("image", channels="red")(empty)


def test_real_nr206_labels_and_their_rgba_table_give_the_same_classes():
    labels = shared_path("oct", "NR206_sample", "train_labels")
    read = ReadImaged("label", reader=LabelImageReader())({"label": str(labels / "NORMAL1.png")})
    by_rgb = LabelColorsToClassesd("label", colors=NR206_COLOURS)(dict(read))["label"]
    by_rgba = LabelColorsToClassesd("label", colors=[[*c, 255] for c in NR206_COLOURS])(dict(read))["label"]
    assert torch.equal(by_rgb, by_rgba) and set(torch.unique(by_rgb).tolist()) == set(range(9))


def test_training_augmentation_preserves_label_values(tiny_oct_dir):
    """The bundle's own training transforms (read from train.json) never invent label values."""
    parser = ConfigParser()
    parser.read_config(str(OCT_BUNDLE / "configs" / "train.json"))
    parser.update({"dataset_dir": str(tiny_oct_dir), "image_size": [64, 96]})
    for transform in parser.get("train#random_transforms"):
        if "prob" in transform:
            transform["prob"] = 1.0  # every augmentation applied every time
    preprocessing = parser.get_parsed_content("train#preprocessing")
    preprocessing.set_random_state(seed=3)
    item = load_oct_datalist(tiny_oct_dir, "train")[0]
    allowed = set(np.unique(decode("oct_layers", [item])[0]["label"]).tolist()) | {0}
    for _ in range(5):
        out = preprocessing(dict(item))
        assert out["image"].shape == out["label"].shape == (1, 64, 96)
        assert set(torch.unique(out["label"]).tolist()) <= allowed
        assert out["image"].dtype == torch.float32 and torch.isfinite(out["image"]).all()


def test_training_labels_are_resized_onto_the_pixels_of_the_resized_image():
    """A B-scan resized for training (500 x 750 to 512 x 768, as the NR206 overlay did until version 0.2.0) keeps
    its labels on the image's pixels. Torch's plain "nearest" takes the source row at or above each pixel centre:
    a layer three pixels thick moved by up to a row against the bilinear image, and the network learnt the shifted
    boundaries (Dice 0.84 against the aligned labels in NR206's thinnest layer)."""
    parser = ConfigParser()
    parser.read_config(str(OCT_BUNDLE / "configs" / "train.json"))
    parser.update({"image_size": [512, 768]})
    resize = parser.get_parsed_content("train#resize")
    label = np.zeros((1, 500, 750), dtype=np.int64)
    for layer, top in enumerate(range(40, 460, 30), start=1):  # layers 3 rows thick, at every phase of the grid
        label[0, top + layer % 7 : top + layer % 7 + 3] = layer
    classes = int(label.max()) + 1
    out = resize({"image": torch.zeros(1, 500, 750), "label": torch.as_tensor(label)})["label"].numpy()[0]
    # where each label lies on the new grid: its one-hot map resampled as the image is (bilinear), then argmax
    one_hot = torch.nn.functional.one_hot(torch.as_tensor(label[0]), classes).permute(2, 0, 1)[None].float()
    aligned = torch.nn.functional.interpolate(one_hot, size=(512, 768), mode="bilinear").argmax(1)[0].numpy()
    assert set(np.unique(out)) <= set(range(classes)), "no label value is invented"
    for layer in range(1, classes):
        dice = 2 * ((out == layer) & (aligned == layer)).sum() / ((out == layer).sum() + (aligned == layer).sum())
        assert dice > 0.97, f"layer {layer}: Dice {dice:.3f} between the resized label and where it lies"


def test_loss_ignores_unannotated_pixels():
    loss = DiceCELossWithIgnore(lambda_dice=0.7, lambda_ce=0.3)
    target = torch.tensor([[[[0, 1, 2, 255]]]])
    logits = torch.randn(1, 3, 1, 4)
    changed = logits.clone()
    changed[..., 3] = torch.tensor([9.0, -9.0, 3.0])[:, None]
    assert torch.allclose(loss(logits, target), loss(changed, target))
    perfect = torch.full((1, 3, 1, 4), -20.0)
    for column, cls in enumerate([0, 1, 2]):
        perfect[0, cls, 0, column] = 20.0
    assert loss(perfect, target) < 1e-3 < loss(logits, target)


def test_batch_dice_is_the_dice_of_the_batch_as_one_image():
    torch.manual_seed(1)
    logits = torch.randn(2, 2, 8, 8)
    target = (torch.rand(2, 1, 8, 8) > 0.7).long()
    target[1] = 0  # a patch without foreground: alone, its Dice is ~0 whatever the prediction
    target[0, 0, 0, :] = 255  # unannotated pixels stay out of the batch's Dice too
    side_by_side = torch.cat(list(logits), dim=-1)[None], torch.cat(list(target), dim=-1)[None]
    batch_dice = DiceCELossWithIgnore(lambda_dice=1.0, lambda_ce=0.0, batch_dice=True)
    per_patch = DiceCELossWithIgnore(lambda_dice=1.0, lambda_ce=0.0)
    assert torch.allclose(batch_dice(logits, target), per_patch(*side_by_side), atol=1e-6)
    assert not torch.allclose(per_patch(logits, target), per_patch(*side_by_side), atol=1e-3)


def test_column_term_is_the_gap_between_the_layers_mass_down_each_column():
    """One column of 6 rows, 3 classes. The boundary between classes 1 and 2 predicted a row low: class 1 one row too
    thick, class 2 one row too thin. Class 1's mass above each row is one too many from row 3 down (3 of 6 rows),
    class 2's one too few: mean gaps 0, 1/2, 1/2 over the classes, 1/3. Dice and cross-entropy see one pixel."""
    label = torch.tensor([0, 1, 1, 2, 2, 0])
    predicted = torch.tensor([0, 1, 1, 1, 2, 0])
    logits = 20.0 * torch.nn.functional.one_hot(predicted, 3).T[None, :, :, None].float()
    column = DiceCELossWithIgnore(lambda_dice=0.0, lambda_ce=0.0, lambda_column_w1=1.0)
    assert column(logits, label[None, None, :, None]).item() == pytest.approx(1 / 3, abs=1e-6)
    # both layers moved down a row: each costs its thickness (2 rows) x 1 row over 6 rows, 1/3; the background's
    # mass above rows 1-4 is one too many, 4/6: (1/3 + 1/3 + 2/3) / 3 = 4/9
    shifted = 20.0 * torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 2, 2]), 3).T[None, :, :, None].float()
    assert column(shifted, label[None, None, :, None]).item() == pytest.approx(4 / 9, abs=1e-6)
    exact = 20.0 * torch.nn.functional.one_hot(label, 3).T[None, :, :, None].float()
    assert column(exact, label[None, None, :, None]).item() < 1e-6
    # a column holding an unannotated pixel counts for nothing, whatever is predicted there
    labels = torch.stack([label, torch.tensor([0, 1, 255, 2, 2, 0])], dim=-1)[None, None]
    noisy = torch.cat([logits, torch.randn(1, 3, 6, 1)], dim=-1)
    assert column(noisy, labels).item() == pytest.approx(1 / 3, abs=1e-6)
    with pytest.raises(ValueError, match="rows, columns"):
        column(torch.zeros(1, 3, 6, 1, 1), torch.zeros(1, 1, 6, 1, 1, dtype=torch.long))


def test_cldice_term_weighs_a_broken_thin_vessel_more_than_a_thickened_one():
    """A vertical vessel 3 pixels wide. Predicting it one pixel wider on each side flips 2 pixels per row; cutting a
    5-row gap into it flips 15 pixels, fewer than the 64 the wider vessel flips, so Dice prefers the break. The
    centreline term sees the reverse: the wider vessel still holds the whole centreline, the broken one loses a
    stretch of it."""
    label = torch.zeros(1, 1, 32, 32, dtype=torch.long)
    label[..., 14:17] = 1

    def logits(mask):
        return 20.0 * torch.stack([1 - mask, mask], dim=1).float() - 10.0

    wider = label[:, 0].clone()
    wider[..., 13:18] = 1
    broken = label[:, 0].clone()
    broken[:, 14:19] = 0
    dice = DiceCELossWithIgnore(lambda_dice=1.0, lambda_ce=0.0)
    cldice = DiceCELossWithIgnore(lambda_dice=0.0, lambda_ce=0.0, lambda_cldice=1.0)
    assert dice(logits(broken), label) < dice(logits(wider), label)
    assert cldice(logits(wider), label) < cldice(logits(broken), label)
    assert cldice(logits(label[:, 0]), label) < 1e-3
    # unannotated pixels are part of no centreline: whatever is predicted there changes nothing
    unannotated = label.clone()
    unannotated[..., :, :8] = 255
    noisy = logits(label[:, 0])
    noisy[..., :8] = torch.randn(1, 2, 32, 8) * 10
    assert cldice(noisy, unannotated).item() == pytest.approx(cldice(logits(label[:, 0]), unannotated).item(), abs=1e-6)


def onehot(labels, num_classes=3):
    labels = torch.as_tensor(labels)
    out = torch.nn.functional.one_hot(labels.clamp(min=0), num_classes).permute(2, 0, 1).float()
    return (out * (labels >= 0)).unsqueeze(0)


def test_pixel_accuracy_and_thickness_error_by_hand():
    reference = onehot([[0, 0, -1], [1, 1, -1], [2, 2, -1], [0, 0, -1]])  # third column unannotated
    prediction = onehot([[0, 1, 2], [1, 1, 2], [1, 2, 2], [0, 0, 2]])
    # 8 annotated pixels, wrong: (row 0, col 1) and (row 2, col 0) -> 6/8; the third column does not count
    assert PixelAccuracyMetric()(prediction, reference).item() == pytest.approx(6 / 8)
    # column 0: class 1 is 2 px vs 1 (error 1), class 2 is 0 vs 1 (error 1)
    # column 1: class 1 is 2 px vs 1 (error 1), class 2 is 1 vs 1 (error 0)
    thickness = LayerThicknessError(axial_size=3.9)(prediction, reference)
    np.testing.assert_allclose(thickness.numpy(), [[1.0 * 3.9, 0.5 * 3.9]], rtol=1e-6)
    no_annotation = onehot([[-1, -1]])
    assert torch.isnan(PixelAccuracyMetric()(onehot([[0, 1]]), no_annotation)).all()


def test_thickness_error_counts_only_annotated_rows_of_a_column():
    """A column annotated above and below a gap (a label with a partial 255): the prediction in the gap is no
    thicker layer, it is unscored."""
    reference = onehot([[0], [1], [-1], [1], [0]], num_classes=2)
    prediction = onehot([[0], [1], [1], [1], [0]], num_classes=2)
    assert LayerThicknessError()(prediction, reference).item() == 0.0


def test_pixel_hd95_counts_a_missed_structure_as_the_image_diagonal():
    """MONAI's HD95 is NaN for an empty prediction, which its mean leaves out: a model that misses the structure
    in one image (or in every image: 0.0) would read as better. Here a miss costs the diagonal, in pixels."""
    from clinseg.pipelines.engine.metrics import METRIC_KINDS

    reference = np.zeros((10, 10), int)
    reference[4, 2:8] = 1
    shifted = np.roll(reference, 2, axis=0)
    metric = METRIC_KINDS["hd95"][0](None)
    metric(onehot(shifted, 2), onehot(reference, 2))
    metric(onehot(np.zeros_like(reference), 2), onehot(reference, 2))
    diagonal = float(np.hypot(10, 10))
    assert metric.aggregate().item() == pytest.approx((2.0 + diagonal) / 2, rel=1e-5)
    missed_everywhere = METRIC_KINDS["hd95"][0](None)
    missed_everywhere(onehot(np.zeros_like(reference), 2), onehot(reference, 2))
    assert missed_everywhere.aggregate().item() == pytest.approx(diagonal, rel=1e-5)


def test_a_metric_undefined_in_every_case_is_nan_not_zero():
    """Distances and volume errors are undefined without a reference structure (a heart-free CT): MONAI's mean of
    nothing but NaN is 0.0, a perfect score; the evaluator reports NaN, written as null in JSON."""
    import json

    from ignite.engine import Engine

    from clinseg.pipelines.engine.metrics import metric_handlers
    from clinseg.pipelines.engine.writers import json_writer

    empty = onehot(np.zeros((8, 8), int), 2)
    false_positive = onehot(np.pad(np.ones((2, 2), int), 3), 2)
    engine = Engine(lambda engine, batch: {"pred": [false_positive[0]], "label": [empty[0]]})
    handlers = metric_handlers(
        {
            "val_hd95": "hd95",
            "val_rve": "relative_volume_error",
            "val_dice": "dice",
            "val_sensitivity": "sensitivity",  # no reference structure: nothing to be sensitive to
            "val_specificity": "specificity",  # defined: the background is there
        }
    )
    for name, handler in handlers.items():
        handler.attach(engine, name)
    engine.run([0, 1], max_epochs=1)
    for name in ("val_hd95", "val_rve", "val_sensitivity"):
        assert np.isnan(engine.state.metrics[name]), (name, engine.state.metrics[name])
    assert engine.state.metrics["val_specificity"] == pytest.approx(60 / 64)
    path = __import__("pathlib").Path(__import__("tempfile").mkdtemp()) / "m.json"
    json_writer({"mean": dict(engine.state.metrics)})(path)
    assert json.loads(path.read_text())["mean"]["val_hd95"] is None, "valid JSON, undefined as null"


def test_per_class_precision_is_averaged_over_images_as_the_headline_mean_is(tmp_path):
    """Per class, precision (recall, specificity) is the mean of the images' values, as the headline mean is;
    only a metric named pooled pools the images' counts. The per-image tables hold the metric, not MONAI's
    [tp, fp, tn, fn] counts, under the classes' names."""
    from types import SimpleNamespace

    from clinseg.pipelines.engine.handlers.evaluation import AtomicMetricsSaver, EvaluationReport

    # class L1: image 1 tp 1 fp 0 (precision 1), image 2 tp 1 fp 8 (1/9); class L2: 2/4 and 3/4
    counts = torch.tensor([[[1, 0, 10, 0], [2, 2, 5, 1]], [[1, 8, 3, 0], [3, 1, 6, 0]]], dtype=torch.float32)
    engine = SimpleNamespace(state=SimpleNamespace(
        metric_details={"val_precision": counts, "val_pooled_f1": counts}, metrics={"val_precision": 0.0}, epoch=1
    ))  # fmt: skip
    report = EvaluationReport(tmp_path, ["background", "L1", "L2"])
    per_class = report.per_class(engine)
    assert per_class["val_precision"]["L1"] == pytest.approx((1 + 1 / 9) / 2)
    assert per_class["val_precision"]["L2"] == pytest.approx((2 / 4 + 3 / 4) / 2)

    saver = AtomicMetricsSaver(save_dir=str(tmp_path / "tables"), metrics="*", metric_details="*",
                               class_names=["background", "L1", "L2"])  # fmt: skip
    saver._filenames = ["image1", "image2"]
    saver(engine)
    rows = (tmp_path / "tables" / "val_precision_raw.csv").read_text().splitlines()
    assert rows[0].split(",")[:3] == ["filename", "L1", "L2"], rows[0]
    assert [float(v) for v in rows[2].split(",")[1:3]] == pytest.approx([1 / 9, 3 / 4], abs=1e-4)
    assert engine.state.metric_details["val_precision"] is counts, "the engine's details are left as they were"
