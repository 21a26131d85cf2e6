"""Optuna search over real bundle trainings: workers sharing one study in a real SQLite database, pruning from the
validation metric, a worker that dies mid-trial, and the best trial's command run again."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import mlflow
import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import REPO_ROOT, run_at_once
from tests.test_experiments import experiments, refused, sweep_settings

SPACE = ["learning_rate=loguniform:0.0005:0.01", "batch_size=choice:2,4"]


def search_args(tmp_path, dataset_dir, study: str, *extra: str, epochs: int = 3) -> list[str]:
    fixed = [s for s in sweep_settings(tmp_path, dataset_dir, without=("batch_size",)) if "max_epochs" not in s]
    fixed.append(f"train#trainer#max_epochs={epochs}")
    return ["search", "oct_layers", "--space", *SPACE, "--study", study, *extra, "--set", *fixed]


def load(tracking_uri: str, name: str) -> optuna.Study:
    storage = tracking_uri.replace("mlflow.db", "optuna.db")  # the default: beside the MLflow store
    return optuna.load_study(study_name=name, storage=storage)


def children(client: mlflow.MlflowClient, parent_id: str) -> list:
    experiment = client.get_experiment_by_name("oct_layers")
    return client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


def start_search(args: list[str], env: dict | None = None, as_in_a_terminal: bool = False, **popen) -> subprocess.Popen:
    """``experiments search ARGS`` started in the background, its output piped (stderr with it unless ``popen`` says
    otherwise); ``as_in_a_terminal``: in a session of its own with SIGINT at its default (a shell's background job
    starts with it ignored), so that Ctrl-C can be sent to its process group as a terminal would."""
    if as_in_a_terminal:
        popen.update(start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    popen.setdefault("stderr", subprocess.STDOUT)
    return subprocess.Popen(
        [sys.executable, "-m", "clinseg.pipelines.experiments", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        text=True,
        **popen,
    )


def wait_for_first_trial(process: subprocess.Popen, study: str, storage: str, timeout_s: float = 300) -> None:
    """Wait until the first trial of ``study`` has started its training's MLflow run (``process`` still alive)."""
    deadline = time.time() + timeout_s
    while True:
        assert time.time() < deadline and process.poll() is None, "the trial did not start"
        try:
            trials = optuna.load_study(study_name=study, storage=storage).get_trials()
        except KeyError:
            trials = []
        if trials and "mlflow_run_id" in trials[0].user_attrs:
            return
        time.sleep(0.5)


