"""Experiment management against real MLflow stores: sweeps, comparison, registry, a real server, and faults."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest

from clinseg.pipelines.tracking import client_for
from tests.conftest import (
    OCT_BUNDLE,
    REPO_ROOT,
    free_port,
    run_at_once,
    run_bundle,
    server_answers,
    start_experiments_ui,
)

TRAIN = [str(OCT_BUNDLE / "configs" / "train.json")]
TINY = {
    "image_size": "[64,96]",
    "network_def#channels": "[8,16,32]",
    "network_def#strides": "[2,2]",
    "batch_size": 4,
}


def experiments(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "clinseg.pipelines.experiments", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, **(env or {})},
    )
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def refused(*args: str) -> str:
    """The one-line error of an experiments command that must fail: exit 1, no traceback."""
    result = experiments(*args, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def training_runs(uri: str) -> list:
    # the project's client: a test that watches the store while a training creates it must not migrate the new
    # database at the same time (the training's store lock is the project's, so is this one)
    client = client_for(uri)
    experiment = client.get_experiment_by_name("oct_layers")
    return client.search_runs([experiment.experiment_id], "tags.workflow = 'train'") if experiment else []


def still_running(process: subprocess.Popen, deadline: float, waiting_for: str) -> None:
    """Fail with the process's own output if it ended (or the deadline passed) before what the test waits for."""
    if process.poll() is not None:
        pytest.fail(f"{waiting_for}: the process exited {process.returncode}:\n{process.communicate()[0][-3000:]}")
    assert time.time() < deadline, waiting_for


def sweep_settings(tmp_path, dataset_dir, without=()) -> list[str]:
    """``KEY=VALUE`` overrides for every child of a tiny sweep."""
    settings = {**TINY, "train#trainer#max_epochs": 2, "dataset_dir": dataset_dir, "bundle_root": tmp_path / "bundle"}
    return [f"{k}={v}" for k, v in settings.items() if k not in without]


