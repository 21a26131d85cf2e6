"""Vessels: DRIVE and generic readers, FOV preprocessing, FOV-restricted metrics by hand, a tiny real bundle run."""

from __future__ import annotations

import json
import re
import shutil

import mlflow
import numpy as np
import pytest
import torch
from PIL import Image

from clinseg.datasets.errors import DataError, NoUsableDataError
from clinseg.datasets.fundus import drive_split_items, image_mask_items, load_vessel_datalist
from clinseg.datasets.fundus.phantom import synthesize_fundus, write_drive_layout
from clinseg.datasets.readers import PhotoReader, ReadImaged, read_binary_mask
from clinseg.pipelines.engine.metrics import CenterlineDiceMetric, ROCAUCInMaskMetric
from clinseg.pipelines.tracking import mlflow_metric_name
from clinseg.transforms.fundus import EstimateFOV, EstimateFOVd, FundusNormalize
from clinseg.transforms.labels import OneHotWithIgnore
from tests.conftest import REPO_ROOT, decode, run_bundle, shared_path
from tests.test_dicom_photographs import write_dicom

CONFIGS = REPO_ROOT / "bundles" / "vessels" / "configs"
TRAIN = [str(CONFIGS / "train.json")]


@pytest.fixture(scope="module")
def tiny_drive(tmp_path_factory):
    root = tmp_path_factory.mktemp("drive_phantom")
    write_drive_layout(root, n_images=4, shape=(80, 72), seed=2)
    return root


def save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def test_palette_gif_is_thresholded_not_compared_with_255(tmp_path):
    # DRIVE's 2nd_manual GIFs: palette indices {0, 1} mapping to grey 3 / 253
    indices = np.zeros((6, 6), dtype=np.uint8)
    indices[2:4] = 1
    image = Image.fromarray(indices, mode="P")
    image.putpalette([3, 3, 3, 253, 253, 253] + [0] * 762)
    image.save(tmp_path / "21_manual2.gif")
    mask = read_binary_mask(tmp_path / "21_manual2.gif")
    assert mask.sum() == 12 and mask[2:4].all()
    save(tmp_path / "ones.png", indices)  # a 0/1 mask
    assert read_binary_mask(tmp_path / "ones.png").sum() == 12
    save(tmp_path / "255.png", indices * 255)
    assert read_binary_mask(tmp_path / "255.png").sum() == 12


def test_drive_reader_fov_and_ids(tiny_drive):
    items = decode("vessels", drive_split_items(tiny_drive / "training"))
    assert [i["id"] for i in items] == ["21", "22", "23", "24"]
    item = items[0]
    assert item["image"].shape == (3, 80, 72) and item["label"].shape == item["fov"].shape == (1, 80, 72)
    assert (item["label"][item["fov"] == 0] == 255).all(), "outside the FOV is ignored"
    assert set(np.unique(item["label"][item["fov"] == 1])) == {0, 1}


def test_drive_missing_mask_names_the_file(tiny_drive, tmp_path):
    import shutil

    copy = tmp_path / "training"
    shutil.copytree(tiny_drive / "training", copy)
    (copy / "mask" / "22_training_mask.gif").unlink()
    with pytest.raises(DataError, match="22_training_mask.gif: FOV mask of 22_training.tif is missing"):
        drive_split_items(copy)
    # photographs to segment (inference): the others keep their masks, this one's field is estimated, or read from
    # a mask saved in another format; one missing mask no longer stops the run with nothing segmented
    items = {i["id"]: i for i in drive_split_items(copy, with_labels=False, other_images=True)}
    assert "fov" not in items["22"] and items["21"]["fov"].endswith("21_training_mask.gif")
    Image.open(tiny_drive / "training" / "mask" / "22_training_mask.gif").save(copy / "mask" / "22_training_mask.png")
    items = {i["id"]: i for i in drive_split_items(copy, with_labels=False, other_images=True)}
    assert items["22"]["fov"] == str(copy / "mask" / "22_training_mask.png")
    (copy / "mask" / "22_training_mask.png").unlink()
    (copy / "1st_manual" / "23_manual1.gif").unlink()
    shutil.copy(tiny_drive / "training" / "mask" / "22_training_mask.gif", copy / "mask")
    with pytest.raises(DataError, match="23_manual1.gif: manual annotation of 23_training.tif is missing"):
        drive_split_items(copy)


