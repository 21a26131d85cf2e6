"""The CT anatomy check (``clinseg.transforms.ct_anatomy``): each verdict and each flag on a phantom built to
trigger it, the removal of heart voxels where none can be, and the verdicts on the real CT in ``../shared/data``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from clinseg.datasets.ct.phantom import synthesize_ct
from clinseg.transforms.ct_anatomy import (
    CheckHeartAnatomyd,
    CTFieldOfViewd,
    FieldOfView,
    RemoveHeartOutsideAnatomyd,
    world_coordinates,
)
from tests.conftest import shared_path


def meta(array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    return MetaTensor(torch.as_tensor(array[None]), affine=torch.as_tensor(affine))


def verdict_of(phantom) -> FieldOfView:
    data = CTFieldOfViewd("image")({"image": meta(phantom.hu, phantom.affine)})
    return FieldOfView.from_json(data["anatomy"])


def check(phantom, prediction: np.ndarray, verdict: FieldOfView | None = None) -> tuple[np.ndarray, FieldOfView]:
    """The default post-processing's two anatomy steps on a label-map prediction; the mask left and the verdict."""
    verdict = verdict or verdict_of(phantom)
    data = {"pred": meta(prediction.astype(np.uint8), phantom.affine), "anatomy": verdict.to_json()}
    data = CheckHeartAnatomyd("pred")(RemoveHeartOutsideAnatomyd("pred")(data))
    return data["pred"][0].numpy() > 0, FieldOfView.from_json(data["anatomy"])


def blob(phantom, centre_mm, radius_mm: float) -> np.ndarray:
    distance_sq = sum((world_coordinates(phantom.affine, phantom.hu.shape, a) - centre_mm[a]) ** 2 for a in range(3))
    return distance_sq < radius_mm**2


@pytest.fixture(scope="module")
def chest():
    return synthesize_ct(1, region="chest")


def test_a_chest_phantom_holds_a_whole_heart_and_its_true_mask_passes_untouched(chest):
    verdict = verdict_of(chest)
    assert (verdict.field_of_view, verdict.heart_expected) == ("chest", "whole")
    assert verdict.lung_ml > 800 and verdict.lung_base_z_mm is not None
    kept, after = check(chest, chest.heart > 0)
    assert kept.sum() == (chest.heart > 0).sum(), "a true heart is never removed"
    assert after.flags == [] and after.volume_reportable


@pytest.mark.parametrize("seed", [1, 2])
def test_an_abdominal_field_expects_no_heart_and_a_predicted_one_is_removed(seed):
    abdomen = synthesize_ct(seed, region="abdomen", slice_mm=5.0)
    verdict = verdict_of(abdomen)
    assert verdict.heart_expected in ("none", "partial")  # lung bases may reach the top of the field
    if verdict.heart_expected == "partial":
        assert verdict.field_of_view == "upper_abdomen"
        return
    assert verdict.field_of_view == "abdomen" and not verdict.volume_reportable
    liver_like = blob(abdomen, world_mm(abdomen, (0.5, 0.5, 0.5)), 40.0)
    kept, after = check(abdomen, liver_like)
    assert not kept.any() and "no_heart_expected" in after.flags
    assert after.outside_anatomy_ml["no_heart_expected"] == pytest.approx(
        liver_like.sum() * voxel_ml(abdomen), abs=0.01
    )


def world_mm(phantom, fraction) -> np.ndarray:
    index = (np.array(phantom.hu.shape) - 1) * np.array(fraction)
    return phantom.affine[:3, :3] @ index + phantom.affine[:3, 3]


def voxel_ml(phantom) -> float:
    return float(np.prod(phantom.spacing)) / 1000.0


def test_the_top_of_an_abdominal_scan_is_partial_and_nothing_below_the_diaphragm_is_kept():
    upper = synthesize_ct(1, region="upper_abdomen")
    verdict = verdict_of(upper)
    assert (verdict.field_of_view, verdict.heart_expected) == ("upper_abdomen", "partial")
    assert not verdict.volume_reportable, "a partial heart's volume is not the heart's volume"
    below = blob(upper, world_mm(upper, (0.5, 0.5, 0.5)), 30.0)
    z = world_coordinates(upper.affine, upper.hu.shape, 2)
    below &= z < verdict.lung_base_z_mm - 20
    assert below.any()
    kept, after = check(upper, (upper.heart > 0) | below)
    assert not (kept & below).any() and "below_diaphragm" in after.flags
    assert (kept == (upper.heart > 0) & ~below).all(), "the heart above the diaphragm is kept"
    assert after.outside_anatomy_ml["below_diaphragm"] == pytest.approx(
        (below & ~(upper.heart > 0)).sum() * voxel_ml(upper), abs=0.01
    )


