"""A tracking server that goes away during a training (README, "A tracking server"), with real processes: a real
``mlflow server`` (SQLite store, served artifacts), a real ``python -m monai.bundle run training`` of the
oct_layers bundle at tiny sizes, and the server killed with SIGTERM once the first epoch's metrics arrived.

- the server comes back a few epochs later, on the same port and store: the training exits 0 with every epoch's
  checkpoint, one warning line when the outage starts and one when it ends, no traceback; the spooled records are
  replayed and the run ends FINISHED with as many points per metric as an undisturbed run of the same config;
- the server stays down until the training has ended: exit 0, the records stay spooled, ``experiments sync``
  replays them (the run then ends FINISHED, complete), and a second ``sync`` adds nothing.

The delay the outage adds to tracking calls and epochs is printed (``pytest -s``) and bounded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import OCT_BUNDLE, REPO_ROOT, free_port

pytestmark = pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")
TRAIN = [str(OCT_BUNDLE / "configs" / "train.json")]
EPOCHS = 6
TINY = {
    "image_size": "[32,48]",
    "network_def#channels": "[4,8]",
    "network_def#strides": "[2]",
    "train#trainer#max_epochs": str(EPOCHS),
    "val_interval": "1",
    "batch_size": "2",
    "num_workers": "0",
}
# our limits for the tracked process, not the caller's
CLEAN_ENV = {
    k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI" and not k.startswith("MLFLOW_HTTP_REQUEST")
}
MAX_CALL_DELAY_S = 8.0  # two attempts of 3 s at most, plus a /health check of 2 s at most


class Server:
    """``mlflow server`` on a fixed port and store, which can be killed and started again."""

    def __init__(self, folder: Path):
        self.folder, self.port, self.process, self.starts = folder, free_port(), None, 0
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 300) -> float:
        self.starts += 1
        log = open(self.folder / f"server-{self.starts}.log", "w")  # noqa: SIM115 - the server writes it
        started = time.monotonic()
        self.process = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "mlflow"),
                "server",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--workers",
                "1",
                "--backend-store-uri",
                f"sqlite:///{self.folder / 'server.db'}",
                "--artifacts-destination",
                str(self.folder / "server_artifacts"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        while not self.healthy():
            assert self.process.poll() is None, (self.folder / f"server-{self.starts}.log").read_text()[-3000:]
            assert time.monotonic() - started < timeout_s, "mlflow server did not start"
            time.sleep(0.3)
        return time.monotonic() - started

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def kill(self, wait: bool = True) -> None:
        """SIGTERM, as a person or a scheduler stops it (the server and its workers)."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        if wait:
            self.wait_stopped()

    def wait_stopped(self) -> float:
        started = time.monotonic()
        if self.process is not None:
            self.process.wait(timeout=120)
        self.process = None
        return time.monotonic() - started

    def api(self, endpoint: str, body: dict | None = None, **query) -> dict | None:
        url = f"{self.uri}/api/2.0/mlflow/{endpoint}"
        if query:
            url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.load(response)
        except OSError:
            return None

    def run(self, run_name: str) -> dict | None:
        found = self.api("experiments/get-by-name", experiment_name="oct_layers")
        if not found:
            return None
        body = {"experiment_ids": [found["experiment"]["experiment_id"]], "filter": f"tags.run_folder = '{run_name}'"}
        runs = (self.api("runs/search", body) or {}).get("runs", [])
        return runs[0] if runs else None

    def metric_steps(self, run: dict) -> dict[str, list[int]]:
        """The steps of every metric's points (the full history, not only the latest value). System metrics are
        sampled by the clock (their number follows the run's duration), so they are not compared."""
        steps = {}
        for metric in run["data"].get("metrics", []):
            key = metric["key"]
            if key.startswith("system/"):
                continue
            history = self.api(
                "metrics/get-history", run_id=run["info"]["run_id"], metric_key=urllib.parse.quote(key, safe="")
            )
            steps[key] = sorted(m.get("step", 0) for m in (history or {}).get("metrics", []))
        return steps

    def artifacts(self, run_id: str, path: str = "") -> list[str]:
        listing = self.api("artifacts/list", run_id=run_id, **({"path": path} if path else {})) or {}
        found = []
        for entry in listing.get("files", []):
            found += self.artifacts(run_id, entry["path"]) if entry.get("is_dir") else [entry["path"]]
        return found


