"""Hyper-parameter search over a bundle's training with Optuna, on a study that several processes or machines share.

    python -m clinseg.pipelines.experiments search oct_layers \
        --space learning_rate=loguniform:1e-4:1e-2 batch_size=choice:2,4 --n_trials 20 --workers 2
    # another machine joins the same study (its storage must be a database both reach):
    python -m clinseg.pipelines.experiments search oct_layers --join --study STUDY --storage postgresql+psycopg2://...

Every trial is one ``python -m monai.bundle run training`` of the bundle's own config, with the trial's values as
overrides, recorded as an MLflow child run under the search's parent run. The study lives in a relational
database (default: ``optuna.db`` beside the MLflow SQLite store), so workers coordinate through it alone:

- each worker asks the study for a trial, runs it, and tells the study its result; trial numbers are unique, and a
  trial asked beyond ``--n_trials`` (two workers asking at the same moment) is marked ``surplus`` and never run;
- the trial's training reports its validation key metric to the study after every validation
  (:func:`clinseg.pipelines.engine.handlers.trials.attach_trial_reporter`, called by the shared workflow when
  ``PIPELINE_SEARCH_TRIAL`` is set) and stops when the pruner says so; the trial ends ``PRUNED`` and its MLflow run
  is tagged ``search.state = PRUNED``;
- a running trial records a heartbeat; a trial whose worker died (no heartbeat for ``HEARTBEAT_GRACE_S``) is
  failed by the next worker that asks, and run again once with the same values; a lost worker is no failure of
  the training, and counts towards ``--max_failures`` only when the retry loses its worker too.

The value of a trial is the best validation key metric of its training, the one its checkpoint was chosen by.
The search is over when ``--n_trials`` trials have completed or been pruned (failed trials do not count; the search
stops after ``--max_failures`` of them). A training that diverged (settings the network cannot train with, such as
a learning rate too high) is pruned, not failed: it says something about the space, not about the machine.
It ends with the trials' table, a picture of the search, and the best
trial as the command that re-runs it. The last worker to stop (no other one running a trial) ends the parent run:
FINISHED, KILLED (Ctrl-C or SIGTERM, which stop the running trainings and leave their trials to run again first) or
FAILED with the tag ``search.stopped`` saying why (``--max_failures`` trials failed).

The space is ``KEY=KIND:ARGS`` per config id: ``float:LOW:HIGH``, ``loguniform:LOW:HIGH``, ``int:LOW:HIGH`` or
``choice:A,B,...`` (each choice is given to the config as typed). ``--sampler grid`` (every combination of choice
spaces, in random order) is the grid sweep of ``experiments sweep`` on this engine; ``random`` samples uniformly;
``tpe`` (default) is Optuna's Tree-structured Parzen Estimator.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from clinseg.datasets.errors import InputError
from clinseg.pipelines.cli import split_values
from clinseg.pipelines.studies import (
    HEARTBEAT_GRACE_S,
    HEARTBEAT_INTERVAL_S,
    SEARCH_TRIAL_ENV,
    make_pruner,
    open_storage,
    shown_url,
)

STUDY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
SPACE_KINDS = ("float", "loguniform", "int", "choice")
SAMPLERS = ("tpe", "random", "grid")


# ---------------------------------------------------------------------------------------------------- the space
def parse_space(items: Sequence[str]) -> dict:
    """``KEY=KIND:ARGS`` items as Optuna distributions, keyed by config id. Raises InputError naming the item."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    space = {}
    for item in items:
        key, _, spec = item.partition("=")
        kind, _, args = spec.partition(":")
        what = f"--space {item!r}"
        if not key or kind not in SPACE_KINDS or not args:
            raise InputError(what, f"is not KEY=KIND:ARGS with KIND one of {', '.join(SPACE_KINDS)}.")
        if key in space:
            raise InputError(what, f"{key} is given twice.")
        if kind == "choice":
            choices = split_values(args, what)  # a choice may be a list: choice:[8,16],[16,32]
            if len(choices) < 2 or len(set(choices)) < len(choices) or "" in choices:
                raise InputError(what, "a choice needs at least two distinct, non-empty values.")
            space[key] = CategoricalDistribution(choices)
            continue
        bounds = args.split(":")
        try:
            low, high = (int(b) for b in bounds) if kind == "int" else (float(b) for b in bounds)
        except ValueError:
            numbers = "integers" if kind == "int" else "numbers"
            raise InputError(what, f"{kind} needs LOW:HIGH, two {numbers}.") from None
        if not low < high or (kind == "loguniform" and low <= 0):
            raise InputError(what, "needs LOW < HIGH" + (", both above 0" if kind == "loguniform" else "") + ".")
        if kind == "int":
            space[key] = IntDistribution(low, high)
        else:
            space[key] = FloatDistribution(low, high, log=kind == "loguniform")
    if not space:
        raise InputError("--space", "is empty: give at least one KEY=KIND:ARGS.")
    return space


