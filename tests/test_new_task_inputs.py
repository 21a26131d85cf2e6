"""``python -m clinseg.pipelines.new_task`` on a user's own data folder: the task's data is read as its training will
read it before the bundle is written, so labels that do not hold the listed classes, values outside them, a folder
without labels or a wrong argument are one line naming the problem and leave no bundle behind; label maps as
indices, palette PNGs or colours with a colour table, class names with spaces or other alphabets, and unannotated
pixels give a bundle that names its own classes and segments its own images."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from clinseg.pipelines.new_task import main
from tests.conftest import REPO_ROOT

COLOURS = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
FLUID = "background,intraretinal fluid,SRF,PED"


def write_label_maps(root, n_classes: int = 4, n_images: int = 6, label_dir: str = "labels", suffix: str = ""):
    """Grey images of 48 x 48 pixels with a disc of each class 1..n_classes-1, and their label maps (0..n-1) in
    ``images/`` + ``label_dir/``; returns the label maps."""
    rng = np.random.default_rng(n_classes)
    yy, xx = np.mgrid[:48, :48]
    labels = []
    for i in range(n_images):
        label = np.zeros((48, 48), np.uint8)
        for value in range(1, n_classes):
            cy, cx = rng.integers(8, 40, 2)
            label[(yy - cy) ** 2 + (xx - cx) ** 2 <= 25] = value
        image = (rng.normal(60, 10, label.shape) + 40.0 * label).clip(0, 255).astype(np.uint8)
        for folder in ("images", label_dir):
            (root / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(root / "images" / f"scan{i}.png")
        Image.fromarray(label).save(root / label_dir / f"scan{i}{suffix}.png")
        labels.append(label)
    return labels


def create(capsys, *args: str) -> tuple[int, str, str]:
    status = main(list(args))
    out, err = capsys.readouterr()
    return status, out, err


def assert_refused(capsys, bundles, problem: str, *args: str) -> None:
    status, _, err = create(capsys, *args, "--bundles_dir", str(bundles))
    assert status == 1 and problem in err, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not bundles.exists() or not any(bundles.iterdir()), "a refused task leaves nothing behind"


def test_labels_that_do_not_hold_the_listed_classes_are_refused(tmp_path, capsys):
    """Three classes in the labels but four listed (PED in none of them: a model with a channel never trained), six
    classes in the labels but four listed, and a 16-bit label value beyond any class: each refused naming the class
    or the file, before a bundle exists."""
    three, six, wide = tmp_path / "three", tmp_path / "six", tmp_path / "wide"
    write_label_maps(three, n_classes=3)
    write_label_maps(six, n_classes=6)
    labels = write_label_maps(wide)
    sixteen_bit = labels[0].astype(np.uint16)
    sixteen_bit[0, 0] = 300
    Image.fromarray(sixteen_bit).save(wide / "labels" / "scan0.png")
    bundles = tmp_path / "bundles"
    assert_refused(capsys, bundles, "3 PED (label value) appears in none of the 6 labels", "fluid", "--from",
                   "oct_layers", "--classes", FLUID, "--dataset_dir", str(three))  # fmt: skip
    assert_refused(capsys, bundles, f"{six / 'labels' / 'scan0.png'}: label values [4, 5] are not among the classes",
                   "fluid", "--from", "oct_layers", "--classes", FLUID, "--dataset_dir", str(six))  # fmt: skip
    assert_refused(capsys, bundles, f"{wide / 'labels' / 'scan0.png'}: holds label value 300", "fluid", "--from",
                   "oct_layers", "--classes", FLUID, "--dataset_dir", str(wide))  # fmt: skip


def test_a_data_folder_without_usable_labels_is_refused(tmp_path, capsys):
    """No labels at all, labels in a folder of another name, labels of another suffix, multi-class masks for the
    binary template: refused naming the folder or the file."""
    bundles = tmp_path / "bundles"
    no_labels = tmp_path / "no_labels"
    write_label_maps(no_labels)
    shutil.rmtree(no_labels / "labels")
    status, _, err = create(capsys, "fluid", "--from", "oct_layers", "--classes", FLUID, "--dataset_dir",
                            str(no_labels), "--bundles_dir", str(bundles))  # fmt: skip
    assert status == 1 and err.startswith(f"error: {no_labels}: holds no usable oct data"), err
    suffixed = tmp_path / "suffixed"
    write_label_maps(suffixed, suffix="_segmentation")
    assert_refused(capsys, bundles, f"{suffixed / 'images' / 'scan0.png'}: has no label", "fluid", "--from",
                   "oct_layers", "--classes", FLUID, "--dataset_dir", str(suffixed))  # fmt: skip
    multi_class_masks = tmp_path / "masks"
    write_label_maps(multi_class_masks, n_classes=3, label_dir="masks")
    not_binary = f"{multi_class_masks / 'masks' / 'scan0.png'}: is not a binary mask"
    assert_refused(capsys, bundles, not_binary, "spots", "--from", "vessels", "--classes", "background,spot",
                   "--dataset_dir", str(multi_class_masks))  # fmt: skip
    assert not bundles.exists() or not any(bundles.iterdir())


def test_wrong_arguments_are_one_line_and_write_nothing(tmp_path, capsys):
    bundles = tmp_path / "bundles"
    for problem, args in [
        ("is the name of the project's bundle", ["vessels", "--from", "vessels"]),
        ("'background' is label value 0, so it comes first", ["spots", "--from", "vessels", "--classes",
                                                               "spot,background"]),
        ("would be recorded in MLflow under one name ('IRF _a_')", ["fluid", "--from", "oct_layers", "--classes",
                                                                   "background,IRF (a),IRF [a],c,d,e,f,g"]),
        ("none empty", ["fluid", "--from", "oct_layers", "--classes", "background,,b,c,d,e,f,g"]),
        ("the oct_layers template reads grey images", ["fluid", "--from", "oct_layers", "--channels", "rgb"]),
        ("--channels colour: choose one of", ["spots", "--from", "vessels", "--channels", "colour"]),
        ("3 colours for 4 classes", ["fluid", "--from", "oct_layers", "--classes", FLUID, "--dataset_dir",
                                     str(tmp_path), "--label_colors", "[[0,0,0],[255,0,0],[0,255,0]]"]),
        ("repeats a colour", ["fluid", "--from", "oct_layers", "--classes", FLUID, "--dataset_dir", str(tmp_path),
                              "--label_colors", "[[0,0,0],[255,0,0],[0,255,0],[0,255,0]]"]),
        ("3 values for 4 classes", ["fluid", "--from", "oct_layers", "--classes", FLUID, "--dataset_dir",
                                    str(tmp_path), "--label_values", "[0,50,100]"]),
        ("the vessels template reads binary masks", ["spots", "--from", "vessels", "--label_values", "[0,255]"]),
        ("give a JSON list of label values", ["fluid", "--from", "oct_layers", "--label_values", "0,50"]),
    ]:  # fmt: skip
        assert_refused(capsys, bundles, problem, *args)


def test_colour_labels_with_a_colour_table(tmp_path, capsys):
    """Colour-coded labels read through ``--label_colors``: the table goes into training and inference (which draws
    with it); a colour label without a table, or a colour the table lacks, is refused naming the file."""
    data = tmp_path / "colour"
    for i, label in enumerate(write_label_maps(data)):
        Image.fromarray(COLOURS[label]).save(data / "labels" / f"scan{i}.png")
    bundles = tmp_path / "bundles"
    table = json.dumps(COLOURS.tolist())
    common = ["fluid", "--from", "oct_layers", "--classes", FLUID, "--dataset_dir", str(data)]
    assert_refused(capsys, bundles, f"{data / 'labels' / 'scan0.png'}: is a colour-coded label", *common)
    other = json.dumps([*COLOURS.tolist()[:3], [255, 255, 0]])
    assert_refused(capsys, bundles, "unknown label colour", *common, "--label_colors", other)
    status, out, err = create(capsys, *common, "--label_colors", table, "--bundles_dir", str(bundles))
    assert status == 0, err
    for name in ("train.json", "inference.json"):
        config = json.loads((bundles / "fluid" / "configs" / name).read_text())
        assert config["label_colors"] == COLOURS.tolist() and config["palette"] == "@label_colors"


def test_grey_level_labels_mapped_to_classes(tmp_path, capsys):
    """Label maps saved with grey levels 0, 50, 100, 150 for visibility: refused naming the file and its values,
    then read through ``--label_values``, which training's own loading applies (each class's pixels counted from
    the mapped labels); a table of other values is refused naming the file."""
    data = tmp_path / "grey"
    labels = write_label_maps(data)
    for i, label in enumerate(labels):
        Image.fromarray((label * 50).astype(np.uint8)).save(data / "labels" / f"scan{i}.png")
    bundles = tmp_path / "bundles"
    common = ["fluid", "--from", "oct_layers", "--classes", FLUID, "--dataset_dir", str(data)]
    assert_refused(capsys, bundles, "label values [50, 100, 150] are not among the classes", *common)
    assert_refused(capsys, bundles, "label values [150] are not among the classes", *common, "--label_values",
                   "[0,50,100,200]")  # fmt: skip
    status, out, err = create(capsys, *common, "--label_values", "[0,50,100,150]", "--bundles_dir", str(bundles))
    assert status == 0, err
    expected = np.bincount(np.concatenate([label.ravel() for label in labels]), minlength=4)
    for index, name in enumerate(FLUID.split(",")):
        assert f"  {index} {name}: {expected[index]} (" in out, out
    train = json.loads((bundles / "fluid" / "configs" / "train.json").read_text())
    assert train["label_values"] == {"0": 0, "50": 1, "100": 2, "150": 3}


def test_palette_labels_unicode_names_and_unannotated_pixels(tmp_path, capsys, monkeypatch):
    """Palette PNG label maps named ``<image>_mask.png``, with an unannotated band (255), classes named with spaces
    and another alphabet, the data folder given relative to the working folder: the bundle is written with the
    folder's absolute path, names its classes in its metadata, prints each class's annotated pixels, and infers on
    the task's images by default."""
    data = tmp_path / "data" / "palette"
    for i, label in enumerate(write_label_maps(data, suffix="_mask")):
        label[:4] = 255
        palette = Image.fromarray(label, "P")
        palette.putpalette(COLOURS.ravel().tolist() + [255, 255, 255] * 252)
        palette.save(data / "labels" / f"scan{i}_mask.png")
    monkeypatch.chdir(tmp_path)
    bundles = tmp_path / "bundles"
    classes = "background,Flüssigkeit unter der Netzhaut,漿液性剥離,PED"
    status, out, err = create(capsys, "fluid", "--from", "oct_layers", "--classes", classes, "--dataset_dir",
                              os.path.join("data", "palette"), "--bundles_dir", str(bundles))  # fmt: skip
    assert status == 0, err
    assert "1 Flüssigkeit unter der Netzhaut:" in out and "2 漿液性剥離:" in out, out
    configs = bundles / "fluid" / "configs"
    train = json.loads((configs / "train.json").read_text())
    assert train["dataset_dir"] == str(data), "a relative folder would move with the folder a run starts in"
    assert train["class_names"] == classes.split(",")
    metadata = json.loads((configs / "metadata.json").read_text())
    assert metadata["network_data_format"]["outputs"]["pred"]["channel_def"]["2"] == "漿液性剥離"
    assert str(data) in metadata["data_source"]
    from monai.bundle import ConfigParser

    inference = ConfigParser()
    inference.read_config(str(configs / "inference.json"))
    assert inference.get_parsed_content("input_dir") == str(data / "images")