def test_searches_that_open_a_new_study_storage_at_once_all_get_it(tmp_path):
    """Optuna makes a new SQLite storage's tables as it opens it; two searches started at once on a new store
    (two users, one script) raced to make them and one failed ("table studies already exists")."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    imports = "from clinseg.pipelines.studies import open_storage; import optuna"
    action = "optuna.create_study(storage=open_storage(sys.argv[1]))"
    for code, output in run_at_once(tmp_path, imports, action, url, count=6):
        assert code == 0, output[-3000:]
    assert len(optuna.get_all_study_summaries(url)) == 6


def test_two_workers_share_one_study(tmp_path, tiny_oct_dir, tracking_uri):
    started = time.time()
    args = search_args(tmp_path, tiny_oct_dir, "two-workers", "--n_trials", "5", "--workers", "2", "--seed", "0")
    out = experiments(*args, "--prune_warmup", "0").stdout
    wall = time.time() - started
    study = load(tracking_uri, "two-workers")
    trials = study.get_trials()
    # a trial asked at the same moment as the budget's last one is marked surplus, failed, and never run
    surplus = [t for t in trials if t.user_attrs.get("surplus")]
    assert all(t.state == TrialState.FAIL and "worker" not in t.user_attrs for t in surplus), surplus
    trials = [t for t in trials if not t.user_attrs.get("surplus")]
    # every trial of the budget ran once and ended complete or pruned; none lost, none run twice
    assert sorted(t.number for t in trials) == list(range(5)), [(t.number, t.state) for t in trials]
    assert {t.state for t in trials} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert len({t.user_attrs["worker"] for t in trials}) == 2, "both workers took trials"
    overlapping = any(
        a.datetime_start < b.datetime_complete and b.datetime_start < a.datetime_complete
        for a in trials
        for b in trials
        if a.number < b.number
    )
    assert overlapping, "the two workers ran trials at the same time"

    client = mlflow.MlflowClient(tracking_uri)
    parent = client.get_run(study.user_attrs["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["workflow"] == "search"
    runs = {r.info.run_id: r for r in children(client, parent.info.run_id)}
    assert sorted(t.user_attrs["mlflow_run_id"] for t in trials) == sorted(runs), "one MLflow child run per trial"
    for trial in trials:
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["search.trial"] == str(trial.number)
        assert run.data.tags["search.state"] == trial.state.name
        assert float(run.data.params["learning_rate"]) == pytest.approx(trial.params["learning_rate"], rel=1e-5)
        assert run.data.params["batch_size"] == trial.params["batch_size"]
        validated = client.get_metric_history(run.info.run_id, "0_key/val_mean_dice")
        # what the study holds is what the run's validation measured, epoch by epoch
        assert {m.step: m.value for m in validated} == pytest.approx(trial.intermediate_values)
        if trial.state == TrialState.PRUNED:
            assert len(validated) == trial.user_attrs["pruned_at_epoch"] < 3
        else:
            assert len(validated) == 3 and trial.value == pytest.approx(max(m.value for m in validated))

    best = study.best_trial
    assert parent.data.tags["best_trial"] == str(best.number)
    assert parent.data.tags["best_child"] == best.user_attrs["mlflow_run_id"]
    assert parent.data.metrics["best_val_mean_dice"] == pytest.approx(best.value)
    assert parent.data.metrics["trials_pruned"] == sum(t.state == TrialState.PRUNED for t in trials)
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "search")}
    assert logged == {"search/trials.json", "search/search.png"}
    print(f"two workers, 5 trials: {wall:.0f} s")

    # the best trial's command, as printed, trains the same configuration again
    command = shlex.split(out.split("re-run it with:")[1].strip().splitlines()[0])
    assert command[:3] == ["python", "-m", "monai.bundle"]
    rerun = subprocess.run([sys.executable, *command[1:]], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    experiment = client.get_experiment_by_name("oct_layers")
    again = client.search_runs([experiment.experiment_id], "tags.workflow = 'train'", order_by=["start_time DESC"])[0]
    assert again.info.run_id not in runs
    assert float(again.data.params["learning_rate"]) == pytest.approx(best.params["learning_rate"], rel=1e-5)
    assert again.data.params["batch_size"] == best.params["batch_size"]


def test_pruned_trials_are_marked_and_a_used_budget_runs_nothing(tmp_path, tiny_oct_dir, tracking_uri):
    # a threshold no tiny model reaches: every trial is pruned at its first validation
    args = search_args(tmp_path, tiny_oct_dir, "all-pruned", "--n_trials", "2", "--pruner", "threshold:0.99")
    result = experiments(*args, "--prune_warmup", "0", check=False)
    assert result.returncode == 1 and "no trial completed" in result.stdout, result.stdout + result.stderr[-2000:]
    study = load(tracking_uri, "all-pruned")
    assert [(t.state, t.user_attrs["pruned_at_epoch"]) for t in study.get_trials()] == [(TrialState.PRUNED, 1)] * 2
    client = mlflow.MlflowClient(tracking_uri)
    for run in children(client, study.user_attrs["parent_run_id"]):
        # a pruned training stops as an ordinary run: finished, with its model and one validation
        assert run.info.status == "FINISHED" and run.data.tags["search.state"] == "PRUNED"
        assert len(client.get_metric_history(run.info.run_id, "0_key/val_mean_dice")) == 1
        assert "checkpoint/model.pt" in {a.path for a in client.list_artifacts(run.info.run_id, "checkpoint")}

    # a worker joining a study whose budget is used runs nothing
    joined = experiments("search", "oct_layers", "--join", "--study", "all-pruned", check=False)
    assert "] trial " not in joined.stdout, joined.stdout
    assert len(load(tracking_uri, "all-pruned").get_trials()) == 2

    # wrong searches: one line each, nothing created
    assert "no such study" in refused("search", "oct_layers", "--join", "--study", "nope")
    assert "searches bundle 'oct_layers'" in refused("search", "vessels", "--join", "--study", "all-pruned")
    assert "exists: add --join" in refused(*args)
    assert "is not KEY=KIND:ARGS" in refused("search", "oct_layers", "--space", "learning_rate=uniform:1:2")
    assert "needs LOW < HIGH" in refused("search", "oct_layers", "--space", "learning_rate=float:0.1:0.01")
    assert "needs choice spaces only" in refused(
        "search", "oct_layers", "--space", *SPACE, "--sampler", "grid", "--study", "grid-of-ranges"
    )
    assert "do not compare" in refused(
        "search", "oct_layers", "--space", *SPACE, "key_metric_name=choice:val_mean_dice,val_mean_iou"
    )
    assert "also in --space" in refused(
        "search", "oct_layers", "--space", *SPACE, "--set", "batch_size=2", "--study", "fixed-and-searched"
    )
    assert {s.study_name for s in optuna.get_all_study_summaries(load(tracking_uri, "all-pruned")._storage)} == {
        "all-pruned"
    }


def test_a_dead_workers_trial_runs_again(tmp_path, tiny_oct_dir, tracking_uri):
    env = {"PIPELINE_SEARCH_HEARTBEAT_S": "1"}  # stale after 4 s without a heartbeat
    args = search_args(tmp_path, tiny_oct_dir, "dead-worker", "--n_trials", "1", epochs=2)
    worker = start_search(args, env, stderr=None, start_new_session=True)
    storage = tracking_uri.replace("mlflow.db", "optuna.db")
    wait_for_first_trial(worker, "dead-worker", storage)
    os.killpg(worker.pid, signal.SIGKILL)  # the worker and its training, as a lost machine would be
    worker.wait(timeout=60)
    time.sleep(5)

    joined = experiments("search", "oct_layers", "--join", "--study", "dead-worker", env=env)
    assert "its worker stopped (no heartbeat)" in joined.stdout
    first, second = load(tracking_uri, "dead-worker").get_trials()
    assert first.state == TrialState.FAIL and second.state == TrialState.COMPLETE
    assert second.params == first.params and second.system_attrs["failed_trial"] == first.number
    assert second.datetime_start - first.datetime_start > timedelta(seconds=4)
    client = mlflow.MlflowClient(tracking_uri)
    killed = client.get_run(first.user_attrs["mlflow_run_id"])
    assert killed.info.status == "KILLED" and killed.data.tags["search.state"] == "FAIL"
    parent_id = killed.data.tags["mlflow.parentRunId"]
    trials_json = client.download_artifacts(parent_id, "search/trials.json", str(tmp_path))
    assert [row["state"] for row in json.loads(Path(trials_json).read_text())] == ["FAIL", "COMPLETE"]
    # the launcher died with its machine; the worker that finished the search ends its parent run
    assert client.get_run(parent_id).info.status == "FINISHED"


def test_an_interrupted_search_resumes_with_the_interrupted_trial(tmp_path, tiny_oct_dir, tracking_uri):
    """Ctrl-C stops a search; resumed with --join, it runs the interrupted trial's values again, and the interruption
    counts as no failure (--max_failures 1 would otherwise stop the resumed search at once)."""
    # epochs enough that Ctrl-C lands inside the training, however loaded the machine is when it starts
    args = search_args(tmp_path, tiny_oct_dir, "interrupted", "--n_trials", "1", "--max_failures", "1", epochs=5)
    search = start_search(args, as_in_a_terminal=True)
    storage = tracking_uri.replace("mlflow.db", "optuna.db")
    wait_for_first_trial(search, "interrupted", storage)
    os.killpg(search.pid, signal.SIGINT)  # Ctrl-C: the terminal signals the search and its training
    output = search.communicate(timeout=300)[0]
    assert search.returncode != 0 and "search interrupted" in output, output[-3000:]

    resumed = experiments("search", "oct_layers", "--join", "--study", "interrupted")
    assert "] trial 1:" in resumed.stdout and "failed: this worker stops" not in resumed.stdout, resumed.stdout
    first, second = load(tracking_uri, "interrupted").get_trials()
    assert first.state == TrialState.FAIL and first.user_attrs["interrupted"], first
    assert second.state == TrialState.COMPLETE and second.params == first.params
    client = mlflow.MlflowClient(tracking_uri)
    assert client.get_run(first.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    parent = client.get_run(first.user_attrs["mlflow_run_id"]).data.tags["mlflow.parentRunId"]
    assert client.get_run(parent).info.status == "FINISHED", "the resumed search ended its parent run"
    assert client.get_run(parent).data.tags["best_child"] == second.user_attrs["mlflow_run_id"]


def test_the_last_worker_stopped_by_failures_ends_the_parent_failed(tmp_path, tiny_oct_dir, tracking_uri):
    """A worker that joined and stopped on --max_failures left the parent RUNNING, with no worker left to end it.
    The last worker ends it FAILED and says why; one that stops while another worker's trial still runs (its heartbeat
    fresh) leaves the parent to that worker."""
    env = {"PIPELINE_SEARCH_HEARTBEAT_S": "1"}  # stale after 4 s without a heartbeat
    # trainings long enough to be running still when they are stopped (then they end at once)
    args = search_args(tmp_path, tiny_oct_dir, "failing", "--n_trials", "2", "--max_failures", "1", epochs=50)
    launcher = start_search(args, env, stderr=None, start_new_session=True)
    storage = tracking_uri.replace("mlflow.db", "optuna.db")
    wait_for_first_trial(launcher, "failing", storage)
    study = load(tracking_uri, "failing")
    running = study.get_trials()[0]
    # a trial another worker ran and failed: the study holds --max_failures failures
    failed = {"error": "training failed (1): ..."}
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.FAIL, params=running.params, distributions=running.distributions, user_attrs=failed
        )
    )
    client = mlflow.MlflowClient(tracking_uri)
    parent_id = client.get_run(running.user_attrs["mlflow_run_id"]).data.tags["mlflow.parentRunId"]

    joined = experiments("search", "oct_layers", "--join", "--study", "failing", env=env, check=False)
    assert "1 trials failed: this worker stops" in joined.stdout, joined.stdout + joined.stderr[-2000:]
    assert client.get_run(parent_id).info.status == "RUNNING", "the launcher's trial still runs"

    os.killpg(launcher.pid, signal.SIGKILL)  # the launcher is lost mid-trial: the joined worker is the last
    launcher.wait(timeout=60)
    time.sleep(5)
    last = experiments("search", "oct_layers", "--join", "--study", "failing", env=env, check=False)
    assert last.returncode == 1 and "its worker stopped (no heartbeat)" in last.stdout, last.stdout
    parent = client.get_run(parent_id)
    assert parent.info.status == "FAILED", parent.info.status
    # the launcher's lost trial is no failed trial: it waits to run again when the search is resumed
    assert parent.data.tags["search.stopped"] == "1 trials failed (--max_failures 1)"
    assert client.get_run(running.user_attrs["mlflow_run_id"]).info.status == "KILLED"


def test_sigterm_stops_a_search_as_ctrl_c_does(tmp_path, tiny_oct_dir, tracking_uri):
    """``kill`` (or a scheduler's time limit) on a search killed it outright: its training went on without it, its
    trial and the parent run stayed RUNNING, and the trial later counted as a dead worker's failure."""
    args = search_args(tmp_path, tiny_oct_dir, "terminated", "--n_trials", "1", epochs=50)
    search = start_search(args)
    storage = tracking_uri.replace("mlflow.db", "optuna.db")
    wait_for_first_trial(search, "terminated", storage)
    search.send_signal(signal.SIGTERM)  # to the search alone, as `kill PID` does
    output = search.communicate(timeout=300)[0]
    assert search.returncode == 1 and "search interrupted" in output, output[-3000:]
    trial = load(tracking_uri, "terminated").get_trials()[0]
    assert trial.state == TrialState.FAIL and trial.user_attrs["interrupted"], trial
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert run.info.status == "KILLED", "the training was stopped, its run ended"
    assert client.get_run(run.data.tags["mlflow.parentRunId"]).info.status == "KILLED"


def test_ctrl_c_on_several_workers_marks_every_running_trial_interrupted(tmp_path, tiny_oct_dir, tracking_uri):
    """Ctrl-C reaches ``--workers N``'s workers twice (from the terminal, and passed on by their launcher); the
    second one interrupted the stopping of the trial, which stayed RUNNING, to be failed later as a dead worker's."""
    args = search_args(tmp_path, tiny_oct_dir, "several", "--n_trials", "2", "--workers", "2", epochs=50)
    search = start_search(args, as_in_a_terminal=True)
    storage = tracking_uri.replace("mlflow.db", "optuna.db")
    deadline = time.time() + 300
    while True:  # both workers' trainings have started
        assert time.time() < deadline and search.poll() is None, "the trials did not start"
        try:
            trials = optuna.load_study(study_name="several", storage=storage).get_trials()
        except KeyError:
            trials = []
        if len(trials) >= 2 and all("mlflow_run_id" in t.user_attrs for t in trials[:2]):
            break
        time.sleep(0.5)
    os.killpg(search.pid, signal.SIGINT)
    output = search.communicate(timeout=300)[0]
    assert search.returncode == 1 and "search interrupted" in output, output[-3000:]
    trials = load(tracking_uri, "several").get_trials()
    interrupted = [t for t in trials if t.state == TrialState.FAIL]
    assert len(interrupted) == 2 and all(t.user_attrs.get("interrupted") for t in interrupted), trials
    assert [t.state for t in trials if t not in interrupted] == [TrialState.WAITING] * 2, "both run again first"
    client = mlflow.MlflowClient(tracking_uri)
    assert {client.get_run(t.user_attrs["mlflow_run_id"]).info.status for t in interrupted} == {"KILLED"}
    assert client.get_run(load(tracking_uri, "several").user_attrs["parent_run_id"]).info.status == "KILLED"


def test_a_training_killed_after_reporting_fails_its_trial_and_ends_its_run(tmp_path, tiny_oct_dir, tracking_uri):
    """A trial's training killed outright after a validation (the kernel's out-of-memory killer sends SIGKILL)
    cannot end its MLflow run: the trial failed, but the run stayed RUNNING for good."""
    import psutil

    args = search_args(tmp_path, tiny_oct_dir, "oom", "--n_trials", "1", "--max_failures", "1", epochs=50)
    search = start_search(args)
    storage = tracking_uri.replace("mlflow.db", "optuna.db")
    deadline = time.time() + 300
    while True:  # the training has reported a validation
        assert time.time() < deadline and search.poll() is None, "the trial did not report"
        try:
            trials = optuna.load_study(study_name="oom", storage=storage).get_trials()
        except KeyError:
            trials = []
        if trials and trials[0].intermediate_values:
            break
        time.sleep(0.5)
    for training in psutil.Process(search.pid).children():
        training.send_signal(signal.SIGKILL)
    output = search.communicate(timeout=300)[0]
    assert search.returncode == 1 and "trial 0 FAIL: training failed (-9)" in output, output[-3000:]
    trial = load(tracking_uri, "oom").get_trials()[0]
    assert trial.state == TrialState.FAIL and trial.intermediate_values
    client = mlflow.MlflowClient(tracking_uri)
    run = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert (run.info.status, run.data.tags["search.state"]) == ("FAILED", "FAIL")
    assert client.get_run(run.data.tags["mlflow.parentRunId"]).info.status == "FAILED"


def test_a_trial_whose_training_diverges_is_pruned_not_failed(tmp_path, tiny_oct_dir, tracking_uri):
    """A learning rate the network cannot train with stops its training with one line: the trial is pruned (the
    space's answer), so --max_failures 1 does not stop the search, and the next trial runs. A grid search ends
    when its grid is used (the grid sampler's own request to stop raised outside Optuna's loop and crashed it)."""
    args = search_args(tmp_path, tiny_oct_dir, "diverging", "--n_trials", "2", "--max_failures", "1", epochs=1)
    space = args.index("--space")
    args[space + 1 : space + 1 + len(SPACE)] = ["learning_rate=choice:1e30,0.002"]
    result = experiments(*args, "--sampler", "grid", check=False)
    study = load(tracking_uri, "diverging")
    states = {t.params["learning_rate"]: t.state for t in study.get_trials()}
    assert states == {"1e30": TrialState.PRUNED, "0.002": TrialState.COMPLETE}, result.stdout + result.stderr[-3000:]
    (diverged,) = [t for t in study.get_trials() if t.params["learning_rate"] == "1e30"]
    assert "the training diverged at epoch 1" in diverged.user_attrs["diverged"]
    assert result.returncode == 0, result.stdout


LOST_WORKERS = """
import json, sys, time

import optuna
from optuna.distributions import FloatDistribution

from clinseg.pipelines import search
from clinseg.pipelines.studies import open_storage

storage = open_storage(sys.argv[1])
study = optuna.create_study(storage=storage, study_name="lost", direction="maximize")
study.set_user_attr("max_failures", 1)
space = {"learning_rate": FloatDistribution(1e-4, 1e-2, log=True)}


def lose_worker(trial):  # a worker that took the trial, whose training reported and was pruned, then was killed
    trial.set_user_attr("worker", "lost-host:1")
    trial.set_user_attr("pruned_at_epoch", 2)
    storage.record_heartbeat(trial._trial_id)
    time.sleep(5)  # stale after 4 s without a heartbeat
    search.fail_stale_trials(study, "", "next-worker")


lose_worker(study.ask(space))
after_first = len(search.failed_trials(study))
retry = study.ask(space)  # the next worker takes the retry first, and starts its training afresh
search.start_afresh(retry)
inherited = {key: retry.user_attrs.get(key) for key in search.RUN_ATTRS}
lose_worker(retry)
rows = search.trial_rows(study)
print(json.dumps({"after_first": after_first, "after_second": len(search.failed_trials(study)),
                  "inherited": inherited, "params": [t.params for t in study.get_trials()],
                  "states": [t.state.name for t in study.get_trials()], "failure": [r["failure"] for r in rows]}))
"""


def test_a_lost_worker_is_no_failed_trial_and_its_retry_starts_afresh(tmp_path):
    """A worker killed mid-trial (SIGKILL, a lost machine) is no answer about the space: its trial counted towards
    --max_failures, so --max_failures 1 stopped the search at the next ask. And the retry inherited the lost
    training's record (pruned at epoch 2), which marked the retry PRUNED however its own training ended. Values
    whose retry loses its worker too do count: such a training may take its machine down."""
    env = {**os.environ, "PIPELINE_SEARCH_HEARTBEAT_S": "1"}
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    result = subprocess.run([sys.executable, "-c", LOST_WORKERS, url], capture_output=True, text=True, env=env,
                            cwd=REPO_ROOT, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    outcome = json.loads(result.stdout.strip().splitlines()[-1])
    assert outcome["after_first"] == 0, "a lost worker's trial is not a failed trial"
    assert outcome["inherited"] == dict.fromkeys(("mlflow_run_id", "pruned_at_epoch", "diverged", "error"))
    assert outcome["states"] == ["FAIL", "FAIL"] and outcome["params"][0] == outcome["params"][1]
    assert outcome["after_second"] == 1, "the same values lost their worker twice"
    assert outcome["failure"][0].startswith("its worker was lost (no heartbeat; not counted")
    assert outcome["failure"][1].startswith("its worker was lost (no heartbeat), as that of trial 0")
    assert "it runs again once (not counted as a failed trial)" in result.stdout


def test_a_killed_workers_training_stops_with_it(tmp_path, tiny_oct_dir, tracking_uri):
    """A worker killed alone (``kill -9`` on its process id, the out-of-memory killer choosing it) left its training
    running on, orphaned: it kept the GPU and reported into a trial that the next worker failed as a dead worker's and
    ran again beside it. The training stops with its worker, and its run ends KILLED."""
    import psutil

    args = search_args(tmp_path, tiny_oct_dir, "orphan", "--n_trials", "1", epochs=50)
    search = start_search(args)
    wait_for_first_trial(search, "orphan", tracking_uri.replace("mlflow.db", "optuna.db"))
    (training,) = psutil.Process(search.pid).children()
    search.send_signal(signal.SIGKILL)
    search.wait(timeout=60)
    try:
        training.wait(timeout=120)
    except psutil.TimeoutExpired:
        training.kill()
        pytest.fail("the training ran on after its worker was killed")
    run_id = load(tracking_uri, "orphan").get_trials()[0].user_attrs["mlflow_run_id"]
    assert mlflow.MlflowClient(tracking_uri).get_run(run_id).info.status == "KILLED"


def test_a_worker_killed_among_several_is_replaced_and_its_trial_runs_again(tmp_path, tiny_oct_dir, tracking_uri):
    """``--workers 2``, one worker killed alone (``kill -9``) mid-trial: the other used the budget up while the lost
    trial still counted as running, and the search ended FAILED with that trial RUNNING and its parent run open
    until a later ``--join``. The launcher replaces the killed worker once its trial's heartbeat is stale: the
    trial runs again, the budget is met, and the parent run ends FINISHED."""
    import psutil

    env = {"PIPELINE_SEARCH_HEARTBEAT_S": "1"}  # stale after 4 s without a heartbeat
    args = search_args(tmp_path, tiny_oct_dir, "replaced", "--n_trials", "3", "--workers", "2", epochs=2)
    search = start_search(args, env)
    storage = tracking_uri.replace("mlflow.db", "optuna.db")
    wait_for_first_trial(search, "replaced", storage)
    first = optuna.load_study(study_name="replaced", storage=storage).get_trials()[0]
    victim = int(first.user_attrs["worker"].rsplit(":", 1)[1])
    assert victim in {worker.pid for worker in psutil.Process(search.pid).children()}
    os.kill(victim, signal.SIGKILL)
    output = search.communicate(timeout=600)[0]
    assert search.returncode == 0, output[-3000:]
    assert "a new worker takes its place" in output, output[-3000:]

    study = load(tracking_uri, "replaced")
    trials = [t for t in study.get_trials() if not t.user_attrs.get("surplus")]
    lost = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in lost] == [first.number] and not lost[0].user_attrs.get("error"), lost
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials) == 3
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == first.number]
    assert len(retry) == 1 and retry[0].params == first.params
    client = mlflow.MlflowClient(tracking_uri)
    assert client.get_run(study.user_attrs["parent_run_id"]).info.status == "FINISHED"
    assert client.get_run(first.user_attrs["mlflow_run_id"]).info.status == "KILLED"