class Training:
    """A ``monai.bundle run training`` process, its output in a file, watched while it runs."""

    def __init__(self, uri: str, root: Path, run_name: str, data_dir: Path):
        self.root, self.run_name = root, run_name
        self.log = root.parent / f"{run_name}.log"
        command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(TRAIN)]
        overrides = {**TINY, "bundle_root": root, "dataset_dir": data_dir, "run_name": run_name, "tracking_uri": uri}
        for key, value in overrides.items():
            command += [f"--{key}", str(value)]
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            command, cwd=REPO_ROOT, env=CLEAN_ENV, stdout=open(self.log, "w"), stderr=subprocess.STDOUT
        )
        self.checkpoints_seen: set[int] = set()

    def checkpoints(self) -> set[int]:
        names = [p.name for p in self.root.rglob("latest_checkpoint_epoch=*.pt")]
        found = {int(m.group(1)) for name in names if (m := re.search(r"=(\d+)\.pt$", name))}
        self.checkpoints_seen |= found
        return found

    def wait_until(self, condition, what: str, timeout_s: float = 600, poll_s: float = 0.05) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            self.checkpoints()
            if self.process.poll() is not None:
                state = f"checkpoints seen {sorted(self.checkpoints_seen)}, {self.spooled()} records spooled"
                raise AssertionError(f"the training ended before {what} ({state}):\n{self.output()[-3000:]}")
            assert time.monotonic() < deadline, f"no {what} after {timeout_s} s"
            time.sleep(poll_s)

    def wait(self, timeout_s: float = 900) -> int:
        deadline = time.monotonic() + timeout_s
        while self.process.poll() is None:
            self.checkpoints()
            assert time.monotonic() < deadline, "the training did not end"
            time.sleep(0.1)
        self.checkpoints()
        self.seconds = time.monotonic() - self.started
        return self.process.returncode

    def spooled(self) -> int:
        return sum(len(p.read_bytes().splitlines()) for p in self.root.rglob("mlflow_records.jsonl"))

    def hold_after_epoch(self, epoch: int) -> None:
        """SIGSTOP between two tracking calls: after the record the epoch's last handler spools (the metric buffer),
        which follows the checkpoint; the next call comes with the next validation, a training epoch later. Ignite
        times an epoch with its EPOCH_COMPLETED handlers, so the hold lands in that epoch's time or, when those
        handlers were done, in the next one's: ``resume`` returns how long it lasted."""
        self.wait_until(lambda: max(self.checkpoints(), default=0) >= epoch, f"the epoch {epoch} checkpoint")
        lines = self.spooled()
        self.wait_until(lambda: self.spooled() > lines, "the epoch's last tracking record", poll_s=0.01)
        time.sleep(0.02)
        os.kill(self.process.pid, signal.SIGSTOP)
        self.stopped_at = time.monotonic()

    def resume(self) -> float:
        os.kill(self.process.pid, signal.SIGCONT)
        return time.monotonic() - self.stopped_at

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def saved_epochs(self) -> list[int]:
        return [int(n) for n in re.findall(r"Saved checkpoint at epoch: (\d+)", self.output())]

    def epoch_seconds(self) -> dict[int, float]:
        """The trainer's epochs, validation and epoch handlers included (ignite's own measure)."""
        pattern = r"SupervisedTrainer - INFO - Epoch\[(\d+)\] Complete\. Time taken: (\d+):(\d+):([\d.]+)"
        found = re.findall(pattern, self.output())
        return {int(e): int(h) * 3600 + int(m) * 60 + float(s) for e, h, m, s in found}

    def warnings(self) -> list[str]:
        return [line for line in self.output().splitlines() if "tracking: " in line and "WARNING" in line]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from clinseg.datasets.oct.phantom import write_phantom_dataset

    out = tmp_path_factory.mktemp("oct_data")
    write_phantom_dataset(out, n_subjects=3, n_bscans=2, height=48, width=64, seed=3)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("tracking_server"))
    print(f"\nmlflow server started in {server.start():.1f} s")
    yield server
    server.kill()