def test_generic_folders_suffixes_and_sizes(tmp_path):
    rgb = np.zeros((10, 12, 3), dtype=np.uint8)
    save(tmp_path / "images" / "a.jpg", rgb)
    save(tmp_path / "images" / "b.png", rgb)
    mask = np.zeros((10, 12), dtype=np.uint8)
    mask[:3] = 1
    save(tmp_path / "masks" / "a_mask.png", mask)  # 0/1 with suffix
    save(tmp_path / "masks" / "b.png", mask * 255)  # 0/255, same stem
    # black photographs: no field of view to estimate (refused with estimation on; see below)
    items = decode("vessels", image_mask_items(tmp_path / "images", tmp_path / "masks"), estimate_fov=False)
    assert [int((i["label"] == 1).sum()) for i in items] == [36, 36]
    assert len(load_vessel_datalist(tmp_path, "all")) == 2
    save(tmp_path / "masks" / "b.png", np.zeros((9, 12), dtype=np.uint8))
    with pytest.raises(DataError, match="b.png: is 9 x 12 but its image b.png is 10 x 12"):
        load_vessel_datalist(tmp_path, "all")
    (tmp_path / "masks" / "a_mask.png").unlink()
    with pytest.raises(DataError, match="a.jpg: has no mask"):
        image_mask_items(tmp_path / "images", tmp_path / "masks")


def test_several_candidate_masks_for_one_image_are_refused_naming_them(tmp_path):
    save(tmp_path / "images" / "a.png", np.zeros((8, 8, 3), dtype=np.uint8))
    save(tmp_path / "masks" / "a.png", np.zeros((8, 8), dtype=np.uint8))
    save(tmp_path / "masks" / "A.tif", np.full((8, 8), 255, dtype=np.uint8))  # same stem, another case and format
    with pytest.raises(DataError, match="holds 2 candidates for a: A.tif, a.png") as error:
        image_mask_items(tmp_path / "images", tmp_path / "masks")
    assert str(error.value).startswith(str(tmp_path / "masks")) and "\n" not in str(error.value)
    (tmp_path / "masks" / "A.tif").unlink()
    save(tmp_path / "masks" / "a_mask.png", np.full((8, 8), 255, dtype=np.uint8))  # another naming rule
    with pytest.raises(DataError, match="holds 2 candidates for a: a.png, a_mask.png"):
        image_mask_items(tmp_path / "images", tmp_path / "masks")


def test_kaggle_layout_and_split(tmp_path, tiny_drive):
    for value, name in enumerate(("x", "y", "z", "w")):  # four photographs (copies of one would be one case)
        save(tmp_path / "Data" / "train" / "image" / f"{name}.png", np.full((8, 8, 3), value, dtype=np.uint8))
        save(tmp_path / "Data" / "train" / "mask" / f"{name}.png", np.eye(8, dtype=np.uint8) * 255)
    assert [i["id"] for i in load_vessel_datalist(tmp_path, "val")] == ["z"]
    assert len(load_vessel_datalist(tmp_path, "train")) == 3
    with pytest.raises(NoUsableDataError, match="no test split"):
        load_vessel_datalist(tmp_path, "test")
    assert [i["id"] for i in load_vessel_datalist(tiny_drive, "val")] == ["24"]


def test_fov_normalisation_uses_only_pixels_inside():
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (3, 20, 20)).astype(np.float32)
    fov = np.zeros((1, 20, 20), dtype=np.uint8)
    fov[:, 5:15, 5:15] = 1
    out = FundusNormalize("green")(image, fov)
    inside = out[0][fov[0] > 0]
    assert out.shape == (1, 20, 20) and abs(inside.mean()) < 1e-5 and abs(inside.std() - 1) < 1e-4
    assert (out[0][fov[0] == 0] == 0).all()
    assert FundusNormalize("rgb", clahe=True)(image, fov).shape == (3, 20, 20)


def iou(a, b) -> float:
    return float((a & b).sum() / (a | b).sum())


def channels_first(photo: np.ndarray) -> np.ndarray:
    return photo.transpose(2, 0, 1).astype(np.float32)


def test_fov_estimated_from_phantom_photographs_matches_their_masks():
    # at 80 x 72 one pixel along the rim is 6 % of the disc: the bound follows the size
    for seed, shape, least in ((0, (292, 283), 0.97), (1, (584, 565), 0.98), (2, (80, 72), 0.93)):
        photo, _, fov = synthesize_fundus(np.random.default_rng([seed, 0]), shape)
        estimated = EstimateFOV()(channels_first(photo))
        assert estimated.shape == fov.shape and iou(estimated, fov) > least, (shape, iou(estimated, fov))


