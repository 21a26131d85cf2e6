"""What inference and evaluation write: a run's results never mix with another run's (an earlier run's in the
output folder, or one started at once into it); a volume is measured by its voxels' true size; the metric tables
hold each metric's values, not the counts it is computed from, each in its case's row; ``metrics.json`` names a
measured best epoch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.handlers import IgniteMetricHandler
from monai.metrics import ConfusionMatrixMetric
from PIL import Image

from clinseg.pipelines.engine.handlers.evaluation import AtomicMetricsSaver
from tests.conftest import run_at_once, run_bundle
from tests.test_write_errors import INFER, TINY, inference_bundle, snapshot, write_photos

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")  # our own, trusted configs
NETWORK = {k: v for k, v in TINY.items() if k in ("sw_roi_size", "network_def#channels", "network_def#strides")}


def infer(root: Path, inputs: Path, out: Path, check: bool = True, **overrides):
    return run_bundle("inferring", INFER, {**NETWORK, "bundle_root": root, "input_dir": inputs, "output_dir": out,
                                           **overrides}, check=check)  # fmt: skip


def error_line(result) -> str:
    """The run failed with exit status 1, without a traceback, and one ``error: ...`` line (its hint follows it)."""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def test_a_rerun_into_a_folder_of_earlier_results_is_refused_unless_asked_and_then_says_what_is_not_its_own(tmp_path):
    """A second inference into the folder of a first, on other inputs, would replace ``f0``'s results and leave
    ``f1``'s and ``f2``'s beside them under a summary that lists only ``f0``: it is refused, naming the folder, and
    the first run's files stay as they were. Asked to (``--results_writer#overwrite True``), it replaces the files of
    the same names and its summary lists the earlier files left in the folder."""
    root = inference_bundle(tmp_path / "bundle")
    first_inputs, out = write_photos(tmp_path / "first"), tmp_path / "results"
    infer(root, first_inputs, out)
    first = snapshot(out)
    assert "f1_seg.png" in first and "inference_summary.json" in first

    second_inputs = tmp_path / "second"
    second_inputs.mkdir()
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(second_inputs / "f0.png")
    line = error_line(infer(root, second_inputs, out, check=False))
    assert line.startswith(f"error: {out}: holds {len(first)} files of an earlier run"), line
    assert snapshot(out) == first, "the earlier run's results are left as they were"

    result = infer(root, second_inputs, out, **{"results_writer#overwrite": True})
    assert "wrote 1 of 1 " in result.stdout and "10 files of an earlier run are also in the folder" in result.stdout
    summary = json.loads((out / "inference_summary.json").read_text())
    assert [case["id"] for case in summary["cases"]] == ["f0"]
    assert summary["earlier_files"] == sorted(name for name in first if name.startswith(("f1", "f2")))
    assert Image.open(out / "f0_seg.png").size == (70, 50), "f0's results are the second run's"


def test_two_runs_started_at_once_into_one_folder_write_one_run_and_refuse_the_other(tmp_path):
    """Two processes writing results into one folder at one moment: the folder is the first one's; the other
    writes nothing and names the folder, whichever order they reach it in."""
    out = tmp_path / "results"
    imports = (
        "import os\nimport torch\nfrom clinseg.datasets.errors import DataError\n"
        "from clinseg.pipelines.engine.writers import SaveSegmentationd"
    )
    action = "\n".join([
        "writer = SaveSegmentationd(keys='pred', output_dir=sys.argv[1], class_names=['background', 'vessel'])",
        "image = torch.rand(3, 24, 20)",
        "try:",
        "    for index in range(3):  # each process its own case names",
        "        name = f'case{os.getpid()}_{index}'",
        "        writer({'pred': (image[:1] > 0.5).long(), 'image': image, 'id': name, 'source': f'/in/{name}.png'})",
        "        time.sleep(0.2)",
        "    print(writer.write_summary())",
        "except DataError as error:",
        "    print('refused:', error)",
    ])  # fmt: skip
    (tmp_path / "sync").mkdir()
    results = run_at_once(tmp_path / "sync", imports, action, str(out), count=2)
    assert all(code == 0 for code, _ in results), results
    written = [output for _, output in results if "wrote 3 of 3" in output]
    refused = [output for _, output in results if "refused:" in output]
    assert len(written) == 1 and len(refused) == 1, results
    assert f"refused: {out}: " in refused[0], refused[0]
    summary = json.loads((out / "inference_summary.json").read_text())
    files = {name for case in summary["cases"] for name in case["files"]}
    assert {p.name for p in out.iterdir()} == files | {"inference_summary.json"}, "only the one run's files"


def test_metric_tables_hold_every_confusion_metric_not_its_counts(tmp_path):
    """The vessels bundle's accuracy and global F1 are computed from [tp, fp, tn, fn] counts, as its precision is:
    their per-image tables (``*_raw.csv``) hold the images' accuracy and F1, not the counts as text."""
    engine = Engine(lambda engine, batch: batch)
    metrics = {"val_accuracy": "accuracy", "val_global_f1": "f1 score", "val_sensitivity": "sensitivity"}
    for name, kind in metrics.items():
        metric = ConfusionMatrixMetric(include_background=False, metric_name=kind)
        IgniteMetricHandler(metric, output_transform=lambda output: (output["pred"], output["label"]),
                            save_details=True).attach(engine, name)  # fmt: skip
    # image 1: 3 vessel pixels, 2 of them found, 1 false alarm (tp 2, fp 1, tn 12, fn 1); image 2: no vessel at all
    label = torch.zeros(2, 2, 4, 4)
    label[0, 1].view(-1)[:3] = 1
    prediction = torch.zeros(2, 2, 4, 4)
    prediction[0, 1].view(-1)[1:4] = 1
    label[:, 0] = 1 - label[:, 1]
    prediction[:, 0] = 1 - prediction[:, 1]
    batches = [{"pred": prediction[i : i + 1], "label": label[i : i + 1]} for i in range(2)]
    engine.run(batches, max_epochs=1)
    saver = AtomicMetricsSaver(save_dir=str(tmp_path / "tables"), metrics="*", metric_details="*",
                               class_names=["background", "vessel"])  # fmt: skip
    saver._filenames = ["image1", "image2"]
    saver(engine)

    def column(name: str) -> list[float]:
        rows = (tmp_path / "tables" / f"{name}_raw.csv").read_text().splitlines()
        assert rows[0].split(",")[:2] == ["filename", "vessel"], rows[0]
        return [float(row.split(",")[1]) for row in rows[1:]]

    assert column("val_accuracy") == pytest.approx([14 / 16, 1.0], abs=1e-4)
    f1 = column("val_global_f1")
    assert f1[0] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1), abs=1e-4) and np.isnan(f1[1]), "no F1 without vessels"
    sensitivity = column("val_sensitivity")
    assert sensitivity[0] == pytest.approx(2 / 3, abs=1e-4) and np.isnan(sensitivity[1])