@pytest.fixture(scope="module")
def undisturbed(server, data_dir, tmp_path_factory) -> dict:
    """The same config tracked without an outage: the points each metric must have, and the epochs' times."""
    training = Training(server.uri, tmp_path_factory.mktemp("undisturbed") / "bundle", "undisturbed", data_dir)
    assert training.wait() == 0, training.output()[-5000:]
    run = server.run("undisturbed")
    assert run["info"]["status"] == "FINISHED" and not list(training.root.rglob("mlflow_records.jsonl"))
    assert not training.warnings(), training.warnings()
    times = training.epoch_seconds()
    print(f"undisturbed run: {training.seconds:.1f} s, epochs {fmt(times)}")
    return {
        "steps": server.metric_steps(run),
        "params": {p["key"] for p in run["data"]["params"]},
        "tags": {t["key"] for t in run["data"]["tags"]},
        "epoch_s": times,
    }


def fmt(times: dict[int, float]) -> str:
    return ", ".join(f"{e}: {s:.1f} s" for e, s in sorted(times.items()))


def val_metric_arrived(server: Server, run_name: str):
    def check() -> bool:
        run = server.run(run_name)
        return bool(run) and any(m["key"] == "0_key/val_mean_dice" for m in run["data"].get("metrics", []))

    return check


def assert_complete(server: Server, run_name: str, undisturbed: dict) -> dict:
    run = server.run(run_name)
    assert run["info"]["status"] == "FINISHED"
    steps = server.metric_steps(run)
    counts = {k: len(v) for k, v in steps.items()}
    expected = {k: len(v) for k, v in undisturbed["steps"].items()}
    assert counts == expected, {k: (counts.get(k), expected.get(k)) for k in set(counts) | set(expected)}
    assert steps == undisturbed["steps"], "the same steps for every metric"
    assert {p["key"] for p in run["data"]["params"]} == undisturbed["params"]
    assert {t["key"] for t in run["data"]["tags"]} == undisturbed["tags"]
    artifacts = server.artifacts(run["info"]["run_id"])
    expected_files = {"learning_curves.png", "metrics.json", "checkpoint/model.pt", "config/executed_config.json"}
    assert expected_files <= set(artifacts), artifacts
    assert not [a for a in artifacts if "tracking_spool" in a or "mlflow_records" in a], "the spool is no artifact"
    print(
        f"  {run_name}: FINISHED, the points of every metric as undisturbed ({counts['0_key/train_loss']} train_loss, "
        f"{counts['0_key/val_mean_dice']} val_mean_dice, {len(counts)} metric keys)"
    )
    return run


def test_a_server_killed_mid_training_is_caught_up_when_it_is_back(server, undisturbed, data_dir, tmp_path):
    training = Training(server.uri, tmp_path / "bundle", "outage", data_dir)
    training.wait_until(val_metric_arrived(server, "outage"), "epoch 1's metrics on the server")
    server.kill(wait=False)
    killed_at = time.monotonic()
    # hold the training while the server restarts (that takes 10 to 40 s on a busy machine), so that it is back
    # while epochs remain: the outage spans an epoch at least
    training.wait_until(lambda: training.spooled() > 0, "the outage's first spooled record")
    training.hold_after_epoch(max(training.checkpoints(), default=1) + 1)
    held = max(training.checkpoints())
    try:
        server.wait_stopped()
        restart_s = server.start()
    finally:
        hold_s = training.resume()
    down_s = time.monotonic() - killed_at
    assert training.wait() == 0, training.output()[-5000:]

    output = training.output()
    assert "Traceback" not in output, output[-5000:]
    assert training.saved_epochs() == list(range(1, EPOCHS + 1)) and training.checkpoints_seen >= {EPOCHS}
    warnings = training.warnings()
    starts = [w for w in warnings if "does not answer (" in w]
    ends = [w for w in warnings if "answers again after" in w]
    assert len(starts) == 1 and len(ends) == 1 and len(warnings) == 2, warnings
    replayed = re.search(r"(\d+) spooled records replayed .*?\((\d+) metric values, 0 refused\)", ends[0])
    calls = re.search(r"(\d+) tracking calls took ([\d.]+) s in all, at most ([\d.]+) s each", ends[0])
    assert replayed and int(replayed.group(1)) > 0 and calls, ends[0]
    spool = next(training.root.rglob("mlflow_records.jsonl")).parent
    sent = [json.loads(line) for line in (spool / "mlflow_sent.jsonl").read_text().splitlines()]
    assert len(sent) == int(replayed.group(1)) and all(s["outcome"] == "sent" for s in sent)

    times, normal = training.epoch_seconds(), undisturbed["epoch_s"]
    print(
        f"\noutage: server down {down_s:.1f} s (restart {restart_s:.1f} s, training held {hold_s:.1f} s after epoch "
        f"{held}); "
        f"{replayed.group(1)} records ({replayed.group(2)} metric values) replayed; {calls.group(1)} tracking calls "
        f"while down took {calls.group(2)} s in all, at most {calls.group(3)} s each\n"
        f"  epochs {fmt(times)} (undisturbed {fmt(normal)}); training {training.seconds:.1f} s"
    )
    assert float(calls.group(3)) < MAX_CALL_DELAY_S
    assert held < EPOCHS, "epochs remained after the server was back"
    # down during epochs 2 to held + 1; the hold lies in epoch held's time or in the next one's (hold_after_epoch),
    # or, should the stop fall between ignite's two timings, in neither
    with_hold = held if times[held] >= times[held + 1] else held + 1
    for epoch in range(2, held + 2):
        spent = times[epoch] - (min(hold_s, times[epoch]) if epoch == with_hold else 0.0)
        assert spent < max(normal.values()) + MAX_CALL_DELAY_S, (epoch, hold_s, times, normal)
    assert_complete(server, "outage", undisturbed)


