"""The engine handlers that record a bundle run in MLflow (the vocabulary they share with the command-line tools is
in :mod:`clinseg.pipelines.tracking`).

:class:`BundleMLflowHandler` extends MONAI's ``MLFlowHandler`` with what a person comparing runs needs: a unique
run per process (never reusing another process's run), the executed config, tags for provenance, learning curves
drawn from the tracked metrics, artifacts that keep their folder structure, and a run that ends FAILED or KILLED
(never RUNNING forever) when training crashes or is interrupted.

Once a run exists, its handlers send everything through a :class:`clinseg.pipelines.spool.TrackingLink`: requests
are bounded (a few seconds, :data:`clinseg.pipelines.spool.HTTP_LIMITS`), and while the server does not answer the
training goes on and the records wait in the run's ``tracking_spool/`` folder, replayed when it answers again, at
the end of the run, or later with ``python -m clinseg.pipelines.experiments sync``.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import mlflow
from ignite.engine import Engine, Events
from monai.handlers import MLFlowHandler

from clinseg.pipelines.engine.handlers.progress import loss_from_output
from clinseg.pipelines.paths import PROJECT_ROOT, default_store, unique_run_name  # noqa: F401 (re-exported)
from clinseg.pipelines.spool import (
    SPOOL_FOLDER,
    TrackingLink,
    bound_http_requests,
    is_refusal,
    short_reason,
)
from clinseg.pipelines.tracking import (
    COMPONENT_NAMES,
    DEFAULT_STORE,
    RUN_FOLDER_TAG,
    RUN_IDENTITY,
    RUN_TAGS_ENV,
    TrackingUnavailableError,
    artifact_location_for,
    default_tracking_uri,
    described_run_name,
    engine_metric_name,
    environment_tags,
    git_state,
    mark_model_training,
    mlflow_metric_name,
    opening_store,
    overridden_params,
    require_active,
    store_lock,
    typed_command,
    update_runs_view,
)

logger = logging.getLogger(__name__)


def running_key_metric() -> str | None:
    """The key metric (``key_metric_name``) of the bundle config being run, if any."""
    from clinseg.pipelines.context import running_parser

    parser = running_parser()
    if parser is None or "key_metric_name" not in parser:
        return None
    return str(parser.get_parsed_content("key_metric_name"))


class SystemMetricsSampler:
    """CPU, memory, disk, network (and GPU, where MLflow finds one) sampled by MLflow's own monitors, every
    ``interval_s`` in a background thread, as ``system/...`` metrics. The thread only samples: the run's handler
    sends the samples with its other metrics, through its link (spooled while the server does not answer).

    On by default; ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`` turns it off, ``MLFLOW_SYSTEM_METRICS_SAMPLING_
    INTERVAL`` sets the interval (MLflow's own variables)."""

    def __init__(self, interval_s: float | None = None):
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.monitors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        try:
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

            self.monitors.append(GPUMonitor())
        except Exception:  # noqa: BLE001 - no NVIDIA GPU or no pynvml: CPU metrics only
            pass
        from mlflow.environment_variables import MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL

        self.interval_s = float(interval_s or MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL.get() or 10.0)
        self._samples: list[tuple[str, float, int, int]] = []
        self._step = 0
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True, name="SystemMetricsSampler")

    @staticmethod
    def enabled() -> bool:
        """MLflow's switch, read as MLflow reads it, but on unless it is set."""
        from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING as switch

        return not switch.defined or switch.get()

    def start(self) -> SystemMetricsSampler:
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stopped.wait(self.interval_s):
            self._sample_once()

    def _sample_once(self) -> None:
        values = {}
        try:
            for monitor in self.monitors:
                monitor.collect_metrics()
                values.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
        except Exception as e:  # noqa: BLE001 - a failed sample costs that sample, never the training
            logger.debug(f"system metrics: sample skipped ({e})")
            return
        timestamp = int(time.time() * 1000)
        with self._lock:
            self._samples.extend((f"system/{k}", float(v), timestamp, self._step) for k, v in values.items())
            self._step += 1

    def take(self) -> list[tuple[str, float, int, int]]:
        with self._lock:
            samples, self._samples = self._samples, []
        return samples

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        if self._step == 0:  # a run shorter than the interval still records what it ran on, once
            self._sample_once()