def override_text(value) -> str:
    """A trial's value as a command-line override: floats with 6 significant digits, the rest as given."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def make_sampler(name: str, space: dict, seed: int | None):
    import optuna

    if name == "tpe":
        # constant_liar: a worker treats the trials still running elsewhere as bad, so workers do not all propose
        # the same point at once
        return optuna.samplers.TPESampler(seed=seed, constant_liar=True, n_startup_trials=min(10, 2 * len(space)))
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "grid":
        not_choices = [k for k, d in space.items() if not isinstance(d, optuna.distributions.CategoricalDistribution)]
        if not_choices:
            raise InputError("--sampler grid", f"needs choice spaces only; {', '.join(not_choices)} are ranges.")
        return optuna.samplers.GridSampler({k: list(d.choices) for k, d in space.items()}, seed=seed)
    raise InputError("--sampler", f"{name!r} is not one of {', '.join(SAMPLERS)}.")


# -------------------------------------------------------------------------------------------------- the storage
def default_storage(tracking_uri: str) -> str:
    """``optuna.db`` beside a local MLflow SQLite store; a tracking server needs ``--storage`` (a database every
    worker reaches). Its own file: Optuna and MLflow both keep an ``alembic_version`` table."""
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri[len('sqlite:///') :]).parent / 'optuna.db'}"
    raise InputError(
        "--storage",
        f"is needed with the tracking server {tracking_uri}: a database URL that every worker reaches "
        "(postgresql+psycopg2://user@host/db).",
    )


def load_study(storage, name: str, sampler=None, pruner=None):
    import optuna

    try:
        return optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    except KeyError:
        known = [s.study_name for s in optuna.get_all_study_summaries(storage)]
        raise InputError(f"--study {name!r}", f"no such study in {shown_url(storage.url)}; studies: {known}.") from None


# ------------------------------------------------------------------------------------------------- the workers
class Heartbeat:
    """Records the running trial's heartbeat in the study while its training runs (Optuna does this itself only
    inside ``study.optimize``)."""

    def __init__(self, storage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while not self.stopped.wait(HEARTBEAT_INTERVAL_S):
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception as e:  # noqa: BLE001 - a missed beat is retried; the study decides on staleness
                print(f"search: heartbeat of trial {self.trial_id} not recorded ({type(e).__name__})", file=sys.stderr)

    def __enter__(self):
        self.storage.record_heartbeat(self.trial_id)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()
        self.thread.join(timeout=5)


def counted_trials(study) -> list:
    """The trials that use the budget: finished, pruned, running or waiting (failed ones do not)."""
    from optuna.trial import TrialState

    states = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
    return study.get_trials(deepcopy=False, states=states)


def failed_trials(study) -> list:
    """The failed trials that count towards ``--max_failures``: those whose training itself failed (the worker
    records why, ``error``). A trial whose worker was lost (killed, machine lost: no heartbeat), one interrupted by
    the user and one asked beyond the budget (``surplus``) say nothing about the space or the training, and do not
    count; the values of a lost worker's trial that lose their worker again do (:func:`fail_stale_trials`)."""
    from optuna.trial import TrialState

    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    return [t for t in failed if t.user_attrs.get("error")]


# what a trial's training records about its own run (the trial reporter, :func:`run_trial`): a retry of a lost
# worker's trial inherits the lost trial's attributes (Optuna copies them), which must not describe the retry's run
RUN_ATTRS = ("mlflow_run_id", "pruned_at_epoch", "diverged", "error")


def start_afresh(trial) -> None:
    """Clear what a retried trial inherited of the lost trial's run (:data:`RUN_ATTRS`; Optuna cannot delete a
    user attribute, so they are set to None): a lost training that had been pruned would mark its retry pruned
    however that ended, and the lost run's MLflow id would be ended and tagged as the retry's."""
    for key in RUN_ATTRS:
        if trial.user_attrs.get(key) is not None:
            trial.set_user_attr(key, None)