def test_sweep_compare_register_fetch_evaluate(tmp_path, tiny_oct_dir, tracking_uri):
    fixed = sweep_settings(tmp_path, tiny_oct_dir, without=("batch_size",))
    out = experiments("sweep", "oct_layers", "--grid", "learning_rate=0.001,0.004", "batch_size=2,4", "--set", *fixed)
    assert "ranking by best val_mean_dice" in out.stdout
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("oct_layers")
    parent = client.search_runs([experiment.experiment_id], "tags.workflow = 'sweep'")[0]
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED" and len(children) == 4
    assert {(c.data.params["learning_rate"], c.data.params["batch_size"]) for c in children} == {
        ("0.001", "2"),
        ("0.001", "4"),
        ("0.004", "2"),
        ("0.004", "4"),
    }
    best = max(children, key=lambda c: c.data.metrics["0_key/val_mean_dice"])
    assert parent.data.tags["best_child"] == best.info.run_id
    # the sweep prints its run id and the command that compares its children; --parent takes the name as well
    assert f"--parent {parent.info.run_id}" in out.stdout
    by_name = experiments("compare", "oct_layers", "--parent", parent.info.run_name, "--json", str(tmp_path / "p.json"))
    assert {row["run_id"] for row in json.loads((tmp_path / "p.json").read_text())} == {
        c.info.run_id for c in children
    }, by_name.stdout
    assert "latest parents: " + parent.info.run_name in refused("compare", "oct_layers", "--parent", "sweep-none")

    plot = tmp_path / "curves.png"
    rows_json = tmp_path / "rows.json"
    table = experiments("compare", "oct_layers", "--plot", str(plot), "--json", str(rows_json)).stdout
    header = table.splitlines()[0]
    assert "learning_rate" in header and "batch_size" in header and "best val_mean_dice" in header
    assert "seed" not in header, "only the params that differ between runs are columns"
    rows = json.loads(rows_json.read_text())
    assert [r["best_val_mean_dice"] for r in rows] == sorted((r["best_val_mean_dice"] for r in rows), reverse=True)
    assert plot.stat().st_size > 10_000

    experiments("register", best.info.run_id, "--alias", "champion")
    version = client.get_model_version_by_alias("oct_layers", "champion")
    assert version.run_id == best.info.run_id
    # the version carries its evidence: the validation at the checkpoint's epoch, the data, the source run
    dice = client.get_metric_history(best.info.run_id, "0_key/val_mean_dice")
    chosen = max(dice, key=lambda m: m.value)
    assert float(version.tags["validation.val_mean_dice"]) == pytest.approx(chosen.value, rel=1e-5)
    assert version.tags["epoch"] == str(chosen.step) and "validation.val_hd95" in version.tags
    assert version.tags["dataset_fingerprint"] == best.data.params["dataset_fingerprint"]
    assert version.tags["source_run_id"] == best.info.run_id and version.tags["git_commit"]
    assert best.info.run_name in version.description and "val_mean_dice" in version.description
    fetched = tmp_path / "fetched"
    experiments("fetch", "oct_layers", "champion", "--out", str(fetched))
    assert (fetched / "models" / "model.pt").is_file() and (fetched / "configs" / "executed_config.json").is_file()
    evidence = json.loads((fetched / "evidence.json").read_text())
    assert evidence["source_run_id"] == best.info.run_id and evidence["epoch"] == chosen.step
    configs = [str(fetched / "configs" / "executed_config.json"), str(fetched / "configs" / "evaluate.json")]
    run_bundle("evaluating", configs, {"bundle_root": fetched, "dataset_dir": tiny_oct_dir, "run_name": "eval-fetched"})
    report = json.loads((fetched / "outputs" / "eval-fetched" / "metrics.json").read_text())
    assert report["mean"]["val_mean_dice"] == pytest.approx(best.data.metrics["0_key/val_mean_dice"], abs=1e-5)
    # the fetched model comes with its own record (the repository's promoted model.json describes another model)
    assert report["model"]["training_run_id"] == best.info.run_id, report["model"]
    assert not (fetched / "large_files.yml").exists()

    # wrong run ids, names, aliases and paths: one line each, nothing registered or written
    versions = len(client.search_model_versions("name = 'oct_layers'"))
    assert "not an MLflow run id" in refused("register", "not-a-run")
    assert "no such run" in refused("register", "0" * 32)
    assert "logged no checkpoint/model.pt" in refused("register", parent.info.run_id)  # a sweep parent
    assert "not a usable model name" in refused("register", best.info.run_id, "--name", "../../outside")
    assert len(client.search_model_versions("name = 'oct_layers'")) == versions
    assert "no such version or alias" in refused("fetch", "oct_layers", "nightly", "--out", str(tmp_path / "x"))
    assert "no registered model" in refused("fetch", "vessels_v9", "1", "--out", str(tmp_path / "x"))
    assert "not an empty folder" in refused("fetch", "oct_layers", "champion", "--out", str(fetched))
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "arguments",
    [["register", "not-a-run"], ["sweep", "vessels", "--resume", "123"], ["cv", "oct_layers", "--resume", "A" * 32]],
)
def test_a_mistyped_run_id_is_refused_before_the_store_is_opened(arguments, tmp_path):
    """Opening a store that does not exist yet creates it: a mistyped id (on the default store, the repository's
    mlruns/) must be refused first, naming the argument, and leave no store behind."""
    store = tmp_path / "never_opened.db"
    result = experiments("--tracking_uri", f"sqlite:///{store}", *arguments, check=False)
    assert result.returncode == 1 and "is not an MLflow run id" in result.stderr, result.stderr[-2000:]
    assert result.stderr.strip().startswith(("error: run_id: ", "error: --resume: ")), result.stderr
    assert not store.exists() and not list(tmp_path.iterdir())


def test_grid_and_choice_values_may_be_lists_or_mappings():
    """``--grid`` and ``choice:`` split at the commas between values, not inside one (they once split
    ``[8,16],[16,32]`` into four broken values); unbalanced brackets are refused naming the item."""
    from optuna.distributions import CategoricalDistribution

    from clinseg.datasets.errors import InputError
    from clinseg.pipelines.experiments import parse_grid
    from clinseg.pipelines.search import parse_space

    grid = parse_grid(["network_def#channels=[8,16],[16,32]", "learning_rate=0.001,0.002",
                       'lr_scheduler={"_target_": "a.B", "step_size": 2},{"_target_": "c.D", "x": [1]}'])  # fmt: skip
    assert grid["network_def#channels"] == ["[8,16]", "[16,32]"]
    assert grid["learning_rate"] == ["0.001", "0.002"]
    assert [json.loads(v)["_target_"] for v in grid["lr_scheduler"]] == ["a.B", "c.D"]
    space = parse_space(["network_def#channels=choice:[8,16],[16,32],[32,64]"])
    assert space["network_def#channels"] == CategoricalDistribution(["[8,16]", "[16,32]", "[32,64]"])
    for broken in ("network_def#channels=[8,16,[16,32]", "network_def#channels=[8,16]],[16,32]"):
        with pytest.raises(InputError, match="--grid"):
            parse_grid([broken])