def executed_config() -> dict | None:
    """The config of the running bundle workflow, after command-line overrides (None outside a bundle run)."""
    from clinseg.pipelines.context import running_parser

    parser = running_parser()
    return None if parser is None else parser.get()


# top-level ids that are structure or code, not settings a person compares
_NOT_PARAMS = {
    "imports",
    "train",
    "validate",
    "initialize",
    "training",
    "evaluating",
    "inferring",
    "run",
    "finalize",
}


def _plain(value) -> bool:
    if isinstance(value, (list, tuple)):
        return len(value) <= 32 and all(_plain(item) for item in value)
    return value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and value[:1] not in "$@%")


VAL_IDS_CHARS = 6000  # what an MLflow param holds; a longer list is cut, its length kept


def tracked_params(parser) -> dict:
    """The hyper-parameters of a run, derived from its resolved config rather than listed by hand: every top-level
    setting whose value is plain (or an expression already resolved to a plain value), the plain settings of the
    top-level components (``network_channels``, ``loss_lambda_dice``, ``optimizer_weight_decay``...), the trainer's
    ``max_epochs`` and the sizes of the data lists."""
    resolved = parser.ref_resolver.resolved_content
    params = {}
    for key, value in parser.get().items():
        if key in _NOT_PARAMS or key in RUN_IDENTITY or key.startswith("_"):
            continue
        if isinstance(value, dict):
            name = COMPONENT_NAMES.get(key, key)
            for sub, setting in value.items():
                if sub == "_target_":
                    params[name] = setting
                elif not sub.startswith("_") and _plain(setting):
                    params[f"{name}_{sub}"] = setting
        elif _plain(value):
            params[key] = value
        elif isinstance(value, str) and value[:1] in "$@" and key in resolved and _plain(resolved[key]):
            params[key] = resolved[key]
    for key, name in (("train::trainer::max_epochs", "max_epochs"),):
        if key in parser:
            params[name] = parser.get(key)
    for key, name in (("train::datalist", "num_train_images"), ("validate::datalist", "num_val_images")):
        if isinstance(resolved.get(key), list):
            params[name] = len(resolved[key])
    validation = resolved.get("validate::datalist")
    if isinstance(validation, list) and validation:  # which cases validated: what tells the folds apart
        ids = sorted({str(item.get("id")) for item in validation if isinstance(item, Mapping)})
        text = ",".join(ids)
        params["val_ids"] = text if len(text) <= VAL_IDS_CHARS else f"{text[: VAL_IDS_CHARS - 24]}... ({len(ids)} ids)"
    if "key_metric_name" in params:
        params["key_metric"] = params["key_metric_name"]
    return params


def untracked_overrides(params: Mapping[str, object]) -> dict[str, object]:
    """The command-line overrides of the running workflow that no param of ``params`` (:func:`tracked_params`)
    records: nested settings such as ``--train#dataloader#shuffle False`` or ``--validate#evaluator#amp False``,
    named as the params of components are (``train_dataloader_shuffle``). Without them, runs of a sweep over such a
    setting carry the same params, and nothing in their record tells them apart."""
    from clinseg.pipelines.context import running_parser, running_run_arguments

    found, parser = running_run_arguments(), running_parser()
    if found is None or parser is None:
        return {}
    extra = {}
    for key, value in found[1].items():  # a name MLflow refuses would take every other param of the run with it
        config_id = str(key).replace("::", "#")
        if config_id in RUN_IDENTITY or config_id.startswith("_") or config_id not in parser:
            continue
        name = re.sub(r"[^\w.\-/: ]", "_", "_".join(COMPONENT_NAMES.get(p, p) for p in config_id.split("#")))
        if name in params or config_id == "train#trainer#max_epochs":  # recorded as max_epochs
            continue
        extra[name] = value
    return extra


PARAM_CHARS = 6000  # MLflow's limit of a param's value