def test_a_photograph_without_a_dark_frame_is_its_own_field():
    photo, _, fov = synthesize_fundus(np.random.default_rng([3, 0]), (584, 565))
    crop = photo[200:380, 200:380]  # inside the disc: no frame to find
    assert EstimateFOV()(channels_first(crop)).all()
    # a dark lesion inside the disc stays inside the field (holes are filled)
    lesioned = photo.copy()
    lesioned[280:320, 260:300] = 5
    assert EstimateFOV()(channels_first(lesioned))[280:320, 260:300].all()


@pytest.mark.parametrize(
    "kind, problem",
    [("dark", "dark throughout"), ("spot", "covers only"), ("uniform", "uniform")],
)
def test_no_plausible_field_of_view_is_refused_naming_the_file(tmp_path, kind, problem):
    rng = np.random.default_rng(0)
    photo = rng.uniform(0, 6, size=(120, 110, 3)).astype(np.uint8)
    if kind == "spot":  # a bright spot of 4 % of the image: no fundus photograph
        photo[40:62, 40:62] = 180
    if kind == "uniform":
        photo[:] = 90
    path = tmp_path / f"{kind}.png"
    save(path, photo)
    read = ReadImaged("image", reader=PhotoReader(channels="rgb"))
    with pytest.raises(DataError) as raised:
        EstimateFOVd("image")(read({"image": str(path)}))
    message = str(raised.value)
    assert str(path) in message and problem in message and "fov/" in message, message


def test_a_large_disc_is_resampled_for_the_network_and_back(tmp_path):
    from monai.transforms import Compose, Invertd

    from clinseg.transforms.fundus import ScaleToFOVd, fov_diameter

    photo, _, fov = synthesize_fundus(np.random.default_rng([5, 0]), (960, 999))  # a CHASE-sized photograph
    save(tmp_path / "large.png", photo)
    read = ReadImaged("image", reader=PhotoReader(channels="rgb"))
    preprocessing = Compose([read, EstimateFOVd("image"), ScaleToFOVd(["image", "fov"], mode=["bilinear", "nearest"])])
    item = preprocessing({"image": str(tmp_path / "large.png")})
    assert fov_diameter(item["fov"]) == pytest.approx(538, abs=3) and item["image"].meta["fov_scale"] < 0.65
    original_affine = read({"image": str(tmp_path / "large.png")})["image"].affine
    item["pred"] = item["image"][:2].clone()
    restored = Invertd(["pred", "fov"], preprocessing, orig_keys=["image", "fov"], nearest_interp=[False, True])(item)
    assert restored["pred"].shape[1:] == photo.shape[:2] and restored["fov"].shape[1:] == photo.shape[:2]
    assert torch.allclose(restored["pred"].affine, original_affine.to(restored["pred"].affine.dtype))
    assert iou(np.asarray(restored["fov"][0]) > 0, fov) > 0.98
    # a disc of DRIVE's size is left at its own scale
    drive_sized, _, _ = synthesize_fundus(np.random.default_rng([5, 1]), (584, 565))
    save(tmp_path / "drive_sized.png", drive_sized)
    item = preprocessing({"image": str(tmp_path / "drive_sized.png")})
    assert item["image"].shape[1:] == drive_sized.shape[:2] and item["image"].meta["fov_scale"] == 1.0


def test_a_small_disc_is_enlarged_to_the_learnt_scale_and_back(tmp_path):
    """A photograph of a low-resolution camera (a disc of half DRIVE's width) was segmented at its own scale, where
    every vessel is narrower than any the network learnt: DRIVE's validation photographs at half size scored F1
    0.75 there, 0.80 enlarged. It is enlarged to the learnt disc, and its predictions are brought back to its grid."""
    from monai.transforms import Compose, Invertd

    from clinseg.transforms.fundus import ScaleToFOVd, fov_diameter

    photo, _, fov = synthesize_fundus(np.random.default_rng([5, 2]), (292, 283))  # DRIVE at half size
    save(tmp_path / "small.png", photo)
    read = ReadImaged("image", reader=PhotoReader(channels="rgb"))
    preprocessing = Compose([read, EstimateFOVd("image"), ScaleToFOVd(["image", "fov"], mode=["bilinear", "nearest"])])
    item = preprocessing({"image": str(tmp_path / "small.png")})
    assert fov_diameter(item["fov"]) == pytest.approx(538, abs=3) and item["image"].meta["fov_scale"] > 1.8
    item["pred"] = item["image"][:2].clone()
    restored = Invertd(["pred", "fov"], preprocessing, orig_keys=["image", "fov"], nearest_interp=[False, True])(item)
    assert restored["pred"].shape[1:] == photo.shape[:2] and iou(np.asarray(restored["fov"][0]) > 0, fov) > 0.97
    # asked not to enlarge, it stays at its own scale
    own_scale = ScaleToFOVd(["image", "fov"], mode=["bilinear", "nearest"], upscale=False)
    item = Compose([read, EstimateFOVd("image"), own_scale])({"image": str(tmp_path / "small.png")})
    assert item["image"].shape[1:] == photo.shape[:2] and item["image"].meta["fov_scale"] == 1.0