def test_a_sweep_over_network_widths_trains_one_child_per_width(tmp_path, tiny_oct_dir, tracking_uri):
    fixed = sweep_settings(tmp_path, tiny_oct_dir, without=("network_def#channels",))
    experiments("sweep", "oct_layers", "--grid", "network_def#channels=[4,8,16],[6,12,24]", "--set", *fixed)
    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("oct_layers")
    parent = client.search_runs([experiment.experiment_id], "tags.workflow = 'sweep'")[0]
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert parent.info.status == "FINISHED" and {c.info.status for c in children} == {"FINISHED"}
    widths = {json.loads(c.data.params["network_channels"])[0] for c in children}
    assert widths == {4, 6}


def test_an_interrupted_sweep_resumes_keeping_its_finished_runs(tmp_path, tiny_oct_dir, tracking_uri):
    """Stopped during its first child, a sweep resumed by its parent run id continues that child from its latest
    checkpoint, trains the one that never started, and ranks each combination once."""
    fixed = [s.replace("max_epochs=2", "max_epochs=20") for s in sweep_settings(tmp_path, tiny_oct_dir)]
    command = [sys.executable, "-m", "clinseg.pipelines.experiments", "sweep", "oct_layers", "--grid",
               "learning_rate=0.001,0.004", "--set", *fixed]  # fmt: skip
    sweep = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list((tmp_path / "bundle").glob("outputs/*/models/latest_checkpoint_epoch=*.pt")):
        assert sweep.poll() is None and time.time() < deadline, "the first child did not start in time"
        time.sleep(0.1)
    sweep.send_signal(signal.SIGTERM)
    out, err = sweep.communicate(timeout=300)
    assert sweep.returncode == 1, out + err[-3000:]
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = client.get_experiment_by_name("oct_layers").experiment_id
    parent = client.search_runs([experiment_id], "tags.workflow = 'sweep'")[0]
    assert parent.info.status == "KILLED" and f"sweep oct_layers --resume {parent.info.run_id}" in out, out
    (interrupted,) = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert interrupted.info.status == "KILLED" and interrupted.data.params["learning_rate"] == "0.001"
    for given in (["--grid", "seed=1"], ["--sample", "1"], ["--seed", "3"]):  # the recorded plan is the sweep's
        assert "is the sweep's own" in refused("sweep", "oct_layers", "--resume", parent.info.run_id, *given)

    out = experiments("sweep", "oct_layers", "--resume", parent.info.run_id).stdout
    assert "learning_rate=0.001: continues run" in out and "learning_rate=0.004: trained" in out, out
    children = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3 and client.get_run(parent.info.run_id).info.status == "FINISHED"
    resumed = next(c for c in children if c.data.tags.get("resumed_from_run") == interrupted.info.run_id)
    assert resumed.data.params["learning_rate"] == "0.001" and resumed.info.status == "FINISHED"
    ranking = out.split("ranking by best val_mean_dice")[1].strip().splitlines()[2:]  # the title, the header
    assert len(ranking) == 2 and all(" FINISHED " in row for row in ranking), ranking  # the KILLED run is not one
    again = experiments("sweep", "oct_layers", "--resume", parent.info.run_id).stdout
    assert "learning_rate=0.001: kept" in again and "learning_rate=0.004: kept" in again, again
    assert len(client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == 3


def test_training_against_a_real_tracking_server(tmp_path, tiny_oct_dir):
    port = free_port()
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "server_artifacts"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        assert server_answers(uri, server, 90), "mlflow server did not start"
        run_bundle(
            "training",
            TRAIN,
            {**TINY, "train#trainer#max_epochs": 1, "dataset_dir": tiny_oct_dir, "bundle_root": tmp_path / "bundle"},
            env={"MLFLOW_TRACKING_URI": uri},
        )
        request = urllib.request.Request(f"{uri}/api/2.0/mlflow/experiments/get-by-name?experiment_name=oct_layers")
        experiment = json.load(urllib.request.urlopen(request, timeout=10))["experiment"]
        body = json.dumps({"experiment_ids": [experiment["experiment_id"]]}).encode()
        request = urllib.request.Request(
            f"{uri}/api/2.0/mlflow/runs/search", data=body, headers={"Content-Type": "application/json"}
        )
        runs = json.load(urllib.request.urlopen(request, timeout=10))["runs"]
        assert len(runs) == 1 and runs[0]["info"]["status"] == "FINISHED"
        params = {p["key"]: p["value"] for p in runs[0]["data"]["params"]}
        metrics = {m["key"] for m in runs[0]["data"]["metrics"]}
        assert params["max_epochs"] == "1" and {"0_key/train_loss", "0_key/val_mean_dice"} <= metrics
        run_id = runs[0]["info"]["run_id"]
        with urllib.request.urlopen(f"{uri}/get-artifact?path=metrics.json&run_uuid={run_id}", timeout=10) as r:
            assert "val_mean_dice" in json.load(r)["mean"]
        assert any((tmp_path / "server_artifacts").rglob("model.pt")), "artifacts went through the server"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def test_unreachable_tracking_server_fails_before_training(tmp_path, tiny_oct_dir):
    uri = f"http://127.0.0.1:{free_port()}"
    started = time.time()
    result = run_bundle(
        "training",
        TRAIN,
        {**TINY, "dataset_dir": tiny_oct_dir, "bundle_root": tmp_path / "b"},
        env={"MLFLOW_TRACKING_URI": uri},
        check=False,
    )
    assert result.returncode != 0 and time.time() - started < 60
    assert f"error: {uri}: the MLflow tracking server is unreachable" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "b" / "models" / "model.pt").exists()


