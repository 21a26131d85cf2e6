"""Annotations as the 2D datasets give them, on real files written here: OCT layer boundaries (Duke .mat) and VIA
polygons become the right label map or are refused naming the file; fundus labels are checked against their field of
view; the fixed split and the folds keep one person's photographs, and copies of one image, on one side."""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import scipy.io
from PIL import Image

from clinseg.datasets.errors import DataError
from clinseg.datasets.fundus import drive_split_items, load_vessel_datalist
from clinseg.datasets.fundus.phantom import write_drive_layout
from clinseg.datasets.oct import DUKE_CLASS_NAMES, load_oct_datalist, via_items
from clinseg.transforms.oct import boundaries_to_label_map
from tests.conftest import decode

CLASSES = list(DUKE_CLASS_NAMES)


def write_duke(path, boundaries):
    """One B-scan of 30 rows whose grader-1 boundaries are ``boundaries`` (0-based rows, ``(n, cols)``)."""
    boundaries = np.asarray(boundaries, dtype=np.float64)
    images = np.random.default_rng(0).integers(1, 255, (30, boundaries.shape[1], 1), dtype=np.uint8)
    scipy.io.savemat(path, {"images": images, "manualLayers1": boundaries[..., None] + 1.0})  # MATLAB: 1-based


def even_boundaries(n=8, cols=10):
    return np.tile(np.linspace(2, 24, n)[:, None], (1, cols))


def test_duke_boundaries_out_of_order_are_refused_naming_the_bscan(tmp_path):
    boundaries = even_boundaries()
    boundaries[4] = boundaries[2] - 2  # drawn above the boundary two before it in every column
    write_duke(tmp_path / "Subject_01.mat", boundaries)
    with pytest.raises(DataError, match=r"Subject_01.mat: B-scan 0: boundaries out of top-to-bottom order in 10 of"):
        load_oct_datalist(tmp_path, "all", class_names=CLASSES)


def test_crossing_boundaries_never_let_one_layer_overwrite_another():
    boundaries = even_boundaries()
    boundaries[4, :3] = boundaries[2, :3] - 2  # a grader's slip in three columns: those layers are unknown
    boundaries[5, 5] = boundaries[4, 5] - 0.5  # within a pixel: boundaries 4 and 5 touch, layer 5 is absent
    label = boundaries_to_label_map(boundaries, 30)
    assert (label[:, :3] == 255).all() and (label[:, 3:] != 255).all()
    touching = even_boundaries()
    touching[5, 5] = touching[4, 5]
    np.testing.assert_array_equal(label[:, 5], boundaries_to_label_map(touching, 30)[:, 5])
    assert 5 not in label[:, 5] and set(label[:, 5].tolist()) == {0, 1, 2, 3, 4, 6, 7}


def test_duke_boundaries_must_bound_the_bundles_classes(tmp_path):
    write_duke(tmp_path / "Subject_01.mat", even_boundaries(n=6))
    with pytest.raises(DataError, match=r"Subject_01.mat: 'manualLayers1' holds 6 boundaries .* 5 layers, but the"):
        load_oct_datalist(tmp_path, "all", class_names=CLASSES)
    items = load_oct_datalist(tmp_path, "all", class_names=CLASSES[:6])
    assert np.unique(decode("oct_layers", items, class_names=CLASSES[:6])[0]["label"]).tolist() == list(range(6))


def via_region(xs, ys, layer="NFL"):
    return {
        "shape_attributes": {"name": "polygon", "all_points_x": xs, "all_points_y": ys},
        "region_attributes": {"layer": layer},
    }


def write_via(folder, regions_by_image, size=(40, 60)):
    for name in regions_by_image:
        value = 10 * len(list(folder.glob("*.png")))  # distinct images
        Image.fromarray(np.full(size, value, dtype=np.uint8)).save(folder / name)
    export = {f"{n}1": {"filename": n, "size": 1, "regions": r} for n, r in regions_by_image.items()}
    (folder / "via_project.json").write_text(json.dumps({"_via_img_metadata": export}))
    return folder / "via_project.json"


def test_an_image_without_via_regions_is_not_trained_as_background(tmp_path, caplog):
    write_via(tmp_path, {"a.png": [via_region([0, 60, 60, 0], [10, 10, 20, 20])], "b.png": []})
    with caplog.at_level(logging.WARNING):
        items = load_oct_datalist(tmp_path, "all", class_names=CLASSES)
    assert [item["id"] for item in items] == ["a"]
    assert "1 of 2 images have no regions (not annotated), left out: b.png" in caplog.text


def test_via_regions_drawn_on_another_size_of_the_image_are_refused(tmp_path):
    json_path = write_via(tmp_path, {"a.png": [via_region([0, 60, 60, 0], [40, 40, 80, 80])]})  # a 2x larger image
    with pytest.raises(DataError, match=r"via_project.json: a region of 'a.png' spans .* outside the image's 60 x 40"):
        decode("oct_layers", via_items(json_path), class_names=CLASSES)
    json_path = write_via(tmp_path, {"a.png": [via_region([0, 60, 60, 0], [30, 30, 40, 40])]})  # on the edge: fine
    label = decode("oct_layers", via_items(json_path), class_names=CLASSES)[0]["label"][0]
    assert (label[30:] == 1).all() and (label[:30] == 0).all()