def _param_text(value: str) -> str:
    """A param's value as MLflow takes it: one longer than its limit is refused with every other param of its
    request, so it is cut, and says so."""
    if len(value) <= PARAM_CHARS:
        return value
    return f"{value[: PARAM_CHARS - 32]}... ({len(value)} characters)"


def _flatten(params: Mapping, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return flat


class _RunGuard:
    """Ends the tracked runs of this process as KILLED/FAILED if the process exits without closing them."""

    def __init__(self):
        self.active: dict[str, TrackingLink] = {}
        self.engines: dict[str, Engine] = {}
        self.signal_received: int | None = None
        atexit.register(self.close_all)

    def register(self, run_id: str, link: TrackingLink, engine: Engine | None = None) -> None:
        if not self.active and threading.current_thread() is threading.main_thread():
            # SIGTERM (a scheduler's kill, `timeout`, Ctrl-C in a container) normally skips atexit
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, self._on_sigterm)
        self.active[run_id] = link
        if engine is not None:
            self.engines[run_id] = engine

    def _on_sigterm(self, signum, frame):
        """Stop the tracked engines after their current iteration, where no MLflow write is half done; a second
        SIGTERM, or one outside a run, exits at once.

        Raising in the middle of a store write can leave this process holding SQLite's write lock, and the run
        could then not be marked KILLED ("database is locked")."""
        self.signal_received = signum
        running = [e for r, e in self.engines.items() if r in self.active and not e.should_terminate]
        if not running:
            raise SystemExit(128 + signum)
        print("SIGTERM: stopping after the current iteration (send it again to stop at once)", file=sys.stderr)
        for engine in running:
            engine.terminate()

    def finish(self, run_id: str, status: str) -> None:
        link = self.active.pop(run_id, None)
        if link is not None:
            link.set_terminated(status, run_id)  # spooled if the store does not answer

    def close_all(self) -> None:
        status = "KILLED" if self.signal_received else "FAILED"
        for run_id, link in list(self.active.items()):
            try:
                self.finish(run_id, status)
                link.finish()
            except Exception as e:  # never mask the reason the process is ending
                print(f"could not mark MLflow run {run_id} as {status}: {e}", file=sys.stderr)


RUN_GUARD = _RunGuard()


def default_spool_dir(artifacts: Sequence[str], curves_dir: str | None, run_name: str) -> str:
    """``tracking_spool/`` in the run's folder: the first folder among the artifacts (the run's output folder),
    else the curves' folder, else ``<store>/tracking_spool/<run name>``."""
    for path in artifacts:
        if path and (os.path.isdir(path) or not Path(path).suffix):
            return os.path.join(path, SPOOL_FOLDER)
    if curves_dir:
        return os.path.join(curves_dir, SPOOL_FOLDER)
    return str(DEFAULT_STORE / SPOOL_FOLDER / run_name)


# the training run of each (experiment, run name) in this process, which its validation's logger writes into
_RUNS: dict[tuple[str, str], BundleMLflowHandler] = {}


class _LinkedRun:
    """What :class:`BundleMLflowHandler` and :class:`ValidationMetricsLogger` share: their run's link."""

    spool_dir: str
    _link: TrackingLink | None = None

    @property
    def link(self) -> TrackingLink | None:
        if self.cur_run is None:
            return None
        if self._link is None or self._link.run_id != self.cur_run.info.run_id:
            self._link = TrackingLink(self.client, self.cur_run.info.run_id, self.spool_dir)
        return self._link

    def _log_params(self, params: dict) -> None:
        if self.cur_run is None:
            raise ValueError("no active MLflow run to log params to")
        self.link.log_batch(params=[(key, _param_text(str(value))) for key, value in params.items()])

    def _delete_exist_param_in_dict(self, param_dict: dict) -> None:
        """Drop the params the run already has: the ones sent (or spooled) from here, and, while the store answers,
        the ones it holds."""
        if self.cur_run is None:
            return
        run_id = self.cur_run.info.run_id
        try:
            stored = self.link.read(lambda: self.client.get_run(run_id).data.params, default={})
        except Exception:  # noqa: BLE001 - the store refused the query: only what was logged from here is known
            stored = {}
        for key in list(param_dict):
            if key in self.link.logged_params or key in stored:
                del param_dict[key]


