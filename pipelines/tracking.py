"""The MLflow vocabulary of the project, shared by the engine's tracking handlers
(:mod:`clinseg.pipelines.engine.handlers.tracking`) and the command-line tools that read runs back
(:mod:`clinseg.pipelines.experiments`, :mod:`clinseg.pipelines.search`): the store (the project's ``mlruns/`` unless
``MLFLOW_TRACKING_URI`` says otherwise) and its reachability, experiment kinds and the runs view the UI opens on,
run names and tags, the metric names and sections, the store lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from clinseg.pipelines.paths import (  # noqa: F401 (re-exported)
    PROJECT_ROOT,
    SOURCE_ROOT,
    SQLITE_WAIT_ENV,
    default_store,
    sqlite_lock,
    sqlite_wait_s,
    unique_run_name,
    wait_for_sqlite_locks,
)
from clinseg.pipelines.spool import TrackingUnavailableError

DEFAULT_STORE = default_store()
# every process that records into or reads a local store imports this module first
wait_for_sqlite_locks()


logger = logging.getLogger(__name__)


def default_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the SQLite store ``<repo>/mlruns/mlflow.db``."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{DEFAULT_STORE / 'mlflow.db'}"


# MLflow's own kind of an experiment (its UI's kind selector); which workspace the UI opens is chosen by the link
# (runs_page_url), not by this tag
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING_KIND = "custom_model_development"


# how a SQL store reports a row that another writer inserted first (PostgreSQL through psycopg2, SQLite, MySQL); a
# server passes a tag's refusal on as a plain BAD_REQUEST, so only its message tells
_DUPLICATE_KEY = ("UniqueViolation", "duplicate key", "UNIQUE constraint failed", "Duplicate entry", "IntegrityError")


def _written_by_another(error: MlflowException) -> bool:
    """Whether ``error`` says another client wrote the row first (an experiment or a tag)."""
    return error.error_code == "RESOURCE_ALREADY_EXISTS" or any(sign in str(error) for sign in _DUPLICATE_KEY)


def set_experiment_tag(client, experiment_id: str, key: str, value: str, attempts: int = 3) -> None:
    """``client.set_experiment_tag``, safe when other runs write the same tag at the same moment.

    MLflow's SQL store writes a tag by a look, then an insert or an update (SQLAlchemy's ``merge``): two runs that
    start together against one server both find no row, both insert, and the second fails on the tag's unique key.
    Written again, the tag's row is found and updated. Any other failure is raised at once.
    """
    for attempt in range(1, attempts + 1):
        try:
            client.set_experiment_tag(experiment_id, key, value)
            return
        except MlflowException as e:
            if attempt == attempts or not _written_by_another(e):
                raise
            logger.debug(f"tracking: experiment tag {key!r} was written by another run at the same time; again")
            time.sleep(0.1 * attempt)


def mark_model_training(client, experiment) -> None:
    """Tag an experiment as model training (once)."""
    if experiment is not None and (experiment.tags or {}).get(EXPERIMENT_KIND_TAG) != MODEL_TRAINING_KIND:
        set_experiment_tag(client, experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)


# a view of the runs table kept in the experiment (MLflow's shared view state, an experiment tag): the key metric,
# the final loss and the params the runs varied as columns, sorted by the key metric; opened by runs_page_url
RUNS_VIEW_KEY = "runs"
SHARED_VIEW_TAG = "mlflow.sharedViewState."
# the UI's own choice between its GenAI and model-training workspaces (kept in the browser otherwise)
MODEL_TRAINING_WORKSPACE = "workflowType=machine_learning"


def runs_page_url(server: str, experiment_id: str) -> str:
    """The UI page of an experiment's runs, in the model-training workspace, with the experiment's runs view."""
    return (
        f"{server.rstrip('/')}/#/experiments/{experiment_id}/runs?{MODEL_TRAINING_WORKSPACE}"
        f"&viewStateShareKey={RUNS_VIEW_KEY}"
    )


def _column(kind: str, name: str) -> str:
    return f"{kind}.`{name}`"  # the UI's column key


def update_runs_view(client, experiment, key_metric: str | None, params: Sequence[str]) -> None:
    """Add ``params`` (the ones a run overrode) to the experiment's runs view, with the key metric and the final
    loss first; written only when it changes. Concurrent runs may each add their columns: the last write wins."""
    tag = SHARED_VIEW_TAG + RUNS_VIEW_KEY
    try:
        current = json.loads((experiment.tags or {}).get(tag) or "{}")
    except json.JSONDecodeError:
        current = {}
    key = _column("metrics", mlflow_metric_name(key_metric or "train_loss", "train", key_metric))
    metrics = list(dict.fromkeys([key, _column("metrics", mlflow_metric_name("train_loss"))]))
    known = [c for c in current.get("selectedColumns", []) if c.startswith("params.")]
    columns = list(dict.fromkeys([*metrics, *known, *(_column("params", p) for p in params)]))
    state = {"orderByKey": key, "orderByAsc": False, "selectedColumns": columns}
    if state != current:
        set_experiment_tag(client, experiment.experiment_id, tag, json.dumps(state))


# overridden by every run on a given machine, and no hyper-parameter: not a column of the runs view
# where a run writes and how it is named: different for every run, so never a difference worth comparing (the run's
# tags and artifacts record them)
RUN_IDENTITY = {
    "bundle_name",
    "bundle_root",
    "workflow",
    "run_name",
    "output_dir",
    "ckpt_dir",
    "checkpoint_path",
    "tracking_uri",
    "default_dataset_dir",
    "cache_dir",
}

COMPONENT_NAMES = {"network_def": "network"}  # ``network_channels`` reads better than ``network_def_channels``

# settings that change where or how fast a run reads and writes, not what it learns: left out of run names and of
# the columns `experiments compare` shows
NOT_COMPARED = {"dataset_dir", "num_workers", "cache", "cache_dir", "resume"}


def overridden_params(params: Mapping[str, object]) -> list[str]:
    """The tracked params that the running command line overrode (``--learning_rate``, ``--network_def#channels``
    -> ``network_channels``, ``--train#trainer#max_epochs`` -> ``max_epochs``)."""
    from clinseg.pipelines.context import running_run_arguments

    found = running_run_arguments()
    if found is None:
        return []
    names = []
    for key in found[1]:
        if key in RUN_IDENTITY:
            continue
        parts = [COMPONENT_NAMES.get(part, part) for part in str(key).split("#")]
        for candidate in ("_".join(parts), parts[-1]):
            if candidate in params and candidate not in NOT_COMPARED and candidate not in names:
                names.append(candidate)
                break
    return names


RUN_FOLDER_TAG = "run_folder"  # the run's own name: its folder under outputs/, what --resume and --run_name take
_NAMED_VALUE_CHARS = 24
RUN_NAME_CHARS = 250  # MLflow's SQL stores' column width


def described_run_name(bundle: str, workflow: str, changed: Mapping[str, object], folder: str) -> str:
    """The name the UI lists for a run: the bundle, the workflow and the settings its command line changed, then its
    folder name (unique, the handle of ``--resume``), e.g. ``oct_layers train: learning_rate=0.004, batch_size=8 ·
    train-20261201-081230-a1b2c3``. The runs table cuts long names, so what tells runs apart comes first."""
    settings = []
    for name, value in changed.items():
        text = str(value)
        settings.append(f"{name}={text if len(text) <= _NAMED_VALUE_CHARS else text[: _NAMED_VALUE_CHARS - 3] + '...'}")
    what = ", ".join(settings) or "defaults"
    room = RUN_NAME_CHARS - len(f"{bundle} {workflow}:  · {folder}")
    if len(what) > room:  # SQL stores hold 250 characters of a run name; the folder part is never cut
        what = what[: max(room - 3, 0)] + "..."
    return f"{bundle} {workflow}: {what} · {folder}"


def run_folder(run) -> str:
    """A run's own name (its folder under ``outputs/``), for runs recorded before names described them too."""
    return run.data.tags.get(RUN_FOLDER_TAG) or run.info.run_name


def artifact_location_for(tracking_uri: str, experiment_name: str) -> str | None:
    """Artifacts of a local SQLite store live beside it, in ``artifacts/<experiment>/``; servers decide for
    themselves (``mlflow server --artifacts-destination``)."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///") :]).parent / "artifacts" / experiment_name).resolve().as_uri()
    return None


def check_tracking_uri(tracking_uri: str, timeout_s: float = 5.0) -> str:
    """Fail fast, naming the URI, if an HTTP tracking server does not answer; local stores are always usable.

    Called from the bundles' ``initialize`` step, so an unreachable server stops the run before data loading and
    training, not after an hour of training.
    """
    if tracking_uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        url = tracking_uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout_s) as response:
                status = response.status
        except (urllib.error.URLError, OSError) as e:
            raise TrackingUnavailableError(
                tracking_uri,
                f"the MLflow tracking server is unreachable ({getattr(e, 'reason', e)}).",
                "Start it (see README, 'A tracking server'), or unset MLFLOW_TRACKING_URI to record into mlruns/.",
            ) from e
        if status != 200:
            raise TrackingUnavailableError(tracking_uri, f"the tracking server answered HTTP {status} at {url}.")
    return tracking_uri


def environment_tags() -> dict[str, str]:
    """Package versions and device, so a run can be reproduced from its record."""
    import monai
    import numpy
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return {
        "version.monai": monai.__version__,
        "version.torch": torch.__version__,
        "version.numpy": numpy.__version__,
        "version.mlflow": mlflow.__version__,
        "version.python": sys.version.split()[0],
        "device": device,
        "torch_threads": str(torch.get_num_threads()),
    }


def typed_command(argv: Sequence[str] | None = None) -> str:
    """The command line as the user typed it: ``python -m monai.bundle run ...`` rather than the path of the
    module's ``__main__.py`` that ``sys.argv[0]`` holds under ``-m``."""
    import shlex

    argv = list(sys.argv if argv is None else argv)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if spec is not None and spec.name and argv and argv[0].endswith(".py"):
        program = ["python", "-m", spec.name.removesuffix(".__main__")]
    else:
        program = ["python", argv[0]] if argv and argv[0].endswith(".py") else argv[:1]
    return shlex.join([*program, *argv[1:]])


# extra tags of the run a bundle training records, as JSON (set by the sweep and the search for their children)
RUN_TAGS_ENV = "PIPELINE_RUN_TAGS"
# MLflow's run page draws one section of charts per metric-name prefix (before the first '/'), in the order of the
# prefixes' names, and the metrics without a prefix last: the prefixes below put the key curves first
KEY_SECTION = "0_key"
AGGREGATE_SECTIONS = {"train": "1_validation", "evaluate": "1_evaluation"}
CLASS_SECTION_SUFFIX = " by class"
TRAINING_KEY_CURVES = ("train_loss", "learning_rate")


def mlflow_class_name(class_name: str) -> str:
    """A class's name as it can stand in an MLflow metric name. A class is named by the user (``new_task``, a label
    table): MLflow refuses a metric name with other characters than these, and with it the whole request, key metric
    included."""
    return re.sub(r"[^\w.\- :]", "_", class_name).strip(" .") or "_"


def mlflow_metric_name(name: str, workflow: str = "train", key_metric: str | None = None) -> str:
    """The name an engine's metric is recorded under in MLflow, so that the UI shows the key curves first.

    - ``0_key/``: the training loss, the learning rate (ignite's ``lr_group_0``; other groups
      ``learning_rate_group_<i>``) and the bundle's key metric (``0_key/val_mean_dice``);
    - ``1_validation/`` (``1_evaluation/`` in an evaluation's run): the other averaged metrics;
    - ``<metric> by class/<class>``: the per-class values (``val_mean_dice by class/NFL``), one section per metric;
    - ``system/``: MLflow's system metrics (their own tab), unchanged.

    An evaluation's metrics are named ``eval_...`` instead of ``val_...`` (``0_key/eval_mean_dice``), so they never
    mix into the training runs' validation curves. :func:`engine_metric_name` is the inverse."""
    if name.startswith("system/"):
        return name
    if name.startswith("lr_group_"):
        group = name[len("lr_group_") :]
        name = "learning_rate" if group == "0" else f"learning_rate_group_{group}"
    base, _, class_name = name.partition("/")
    evaluation = workflow != "train"
    renamed = "eval_" + base.removeprefix("val_") if evaluation and base.startswith("val_") else base
    if class_name:
        return f"{renamed}{CLASS_SECTION_SUFFIX}/{mlflow_class_name(class_name)}"
    if base in TRAINING_KEY_CURVES or (key_metric is not None and base == key_metric):
        return f"{KEY_SECTION}/{renamed}"
    return f"{AGGREGATE_SECTIONS['evaluate' if evaluation else 'train']}/{renamed}"


# the words of a metric's name that make a lower value the better one: the distances and errors among the metric
# kinds (hd95, hd95_mm, assd_mm, relative_volume_error as ``rve``, layer_thickness_mae_px) and losses
_LOWER_IS_BETTER_WORDS = {"hd", "hd95", "hausdorff", "assd", "asd", "distance", "rve", "error", "mae", "mse", "loss"}


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` (engine or recorded name: ``val_hd95``, ``1_validation/val_rve``,
    ``0_key/train_loss``) is the better one, so that ranking runs by it puts the lowest first."""
    base = engine_metric_name(metric).split("/")[0].lower()
    return bool(set(re.split(r"[^a-z0-9]+", base)) & _LOWER_IS_BETTER_WORDS)


# signed errors: an under-estimate is as wrong as an over-estimate, so the best is the value closest to 0 (the most
# negative relative volume error is the most under-segmented model, not the best one)
_SIGNED_ERROR_WORDS = {"rve"}


def ranking_value(metric: str) -> Callable[[float], float]:
    """The value by which runs are ranked on ``metric``, the best the smallest: the metric itself where lower is
    better, its magnitude for a signed error (best at 0), its negative otherwise."""
    base = engine_metric_name(metric).split("/")[0].lower()
    if set(re.split(r"[^a-z0-9]+", base)) & _SIGNED_ERROR_WORDS:
        return abs
    return (lambda value: value) if lower_is_better(metric) else (lambda value: -value)


def engine_metric_name(name: str) -> str:
    """The engine's name of a metric recorded by :func:`mlflow_metric_name` (``0_key/val_mean_dice`` ->
    ``val_mean_dice``, ``val_hd95 by class/NFL`` -> ``val_hd95/NFL``); an evaluation's keep their ``eval_``."""
    section, _, rest = name.partition("/")
    if not rest or section == "system":
        return name
    if section.endswith(CLASS_SECTION_SUFFIX):
        return f"{section.removesuffix(CLASS_SECTION_SUFFIX)}/{rest}"
    if section in (KEY_SECTION, *AGGREGATE_SECTIONS.values()):
        return rest
    return name


# what must not race between processes on one local SQLite store: creating its tables (MLflow migrates a new
# database on first use) and creating an experiment. A server's clients cannot share this lock: ensure_experiment
# and set_experiment_tag take up where another client wrote first.
store_lock = sqlite_lock


def git_state(root: Path = SOURCE_ROOT) -> dict[str, str]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit, "git_dirty": str(dirty).lower()} if commit else {}


def client_for(tracking_uri: str | None) -> mlflow.MlflowClient:
    """A client of the store, whose SQLite database (MLflow creates and migrates one on first use) is made under
    :func:`store_lock`: two processes migrating one new database at once leave it half-made, and one of them
    fails (a duplicate column, an unexpected ``alembic_version``).

    Raises:
        TrackingUnavailableError: the database stayed locked by another process (:func:`opening_store`).
    """
    uri = tracking_uri or default_tracking_uri()
    with store_lock(uri), opening_store(uri):  # the client opens its store (and so makes a new database) as it is made
        return mlflow.MlflowClient(uri)


@contextlib.contextmanager
def opening_store(tracking_uri: str):
    """Refuse in one line, naming the store, a local database that another process kept locked for longer than
    :func:`sqlite_wait_s` while the store was being opened (a process hung in the middle of a write): the error
    from deep inside MLflow names neither the database nor the way out."""
    if tracking_uri.startswith("sqlite:"):
        sqlite_wait_s()  # refuses a bad PIPELINE_SQLITE_WAIT_S, naming it
    try:
        yield
    except Exception as e:
        if not (tracking_uri.startswith("sqlite:") and "database is locked" in str(e)):
            raise
        database = tracking_uri[len("sqlite:///") :]
        raise TrackingUnavailableError(
            tracking_uri,
            f"the database stayed locked by another process for {sqlite_wait_s():g} s.",
            f"Find the process holding it (fuser {database}) and let it finish or stop it, or wait longer "
            f"({SQLITE_WAIT_ENV}=<seconds>).",
        ) from e


def require_active(experiment, tracking_uri: str | None):
    """``experiment`` (or None, not there yet) when it can take runs.

    Raises:
        InputError: the experiment was deleted in the MLflow UI: MLflow keeps the name taken until the deleted
            experiment is removed for good, so no run can be made under it, and MLflow's own message for that
            ("must be in the 'active' state") names neither the experiment nor the ways out.
    """
    if experiment is not None and experiment.lifecycle_stage != "active":
        from clinseg.datasets.errors import InputError

        uri = tracking_uri or default_tracking_uri()
        raise InputError(
            f"MLflow experiment {experiment.name!r}",
            f"is deleted in {uri} (id {experiment.experiment_id}), so no run can be recorded under it.",
            f"Restore it (mlflow experiments restore --experiment-id {experiment.experiment_id}, with "
            f"MLFLOW_TRACKING_URI={uri}), or remove it for good (mlflow gc --backend-store-uri {uri}).",
        )
    return experiment


def ensure_experiment(client: mlflow.MlflowClient, bundle: str, tracking_uri: str) -> str:
    """The id of the bundle's experiment, created as a model-training experiment if absent (where the bundle's
    runs would create it).

    Raises:
        InputError: the experiment is deleted (:func:`require_active`).
    """
    with store_lock(tracking_uri):
        experiment = require_active(client.get_experiment_by_name(bundle), tracking_uri)
        if experiment is None:
            try:
                return client.create_experiment(
                    bundle,
                    artifact_location=artifact_location_for(tracking_uri, bundle),
                    tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING_KIND},
                )
            except MlflowException as e:  # a server's other client created it since the look
                if not _written_by_another(e):
                    raise
                experiment = client.get_experiment_by_name(bundle)
        mark_model_training(client, experiment)
        return experiment.experiment_id
