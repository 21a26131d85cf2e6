"""OCT readers on real files written here: Duke .mat, paired folders (index and colour PNG), VIA JSON."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from clinseg.datasets.errors import DataError, NoUsableDataError
from clinseg.datasets.fingerprint import dataset_fingerprint
from clinseg.datasets.oct import duke_items, load_oct_datalist, load_oct_images, paired_items, via_items
from clinseg.datasets.oct.phantom import write_phantom_dataset
from clinseg.pipelines.cli import find_input_error
from tests.conftest import REPO_ROOT, decode, shared_path

NR206_COLORS = [
    [0, 0, 0],
    [255, 0, 0],
    [128, 128, 0],
    [255, 255, 0],
    [0, 128, 0],
    [0, 255, 0],
    [0, 255, 255],
    [0, 0, 255],
    [255, 0, 255],
]


def write_duke(path, rows=20, cols=12, n=3, **overrides):
    images = np.random.default_rng(0).integers(0, 255, (rows, cols, n), dtype=np.uint8)
    layers = np.full((8, cols, n), np.nan)
    layers[:, :, 1] = np.linspace(3, 17, 8)[:, None]  # 1-based rows, B-scan 1 annotated
    layers[:, :2, 1] = np.nan  # two unannotated columns
    content = {"images": images, "manualLayers1": layers, **overrides}
    scipy.io.savemat(path, {k: v for k, v in content.items() if v is not None})
    return images, layers


def test_duke_reads_annotated_bscans_and_ignores_unannotated_columns(tmp_path):
    images, layers = write_duke(tmp_path / "Subject_01.mat")
    items = decode("oct_layers", duke_items(tmp_path / "Subject_01.mat"))
    assert len(items) == 1 and items[0]["bscan"] == 1 and items[0]["subject"] == "Subject_01"
    label = items[0]["label"][0]
    np.testing.assert_array_equal(items[0]["image"][0], images[:, :, 1])
    assert (label[:, :2] == 255).all(), "columns without boundaries must be ignored, not filled"
    # boundary k at 1-based row 3 + 2k -> 0-based 2 + 2k: layer k spans rows [2 + 2(k-1), 2 + 2k)
    np.testing.assert_array_equal(label[:, 5], [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7] + [0] * 4)


@pytest.mark.parametrize(
    "content, problem",
    [
        ({"manualLayers1": None}, "missing key"),
        ({"manualLayers1": np.zeros((8, 11, 3))}, "shape mismatch"),
        ({"images": np.zeros((2, 2, 2, 2))}, "must be"),
    ],
)
def test_duke_malformed_content_names_file_and_problem(tmp_path, content, problem):
    path = tmp_path / "Subject_02.mat"
    write_duke(path, **content)
    with pytest.raises(DataError, match=problem) as error:
        decode("oct_layers", duke_items(path))
    assert str(path) in str(error.value)


def test_duke_truncated_and_empty_files(tmp_path):
    path = tmp_path / "Subject_03.mat"
    write_duke(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataError, match="cannot be read as a MATLAB") as error:
        decode("oct_layers", duke_items(path))
    assert str(path) in str(error.value)
    empty = tmp_path / "Subject_04.mat"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=str(empty)):
        decode("oct_layers", duke_items(empty))


def test_a_matlab_v73_file_is_refused_saying_how_to_save_it(tmp_path):
    """MATLAB saves large variables as version 7.3 (HDF5 behind a 512-byte header of its own) by default. scipy
    cannot read it and pointed at h5py; the refusal says what the user can do: save with -v7, or export images."""
    import h5py

    path = tmp_path / "Subject_01.mat"
    write_duke(tmp_path / "v7.mat")
    content = scipy.io.loadmat(tmp_path / "v7.mat")
    with h5py.File(path, "w", userblock_size=512) as f:
        for name in ("images", "manualLayers1"):
            f.create_dataset(name, data=np.transpose(content[name]))  # MATLAB writes column-major
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Dec  7 10:00:00 2026 HDF5 schema 1.00 ."
    with open(path, "r+b") as f:
        f.write(header.ljust(116) + b"\x00" * 8 + b"\x00\x02IM")
    assert h5py.is_hdf5(path)
    with pytest.raises(DataError, match=r"Subject_01\.mat: is a MATLAB v7\.3 file .*\n.*save\(\.\.\., '-v7'\)"):
        decode("oct_layers", duke_items(path))
    with pytest.raises(DataError, match="is a MATLAB v7.3 file"):
        load_oct_images(path)


def test_phantom_is_deterministic_and_readable(tmp_path):
    a = write_phantom_dataset(tmp_path / "a", n_subjects=2, n_bscans=3, height=48, width=64, seed=5)
    time.sleep(1.1)  # in another second: the same seed must give the same bytes whenever it is written
    b = write_phantom_dataset(tmp_path / "b", n_subjects=2, n_bscans=3, height=48, width=64, seed=5)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    c = write_phantom_dataset(tmp_path / "c", n_subjects=2, n_bscans=3, height=48, width=64, seed=6)
    first, second, other = (scipy.io.loadmat(p[0]) for p in (a, b, c))
    np.testing.assert_array_equal(first["images"], second["images"])
    assert not np.array_equal(first["images"], other["images"])
    assert dataset_fingerprint(a) == dataset_fingerprint(b) != dataset_fingerprint(c)
    items = decode("oct_layers", duke_items(a[0]))
    labels = np.concatenate([item["label"].ravel() for item in items])
    assert set(np.unique(labels)) == set(range(8)) | {255}, "all 7 layers, background and ignored edges"
    # layers are ordered top to bottom in every annotated column
    label = items[0]["label"][0]
    for column in np.nonzero(label[0] != 255)[0]:
        values = label[:, column][label[:, column] > 0]
        assert (np.diff(values.astype(int)) >= 0).all()


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_paired_folder_index_and_colour_labels(tmp_path):
    image = np.random.default_rng(1).integers(0, 255, (10, 14), dtype=np.uint8)
    index_label = np.repeat((np.arange(10, dtype=np.uint8) * 3 // 10)[:, None], 14, axis=1)  # 0, 1, 2 down
    save_png(tmp_path / "images" / "a.png", image)
    save_png(tmp_path / "labels" / "a_label.png", index_label)
    items = decode("oct_layers", paired_items(tmp_path / "images", tmp_path / "labels"))
    np.testing.assert_array_equal(items[0]["label"][0], index_label)
    np.testing.assert_array_equal(items[0]["image"][0], image)

    colour = np.zeros((10, 14, 4), dtype=np.uint8)
    colour[..., 3] = 255
    colour[3:6] = [255, 0, 0, 255]
    colour[6:] = [255, 0, 255, 10]  # alpha is ignored
    save_png(tmp_path / "c" / "train" / "b.png", image)
    save_png(tmp_path / "c" / "train_labels" / "b.png", colour)
    item = decode(
        "oct_layers",
        paired_items(tmp_path / "c" / "train", tmp_path / "c" / "train_labels"),
        label_colors=NR206_COLORS,
        class_names=[str(i) for i in range(9)],
    )[0]
    assert np.unique(item["label"][0, :3]).tolist() == [0]
    assert np.unique(item["label"][0, 3:6]).tolist() == [1]
    assert np.unique(item["label"][0, 6:]).tolist() == [8]


def test_a_jpeg_label_is_refused_saying_labels_must_be_lossless(tmp_path, caplog):
    """A label saved as JPEG was found (the label lookup takes .jpg, as photographs have it) and then called "not a
    format this bundle reads": the refusal says what is wrong with it. A link whose target is gone is named as
    such in the listing, not as "not a data file"."""
    image = np.random.default_rng(1).integers(0, 255, (10, 14), dtype=np.uint8)
    save_png(tmp_path / "train" / "NORMAL1.png", image)
    colour = np.zeros((10, 14, 3), dtype=np.uint8)
    colour[3:6] = NR206_COLORS[1]
    (tmp_path / "train_labels").mkdir()
    Image.fromarray(colour).save(tmp_path / "train_labels" / "NORMAL1.jpg", quality=95)
    items = paired_items(tmp_path / "train", tmp_path / "train_labels")
    with pytest.raises(DataError, match=r"(?s)NORMAL1\.jpg: is a JPEG; a label image must be stored losslessly .*"
                       r"blurs the class values.*\nExport the annotation again as PNG"):  # fmt: skip
        decode("oct_layers", items, label_colors=NR206_COLORS, class_names=[str(i) for i in range(9)])
    (tmp_path / "scans").mkdir()
    save_png(tmp_path / "scans" / "b.png", np.tile(image, (4, 4)))
    (tmp_path / "scans" / "moved.png").symlink_to(tmp_path / "elsewhere" / "moved.png")
    with caplog.at_level("WARNING"):
        assert [Path(item["image"]).name for item in load_oct_images(tmp_path / "scans")] == ["b.png"]
    assert f"skipped 1 links whose target does not exist: moved.png -> {tmp_path / 'elsewhere' / 'moved.png'}" in (
        caplog.text
    )
    assert "not data files" not in caplog.text


def test_paired_folder_errors(tmp_path):
    image = np.zeros((10, 14), dtype=np.uint8)
    save_png(tmp_path / "images" / "a.png", image)
    (tmp_path / "labels").mkdir()
    with pytest.raises(DataError, match="has no label"):
        paired_items(tmp_path / "images", tmp_path / "labels")
    save_png(tmp_path / "labels" / "a.png", np.zeros((9, 14), dtype=np.uint8))
    with pytest.raises(DataError, match="is 9 x 14 but its image a.png is 10 x 14"):
        load_oct_datalist(tmp_path, "all")
    rgb = np.zeros((10, 14, 3), dtype=np.uint8)
    rgb[0, 0] = (1, 2, 3)
    save_png(tmp_path / "labels" / "a.png", rgb)
    with pytest.raises(DataError, match=r"unknown label colour.*\(1, 2, 3\)") as error:
        decode("oct_layers", paired_items(tmp_path / "images", tmp_path / "labels"), label_colors=NR206_COLORS)
    assert "a.png" in str(error.value)
    with pytest.raises(DataError, match="no colour table"):
        decode("oct_layers", paired_items(tmp_path / "images", tmp_path / "labels"))
    (tmp_path / "images" / "a.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot be read as an image"):
        load_oct_datalist(tmp_path, "all")


def test_via_json_polygons_become_label_masks(tmp_path):
    save_png(tmp_path / "scan.png", np.zeros((20, 30), dtype=np.uint8))
    export = {
        "scan.png1234": {
            "filename": "scan.png",
            "size": 1234,
            "regions": [
                {
                    "shape_attributes": {
                        "name": "polygon",
                        "all_points_x": [2, 12, 12, 2],
                        "all_points_y": [2, 2, 8, 8],
                    },
                    "region_attributes": {"layer": "NFL"},
                },
                {
                    "shape_attributes": {"name": "rect", "x": 20, "y": 10, "width": 5, "height": 4},
                    "region_attributes": {"layer": "ISE"},
                },
            ],
            "file_attributes": {},
        }
    }
    (tmp_path / "via_export.json").write_text(json.dumps({"_via_img_metadata": export}))
    classes = ["background", "NFL", "GCL-IPL", "INL", "OPL", "ONL-ISM", "ISE", "OS-RPE"]
    label = decode("oct_layers", via_items(tmp_path / "via_export.json"), class_names=classes)[0]["label"][0]
    assert label[5, 7] == 1 and label[12, 22] == 6 and label[15, 5] == 0
    assert (label == 1).sum() == 11 * 7  # vertices included: rows 2..8, columns 2..12
    export["scan.png1234"]["regions"][0]["region_attributes"] = {"layer": "choroid"}
    (tmp_path / "via_export.json").write_text(json.dumps(export))
    with pytest.raises(DataError, match="'choroid'.*not one of the classes"):
        decode("oct_layers", via_items(tmp_path / "via_export.json"), class_names=classes)


def test_datalist_splits_by_subject_and_generates_phantom(tmp_path):
    root = tmp_path / "phantom"
    train = load_oct_datalist(root, "train", phantom_if_missing=True)
    val = load_oct_datalist(root, "val")
    assert {i["subject"] for i in train}.isdisjoint({i["subject"] for i in val})
    assert {i["subject"] for i in val} == {"Subject_07", "Subject_08"}  # the last 20 % of 8 phantom subjects
    assert len(load_oct_datalist(root, "all")) == len(train) + len(val)


def test_datalist_without_data_explains_what_to_do(tmp_path):
    (tmp_path / "empty").mkdir()
    for path in (tmp_path / "missing", tmp_path / "empty"):
        with pytest.raises(NoUsableDataError) as error:
            load_oct_datalist(path)
        message = str(error.value)
        assert str(path) in message and "Accepted layouts" in message and "datasets.oct.phantom" in message


def test_datalist_rejects_labels_outside_the_class_list(tmp_path):
    save_png(tmp_path / "images" / "a.png", np.zeros((8, 8), dtype=np.uint8))
    save_png(tmp_path / "labels" / "a.png", np.full((8, 8), 9, dtype=np.uint8))
    with pytest.raises(DataError, match=r"a.png: label values \[9\] are not among the classes"):
        decode("oct_layers", load_oct_datalist(tmp_path, "all"), class_names=list("abcdefgh"))


def test_inference_images_from_png_and_mat(tmp_path, tiny_oct_dir):
    save_png(tmp_path / "x.png", np.random.default_rng(2).integers(0, 255, (32, 40, 3), dtype=np.uint8))
    assert decode("oct_layers", load_oct_images(tmp_path))[0]["image"].shape == (1, 32, 40)
    items = decode("oct_layers", load_oct_images(tiny_oct_dir / "Subject_01.mat"))
    assert len(items) == 4 and items[0]["image"].shape == (1, 64, 96)
    with pytest.raises(NoUsableDataError):
        load_oct_images(tiny_oct_dir.parent)  # a folder with no images or .mat files


def test_real_nr206_sample_reads_with_the_colour_table():
    root = shared_path("oct", "NR206_sample")
    train, val = load_oct_datalist(root, "train"), load_oct_datalist(root, "val")
    assert len(train) == 2 and len(val) == 2
    classes = [str(i) for i in range(9)]
    for item in decode("oct_layers", train + val, label_colors=NR206_COLORS, class_names=classes):
        assert item["image"].shape == item["label"].shape == (1, 500, 750)
        assert set(np.unique(item["label"])) == set(range(9))


def test_labels_out_of_the_layer_order_are_refused_naming_the_file(tmp_path):
    """A label upside down or with two layers' colours exchanged trains and validates as given (a plausible key
    metric, exit 0) unless it is checked: more than 10 % of its columns out of order is refused, naming it. The
    real NR206 annotations break it in none of their columns."""
    root = shared_path("oct", "NR206_sample")
    classes = [str(i) for i in range(9)]
    for split in ("train", "val"):
        for item in load_oct_datalist(root, split):
            shutil.copy(item["image"], tmp_path / Path(item["image"]).name)
            colours = np.asarray(Image.open(item["label"]).convert("RGB"))
            wrong = {"flipped": colours[::-1], "swapped": colours.copy()}
            first, fifth = (np.all(colours == NR206_COLORS[k], axis=-1) for k in (1, 5))
            wrong["swapped"][first], wrong["swapped"][fifth] = NR206_COLORS[5], NR206_COLORS[1]
            for kind, label in wrong.items():
                save_png(tmp_path / kind / Path(item["label"]).name, label)
                items = [{"image": str(tmp_path / Path(item["image"]).name), "label": str(tmp_path / kind /
                          Path(item["label"]).name)}]  # fmt: skip
                with pytest.raises(DataError, match="its layers are out of their top-to-bottom order in") as refused:
                    decode("oct_layers", items, label_colors=NR206_COLORS, class_names=classes)
                assert refused.value.path == items[0]["label"], refused.value
                # a task whose classes are no layers (a new task's default) reads the same label
                decode("oct_layers", items, label_colors=NR206_COLORS, class_names=classes, layer_order=False)
    assert len(decode("oct_layers", load_oct_datalist(root, "all"), label_colors=NR206_COLORS, class_names=classes))


def test_a_phantom_label_out_of_the_layer_order_is_refused(tmp_path):
    write_phantom_dataset(tmp_path / "mat", n_subjects=1, n_bscans=1, height=64, width=96, seed=0)
    (decoded,) = decode("oct_layers", load_oct_datalist(tmp_path / "mat", "all"))
    image, label = decoded["image"][0].astype(np.uint8), decoded["label"][0].astype(np.uint8)
    save_png(tmp_path / "images" / "b0.png", image)
    save_png(tmp_path / "labels" / "b0.png", label)
    assert decode("oct_layers", paired_items(tmp_path / "images", tmp_path / "labels"))
    # hand-drawn polygons leave gaps of background between neighbouring layers: not out of order
    gaps = label.copy()
    gaps[np.vstack([np.zeros((1, label.shape[1]), bool), label[1:] != label[:-1]]) & (label > 0)] = 0
    save_png(tmp_path / "labels" / "b0.png", gaps)
    assert decode("oct_layers", paired_items(tmp_path / "images", tmp_path / "labels"))
    save_png(tmp_path / "labels" / "b0.png", label[::-1])
    with pytest.raises(DataError, match="out of their top-to-bottom order in 100% of its columns"):
        decode("oct_layers", paired_items(tmp_path / "images", tmp_path / "labels"))


def inference_preprocessing(**overrides):
    """The oct_layers inference preprocessing, as the bundle builds it (no model trained: the framing cuts off
    padding bands alone)."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundles" / "oct_layers" / "configs" / "inference.json"))
    parser.update(overrides)
    return parser.get_parsed_content("preprocessing")


