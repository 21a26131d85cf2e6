"""The split as a file, on real files written here: a training writes ``split.json`` into its run folder (and MLflow),
and ``split_file`` gives that split back exactly, whatever cases the folder gained meanwhile, or refuses naming the
file and the ids that do not fit. OCT B-scans named by volume stay on one side of the fixed split; images beside a
VIA export that it does not list are named."""

from __future__ import annotations

import json
import logging
import shutil

import mlflow
import numpy as np
import pytest
from monai.bundle import ConfigParser
from PIL import Image

from clinseg.datasets.errors import DataError
from clinseg.datasets.fundus import load_vessel_datalist
from clinseg.datasets.fundus.phantom import write_drive_layout
from clinseg.datasets.layouts import decided_split, write_split
from clinseg.datasets.oct import DUKE_CLASS_NAMES, load_oct_datalist
from tests.conftest import REPO_ROOT, run_bundle, shared_path
from tests.test_write_errors import TINY as TINY_VESSELS_SIZES

CLASSES = list(DUKE_CLASS_NAMES)
VESSELS = REPO_ROOT / "bundles" / "vessels" / "configs"


def ids(items):
    return [item["id"] for item in items]


def add_drive_case(dataset, number, seed=9):
    """Case ``number`` (a photograph of its own, with its manual and FOV mask) added to a DRIVE folder."""
    other = dataset.parent / f"other{number}"
    write_drive_layout(other, n_images=1, shape=(80, 72), seed=seed)
    for folder, name in (
        ("images", "{}_training.tif"),
        ("1st_manual", "{}_manual1.gif"),
        ("mask", "{}_training_mask.gif"),
    ):
        shutil.copy(other / "training" / folder / name.format(21), dataset / "training" / folder / name.format(number))


def write_split_file(path, content):
    path.write_text(json.dumps(content))
    return path


@pytest.fixture()
def drive(tmp_path):
    dataset = tmp_path / "drive"
    write_drive_layout(dataset, n_images=4, shape=(80, 72), seed=2)
    return dataset


def test_a_written_split_survives_a_case_added_to_the_folder(drive, tmp_path):
    assert ids(load_vessel_datalist(drive, "train")) == ["21", "22", "23"]
    assert ids(load_vessel_datalist(drive, "val")) == ["24"]
    split_file = write_split(tmp_path / "split.json", drive)
    assert json.loads(split_file.read_text()) == {"train": ["21", "22", "23"], "val": ["24"]}

    add_drive_case(drive, 20)
    # the fixed split moves: 23, trained on before, is validated on now
    assert ids(load_vessel_datalist(drive, "val")) == ["23", "24"]
    with pytest.raises(DataError) as refused:
        load_vessel_datalist(drive, "train", split_file=split_file)
    assert str(refused.value) == (
        f"{split_file}: assigns 1 cases of the dataset to neither 'train' nor 'val': 20 (added since it was "
        "written?); add each to one of the lists."
    )
    write_split_file(split_file, {"train": ["21", "22", "23", "20"], "val": ["24"]})
    assert ids(load_vessel_datalist(drive, "train", split_file=split_file)) == ["20", "21", "22", "23"]
    assert ids(load_vessel_datalist(drive, "val", split_file=split_file)) == ["24"]
    assert decided_split(drive) == {"train": ["20", "21", "22", "23"], "val": ["24"]}