def test_a_long_field_over_chest_and_abdomen_holds_a_whole_heart():
    torso = synthesize_ct(1, region="chest", slab_mm=340.0, field_offset_mm=(0.0, 0.0, -60.0))
    verdict = verdict_of(torso)
    assert (verdict.field_of_view, verdict.heart_expected) == ("chest_abdomen", "whole")
    kept, after = check(torso, torso.heart > 0, verdict)
    assert kept.sum() == (torso.heart > 0).sum() and after.volume_reportable and after.flags == []


def test_five_millimetre_slices_give_the_same_verdicts():
    for region, expected in (("chest", "whole"), ("upper_abdomen", "partial")):
        assert verdict_of(synthesize_ct(1, region=region, slice_mm=5.0)).heart_expected == expected


def test_a_thin_slab_cannot_hold_a_whole_heart():
    slab = synthesize_ct(2, region="chest", slab_mm=60.0)
    verdict = verdict_of(slab)
    assert verdict.heart_expected == "partial" and not verdict.volume_reportable
    assert any("thinner than a heart" in reason for reason in verdict.reasons)


def test_a_heart_cut_by_the_field_of_view_is_partial_and_its_volume_withheld():
    cut = synthesize_ct(3, region="chest", field_offset_mm=(0.0, 0.0, 75.0))
    heart = cut.heart > 0
    assert heart[:, :, 0].any() or heart[:, :, -1].any(), "the phantom's heart reaches a face of the volume"
    verdict = verdict_of(cut)
    _, after = check(cut, heart, verdict)
    assert "cut_by_field_of_view" in after.flags and after.heart_expected == "partial"
    assert not after.volume_reportable


def test_an_implausibly_small_heart_is_flagged(chest):
    tiny = blob(chest, world_mm(chest, (0.5, 0.5, 0.5)), 15.0)  # about 14 mL
    kept, after = check(chest, tiny)
    assert kept.sum() == tiny.sum() and "implausible_volume" in after.flags and not after.volume_reportable


def test_a_heart_beyond_the_lungs_laterally_is_flagged(chest):
    verdict = verdict_of(chest)
    centre = np.argwhere(chest.heart > 0).mean(axis=0)
    heart_x = float((chest.affine @ np.append(centre, 1.0))[0])
    verdict.lung_x_range_mm = [heart_x + 40.0, heart_x + 120.0]  # lungs measured well to one side of it
    _, after = check(chest, chest.heart > 0, verdict)
    assert "outside_lungs_laterally" in after.flags and not after.volume_reportable


def test_a_head_sized_body_without_lungs_is_not_called_an_abdomen():
    head = synthesize_ct(1, region="chest")
    radius = blob(head, world_mm(head, (0.5, 0.5, 0.5)), 85.0)  # a 17 cm water sphere with a bony rim
    head.hu[:] = -1000.0
    head.hu[radius] = 30.0
    head.hu[radius & ~blob(head, world_mm(head, (0.5, 0.5, 0.5)), 78.0)] = 900.0
    verdict = verdict_of(head)
    assert (verdict.field_of_view, verdict.heart_expected) == ("other", "none")
    assert any("not a torso" in reason for reason in verdict.reasons)


def test_no_body_is_an_unknown_field_and_no_volume():
    air = synthesize_ct(1, region="chest")
    air.hu[:] = -1000.0
    verdict = verdict_of(air)
    assert (verdict.field_of_view, verdict.heart_expected, verdict.volume_reportable) == ("unknown", "unknown", False)


def test_the_constraints_can_be_switched_off_and_then_only_flag():
    abdomen = synthesize_ct(2, region="abdomen")
    verdict = verdict_of(abdomen)
    assert verdict.heart_expected == "none"
    prediction = blob(abdomen, world_mm(abdomen, (0.5, 0.5, 0.5)), 30.0)
    data = {"pred": meta(prediction.astype(np.uint8), abdomen.affine), "anatomy": verdict.to_json()}
    data = RemoveHeartOutsideAnatomyd("pred", enabled=False)(data)
    assert (data["pred"][0].numpy() > 0).sum() == prediction.sum()
    after = FieldOfView.from_json(data["anatomy"])
    assert "no_heart_expected" in after.flags and not after.volume_reportable