def test_a_killed_run_is_marked_killed_not_left_running(tmp_path, tiny_oct_dir, tracking_uri):
    command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(TRAIN)]
    for key, value in {
        **TINY,
        "train#trainer#max_epochs": 500,
        "dataset_dir": tiny_oct_dir,
        "bundle_root": tmp_path / "b",
    }.items():
        command += [f"--{key}", str(value)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = client_for(tracking_uri)  # the training may be making the store now: under its lock
    deadline = time.time() + 180
    while True:  # wait until training is under way (a validation metric is recorded)
        runs = training_runs(tracking_uri)
        if runs and "0_key/val_mean_dice" in client.get_run(runs[0].info.run_id).data.metrics:
            break
        assert time.time() < deadline and process.poll() is None, "training did not start"
        time.sleep(1)
    assert runs[0].info.status == "RUNNING"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) != 0
    assert client.get_run(runs[0].info.run_id).info.status == "KILLED"


def test_processes_that_open_a_new_store_at_once_all_get_it(tmp_path):
    """MLflow makes a new SQLite database on first use; unguarded, processes doing so at the same moment leave it
    half-migrated and fail (``experiments ui`` or ``compare`` watching the store while a training starts)."""
    uri = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    imports = "from clinseg.pipelines.tracking import client_for"
    for code, output in run_at_once(tmp_path, imports, "client_for(sys.argv[1]).search_experiments()", uri):
        assert code == 0, output[-3000:]
    assert mlflow.MlflowClient(uri).get_experiment_by_name("Default") is not None


@contextlib.contextmanager
def write_lock_held(database: Path, seconds: float):
    """Another process holding the SQLite database's write lock (``BEGIN EXCLUSIVE``) for ``seconds``, as a
    training committing its metrics holds it on a loaded machine, from the moment this is entered."""
    script = (
        "import sqlite3, sys, time\n"
        "connection = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "connection.execute('BEGIN EXCLUSIVE')\n"
        "print('held', flush=True)\n"
        "time.sleep(float(sys.argv[2]))\n"
        "connection.execute('COMMIT')\n"
    )
    command = [sys.executable, "-c", script, str(database), str(seconds)]
    holder = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