def test_a_small_disc_that_enlarged_would_exceed_max_pixels_is_refused_naming_it(tmp_path):
    """An enlargement over max_pixels (a field under a fifth of its image once min_fraction is lowered, a large
    fov_diameter_px) could need more memory than the machine has: refused with what to do, before anything is
    resampled."""
    from clinseg.datasets.errors import DataError
    from clinseg.transforms.fundus import ScaleToFOVd

    photo, _, _ = synthesize_fundus(np.random.default_rng([5, 2]), (292, 283))
    save(tmp_path / "small.png", photo)
    read = ReadImaged("image", reader=PhotoReader(channels="rgb"))
    item = EstimateFOVd("image")(read({"image": tmp_path / "small.png"}))
    with pytest.raises(DataError, match=r"small\.png: its field of view is \d+ pixels across in a 292 x 283 image: "
                       r"enlarged \d\.\d times .* over max_pixels \(200000\)\.\sCrop the photograph"):  # fmt: skip
        ScaleToFOVd(["image", "fov"], mode=["bilinear", "nearest"], max_pixels=200_000)(item)
    assert ScaleToFOVd(["image", "fov"], mode=["bilinear", "nearest"], max_pixels=400_000)(item)["image"].shape[1] > 500


def test_a_thumbnail_is_refused_naming_it_and_a_small_photograph_enlarged(tmp_path):
    """A preview or thumbnail of a photograph (a disc of 48 to 128 pixels) was enlarged 4 to 16 times to the learnt
    disc and segmented: its capillaries are under a pixel wide there, and the map came out thin or empty (F1 0.00 at
    11 times, 0.11 at 8.6) with exit status 0. Inference refuses a disc enlarged more than max_upscale times, naming
    the file and what would segment it anyway; a photograph at 0.3 of DRIVE's size (3.3 times) is enlarged."""
    from clinseg.datasets.errors import DataError
    from clinseg.transforms.fundus import ScaleToFOVd

    photo, _, _ = synthesize_fundus(np.random.default_rng([5, 3]), (584, 565))
    read = ReadImaged("image", reader=PhotoReader(channels="rgb"))
    scale = ScaleToFOVd(["image", "fov"], mode=["bilinear", "nearest"], max_upscale=4.0)
    for name, width in (("thumbnail", 96), ("third", 170)):
        height = round(584 * width / 565)
        save(tmp_path / f"{name}.png", np.asarray(Image.fromarray(photo).resize((width, height), Image.LANCZOS)))
    thumbnail = EstimateFOVd("image")(read({"image": tmp_path / "thumbnail.png"}))
    with pytest.raises(DataError, match=r"thumbnail\.png: is too small to segment: its field of view is \d+ pixels "
                       r"across, and enlarged 5\.\d\d times .* \(over max_upscale, 4\) .*\.\sSegment the "
                       r"full-resolution photograph; --max_upscale 6 segments this one anyway"):  # fmt: skip
        scale(thumbnail)
    enlarged = ScaleToFOVd(["image", "fov"], mode=["bilinear", "nearest"], max_upscale=6.0)(thumbnail)
    assert enlarged["image"].meta["fov_scale"] > 5
    third = scale(EstimateFOVd("image")(read({"image": tmp_path / "third.png"})))
    assert 3.0 < third["image"].meta["fov_scale"] < 3.6 and third["image"].shape[1] > 540
    # training and evaluation enlarge any disc: their labels show what is lost
    assert ScaleToFOVd(["image", "fov"], mode=["bilinear", "nearest"])(thumbnail)["image"].meta["fov_scale"] > 5


