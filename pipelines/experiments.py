"""Compare, sweep and register bundle runs recorded in MLflow.

    python -m clinseg.pipelines.experiments compare oct_layers [--metric val_mean_dice] [--plot curves.png]
    python -m clinseg.pipelines.experiments sweep oct_layers --grid learning_rate=0.001,0.002 batch_size=2,4 \\
        [--set train#trainer#max_epochs=5] [--sample N]     (or --resume PARENT_RUN_ID: complete an interrupted one)
    python -m clinseg.pipelines.experiments search oct_layers --space learning_rate=loguniform:1e-4:1e-2 \\
        batch_size=choice:2,4 --n_trials 20 --workers 2     (Optuna; see clinseg.pipelines.search)
    python -m clinseg.pipelines.experiments cv vessels --folds 5 [--set dataset_dir=...] | --resume PARENT_RUN_ID
    python -m clinseg.pipelines.experiments register RUN_ID [--name oct_layers] [--alias champion]
    python -m clinseg.pipelines.experiments fetch oct_layers champion --out /tmp/oct_layers_v1
    python -m clinseg.pipelines.experiments promote oct_layers RUN_NAME [--bundle_root bundles/oct_layers]
    python -m clinseg.pipelines.experiments ui [--port 5000]     (the MLflow UI, and the links to each experiment)

The store is ``MLFLOW_TRACKING_URI`` if set, else the project's ``mlruns/mlflow.db`` (``--tracking_uri`` wins).
The MLflow UI stays the main place to look; these commands serve terminals, scripts and reports.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import MAX_TAG_VAL_LENGTH

from clinseg.datasets.errors import InputError
from clinseg.pipelines import cli
from clinseg.pipelines.cli import text_table
from clinseg.pipelines.paths import SOURCE_ROOT, checked_bundle, process_alive, with_sqlite_wait
from clinseg.pipelines.tracking import (
    NOT_COMPARED,
    RUN_TAGS_ENV,
    client_for,
    default_tracking_uri,
    engine_metric_name,
    ensure_experiment,
    mlflow_metric_name,
    ranking_value,
    run_folder,
    unique_run_name,
)

KEY_METRICS = {"oct_layers": "val_mean_dice", "vessels": "val_f1"}
# derived or long, or not what a run learns (a resumed run's ``resume`` names its own folder)
HIDDEN_PARAMS = {"class_names", "palette", "label_colors", "epoch_length", "val_ids"} | NOT_COMPARED


def key_metric_of(bundle: str, run=None) -> str:
    if run is not None and "key_metric" in run.data.params:
        return run.data.params["key_metric"]
    return KEY_METRICS.get(bundle, "val_mean_dice")


def bundle_experiment(client: mlflow.MlflowClient, bundle: str):
    """The MLflow experiment of ``bundle``'s runs; refused, naming the store, when there is none."""
    experiment = client.get_experiment_by_name(bundle)
    if experiment is None:
        raise InputError(bundle, f"no experiment of this name in {client.tracking_uri} (train the bundle first).")
    return experiment


def training_runs(client: mlflow.MlflowClient, bundle: str, limit: int = 50, parent: str | None = None):
    experiment = bundle_experiment(client, bundle)
    query = "tags.workflow = 'train'" + (f" and tags.mlflow.parentRunId = '{parent}'" if parent else "")
    return client.search_runs(
        [experiment.experiment_id], query, order_by=["attributes.start_time DESC"], max_results=limit
    )


def recorded_name(metric: str, params: dict) -> str:
    """The MLflow name of a training run's metric given by its engine name (``val_mean_dice`` is recorded as
    ``0_key/val_mean_dice`` in the runs whose key metric it is): :func:`clinseg.pipelines.tracking.mlflow_metric_name`.
    Names already in the recorded form are kept."""
    if engine_metric_name(metric) != metric:
        return metric
    return mlflow_metric_name(metric, "train", params.get("key_metric"))


def metric_history(client: mlflow.MlflowClient, run_id: str, metric: str, params: dict) -> list:
    """A training run's history of ``metric`` under its recorded name, or under the engine's name in runs
    recorded before the names were sectioned (stores made by earlier versions)."""
    return client.get_metric_history(run_id, recorded_name(metric, params)) or client.get_metric_history(run_id, metric)


def summarize(client: mlflow.MlflowClient, runs, metric: str) -> list[dict]:
    """One row per run: its best value of ``metric`` (the lowest for a distance, an error or a loss, the closest to
    0 for a signed error: :func:`clinseg.pipelines.tracking.ranking_value`), that value's epoch, its final value
    and final loss."""
    order = ranking_value(metric)
    rows = []
    for run in runs:
        history = metric_history(client, run.info.run_id, metric, run.data.params)
        finite = sorted((m for m in history if math.isfinite(m.value)), key=lambda m: (m.step, m.timestamp))
        best = min(finite, key=lambda m: order(m.value)) if finite else None
        rows.append(
            {
                "run": run_folder(run),
                "run_id": run.info.run_id,
                "status": run.info.status,
                "params": dict(run.data.params),
                f"best_{metric}": best.value if best else float("nan"),
                "best_epoch": best.step if best else None,
                f"final_{metric}": finite[-1].value if finite else float("nan"),
                "final_train_loss": run.data.metrics.get(
                    mlflow_metric_name("train_loss"), run.data.metrics.get("train_loss", float("nan"))
                ),
            }
        )
    return rows


def ranked(rows: list[dict], key: str, metric: str, ascending: bool | None = None) -> list[dict]:
    """``rows`` ordered by ``key`` (a column such as ``best_<metric>``, or a param name), the best first: a metric
    column highest first, lowest first for a distance, an error or a loss, closest to 0 first for a signed error
    (relative volume error); ``ascending`` orders by the plain value instead. Rows
    without a value (NaN: no validation ran, or every value was undefined) come last in either order: Python
    cannot order a NaN, and one among the values would leave the whole ranking unsorted."""
    if not rows:
        return []
    column = key in rows[0]
    best_first = ranking_value(metric if key.endswith(metric) else key) if column and ascending is None else None

    def value(row: dict) -> float:
        number = row.get(key) if column else row["params"].get(key)
        try:  # a param is recorded as text
            number = float(number)
        except (TypeError, ValueError):
            return math.nan
        return number if math.isfinite(number) else math.nan

    if not column and not any(math.isfinite(value(r)) for r in rows):  # a param that is no number: by its text
        return sorted(rows, key=lambda r: str(r["params"].get(key, "")), reverse=not ascending)

    finite = [r for r in rows if math.isfinite(value(r))]
    if best_first is not None:
        scored = sorted(finite, key=lambda r: best_first(value(r)))
    else:
        scored = sorted(finite, key=value, reverse=not ascending)
    return scored + [r for r in rows if not math.isfinite(value(r))]