def test_one_hot_predictions_are_handled_like_label_maps():
    abdomen = synthesize_ct(2, region="abdomen")
    prediction = blob(abdomen, world_mm(abdomen, (0.5, 0.5, 0.5)), 30.0)
    onehot = np.stack([~prediction, prediction]).astype(np.float32)
    data = {"pred": MetaTensor(torch.as_tensor(onehot), affine=torch.as_tensor(abdomen.affine))}
    data["anatomy"] = verdict_of(abdomen).to_json()
    out = RemoveHeartOutsideAnatomyd("pred")(data)["pred"]
    assert out[1].sum() == 0 and out[0].sum() == prediction.size, "removed voxels become background"


def test_a_reference_heart_that_contradicts_the_anatomy_is_named_in_a_warning(caplog):
    abdomen = synthesize_ct(2, region="abdomen")
    label = blob(abdomen, world_mm(abdomen, (0.5, 0.5, 0.5)), 30.0).astype(np.uint8)
    image = meta(abdomen.hu, abdomen.affine)
    image.meta["filename_or_obj"] = "case_017.nii.gz"
    with caplog.at_level(logging.WARNING):
        CTFieldOfViewd("image", label_key="label")({"image": image, "label": meta(label, abdomen.affine)})
    assert "case_017.nii.gz: the reference heart holds" in caplog.text


def test_verdicts_on_the_real_ct():
    """Chest crops: a whole heart, and the reference heart survives the constraints; abdominal CT (DICOM and
    NIfTI): no heart expected."""
    from monai.transforms import Compose, EnsureChannelFirstd, Orientationd, Spacingd

    from clinseg.datasets.ct import LoadCTVolumed
    from clinseg.transforms.ct import AlignToImaged

    folder = shared_path("ct", "totalsegmentator")
    keys = ["image", "label"]
    load = Compose(
        [
            LoadCTVolumed(keys, allow_missing_keys=True),
            EnsureChannelFirstd(keys, allow_missing_keys=True),
            AlignToImaged("label", allow_missing_keys=True),
            Orientationd(keys, axcodes="RAS", allow_missing_keys=True),
            Spacingd(keys, pixdim=(2.0, 2.0, 2.0), mode=["bilinear", "nearest"], allow_missing_keys=True),
            CTFieldOfViewd("image"),
        ]
    )
    heart = folder / "pulmonary_report" / "heart.nii.gz"
    for crop in ("pulmonary_report", "aorta_report"):
        data = load({"image": str(folder / crop / "ct_cropped.nii.gz"), "label": str(heart)})
        verdict = FieldOfView.from_json(data["anatomy"])
        assert (verdict.field_of_view, verdict.heart_expected) == ("chest", "whole"), crop
        reference = data["label"][0].numpy() > 0
        data["pred"] = meta(reference.astype(np.uint8), data["label"].affine.numpy())
        after = CheckHeartAnatomyd("pred")(RemoveHeartOutsideAnatomyd("pred")(data))
        assert (after["pred"][0].numpy() > 0).sum() == reference.sum(), crop
        assert json.loads(after["anatomy"])["volume_reportable"], crop
    for abdominal in ("example_ct_dicom", "example_ct.nii.gz"):
        verdict = FieldOfView.from_json(load({"image": str(folder / abdominal)})["anatomy"])
        assert verdict.heart_expected == "none" and not verdict.volume_reportable, abdominal