def test_a_multi_class_bundle_trains_evaluates_and_infers_from_another_folder(tmp_path, capsys, tracking_uri):
    """The bundle of colour labels passes the Zoo's metadata check, and trains, evaluates and infers with
    ``--bundle_root`` from another folder, its metrics and results named by its own classes."""
    data = tmp_path / "colour"
    for i, label in enumerate(write_label_maps(data)):
        Image.fromarray(COLOURS[label]).save(data / "labels" / f"scan{i}.png")
    bundles = tmp_path / "bundles"
    status, _, err = create(capsys, "fluid", "--from", "oct_layers", "--classes", FLUID, "--dataset_dir", str(data),
                            "--label_colors", json.dumps(COLOURS.tolist()), "--bundles_dir", str(bundles))  # fmt: skip
    assert status == 0, err
    bundle = bundles / "fluid"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def bundle_command(*args: str):
        return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=elsewhere, capture_output=True,
                              text=True, timeout=600)  # fmt: skip

    schema = REPO_ROOT / "tests" / "data" / "model_zoo" / "meta_schema_20220324.json"
    verified = bundle_command("verify_metadata", "--meta_file", str(bundle / "configs" / "metadata.json"),
                              "--filepath", str(schema))  # fmt: skip
    assert "metadata is verified with no error" in verified.stdout + verified.stderr, verified.stderr[-2000:]
    tiny = ["--bundle_root", str(bundle), "--image_size", "[32,32]", "--network_def#channels", "[8,16]",
            "--network_def#strides", "[2]"]  # fmt: skip
    train = [str(bundle / "configs" / "train.json")]
    trained = bundle_command("run", "training", "--config_file", train[0], *tiny, "--train#trainer#max_epochs", "1")
    assert trained.returncode == 0, trained.stderr[-4000:]
    evaluated = bundle_command("run", "evaluating", "--config_file", str([*train, str(bundle / "configs" /
                               "evaluate.json")]), *tiny)  # fmt: skip
    assert evaluated.returncode == 0, evaluated.stderr[-4000:]
    for metrics in bundle.glob("outputs/*/metrics.json"):
        per_class = json.loads(metrics.read_text())["per_class"]["val_mean_dice"]
        assert sorted(per_class) == sorted(FLUID.split(",")[1:]), (metrics, per_class)
    assert len(list(bundle.glob("outputs/*/metrics.json"))) == 2
    # an image of the task's kind with dark bands (a scanner's frame): the template's OCT B-scan checks are not the
    # task's, so it is segmented, and its summary names the task's classes
    padded = tmp_path / "padded"
    padded.mkdir()
    image = np.array(Image.open(data / "images" / "scan0.png"))
    image[:12] = image[-12:] = 0
    Image.fromarray(image).save(padded / "scan0.png")
    out = tmp_path / "predictions"
    inferred = bundle_command("run", "inferring", "--config_file", str(bundle / "configs" / "inference.json"), *tiny,
                              "--input_dir", str(padded), "--output_dir", str(out))  # fmt: skip
    assert inferred.returncode == 0, inferred.stderr[-4000:]
    summary = json.loads((out / "scan0.json").read_text())
    assert set(summary["area_fraction"]) <= set(FLUID.split(",")), summary
    # the classes are not layers (layer_order is off): no layer thickness, in the summaries or the metrics
    assert "mean_thickness_px" not in summary, summary
    for metrics in bundle.glob("outputs/*/metrics.json"):
        assert "val_thickness_mae_px" not in json.loads(metrics.read_text()), metrics
    assert not any(elsewhere.iterdir()), "nothing is written into the folder the commands run from"


@pytest.mark.parametrize("template", ["vessels", "oct_layers"])
def test_the_template_phantom_still_needs_no_data_folder(tmp_path, capsys, template):
    status, out, err = create(capsys, "demo_task", "--from", template, "--bundles_dir", str(tmp_path))
    assert status == 0 and "wrote" in out, err
