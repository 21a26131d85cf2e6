"""The error contract of every entry point (README, "When an input is wrong"), through the real command lines.

- an internal error is one line naming the saved traceback, which holds the command and the stack;
- an environment error (an OSError naming a path) is one line naming the path;
- argument errors of the project's commands are one line and status 1;
- property-based (``hypothesis``): generated override keys and values, checkpoint files of other kinds and broken
  output locations, each given to a real ``python -m monai.bundle run`` of the oct_layers bundle at tiny sizes,
  end in a finished run (status 0) or in the one-line error (status 1), never in a traceback or an internal error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from monai.bundle import ConfigParser

from tests.conftest import REPO_ROOT, new_store

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")
OCT = REPO_ROOT / "bundles" / "oct_layers" / "configs"
TINY = {
    "image_size": "[32,48]",
    "network_def#channels": "[4,8]",
    "network_def#strides": "[2]",
    "train#trainer#max_epochs": "1",
    "val_interval": "1",
    "batch_size": "2",
    "num_workers": "0",
}
# every run of the property tests is a real process: few examples, each several seconds
EXAMPLES = settings(
    max_examples=int(os.environ.get("CONTRACT_EXAMPLES", "6")),
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def run(command: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )  # fmt: skip


def bundle_command(run_id: str, files: list[Path], overrides: dict) -> list[str]:
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", str([str(f) for f in files])]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    return command


def assert_contract(result: subprocess.CompletedProcess, what: str) -> str | None:
    """Status 0, or status 1 with the one-line ``error:`` (its hint may follow); never a traceback or an internal
    error. Returns the error line, or None for a finished run."""
    context = f"{what}\n--- stderr ---\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, context
    assert "internal error" not in result.stderr, context
    if result.returncode == 0:
        return None
    assert result.returncode == 1, f"status {result.returncode}: {context}"
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, f"expected one error line: {context}"
    return errors[0]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from clinseg.datasets.oct.phantom import write_phantom_dataset

    out = tmp_path_factory.mktemp("oct_data")
    write_phantom_dataset(out, n_subjects=3, n_bscans=2, height=48, width=64, seed=3)
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return new_store(tmp_path_factory.mktemp("mlruns") / "mlflow.db")


# ---- the two kinds of failure, exactly


def test_an_internal_error_is_one_line_and_a_saved_traceback(tmp_path):
    code = "import clinseg.pipelines.cli\ndef deep():\n    raise RuntimeError('an unforeseen state')\ndeep()\n"
    result = run([sys.executable, "-c", code], tmp_path, env={"CLINSEG_ERROR_DIR": str(tmp_path / "errors")})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("internal error: RuntimeError: an unforeseen state"), lines
    saved = list((tmp_path / "errors").iterdir())
    assert len(saved) == 1 and str(saved[0]) in lines[0]
    text = saved[0].read_text()
    assert "Traceback" in text and "in deep" in text and "an unforeseen state" in text and "command:" in text


def test_an_environment_error_names_the_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code = f"import clinseg.pipelines.cli\nopen({str(blocker / 'results.json')!r}, 'w')\n"
    result = run([sys.executable, "-c", code], tmp_path, env={"CLINSEG_ERROR_DIR": str(tmp_path / "errors")})
    assert result.returncode == 1
    assert result.stderr.strip() == f"error: {blocker / 'results.json'}: Not a directory.", result.stderr
    assert not (tmp_path / "errors").exists()


@pytest.mark.parametrize("allocation", ["torch.empty(2**50, dtype=torch.uint8)", "numpy.empty(2**55)"])
def test_running_out_of_memory_is_one_line_naming_the_input(tmp_path, allocation):
    """An input too large for the machine (a CT of 512 x 512 x 600 needs some 12 GB): PyTorch's or NumPy's refused
    allocation, wrapped as MONAI wraps a transform's error, is the environment's limit met by the input, not an
    internal error: one line naming the input, no saved traceback."""
    code = (
        "import numpy, torch\nimport clinseg.pipelines.cli\n"
        "def invert():\n"
        f"    {allocation}\n"
        "try:\n    invert()\nexcept Exception as e:\n    raise RuntimeError('applying transform Invertd') from e\n"
    )
    command = [sys.executable, "-c", code, "--input_path", "/data/ct/big.nii.gz"]
    result = run(command, tmp_path, env={"CLINSEG_ERROR_DIR": str(tmp_path / "errors")})
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: /data/ct/big.nii.gz: not enough memory to process it ("), lines
    assert len(lines) == 2 and lines[1].startswith("Run it on a machine with more memory"), lines
    assert not (tmp_path / "errors").exists()


def test_out_of_memory_in_a_data_loader_worker_or_on_the_gpu_is_one_line():
    from clinseg.pipelines.cli import describe_error

    worker = RuntimeError(  # as torch.utils.data re-raises a worker's error: its traceback as text
        "Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "worker.py", line 1, in _worker_loop\nRuntimeError: [enforce fail at alloc_cpu.cpp:127] '
        "DefaultCPUAllocator: can't allocate memory: you tried to allocate 1887436800 bytes. Error code 12"
    )
    line, user_side = describe_error(worker)
    assert user_side and "not enough memory to process it (an allocation of 1.8 GiB failed)" in line, line
    cuda = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.1 GiB total)")
    line, user_side = describe_error(cuda)
    assert user_side and line.startswith("error: the GPU: out of memory (CUDA)"), line
    assert "batch_size" in line and "sw_batch_size" in line


@pytest.mark.parametrize(
    "module, arguments",
    [
        ("clinseg.pipelines.experiments", ["--no_such_option"]),
        ("clinseg.pipelines.experiments", ["compare"]),
        ("clinseg.pipelines.export", []),
        ("clinseg.pipelines.new_task", ["lesions"]),
    ],
)
def test_argument_errors_of_the_commands_are_one_line_and_status_1(module, arguments, tmp_path):
    result = run([sys.executable, "-m", module, *arguments], tmp_path)
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--help" in lines[0], lines
    assert "usage:" not in result.stderr


# ---- generated cases through the real command line


def _config_ids() -> list[str]:
    config = ConfigParser.load_config_files([str(OCT / "train.json")])
    plain = [k for k, v in config.items() if isinstance(v, (bool, int, float, list, str)) and str(v)[:1] not in "$@%"]
    return sorted(plain) + ["network_def#channels", "network_def#strides", "network_def#num_res_units"]


IDS = _config_ids()
# never generated: where the run reads and writes (the fixtures own them) and what would make a run long or reach
# outside the test (a real dataset, a server)
FIXED = {"bundle_root", "dataset_dir", "tracking_uri", "output_dir", "ckpt_dir", "checkpoint_path"}
KEYS = st.one_of(
    st.sampled_from([k for k in IDS if k not in FIXED]),
    st.sampled_from([k for k in IDS if k not in FIXED]).map(lambda k: k[:-1] if len(k) > 3 else k + "s"),  # a typo
    st.from_regex(r"[a-z]{3,10}(_[a-z]{2,6})?", fullmatch=True),
)
VALUES = st.one_of(
    st.integers(-3, 64),
    st.floats(-2, 2, allow_nan=False, width=32).map(lambda v: round(v, 3)),
    st.booleans(),
    st.sampled_from(["four", "true", "none", "[]", "{}", "rgb", "x,y"]),
    st.lists(st.integers(-2, 40), min_size=0, max_size=4).map(lambda v: json.dumps(v).replace(" ", "")),
)


@EXAMPLES
@given(key=KEYS, value=VALUES)
def test_generated_overrides_end_in_a_run_or_one_line(key, value, data_dir, store, tmp_path_factory):
    root = tmp_path_factory.mktemp("override")
    overrides = {**TINY, "bundle_root": root, "dataset_dir": data_dir, "tracking_uri": store, key: value}
    result = run(bundle_command("training", [OCT / "train.json"], overrides), REPO_ROOT)
    line = assert_contract(result, f"--{key} {value}")
    if line is not None:
        assert key in line or key.replace("#", "::") in line or str(root) in line or str(data_dir) in line, line


def _network_state(**overrides) -> dict:
    parser = ConfigParser()
    parser.read_config(str(OCT / "train.json"))
    for key, value in {**TINY, **overrides}.items():
        if key.startswith("network_def"):
            parser[key] = json.loads(value)
    return parser.get_parsed_content("network_def").state_dict()


CHECKPOINTS = st.one_of(
    st.binary(min_size=0, max_size=256).map(lambda b: ("bytes", b)),
    st.sampled_from([[4, 8], [8, 16], [4, 8, 16]]).map(lambda c: ("network", c)),
    st.dictionaries(st.text("abc.", min_size=1, max_size=8), st.integers(0, 3), max_size=3).map(lambda d: ("dict", d)),
)


@EXAMPLES
@given(checkpoint=CHECKPOINTS)
def test_generated_checkpoints_end_in_an_evaluation_or_one_line(checkpoint, data_dir, store, tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoint")
    path = root / "model.pt"
    kind, content = checkpoint
    if kind == "bytes":
        path.write_bytes(content)
    elif kind == "network":
        channels = json.dumps(content).replace(" ", "")
        strides = json.dumps([2] * (len(content) - 1)).replace(" ", "")
        torch.save(_network_state(**{"network_def#channels": channels, "network_def#strides": strides}), path)
    else:
        torch.save({key: torch.full((value,), 1.0) for key, value in content.items()}, path)
    overrides = {**TINY, "bundle_root": root / "b", "dataset_dir": data_dir, "tracking_uri": store}
    overrides["checkpoint_path"] = path
    result = run(bundle_command("evaluating", [OCT / "train.json", OCT / "evaluate.json"], overrides), REPO_ROOT)
    line = assert_contract(result, f"checkpoint {kind} {content!r:.80}")
    fits = kind == "network" and content == [4, 8]
    assert (line is None) == fits, line
    if line is not None:
        assert str(path) in line, line


def _broken_location(kind: str, base: Path) -> Path:
    if kind == "a file":
        base.write_text("not a folder")
        return base
    if kind == "inside a file":
        base.write_text("not a folder")
        return base / "outputs"
    if kind == "under /proc":
        return Path("/proc/version/outputs")
    if kind == "a name too long":
        return base / ("x" * 300)
    return base / "new" / "deep" / "outputs"  # a fine one: created


@EXAMPLES
@given(kind=st.sampled_from(["a file", "inside a file", "under /proc", "a name too long", "fine"]))
def test_broken_output_locations_end_in_one_line(kind, data_dir, store, tmp_path_factory):
    root = tmp_path_factory.mktemp("location")
    output = _broken_location(kind, root / "target")
    overrides = {**TINY, "bundle_root": root / "b", "dataset_dir": data_dir, "tracking_uri": store}
    overrides["output_dir"] = output
    result = run(bundle_command("training", [OCT / "train.json"], overrides), REPO_ROOT)
    line = assert_contract(result, f"output_dir {kind}")
    assert (line is None) == (kind == "fine"), line
    if line is not None:
        assert str(output)[:60] in line, line


@pytest.mark.parametrize("metric", ["val_hd95", "val_thickness_mae_px"])
def test_a_key_metric_where_lower_is_better_is_refused(metric, data_dir, tmp_path):
    """The best checkpoint and promotion keep the highest key metric: a distance or an error as the key would keep
    the worst model, so it is refused before anything runs."""
    configs = REPO_ROOT / "bundles" / "oct_layers" / "configs"
    overrides = {"bundle_root": tmp_path / "bundle", "dataset_dir": data_dir, "key_metric_name": metric}
    result = run(bundle_command("training", [configs / "train.json"], overrides), REPO_ROOT)
    line = assert_contract(result, metric)
    assert line == f"error: config key 'key_metric_name': is {metric!r}, a metric where lower is better; the best " + (
        "checkpoint and promotion keep the highest key metric, so they would keep the worst model."
    ), line
    assert not (tmp_path / "bundle").exists()


@pytest.mark.parametrize(
    "names, problem",
    [
        (
            "['background','PED (serous)','PED [serous]']",
            "'PED (serous)' and 'PED [serous]' are recorded under one name ('PED _serous_')",
        ),
        (f"['background','{'x' * 70}']", "a class name must be 1 to 64 characters."),
        ("['vessel']", "expected a list of at least two names (background first)."),
    ],
)
def test_class_names_that_cannot_each_stand_for_one_class_are_refused(names, problem, data_dir, tmp_path):
    """Per-class metrics are recorded under MLflow-valid names: two classes that become one name would mix."""
    configs = REPO_ROOT / "bundles" / "oct_layers" / "configs"
    overrides = {"bundle_root": tmp_path / "bundle", "dataset_dir": data_dir, "class_names": names}
    line = assert_contract(run(bundle_command("training", [configs / "train.json"], overrides), REPO_ROOT), names)
    assert line is not None and line.startswith("error: config key 'class_names': ") and problem in line, line