def test_heart_free_ct_joins_training_with_an_empty_label_on_its_own_grid(tmp_path):
    """``negative_images`` (real CT without a heart) become training items whose label is all background, on the
    image's grid, through the bundle's own training preprocessing; a missing path names the key."""
    from monai.bundle import ConfigParser
    from monai.data import list_data_collate

    from clinseg.datasets.ct import write_msd_dataset
    from clinseg.datasets.errors import InputError
    from clinseg.datasets.io import save_nifti
    from tests.conftest import REPO_ROOT

    data = write_msd_dataset(tmp_path / "phantoms", n_train=2, n_test=0, voxel_scale=3.0, progress=False)
    abdomen = synthesize_ct(2, region="abdomen", voxel_scale=3.0)
    negative = save_nifti(tmp_path / "abdomen.nii.gz", abdomen.hu.astype(np.int16), abdomen.affine)
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundles" / "ct_heart" / "configs" / "train.json"))
    parser.update({"bundle_root": str(tmp_path / "bundle"), "dataset_dir": str(data), "spacing": [6, 6, 6]})
    parser["negative_images"] = [str(negative)]
    items = parser.get_parsed_content("train#datalist")
    assert [item.get("heart_free", False) for item in items][-1] is True and len(items) == 2
    steps = parser.get_parsed_content("train#preprocessing").transforms
    before_crop = [t for t in steps if type(t).__name__ == "SpatialPadd"][0]
    out, labelled = items[-1], items[0]
    for step in steps[: steps.index(before_crop)]:
        out, labelled = step(out), step(labelled)
    assert set(out) == set(labelled), "every item of a batch has the same keys (the flag is dropped)"
    list_data_collate([{k: v for k, v in item.items() if k not in ("image", "label")} for item in (out, labelled)])
    assert out["label"].shape == out["image"].shape and int(out["label"].sum()) == 0
    assert json.loads(out["anatomy"])["heart_expected"] == "none"
    parser["negative_images"] = [str(tmp_path / "absent.nii.gz")]
    with pytest.raises(Exception) as caught:
        parser.get_parsed_content("train#datalist", lazy=False)
    error = caught.value if isinstance(caught.value, InputError) else caught.value.__cause__
    assert isinstance(error, InputError) and "negative_images" in str(error) and "absent.nii.gz" in str(error)


def test_labelled_real_cases_join_training_and_validation_with_their_label_on_the_image_grid(tmp_path):
    """``extra_training_cases`` (labelled CT beside the phantom folder, as a fine-tuning on real cases adds them)
    join training ``extra_case_repeats`` times under ids of their own, ``extra_validation_cases`` join validation;
    a label on a coarser grid of the same world space is resampled onto the image's by the bundle's loader. Bad
    entries name their key."""
    from monai.bundle import ConfigParser

    from clinseg.datasets.ct import labelled_cases, write_msd_dataset
    from clinseg.datasets.errors import InputError
    from clinseg.datasets.io import save_nifti
    from tests.conftest import REPO_ROOT, decode

    data = write_msd_dataset(tmp_path / "phantoms", n_train=4, n_test=0, voxel_scale=3.0, progress=False)
    chest = synthesize_ct(5, region="chest", voxel_scale=3.0)
    image = save_nifti(tmp_path / "real.nii.gz", chest.hu.astype(np.int16), chest.affine)
    fine = save_nifti(tmp_path / "heart_fine.nii.gz", chest.heart.astype(np.uint8), chest.affine)
    coarse_affine = chest.affine.copy()
    coarse_affine[:3, :3] *= 2  # every second voxel: the same world space on a grid of twice the spacing
    coarse = save_nifti(tmp_path / "heart_coarse.nii.gz", chest.heart[::2, ::2, ::2].astype(np.uint8), coarse_affine)
    case = {"image": str(image), "label": str(coarse), "id": "real_chest"}

    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundles" / "ct_heart" / "configs" / "train.json"))
    parser.update({"bundle_root": str(tmp_path / "bundle"), "dataset_dir": str(data), "extra_case_repeats": 3})
    parser["extra_training_cases"] = [case]
    parser["extra_validation_cases"] = [case]
    train_ids = [item["id"] for item in parser.get_parsed_content("train#datalist")]
    validation_ids = [item["id"] for item in parser.get_parsed_content("validate#datalist")]
    assert train_ids[-3:] == ["real_chest_copy0", "real_chest_copy1", "real_chest_copy2"] and len(train_ids) == 6
    assert validation_ids[-1] == "real_chest" and len(validation_ids) == 2

    on_coarse, on_fine = decode("ct_heart", [case, {**case, "label": str(fine)}])
    assert on_coarse["label"].shape == on_coarse["image"].shape
    a, b = on_coarse["label"] > 0, on_fine["label"] > 0
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.85, "the coarse label lands on the heart"

    with pytest.raises(InputError, match=r"extra_training_cases\[0\]#label: .*absent.nii.gz does not exist"):
        labelled_cases([{**case, "label": str(tmp_path / "absent.nii.gz")}])
    with pytest.raises(InputError, match=r"extra_validation_cases\[1\]: must be"):
        labelled_cases([case, {"image": str(image)}], "extra_validation_cases")
    with pytest.raises(InputError, match="extra_training_cases repeats: must be a whole number"):
        labelled_cases([case], repeats=0)