def search_over(study) -> bool:
    """Whether the study's budget is spent: ``n_trials`` trials completed or pruned, none running or waiting."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    if any(t.state in (TrialState.RUNNING, TrialState.WAITING) for t in trials):
        return False
    done = sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    return done >= study.user_attrs["n_trials"]


def training_command(settings: dict, params: dict, run_name: str | None) -> list[str]:
    command = ["python", "-m", "monai.bundle", "run", "training", "--config_file", settings["config_file"]]
    if run_name:
        command += ["--run_name", run_name]
    for key, value in {**settings["fixed"], **params}.items():
        command += [f"--{key}", value]
    return command


def tell(study, trial, *args, **kwargs) -> None:
    """``study.tell``, less the grid sampler's request to stop once its grid is used: ``Study.stop`` raises outside
    ``Study.optimize``, after the trial's state is stored, and the workers end on their own budget (``--n_trials``)."""
    try:
        study.tell(trial, *args, **kwargs)
    except RuntimeError as e:
        if "Study.stop" not in str(e):
            raise


def run_trial(study, storage, trial, settings: dict, worker: str, verbose: bool) -> str:
    """Run one trial's training as a child process and tell the study how it ended; returns its state."""
    from optuna.trial import TrialState

    from clinseg.pipelines.engine.workflow import DIVERGED
    from clinseg.pipelines.paths import SOURCE_ROOT
    from clinseg.pipelines.tracking import RUN_TAGS_ENV

    params = {key: override_text(value) for key, value in trial.params.items()}
    run_name = f"{study.study_name}-t{trial.number:03d}"
    start_afresh(trial)
    trial.set_user_attr("worker", worker)
    trial.set_user_attr("run_name", run_name)
    command = training_command(settings, params, run_name)
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": settings["tracking_uri"],
        "PIPELINE_PARENT_RUN_ID": settings["parent_run_id"],
        RUN_TAGS_ENV: json.dumps({"search.study": study.study_name, "search.trial": str(trial.number)}),
        SEARCH_TRIAL_ENV: json.dumps(
            {
                "storage": storage.url,
                "study": study.study_name,
                "trial_id": trial._trial_id,
                "pruner": settings["pruner"],
                "warmup_epochs": settings["warmup_epochs"],
            }
        ),
    }
    shown = " ".join(f"{k}={v}" for k, v in params.items())
    print(f"[{worker}] trial {trial.number}: {shown}", flush=True)
    started = time.time()
    # the training's error output goes to an unnamed file, not a pipe: a training whose worker was killed writes on
    # while it stops (stop_with_parent), and into a pipe no one reads any more it would fail with a broken pipe
    # instead of ending its run KILLED
    error_output = None if verbose else tempfile.TemporaryFile(mode="w+b")
    # started before the heartbeat's thread: a child's start-up code (stop_with_parent) runs safely only in a
    # process without other threads
    child = subprocess.Popen(
        [sys.executable, *command[1:]],
        cwd=SOURCE_ROOT,
        env=env,
        stdout=None if verbose else subprocess.DEVNULL,
        stderr=error_output,
        preexec_fn=stop_with_parent(),
    )
    with Heartbeat(storage, trial._trial_id):
        try:
            child.wait()
        except KeyboardInterrupt:
            with interrupts_deferred():
                child.send_signal(signal.SIGTERM)  # the child's run ends KILLED, its files kept
                child.wait(timeout=300)
            raise
    errors = last_output(error_output)
    recorded = storage.get_trial(trial._trial_id)  # what the training reported (the study's cache may be stale)
    values = list(recorded.intermediate_values.values())
    best = max(values) if values else None
    diverged = [line for line in (errors or "").splitlines() if DIVERGED in line]
    if child.returncode != 0 and diverged:
        # settings the network cannot train with (a learning rate too high) are an answer about the space, not a
        # failure of the machine: pruned, as a trial that would score worst, and no step towards --max_failures
        state, note = TrialState.PRUNED, diverged[-1].strip()[:300]
        trial.set_user_attr("diverged", note)
    elif child.returncode != 0:
        state, note = TrialState.FAIL, f"training failed ({child.returncode}): {(errors or '').strip()[-300:]}"
        trial.set_user_attr("error", note)
    elif recorded.user_attrs.get("pruned_at_epoch") is not None:
        state, note = TrialState.PRUNED, f"pruned at epoch {recorded.user_attrs['pruned_at_epoch']}"
    elif best is None:
        state, note = TrialState.FAIL, "no validation ran (max_epochs below val_interval): nothing to compare"
        trial.set_user_attr("error", note)
    else:
        state, note = TrialState.COMPLETE, "complete"
    tell(study, trial, best if state == TrialState.COMPLETE else None, state=state)
    # a training killed outright (the kernel's out-of-memory killer, SIGKILL) could not end its run
    end_left_running(settings["tracking_uri"], recorded.user_attrs.get("mlflow_run_id"), "FAILED", state.name, worker)
    metric = settings["key_metric"]
    value = f", best {metric} {best:.4f}" if best is not None else ""
    print(f"[{worker}] trial {trial.number} {state.name}: {note}{value} ({time.time() - started:.0f} s)", flush=True)
    return state.name