def test_a_disc_cut_on_every_side_keeps_its_periphery_and_is_measured_by_its_rim(tmp_path):
    """A photograph cut just inside its disc, dark only in its corners. Its field was estimated as 71 % of the image,
    the darker periphery cut off as if it were frame (Otsu's split fell inside the fundus), and no vessel was
    predicted there. Its bounding box is narrower than the disc: measured by the box, its vessels would be
    resampled as if its camera had 25 % fewer pixels across the retina. The circle through the round rim measures
    the whole disc, as the uncut photograph's."""
    from clinseg.transforms.fundus import ScaleToFOVd, fov_diameter

    photo, _, fov = synthesize_fundus(np.random.default_rng([5, 0]), (960, 999))
    rows, cols = np.flatnonzero(fov.any(axis=1)), np.flatnonzero(fov.any(axis=0))
    whole = fov_diameter(fov[None])
    assert whole == pytest.approx(cols[-1] - cols[0] + 1, rel=0.01), "a whole disc measures its width"
    cut = slice(rows[0] + 120, rows[-1] - 120), slice(cols[0] + 120, cols[-1] - 120)
    save(tmp_path / "cut.png", photo[cut])
    item = EstimateFOVd("image")(
        ReadImaged("image", reader=PhotoReader(channels="rgb"))({"image": tmp_path / "cut.png"})
    )
    measured = np.asarray(item["fov"][0]) > 0
    assert not measured.all() and max(measured.shape) < 0.8 * whole, "dark corners, a box far narrower than the disc"
    assert iou(measured, fov[cut]) > 0.99
    assert fov_diameter(item["fov"]) == pytest.approx(whole, rel=0.01)
    assert ScaleToFOVd("fov").factor(item) == pytest.approx(538 / whole, rel=0.01)
    # a field with a rim that is no circle keeps the bounding box
    square = np.zeros((400, 400), bool)
    square[50:350, 80:320] = True
    assert fov_diameter(square[None]) == 300


def test_a_given_mask_is_kept_and_estimation_can_be_turned_off():
    photo, _, fov = synthesize_fundus(np.random.default_rng([4, 0]), (80, 72))
    given = np.zeros((1, 80, 72), np.uint8)
    given[:, 20:60, 18:54] = 1  # a region inside the field, to segment
    out = EstimateFOVd("image")({"image": channels_first(photo), "fov": given})
    assert out["fov"] is given and out["fov_source"] == "given"
    out = EstimateFOVd("image")({"image": channels_first(photo)})
    assert out["fov_source"] == "estimated" and iou(np.asarray(out["fov"][0]) > 0, fov) > 0.93
    assert "fov" not in EstimateFOVd("image", estimate=False)({"image": channels_first(photo)})


@pytest.mark.parametrize("covered", [0, 0.1])
def test_an_empty_or_tiny_given_fov_mask_is_refused_naming_it(tmp_path, covered):
    write_drive_layout(tmp_path, n_images=1, shape=(64, 64), seed=0)
    items = drive_split_items(tmp_path / "training")
    field = np.asarray(Image.open(items[0]["fov"]).convert("L")) > 127
    fov = np.zeros((64, 64), dtype=np.uint8)
    fov[: int(covered * 64)] = 255
    fov[~field] = 0  # inside the photograph's field, as a region to segment is
    Image.fromarray(fov).save(items[0]["fov"])  # a GIF, as DRIVE's
    with pytest.raises(DataError, match="FOV mask (is empty|covers only .*% of its image)") as error:
        decode("vessels", items)
    assert error.value.path == items[0]["fov"] and "\n" not in str(error.value)
    fov[:32] = 255  # the upper half of the field (a cut disc, a crop), annotated inside it
    fov[~field] = 0
    Image.fromarray(fov).save(items[0]["fov"])
    vessels = np.asarray(Image.open(items[0]["label"]).convert("L")).copy()
    vessels[32:] = 0
    Image.fromarray(vessels).save(items[0]["label"])
    assert decode("vessels", items)[0]["fov"].sum() == (field[:32]).sum()


def test_inference_on_a_drive_folder_segments_every_photograph(tmp_path, caplog):
    from clinseg.datasets.fundus import load_fundus_images

    write_drive_layout(tmp_path, n_images=2, shape=(64, 64), seed=0)
    split = tmp_path / "training"
    save(split / "images" / "patient_007.jpg", np.zeros((64, 64, 3), dtype=np.uint8))  # a clinic's own photographs
    save(split / "images" / "21_training.png", np.zeros((64, 64, 3), dtype=np.uint8))
    save(split / "mask" / "patient_007_mask.png", np.full((64, 64), 255, dtype=np.uint8))
    items = {item["id"]: item for item in load_fundus_images(split)}
    assert sorted(items) == ["21", "21_training", "22", "patient_007"]
    assert items["patient_007"]["fov"] == str(split / "mask" / "patient_007_mask.png")
    assert items["21_training"]["fov"] == str(split / "mask" / "21_training_mask.gif")  # DRIVE's mask of photo 21
    with caplog.at_level("WARNING"):  # training needs a manual for each: the others are named, one line each
        assert [item["id"] for item in drive_split_items(split)] == ["21", "22"]
    skipped = [r.getMessage() for r in caplog.records if "not named as DRIVE images are" in r.getMessage()]
    assert any("patient_007.jpg: skipped" in m for m in skipped) and any("2 image(s) skipped" in m for m in skipped)