def test_the_real_ct_overlay_tunes_on_one_chest_crop_and_keeps_the_other_real_ct_out_of_training(tmp_path):
    """``configs/real_ct.json`` fine-tunes the bundle's model on the pulmonary crop (and the abdominal NIfTI as a
    negative); the aorta crop and the abdominal DICOM series, which the real-CT benchmark reports, stay out."""
    from monai.bundle import ConfigParser

    from tests.conftest import REPO_ROOT

    folder = shared_path("ct", "totalsegmentator")
    configs = REPO_ROOT / "bundles" / "ct_heart" / "configs"
    parser = ConfigParser()
    parser.read_config([str(configs / "train.json"), str(configs / "real_ct.json")])
    parser.update({"bundle_root": str(tmp_path / "bundle"), "real_ct_dir": str(folder)})
    sources = [Path(item["source"]).resolve() for item in parser.get_parsed_content("train#datalist")]
    validation = [Path(item["source"]).resolve() for item in parser.get_parsed_content("validate#datalist")]
    crop = (folder / "pulmonary_report" / "ct_cropped.nii.gz").resolve()
    assert sources.count(crop) == parser.get_parsed_content("extra_case_repeats") > 1 and crop in validation
    assert (folder / "example_ct.nii.gz").resolve() in sources
    held_out = [folder / "aorta_report" / "ct_cropped.nii.gz", folder / "example_ct_dicom"]
    assert not {p.resolve() for p in held_out} & set(sources + validation)
    assert parser.get_parsed_content("initial_weights") == parser.get_parsed_content("checkpoint_path")


def crop_around(phantom_hu, heart, affine, margin_mm: float):
    """The volume cut to the heart's bounding box plus ``margin_mm``: a field of view inside the body."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    where = np.argwhere(heart)
    margin = np.ceil(margin_mm / spacing).astype(int)
    low, high = np.maximum(where.min(0) - margin, 0), np.minimum(where.max(0) + margin + 1, heart.shape)
    box = tuple(slice(a, b) for a, b in zip(low, high, strict=True))
    cropped = affine.copy()
    cropped[:3, 3] = affine[:3, :3] @ low + affine[:3, 3]
    return phantom_hu[box], heart[box], cropped


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("margin_mm", [0.0, 3.0])
def test_a_field_inside_the_body_around_the_heart_keeps_the_heart(seed, margin_mm):
    """A crop around the heart shows little lung and no outline of the body: slices without lungs there are not
    abdominal (the lungs may lie just outside the field), so no rule removes the heart. It was removed whole
    ("other", no heart expected) or below lung bases placed too high."""
    chest = synthesize_ct(seed, region="chest")
    hu, heart, affine = crop_around(chest.hu, chest.heart > 0, chest.affine, margin_mm)
    verdict = FieldOfView.from_json(CTFieldOfViewd("image")({"image": meta(hu, affine)})["anatomy"])
    data = {"pred": meta(heart.astype(np.uint8), affine), "anatomy": verdict.to_json()}
    data = CheckHeartAnatomyd("pred")(RemoveHeartOutsideAnatomyd("pred")(data))
    after = FieldOfView.from_json(data["anatomy"])
    assert (data["pred"][0].numpy() > 0).sum() == heart.sum(), (after.field_of_view, after.flags, after.reasons)
    assert after.heart_expected in ("partial", "unknown", "whole")
    if after.field_of_view == "unknown":
        assert not after.volume_reportable and "inside the body" in after.reasons[0]


def test_a_field_inside_the_real_chest_around_its_heart_keeps_the_heart():
    from monai.transforms import Compose, EnsureChannelFirstd

    from clinseg.datasets.ct import LoadCTVolumed
    from clinseg.transforms.ct import AlignToImaged

    folder = shared_path("ct", "totalsegmentator", "pulmonary_report")
    data = Compose(
        [LoadCTVolumed(["image", "label"]), EnsureChannelFirstd(["image", "label"]), AlignToImaged("label")]
    )({"image": str(folder / "ct_cropped.nii.gz"), "label": str(folder / "heart.nii.gz")})
    hu, heart, affine = crop_around(
        data["image"][0].numpy(), data["label"][0].numpy() > 0, data["image"].affine.numpy(), 0.0
    )
    verdict = FieldOfView.from_json(CTFieldOfViewd("image")({"image": meta(hu, affine)})["anatomy"])
    kept, after = check(type("Case", (), {"affine": affine})(), heart, verdict)
    assert kept.sum() == heart.sum(), (after.field_of_view, after.flags, after.reasons)


def pad_outside_circle(hu: np.ndarray, affine: np.ndarray, value: float) -> np.ndarray:
    """``hu`` with ``value`` outside the circle inscribed in each axial slice (in millimetres): a scanner's padding
    outside its reconstruction circle."""
    superior = int(np.argmax(np.abs(affine[2, :3])))
    in_plane = [d for d in range(3) if d != superior]
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    extent = [(hu.shape[d] - 1) * spacing[d] for d in in_plane]
    mm = np.meshgrid(
        *(np.arange(hu.shape[d]) * spacing[d] - e / 2 for d, e in zip(in_plane, extent, strict=True)), indexing="ij"
    )
    outside = np.expand_dims(mm[0] ** 2 + mm[1] ** 2 > (min(extent) / 2) ** 2, superior)
    return np.where(outside, np.float32(value), hu)


def load_field_of_view(path) -> dict:
    """A CT file through the bundle's reader and onto a 2 mm grid, then measured."""
    from monai.transforms import Compose, EnsureChannelFirstd, Orientationd, Spacingd

    from clinseg.datasets.ct import LoadCTVolumed

    load = Compose(
        [
            LoadCTVolumed("image"),
            EnsureChannelFirstd("image"),
            Orientationd("image", axcodes="RAS"),
            Spacingd("image", pixdim=(2.0, 2.0, 2.0), mode="bilinear"),
            CTFieldOfViewd("image"),
        ]
    )
    return load({"image": str(path)})