def last_output(output, size: int = 65536) -> str:
    """The last ``size`` bytes of a child's output file (the training's last error lines), as text; the file is
    closed. '' for no file."""
    if output is None:
        return ""
    with output:
        output.seek(max(0, output.seek(0, os.SEEK_END) - size))
        return output.read().decode("utf-8", errors="replace")


def stop_with_parent():
    """A child's start-up code (``preexec_fn``) that has the kernel send it SIGTERM when this worker dies (Linux).

    A worker killed alone (``kill -9``, the out-of-memory killer choosing it) left its training running, orphaned:
    holding its GPU, and reporting into a trial that the next worker fails as a dead worker's and runs again beside
    it. SIGTERM stops the training as an interruption does: its run ends KILLED. None where there is no such request.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    parent, pr_set_pdeathsig, sigterm = os.getpid(), 1, int(signal.SIGTERM)

    def request() -> None:
        prctl(pr_set_pdeathsig, sigterm)
        if os.getppid() != parent:  # the worker died before the request was made
            os.kill(os.getpid(), sigterm)

    return request


@contextlib.contextmanager
def interrupts_deferred():
    """Run the block to its end through further Ctrl-C and SIGTERM: stopping a trial is interrupted by a second
    signal as easily as by the first (the launcher of ``--workers N`` passes the terminal's Ctrl-C on to workers that
    the terminal signalled already), and a trial left RUNNING would later be failed as a dead worker's and count
    towards ``--max_failures``. The interruption in progress is raised after the block."""
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def interrupt_trial(study, storage, trial, tracking_uri: str, worker: str) -> None:
    """A trial stopped by the user, not failed: it does not count towards --max_failures, and the search, resumed
    with --join, runs its values again first (as a dead worker's trial is). Its MLflow run ends KILLED where its
    training could not end it (interrupted while it was still starting, before its handlers were in place)."""
    from optuna.trial import TrialState

    recorded = storage.get_trial(trial._trial_id)
    if recorded.state != TrialState.RUNNING:  # told already
        return
    trial.set_user_attr("interrupted", True)
    tell(study, trial, state=TrialState.FAIL)
    study.enqueue_trial(trial.params, user_attrs={"retried_from": trial.number})
    end_left_running(tracking_uri, recorded.user_attrs.get("mlflow_run_id"), "KILLED", "FAIL", worker)


def end_left_running(tracking_uri: str, run_id: str | None, status: str, trial_state: str, worker: str) -> None:
    """End the MLflow run ``run_id`` of a trial with ``status`` if its training left it RUNNING (killed outright,
    or stopped before it could end it), and tag it with the trial's state (``search.state``)."""
    from clinseg.pipelines.tracking import client_for

    if not run_id:
        return
    try:
        client = client_for(tracking_uri)
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status)
        client.set_tag(run_id, "search.state", trial_state)
    except Exception as e:  # noqa: BLE001 - the study's record stands; only the run's copy is missing
        print(f"[{worker}] could not mark run {run_id}: {e}", file=sys.stderr)