def test_a_store_opened_while_another_process_writes_waits_for_the_lock(tmp_path):
    """A store opened while another process held the database's write lock for more than 5 s (a loaded CI machine,
    search workers and their trainings all recording) failed at once: MLflow checks the store's tables through a
    plain connection, which gave up after sqlite3's default 5 s ("database is locked"), and the training ended with
    an internal error before its first epoch. The store's connections wait for the lock as its sessions do."""
    database = tmp_path / "mlruns" / "mlflow.db"
    uri = f"sqlite:///{database}"
    client_for(uri).search_experiments()  # the store exists; its tables are made
    # each in a process of its own (MLflow keeps one store per URI in a process, checked once), told to open the
    # store once its imports are done and the lock is taken, so that it does meet the lock however loaded the machine
    for open_store in (
        "from clinseg.pipelines.tracking import client_for\nopen_store = lambda: client_for(sys.argv[1])",
        "from clinseg.pipelines.engine.handlers.tracking import BundleMLflowHandler\n"
        "open_store = lambda: BundleMLflowHandler('oct_layers', tracking_uri=sys.argv[1]).client",
    ):
        script = (
            f"import sys, time\n{open_store}\nprint('ready', flush=True)\nsys.stdin.readline()\n"
            "started = time.monotonic()\nopen_store().search_experiments()\nprint(time.monotonic() - started)"
        )
        command = [sys.executable, "-c", script, uri]
        opener = subprocess.Popen(command, cwd=REPO_ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert opener.stdout.readline().strip() == "ready"
        with write_lock_held(database, 10):
            opened = opener.communicate("go\n", timeout=300)[0]
        assert opener.returncode == 0, opened
        assert float(opened) > 6  # it waited for the lock (held 10 s from just before it was told to open)


def test_a_store_locked_for_longer_than_the_wait_is_refused_naming_it(tmp_path, tiny_oct_dir):
    """A store whose lock is held past the wait (a hung process holding it) stops the training in one line naming
    the store and what to do, before any data is read."""
    database = tmp_path / "mlruns" / "mlflow.db"
    uri = f"sqlite:///{database}"
    client_for(uri).search_experiments()
    with write_lock_held(database, 600):  # released when the training has ended
        result = run_bundle(
            "training",
            TRAIN,
            {**TINY, "dataset_dir": tiny_oct_dir, "bundle_root": tmp_path / "b"},
            env={"MLFLOW_TRACKING_URI": uri, "PIPELINE_SQLITE_WAIT_S": "2"},
            check=False,
        )
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"error: {uri}: the database stayed locked by another process for 2 s" in result.stderr
    assert not (tmp_path / "b" / "models" / "model.pt").exists()


def test_the_ui_started_while_another_process_writes_waits_for_the_lock(tmp_path):
    """``experiments ui`` serves the store through ``mlflow server``, a process that runs none of the project's code:
    started while a training committed for more than 5 s, it gave up on the lock and did not start. The wait goes
    in the URL it is given."""
    database = tmp_path / "mlruns" / "mlflow.db"
    uri = f"sqlite:///{database}"
    client_for(uri).search_experiments()
    port = free_port()
    ui = start_experiments_ui(uri, port)
    try:
        # the links are printed just before the server starts: the lock is taken as it starts opening the store
        assert ui.stdout.readline().startswith(f"MLflow UI of {uri}"), ui.stderr.read()[-3000:]
        assert ui.stdout.readline().strip() == "(no experiments yet)"
        with write_lock_held(database, 20):
            started = time.monotonic()
            assert server_answers(f"http://127.0.0.1:{port}", ui, 120), ui.communicate(timeout=60)[1][-3000:]
        assert time.monotonic() - started > 10, "the server answered while the lock was held: the test met no lock"
    finally:
        ui.terminate()
        ui.wait(timeout=60)


@pytest.mark.parametrize("value", ["soon", "0", "-3", "inf"])
def test_a_wait_that_is_not_a_number_of_seconds_is_refused_naming_the_variable(tmp_path, monkeypatch, value):
    from clinseg.datasets.errors import InputError
    from clinseg.pipelines.studies import open_storage

    monkeypatch.setenv("PIPELINE_SQLITE_WAIT_S", value)
    for open_store in (client_for, open_storage):
        with pytest.raises(InputError, match=f"environment variable PIPELINE_SQLITE_WAIT_S: is '{value}', not a"):
            open_store(f"sqlite:///{tmp_path / 'mlruns' / 'store.db'}")


def test_two_runs_at_once_do_not_write_into_each_other(tmp_path, tiny_oct_dir, tracking_uri):
    processes = []
    for rate in ("0.001", "0.005"):
        command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(TRAIN)]
        for key, value in {
            **TINY,
            "train#trainer#max_epochs": 2,
            "learning_rate": rate,
            "train#dataloader#shuffle": rate == "0.001",  # a nested setting: no param of its own by default
            "dataset_dir": tiny_oct_dir,
            "bundle_root": tmp_path / rate,
        }.items():
            command += [f"--{key}", str(value)]
        processes.append(
            subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        )
    for process in processes:
        assert process.wait(timeout=600) == 0, process.stderr.read()[-3000:]
    runs = training_runs(tracking_uri)
    client = mlflow.MlflowClient(tracking_uri)
    assert sorted(r.data.params["learning_rate"] for r in runs) == ["0.001", "0.005"]
    # every override is in the record, the nested ones too, and in the name the runs table lists
    shuffled = {r.data.params["learning_rate"]: r.data.params.get("train_dataloader_shuffle") for r in runs}
    assert shuffled == {"0.001": "True", "0.005": "False"}, shuffled
    assert all("train_dataloader_shuffle=" in r.info.run_name for r in runs)
    for run in runs:
        assert run.info.status == "FINISHED"
        assert len(client.get_metric_history(run.info.run_id, "0_key/train_loss")) == 2 * 2  # 2 epochs x 2 iterations
        assert [m.step for m in client.get_metric_history(run.info.run_id, "0_key/val_mean_dice")] == [1, 2]