@pytest.mark.parametrize(
    "content, problem",
    [
        ({"train": ["21", "22"], "val": ["24"]}, "assigns 1 cases of the dataset to neither 'train' nor 'val': 23 "),
        (
            {"train": ["21", "22", "23", "7", "8"], "val": ["24"]},
            "lists 2 ids that are not cases of the dataset: 7, 8.",
        ),
        ({"train": ["21", "22", "23", "24"], "val": ["24"]}, "lists 1 ids in both 'train' and 'val': 24."),
        ({"train": ["21", "22", "23"]}, 'is not a split: expected {"train": [ids], "val": [ids]}'),
        ([{"train": ["21"], "val": ["24"]}], "has no fold 1: it holds 1 (fold 0 to 0)."),
        ("not json", "cannot be read as a split file: Expecting value"),
    ],
)
def test_a_split_file_that_does_not_fit_the_dataset_is_refused_naming_it(drive, tmp_path, content, problem):
    path = tmp_path / "split.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DataError) as refused:
        load_vessel_datalist(drive, "val", split_file=path, fold=1 if isinstance(content, list) else 0)
    message = str(refused.value)
    assert message.startswith(f"{path}: ") and problem in message and "\n" not in message, message


def test_copies_of_one_image_on_both_sides_of_a_split_file_are_refused(drive, tmp_path):
    for folder, name in (
        ("images", "{}_training.tif"),
        ("1st_manual", "{}_manual1.gif"),
        ("mask", "{}_training_mask.gif"),
    ):
        shutil.copy(drive / "training" / folder / name.format(21), drive / "training" / folder / name.format(25))
    path = write_split_file(tmp_path / "split.json", {"train": ["21", "22", "23"], "val": ["24", "25"]})
    with pytest.raises(
        DataError, match=r"split.json: puts copies of one image \(identical files\) on both sides: 21, 25"
    ):
        load_vessel_datalist(drive, "val", split_file=path)


def test_nnunet_folds_pick_the_fold_and_a_single_split_refuses_folds(drive, tmp_path):
    folds = [{"train": ["21", "22"], "val": ["23", "24"]}, {"train": ["23", "24"], "val": ["21", "22"]}]
    path = write_split_file(tmp_path / "splits_final.json", folds)
    assert ids(load_vessel_datalist(drive, "val", split_file=path, fold=1)) == ["21", "22"]
    assert ids(load_vessel_datalist(drive, "train", split_file=path, folds=2, fold=1)) == ["23", "24"]
    with pytest.raises(DataError, match="splits_final.json: holds 2 folds, not the 3 of --folds 3."):
        load_vessel_datalist(drive, "val", split_file=path, folds=3, fold=1)
    single = write_split_file(tmp_path / "split.json", folds[0])
    with pytest.raises(DataError, match="split.json: holds one split, not one per fold"):
        load_vessel_datalist(drive, "val", split_file=single, folds=2, fold=1)


def save_bscans(folder, names, value=None):
    """OCT B-scans (distinct random images) with label maps: ``images/`` + ``labels/``."""
    rng = np.random.default_rng(len(names))
    for name in names:
        for sub, array in (
            ("images", rng.integers(0, 255, (24, 32), dtype=np.uint8)),
            ("labels", np.zeros((24, 32), np.uint8)),
        ):
            (folder / sub).mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(folder / sub / name)


@pytest.mark.parametrize(
    "pattern, last_volume",
    [("vol{v}_bscan{b:03d}.png", "vol5"), ("Subject0{v}_{b:03d}.png", "Subject05"), ("patient{v}-{b}.png", "patient5")],
)
@pytest.mark.parametrize("split", [{"val_fraction": 0.2}, {"folds": 5, "fold": 4}])
def test_bscans_of_one_volume_stay_on_one_side_of_the_split(tmp_path, caplog, pattern, last_volume, split):
    save_bscans(tmp_path, [pattern.format(v=v, b=b) for v in range(1, 6) for b in range(4)])
    with caplog.at_level(logging.INFO):
        train = load_oct_datalist(tmp_path, "train", class_names=CLASSES, **split)
        val = load_oct_datalist(tmp_path, "val", class_names=CLASSES, **split)
    volume = last_volume
    assert {item["volume"] for item in val} == {volume} and len(val) == 4, ids(val)
    assert len(train) == 16 and volume not in {item["volume"] for item in train}
    assert caplog.text.count("20 B-scans split by volume") == 1