def test_a_server_down_until_the_end_is_synced_afterwards(server, undisturbed, data_dir, tmp_path):
    if not server.healthy():
        server.start()
    training = Training(server.uri, tmp_path / "bundle", "offline", data_dir)
    training.wait_until(val_metric_arrived(server, "offline"), "epoch 1's metrics on the server")
    server.kill()
    assert training.wait() == 0, training.output()[-5000:]

    output = training.output()
    assert "Traceback" not in output, output[-5000:]
    assert training.saved_epochs() == list(range(1, EPOCHS + 1)) and training.checkpoints_seen >= {EPOCHS}
    warnings = training.warnings()
    assert [w for w in warnings if "does not answer (" in w] and [w for w in warnings if "still does not answer" in w]
    assert len(warnings) == 2 and not [w for w in warnings if "answers again after" in w], warnings
    spool = next(training.root.rglob("mlflow_records.jsonl")).parent
    records = [json.loads(line) for line in (spool / "mlflow_records.jsonl").read_text().splitlines()]
    assert not (spool / "mlflow_sent.jsonl").exists()
    assert records[-1]["op"] == "set_terminated" and records[-1]["args"]["status"] == "FINISHED"
    ops = {op: sum(r["op"] == op for r in records) for op in {r["op"] for r in records}}
    values = sum(len(r["args"].get("metrics", [])) for r in records)
    print(
        f"\noffline: {len(records)} records spooled ({values} metric values, {ops}); training {training.seconds:.1f} s"
    )

    restart_s = server.start()
    run = server.run("offline")
    assert run["info"]["status"] == "RUNNING", "nothing was sent while the server was down"

    def sync() -> tuple[str, float]:
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "clinseg.pipelines.experiments", "sync", str(training.root)],
            cwd=REPO_ROOT,
            env=CLEAN_ENV,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stdout + result.stderr
        return result.stdout.strip(), time.monotonic() - started

    first, first_s = sync()
    run_id = run["info"]["run_id"]
    assert f"{len(records)} records sent" in first and f"run {run_id} FINISHED" in first, first
    assert_complete(server, "offline", undisturbed)
    steps = server.metric_steps(server.run("offline"))
    second, second_s = sync()
    assert "nothing to send" in second and f"{len(records)} sent before" in second, second
    assert server.metric_steps(server.run("offline")) == steps, "a second sync adds no points"
    print(f"  restart {restart_s:.1f} s; sync: {first!r} ({first_s:.1f} s); again: {second!r} ({second_s:.1f} s)")