def test_real_drive_fov_estimated_like_the_released_masks():
    root = shared_path("vessels", "DRIVE", "training")
    for item in drive_split_items(root, with_labels=False):
        photo = np.asarray(Image.open(item["image"]), dtype=np.float32).transpose(2, 0, 1)
        released = read_binary_mask(item["fov"])
        assert iou(EstimateFOV()(photo), released) > 0.98, item["image"]


def test_metrics_inside_the_fov_by_hand():
    from monai.metrics import ConfusionMatrixMetric, DiceMetric

    label = np.array([[[1, 1, 0, 0], [0, 0, 0, 255], [1, 0, 0, 255]]])  # 255: outside the FOV
    pred = torch.tensor([[[1, 0, 0, 1], [0, 0, 0, 1], [1, 0, 1, 1]]])  # wrong in FOV: (0,1) FN, (0,3) FP, (2,2) FP
    y = OneHotWithIgnore(2)(label)[None]
    y_pred = torch.nn.functional.one_hot(pred, 2).permute(0, 3, 1, 2).float()
    tp, fp, fn, tn = 2, 2, 1, 5  # the two out-of-FOV predictions count nowhere
    f1 = DiceMetric(include_background=False, ignore_index=255)(y_pred, y)
    assert f1.item() == pytest.approx(2 * tp / (2 * tp + fp + fn))
    for name, value in (("sensitivity", tp / (tp + fn)), ("specificity", tn / (tn + fp)), ("accuracy", (tp + tn) / 10)):
        metric = ConfusionMatrixMetric(include_background=False, metric_name=name, ignore_index=255)
        metric(y_pred, y)
        assert metric.aggregate()[0].item() == pytest.approx(value), name
    probability = torch.tensor([[[0.9, 0.4, 0.1, 0.99], [0.2, 0.3, 0.1, 0.99], [0.8, 0.1, 0.6, 0.99]]])[None]
    # inside the FOV: positives 0.9, 0.4, 0.8; negatives 0.1, 0.99, 0.2, 0.3, 0.1, 0.1, 0.6 -> 17 of 21 pairs
    assert ROCAUCInMaskMetric()(probability, y).item() == pytest.approx(17 / 21)


def test_cldice_penalises_a_broken_vessel():
    reference = torch.zeros(1, 2, 9, 30)
    reference[0, 1, 3:6, 2:28] = 1
    reference[0, 0] = 1 - reference[0, 1]
    broken = reference.clone()
    broken[0, 1, :, 12:18] = 0
    broken[0, 0] = 1 - broken[0, 1]
    assert CenterlineDiceMetric()(reference, reference).item() == pytest.approx(1.0)
    assert CenterlineDiceMetric()(broken, reference).item() < 0.9


TRAINING_ONLY = ("patch_size", "patches_per_image", "repeats_per_epoch")