def test_one_volume_cut_into_bscans_is_split_by_image_and_says_so(tmp_path, caplog):
    save_bscans(tmp_path, [f"eye_{b:02d}.png" for b in range(5)])
    with caplog.at_level(logging.WARNING):
        val = load_oct_datalist(tmp_path, "val", class_names=CLASSES)
        train = load_oct_datalist(tmp_path, "train", class_names=CLASSES)
    assert ids(val) == ["eye_04"] and ids(train) == ["eye_00", "eye_01", "eye_02", "eye_03"]
    assert caplog.text.count("give 1 volume(s) (eye (5)), too few (or one too large) to split by") == 1


@pytest.mark.parametrize(
    "names",
    [
        [f"{group}_{n:03d}.png" for group in ("AMD", "DME", "NORMAL") for n in range(4)],  # classes, not volumes
        [f"img_{n}.png" for n in range(8)] + [f"other{n}.png" for n in range(5)],  # one group among single images
    ],
    ids=["three-classes", "one-large-group"],
)
def test_names_that_give_too_few_or_lopsided_volumes_are_split_by_image(tmp_path, caplog, names):
    save_bscans(tmp_path, names)
    with caplog.at_level(logging.WARNING):
        val = load_oct_datalist(tmp_path, "val", class_names=CLASSES)
        train = load_oct_datalist(tmp_path, "train", class_names=CLASSES)
    assert sorted(ids(train) + ids(val)) == sorted(name[:-4] for name in names)
    assert all(item["volume"] == item["id"] for item in train + val)
    assert len(val) == int(np.ceil(0.2 * len(names)))  # dealt image by image, not a whole group held out
    assert caplog.text.count("too few (or one too large) to split by") == 1 and "--split_file" in caplog.text


def test_images_named_without_a_bscan_index_keep_the_split_by_image(tmp_path):
    save_bscans(tmp_path, ["NORMAL1.png", "NORMAL2.png", "NORMAL129.png", "NORMAL131.png"])
    assert ids(load_oct_datalist(tmp_path, "val", class_names=CLASSES)) == ["NORMAL2"]


def via_region():
    return {
        "shape_attributes": {"name": "polygon", "all_points_x": [0, 32, 32, 0], "all_points_y": [4, 4, 8, 8]},
        "region_attributes": {"layer": "NFL"},
    }


def test_via_bscans_split_by_volume_and_images_missing_from_the_export_are_named(tmp_path, caplog):
    rng = np.random.default_rng(0)
    names = [f"vol{v}_{b}.png" for v in range(1, 6) for b in range(3)]
    for name in [*names, "extra1.png", "extra2.png"]:
        Image.fromarray(rng.integers(0, 255, (24, 32), dtype=np.uint8)).save(tmp_path / name)
    export = {name: {"filename": name, "regions": [via_region()]} for name in names}
    (tmp_path / "via_project.json").write_text(json.dumps({"_via_img_metadata": export}))
    with caplog.at_level(logging.WARNING):
        val = load_oct_datalist(tmp_path, "val", class_names=CLASSES)
        train = load_oct_datalist(tmp_path, "train", class_names=CLASSES)
    assert ids(val) == ["vol5_0", "vol5_1", "vol5_2"] and len(train) == 12 and "vol5" not in str(ids(train))
    line = "2 images beside the VIA export are not in it (not annotated), left out: extra1.png, extra2.png"
    assert caplog.text.count(line) == 1