def differing_params(rows: list[dict]) -> list[str]:
    keys = sorted({k for row in rows for k in row["params"]} - HIDDEN_PARAMS)
    return [k for k in keys if len({row["params"].get(k) for row in rows}) > 1]


def format_table(rows: list[dict], metric: str) -> str:
    params = differing_params(rows)
    header = ["run", "status", *params, f"best {metric}", "epoch", f"final {metric}", "final loss"]
    lines = [header]
    for row in rows:
        lines.append(
            [
                row["run"],
                row["status"],
                *(row["params"].get(p, "") for p in params),
                f"{row[f'best_{metric}']:.4f}",
                str(row["best_epoch"]),
                f"{row[f'final_{metric}']:.4f}",
                f"{row['final_train_loss']:.4f}",
            ]
        )
    return text_table(lines)


def plot_runs(client: mlflow.MlflowClient, rows: list[dict], metric: str, path: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    from clinseg.datasets.io import atomic_write

    params = differing_params(rows)
    fig, ax = plt.subplots(figsize=(9, 5))
    for row in rows:
        history = sorted((m.step, m.value) for m in metric_history(client, row["run_id"], metric, row["params"]))
        if history:
            label = row["run"] + (
                "" if not params else " (" + ", ".join(f"{p}={row['params'].get(p)}" for p in params) + ")"
            )
            ax.plot(*zip(*history, strict=True), marker="o", markersize=3, label=label)
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} across runs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
    return out


def parent_run_id(client: mlflow.MlflowClient, bundle: str, parent: str) -> str:
    """The id of the sweep or cross-validation parent run ``parent`` of ``bundle``'s experiment, given by its id or
    by the name the sweep printed (``sweep-20261206-064357-33d152``).

    Raises:
        InputError: no such run in the experiment (the latest parents are named), or one name for several runs.
    """
    experiment = bundle_experiment(client, bundle)
    if re.fullmatch(r"[0-9a-f]{32}", parent):
        query = f"attributes.run_id = '{parent}'"
    else:
        query = f"attributes.run_name = '{parent}'"
    found = client.search_runs([experiment.experiment_id], query, max_results=2)
    if len(found) == 1:
        return found[0].info.run_id
    if found:
        raise InputError("--parent", f"{parent!r} names several runs of '{bundle}': give the run id.")
    parents = sorted(
        (
            run
            for workflow in ("sweep", "cv")
            for run in client.search_runs(
                [experiment.experiment_id], f"tags.workflow = '{workflow}'", order_by=["attributes.start_time DESC"]
            )
        ),
        key=lambda run: run.info.start_time,
        reverse=True,
    )[:5]
    known = ", ".join(f"{r.info.run_name} ({r.info.run_id})" for r in parents) or "none"
    raise InputError("--parent", f"{parent!r}: no run of '{bundle}' has this id or name; latest parents: {known}.")