def test_tiny_bundle_train_evaluate_infer(tmp_path, tiny_drive, tracking_uri):
    common = {
        "bundle_root": tmp_path / "bundle",
        "dataset_dir": tiny_drive,
        "patch_size": "[32,32]",
        "patches_per_image": 2,
        "repeats_per_epoch": 1,
        "sw_roi_size": "[48,48]",
        "network_def#channels": "[8,16,32]",
        "network_def#strides": "[2,2]",
        # the phantoms' own disc (about 68 px): photographs of a camera with fewer pixels are trained at its scale,
        # not enlarged 8 times past max_upscale
        "fov_diameter_px": 68,
    }
    run_bundle("training", TRAIN, {**common, "train#trainer#max_epochs": 2})
    client = mlflow.MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("vessels").experiment_id])
    assert runs[0].info.status == "FINISHED"
    for key in (
        "val_f1",
        "val_auc",
        "val_cldice",
        "val_hd95",
        "val_sensitivity",
        "val_specificity",
        "val_accuracy",
        "val_global_f1",
        "val_iou",
    ):
        recorded = mlflow_metric_name(key, "train", "val_f1")  # vessels' key metric: 0_key/val_f1
        assert recorded in runs[0].data.metrics, recorded

    # the decision rule chosen on the best epoch's validation case is stored with the model (plain or not)
    record = json.loads((tmp_path / "bundle" / "models" / "model.json").read_text())
    rule = record["decision_rule"]
    assert 0.3 <= rule["threshold"] <= 0.7 and rule["cases"] == 1 and rule["min_component_fraction"] >= 0
    assert rule["validation_f1"] >= rule["plain_validation_f1"]

    run_bundle("evaluating", TRAIN + [str(CONFIGS / "evaluate.json")], {**common, "run_name": "eval-test"})
    report = json.loads((tmp_path / "bundle" / "outputs" / "eval-test" / "metrics.json").read_text())
    assert report["n_images"] == 1 and 0 <= report["mean"]["val_f1"] <= 1
    assert len(record["training_images"]) == 3, "the digests of the images it trained on"
    # evaluated on every image of the folder, the model would be scored on the three it trained on
    refused = run_bundle(
        "evaluating", TRAIN + [str(CONFIGS / "evaluate.json")], {**common, "eval_split": "all"}, check=False
    )
    assert refused.returncode == 1 and "error: config key 'checkpoint_path': " in refused.stderr, refused.stderr[-3000:]
    assert "was trained on 3 of the 4 images to evaluate (21_training.tif, 22_training.tif" in refused.stderr

    out = tmp_path / "predictions"
    run_bundle(
        "inferring",
        [str(CONFIGS / "inference.json")],
        # inference.json has no training ids (patch sampling): an override of an id a config lacks is refused
        {
            **{k: v for k, v in common.items() if k not in TRAINING_ONLY},
            "input_dir": tiny_drive / "training",
            "output_dir": out,
            "tta": True,
            "tta_rot90": True,  # eight passes on a non-square photograph: each one undone before the average
            "tta_scales": [0.8, 1.25],  # at two scales, each resampled back onto the photograph's grid
        },
    )
    for name in ("21_seg.png", "21_prob.png", "21_overlay.png"):
        assert np.asarray(Image.open(out / name)).shape[:2] == (80, 72)
    fov = read_binary_mask(tiny_drive / "training" / "mask" / "21_training_mask.gif")
    assert (np.asarray(Image.open(out / "21_seg.png"))[~fov] == 0).all(), "nothing is predicted outside the FOV"
    summary = json.loads((out / "21.json").read_text())
    assert 0.0 <= summary["area_fraction"]["vessel"] <= 1.0
    applied = json.loads((out / "inference_summary.json").read_text())["model"]["decision_rule"]
    assert applied == {"threshold": rule["threshold"], "min_component_fraction": rule["min_component_fraction"]}
    assert summary["field_of_view"] == "given" and not (out / "21_fov.png").exists()

    # photographs as users have them: a plain folder, no FOV masks; the field is estimated and written out
    plain = tmp_path / "photographs"
    for item in drive_split_items(tiny_drive / "training", with_labels=False):
        save(plain / f"{item['id']}.png", np.asarray(Image.open(item["image"])))
    # and as a hospital stores it: the same photograph as DICOM Ophthalmic Photography
    write_dicom(plain / "21_op.dcm", np.asarray(Image.open(tiny_drive / "training" / "images" / "21_training.tif")))
    estimated_out = tmp_path / "predictions_without_fov"
    inference = {k: v for k, v in common.items() if k not in TRAINING_ONLY}
    run_bundle(
        "inferring", [str(CONFIGS / "inference.json")], {**inference, "input_dir": plain, "output_dir": estimated_out}
    )
    summary = json.loads((estimated_out / "21.json").read_text())
    assert summary["field_of_view"] == "estimated"
    estimated = np.asarray(Image.open(estimated_out / "21_fov.png")) > 0
    assert iou(estimated, fov) > 0.93  # 80 x 72 pixels: one along the rim is 6 % of the disc
    assert (np.asarray(Image.open(estimated_out / "21_seg.png"))[~estimated] == 0).all()
    for name in ("seg", "prob", "fov"):
        np.testing.assert_array_equal(
            np.asarray(Image.open(estimated_out / f"21_op_{name}.png")),
            np.asarray(Image.open(estimated_out / f"21_{name}.png")),
            err_msg=name,
        )

    # a photograph at half the size, its disc enlarged twice, over a max_upscale of 1.5: refused naming it, the
    # others segmented, exit status 1
    half = tmp_path / "half"
    shutil.copytree(plain, half, ignore=shutil.ignore_patterns("*.dcm"))
    Image.open(plain / "22.png").resize((36, 40), Image.LANCZOS).save(half / "22.png")
    refused = run_bundle(
        "inferring",
        [str(CONFIGS / "inference.json")],
        {**inference, "input_dir": half, "output_dir": tmp_path / "half_out", "max_upscale": 1.5},
        check=False,
    )
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    output = refused.stdout + refused.stderr
    assert "22.png: is too small to segment: its field of view is" in output
    assert re.search(r"--max_upscale \d segments this one anyway", output), output[-3000:]
    summary = json.loads((tmp_path / "half_out" / "inference_summary.json").read_text())
    assert [item["id"] for item in summary["refused"]] == ["22"] and len(summary["cases"]) == 3