class BundleMLflowHandler(_LinkedRun, MLFlowHandler):
    """Track a bundle's trainer (with its validation) or evaluator as one MLflow run.

    Args:
        bundle_name: the experiment name (one experiment per bundle).
        workflow: ``"train"``, ``"evaluate"``...: tagged, and the prefix of the default run name.
        run_name: defaults to a unique name; a validation evaluator's plain ``MLFlowHandler`` given the same name
            writes its epoch metrics into this run.
        experiment_param: the hyper-parameters a person compares (flattened, logged as params); by default derived
            from the running bundle config (:func:`tracked_params`).
        artifacts: files or folders to log at completion (folders keep their structure).
        checkpoint: a checkpoint file logged under ``checkpoint/`` at completion, if it exists.
        curves_dir: where ``learning_curves.png`` (drawn from the tracked metrics) is written and logged.
        tags: extra tags.
        dataset_manifest: the data's files (``datasets.file_manifest``), logged as ``dataset/manifest.json``.
        tracking_uri: defaults to :func:`default_tracking_uri`.
        flush_every: buffered metric values written together (iteration metrics are batched).
        spool_dir: where records wait while the tracking server does not answer (:mod:`clinseg.pipelines.spool`);
            default :func:`default_spool_dir`, ``tracking_spool/`` in the first artifacts folder (never logged as an
            artifact itself).
        kwargs: passed to ``MLFlowHandler`` (``iteration_log``, ``tag_name``, ...).
    """

    def __init__(
        self,
        bundle_name: str,
        workflow: str = "train",
        run_name: str | None = None,
        experiment_param: Mapping | None = None,
        artifacts: Sequence[str] | str | None = None,
        checkpoint: str | None = None,
        curves_dir: str | None = None,
        tags: Mapping[str, str] | None = None,
        dataset_manifest: list | None = None,
        tracking_uri: str | None = None,
        flush_every: int = 100,
        spool_dir: str | None = None,
        **kwargs,
    ):
        bound_http_requests()
        tracking_uri = tracking_uri or default_tracking_uri()
        if workflow == "train":  # the iteration loss, under its own name
            kwargs.setdefault("tag_name", "train_loss")
            kwargs.setdefault("output_transform", loss_from_output)
        else:  # an evaluator's iterations carry predictions, not a loss
            kwargs.setdefault("iteration_log", False)
        self._derive_params = experiment_param is None
        self._store_uri = os.environ.get("MLFLOW_TRACKING_URI") or tracking_uri
        with store_lock(self._store_uri), opening_store(self._store_uri):  # MONAI's handler opens its store
            self._init_handler(
                tracking_uri=tracking_uri,
                experiment_name=bundle_name,
                run_name=run_name or unique_run_name(workflow),
                experiment_param=_flatten(experiment_param or {}),
                artifacts=None,
                close_on_complete=True,
                artifact_location=artifact_location_for(tracking_uri, bundle_name),
                **kwargs,
            )
        self.bundle_name, self.workflow = bundle_name, workflow
        self.artifact_paths = [artifacts] if isinstance(artifacts, str) else list(artifacts or [])
        self.checkpoint = checkpoint
        self.curves_dir = curves_dir
        self.extra_tags = dict(tags or {})
        self.dataset_manifest = dataset_manifest
        self._buffer: list = []
        self._system_metrics: SystemMetricsSampler | None = None
        self.key_metric: str | None = None  # the bundle's, read from its config at the start
        self.flush_every = flush_every
        self.spool_dir = spool_dir or default_spool_dir(self.artifact_paths, curves_dir, self.run_name)
        self._link = None

    def _init_handler(self, **kwargs) -> None:
        super().__init__(**kwargs)

    def _set_experiment(self):
        with store_lock(self._store_uri):
            if self.experiment is None:  # a deleted experiment is refused in one line (MONAI's error is obscure)
                require_active(self.client.get_experiment_by_name(self.experiment_name), self._store_uri)
            super()._set_experiment()
            mark_model_training(self.client, self.experiment)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)
        if self.iteration_log:
            event = Events.ITERATION_COMPLETED
            if callable(self.iteration_log):
                event = event(event_filter=self.iteration_log)
            engine.add_event_handler(event, self.iteration_completed)

    def _attach_late(self, engine: Engine) -> None:
        """Register the epoch and completion handlers at STARTED, after every other handler's.

        ignite fires handlers in registration order, so the metrics added by report handlers listed after this
        one are recorded, and the files they write at completion exist before artifacts are logged.
        """
        if self.epoch_log and not engine.has_event_handler(self.epoch_completed, Events.EPOCH_COMPLETED):
            event = Events.EPOCH_COMPLETED
            if callable(self.epoch_log):
                event = event(event_filter=self.epoch_log)
            engine.add_event_handler(event, self.epoch_completed)
        if not engine.has_event_handler(self._completed, Events.COMPLETED):
            engine.add_event_handler(Events.COMPLETED, self._completed)

    def _completed(self, engine: Engine) -> None:
        if RUN_GUARD.signal_received:  # stopped by SIGTERM: record what was done, then end as a killed process
            self.run_finish_status = "KILLED"
        try:
            self.complete(engine)
        finally:
            self.close()
        if RUN_GUARD.signal_received:
            raise SystemExit(128 + RUN_GUARD.signal_received)

    def start(self, engine: Engine) -> None:
        new_run = self.cur_run is None
        if new_run and self._derive_params:
            from clinseg.pipelines.context import running_parser

            parser = running_parser()
            params = tracked_params(parser) if parser is not None else {}
            params.update(untracked_overrides(params))
            if self.dataset_manifest is not None:
                from clinseg.datasets.fingerprint import dataset_fingerprint

                params["dataset_fingerprint"] = dataset_fingerprint(self.dataset_manifest)
            self.experiment_param = _flatten(params)
        if self.key_metric is None:
            self.key_metric = self.experiment_param.get("key_metric") or running_key_metric()
        varied = overridden_params(self.experiment_param) if new_run else []
        try:
            if new_run:  # always a run of its own: a resumed training reuses its run's name, never its MLflow run
                self._set_experiment()
                changed = {name: self.experiment_param[name] for name in varied}
                described = described_run_name(self.bundle_name, self.workflow, changed, self.run_name)
                self.cur_run = self.client.create_run(
                    self.experiment.experiment_id, run_name=described, tags={RUN_FOLDER_TAG: self.run_name}
                )
            super().start(engine)  # the params, through the link
        except Exception as e:
            unanswered = isinstance(e, (mlflow.exceptions.MlflowException, OSError)) and not is_refusal(e)
            if self.cur_run is not None or not unanswered:
                raise
            # the server stopped answering between the check in `initialize` and the run's creation
            raise TrackingUnavailableError(
                str(self.client.tracking_uri),
                f"the MLflow tracking server stopped answering before the run was created ({short_reason(e)}).",
                "Start it (see README, 'A tracking server'), or unset MLFLOW_TRACKING_URI to record into mlruns/.",
            ) from e
        self._attach_late(engine)
        if not new_run:
            return
        run_id = self.cur_run.info.run_id
        engine.state.tracking_run_id = run_id  # read by the steps that record it (the run's model.json)
        if SystemMetricsSampler.enabled():
            self._system_metrics = SystemMetricsSampler().start()
        _RUNS[(self.experiment_name, self.run_name)] = self
        RUN_GUARD.register(run_id, self.link, engine)
        tags = {
            "bundle": self.bundle_name,
            "workflow": self.workflow,
            **({"checkpoint_path": str(Path(self.checkpoint).resolve())} if self.checkpoint else {}),
            "command": typed_command()[:5000],
            **git_state(),
            **environment_tags(),
            **self.extra_tags,
        }
        config = executed_config()
        if config is not None:
            text = json.dumps(config, indent=2, sort_keys=True, default=str)
            tags["config_sha256"] = hashlib.sha256(text.encode()).hexdigest()[:16]
            self.link.log_text(text, "config/executed_config.json")
        if self.dataset_manifest is not None:
            self.link.log_text(json.dumps(self.dataset_manifest, indent=1), "dataset/manifest.json")
        parent = os.environ.get("PIPELINE_PARENT_RUN_ID")
        if parent:  # a child of a sweep or a search (pipelines.experiments sweep / search)
            tags["mlflow.parentRunId"] = parent
        tags.update(json.loads(os.environ.get(RUN_TAGS_ENV) or "{}"))  # the search's trial, for one
        if varied:  # the run page's description: what this run changed from the bundle's defaults
            changed = ", ".join(f"{name}={self.experiment_param[name]}" for name in varied)
            tags["mlflow.note.content"] = f"{self.workflow} of {self.bundle_name} with {changed}"
        self.link.log_batch(tags=tags.items())
        if self.workflow == "train" and self.link.online:  # a convenience of the UI: never worth a wait or a failure
            try:
                update_runs_view(self.client, self.experiment, self.key_metric, varied)
            except Exception as e:  # noqa: BLE001
                logger.debug(f"tracking: the experiment's runs view was not updated ({e})")
        training_run = self.extra_tags.get("training_run_id")
        if training_run and training_run != run_id:  # the link back: the training run lists what evaluated it
            self._link_back(training_run, run_id)
        logger.info(
            f"MLflow run '{self.run_name}' ({run_id}) in experiment '{self.bundle_name}' at {self.client.tracking_uri}"
        )

    def _link_back(self, training_run: str, run_id: str) -> None:
        """Tag the training run of the evaluated model with this run. A model trained against another store (a
        bundle copied with its model, another ``MLFLOW_TRACKING_URI``) has no training run here: the store would
        refuse the tag, and a refused record held back every record after it, so the evaluation's own run stayed
        RUNNING without a metric. Its own ``training_run_id`` tag still names the training."""
        unknown = object()
        try:
            found = self.link.read(self.client.get_run, training_run, default=unknown)
        except mlflow.exceptions.MlflowException:
            found = None
        if found is not unknown and found is not None and found.info.lifecycle_stage != "active":
            found = None  # deleted in the UI: the store refuses tags on it as on an unknown run
        if found is None:
            logger.warning(
                f"tracking: the model's training run {training_run} is not in {self.client.tracking_uri} (trained "
                "against another store, or deleted): this run names it in its training_run_id tag, and it is not "
                "tagged back."
            )
            return
        self.link.set_tag(f"{self.workflow}_run.{run_id}", self.run_name, run_id=training_run)

    def link_resumed_run(self, previous_run_id: str, epoch: int | None = None, iteration: int | None = None) -> None:
        """Link this run to the interrupted run it resumes (tags both ways). A run left RUNNING by a process that
        could not record its end (SIGKILL, power loss) is marked KILLED, so the store tells the true story.

        ``epoch`` and ``iteration``: the trainer's counters in the checkpoint resumed from. The interrupted run's
        metric values up to them are copied into this run (:meth:`_continue_history`)."""
        if self.cur_run is None or previous_run_id == self.cur_run.info.run_id:
            return
        run_id, link = self.cur_run.info.run_id, self.link
        link.set_tag("resumed_from_run", previous_run_id)
        unknown = object()
        try:
            previous = link.read(self.client.get_run, previous_run_id, default=unknown)
        except mlflow.exceptions.MlflowException:
            logger.warning(f"the interrupted run {previous_run_id} is not in {self.client.tracking_uri}")
            return
        link.set_tag("resumed_by_run", run_id, run_id=previous_run_id)
        if previous is unknown:  # the store does not answer: decided when the spool is replayed
            link.end_if_running(previous_run_id, "KILLED")
            return
        if previous.info.status == "RUNNING":
            link.set_terminated("KILLED", run_id=previous_run_id)
        if epoch is not None and iteration is not None:
            self._continue_history(previous, epoch, iteration)
        logger.info(f"MLflow run {run_id} resumes run {previous_run_id} ({previous.info.run_name})")

    def _continue_history(self, previous, epoch: int, iteration: int) -> None:
        """Copy the interrupted run's metric values that the checkpoint resumed from contains (steps up to its
        ``iteration`` for the per-iteration loss and learning rate, up to its ``epoch`` for the rest), with their
        steps and times, into this run. Its curves are then the whole training, and its best key metric, which
        ranks it (``experiments compare``, a sweep's best child, a cross-validation's fold) and which
        ``experiments register`` records as the evidence of its ``model.pt``, is the best over every epoch, as
        ``model.pt`` is: the restored best model may be from before the interruption. Values that the interrupted
        run logged after its checkpoint are not copied: that work is done again. Its system metrics stay its own.
        """
        run_id = previous.info.run_id
        copied = []
        for key in previous.data.metrics:
            name = engine_metric_name(key)
            if name.startswith("system/"):
                continue
            last = iteration if name == "train_loss" or name.startswith("learning_rate") else epoch
            try:
                history = self.link.read(self.client.get_metric_history, run_id, key, default=None)
            except Exception:  # noqa: BLE001 - a refused query is treated as no answer: tracking never stops a run
                history = None
            if history is None:  # the store stopped answering: this run's curves start at the checkpoint
                logger.warning(f"tracking: the metrics of run {run_id} before the checkpoint were not copied")
                return
            copied += [(key, m.value, m.timestamp, m.step) for m in history if m.step <= last]
        self.link.log_batch(metrics=sorted(copied, key=lambda m: (m[3], m[2])))

    def _log_metrics(self, metrics: dict, step: int | None = None) -> None:
        """Buffer metrics and write them in batches: one SQLite transaction per iteration costs a measurable
        share of a CPU training step. The buffer is written every ``flush_every`` metrics, at every epoch end, and
        before the run's curves are drawn or the run is closed; every iteration keeps its own step and the time it
        was logged at.
        """
        if self.cur_run is None:
            raise ValueError("no active MLflow run to log metrics to")
        timestamp = int(time.time() * 1000)
        names = {k: mlflow_metric_name(k, self.workflow, self.key_metric) for k in metrics}
        self._buffer.extend((names[k], float(v), timestamp, step or 0) for k, v in metrics.items())
        if len(self._buffer) >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        if self._system_metrics is not None:
            self._buffer.extend(self._system_metrics.take())
        if self._buffer and self.cur_run is not None:
            buffer, self._buffer = self._buffer, []
            self.link.log_batch(metrics=buffer)

    def epoch_completed(self, engine: Engine) -> None:
        super().epoch_completed(engine)
        self.flush()

    def _metric_history(self) -> dict[str, list[tuple[int, float]]]:
        """The run's metrics for its curves: from the store while it answers, else as logged from here."""
        link, run_id = self.link, self.cur_run.info.run_id
        if link.online:

            def stored():
                return {
                    key: [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]
                    for key in self.client.get_run(run_id).data.metrics
                }

            with contextlib.suppress(Exception):  # a refused query: the curves are drawn from what was logged here
                history = link.read(stored)
                if history is not None:
                    return history
        return link.history_points()

    def complete(self, engine: Engine | None = None) -> None:
        if self.cur_run is None:
            return
        self.flush()
        link = self.link
        promotion = getattr(getattr(engine, "state", None), "promotion", None)
        if promotion:  # the decision on the bundle's model (clinseg.pipelines.runs.promote), with both values
            values = {k: (promotion.get(k) or {}).get("value") for k in ("candidate", "incumbent")}
            tags = {"promotion": "promoted" if promotion["promoted"] else "kept"}
            tags["promotion_reason"] = promotion["reason"]
            tags.update({f"promotion_{k}_value": f"{v:.6g}" for k, v in values.items() if v is not None})
            link.log_batch(tags=tags.items())
        if self.curves_dir:
            from clinseg.pipelines.engine.pictures import plot_learning_curves

            history = {engine_metric_name(k): points for k, points in self._metric_history().items()}
            path = plot_learning_curves(history, Path(self.curves_dir) / "learning_curves.png", title=self.run_name)
            if path is not None:
                link.log_artifact(str(path))
        for path in self.artifact_paths:
            if os.path.isdir(path):
                link.log_artifacts(path, exclude=[self.spool_dir])
            elif os.path.isfile(path):
                link.log_artifact(path)
        if self.checkpoint and os.path.isfile(self.checkpoint):
            link.log_artifact(self.checkpoint, "checkpoint")

    def _stop_system_metrics(self) -> None:
        if self._system_metrics is not None:
            self._system_metrics.stop()
            self.flush()
            self._system_metrics = None

    def close(self) -> None:
        self._stop_system_metrics()
        self.flush()
        link = self.link
        run_id = self.cur_run.info.run_id if self.cur_run else None
        try:
            if link is not None:
                RUN_GUARD.active.pop(run_id, None)
                link.set_terminated(self.run_finish_status)
                self.cur_run = None
                link.finish()
        finally:
            self._dispose_sqlite_store()
            RUN_GUARD.engines.pop(run_id, None)
            _RUNS.pop((self.experiment_name, self.run_name), None)

    def exception_raised(self, engine: Engine, e: BaseException) -> None:
        if self.cur_run is not None:
            status = "KILLED" if isinstance(e, (KeyboardInterrupt, SystemExit)) else "FAILED"
            run_id, link = self.cur_run.info.run_id, self.link
            try:
                self._stop_system_metrics()
                self.flush()
                link.set_tag("error", f"{type(e).__name__}: {e}"[:5000])
                if run_id in RUN_GUARD.active:
                    RUN_GUARD.finish(run_id, status)
                else:
                    link.set_terminated(status)
                link.finish()
            finally:
                self.cur_run = None
                _RUNS.pop((self.experiment_name, self.run_name), None)
        raise e