def test_the_best_epoch_in_metrics_json_is_a_number_once_one_was_measured(tmp_path):
    """A first validation whose key metric is undefined (NaN: no reference structure in any image) does not stay
    the best epoch in ``metrics.json`` against every later, measured value."""
    from types import SimpleNamespace

    from clinseg.pipelines.engine.handlers.evaluation import EvaluationReport

    report = EvaluationReport(str(tmp_path), ["background", "heart"], key_metric="val_mean_dice")
    for epoch, value in ((1, float("nan")), (2, 0.6), (3, 0.8), (4, float("nan")), (5, 0.7)):
        state = SimpleNamespace(metrics={"val_mean_dice": value}, metric_details={}, epoch=epoch)
        report.epoch_completed(SimpleNamespace(state=state))
    best = json.loads((tmp_path / "metrics.json").read_text())["best"]
    assert best == {"metric": "val_mean_dice", "value": 0.8, "epoch": 3}


def test_a_case_name_with_a_comma_keeps_its_values_in_their_columns(tmp_path):
    """Case names come from file names, which may hold the tables' delimiter or quotes (``scan 1, OD.png``): each
    row still reads back, with a CSV reader, as the case's name and its own values."""
    import csv
    from types import SimpleNamespace

    details = {"val_f1": torch.tensor([[0.9], [0.1], [0.5]])}
    engine = SimpleNamespace(state=SimpleNamespace(metrics={"val_f1": 0.5}, metric_details=details, epoch=1))
    saver = AtomicMetricsSaver(save_dir=str(tmp_path), metrics="*", metric_details="*",
                               class_names=["background", "vessel"])  # fmt: skip
    names = ["scan 1, OD", 'scan "2"', "scan 3"]
    saver._filenames = list(names)
    saver(engine)
    rows = list(csv.DictReader((tmp_path / "val_f1_raw.csv").read_text().splitlines()))
    assert [(row["filename"], float(row["vessel"])) for row in rows] == list(zip(names, [0.9, 0.1, 0.5], strict=True))
    assert saver._filenames == names, "the saver's own list is left as it was"


