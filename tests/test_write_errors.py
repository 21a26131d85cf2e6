"""Writes the environment refuses: a full disk (where ``torch.save`` loses the reason), a read-only mount, no
permission, a file where a folder is expected. Every writer raises a DataError naming the final file (never its
hidden temporary file) and the cause; a run ends with one ``error:`` line and exit status 1; the temporary files
are removed, earlier files stay intact, and a case whose write failed leaves none of its files and is not counted.

The full disks are small tmpfs mounts, sized from what the files take; the read-only folder is a read-only bind
mount (both need root, as CI runs). Every mount is undone in the fixture's teardown.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser
from PIL import Image

from clinseg.datasets.errors import DataError
from clinseg.datasets.fundus.phantom import write_drive_layout
from clinseg.datasets.io import atomic_write, atomic_write_all, free_bytes, save_nifti
from clinseg.pipelines import runs
from clinseg.pipelines.engine.handlers.checkpointing import AtomicCheckpointSaver
from clinseg.pipelines.engine.handlers.evaluation import AtomicMetricsSaver
from clinseg.pipelines.engine.writers import SaveSegmentationd, atomic_write_json, save_png
from tests.conftest import REPO_ROOT, prerequisite_missing, run_bundle, where_permissions_apply

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")  # our own, trusted configs
VESSELS = REPO_ROOT / "bundles" / "vessels" / "configs"
TRAIN, INFER = [str(VESSELS / "train.json")], [str(VESSELS / "train.json"), str(VESSELS / "inference.json")]
TINY = {
    "patch_size": "[16,16]",
    "patches_per_image": 1,
    "repeats_per_epoch": 1,
    "sw_roi_size": "[32,32]",
    "network_def#channels": "[4,8]",
    "network_def#strides": "[2]",
}  # fmt: skip
PAGE = os.sysconf("SC_PAGE_SIZE")  # what tmpfs allocates a file's content in


def pages(size: int) -> int:
    return math.ceil(size / PAGE)


@pytest.fixture()
def mounts():
    """``mount("tmpfs", folder, size=N)``: a tmpfs of N bytes on ``folder``; ``mount("read-only", folder,
    source=S)``: S bound read-only onto ``folder``. Where mounting is refused, the test fails as root (a root that
    cannot mount is an environment to fix) and is skipped only for a user; every mount is undone in the teardown."""
    done: list[Path] = []

    def run(command: list[str]) -> None:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            prerequisite_missing(f"mounting is refused ({' '.join(command)}: {result.stderr.strip()})")

    def mount(kind: str, folder: Path, source: Path | None = None, size: int | None = None) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        if kind == "tmpfs":
            run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)])
            done.append(folder)
        else:
            run(["mount", "--bind", str(source), str(folder)])
            done.append(folder)
            run(["mount", "-o", "remount,ro,bind", str(folder)])
        return folder

    yield mount
    for folder in reversed(done):
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path, leave_pages: int) -> None:
    """Fill ``folder``'s file system (a tmpfs) with a filler file until ``leave_pages`` pages are free."""
    free, leave = free_bytes(folder), leave_pages * PAGE
    assert free is not None and free >= leave, (free, leave)
    (folder / "filler").write_bytes(bytes(free - leave))
    assert free_bytes(folder) == leave


def drive_dataset(folder: Path) -> Path:
    write_drive_layout(folder, n_images=4, shape=(40, 36), seed=1)
    return folder


def one_line_error(result) -> str:
    """The run failed with exit status 1 and ``error: ...`` as its one last line of stderr, without a traceback."""
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: "), result.stderr[-3000:]
    assert sum("error:" in line for line in lines) == 1, result.stderr[-3000:]
    return lines[-1]


def named_file(line: str) -> Path:
    return Path(line.removeprefix("error: ").split(": cannot be written: ")[0])


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def hidden(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob(".*")]


def tiny_network():
    parser = ConfigParser()
    parser.read_config(TRAIN)
    for key in ("network_def#channels", "network_def#strides"):
        parser[key] = json.loads(TINY[key])
    return parser.get_parsed_content("network_def")