def fail_stale_trials(study, tracking_uri: str, worker: str) -> None:
    """Fail the trials whose worker stopped beating (killed, machine lost); the study enqueues each once more, with
    the same values. Their MLflow runs, left RUNNING by the killed training, end KILLED.

    A lost worker is no answer about the space, so its trial does not count towards ``--max_failures``
    (:func:`failed_trials`); but values whose retry loses its worker too (a training that takes its machine down,
    such as one the whole container is killed for) are failed with the reason, and count."""
    import optuna
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    running = {t.number: t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if not running:
        return
    storage = study._storage
    for trial_id in storage._get_stale_trial_ids(study._study_id):  # before they are failed: a failed trial's
        trial = storage.get_trial(trial_id)  # attributes cannot change
        history = trial.system_attrs.get("retry_history") or []
        if not history:
            continue
        error = (f"its worker was lost (no heartbeat), as that of trial {history[0]} with the same values: the "
                 "training may take its machine down")  # fmt: skip
        try:
            storage.set_trial_user_attr(trial_id, "error", error)
        except UpdateFinishedTrialError:  # another worker failed it meanwhile
            pass
    optuna.storages.fail_stale_trials(study)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if trial.number not in running:
            continue
        if trial.user_attrs.get("error"):
            print(f"[{worker}] trial {trial.number} FAIL: {trial.user_attrs['error']}", flush=True)
        else:
            print(f"[{worker}] trial {trial.number}: its worker stopped (no heartbeat); it runs again once "
                  "(not counted as a failed trial)", flush=True)  # fmt: skip
        end_left_running(tracking_uri, trial.user_attrs.get("mlflow_run_id"), "KILLED", "FAIL", worker)


def work(storage, study_name: str, worker_index: int, verbose: bool = False) -> str:
    """One worker: ask, run, tell, until the study's budget is used; returns why it stopped: ``budget`` or
    ``failures`` (``--max_failures`` trials failed)."""
    import optuna
    from optuna.trial import TrialState

    study = load_study(storage, study_name)
    settings = dict(study.user_attrs)
    space = {k: optuna.distributions.json_to_distribution(v) for k, v in settings["space"].items()}
    # one seed per worker: workers with one seed would propose the same first points
    seed = None if settings["seed"] is None else settings["seed"] + worker_index
    study.sampler = make_sampler(settings["sampler"], space, seed)
    study.pruner = make_pruner(settings["pruner"], settings["warmup_epochs"])
    worker = f"{socket.gethostname()}:{os.getpid()}"
    while True:
        fail_stale_trials(study, settings["tracking_uri"], worker)
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))  # retries come first
        if not waiting and len(counted_trials(study)) >= settings["n_trials"]:
            return "budget"
        if len(failed_trials(study)) >= settings["max_failures"]:
            print(f"[{worker}] {settings['max_failures']} trials failed: this worker stops", flush=True)
            return "failures"
        trial = study.ask(space)
        try:
            ahead = [t for t in counted_trials(study) if t.number < trial.number]
            if len(ahead) >= settings["n_trials"]:  # another worker took the last trial at the same moment
                trial.set_user_attr("surplus", True)
                tell(study, trial, state=TrialState.FAIL)
                return "budget"
            run_trial(study, storage, trial, settings, worker, verbose)
        except KeyboardInterrupt:  # also between ask and the training's start, or while the result is told
            with interrupts_deferred():
                interrupt_trial(study, storage, trial, settings["tracking_uri"], worker)
            raise


def parent_end(study, status: str, launcher: bool) -> tuple[str | None, str | None]:
    """How this worker ends the search's parent run: its MLflow status and why, or ``(None, None)`` to leave it
    RUNNING for a worker that still runs a trial (its heartbeat says so; a dead worker's trial is failed first),
    which ends it in turn. Without one running, the last worker ends it: FINISHED when the budget is used, KILLED
    when interrupted, FAILED when ``--max_failures`` trials failed (every worker stops then, and one that joins
    later stops at once); the launcher ends it also otherwise, with its own status."""
    from optuna.trial import TrialState

    settings = study.user_attrs
    fail_stale_trials(study, settings["tracking_uri"], f"{socket.gethostname()}:{os.getpid()}")
    if study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        return None, None
    if search_over(study):
        return "FINISHED", None
    if status == "KILLED":
        return "KILLED", None
    failed = len(failed_trials(study))
    if failed >= settings["max_failures"]:
        return "FAILED", f"{failed} trials failed (--max_failures {settings['max_failures']})"
    return (status, None) if launcher else (None, None)


# ---------------------------------------------------------------------------------------------- the whole search
def failure_reason(trial) -> str | None:
    """Why a failed trial failed, and whether it counts towards ``--max_failures`` (:func:`failed_trials`)."""
    from optuna.trial import TrialState

    if trial.state != TrialState.FAIL:
        return None
    if trial.user_attrs.get("error"):
        return str(trial.user_attrs["error"])
    if trial.user_attrs.get("interrupted"):
        return "interrupted (not counted as a failure; run again first)"
    return "its worker was lost (no heartbeat; not counted as a failure; run again once)"


