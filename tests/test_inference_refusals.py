"""An inference over a folder goes on past the inputs it refuses: each is named in one log line and listed under
``refused`` in the summary, every other input is segmented, and the run then ends with exit status 1. Real
``python -m monai.bundle run inferring`` runs of the vessels bundle; the other bundles' refusals are in
``tests/test_bad_inputs.py`` (a damaged file while read) and ``tests/test_oct_bundle.py`` (a prediction out of
layer order)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.test_inference_outputs import error_line, infer
from tests.test_write_errors import inference_bundle, write_photos

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")  # our own, trusted configs
DAMAGED = b"\x89PNG\r\n\x1a\n not a whole image"


def write_bscan_like(path: Path) -> Path:
    """A grey image of horizontal bands (an OCT B-scan's layers): refused by the vessels bundle as no red-free
    fundus photograph, once read (not from its header)."""
    rows = (np.sin(np.arange(200) / 3) * 100 + 128).astype(np.uint8)
    Image.fromarray(np.repeat(rows[:, None], 300, axis=1)).save(path)
    return path


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_folder_is_segmented_but_for_the_inputs_it_refuses_and_the_run_then_fails(tmp_path, num_workers):
    """A damaged file (refused while the folder is listed) and an image of another modality (refused once read,
    in a loader worker with ``num_workers`` 2) among three photographs: the three are written, each refusal is
    named in a log line and in the summary's ``refused``, and the run ends with one error line naming the
    summary."""
    root, inputs = inference_bundle(tmp_path / "bundle"), write_photos(tmp_path / "inputs", n=3)
    damaged = inputs / "a_damaged.png"
    damaged.write_bytes(DAMAGED)
    bscan = write_bscan_like(inputs / "f1_bscan.png")
    out = tmp_path / "results"
    result = infer(root, inputs, out, check=False, num_workers=num_workers)

    line = error_line(result)
    assert line == (
        f"error: {out / 'inference_summary.json'}: 2 inputs were refused and not segmented (each named above, and "
        "under 'refused' here): a_damaged.png, f1_bscan.png; written: 3."
    ), line
    for path in (damaged, bscan):  # in the run's log
        assert f"refused {path}: " in result.stdout + result.stderr, result.stdout[-3000:]
    assert "wrote 3 of 5 " in result.stdout and "REFUSED 2 (see 'refused'): a_damaged.png, f1_bscan.png" in (
        result.stdout
    )
    summary = json.loads((out / "inference_summary.json").read_text())
    assert [case["id"] for case in summary["cases"]] == ["f0", "f1", "f2"] and summary["n_inputs"] == 5
    refused = {item["source"]: item["problem"] for item in summary["refused"]}
    assert refused[str(damaged)].startswith(f"{damaged}: cannot be read as an image")
    assert refused[str(bscan)].startswith(f"{bscan}: is a grey image that does not look like a red-free")
    assert not summary["not_written"]
    for case in ("f0", "f1", "f2"):
        assert Image.open(out / f"{case}_seg.png").size == (64, 64)
    assert not list(out.glob("a_damaged*")) and not list(out.glob("f1_bscan*")), "nothing of a refused input"


def test_asked_to_stop_at_the_first_refusal_it_writes_nothing(tmp_path):
    """``--skip_refused False``: the first refused input (the damaged file, found while the folder is listed) ends
    the run with its own error, before anything is written; so does an input refused once read."""
    root, inputs = inference_bundle(tmp_path / "bundle"), write_photos(tmp_path / "inputs", n=2)
    (inputs / "a_damaged.png").write_bytes(DAMAGED)
    out = tmp_path / "results"
    line = error_line(infer(root, inputs, out, check=False, skip_refused=False))
    assert line.startswith(f"error: {inputs / 'a_damaged.png'}: cannot be read as an image"), line
    assert not out.exists()

    (inputs / "a_damaged.png").unlink()
    bscan = write_bscan_like(inputs / "a_bscan.png")
    line = error_line(infer(root, inputs, out, check=False, skip_refused=False))
    assert line.startswith(f"error: {bscan}: is a grey image that does not look like a red-free"), line
    assert not out.exists()


def test_going_on_past_refusals_reads_one_input_at_a_time(tmp_path):
    """Inputs of different keys (a refusal, a photograph) do not collate into one batch: a larger batch is refused
    naming the key, unless refusals end the run."""
    root, inputs = inference_bundle(tmp_path / "bundle"), write_photos(tmp_path / "inputs", n=2)
    line = error_line(infer(root, inputs, tmp_path / "results", check=False, **{"dataloader#batch_size": 2}))
    assert line.startswith("error: config key 'dataloader#batch_size': is 2;"), line
    infer(root, inputs, tmp_path / "results", **{"dataloader#batch_size": 2, "skip_refused": False})
    assert len(list((tmp_path / "results").glob("*_seg.png"))) == 2