def compare(args) -> int:
    client = client_for(args.tracking_uri)
    parent = parent_run_id(client, args.bundle, args.parent) if args.parent else None
    runs = training_runs(client, args.bundle, args.runs, parent)
    if not runs:
        print(f"no training runs of '{args.bundle}' in {client.tracking_uri}")
        return 1
    metric = args.metric or key_metric_of(args.bundle, runs[0])
    rows = summarize(client, runs, metric)
    rows = ranked(rows, args.sort or f"best_{metric}", metric, True if args.ascending else None)
    print(format_table(rows, metric))
    validated_on = {row["params"].get("validation_fingerprint") for row in rows} - {None}
    if len(validated_on) > 1:  # a higher value on easier cases is no better model
        print(
            f"note: these runs were validated on {len(validated_on)} different sets of cases (their "
            f"validation_fingerprint): {metric} compares only between runs of one set",
            file=sys.stderr,
        )
    if args.plot:
        print(f"plot: {plot_runs(client, rows, metric, args.plot)}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
    return 0


def parse_grid(items: list[str]) -> dict[str, list[str]]:
    """``KEY=V1,V2,...`` items as ``{key: [values]}``; a value may be a list or a mapping
    (``network_def#channels=[8,16],[16,32]``: two values, :func:`clinseg.pipelines.cli.split_values`)."""
    grid = {}
    for item in items:
        key, _, values = item.partition("=")
        if not key or not values:
            raise SystemExit(f"--grid expects KEY=V1,V2,..., got {item!r}")
        grid[key] = cli.split_values(values, f"--grid {item!r}")
    return grid


def parent_settings(args, workflow: str, fixed: dict, plan: dict) -> str:
    """What a sweep's or cv's parent records for ``--resume``: ``fixed`` (its ``--set``), the config file and the
    workflow's ``plan``, as JSON. Settings longer than an MLflow tag are refused before anything is recorded."""
    settings = json.dumps({"set": fixed, "config_file": args.config_file, **plan})
    if len(settings) > MAX_TAG_VAL_LENGTH:
        raise InputError(
            "--set / --grid", f"the {workflow}'s settings take {len(settings)} characters, over the "
            f"{MAX_TAG_VAL_LENGTH} of the MLflow tag that records them for --resume: shorten them (fewer values, a "
            "shorter path)."
        )  # fmt: skip
    return settings


def start_parent(client: mlflow.MlflowClient, args, workflow: str, tags: dict, fixed: dict, settings: str) -> str:
    """The parent run of a sweep or a cross-validation (its children are the trainings): its id. It records its
    ``settings`` (:func:`parent_settings`) and this process."""
    experiment_id = ensure_experiment(client, args.bundle, args.tracking_uri or default_tracking_uri())
    tags = {"workflow": workflow, "bundle": args.bundle, **tags}
    tags.update({SETTINGS_TAG: settings, PROCESS_TAG: this_process()})
    parent = client.create_run(experiment_id, run_name=unique_run_name(workflow), tags=tags)
    for key, value in fixed.items():  # MLflow param names cannot hold '#': config ids use '.' there
        client.log_param(parent.info.run_id, key.replace("#", "."), value)
    return parent.info.run_id


def run_children(args, parent_id: str, combinations: list[dict], fixed: dict, workflow: str) -> str:
    """One training per combination of overrides (with ``fixed`` for all), one after the other, as children of
    ``parent_id``; the parent's end status: FINISHED, FAILED (a child failed) or KILLED (Ctrl-C or SIGTERM)."""
    config = args.config_file or str(Path("bundles") / args.bundle / "configs" / "train.json")
    env = {
        **os.environ,
        "PIPELINE_PARENT_RUN_ID": parent_id,
        "MLFLOW_TRACKING_URI": args.tracking_uri or default_tracking_uri(),
    }
    status = "FINISHED"

    def stop(signum, frame):  # SIGTERM (a scheduler, `kill`) stops the children as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        for index, overrides in enumerate(combinations, 1):
            command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", config]
            for key, value in {**fixed, **overrides}.items():
                command += [f"--{key}", value]
            print(f"[{index}/{len(combinations)}] {' '.join(f'{k}={v}' for k, v in overrides.items())}", flush=True)
            child = subprocess.Popen(
                command,
                cwd=SOURCE_ROOT,
                env={**env, RUN_TAGS_ENV: json.dumps({CHILD_TAG: child_key(overrides)})},
                stdout=None if args.verbose else subprocess.DEVNULL,
                stderr=None if args.verbose else subprocess.PIPE,
                text=True,
            )
            try:
                _, errors = child.communicate()
            except KeyboardInterrupt:
                # stop the running child cleanly (its run ends KILLED) instead of killing it outright
                child.send_signal(signal.SIGTERM)
                child.wait(timeout=300)
                raise
            if child.returncode != 0:
                status = "FAILED"
                print(f"  child failed ({child.returncode}): {(errors or '')[-2000:]}")
    except KeyboardInterrupt:
        status = "KILLED"
        print(f"{workflow} interrupted: finished child runs are kept; the parent run is marked KILLED")
    return status


def sweep(args) -> int:
    """Child training runs for every combination of ``--grid`` (or ``--sample`` of them) under one parent run."""
    fixed = dict(item.split("=", 1) for item in args.set)
    for given in ("grid", "sample", "seed"):
        if args.resume and getattr(args, given) is not None:
            raise InputError(f"--{given}", "is the sweep's own when it is resumed (leave it out).")
    if not args.resume and not args.grid:
        raise InputError("--grid", "is needed: KEY=V1,V2 ... (or --resume PARENT_RUN_ID).")
    if args.resume:
        client = client_for(args.tracking_uri)
        parent_id, settings = resumed_parent(client, args, "sweep", fixed)
        fixed, grid, sample, seed = settings["set"], settings["grid"], settings["sample"], settings["seed"]
    else:
        grid, sample, seed = parse_grid(args.grid), args.sample or 0, args.seed or 0
        for chosen in ("resume", "run_name"):
            if chosen in grid or chosen in fixed:
                raise InputError(f"--grid / --set {chosen}", "is chosen by the sweep itself for each child run.")
        settings = parent_settings(args, "sweep", fixed, {"grid": grid, "sample": sample, "seed": seed})
        client = client_for(args.tracking_uri)
    combinations = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())]
    if sample:
        combinations = random.Random(seed).sample(combinations, min(sample, len(combinations)))
    if args.resume:
        combinations = pending_children(client, args, parent_id, combinations)
    else:
        parent_id = start_parent(client, args, "sweep", {"grid": json.dumps(grid)}, fixed, settings)
        print(
            f"sweep {client.get_run(parent_id).info.run_name} (run id {parent_id}): {len(combinations)} child runs of "
            f"{args.bundle}; compare them with: python -m clinseg.pipelines.experiments compare {args.bundle} "
            f"--parent {parent_id}"
        )
    status = "FAILED"
    try:
        status = run_children(args, parent_id, combinations, fixed, "sweep")
    finally:
        client.set_terminated(parent_id, status)
    if status != "FINISHED":
        print(
            "resume it (finished runs are kept, interrupted ones continue from their latest checkpoint) with:\n"
            f"  python -m clinseg.pipelines.experiments sweep {args.bundle} --resume {parent_id}"
        )
    # each combination once, by its newest run (a continued run's continuation carries its history; a run trained
    # again replaces the one that was stopped before its first checkpoint)
    runs, seen = [], set()
    for run in training_runs(client, args.bundle, 1000, parent_id):  # newest first
        key = run.data.tags.get(CHILD_TAG, run.info.run_id)
        if key not in seen:
            seen.add(key)
            runs.append(run)
    metric = key_metric_of(args.bundle, runs[0] if runs else None)
    rows = ranked(summarize(client, runs, metric), f"best_{metric}", metric)
    print(f"\nranking by best {metric}:")
    print(format_table(rows, metric))
    if rows and math.isfinite(rows[0][f"best_{metric}"]):  # a child that validated nothing is no best child
        client.set_tag(parent_id, "best_child", rows[0]["run_id"])
        client.log_metric(parent_id, f"best_{metric}", rows[0][f"best_{metric}"])
    return 0 if status == "FINISHED" else 1