def trial_rows(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get("surplus"):
            continue
        rows.append(
            {
                "trial": t.number,
                "state": "INTERRUPTED" if t.user_attrs.get("interrupted") else t.state.name,
                "value": t.value,
                "best_intermediate": max(t.intermediate_values.values()) if t.intermediate_values else None,
                "epochs_validated": len(t.intermediate_values),
                "pruned_at_epoch": t.user_attrs.get("pruned_at_epoch"),
                "params": {k: override_text(v) for k, v in t.params.items()},
                "run_name": t.user_attrs.get("run_name"),
                "mlflow_run_id": t.user_attrs.get("mlflow_run_id"),
                "worker": t.user_attrs.get("worker"),
                "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                if t.datetime_complete and t.datetime_start
                else None,
                "retried_from": t.system_attrs.get("failed_trial", t.user_attrs.get("retried_from")),
                "interrupted": bool(t.user_attrs.get("interrupted")),
                "failure": failure_reason(t),
            }
        )
    return rows


def format_trials(rows: list[dict], metric: str) -> str:
    keys = sorted({k for row in rows for k in row["params"]})
    header = ["trial", "state", metric, "epochs", *keys, "worker", "s"]
    lines = [header]
    for row in rows:
        value = row["value"] if row["value"] is not None else row["best_intermediate"]
        lines.append(
            [
                str(row["trial"]),
                row["state"] + (f"@{row['pruned_at_epoch']}" if row["pruned_at_epoch"] else ""),
                "" if value is None else f"{value:.4f}",
                str(row["epochs_validated"]),
                *(row["params"].get(k, "") for k in keys),
                (row["worker"] or "").rsplit(":", 1)[-1],
                "" if row["seconds"] is None else f"{row['seconds']:.0f}",
            ]
        )
    from clinseg.pipelines.cli import text_table

    return text_table(lines)


def plot_search(rows: list[dict], metric: str, title: str, path: Path) -> Path:
    """Each trial's best key metric in the order the trials started, pruned ones marked, the best so far as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from clinseg.datasets.io import atomic_write

    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = {"COMPLETE": ("o", "tab:blue", "complete"), "PRUNED": ("x", "tab:red", "pruned (best before stopping)")}
    for state, (marker, color, label) in styles.items():
        points = [(r["trial"], r["best_intermediate"]) for r in rows if r["state"] == state and r["best_intermediate"]]
        if points:
            ax.scatter(*zip(*points, strict=True), marker=marker, color=color, label=label, zorder=3)
    best, line = -math.inf, []
    for row in sorted(rows, key=lambda r: r["trial"]):
        if row["state"] == "COMPLETE" and row["value"] is not None:
            best = max(best, row["value"])
        if best > -math.inf:
            line.append((row["trial"], best))
    if line:
        ax.step(*zip(*line, strict=True), where="post", color="gray", label="best so far")
    ax.set_xlabel("trial")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(f"best validation {metric}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    n = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL")}
    caption = f"{n['COMPLETE']} complete, {n['PRUNED']} pruned, {n['FAIL']} failed trials"
    caption += f"; value = the best validation {metric} of the trial's training"
    fig.text(0.01, 0.01, caption, fontsize=8)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return out


def best_trial_command(study, rows: list[dict]) -> str | None:
    import shlex

    complete = [r for r in rows if r["state"] == "COMPLETE" and r["value"] is not None]
    if not complete:
        return None
    best = max(complete, key=lambda r: r["value"])
    settings = study.user_attrs
    command = training_command(settings, best["params"], run_name=None)
    return shlex.join(command)


def summarize(study, storage, started: float | None = None) -> tuple[list[dict], str | None]:
    """Print the trials' table and the best trial's command; write both, and a picture, into the parent run."""
    import tempfile

    from clinseg.pipelines.tracking import client_for

    settings = study.user_attrs
    metric = settings["key_metric"]
    rows = trial_rows(study)
    print(f"\nstudy {study.study_name} ({shown_url(storage.url)}):")
    print(format_trials(rows, metric))
    counts = {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL", "RUNNING")}
    wall = f"; {time.time() - started:.0f} s" if started else ""
    print(", ".join(f"{v} {k.lower()}" for k, v in counts.items() if v) + wall)
    command = best_trial_command(study, rows)
    client = client_for(settings["tracking_uri"])
    parent = settings["parent_run_id"]
    if command:
        best = max((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: r["value"])
        print(f"best trial {best['trial']}: {metric} {best['value']:.4f}; re-run it with:\n  {command}")
        client.log_metric(parent, f"best_{metric}", best["value"])
        tags = {"best_trial": str(best["trial"]), "best_command": command[:5000]}
        if best["mlflow_run_id"]:
            tags["best_child"] = best["mlflow_run_id"]
        for key, value in tags.items():
            client.set_tag(parent, key, value)
    else:
        print("no trial completed: no best trial yet")
    for key, value in counts.items():
        client.log_metric(parent, f"trials_{key.lower()}", value)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "trials.json").write_text(json.dumps(rows, indent=2, default=str))
        title = f"search {study.study_name}: {settings['bundle']} ({settings['sampler']}, pruner {settings['pruner']})"
        plot_search(rows, metric, title, Path(tmp) / "search.png")
        client.log_artifacts(parent, tmp, "search")
    return rows, command


def bundle_key_metric(config_file: Path) -> str:
    config = json.loads(Path(config_file).read_text())
    return str(config.get("key_metric_name", "val_mean_dice"))


def search(args) -> int:
    """``experiments search``: create (or ``--join``) a study and run its workers."""
    import optuna

    from clinseg.pipelines.paths import SOURCE_ROOT, checked_bundle, unique_run_name
    from clinseg.pipelines.tracking import client_for, default_tracking_uri, ensure_experiment

    bundle = checked_bundle(args.bundle, "bundle")
    tracking_uri = args.tracking_uri or default_tracking_uri()
    storage_url = args.storage or default_storage(tracking_uri)
    storage = open_storage(storage_url)
    started = time.time()
    if args.join:
        if not args.study:
            raise InputError("--join", "needs --study, the name of the study to join.")
        study = load_study(storage, args.study)
        if study.user_attrs.get("bundle") != bundle:
            searched = study.user_attrs.get("bundle")
            raise InputError(f"--study {args.study!r}", f"searches bundle {searched!r}, not {bundle!r}.")
    else:
        space = parse_space(args.space or [])
        make_sampler(args.sampler, space, args.seed)  # a wrong sampler or pruner stops here, before anything exists
        make_pruner(args.pruner, args.prune_warmup)
        if args.n_trials < 1:
            raise InputError("--n_trials", f"{args.n_trials}: at least one trial.")
        if args.sampler == "grid":  # each point once
            args.n_trials = min(args.n_trials, math.prod(len(d.choices) for d in space.values()))
        name = args.study or unique_run_name(f"{bundle}-search")
        if not STUDY_NAME.match(name):
            raise InputError(f"--study {name!r}", "is not a study name (letters, digits, '.', '_', '-').")
        config_file = args.config_file or str(Path("bundles") / bundle / "configs" / "train.json")
        config_path = Path(config_file) if Path(config_file).is_absolute() else SOURCE_ROOT / config_file
        if not config_path.is_file():
            raise InputError(f"--config_file {config_file}", "no such file.")
        fixed = {}
        for item in args.set:
            key, sep, value = item.partition("=")
            if not sep or not key:
                raise InputError(f"--set {item!r}", "is not KEY=VALUE.")
            fixed[key] = value
        overlap = sorted(set(fixed) & set(space))
        if overlap:
            raise InputError("--set", f"{', '.join(overlap)} is also in --space: each key is fixed or searched.")
        if "key_metric_name" in space:
            raise InputError(
                "--space key_metric_name", "trials scored by different metrics do not compare: --set it instead."
            )
        try:
            study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
        except optuna.exceptions.DuplicatedStudyError:
            raise InputError(f"--study {name!r}", "exists: add --join to add workers to it.") from None
        client = client_for(tracking_uri)
        experiment_id = ensure_experiment(client, bundle, tracking_uri)
        parent = client.create_run(
            experiment_id,
            run_name=name,
            tags={
                "workflow": "search",
                "bundle": bundle,
                "search.study": name,
                "search.storage": shown_url(storage_url),
                "search.space": json.dumps(args.space),
                "search.sampler": args.sampler,
                "search.pruner": args.pruner,
            },
        )
        for key, value in fixed.items():  # MLflow param names cannot hold '#': config ids use '.' there
            client.log_param(parent.info.run_id, key.replace("#", "."), value)
        settings = {
            "bundle": bundle,
            "config_file": config_file,
            "space": {k: optuna.distributions.distribution_to_json(d) for k, d in space.items()},
            "fixed": fixed,
            "n_trials": args.n_trials,
            "max_failures": args.max_failures,
            # what the trials report (trials.attach_trial_reporter): the config's, or the one --set chooses
            "key_metric": fixed.get("key_metric_name") or bundle_key_metric(config_path),
            "sampler": args.sampler,
            "seed": args.seed,
            "pruner": args.pruner,
            "warmup_epochs": args.prune_warmup,
            "tracking_uri": tracking_uri,
            "parent_run_id": parent.info.run_id,
        }
        for key, value in settings.items():
            study.set_user_attr(key, value)
        print(
            f"study {name} in {shown_url(storage_url)}: {args.n_trials} trials of {bundle}, {args.workers} worker(s); "
            f"MLflow parent run {parent.info.run_id}\n"
            f"  more workers: python -m clinseg.pipelines.experiments search {bundle} --join --study {name}"
            f" --storage {shown_url(storage_url)}",
            flush=True,
        )
    status = "FINISHED"

    def stop(signum, frame):  # SIGTERM (`kill`, a scheduler's time limit) stops the search as Ctrl-C does
        raise KeyboardInterrupt

    previous_sigterm = signal.signal(signal.SIGTERM, stop)
    try:
        if args.workers <= 1:
            if work(storage, study.study_name, args.worker_index, args.verbose) == "failures":
                status = "FAILED"
        else:
            status = run_workers(args, bundle, study.study_name, storage_url)
    except KeyboardInterrupt:
        status = "KILLED"
        print(
            "search interrupted: finished trials are kept; the running ones run again first when it is resumed "
            f"(--join --study {study.study_name})"
        )
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    if args.quiet_summary:  # a worker of `--workers N`: the launching process summarises
        return 0 if status == "FINISHED" else 1
    study = load_study(storage, study.study_name)
    rows, _ = summarize(study, storage, started)
    # workers that joined leave the parent open while the search goes on; the last one ends it, also when its
    # launcher was interrupted (KILLED) or lost (left RUNNING) and the search was resumed
    end, why = parent_end(study, status, launcher=not args.join)
    if end:
        client = client_for(tracking_uri)
        parent = study.user_attrs["parent_run_id"]
        if why:
            client.set_tag(parent, "search.stopped", why)
            print(f"search stopped: {why}; the parent run ends {end}")
        client.set_terminated(parent, end)
    return 0 if status == "FINISHED" and any(r["state"] == "COMPLETE" for r in rows) else 1


def run_workers(args, bundle: str, study_name: str, storage_url: str) -> str:
    """``--workers N``: N worker processes on the study, each as a remote machine would run it (``--join``).

    A worker killed by a signal (``kill -9``, the out-of-memory killer) is replaced, once per worker: its trial is
    failed as a dead worker's when its heartbeat is stale (``HEARTBEAT_GRACE_S``), so the new worker starts after
    that and runs it again. Without it, the other workers could use the budget up meanwhile (the lost trial counted
    as running), and the search ended with that trial RUNNING and the parent run open."""
    command = [sys.executable, "-m", "clinseg.pipelines.experiments"]
    if args.tracking_uri:
        command += ["--tracking_uri", args.tracking_uri]
    command += ["search", bundle, "--join", "--study", study_name, "--storage", storage_url, "--quiet_summary"]
    if args.verbose:
        command.append("--verbose")

    def start(index: int) -> subprocess.Popen:
        return subprocess.Popen([*command, "--worker_index", str(index)])

    running = {index: start(index) for index in range(args.workers)}
    codes: dict[int, int] = {}
    replace_at: dict[int, float] = {}  # a killed worker's index: when its replacement starts
    replaced: set[int] = set()
    try:
        while running or replace_at:
            for index, worker in list(running.items()):
                code = worker.poll()
                if code is None:
                    continue
                del running[index]
                codes[index] = code
                if code < 0 and index not in replaced:
                    replaced.add(index)
                    replace_at[index] = time.monotonic() + HEARTBEAT_GRACE_S + HEARTBEAT_INTERVAL_S
                    print(
                        f"search: worker {index} was killed (signal {-code}); a new worker takes its "
                        f"place in {HEARTBEAT_GRACE_S + HEARTBEAT_INTERVAL_S} s, once its trial can be run again",
                        flush=True,
                    )
            for index, when in list(replace_at.items()):
                if time.monotonic() >= when:
                    del replace_at[index]
                    running[index] = start(index)
            time.sleep(0.5)
    except KeyboardInterrupt:
        for w in running.values():
            w.send_signal(signal.SIGINT)
        for w in running.values():
            w.wait(timeout=300)
        raise
    return "FINISHED" if not any(codes.values()) else "FAILED"


def add_parser(sub) -> None:
    p = sub.add_parser("search", help="Optuna search over a bundle's training, on a study shared by workers")
    p.add_argument("bundle")
    p.add_argument("--space", nargs="+", help="KEY=float:LOW:HIGH | loguniform:LOW:HIGH | int:LOW:HIGH | choice:A,B")
    p.add_argument("--n_trials", type=int, default=20, help="trials to complete or prune, all workers together")
    p.add_argument("--workers", type=int, default=1, help="worker processes on this machine")
    p.add_argument("--sampler", default="tpe", help=", ".join(SAMPLERS))
    p.add_argument("--pruner", default="median", help="median, none or threshold:LOW")
    p.add_argument("--prune_warmup", type=int, default=1, help="epochs before a trial can be pruned")
    p.add_argument("--max_failures", type=int, default=3, help="stop after this many failed trials")
    p.add_argument("--seed", type=int, default=None, help="sampler seed (each worker adds its index)")
    p.add_argument("--set", nargs="*", default=[], help="KEY=VALUE overrides for every trial")
    p.add_argument("--config_file", help="default: bundles/<bundle>/configs/train.json")
    p.add_argument("--study", help="study name (default: <bundle>-search-<time>); with --join, the study to join")
    p.add_argument("--storage", help="Optuna storage URL (default: optuna.db beside the MLflow SQLite store)")
    p.add_argument("--join", action="store_true", help="add a worker to an existing study")
    p.add_argument("--worker_index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--quiet_summary", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--verbose", action="store_true", help="show the trainings' output")
    p.set_defaults(func=search)