def checkpoint_sizes(folder: Path) -> tuple[int, int]:
    """What ``model.pt`` and one latest checkpoint of the tiny network take, saved as the savers save them (the
    temporary file's name goes into the archive: it is measured under the same kind of name)."""
    network = tiny_network()
    optimizer = torch.optim.Adam(network.parameters(), lr=0.002, weight_decay=1e-5)
    network(torch.zeros(2, 1, 16, 16)).sum().backward()
    optimizer.step()  # Adam's state exists after the first step
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="max")
    latest = {
        "model": network.state_dict(),
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": scheduler.state_dict(),
        "trainer": {"epoch": 1, "max_epochs": 3, "epoch_length": 2, "iteration": 2},
        "progress": {"best_metric": 0.0, "best_metric_epoch": 1, "best_model_saver": {"saved": [[0.0, "model.pt"]]}},
    }
    sizes = []
    for name, content in (("model.pt", network.state_dict()), ("latest_checkpoint_epoch=1.pt", latest)):
        path = folder / f".tmp{os.getpid()}-{uuid.uuid4().hex[:8]}.{name}"
        torch.save(content, path)
        sizes.append(path.stat().st_size)
        path.unlink()
    return sizes[0], sizes[1]


# ---------------------------------------------------------------- the writers, in this process
def test_torch_save_on_a_full_disk_names_the_checkpoint_and_keeps_the_previous_one(tmp_path, mounts):
    disk = mounts("tmpfs", tmp_path / "disk", size=64 * PAGE)
    network = torch.nn.Linear(64, 64)
    engine = Engine(lambda engine, batch: None)
    saver = AtomicCheckpointSaver(save_dir=str(disk), save_dict={"model": network}, save_final=True,
                                  final_filename="model.pt")  # fmt: skip
    saver.attach(engine)
    engine.run([0], max_epochs=1)
    saved = (disk / "model.pt").read_bytes()
    fill(disk, pages(len(saved)) // 2)  # half a checkpoint free
    with pytest.raises(DataError) as error:
        engine.run([0], max_epochs=2)
    assert isinstance(error.value.__cause__, RuntimeError), "torch.save's own error, which names no file, is kept"
    assert error.value.path == str(disk / "model.pt")
    assert f"cannot be written: no space left on device (0.0 MiB free on {disk})" in str(error.value)
    assert (disk / "model.pt").read_bytes() == saved, "the previous checkpoint is intact"
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "model.pt"], "no temporary file is left"