@pytest.mark.parametrize("value", [0.0, 50.0, -700.0])
def test_padding_of_any_constant_outside_the_reconstruction_circle_reads_as_air(tmp_path, value):
    """A scanner (or a resampling's default fill) that writes 0 HU outside the reconstruction circle made the
    padding a body filling the whole square, with no outline: an abdomen read as ``unknown``, and its lungs were
    searched in the whole square. The padding is found from the data (one constant in the slices' corners) and read
    as air, as -1024 is; the heart checks still remove a heart predicted in an abdomen."""
    from clinseg.datasets.io import save_nifti

    for region, expected in (("abdomen", ("abdomen", "none")), ("chest", ("chest", "whole"))):
        phantom = synthesize_ct(4, region=region, voxel_scale=1.5)
        padded = pad_outside_circle(phantom.hu, phantom.affine, value)
        path = save_nifti(tmp_path / f"{region}.nii.gz", padded.astype(np.int16), phantom.affine)
        data = load_field_of_view(path)
        verdict = FieldOfView.from_json(data["anatomy"])
        assert (verdict.field_of_view, verdict.heart_expected) == expected, (region, verdict.reasons)
        assert verdict.padding_hu == value
    image = data["image"]
    liver_like = np.zeros(image.shape[1:], dtype=np.uint8)
    liver_like[tuple(slice(n // 3, 2 * n // 3) for n in liver_like.shape)] = 1
    abdomen = load_field_of_view(tmp_path / "abdomen.nii.gz")
    abdomen["pred"] = meta(liver_like, abdomen["image"].affine.numpy())
    after = RemoveHeartOutsideAnatomyd("pred")(abdomen)
    assert not after["pred"].any() and "no_heart_expected" in FieldOfView.from_json(after["anatomy"]).flags


def test_real_ct_padded_with_zero_outside_its_reconstruction_circle_keeps_its_verdicts(tmp_path):
    """The real abdominal DICOM series (which pads with -1024) and NIfTI with 0 HU outside the circle: abdomen, no
    heart (the series was read as a chest before, from a ring of lung-like values between air and padding); the real
    chest crops stay chest with a whole heart."""
    from clinseg.datasets.ct.volumes import read_volume
    from clinseg.datasets.io import save_nifti

    folder = shared_path("ct", "totalsegmentator")
    cases = {
        "example_ct_dicom": ("abdomen", "none"),
        "example_ct.nii.gz": ("abdomen", "none"),
        "pulmonary_report/ct_cropped.nii.gz": ("chest", "whole"),
    }
    for name, expected in cases.items():
        hu, affine, _ = read_volume(folder / name)
        padded = pad_outside_circle(hu.astype(np.float32), affine, 0.0)
        path = save_nifti(tmp_path / f"{name.replace('/', '_')}.nii.gz", padded.astype(np.int16), affine)
        verdict = FieldOfView.from_json(load_field_of_view(path)["anatomy"])
        assert (verdict.field_of_view, verdict.heart_expected, verdict.padding_hu) == (*expected, 0.0), (
            name,
            verdict.reasons,
        )