def test_a_heart_volume_on_a_sheared_grid_is_measured_by_the_voxels_true_volume(tmp_path):
    """A CT whose gantry tilt is kept in its affine (slices shifted along y as z rises, 25 degrees): a voxel's
    volume is the determinant of its axes, 2 x 2 x 3 cos 25 mm^3, not the product of their lengths (2 x 2 x 3),
    which would report the heart 10 % larger. The mask is written on that same grid."""
    import nibabel as nib
    from monai.data import MetaTensor

    from clinseg.pipelines.engine.writers import SaveVolumeSegmentationd

    tilt = np.deg2rad(25)
    affine = np.eye(4)
    affine[:3, :3] = [[2.0, 0.0, 0.0], [0.0, 2.0, 3.0 * np.sin(tilt)], [0.0, 0.0, 3.0 * np.cos(tilt)]]
    affine[:3, 3] = [-20.0, -25.0, 10.0]
    label = torch.zeros(1, 15, 13, 11)
    label[0, 4:10, 3:9, 2:8] = 1  # 216 voxels
    image = MetaTensor(torch.rand(1, 15, 13, 11), affine=torch.as_tensor(affine))
    writer = SaveVolumeSegmentationd(keys="pred", output_dir=str(tmp_path), class_names=["background", "heart"])
    writer({"pred": MetaTensor(label, affine=torch.as_tensor(affine)), "image": image, "id": "tilted",
            "source": "/inputs/tilted.nii.gz"})  # fmt: skip
    summary = json.loads((tmp_path / "tilted.json").read_text())
    assert summary["volume_ml"]["heart"] == pytest.approx(216 * 2 * 2 * 3 * np.cos(tilt) / 1000, abs=1e-3)
    assert summary["spacing_mm"] == [2.0, 2.0, 3.0], "each axis's own spacing"
    mask = nib.load(tmp_path / "tilted_seg.nii.gz")
    np.testing.assert_allclose(mask.get_sform(), affine, atol=1e-6)
    assert int(np.asarray(mask.dataobj).sum()) == 216


def test_layer_thickness_is_measured_over_the_columns_the_retina_is_in(tmp_path):
    """A B-scan whose retina fills half of its columns (the scan's margins are empty): each layer's mean thickness
    is its thickness where the retina is, not shrunk by the empty columns."""
    from clinseg.pipelines.engine.writers import SaveSegmentationd

    label = np.zeros((40, 60), np.uint8)
    label[10:14, 15:45], label[14:20, 15:45] = 1, 2  # 4 and 6 rows thick over 30 columns
    label[14:20, 20:25] = 1  # layer 1 thicker there, layer 2 absent: still columns of the retina
    scan = torch.zeros(1, 40, 60)
    outputs = {"scan": label, "blank": np.zeros_like(label)}
    writer = SaveSegmentationd(keys="pred", output_dir=str(tmp_path / "out"), class_names=["bg", "L1", "L2"],
                               thickness=True, pixel_size_um=3.9)  # fmt: skip
    for name, prediction in outputs.items():
        writer({"pred": torch.as_tensor(prediction)[None], "image": scan, "id": name, "source": f"/in/{name}.png"})
    summary = json.loads((tmp_path / "out" / "scan.json").read_text())
    assert summary["thickness_columns"] == 30
    assert summary["mean_thickness_px"] == pytest.approx({"L1": (25 * 4 + 5 * 10) / 30, "L2": 25 * 6 / 30})
    assert summary["mean_thickness_um"]["L1"] == pytest.approx(3.9 * 5)
    blank = json.loads((tmp_path / "out" / "blank.json").read_text())
    assert blank["mean_thickness_px"] == {"L1": None, "L2": None} and blank["thickness_columns"] == 0