def test_an_interrupted_sweep_keeps_finished_children(tmp_path, tiny_oct_dir, tracking_uri):
    fixed = sweep_settings(tmp_path, tiny_oct_dir)
    command = [
        sys.executable,
        "-m",
        "clinseg.pipelines.experiments",
        "sweep",
        "oct_layers",
        "--grid",
        "learning_rate=0.001,0.002,0.003",
        "--set",
        *fixed,
    ]
    # a shell's background job starts with SIGINT ignored, and children inherit that: restore the default so the
    # signal below acts like Ctrl-C in a terminal
    sweep = subprocess.Popen(
        command,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    client = client_for(tracking_uri)  # the sweep may be making the store now: under its lock
    deadline = time.time() + 300
    while not any(r.info.status == "FINISHED" for r in training_runs(tracking_uri)):
        still_running(sweep, deadline, "the first child did not finish")
        time.sleep(1)
    while not any(r.info.status == "RUNNING" for r in training_runs(tracking_uri)):
        still_running(sweep, deadline, "the second child did not start")
        time.sleep(0.5)  # interrupt while the second child is training
    sweep.send_signal(signal.SIGINT)
    output, _ = sweep.communicate(timeout=300)
    assert sweep.returncode != 0 and "sweep interrupted" in output
    experiment = client.get_experiment_by_name("oct_layers")
    parent = client.search_runs([experiment.experiment_id], "tags.workflow = 'sweep'")[0]
    assert parent.info.status == "KILLED"
    statuses = sorted(r.info.status for r in training_runs(tracking_uri))
    # the finished child is kept; the interrupted one ends KILLED (never RUNNING); the rest never started
    assert "RUNNING" not in statuses, statuses
    assert "FINISHED" in statuses and statuses.count("KILLED") <= 1 and len(statuses) < 3 + 1, statuses


def recorded_training(client, experiment_id: str, name: str, history: dict, parent: str | None = None, **params):
    """A finished training run in ``client``'s store as a bundle training records it: its tags and params, and each
    metric's values by epoch (recorded names, ``{"0_key/val_mean_dice": [0.5, 0.8]}``)."""
    tags = {"workflow": "train", "bundle": "oct_layers", "run_folder": name}
    if parent:
        tags["mlflow.parentRunId"] = parent
    run_id = client.create_run(experiment_id, run_name=name, tags=tags).info.run_id
    for key, value in {"key_metric": "val_mean_dice", **params}.items():
        client.log_param(run_id, key, str(value))
    for key, values in history.items():
        for epoch, value in enumerate(values, 1):
            client.log_metric(run_id, key, value, step=epoch)
    client.set_terminated(run_id, "FINISHED")
    return run_id


def test_compare_ranks_runs_without_a_value_last_and_distances_lowest_first(tmp_path, tracking_uri, capsys):
    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("oct_layers", artifact_location=str(tmp_path / "artifacts"))
    nan = float("nan")
    for name, dice, hd95, rve in (
        ("good", [0.5, 0.8], [10.0, 3.0], [0.4, 0.05]),
        ("unscored", [nan, nan], [nan, nan], [nan, nan]),  # every validation undefined
        ("poor", [0.2, 0.3], [40.0, 30.0], [-0.9, -0.8]),
        ("fair", [0.6, 0.55], [8.0, 9.0], [-0.1, 0.3]),
    ):
        history = {"0_key/val_mean_dice": dice, "1_validation/val_hd95": hd95, "1_validation/val_rve": rve}
        recorded_training(client, experiment_id, name, history, validation_fingerprint="a1")

    def ranking(*args: str) -> list[tuple[str, float, int | None]]:
        from clinseg.pipelines.experiments import main

        rows_json = tmp_path / "rows.json"
        assert main(["compare", "oct_layers", "--json", str(rows_json), *args]) == 0
        metric = args[1] if args[:1] == ("--metric",) else "val_mean_dice"
        return [(r["run"], r[f"best_{metric}"], r["best_epoch"]) for r in json.loads(rows_json.read_text())]

    by_dice = ranking()
    assert [name for name, *_ in by_dice] == ["good", "fair", "poor", "unscored"], by_dice
    assert by_dice[1] == ("fair", 0.6, 1)
    # a distance: its best is its lowest value, and the lowest ranks first
    assert ranking("--metric", "val_hd95")[:3] == [("good", 3.0, 2), ("fair", 8.0, 1), ("poor", 30.0, 2)]
    # a signed error: its best is the value closest to 0, and the model that misses most of the volume ranks last
    assert ranking("--metric", "val_rve")[:3] == [("good", 0.05, 2), ("fair", -0.1, 1), ("poor", -0.8, 2)]
    assert [name for name, *_ in ranking("--ascending")] == ["poor", "fair", "good", "unscored"]
    assert "different sets of cases" not in capsys.readouterr().err
    # a run validated on other cases is listed, and the table says its metric does not compare
    recorded_training(client, experiment_id, "easier", {"0_key/val_mean_dice": [0.99]}, validation_fingerprint="b2")
    assert ranking()[0][0] == "easier"
    assert "validated on 2 different sets of cases" in capsys.readouterr().err


def test_compare_shows_the_settings_that_differ_not_where_a_run_read_or_resumed(tmp_path, tracking_uri, capsys):
    from clinseg.pipelines.experiments import main

    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = client.create_experiment("oct_layers", artifact_location=str(tmp_path / "artifacts"))
    for name, params in (
        ("base", {"learning_rate": "0.002", "num_workers": "2"}),
        # a resumed training records the folder it continued; a faster loader changes nothing it learns
        ("resumed", {"learning_rate": "0.004", "num_workers": "0", "resume": "train-20261201-081230-a1b2c3"}),
    ):
        recorded_training(client, experiment_id, name, {"0_key/val_mean_dice": [0.5]}, **params)
    assert main(["compare", "oct_layers"]) == 0
    header = capsys.readouterr().out.splitlines()[0].split()
    assert "learning_rate" in header, header
    assert not {"resume", "num_workers"} & set(header), header


def test_a_sweep_whose_settings_exceed_a_tag_is_refused_before_anything_is_recorded(tracking_uri):
    """The parent records its settings in one MLflow tag (for --resume): settings too long for it are refused in
    one line, not by the store after the parent run exists."""
    grid = "learning_rate=" + ",".join(f"0.{i:04d}" for i in range(1500))
    assert "over the 8000 of the MLflow tag" in refused("sweep", "oct_layers", "--grid", grid)
    experiment = client_for(tracking_uri).get_experiment_by_name("oct_layers")
    assert experiment is None or not client_for(tracking_uri).search_runs([experiment.experiment_id])
    assert "--grid: is needed" in refused("sweep", "oct_layers")