def test_an_inverted_fov_mask_is_refused_naming_it(tmp_path):
    write_drive_layout(tmp_path, n_images=1, shape=(96, 96), seed=0)
    items = drive_split_items(tmp_path / "training")
    fov = np.asarray(Image.open(items[0]["fov"]).convert("L"))
    assert 0.2 < (fov == 0).mean() < 0.5  # inverted, it still covers more than the 20 % a field needs
    Image.fromarray(255 - fov).save(items[0]["fov"])
    # against the field found in the photograph: the mask lies in the camera's frame
    with pytest.raises(DataError, match=r"FOV mask is not the field of view of .*21_training.tif: 9\d% of it") as e:
        decode("vessels", items)
    assert e.value.path == items[0]["fov"]
    # without that comparison (photographs that are not fundus photographs), against the annotation
    with pytest.raises(DataError, match=r"FOV mask leaves 100% of the annotated foreground of .*21_manual1.gif") as e:
        decode("vessels", items, estimate_fov=False)
    assert e.value.path == items[0]["fov"] and "\n" not in str(e.value)


def write_photographs(folder, names):
    for value, name in enumerate(names):
        for sub, array in (("images", np.full((8, 8, 3), value, np.uint8)), ("masks", np.eye(8, dtype=np.uint8))):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array * (255 if sub == "masks" else 1)).save(folder / sub / name)


@pytest.mark.parametrize("split", [{"val_fraction": 0.2}, {"folds": 5, "fold": 0}])
def test_both_eyes_of_one_person_stay_on_one_side_of_the_split(tmp_path, split):
    write_photographs(tmp_path, [f"Image_{n:02d}{eye}.png" for n in range(1, 8) for eye in "LR"])  # as CHASE_DB1
    train = {item["id"][:-1] for item in load_vessel_datalist(tmp_path, "train", **split)}
    val = {item["id"][:-1] for item in load_vessel_datalist(tmp_path, "val", **split)}
    assert val and train and train.isdisjoint(val)


def test_copies_of_one_image_stay_on_one_side_of_the_split(tmp_path, caplog):
    write_photographs(tmp_path, [f"{n}.png" for n in range(5)])
    for sub in ("images", "masks"):
        shutil.copy(tmp_path / sub / "0.png", tmp_path / sub / "9.png")  # the same photograph under another name
    with caplog.at_level(logging.WARNING):
        train = [item["id"] for item in load_vessel_datalist(tmp_path, "train")]
        val = [item["id"] for item in load_vessel_datalist(tmp_path, "val")]
    assert {"0", "9"} <= set(train) and not {"0", "9"} & set(val), (train, val)
    assert "0.png, 9.png are the same image" in caplog.text


def write_chase_release(folder, subjects=3):
    """CHASE_DB1 as released: ``Image_NN{L,R}.jpg`` with both observers' ``_1stHO.png`` / ``_2ndHO.png`` beside them,
    each photograph and each annotation distinct."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for n in range(1, subjects + 1):
        for eye in "LR":
            stem = f"Image_{n:02d}{eye}"
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{stem}.jpg")
            for observer in ("1stHO", "2ndHO"):
                vessels = (rng.random((40, 48)) > 0.9).astype(np.uint8) * 255
                Image.fromarray(vessels).save(folder / f"{stem}_{observer}.png")


def test_the_chase_db1_release_pairs_each_photograph_with_its_first_observer(tmp_path):
    write_chase_release(tmp_path)
    items = load_vessel_datalist(tmp_path, "all")
    assert [item["id"] for item in items] == [f"Image_{n:02d}{eye}" for n in (1, 2, 3) for eye in "LR"]
    for item in items:
        assert item["label"] == str(tmp_path / f"{item['id']}_1stHO.png") and "fov" not in item
    train = {item["subject"] for item in load_vessel_datalist(tmp_path, "train", val_fraction=0.3)}
    val = {item["subject"] for item in load_vessel_datalist(tmp_path, "val", val_fraction=0.3)}
    assert val == {"Image_03"} and train == {"Image_01", "Image_02"}
    decoded = decode("vessels", items[:1])[0]  # the label is the annotation's vessels, inside an estimated field
    annotation = np.asarray(Image.open(tmp_path / "Image_01L_1stHO.png")) > 0
    assert decoded["label"].shape[-2:] == annotation.shape and "fov" in decoded
    (tmp_path / "Image_02R_1stHO.png").unlink()
    with pytest.raises(DataError, match=r"Image_02R.jpg: has no annotation Image_02R_1stHO.png beside it"):
        load_vessel_datalist(tmp_path, "all")


def test_masks_beside_photographs_are_not_segmented_as_photographs(tmp_path, caplog):
    """A folder as users keep it (the release's annotations, a mask beside a photograph) given to inference: only the
    photographs are segmented; a vessel map segmented as a photograph would give a plausible map of a map."""
    from clinseg.datasets.fundus import load_fundus_images

    write_chase_release(tmp_path)
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(tmp_path / "other.png")
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(tmp_path / "other_mask.png")
    Image.fromarray(np.zeros((40, 48), np.uint8)).save(tmp_path / "lonely_mask.png")  # no photograph of its name
    with caplog.at_level(logging.WARNING):
        ids = [item["id"] for item in load_fundus_images(tmp_path)]
    assert ids == ["Image_01L", "Image_01R", "Image_02L", "Image_02R", "Image_03L", "Image_03R", "lonely_mask", "other"]
    assert "13 masks or annotations of photographs beside them are not photographs, left out" in caplog.text
