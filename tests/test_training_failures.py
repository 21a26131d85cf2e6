"""A training that goes wrong part-way: a loss that diverges stops the run with one line and promotes nothing; a
killed run resumed with other settings or data is refused before it trains (its checkpoint records what it was
started with); a disk-cache entry cut short (a kill or a full disk during its copy) is computed again, and a full
disk under the cache is one line naming the entry."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from clinseg.datasets.errors import DataError
from clinseg.datasets.fundus.phantom import write_drive_layout
from clinseg.datasets.oct.phantom import write_phantom_dataset
from clinseg.pipelines import runs
from tests.conftest import OCT_BUNDLE, REPO_ROOT, new_store, run_bundle, run_models
from tests.test_write_errors import fill, mounts  # noqa: F401 (mounts: a fixture)

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")  # our own, trusted configs
TRAIN = [str(OCT_BUNDLE / "configs" / "train.json")]
TINY = {"image_size": "[32,48]", "network_def#channels": "[4,8]", "network_def#strides": "[2]"}


def one_line_error(result) -> str:
    """The run failed with exit status 1 and one ``error:`` line (a hint may follow it), without a traceback."""
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr[-4000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def non_finite(path: Path) -> list[str]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("model", state)
    return [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]


def test_a_diverging_training_stops_with_one_line_and_promotes_nothing(tmp_path, tiny_oct_dir, tracking_uri):
    """At a learning rate of 1e30 the weights are NaN after the first steps. The run once went on to its last
    epoch, exit 0, and promoted a model.pt of NaNs to the bundle ("no model in place"); every inference with it
    was background."""
    root = tmp_path / "bundle"
    overrides = {**TINY, "bundle_root": root, "dataset_dir": tiny_oct_dir, "learning_rate": 1e30,
                 "train#trainer#max_epochs": 2}  # fmt: skip
    line = one_line_error(run_bundle("training", TRAIN, overrides, check=False))
    assert "'learning_rate'" in line and "diverged at epoch 1" in line and "no longer finite" in line, line
    assert not (root / "models" / "model.pt").exists(), "nothing is promoted"
    for checkpoint in root.glob("outputs/*/models/*.pt"):
        assert not non_finite(checkpoint), f"{checkpoint} holds weights of the diverged network"


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory) -> dict:
    """An oct_layers training SIGKILLed after its epoch-2 checkpoint (of 4), as a killed run leaves it: the latest
    checkpoint (with what the run was started with) and the best model with its model.json."""
    folder = tmp_path_factory.mktemp("killed")
    data = folder / "oct"
    write_phantom_dataset(data, n_subjects=3, n_bscans=4, height=64, width=96, seed=1)
    overrides = {**TINY, "bundle_root": folder / "bundle", "dataset_dir": data, "train#trainer#max_epochs": 4,
                 "tracking_uri": new_store(folder / "mlflow.db")}  # fmt: skip
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(TRAIN)]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list(folder.glob("bundle/outputs/*/models/latest_checkpoint_epoch=[2-9].pt")):
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "no checkpoint of epoch 2 in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    models = run_models(folder / "bundle")
    assert runs.read_record(models) is not None and list(models.glob("latest_checkpoint_epoch=*.pt"))
    return {"folder": folder, "overrides": overrides}


def resume_a_copy(killed_run: dict, tmp_path: Path, **changed):
    """``--resume True`` of a copy of the killed run (each test its own), with ``changed`` overrides."""
    root = tmp_path / "bundle"
    shutil.copytree(killed_run["folder"] / "bundle", root)
    overrides = {**killed_run["overrides"], "bundle_root": root, **changed, "resume": True}
    before = {p: p.read_bytes() for p in run_models(root).iterdir()}
    result = run_bundle("training", TRAIN, overrides, check=False)
    return result, root, before


@pytest.mark.parametrize(
    "key, value, named",
    [("image_size", "[48,64]", "'image_size'"), ("learning_rate", "0.0001", "'learning_rate'"),
     ("weight_average_decay", "0.9", "'weight_average_decay'"),
     ("dataset_dir", "other data", "validated on other data")],
)  # fmt: skip
def test_a_killed_run_resumed_with_other_settings_or_data_is_refused(key, value, named, killed_run, tmp_path):
    """Without a model.json (once written only when a training ended) the resumed run was checked against nothing: it
    went on training the 32 x 48 weights at 48 x 64 (or on other cases, or at the learning rate its restored
    optimizer kept), ranked its validations against a best measured otherwise, and promoted the result recording
    the new values."""
    if key == "dataset_dir":
        value = tmp_path / "other"
        write_phantom_dataset(value, n_subjects=3, n_bscans=4, height=64, width=96, seed=7)
    result, root, before = resume_a_copy(killed_run, tmp_path, **{key: value})
    line = one_line_error(result)
    assert named in line and "latest_checkpoint_epoch=" in line, line
    assert {p: p.read_bytes() for p in run_models(root).iterdir()} == before, "the run's files are as they were"
    assert not (root / "models").exists(), "nothing is promoted"


def test_a_killed_run_resumed_with_fewer_epochs_than_it_has_done_is_one_line(killed_run, tmp_path):
    result, root, before = resume_a_copy(killed_run, tmp_path, **{"train#trainer#max_epochs": 1})
    line = one_line_error(result)
    assert "'train#trainer#max_epochs'" in line and "is 1" in line and "latest_checkpoint_epoch=" in line, line
    assert {p: p.read_bytes() for p in run_models(root).iterdir()} == before


def vessels_dataset(folder: Path, cache_dir: Path):
    write_drive_layout(folder / "drive", n_images=4, shape=(48, 40), seed=1)
    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundles" / "vessels" / "configs" / "train.json"))
    # fov_diameter_px: the phantoms' own disc (about 40 px), so that they stay at their size and an entry fits the
    # small file systems below; at DRIVE's 538 px each would be enlarged 14 times
    parser.update({"dataset_dir": str(folder / "drive"), "cache": "disk", "cache_dir": str(cache_dir),
                   "patch_size": [16, 16], "repeats_per_epoch": 1, "fov_diameter_px": 40})  # fmt: skip
    return parser.get_parsed_content("train#dataset")


def test_a_disk_cache_entry_cut_short_is_computed_again(tmp_path, caplog):
    """MONAI writes an entry in $TMPDIR and moves it into the cache: across file systems that is a copy into the
    entry's name, which a kill or a full disk cuts short. The next run sharing the cache then stopped with torch's
    "failed finding central directory" (or a bare "Invalid argument"), naming no file."""
    dataset = vessels_dataset(tmp_path, tmp_path / "cache")
    for index in range(len(dataset)):
        dataset[index]
    entry = sorted((tmp_path / "cache").glob("*.pt"))[0]
    whole = entry.stat().st_size
    with open(entry, "r+b") as f:
        f.truncate(whole // 2)

    dataset = vessels_dataset(tmp_path, tmp_path / "cache")
    for index in range(len(dataset)):
        assert dataset[index][0]["image"].shape[-2:] == (16, 16)
    assert f"{entry}: the cache entry cannot be read" in caplog.text
    assert entry.stat().st_size == whole, "the entry is written again, whole"
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")], "no temporary file left"


def test_a_full_disk_under_the_cache_names_the_entry_and_leaves_no_part_of_it(tmp_path, mounts):  # noqa: F811
    cache = mounts("tmpfs", tmp_path / "cache", size=64 * 1024)
    dataset = vessels_dataset(tmp_path, cache)
    fill(cache, leave_pages=1)
    with pytest.raises(DataError, match="cannot be written") as error:
        dataset[0]
    assert Path(error.value.path).parent == cache and error.value.path.endswith(".pt")
    assert sorted(p.name for p in cache.iterdir()) == ["filler"], "no partial entry, no temporary file"
    os.remove(cache / "filler")
    assert dataset[0][0]["image"].shape[-2:] == (16, 16)
    assert len(list(cache.glob("*.pt"))) == 1