@pytest.mark.parametrize("shape", [(2, 2), (1, 50), (12, 12), (31, 400)])
def test_a_thumbnail_is_refused_as_a_bscan_when_listed(tmp_path, shape):
    save_png(tmp_path / "thumb.png", np.random.default_rng(3).integers(0, 255, shape, dtype=np.uint8))
    with pytest.raises(DataError, match="smaller than the 32 x 32 a B-scan needs") as error:
        load_oct_images(tmp_path)
    assert str(error.value).startswith(str(tmp_path / "thumb.png")) and "\n" not in str(error.value)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_a_blank_bscan_is_refused_before_inference(tmp_path, dtype):
    save_png(tmp_path / "blank.png", np.full((64, 96), 40, dtype=dtype))
    items = load_oct_images(tmp_path)  # its header is fine: its pixels are not
    with pytest.raises(Exception) as error:
        inference_preprocessing()(items[0])
    found = find_input_error(error.value)
    assert isinstance(found, DataError) and found.path == str(tmp_path / "blank.png")
    assert "is uniform" in str(found) and "\n" not in str(found)
    save_png(tmp_path / "blank.png", np.random.default_rng(4).integers(0, 255, (64, 96), dtype=np.uint8))
    assert tuple(inference_preprocessing()(items[0])["image"].shape) == (1, 256, 384)


