"""The nnU-Net side-by-side benchmark's own steps, without nnU-Net: the split handed over in nnU-Net's raw layout,
and one scoring for both tools' prediction files (the benchmark itself runs outside the test suite)."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from clinseg.datasets import fundus
from clinseg.datasets.fundus.phantom import write_drive_layout
from clinseg.pipelines.benchmarks.nnunet_side_by_side import DATASET_NAME, convert, score_folder


def split(tmp_path):
    write_drive_layout(tmp_path / "drive", n_images=4, shape=(64, 60), seed=5)
    folder = str(tmp_path / "drive" / "training")
    return fundus.load_vessel_datalist(folder, "train", val_fraction=0.25), fundus.load_vessel_datalist(
        folder, "val", val_fraction=0.25
    )


def test_the_split_is_handed_to_nnunet_as_its_raw_layout(tmp_path):
    train, validation = split(tmp_path)
    dataset = convert(train, validation, tmp_path / "raw")
    description = json.loads((dataset / "dataset.json").read_text())
    assert dataset.name == DATASET_NAME and description["numTraining"] == len(train) == 3
    assert description["channel_names"] == {"0": "R", "1": "G", "2": "B"} and description["file_ending"] == ".png"
    for item in train:
        image = np.asarray(Image.open(dataset / "imagesTr" / f"DRIVE_{item['id']}_0000.png"))
        label = np.asarray(Image.open(dataset / "labelsTr" / f"DRIVE_{item['id']}.png"))
        reference = np.asarray(Image.open(item["label"]).convert("L")) > 127
        assert image.shape == (*label.shape, 3) and np.array_equal(image, np.asarray(Image.open(item["image"])))
        assert set(np.unique(label)) == {0, 1} and np.array_equal(label == 1, reference)  # 0/1, not 0/255
    assert sorted(p.name for p in (dataset / "imagesTs").iterdir()) == [f"DRIVE_{i['id']}_0000.png" for i in validation]
    assert not (dataset / "labelsTr" / f"DRIVE_{validation[0]['id']}.png").exists()  # validation stays held out


def test_both_tools_files_are_scored_inside_the_field_of_view(tmp_path):
    _, validation = split(tmp_path)
    item = validation[0]
    reference = np.asarray(Image.open(item["label"]).convert("L")) > 127
    field = np.asarray(Image.open(item["fov"]).convert("L")) > 127
    outside = ~field
    # the reference itself, with every pixel outside the field wrong: still perfect inside it
    wrong_outside = reference | outside
    Image.fromarray(wrong_outside.astype(np.uint8)).save(tmp_path / "seg.png")
    probabilities = np.stack([1.0 - wrong_outside, wrong_outside])[:, None].astype(np.float16)
    np.savez(tmp_path / "nnunet.npz", probabilities=probabilities)  # nnU-Net's (classes, 1, H, W)
    Image.fromarray((wrong_outside * 255).astype(np.uint8)).save(tmp_path / "prob.png")  # the bundle's 8-bit map
    for probability in ("nnunet.npz", "prob.png"):
        scored = score_folder([item], {item["id"]: tmp_path / "seg.png"}, {item["id"]: tmp_path / probability})
        assert scored["mean"]["f1"] == 1.0 and scored["mean"]["auc"] == 1.0, (probability, scored)

    # a prediction that misses half the vessels: F1 and sensitivity fall, specificity stays
    missed = reference.copy()
    rows = np.nonzero(reference.any(axis=1))[0]
    missed[rows[len(rows) // 2] :] = False
    Image.fromarray(missed.astype(np.uint8)).save(tmp_path / "half.png")
    scored = score_folder([item], {item["id"]: tmp_path / "half.png"}, {item["id"]: tmp_path / "prob.png"})
    assert 0.3 < scored["mean"]["f1"] < 0.9 and scored["mean"]["sensitivity"] < 0.8
    assert scored["mean"]["specificity"] == 1.0