def cv_summary(
    client: mlflow.MlflowClient,
    bundle: str,
    folds: int,
    parent_id: str,
    overrides: dict | None = None,
    config_file: str | None = None,
) -> dict:
    """The summary of the cross-validation ``parent_id`` from its fold runs in the store, recorded on it: each
    fold's best key metric (``fold_<k>_<metric>``), which cases it validated and its model; the mean and spread
    (``cv_mean_<metric>``, ``cv_std_<metric>``) only when every one of the ``folds`` folds finished and validated.

    A mean over the folds that happened to finish is no k-fold estimate, and looks like one in the UI: an incomplete
    cross-validation records how many folds scored (``cv_folds_scored``), names the missing ones, and keeps the
    mean of those that scored as ``partial_mean`` in ``cv/folds.json`` only.

    The ensemble's command carries the folds' ``overrides`` that inference has too (``channels``,
    ``network_def#channels``...): without them it builds the default network and refuses the fold models. Its
    inference config is the one beside the trainings' ``config_file`` (a bundle copied elsewhere)."""
    runs = training_runs(client, bundle, 1000, parent_id)
    finished = [r for r in runs if r.info.status == "FINISHED" and "fold" in r.data.params]
    by_fold = {}
    for run in finished:  # newest first: a fold trained again by a resumed cross-validation counts with its new run
        by_fold.setdefault(int(run.data.params["fold"]), run)
    metric = key_metric_of(bundle, runs[0] if runs else None)
    rows = summarize(client, [by_fold[k] for k in sorted(by_fold)], metric)
    per_fold = []
    for k, row in zip(sorted(by_fold), rows, strict=True):
        run = by_fold[k]
        per_fold.append(
            {
                "fold": k,
                "run_id": run.info.run_id,
                "run": run_folder(run),
                f"best_{metric}": row[f"best_{metric}"],
                "val_ids": [i for i in run.data.params.get("val_ids", "").split(",") if "... (" not in i],
                "val_ids_complete": "... (" not in run.data.params.get("val_ids", ""),
                "checkpoint": run.data.tags.get("checkpoint_path"),
            }
        )
        if math.isfinite(row[f"best_{metric}"]):
            client.log_metric(parent_id, f"fold_{k}_{metric}", row[f"best_{metric}"])
    scored = {f["fold"]: f[f"best_{metric}"] for f in per_fold if math.isfinite(f[f"best_{metric}"])}
    summary = {"bundle": bundle, "folds": folds, "key_metric": metric, "per_fold": per_fold}
    summary["complete"] = len(scored) == folds
    summary["missing_folds"] = {
        str(k): "did not finish" if k not in by_fold else "validated nothing (max_epochs below val_interval?)"
        for k in range(folds)
        if k not in scored
    }
    client.log_metric(parent_id, "cv_folds_scored", len(scored))
    values = list(scored.values())
    if values:
        spread = {"mean": float(statistics.fmean(values)), "std": float(statistics.pstdev(values))}
        if summary["complete"]:
            summary.update(spread)
            client.log_metric(parent_id, f"cv_mean_{metric}", spread["mean"])
            client.log_metric(parent_id, f"cv_std_{metric}", spread["std"])
        else:
            summary.update(partial_mean=spread["mean"], partial_std=spread["std"])
    checkpoints = [f["checkpoint"] for f in per_fold if f["checkpoint"] and Path(f["checkpoint"]).is_file()]
    if len(checkpoints) >= 2:
        summary["ensemble_command"] = ensemble_command(bundle, checkpoints, overrides or {}, config_file)
        client.set_tag(parent_id, "ensemble_command", summary["ensemble_command"])
    client.log_text(parent_id, json.dumps(summary, indent=2), "cv/folds.json")
    return summary


SETTINGS_TAG = "resume.settings"  # a sweep's or cv's parent: its --set, --config_file and plan, as JSON
PROCESS_TAG = "resume.process"  # a parent's host:pid, the process that last started or resumed it
CHILD_TAG = "child_overrides"  # a child's own overrides (its fold, its grid values), as JSON: what --resume matches
WORKFLOW_NAMES = {"cv": "cross-validation", "sweep": "sweep"}


def this_process() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def child_key(overrides: dict) -> str:
    """A child's identity within its parent: its overrides without ``resume`` (a continued child is the same one)."""
    return json.dumps({k: v for k, v in overrides.items() if k != "resume"}, sort_keys=True)


def runs_experiments(pid: int) -> bool:
    """Whether process ``pid`` lives and runs this module (not another process that took a dead one's id)."""
    if not Path("/proc").is_dir():  # no /proc on this system: the process id alone
        return process_alive(pid)
    try:
        return b"clinseg.pipelines.experiments" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone
        return False