def test_a_failure_on_a_disk_with_room_is_not_called_a_full_disk(tmp_path):
    def failing_save(path):
        path.write_bytes(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")

    (tmp_path / "model.pt").write_bytes(b"earlier")
    with pytest.raises(RuntimeError, match="unexpected pos"):
        atomic_write(tmp_path / "model.pt", failing_save)
    assert snapshot(tmp_path) == {"model.pt": b"earlier"}


def write_case(writer: SaveSegmentationd, name: str = "f0") -> dict:
    rng = np.random.default_rng(0)
    photo = torch.as_tensor(rng.integers(0, 255, (3, 48, 40)), dtype=torch.uint8)
    probability = torch.as_tensor(rng.random((2, 48, 40)), dtype=torch.float32)
    item = {"pred": probability.argmax(0, keepdim=True), "prob": probability, "photo": photo, "id": name,
            "source": f"/inputs/{name}.png"}  # fmt: skip
    return writer(item)


def saver_of(folder: Path, overwrite: bool = False) -> SaveSegmentationd:
    return SaveSegmentationd(keys="pred", output_dir=str(folder), class_names=["background", "vessel"],
                             prob_key="prob", image_key="photo", overwrite=overwrite)  # fmt: skip


@pytest.mark.parametrize("refusal", ["full disk", "read-only", "file in the way", "folder at the name"])
def test_a_case_whose_write_is_refused_leaves_none_of_its_files_and_is_not_counted(refusal, tmp_path, mounts):
    reference = saver_of(tmp_path / "reference")
    write_case(reference)
    case_pages = sum(pages(p.stat().st_size) for p in (tmp_path / "reference").iterdir())
    if refusal == "full disk":
        out = mounts("tmpfs", tmp_path / "out", size=64 * PAGE)
        (out / "f0_seg.png").write_bytes(b"an earlier result")
        fill(out, case_pages - 1)  # room for all the case's files but one page
        expected = "no space left on device"
    elif refusal == "read-only":
        (tmp_path / "writable").mkdir()
        (tmp_path / "writable" / "f0_seg.png").write_bytes(b"an earlier result")
        out = mounts("read-only", tmp_path / "out", source=tmp_path / "writable")
        expected = f"read-only file system ({out} is mounted read-only)"
    elif refusal == "file in the way":
        (tmp_path / "a_file").write_text("a file where the output folder should be")
        out = tmp_path / "a_file" / "results"
        expected = f"{tmp_path / 'a_file'} is a file, not a folder"
    else:
        out = tmp_path / "out"
        (out / "f0.json").mkdir(parents=True)  # the last file of the case: the others would be written first
        expected = "a folder of that name is in the way"
    before = snapshot(out) if out.is_dir() else {}
    writer = saver_of(out, overwrite=True)  # the earlier result in the folder is to be written over
    with pytest.raises(DataError) as error:
        write_case(writer)
    assert Path(error.value.path).parent == out and Path(error.value.path).name.startswith("f0"), error.value
    assert f"cannot be written: {expected}" in str(error.value), str(error.value)
    assert (snapshot(out) if out.is_dir() else {}) == before, "no file of the case, the earlier ones intact"
    assert not (hidden(out) if out.is_dir() else []), "no temporary file is left"
    assert writer.written == [], "a case whose write failed is not counted as written"


def test_writing_without_permission_names_the_file(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    code = (
        "import sys\nfrom clinseg.datasets.errors import DataError\nfrom clinseg.pipelines.engine.writers import "
        "atomic_write_json\ntry:\n    atomic_write_json(sys.argv[1], {})\nexcept DataError as error:\n"
        "    print(error)\n    sys.exit(0)\nsys.exit('written')\n"
    )
    command = where_permissions_apply([sys.executable, "-c", code, str(folder / "m.json")])
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.strip() == f"{folder / 'm.json'}: cannot be written: permission denied (writing in {folder})."
    assert list(folder.iterdir()) == []


def test_a_failed_rename_puts_the_files_of_the_set_back(tmp_path, monkeypatch):
    for name in ("a.json", "b.json"):
        (tmp_path / name).write_text(f"earlier {name}")
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the second file's rename
            raise PermissionError(errno.EACCES, "Permission denied", str(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(DataError, match="b.json: cannot be written: permission denied"):
        atomic_write_all([(tmp_path / n, lambda tmp, n=n: tmp.write_text(f"new {n}")) for n in ("a.json", "b.json")])
    assert snapshot(tmp_path) == {"a.json": b"earlier a.json", "b.json": b"earlier b.json"}


def test_metric_tables_on_a_full_disk_name_a_table_and_leave_none(tmp_path, mounts):
    disk = mounts("tmpfs", tmp_path / "disk", size=16 * PAGE)
    engine = Engine(lambda engine, batch: None)
    engine.state.metrics = {"val_f1": 0.5}
    engine.state.metric_details = {"val_f1": torch.rand(200, 1)}
    saver = AtomicMetricsSaver(save_dir=str(disk / "eval"), metrics="*", metric_details="*")
    saver._filenames = [f"/inputs/image{index:03d}.png" for index in range(200)]
    fill(disk, 0)
    with pytest.raises(DataError) as error:
        saver(engine)
    assert Path(error.value.path).parent == disk / "eval" and error.value.path.endswith(".csv"), error.value
    assert "no space left on device" in str(error.value)
    assert sorted(p.name for p in disk.rglob("*")) == ["eval", "filler"], "no table, no staging folder left"


def test_png_json_nifti_and_numpy_writers_name_the_final_file(tmp_path, mounts):
    disk = mounts("tmpfs", tmp_path / "disk", size=16 * PAGE)
    fill(disk, 0)
    writes = {
        "a.png": lambda path: save_png(path, np.ones((64, 64), np.uint8)),
        "a.json": lambda path: atomic_write_json(path, {"a": 1}),
        "a.nii.gz": lambda path: save_nifti(path, np.random.default_rng(0).random((16, 16, 16)), np.eye(4)),
        "a.npy": lambda path: atomic_write(path, lambda tmp: np.save(tmp, np.zeros(4096))),
    }
    for name, write in writes.items():
        with pytest.raises(DataError, match=f"{disk / name}: cannot be written: no space left on device"):
            write(disk / name)
    assert sorted(p.name for p in disk.iterdir()) == ["filler"], "no temporary file is left"


# ---------------------------------------------------------------- real runs
def test_training_whose_checkpoint_disk_fills_ends_in_one_line_and_keeps_the_earlier_checkpoints(
    tmp_path, mounts, tracking_uri
):
    dataset = drive_dataset(tmp_path / "data")
    model_size, latest_size = checkpoint_sizes(tmp_path)
    # room for epoch 1 (model.pt and a latest checkpoint) and half a checkpoint more: epoch 2's latest checkpoint,
    # written before epoch 1's is removed, does not fit
    size = (pages(model_size) + pages(latest_size) + pages(latest_size) // 2) * PAGE
    ckpt = mounts("tmpfs", tmp_path / "models", size=size)
    result = run_bundle("training", TRAIN, {**TINY, "bundle_root": tmp_path / "bundle", "ckpt_dir": ckpt,
                                            "dataset_dir": dataset, "cache": "none", "val_interval": 1,
                                            "train#trainer#max_epochs": 3}, check=False)  # fmt: skip
    line = one_line_error(result)
    assert line.startswith(f"error: {ckpt}/") and "cannot be written: no space left on device" in line, line
    assert f"MiB free on {ckpt})." in line, line
    assert not hidden(ckpt), "no temporary file is left"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest_checkpoint_epoch=1.pt", "model.json", "model.pt"]
    # the model kept is described by its own record, written with it
    record = json.loads((ckpt / "model.json").read_text())
    assert record["sha256"] == hashlib.sha256((ckpt / "model.pt").read_bytes()).hexdigest()
    if named_file(line).name != "model.pt":
        assert not named_file(line).exists()
    network = tiny_network()
    network.load_state_dict(torch.load(ckpt / "model.pt", map_location="cpu", weights_only=True))
    latest = torch.load(ckpt / "latest_checkpoint_epoch=1.pt", map_location="cpu", weights_only=False)
    network.load_state_dict(latest["model"])
    assert latest["trainer"]["iteration"] == latest["trainer"]["epoch_length"], "the checkpoint of epoch 1"
    assert {"optimizer", "lr_scheduler", "progress"} <= set(latest)


def write_photos(folder: Path, n: int = 3) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(n):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"f{index}.png")
    return folder


def inference_bundle(root: Path) -> Path:
    (root / "models").mkdir(parents=True)
    torch.save(tiny_network().state_dict(), root / "models" / "model.pt")
    return root


def infer(root: Path, inputs: Path, out: Path, check: bool = False):
    overrides = {k: v for k, v in TINY.items() if k in ("sw_roi_size", "network_def#channels", "network_def#strides")}
    return run_bundle("inferring", INFER, {**overrides, "bundle_root": root, "input_dir": inputs, "output_dir": out},
                      check=check)  # fmt: skip


def test_inference_onto_a_full_disk_leaves_only_whole_cases_and_no_summary(tmp_path, mounts):
    root, inputs = inference_bundle(tmp_path / "bundle"), write_photos(tmp_path / "inputs")
    disk = mounts("tmpfs", tmp_path / "disk", size=256 * PAGE)
    infer(root, inputs, disk / "first", check=True)
    summary = json.loads((disk / "first" / "inference_summary.json").read_text())
    cases = {case["id"]: case["files"] for case in summary["cases"]}
    first = snapshot(disk / "first")
    taken = {case: sum(pages(len(first[name])) for name in files) for case, files in cases.items()}
    fill(disk, taken["f0"] + taken["f1"] // 2)  # room for the first case and half the second
    line = one_line_error(infer(root, inputs, disk / "second"))
    out = disk / "second"
    assert line.startswith(f"error: {out}/f1") and "cannot be written: no space left on device" in line, line
    assert sorted(p.name for p in out.iterdir()) == sorted(cases["f0"]), "only the whole first case, no other file"
    assert snapshot(out) == {name: first[name] for name in cases["f0"]}
    assert not (out / "inference_summary.json").exists(), "an unfinished run counts nothing as written"
    assert snapshot(disk / "first") == first


def test_a_read_only_output_folder_is_named_in_one_line(tmp_path, mounts):
    root, inputs = inference_bundle(tmp_path / "bundle"), write_photos(tmp_path / "inputs", n=1)
    (tmp_path / "writable").mkdir()
    (tmp_path / "writable" / "earlier_seg.png").write_bytes(b"an earlier result")
    out = mounts("read-only", tmp_path / "results", source=tmp_path / "writable")
    line = one_line_error(infer(root, inputs, out))
    assert line.startswith(f"error: {out}: ") and "read-only file system" in line.lower(), line
    assert snapshot(tmp_path / "writable") == {"earlier_seg.png": b"an earlier result"}


def test_a_file_where_the_output_folder_should_be_is_named_in_one_line(tmp_path):
    root, inputs = inference_bundle(tmp_path / "bundle"), write_photos(tmp_path / "inputs", n=1)
    blocker = tmp_path / "results"
    blocker.write_text("a file, not a folder")
    line = one_line_error(infer(root, inputs, blocker))
    assert line.startswith(f"error: {blocker}: "), line
    assert blocker.read_text() == "a file, not a folder"


def test_a_failed_inference_leaves_no_output_folder_it_made_and_keeps_one_it_did_not(tmp_path):
    """A run whose every input is refused (a damaged file) writes nothing: the folders it made for its results (two
    levels here) are gone again, and an empty folder the user made is kept."""
    root, inputs = inference_bundle(tmp_path / "bundle"), tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "damaged.png").write_bytes(b"\x89PNG\r\n\x1a\n not a whole image")
    line = one_line_error(infer(root, inputs, tmp_path / "new" / "results"))
    assert "damaged.png" in line, line
    assert not (tmp_path / "new").exists(), "the folders the failed run made are removed"
    (tmp_path / "mine").mkdir()
    one_line_error(infer(root, inputs, tmp_path / "mine"))
    assert (tmp_path / "mine").is_dir() and not any((tmp_path / "mine").iterdir())


def test_a_file_where_a_training_output_folder_should_be_is_named_mid_run(tmp_path, tracking_uri):
    dataset = drive_dataset(tmp_path / "data")
    out, ckpt = tmp_path / "outputs", tmp_path / "models"
    out.mkdir()
    (out / "overlays").write_text("a file where the validation's overlays folder should be")
    ckpt.mkdir()
    (ckpt / "latest_checkpoint_epoch=3.pt").write_bytes(b"an earlier run's latest checkpoint")
    result = run_bundle("training", TRAIN, {**TINY, "bundle_root": tmp_path / "bundle", "ckpt_dir": ckpt,
                                            "output_dir": out, "dataset_dir": dataset, "cache": "none",
                                            "val_interval": 1, "train#trainer#max_epochs": 1}, check=False)  # fmt: skip
    line = one_line_error(result)
    assert line.startswith(f"error: {out / 'overlays'}/") and line.endswith(
        f": cannot be written: {out / 'overlays'} is a file, not a folder."
    ), line
    assert snapshot(ckpt) == {"latest_checkpoint_epoch=3.pt": b"an earlier run's latest checkpoint"}
    # the run's claim on its folder stays (clinseg.pipelines.runs.claim_run_folder); no temporary file does
    assert not [p for p in hidden(out) if Path(p).name != runs.RUN_LOCK] and not hidden(ckpt)