def test_training_takes_photographs_of_different_sizes(tmp_path, tracking_uri):
    """A folder of photographs from several cameras (sizes differ, no FOV masks): the patches of two photographs
    batch together. The full-size FOV mask of each photograph travelled with its patches and could not."""
    dataset = tmp_path / "photos"
    for folder in ("images", "masks"):
        (dataset / folder).mkdir(parents=True)
    for index, shape in enumerate([(80, 72), (92, 86), (76, 70), (88, 96)]):
        photo, vessels, _ = synthesize_fundus(np.random.default_rng([7, index]), shape)
        Image.fromarray(photo).save(dataset / "images" / f"photo{index}.png")
        Image.fromarray(vessels.astype(np.uint8) * 255).save(dataset / "masks" / f"photo{index}.png")
    overrides = {
        "bundle_root": tmp_path / "bundle",
        "dataset_dir": dataset,
        "patch_size": "[32,32]",
        "patches_per_image": 2,
        "repeats_per_epoch": 2,
        "sw_roi_size": "[48,48]",
        "network_def#channels": "[8,16,32]",
        "network_def#strides": "[2,2]",
        "train#trainer#max_epochs": 1,
        "val_interval": 1,
    }
    run_bundle("training", TRAIN, overrides)
    record = json.loads((tmp_path / "bundle" / "models" / "model.json").read_text())
    assert record["epoch"] == 1 and record["value"] is not None, "trained and validated"


def test_real_drive_training_images_read():
    root = shared_path("vessels", "DRIVE", "training")
    train, val = load_vessel_datalist(root, "train"), load_vessel_datalist(root, "val")
    assert [i["id"] for i in val] == ["36", "37", "38", "39", "40"] and len(train) == 15
    for item in decode("vessels", val):
        inside = item["label"][item["fov"] == 1]
        assert item["image"].shape == (3, 584, 565) and 0.05 < (inside == 1).mean() < 0.2


def test_a_resampled_photograph_is_scored_on_its_own_grid(tmp_path, tiny_drive, tracking_uri):
    """A photograph whose disc is resampled for the network is scored where its annotation was drawn: the
    validation and the evaluation invert the prediction onto the photograph's own grid, so their F1 is the F1 of
    the label map inference writes for it, and their panels show the photograph at its own size. Scored at the
    network's scale, against a label resampled by nearest neighbour, the number described another image."""
    common = {
        "bundle_root": tmp_path / "bundle",
        "dataset_dir": tiny_drive,
        "fov_diameter_px": 40,  # the phantoms' discs are about 70 pixels: every photograph is resampled by ~0.6
        "patch_size": "[24,24]",
        "patches_per_image": 4,
        "repeats_per_epoch": 2,
        "sw_roi_size": "[48,48]",
        "network_def#channels": "[8,16,32]",
        "network_def#strides": "[2,2]",
    }
    run_bundle("training", TRAIN, {**common, "train#trainer#max_epochs": 4, "val_interval": 1})
    (split,) = (tmp_path / "bundle" / "outputs").glob("*/split.json")
    (case,) = json.loads(split.read_text())["val"]

    run_bundle("evaluating", TRAIN + [str(CONFIGS / "evaluate.json")], {**common, "run_name": "native"})
    outputs = tmp_path / "bundle" / "outputs" / "native"
    report = json.loads((outputs / "metrics.json").read_text())

    predictions = tmp_path / "predictions"
    inference = {k: v for k, v in common.items() if k not in TRAINING_ONLY}
    run_bundle(
        "inferring",
        [str(CONFIGS / "inference.json")],
        {**inference, "input_dir": tiny_drive / "training", "output_dir": predictions},
    )
    segmentation = np.asarray(Image.open(predictions / f"{case}_seg.png")) > 0
    assert segmentation.shape == (80, 72)
    fov = read_binary_mask(tiny_drive / "training" / "mask" / f"{case}_training_mask.gif")
    reference = read_binary_mask(tiny_drive / "training" / "1st_manual" / f"{case}_manual1.gif")
    predicted, truth = segmentation[fov], reference[fov]
    f1 = 2 * (predicted & truth).sum() / (predicted.sum() + truth.sum())
    assert 0 < f1 < 0.99, f"a model that finds some vessel, not none or all of them ({f1})"
    assert report["mean"]["val_f1"] == pytest.approx(f1, abs=1e-4)
    (panel,) = (outputs / "overlays").glob("*.png")
    assert np.asarray(Image.open(panel)).shape[1] == 3 * 72 + 2 * 4, "image | prediction | reference at its own size"