def require_not_running(parent) -> None:
    """Refuse to resume a sweep or cross-validation whose own process still runs on this machine: both would train
    the same missing children. One recorded RUNNING on another machine cannot be checked from here (it may have
    been lost with that machine): resumed, with a warning."""
    if parent.info.status != "RUNNING":
        return
    what = WORKFLOW_NAMES[parent.data.tags["workflow"]]
    host, _, pid = parent.data.tags.get(PROCESS_TAG, "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and runs_experiments(int(pid)):
        raise InputError(
            "--resume", f"{what} {parent.info.run_id} is still running (process {pid} on this machine): "
            "stop it first (Ctrl-C or SIGTERM; its finished runs are kept)."
        )  # fmt: skip
    if host != socket.gethostname():
        print(f"warning: {what} {parent.info.run_id} is recorded as running on {host or 'another machine'}; resumed "
              "here, it would train the same runs twice if that process still runs")  # fmt: skip


def resumed_parent(client: mlflow.MlflowClient, args, workflow: str, given: dict) -> tuple[str, dict]:
    """The parent run ``args.resume`` of a ``workflow`` (sweep, cv) of ``args.bundle`` to complete: its id and the
    settings it recorded (``set``, ``config_file`` and the workflow's plan: ``folds``, or ``grid``, ``sample`` and
    ``seed``). ``args.config_file`` is set to the recorded one.

    Raises:
        InputError: naming ``--resume``, ``--set KEY`` or ``--config_file``: a run that is no ``workflow`` of this
            bundle, one recorded without its settings, one whose process still runs here, or a setting other than
            the one its children were trained with (a resumed sweep or cross-validation mixing two settings would
            measure neither).
    """
    what = WORKFLOW_NAMES[workflow]
    try:
        parent = client.get_run(args.resume)
    except MlflowException as e:
        raise InputError("--resume", f"{args.resume!r} is no run in {client.tracking_uri} ({e.error_code}).") from e
    tags, parent_id = parent.data.tags, parent.info.run_id
    if tags.get("workflow") != workflow or tags.get("bundle") != args.bundle:
        found = f"a {tags.get('workflow', 'run')} of {tags.get('bundle', 'no bundle')}"
        raise InputError("--resume", f"run {parent_id} is {found}, not a {what} of {args.bundle}.")
    if SETTINGS_TAG not in tags:
        raise InputError(
            "--resume", f"{what} {parent_id} was recorded without its settings (an earlier version): start it again "
            "without --resume."
        )  # fmt: skip
    require_not_running(parent)
    settings = json.loads(tags[SETTINGS_TAG])
    for key, value in given.items():
        if settings["set"].get(key) != value:
            raise InputError(
                f"--set {key}", f"is {value!r}, but {what} {parent_id} trained its runs with "
                f"{settings['set'].get(key)!r}: a resumed {what} keeps its settings (leave --set out)."
            )  # fmt: skip
    if args.config_file and args.config_file != settings.get("config_file"):
        raise InputError(
            "--config_file", f"{args.config_file}, but {what} {parent_id} ran "
            f"{settings.get('config_file') or 'the default train.json'}."
        )  # fmt: skip
    args.config_file = settings.get("config_file")
    print(f"{workflow} {parent.info.run_name} (run id {parent_id}): resumed")
    return parent_id, settings


def pending_children(client: mlflow.MlflowClient, args, parent_id: str, planned: list[dict]) -> list:
    """Of the ``planned`` children of ``parent_id`` (their overrides), those still to train: a child that finished
    and validated is kept, not trained again (nnU-Net's folds are separate trainings in the same way); one whose
    training was interrupted and left a latest checkpoint in its run folder continues from it (``resume``: that
    folder, a new run that carries the interrupted one's history); the others are trained. The parent is marked
    RUNNING again, by this process."""
    from clinseg.pipelines.runs import run_in_progress

    def run_folder_with_checkpoint(run) -> Path | None:
        # the folder of its model.pt (recorded at its start: outputs/<run>/models), if a latest checkpoint is there
        model = run.data.tags.get("checkpoint_path")
        if not model or not any(Path(model).parent.glob("latest_checkpoint_epoch=*.pt")):
            return None
        return Path(model).parent.parent

    runs = training_runs(client, args.bundle, 1000, parent_id)  # newest first
    metric = key_metric_of(args.bundle, runs[0] if runs else None)
    pending = []
    for overrides in planned:
        label = " ".join(f"{k}={v}" for k, v in overrides.items())
        mine = [r for r in runs if r.data.tags.get(CHILD_TAG) == child_key(overrides)]
        finished = [r for r in mine if r.info.status == "FINISHED"]
        best = summarize(client, finished[:1], metric)[0][f"best_{metric}"] if finished else math.nan
        if math.isfinite(best):
            print(f"  {label}: kept (run {run_folder(finished[0])}, best {metric} {best:.4f})")
            continue
        stopped = [r for r in mine if r.info.status != "FINISHED"]  # newest first
        interrupted, folder = next(((r, f) for r in stopped if (f := run_folder_with_checkpoint(r))), (None, None))
        if interrupted is not None:
            if run_in_progress(folder):  # its training outlived the killed sweep or cv process
                raise InputError(
                    "--resume", f"run {folder.name} ({label}) is still training ({folder} is locked): stop it first."
                )
            print(f"  {label}: continues run {folder.name} ({interrupted.info.status}) from its latest checkpoint")
            pending.append({**overrides, "resume": folder.name})
        else:
            print(f"  {label}: trained" + (" again" if mine else ""))
            pending.append(overrides)
    client.set_tag(parent_id, PROCESS_TAG, this_process())
    client.update_run(parent_id, "RUNNING")
    return pending


def ensemble_command(bundle: str, checkpoints: list[str], overrides: dict, config_file: str | None = None) -> str:
    """The inference command over ``checkpoints`` as one ensemble, with the training ``overrides`` (``KEY=VALUE`` of
    ``--set``) that the bundle's ``inference.json`` has: the network and input settings, without which inference
    builds the default network and refuses the models. The trainings' data folder and split are left out. The
    ``inference.json`` is the one beside the training's ``config_file`` where there is one (a bundle copied
    elsewhere), else the repository bundle's."""
    from monai.bundle import ConfigParser

    from clinseg.pipelines.config_checks import config_ids

    config = f"bundles/{bundle}/configs/inference.json"  # as the command names it; read from where it is
    read = SOURCE_ROOT / config
    beside = Path(config_file).parent / "inference.json" if config_file else None
    if beside is not None and beside.is_file():
        config, read = str(beside), beside
    ids = config_ids(ConfigParser.load_config_files([str(read)]))
    training_only = {"fold", "folds", "dataset_dir"}
    kept = [(k, v) for k, v in overrides.items() if k not in training_only and k.replace("::", "#") in ids]
    source = "input_dir" if "input_dir" in ids else "input_path"  # a folder of images, a CT folder or file
    return (
        f"python -m monai.bundle run inferring --config_file {shlex.quote(config)}"
        f" --checkpoint_path {shlex.quote(json.dumps(checkpoints))} --{source} IMAGES --output_dir OUT"
        + "".join(f" --{k} {shlex.quote(str(v))}" for k, v in kept)
    )


def cross_validate(args) -> int:
    """k-fold cross-validation: one training per fold (``--folds K --fold k``) as children of one parent run, which
    records each fold's best key metric, their mean and spread, which cases each fold validated (``cv/folds.json``),
    and the ensemble of the fold models as the command that runs it (:func:`cv_summary`). The parent ends FAILED
    (KILLED when interrupted) unless every fold finished and validated."""
    fixed = dict(item.split("=", 1) for item in args.set)
    for chosen in ("fold", "folds", "resume", "run_name"):
        if chosen in fixed:
            raise InputError(f"--set {chosen}", "is chosen by cv itself for each fold (--folds K, --resume).")
    if args.resume:
        client = client_for(args.tracking_uri)
        parent_id, settings = resumed_parent(client, args, "cv", fixed)
        fixed, folds = settings["set"], int(settings["folds"])
        if args.folds is not None and args.folds != folds:
            raise InputError("--folds", f"{args.folds}, but cross-validation {parent_id} has {folds} folds.")
        args.folds = folds
        plan = pending_children(client, args, parent_id, [{"fold": str(k)} for k in range(folds)])
    else:
        args.folds = 5 if args.folds is None else args.folds
        if args.folds < 2:
            raise InputError("--folds", f"{args.folds}: cross-validation needs 2 folds or more.")
        fixed["folds"] = str(args.folds)
        settings = parent_settings(args, "cv", fixed, {"folds": args.folds})
        client = client_for(args.tracking_uri)
        parent_id = start_parent(client, args, "cv", {"folds": str(args.folds)}, fixed, settings)
        plan = [{"fold": str(k)} for k in range(args.folds)]
        print(f"cv {client.get_run(parent_id).info.run_name} (run id {parent_id}): {args.folds} folds of {args.bundle}")
    status = "FAILED"
    try:
        status = run_children(args, parent_id, plan, fixed, "cv")
        summary = cv_summary(client, args.bundle, args.folds, parent_id, fixed, args.config_file)
        if not summary["complete"] and status == "FINISHED":
            status = "FAILED"
    finally:
        client.set_terminated(parent_id, status)
    metric = summary["key_metric"]
    print(f"\n{args.folds}-fold cross-validation of {args.bundle}, best {metric} per fold:")
    lines = [["fold", f"best {metric}", "run", "validated"]]
    lines += [
        [f["fold"], f"{f[f'best_{metric}']:.4f}", f["run"], ",".join(f["val_ids"])[:60]] for f in summary["per_fold"]
    ]
    print(text_table(lines))
    if summary["complete"]:
        print(f"mean {summary['mean']:.4f}, standard deviation {summary['std']:.4f} over {args.folds} folds")
    else:
        missing = ", ".join(f"fold {k} {why}" for k, why in summary["missing_folds"].items())
        partial = (
            f"; the {args.folds - len(summary['missing_folds'])} scored folds' mean, {summary['partial_mean']:.4f}, "
            "is no cross-validation estimate"
            if "partial_mean" in summary
            else ""
        )
        print(f"incomplete: {missing}{partial}")
        print(
            f"resume it (finished folds are kept, interrupted ones continue from their latest checkpoint) with:\n"
            f"  python -m clinseg.pipelines.experiments cv {args.bundle} --resume {parent_id}"
        )
    if "ensemble_command" in summary:
        print(f"the fold models as one ensemble:\n  {summary['ensemble_command']}")
    return 0 if status == "FINISHED" else 1


MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def checked_model_name(name: str) -> str:
    """A registered-model name that is safe as a folder name in the store (no path separators, no '..')."""
    if not MODEL_NAME.match(name) or ".." in name:
        raise InputError("--name", f"{name!r} is not a usable model name: letters, digits, '_', '-', '.' only.")
    return name


def run_id_form(text: str) -> str:
    """``text`` if it has an MLflow run id's form; an argument type, so a mistyped id is refused before the store is
    opened (opening a store that does not exist yet creates it)."""
    if not re.fullmatch(r"[0-9a-f]{32}", text or ""):
        raise argparse.ArgumentTypeError(f"{text!r} is not an MLflow run id (32 hexadecimal characters).")
    return text


def existing_run(client: mlflow.MlflowClient, run_id: str):
    """The run of ``run_id`` (its form checked by :func:`run_id_form` as the arguments were parsed)."""
    try:
        return client.get_run(run_id)
    except MlflowException as e:
        raise InputError("run id", f"{run_id}: no such run in {client.tracking_uri}.") from e


def logged_artifacts(client: mlflow.MlflowClient, run_id: str, folder: str) -> set[str]:
    try:
        return {entry.path for entry in client.list_artifacts(run_id, folder)}
    except (MlflowException, OSError):
        return set()


def version_evidence(client: mlflow.MlflowClient, run) -> dict:
    """What a registered version carries to be trusted without its run: the validation averages (engine names) at
    the epoch its checkpoint was chosen (the key metric's best), that epoch, the dataset fingerprint, the source
    run, the commit and the config hash."""
    from clinseg.pipelines.tracking import AGGREGATE_SECTIONS, KEY_SECTION

    key = run.data.params.get("key_metric")
    history = {}
    for recorded in run.data.metrics:
        section, _, name = recorded.partition("/")
        if section in (KEY_SECTION, AGGREGATE_SECTIONS["train"]) and name.startswith("val_"):
            history[name] = {m.step: m.value for m in client.get_metric_history(run.info.run_id, recorded)}
    finite = {step: v for step, v in history.get(key, {}).items() if math.isfinite(v)}
    epoch = max(finite, key=finite.get) if finite else None
    validation = {name: values[epoch] for name, values in history.items() if epoch in values}
    params, tags = run.data.params, run.data.tags
    return {
        "source_run_id": run.info.run_id,
        "source_run_name": run_folder(run),
        "key_metric": key,
        "epoch": epoch,
        "validation": validation,
        "dataset_fingerprint": params.get("dataset_fingerprint"),
        "num_train_images": params.get("num_train_images"),
        "num_val_images": params.get("num_val_images"),
        "git_commit": tags.get("git_commit"),
        "config_sha256": tags.get("config_sha256"),
    }


def register(args) -> int:
    """Register a run's best checkpoint, with the bundle folder it belongs to, as a model version."""
    from clinseg.pipelines import runs

    client = client_for(args.tracking_uri)
    run = existing_run(client, args.run_id)
    bundle = checked_bundle(run.data.tags.get("bundle"), f"run {args.run_id}'s 'bundle' tag")
    name = checked_model_name(args.name) if args.name else bundle
    for artifact in ("checkpoint/model.pt", "config/executed_config.json"):
        if artifact not in logged_artifacts(client, args.run_id, artifact.split("/")[0]):
            raise InputError(
                f"run {args.run_id}",
                f"logged no {artifact} (a training run logs its best checkpoint after a validation, and its "
                "executed config at the start); register a training run that validated at least once.",
            )
    evidence = version_evidence(client, run)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / bundle
        # the bundle's files without its models and their records: the promoted model.json beside this run's
        # checkpoint would describe another model (and be ignored for it, taking the run's decision rule and
        # training record with it)
        shutil.copytree(
            SOURCE_ROOT / "bundles" / bundle,
            folder,
            ignore=shutil.ignore_patterns("outputs", "*.pt", "eval", runs.MODEL_RECORD, "large_files.yml", ".*.lock"),
        )
        (folder / "models").mkdir(exist_ok=True)
        checkpoint = client.download_artifacts(args.run_id, "checkpoint/model.pt", tmp)
        shutil.move(checkpoint, folder / "models" / runs.MODEL_FILE)
        record_artifact = f"models/{runs.MODEL_RECORD}"
        if record_artifact in logged_artifacts(client, args.run_id, "models"):
            record = client.download_artifacts(args.run_id, record_artifact, tmp)
            shutil.move(record, folder / "models" / runs.MODEL_RECORD)
        if runs.read_record(folder / "models") is None:  # a run of an older version, or its best model moved on
            (folder / "models" / runs.MODEL_RECORD).unlink(missing_ok=True)
            print(
                f"warning: run {args.run_id} logged no model.json describing its checkpoint: the registered model has "
                "no record (decision rule, input settings, training images)",
                file=sys.stderr,
            )
        executed = client.download_artifacts(args.run_id, "config/executed_config.json", tmp)
        shutil.copy(executed, folder / "configs" / "executed_config.json")
        (folder / "evidence.json").write_text(json.dumps(evidence, indent=2, default=str))
        client.log_artifacts(args.run_id, str(folder), "bundle")
    if not client.search_registered_models(f"name = '{name}'"):
        client.create_registered_model(name, description=f"MONAI bundle {bundle}")
    source = f"{client.get_run(args.run_id).info.artifact_uri}/bundle"
    tags = {"bundle": bundle, **{k: str(v) for k, v in evidence.items() if k != "validation" and v is not None}}
    tags.update({f"validation.{k}": f"{v:.6g}" for k, v in evidence["validation"].items()})
    description = (
        f"MONAI bundle {bundle} from run {run.info.run_name} ({args.run_id}): best {evidence['key_metric']} "
        f"{evidence['validation'].get(evidence['key_metric'], float('nan')):.4f} on the validation data of dataset "
        f"{evidence['dataset_fingerprint']}"
    )
    version = client.create_model_version(name, source, run_id=args.run_id, tags=tags, description=description)
    if args.alias:
        client.set_registered_model_alias(name, args.alias, version.version)
    print(
        f"registered {name} version {version.version} from run {args.run_id}"
        + (f" (alias '{args.alias}')" if args.alias else "")
        + f"\n  source: {source}"
    )
    return 0


def promote(args) -> int:
    """Make a training run's model the bundle's ``models/model.pt``, on request (:func:`clinseg.pipelines.runs.promote`
    with ``force``), and tag the run in MLflow."""
    from clinseg.pipelines import runs

    bundle = checked_bundle(args.bundle, "bundle")
    root = Path(args.bundle_root) if args.bundle_root else SOURCE_ROOT / "bundles" / bundle
    name = runs.check_run_name(args.run)
    folder = runs.runs_dir(root) / name
    if not folder.is_dir():
        known = ", ".join(sorted(p.parents[1].name for p in runs.runs_dir(root).glob("*/models/model.pt"))[-5:])
        where = runs.runs_dir(root).resolve()
        raise InputError(f"run {name!r}", f"is not a run in {where}; runs with a model: {known or 'none'}.")
    decision = runs.promote(folder / "models", root / "models", force=True)
    run_id = decision["candidate"].get("training_run_id")
    if run_id:
        try:
            client_for(args.tracking_uri).set_tag(run_id, "promoted", "on request")
        except MlflowException as e:  # the promotion stands; only its note in the store is missing
            print(f"warning: could not tag MLflow run {run_id}: {e.message[:200]}", file=sys.stderr)
    print(f"promoted {folder / 'models' / 'model.pt'} to {root / 'models' / 'model.pt'}")
    return 0


def fetch(args) -> int:
    """Turn a registered version (number or alias) back into a runnable bundle folder."""
    client = client_for(args.tracking_uri)
    try:
        model = client.get_registered_model(args.name)
    except MlflowException as e:
        known = sorted(m.name for m in client.search_registered_models())
        problem = f"no registered model of this name in {client.tracking_uri}; known: {known}."
        raise InputError(args.name, problem) from e
    try:
        if args.version.isdigit():
            version = client.get_model_version(args.name, args.version)
        else:
            version = client.get_model_version_by_alias(args.name, args.version)
    except MlflowException as e:
        aliases = sorted(getattr(model, "aliases", {}) or {})
        raise InputError(
            f"{args.name} {args.version}", f"no such version or alias; aliases of {args.name}: {aliases}."
        ) from e
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(str(out), "exists and is not an empty folder: choose another --out.")
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=version.source, dst_path=tmp, tracking_uri=client.tracking_uri
        )
        shutil.copytree(local, out, dirs_exist_ok=True)
    print(f"{args.name} version {version.version} (run {version.run_id}) -> {out}")
    print(
        # executed_config.json is the training config exactly as run (overrides included): the network matches
        "evaluate it from the repository root with:\n"
        f"  python -m monai.bundle run evaluating --config_file \"['{out}/configs/executed_config.json',"
        f"'{out}/configs/evaluate.json']\" --bundle_root {out} --dataset_dir DATA"
    )
    return 0