def test_a_blank_bscan_of_a_mat_file_is_refused_naming_it(tmp_path):
    images = np.random.default_rng(5).integers(0, 255, (40, 48, 2), dtype=np.uint8)
    images[:, :, 1] = 0
    scipy.io.savemat(tmp_path / "Subject_01.mat", {"images": images})
    items = load_oct_images(tmp_path / "Subject_01.mat")
    inference_preprocessing()(items[0])
    with pytest.raises(Exception) as error:
        inference_preprocessing()(items[1])
    assert "Subject_01.mat::1: is uniform" in str(find_input_error(error.value))


def test_a_mat_volume_saved_in_another_axis_order_is_refused_for_inference_naming_the_order(tmp_path):
    """``images`` saved as (n_bscans, rows, cols) beside Duke's boundaries was listed for inference as 48 "B-scans"
    of 61 x 40 pixels, each a slice across the real B-scans: plausible images of the wrong plane, segmented as
    layers. The boundaries in the file say which axes are which."""
    images, layers = write_duke(tmp_path / "Subject_01.mat", rows=40, cols=48, n=61)
    assert len(load_oct_images(tmp_path / "Subject_01.mat")) == 61  # as the release stores it
    scipy.io.savemat(tmp_path / "Subject_01.mat", {"images": images.transpose(2, 0, 1), "manualLayers1": layers})
    with pytest.raises(DataError, match=r"'images' looks saved as \(n_bscans, rows, cols\)") as error:
        load_oct_images(tmp_path / "Subject_01.mat")
    message = str(error.value)
    assert message.startswith(str(tmp_path / "Subject_01.mat")) and "permute(images, [2 3 1])" in message
    scipy.io.savemat(tmp_path / "Subject_01.mat", {"images": images[:, :, :60], "manualLayers2": layers})
    with pytest.raises(DataError, match="image/label shape mismatch") as error:
        load_oct_images(tmp_path)  # another grader's boundaries, for one B-scan more than the images hold
    assert "looks saved" not in str(error.value)