class ValidationMetricsLogger(_LinkedRun, MLFlowHandler):
    """Writes a validator's epoch metrics into the training's run (same experiment and run name as the training's
    :class:`BundleMLflowHandler`), at the trainer's epoch as step.

    In the training's process it takes the run (and the link, with its spool) of that handler, without asking the
    store; otherwise it finds the run by name in the store, and spools into ``spool_dir`` (default
    ``<store>/tracking_spool/<run name>``)."""

    def __init__(self, bundle_name: str, run_name: str, tracking_uri: str | None = None, spool_dir: str | None = None):
        bound_http_requests()
        tracking_uri = tracking_uri or default_tracking_uri()
        with opening_store(tracking_uri):
            super().__init__(
                tracking_uri=tracking_uri,
                experiment_name=bundle_name,
                run_name=run_name,
                iteration_log=False,
                artifact_location=artifact_location_for(tracking_uri, bundle_name),
            )
        self.spool_dir = spool_dir or default_spool_dir([], None, run_name)
        self._link = None
        self._warned = False
        self.key_metric: str | None = None

    def start(self, engine: Engine) -> None:
        owner = _RUNS.get((self.experiment_name, self.run_name))
        if self.key_metric is None:
            self.key_metric = owner.key_metric if owner is not None else running_key_metric()
        if owner is not None and owner.cur_run is not None:
            self.experiment, self.cur_run, self._link = owner.experiment, owner.cur_run, owner.link
            return
        if self.cur_run is not None and self._link is not None and self._link.down_since is not None:
            return  # the run is known; the store does not answer: nothing to ask it now
        try:
            if self.cur_run is None:  # the training's run, by its folder name (its MLflow name describes it)
                self._set_experiment()
                found = self.client.search_runs(
                    [self.experiment.experiment_id],
                    filter_string=f"tags.{RUN_FOLDER_TAG} = '{self.run_name}' and attributes.status = 'RUNNING'",
                    max_results=1,
                )
                self.cur_run = found[0] if found else None
            super().start(engine)
        except Exception as e:  # noqa: BLE001 - the validation goes on without its record
            if not self._warned:
                logger.warning(f"tracking: the validation metrics of run '{self.run_name}' are not recorded: {e}")
                self._warned = True

    def _log_metrics(self, metrics: dict, step: int | None = None) -> None:
        if self.cur_run is None:  # no run to write into (the warning said so)
            return
        from monai.utils import flatten_dict

        timestamp = int(time.time() * 1000)
        values = flatten_dict(metrics).items()
        named = [(mlflow_metric_name(k, "train", self.key_metric), float(v), timestamp, step or 0) for k, v in values]
        self.link.log_batch(metrics=named)