def sync(args) -> int:
    """Send the tracking records a run spooled while its server did not answer (``tracking_spool/`` in the run's
    folder): in order, each once (the spool's ledger remembers what was sent), the run's true end last."""
    from clinseg.pipelines.spool import SPOOL_FOLDER, sync_spools
    from clinseg.pipelines.tracking import DEFAULT_STORE

    default = [SOURCE_ROOT / "bundles", DEFAULT_STORE / SPOOL_FOLDER]
    folders = args.folders or [f for f in default if f.is_dir()]
    lines = sync_spools(folders, args.tracking_uri, client_for)
    print("\n".join(lines) if lines else f"no spooled tracking records in {', '.join(map(str, folders))}")
    return 0


def ui_links(client: mlflow.MlflowClient, server: str) -> list[str]:
    """One line per experiment: its name and the UI page of its runs (model-training workspace, runs view)."""
    from clinseg.pipelines.tracking import runs_page_url

    experiments = client.search_experiments()
    experiments = [e for e in experiments if e.name != "Default" or client.search_runs([e.experiment_id])]
    return [f"  {e.name}: {runs_page_url(server, e.experiment_id)}" for e in experiments]


def ui(args) -> int:
    """Serve the store's MLflow UI (``mlflow server``) and print the pages that open on each experiment's runs.

    MLflow 3's UI starts in its GenAI workspace unless a link chooses the model-training one; these links do, and
    open the runs view each training keeps up to date (key metric, final loss, the params the runs varied)."""
    uri = args.tracking_uri or default_tracking_uri()
    server = f"http://{args.host}:{args.port}"
    if uri.startswith(("http://", "https://")):  # a server already runs: only the links
        print("\n".join(ui_links(client_for(uri), uri)) or f"no experiments in {uri}")
        return 0
    if not uri.startswith("sqlite:///"):
        raise InputError("--tracking_uri", f"{uri}: `ui` serves a local SQLite store; run `mlflow server` for others.")
    store = Path(uri[len("sqlite:///") :].split("?", 1)[0])
    # the server is MLflow's own process, without the project's lock-wait listener: the wait goes in its URL, or it
    # would give up after sqlite3's 5 s when it starts while a training commits (and fail to start)
    command = [str(Path(sys.executable).parent / "mlflow"), "server", "--backend-store-uri", with_sqlite_wait(uri)]
    command += ["--artifacts-destination", str(store.parent / "artifacts")]
    command += ["--host", args.host, "--port", str(args.port)]
    print(f"MLflow UI of {uri} at {server}; the runs of each experiment:")
    print("\n".join(ui_links(client_for(uri), server)) or "  (no experiments yet)", flush=True)
    # the server's own workers (uvicorn, its job runner) outlive a server process killed alone: it runs in a
    # process group of its own, and Ctrl-C or SIGTERM here stops that whole group
    served = subprocess.Popen(command, start_new_session=True)

    def stop(signum, frame):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(served.pid, signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # SIGHUP: the terminal closed
        signal.signal(signum, stop)
    try:
        return served.wait()
    finally:
        stop(None, None)
        with contextlib.suppress(subprocess.TimeoutExpired):
            served.wait(timeout=30)
        with contextlib.suppress(ProcessLookupError):  # a server that ignored SIGTERM
            os.killpg(served.pid, signal.SIGKILL)


@cli.entry_point
def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking_uri", default=None)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("compare", help="table (and plot) of a bundle's training runs")
    p.add_argument("bundle")
    p.add_argument("--metric", help="default: the bundle's key metric")
    p.add_argument("--sort", help="a column (best_<metric>, final_<metric>) or a param name")
    p.add_argument("--ascending", action="store_true")
    p.add_argument("--runs", type=int, default=20, help="newest N runs")
    p.add_argument("--parent", help="only the children of this sweep or cv run (its id or name)")
    p.add_argument("--plot", help="write the metric's curves across runs as PNG")
    p.add_argument("--json", help="write the rows as JSON")
    p.set_defaults(func=compare)
    p = sub.add_parser("sweep", help="grid or random sample of overrides as child runs of one parent run")
    p.add_argument("bundle")
    p.add_argument("--grid", nargs="+", help="KEY=V1,V2 ... (config ids, as on the command line)")
    p.add_argument(
        "--resume", metavar="PARENT_RUN_ID", type=run_id_form, help="complete an interrupted sweep: its finished "
        "runs are kept, an interrupted one continues from its latest checkpoint, the others are trained"
    )  # fmt: skip
    p.add_argument("--set", nargs="*", default=[], help="KEY=VALUE overrides for every child")
    p.add_argument("--sample", type=int, help="run a random sample of N combinations")
    p.add_argument("--seed", type=int, help="of the sample (default 0)")
    p.add_argument("--config_file", help="default: bundles/<bundle>/configs/train.json")
    p.add_argument("--verbose", action="store_true", help="show the children's output")
    p.set_defaults(func=sweep)
    p = sub.add_parser("cv", help="k-fold cross-validation: one training per fold under one parent run")
    p.add_argument("bundle")
    p.add_argument("--folds", type=int, help="default 5 (with --resume: the cross-validation's own)")
    p.add_argument(
        "--resume", metavar="PARENT_RUN_ID", type=run_id_form, help="complete an interrupted cross-validation: its "
        "finished folds are kept, an interrupted fold continues from its latest checkpoint, the others are trained"
    )  # fmt: skip
    p.add_argument("--set", nargs="*", default=[], help="KEY=VALUE overrides for every fold")
    p.add_argument("--config_file", help="default: bundles/<bundle>/configs/train.json")
    p.add_argument("--verbose", action="store_true", help="show the trainings' output")
    p.set_defaults(func=cross_validate)
    from clinseg.pipelines import search

    search.add_parser(sub)
    p = sub.add_parser("register", help="register a run's checkpoint and bundle as a model version")
    p.add_argument("run_id", type=run_id_form)
    p.add_argument("--name", help="registered model name (default: the run's bundle)")
    p.add_argument("--alias")
    p.set_defaults(func=register)
    p = sub.add_parser("promote", help="make a training run's model the bundle's models/model.pt")
    p.add_argument("bundle")
    p.add_argument("run", help="the run's name (its folder under <bundle_root>/outputs/)")
    p.add_argument("--bundle_root", help="default: bundles/<bundle>")
    p.set_defaults(func=promote)
    p = sub.add_parser("fetch", help="download a registered version as a runnable bundle folder")
    p.add_argument("name")
    p.add_argument("version", help="version number or alias")
    p.add_argument("--out", required=True)
    p.set_defaults(func=fetch)
    p = sub.add_parser("ui", help="serve the MLflow UI and print the pages of each experiment's runs")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 only behind your network's access control")
    p.add_argument("--port", type=int, default=5000)
    p.set_defaults(func=ui)
    p = sub.add_parser("sync", help="send tracking records spooled while the tracking server did not answer")
    p.add_argument("folders", nargs="*", help="runs' folders or their tracking_spool folders (default: bundles/)")
    p.set_defaults(func=sync)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except InputError as e:  # a wrong run id, model name, alias or path: one line, exit 1
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