def test_a_split_file_deals_the_cases_of_split_folders(tmp_path):
    for side in ("train", "val"):
        for name in ("a.png", "b.png") if side == "train" else ("c.png",):
            for sub in (side, f"{side}_labels"):
                (tmp_path / sub).mkdir(exist_ok=True)
                Image.fromarray(np.full((24, 32), ord(name[0]), np.uint8)).save(tmp_path / sub / name)
    assert ids(load_oct_datalist(tmp_path, "val", class_names=CLASSES)) == ["c"]
    path = write_split_file(tmp_path / "split.json", {"train": ["b", "c"], "val": ["a"]})
    assert ids(load_oct_datalist(tmp_path, "val", class_names=CLASSES, split_file=path)) == ["a"]
    assert ids(load_oct_datalist(tmp_path, "train", class_names=CLASSES, split_file=path)) == ["b", "c"]


def test_the_real_nr206_sample_keeps_its_split():
    shared_path("oct", "NR206_sample")
    parser = ConfigParser()
    parser.read_config(
        [str(REPO_ROOT / "bundles" / "oct_layers" / "configs" / n) for n in ("train.json", "nr206.json")]
    )
    assert ids(parser.get_parsed_content("train#datalist")) == ["NORMAL1", "NORMAL2"]
    assert ids(parser.get_parsed_content("validate#datalist")) == ["NORMAL129", "NORMAL131"]


def test_a_training_writes_its_split_and_the_file_gives_it_back(drive, tmp_path, tracking_uri):
    common = {**TINY_VESSELS_SIZES, "bundle_root": tmp_path / "bundle", "dataset_dir": drive}
    run_bundle("training", [str(VESSELS / "train.json")], {**common, "train#trainer#max_epochs": 1, "val_interval": 1})
    (run_folder,) = (tmp_path / "bundle" / "outputs").iterdir()
    split_file = run_folder / "split.json"
    assert json.loads(split_file.read_text()) == {"train": ["21", "22", "23"], "val": ["24"]}
    client = mlflow.MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("vessels").experiment_id])
    assert "split.json" in [artifact.path for artifact in client.list_artifacts(run.info.run_id)]

    add_drive_case(drive, 20)  # the fixed split would now validate on 23, a case the model was trained on
    given_back = write_split_file(tmp_path / "split.json", {"train": ["20", "21", "22", "23"], "val": ["24"]})
    evaluate = [str(VESSELS / "train.json"), str(VESSELS / "evaluate.json")]
    run_bundle("evaluating", evaluate, {**common, "run_name": "eval-split", "split_file": given_back})
    report = json.loads((tmp_path / "bundle" / "outputs" / "eval-split" / "metrics.json").read_text())
    assert report["n_images"] == 1
    (evaluation,) = client.search_runs([run.info.experiment_id], "tags.workflow = 'evaluate'")
    assert evaluation.data.params["val_ids"] == "24"


def test_ct_heart_configs_take_the_split_file_and_record_only_the_folders_cases(tmp_path):
    import nibabel as nib

    dataset = tmp_path / "ct"
    for value, case in enumerate(("a", "b", "c", "d", "heart_free")):
        for folder, name, dtype in (
            ("imagesTr", f"{case}_0000.nii.gz", np.int16),
            ("labelsTr", f"{case}.nii.gz", np.uint8),
        ):
            (dataset / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(np.full((4, 4, 4), value, dtype), np.eye(4)), dataset / folder / name)
    negative = dataset / "imagesTr" / "heart_free_0000.nii.gz"
    shutil.move(negative, tmp_path / "abdomen.nii.gz")
    (dataset / "labelsTr" / "heart_free.nii.gz").unlink()
    path = write_split_file(tmp_path / "split.json", {"train": ["b", "c", "d"], "val": ["a"]})
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundles" / "ct_heart" / "configs" / "train.json"))
    parser.update(
        {"dataset_dir": str(dataset), "split_file": str(path), "negative_images": [str(tmp_path / "abdomen.nii.gz")]}
    )
    assert ids(parser.get_parsed_content("train#datalist")) == ["b", "c", "d", "heart_free_abdomen"]
    assert ids(parser.get_parsed_content("validate#datalist")) == ["a"]
    assert decided_split(dataset) == {"train": ["b", "c", "d"], "val": ["a"]}