def test_the_spool_survives_a_torn_line_and_replays_each_record_once(tmp_path):
    """A crash mid-append leaves a torn last line: it is skipped, the next record is not swallowed, every other
    record is sent in order, once, whoever replays; a record the store refuses is dropped, not retried forever."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    from clinseg.pipelines.spool import Spool, replay

    class Store:
        def __init__(self):
            self.calls = []

        def log_batch(self, run_id, metrics=(), params=(), tags=()):
            if any(p.key == "refused" for p in params):
                raise MlflowException("changing a param", INVALID_PARAMETER_VALUE)
            self.calls.append(("log_batch", [(m.key, m.step, m.timestamp) for m in metrics], len(params)))

        def set_terminated(self, run_id, status, end_time=None):
            self.calls.append(("set_terminated", status, end_time))

    spool = Spool(tmp_path / "run" / "tracking_spool")
    record = {"op": "log_batch", "run_id": "r", "uri": "x"}
    spool.append({**record, "args": {"metrics": [["loss", 1.0, 1000, 1]]}})
    spool.append({**record, "args": {"params": [["refused", "1"]]}})
    with open(spool.records_path, "a") as f:  # a crash in the middle of the next append
        f.write('{"seq":3,"op":"log_batch","run_id":"r","args":{"metr')
    spool.append({**record, "args": {"metrics": [["loss", 0.5, 2000, 2], ["dice", 0.7, 2000, 1]]}})
    spool.append({"op": "set_terminated", "run_id": "r", "uri": "x", "args": {"status": "FINISHED", "end_time": 3}})
    assert [r["seq"] for r in spool.records()] == [1, 2, 3, 4]

    store = Store()
    result = replay(spool, lambda uri: store)
    assert (result.sent, result.dropped, result.remaining, result.error) == (3, 1, 0, None)
    assert store.calls == [
        ("log_batch", [("loss", 1, 1000)], 0),
        ("log_batch", [("loss", 2, 2000), ("dice", 1, 2000)], 0),
        ("set_terminated", "FINISHED", 3),
    ]
    again = replay(spool, lambda uri: store)
    assert (again.sent, again.already_sent, len(store.calls)) == (0, 4, 3), "nothing is sent twice"
    assert Spool(spool.folder).outcomes() == {1: "sent", 2: "dropped", 3: "sent", 4: "sent"}


def test_a_sync_to_the_wrong_store_keeps_the_records_and_one_bad_name_loses_only_itself(tmp_path):
    """Replaying into a store that does not know the run (a mistyped --tracking_uri: SQLite makes a new, empty
    database) must not mark the records dropped: the sync to the right store then sends them. A metric name MLflow
    refuses, merged with good ones into one request, costs only itself."""
    import mlflow

    from clinseg.datasets.errors import DataError
    from clinseg.pipelines.spool import Spool, sync_spools
    from clinseg.pipelines.tracking import client_for

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(store)
    experiment_id = client.create_experiment("oct_layers", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment_id).info.run_id
    spool = Spool(tmp_path / "run" / "tracking_spool")
    record = {"op": "log_batch", "run_id": run_id, "uri": store, "time": 1000}
    for step in range(1, 4):
        spool.append({**record, "args": {"metrics": [["0_key/train_loss", 1.0 / step, 1000 + step, step]]}})
    spool.append({**record, "args": {"metrics": [["val_mean_dice by class/PED (serous)", 0.5, 1004, 1]]}})
    spool.append({**record, "args": {"metrics": [["0_key/val_mean_dice", 0.6, 1005, 1]]}})
    spool.append({"op": "set_terminated", "run_id": run_id, "uri": store, "args": {"status": "FINISHED"}})

    mistyped = f"sqlite:///{tmp_path / 'mlfow.db'}"
    with pytest.raises(DataError, match="its run is unknown to") as refused:
        sync_spools([tmp_path / "run"], mistyped, client_for)
    assert "6 records stay here" in str(refused.value)
    assert spool.outcomes() == {}, "nothing is marked dropped by a store that does not know the run"

    (line,) = sync_spools([tmp_path / "run"], None, client_for)
    assert "5 records sent" in line and "1 refused by the store" in line, line
    history = client.get_metric_history(run_id, "0_key/train_loss")
    assert sorted(m.step for m in history) == [1, 2, 3]
    assert client.get_metric_history(run_id, "0_key/val_mean_dice")[0].value == 0.6
    assert client.get_run(run_id).info.status == "FINISHED"
    assert list(spool.outcomes().values()).count("dropped") == 1


def test_a_store_that_cannot_be_written_now_is_not_a_refusal():
    """A read-only or full artifact store may take the file later: its record stays spooled; a source file that
    is gone is refused for good."""
    import errno

    from clinseg.pipelines.spool import is_refusal

    assert not is_refusal(OSError(errno.EROFS, "Read-only file system", "/mnt/artifacts/model.pt"))
    assert not is_refusal(OSError(errno.ENOSPC, "No space left on device", "/mnt/artifacts/model.pt"))
    assert is_refusal(FileNotFoundError(errno.ENOENT, "No such file or directory", "/run/models/model.pt"))
