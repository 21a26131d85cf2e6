"""A new 2D task from a template (``python -m clinseg.pipelines.new_task``): the bundle it writes trains and infers
on a tiny generated images/masks set, as written, with only the task's facts changed from the template."""

from __future__ import annotations

import difflib
import json
import shlex
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO_ROOT, run_bundle

TINY = {
    "patch_size": "[32,32]",
    "sw_roi_size": "[64,64]",
    "network_def#channels": "[8,16,32]",
    "network_def#strides": "[2,2]",
}


def new_task(*args: str):
    return subprocess.run(
        [sys.executable, "-m", "clinseg.pipelines.new_task", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def lesion_images(tmp_path_factory):
    """Six 64 x 64 colour photographs, each with a bright disc, and its binary mask (0/255), in images/ + masks/."""
    root = tmp_path_factory.mktemp("lesions")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    for i in range(6):
        cy, cx, r = rng.integers(20, 44), rng.integers(20, 44), rng.integers(6, 12)
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
        photo = rng.normal(90, 12, (64, 64, 3)) + disc[..., None] * np.array([90, 40, 20])
        for folder, array in (("images", photo.clip(0, 255).astype(np.uint8)), ("masks", disc.astype(np.uint8) * 255)):
            (root / folder).mkdir(exist_ok=True)
            Image.fromarray(array).save(root / folder / f"case{i}.png")
    return root


def changed_config_lines(new_bundle, template: str) -> int:
    """Lines of the new bundle's configs (metadata aside) that differ from the template's."""
    changed = 0
    for path in sorted((new_bundle / "configs").glob("*.json")):
        if path.name == "metadata.json":
            continue
        before = (REPO_ROOT / "bundles" / template / "configs" / path.name).read_text().splitlines()
        after = path.read_text().splitlines()
        changed += sum(1 for line in difflib.ndiff(before, after) if line.startswith("+ "))
    return changed


def test_a_new_binary_task_trains_and_infers(tmp_path, lesion_images, tracking_uri):
    """An RGB task written outside the project's ``bundles/``: its metadata declares the three channels its network
    takes (the Zoo's shape check passes), and the training command it prints, run from another folder, trains into
    that bundle."""
    bundles = tmp_path / "my bundles"
    result = new_task(
        "lesions",
        "--from",
        "vessels",
        "--classes",
        "background,lesion",
        "--channels",
        "rgb",
        "--dataset_dir",
        str(lesion_images),
        "--bundles_dir",
        str(bundles),
    )
    assert result.returncode == 0, result.stderr
    bundle = bundles / "lesions"
    train = json.loads((bundle / "configs" / "train.json").read_text())
    assert train["bundle_name"] == "lesions" and train["class_names"] == ["background", "lesion"]
    assert train["channels"] == "rgb" and train["dataset_dir"] == str(lesion_images)
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "background", "1": "lesion"}
    image = metadata["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 3 and len(image["channel_def"]) == 3, image
    shape_check = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_net_in_out", "--net_id", "network_def",
         "--meta_file", str(bundle / "configs" / "metadata.json"),
         "--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert "data shape of network is verified with no error" in shape_check.stdout + shape_check.stderr, (
        shape_check.stderr[-3000:]
    )
    changed = changed_config_lines(bundle, "vessels")
    print(f"config lines changed from the template: {changed}")
    assert 0 < changed <= 60
    printed = next(line for line in result.stdout.splitlines() if "monai.bundle run training" in line)
    command = [sys.executable if word == "python" else word for word in shlex.split(printed)]
    for key, value in {**TINY, "train#trainer#max_epochs": 1, "val_interval": 1}.items():
        command += [f"--{key}", str(value)]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    trained = subprocess.run(command, cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-4000:]
    assert (bundle / "models" / "model.pt").is_file(), "the printed command trains into the new bundle"
    assert not any(elsewhere.iterdir()), "nothing is written into the folder the command runs from"
    overrides = {"bundle_root": bundle, **TINY}
    out = tmp_path / "predictions"
    run_bundle(
        "inferring",
        [str(bundle / "configs" / "inference.json")],
        {
            **{k: v for k, v in overrides.items() if k != "patch_size"},
            "input_dir": lesion_images / "images",
            "output_dir": out,
        },
    )
    assert sorted(p.name for p in out.glob("*_seg.png")) == [f"case{i}_seg.png" for i in range(6)]


def test_a_multi_class_task_from_the_oct_template_and_refusals(tmp_path):
    bundles = tmp_path / "bundles"
    result = new_task(
        "fluid",
        "--from",
        "oct_layers",
        "--classes",
        "background,IRF,SRF,PED",
        "--bundles_dir",
        str(bundles),
        "--dataset_dir",
        str(tmp_path / "fluid_data"),
    )
    assert result.returncode == 0, result.stderr
    train = json.loads((bundles / "fluid" / "configs" / "train.json").read_text())
    assert train["class_names"] == ["background", "IRF", "SRF", "PED"] and train["label_colors"] is None
    assert "bundles/fluid/configs/train.json" in (bundles / "fluid" / "configs" / "evaluate.json").read_text()
    assert not (bundles / "fluid" / "configs" / "nr206.json").exists(), "the template's data overlays stay behind"
    for args, problem in [
        (["fluid", "--from", "oct_layers"], "exists already"),
        (["Bad-Name", "--from", "vessels"], "a bundle name is"),
        (["spots", "--from", "vessels", "--classes", "background,a,b"], "binary masks"),
        (["cysts", "--from", "oct_layers", "--classes", "background,cyst"], "--dataset_dir: needed"),
    ]:
        refused = new_task(*args, "--bundles_dir", str(bundles))
        assert refused.returncode == 1 and problem in refused.stderr and "Traceback" not in refused.stderr
        assert refused.stderr.count("\n") == 1, refused.stderr
    assert sorted(p.name for p in bundles.iterdir()) == ["fluid"], "a refused task leaves nothing behind"