def nr206_learnt_retina_heights(root: Path) -> dict:
    """The retina heights of the NR206 sample's training labels, as a training with the nr206.json overlay records
    them (read by the bundle's own load_transforms)."""
    from monai.bundle import ConfigParser

    from clinseg.transforms.oct import retina_heights

    configs = REPO_ROOT / "bundles" / "oct_layers" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "nr206.json")])
    parser["dataset_dir"] = str(root)
    return retina_heights(parser.get_parsed_content("train#datalist"), parser.get_parsed_content("load_transforms"))


def test_a_retina_far_thinner_or_thicker_than_learnt_is_refused_with_the_rows_that_fit(tmp_path):
    """A B-scan with more rows around its retina than the training B-scans (another scan depth, padding bands with
    a scale bar or dither) is resized whole to image_size: the network sees a thinner retina than any it learnt and
    gives layers in order with thicknesses wrong by up to 8 times. Training records its labels' retina heights
    (read by the bundle's own load_transforms, as a training does); a prediction whose retina spans a share of the
    height beyond 1.3 times that range is refused naming the image, with the rows to crop it to. The real NR206
    validation labels pass; padded to twice their rows or cropped tight around the retina, they are refused."""
    from monai.data import MetaTensor

    from clinseg.transforms.oct import RequireRetinaHeightd, retina_height_fraction

    root = shared_path("oct", "NR206_sample")
    learnt = nr206_learnt_retina_heights(root)
    assert learnt["cases"] == 2 and 0.14 < learnt["min"] <= learnt["median"] <= learnt["max"] < 0.17, learnt
    check = RequireRetinaHeightd("pred", learnt=learnt)
    classes = [str(i) for i in range(9)]
    for decoded in decode("oct_layers", load_oct_datalist(root, "val"), label_colors=NR206_COLORS, class_names=classes):
        label = decoded["label"][0].astype(np.int64)
        assert check({"pred": MetaTensor(label[None])})  # the learnt scale: kept
        fraction = retina_height_fraction(label)
        padded = np.pad(label, ((label.shape[0] // 2, label.shape[0] // 2), (0, 0)))
        assert retina_height_fraction(padded) == pytest.approx(fraction / 2, rel=0.01)
        scan = MetaTensor(padded[None], meta={"filename_or_obj": "deep.png"})
        with pytest.raises(DataError, match=r"(?s)deep\.png: its retina spans \d+% of its 1000 rows, where the model "
                           r"learnt retinas spanning 15%-16% .* 1.3 times thinner.*more rows around the retina.*"
                           r"Crop its rows to about (\d+)-(\d+) \(the retina at 1\d%\)") as refused:  # fmt: skip
            check({"pred": scan})
        first, last = (int(row) for row in refused.value.args[0].split("rows to about ")[1].split(" ")[0].split("-"))
        cropped = MetaTensor(padded[None, first : last + 1])
        assert retina_height_fraction(cropped[0]) == pytest.approx(learnt["median"], abs=0.01)
        assert check({"pred": cropped}), "cropped as told, the retina is at the learnt scale"
        rows = np.flatnonzero((label > 0).any(axis=1))
        tight = MetaTensor(label[None, rows[0] - 5 : rows[-1] + 6], meta={"filename_or_obj": "tight.png"})
        with pytest.raises(DataError, match=r"(?s)tight\.png: .*thicker.*fewer rows .*Pad it with rows of the scan's "
                           r"background to about \d+ in all"):  # fmt: skip
            check({"pred": tight})
        # no record (a model trained before it was kept), no limit, or classes that are no layers: nothing checked
        for unchecked in (RequireRetinaHeightd("pred", learnt=None), RequireRetinaHeightd("pred", learnt, None),
                          RequireRetinaHeightd("pred", learnt, enabled=False)):  # fmt: skip
            assert unchecked({"pred": scan})["pred"] is scan
    # the phantom B-scans of the default training: their retina spans about 28 % of 256 rows, and a one-hot
    # prediction is judged by its most likely class
    write_phantom_dataset(tmp_path / "mat", n_subjects=1, n_bscans=2, seed=0)
    phantom = [
        decoded["label"][0].astype(np.int64)
        for decoded in decode("oct_layers", load_oct_datalist(tmp_path / "mat", "all"))
    ]
    assert all(0.22 < retina_height_fraction(label) < 0.34 for label in phantom)
    annotated = np.where(phantom[0] == 255, 0, phantom[0])  # unannotated columns: background here
    one_hot = np.eye(8)[np.pad(annotated, ((100, 100), (0, 0)))].transpose(2, 0, 1)
    with pytest.raises(DataError, match=r"pred: its retina spans 1\d% of its 456 rows"):
        RequireRetinaHeightd("pred", learnt={"min": 0.26, "median": 0.28, "max": 0.3})({"pred": one_hot})


def test_a_deeper_scan_is_framed_to_the_learnt_share_with_every_column_of_its_retina_inside():
    """FrameRetinad's window, on the real NR206 validation labels given rows of background above and below (a
    deeper scan; the retina at the top or the bottom of it; a retina curved across the B-scan): the rows kept put
    the retina at the learnt median share of them, or nearer where a curved retina needs more, and hold every
    column's retina with half its height to spare. A retina at a learnt share, or thicker, is left as it is."""
    from clinseg.transforms.oct import FrameRetinad, retina_height_fraction, retina_rows

    root = shared_path("oct", "NR206_sample")
    learnt = nr206_learnt_retina_heights(root)
    framing = FrameRetinad("image", learnt=learnt)
    classes = [str(i) for i in range(9)]
    for decoded in decode("oct_layers", load_oct_datalist(root, "val"), label_colors=NR206_COLORS, class_names=classes):
        label = np.where(decoded["label"][0] == 255, 0, decoded["label"][0]).astype(np.int64)
        height = float(np.median(np.subtract(*retina_rows(label)[::-1]) + 1))
        whole = (0, label.shape[0])
        assert framing.window(*retina_rows(label), whole, whole) is None, "at the learnt share: kept whole"
        rows = np.flatnonzero((label > 0).any(axis=1))
        tight = label[rows[0] - 5 : rows[-1] + 6]
        whole = (0, tight.shape[0])
        assert framing.window(*retina_rows(tight), whole, whole) is None, "thicker: left to the check"
        curved = np.stack([np.roll(label[:, c], int(1.5 * height * (2 * c / label.shape[1] - 1) ** 2)) for c in
                           range(label.shape[1])], axis=1)  # fmt: skip
        for scan, above, below in ((label, 250, 250), (label, 700, 80), (label, 0, 900), (curved, 400, 400)):
            deeper = np.pad(scan, ((above, below), (0, 0)))
            top, bottom = retina_rows(deeper)
            first, last = framing.window(top, bottom, (0, deeper.shape[0]), (0, deeper.shape[0]))
            framed = deeper[first:last]
            assert (framed > 0).sum() == (deeper > 0).sum(), "every column's retina inside the window"
            assert top.min() - first >= height / 2 - 1 or first == 0
            assert last - 1 - bottom.max() >= height / 2 - 1 or last == deeper.shape[0]
            share = retina_height_fraction(framed)
            if scan is label:
                assert share == pytest.approx(learnt["median"], abs=0.01), (above, below)
            else:  # the curve spans more rows than the learnt framing: the window widens to hold it
                assert retina_height_fraction(deeper) < share < learnt["median"]


def test_an_ensemble_is_checked_against_the_range_of_all_its_members(tmp_path, caplog):
    """Each member's model.json records its own training labels' range: the ensemble accepts what any member
    learnt (the smallest minimum, the largest maximum). A member without the record (a training checkpoint, a model
    from before the record was kept) leaves the ensemble unchecked, and the log says so."""
    import torch

    from clinseg.pipelines.engine.ensembles import training_label_range
    from clinseg.pipelines.runs import write_run_record

    members = []
    for fold, (low, median, high) in enumerate(((0.2, 0.25, 0.3), (0.22, 0.28, 0.35))):
        models = tmp_path / f"fold{fold}" / "models"
        models.mkdir(parents=True)
        torch.save({"weight": torch.full((2,), float(fold))}, models / "model.pt")
        retina = {"min": low, "median": median, "max": high, "cases": 4}
        write_run_record(models, {"training_labels": {"retina_height": retina}})
        members.append(str(models / "model.pt"))
    assert training_label_range(members[0], "retina_height") == {"min": 0.2, "median": 0.25, "max": 0.3, "cases": 4}
    combined = training_label_range(members, "retina_height")
    assert combined == {"min": 0.2, "median": pytest.approx(0.265), "max": 0.35, "cases": 8}
    checkpoint = tmp_path / "fold0" / "checkpoint.pt"
    checkpoint.write_bytes((tmp_path / "fold0" / "models" / "model.pt").read_bytes())
    with caplog.at_level("INFO"):
        assert training_label_range([members[1], str(checkpoint)], "retina_height") is None
    assert f"{checkpoint}: its model.json records no retina_height of its training labels" in caplog.text
