"""Checkpoints written atomically: the best validated model, the latest state to resume from, and the training
state outside the engines that a resumed run must continue (:class:`TrainingProgress`).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers.checkpoint import BaseSaveHandler, Checkpoint
from monai.handlers import CheckpointSaver, EarlyStopHandler

from clinseg.datasets.io import atomic_write
from clinseg.pipelines.engine.handlers.evaluation import EvaluationReport
from clinseg.pipelines.engine.handlers.schedule import TrainingMonitor

logger = logging.getLogger(__name__)


def _tracking_handler() -> type:
    """The MLflow run handler's class, imported when a training state is saved or restored, not with this module:
    inference and the Deploy apps load checkpoints without the tracking stack."""
    from clinseg.pipelines.engine.handlers.tracking import BundleMLflowHandler

    return BundleMLflowHandler


class TrainingProgress:
    """The training state that lives outside the engines, saved in the latest checkpoint so that a resumed run
    continues it instead of silently restarting it: the validator's best metric and its epoch, the ranking of the
    best-model saver (``model.pt`` is only replaced by a better model), the early-stopping counter, the report's
    best value, the weight average when the training keeps one (:class:`TrainingMonitor`), and the MLflow run of the
    interrupted training, to which the resumed run is linked, with the trainer's epoch and iteration at the save
    (the resumed run's MLflow record continues that run's metrics up to them).
    """

    def __init__(self, validator: Engine, validate_handlers: list, train_handlers: list, trainer: Engine | None = None):
        self.validator, self.validate_handlers, self.train_handlers = validator, validate_handlers, train_handlers
        self.trainer = trainer
        # what the run trains on and with (:func:`resume_from_latest` compares a resumed run's with these), set by
        # clinseg.pipelines.engine.workflow.run_training
        self.run_settings: dict | None = None

    @staticmethod
    def _find(handlers: list, kind: type):
        return next((h for h in handlers if isinstance(h, kind)), None)

    def tracker(self):
        """The training's MLflow run handler, or None."""
        return self._find(self.train_handlers, _tracking_handler())

    def weight_average(self):
        """The training's :class:`~clinseg.pipelines.engine.handlers.averaging.WeightAverage`, or None."""
        monitor = self._find(self.train_handlers, TrainingMonitor)
        return getattr(monitor, "weight_average", None)

    def state_dict(self) -> dict:
        state = {
            "best_metric": getattr(self.validator.state, "best_metric", -1.0),
            "best_metric_epoch": getattr(self.validator.state, "best_metric_epoch", -1),
        }
        saver = next((h for h in self.validate_handlers if getattr(h, "_key_metric_checkpoint", None)), None)
        if saver is not None:
            state["best_model_saver"] = saver._key_metric_checkpoint.state_dict()
        early_stop = self._find(self.validate_handlers, EarlyStopHandler)
        if early_stop is not None and getattr(early_stop, "_handler", None) is not None:
            state["early_stop"] = dict(early_stop._handler.state_dict())
        report = self._find(self.validate_handlers, EvaluationReport)
        if report is not None and report.best is not None:
            state["report_best"] = list(report.best)
        tracker = self.tracker()
        if tracker is not None and tracker.cur_run is not None:
            state["mlflow_run_id"] = tracker.cur_run.info.run_id
        if self.trainer is not None:
            state.update(epoch=self.trainer.state.epoch, iteration=self.trainer.state.iteration)
        average = self.weight_average()
        average_state = average.state_dict() if average is not None else {}
        if average_state:
            state["weight_average"] = average_state
        if self.run_settings is not None:
            state["run_settings"] = self.run_settings
        from clinseg.pipelines.engine.decision import cases_state

        cases = cases_state(self.validator)  # a resumed run chooses its decision rule on its best epoch's cases
        if cases is not None:
            state["decision_cases"] = cases
        return state

    def load_state_dict(self, state: dict) -> None:
        self.validator.state.best_metric = state.get("best_metric", -1.0)
        self.validator.state.best_metric_epoch = state.get("best_metric_epoch", -1)
        saver = next((h for h in self.validate_handlers if getattr(h, "_key_metric_checkpoint", None)), None)
        if saver is not None and "best_model_saver" in state:
            saver.load_state_dict(state["best_model_saver"])
        early_stop = self._find(self.validate_handlers, EarlyStopHandler)
        if early_stop is not None and getattr(early_stop, "_handler", None) is not None and "early_stop" in state:
            early_stop._handler.load_state_dict(state["early_stop"])
        report = self._find(self.validate_handlers, EvaluationReport)
        if report is not None and "report_best" in state:
            report.best = tuple(state["report_best"])
        tracker = self.tracker()
        if tracker is not None and state.get("mlflow_run_id"):
            tracker.link_resumed_run(state["mlflow_run_id"], state.get("epoch"), state.get("iteration"))
        average = self.weight_average()
        if average is not None and "weight_average" in state:
            average.load_state_dict(state["weight_average"])
        from clinseg.pipelines.engine.decision import restore_cases

        restore_cases(self.validator, state.get("decision_cases"))
        self._take_best_from_saved_model(saver, early_stop, report)

    def _take_best_from_saved_model(self, saver, early_stop, report) -> None:
        """Rank from the ``model.pt`` on disk, as its ``model.json`` describes it, where the checkpoint knows another
        best: a run killed after an epoch's better model was saved but before that epoch's latest checkpoint. Ranked
        by the checkpoint's older best, the resumed run would replace that model with a worse one, or keep it and
        describe it at the end with the older epoch's metric value."""
        if not isinstance(saver, BestModelSaver):
            return
        from clinseg.pipelines import runs

        record = runs.read_record(saver.models_dir)  # also completes a write of the pair a kill left half-done
        value, epoch = (record or {}).get("value"), (record or {}).get("epoch")
        if value is None or epoch is None or epoch == getattr(self.validator.state, "best_metric_epoch", -1):
            return
        logger.info(
            f"{saver.models_dir / runs.MODEL_FILE} is of epoch {epoch} ({record.get('key_metric')} {value:.4f}), "
            "saved after the latest checkpoint: it stays the best model to beat"
        )
        self.validator.state.best_metric, self.validator.state.best_metric_epoch = value, epoch
        ranking = saver._key_metric_checkpoint
        name = ranking._saved[-1].filename if ranking._saved else runs.MODEL_FILE
        ranking._saved = [Checkpoint.Item(value, name)]
        if early_stop is not None and getattr(early_stop, "_handler", None) is not None:
            early_stop._handler.best_score = value
        if report is not None:
            report.best = (value, epoch)


def latest_checkpoints(ckpt_dir: str) -> dict:
    """The ``latest_checkpoint_epoch=N.pt`` files in ``ckpt_dir``, by epoch."""
    found = {}
    for path in Path(ckpt_dir).glob("latest_checkpoint_epoch=*.pt"):
        match = re.fullmatch(r"latest_checkpoint_epoch=(\d+)\.pt", path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def _same_value(a, b) -> bool:
    """Two recorded settings alike, numbers within rounding (a learning rate of 1e-3 and of 0.001 are one)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_value(a[k], b[k]) for k in a)
    numbers = [isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)]
    return math.isclose(a, b, rel_tol=1e-6) if all(numbers) else a == b


def require_same_run_settings(path: Path, recorded: dict | None, current: dict | None) -> None:
    """A resumed training continues with what its run was started with, as its latest checkpoint records it
    (:attr:`TrainingProgress.run_settings`): resumed with another image size, other data or another learning rate,
    it would go on training the interrupted run's weights on other inputs, rank a model validated on other cases
    against its restored best, and record the new values for a model trained mostly with the old ones. Settings
    either side lacks are not compared (a checkpoint written before they were recorded); the network's structure
    is left to the checkpoint's own load, which names the tensors that differ.

    Raises:
        ConfigError: naming the first setting that differs, its value now and in the checkpoint ``path``.
    """
    from clinseg.datasets.errors import ConfigError

    if not recorded or not current:
        return
    run = path.parent.parent.name
    fresh = f"or start a new run from its weights (--initial_weights {path})."
    for key, value in current.get("config", {}).items():
        before = recorded.get("config", {}).get(key)
        if key.startswith("network_def#") or before is None or value is None or _same_value(value, before):
            continue
        raise ConfigError(
            key,
            f"is {json.dumps(value)}, but run {run} was started with {json.dumps(before)} ({path}): resumed, "
            "it would go on with other settings than the ones its weights were trained with.",
            f"Resume with --{key} '{json.dumps(before)}', {fresh}",
        )
    before, now = recorded.get("processes"), current.get("processes")
    if before and now and before != now:
        raise ConfigError(
            "resume",
            f"run {run} was trained by {before} processes ({path}), this run has {now}: the processes share each "
            "epoch's cases, so resumed, its epochs would be of another length than the ones it restores.",
            f"Resume with as many processes as it was started with (torchrun --nproc_per_node {before} and the "
            f"multi_gpu_train.json overlay, or one process without them), {fresh}",
        )
    for key, what in (("validation_fingerprint", "validated on"), ("training_fingerprint", "trained on")):
        before, now = recorded.get(key), current.get(key)
        if before and now and before != now:
            raise ConfigError(
                "resume",
                f"run {run} was {what} other data than this config's ({key.split('_')[0]} fingerprint "
                f"{before[:12]} in {path}, now {now[:12]}): resumed, its model would mix the two.",
                f"Resume with the run's own --dataset_dir and split settings (its MLflow params), {fresh}",
            )


def resume_from_latest(trainer: Engine, latest_checkpoint, ckpt_dir: str, run_settings: dict | None = None) -> str:
    """Attach a loader of the newest ``latest_checkpoint_epoch=N.pt`` in ``ckpt_dir`` (network, optimizer, LR
    scheduler, trainer epoch and iteration, :class:`TrainingProgress`), so ``trainer.run()`` continues from it.
    ``run_settings``: this run's (:attr:`TrainingProgress.run_settings`), checked against the checkpoint's first
    (:func:`require_same_run_settings`), before anything of the run is started or written.

    Raises:
        DataError: when ``ckpt_dir`` holds no latest checkpoint to resume from, or it cannot be read.
        ConfigError: a setting that differs from the checkpoint's, or fewer ``max_epochs`` than it has done.
    """
    from clinseg.datasets.errors import ConfigError, DataError
    from clinseg.pipelines.engine.checkpoints import CheckpointLoader, read_checkpoint

    found = latest_checkpoints(ckpt_dir)
    if not found:
        raise DataError(
            Path(ckpt_dir).resolve(),
            "holds no latest_checkpoint_epoch=N.pt to resume from.",
            "Start a new training without --resume, or point --ckpt_dir at the interrupted run's models folder.",
        )
    resumed_epoch = max(found)
    path = found[resumed_epoch]
    max_epochs = trainer.state.max_epochs
    if max_epochs is not None and resumed_epoch > max_epochs:
        raise ConfigError(
            "train#trainer#max_epochs",
            f"is {max_epochs}, but {path} is of epoch {resumed_epoch}: there is nothing left to train.",
            f"Pass --train#trainer#max_epochs above {resumed_epoch} to train on.",
        )
    if run_settings:
        checkpoint = read_checkpoint(path, map_location="cpu")  # the loader reads it again at the run's start
        progress = checkpoint.get("progress") if isinstance(checkpoint, dict) else None
        require_same_run_settings(path, (progress or {}).get("run_settings"), run_settings)
        del checkpoint
    logger.info(f"resuming from {path} (epoch {resumed_epoch})")
    CheckpointLoader(load_path=str(path), load_dict=latest_checkpoint.save_dict, map_location="cpu").attach(trainer)

    def drop_found_checkpoints(engine: Engine) -> None:
        # the new run's saver keeps one latest checkpoint but does not know the ones found at the start: the one
        # resumed from, and an older one whose removal the kill forestalled (it is removed only after its successor
        # is in place). Remove them once a newer one is on disk, never before (a second interruption must still
        # find something to resume)
        if any(epoch > resumed_epoch for epoch in latest_checkpoints(ckpt_dir)):
            for old in found.values():
                old.unlink(missing_ok=True)
            engine.remove_event_handler(drop_found_checkpoints, Events.EPOCH_COMPLETED)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, drop_found_checkpoints)
    return str(path)


class AtomicDiskSaver(BaseSaveHandler):
    """Write each checkpoint to a temporary file in the target folder, then rename it into place: a process killed
    during a save leaves the previous checkpoint intact, never a truncated one. ignite asks to remove the file a
    new checkpoint replaces *before* writing it; the removal is deferred until the new file is in place (and never
    hits the file just written, when the name is fixed). Files get the usual permissions (MONAI's own saver writes
    in place, because ignite's atomic mode leaves files readable by their owner only).

    A save the environment refuses (a full disk, where ``torch.save`` loses the reason, a quota, a read-only or
    unwritable folder) raises a ``DataError`` naming the checkpoint and the cause
    (:func:`clinseg.datasets.io.atomic_write`); the checkpoints saved before it are kept, the one it would have
    replaced included, and no temporary file is left."""

    def __init__(self, saver):
        self.saver = saver  # MONAI's disk saver, whose folder and fixed file name are kept
        self.dirname = Path(saver.dirname)
        self._pending_removals: list[str] = []

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        name = getattr(self.saver, "filename", None) or filename
        atomic_write(self.dirname / name, lambda tmp: torch.save(checkpoint, tmp))
        removals, self._pending_removals = self._pending_removals, []
        for old in removals:
            if old != name:
                (self.dirname / old).unlink(missing_ok=True)

    def remove(self, filename: str) -> None:
        self._pending_removals.append(getattr(self.saver, "filename", None) or filename)


def write_described_model(models_dir: str | Path, state: dict | bytes, record: dict) -> dict:
    """Write ``models_dir/model.pt`` (``state``: a state dict, or its bytes) and its ``model.json`` (``record``, with
    the file's SHA-256 added) as one step: each is staged whole, then both are renamed under a journal that the next
    reader completes (:func:`clinseg.pipelines.runs.read_record`), so that a process killed at any moment leaves the
    previous pair or the new one, never a model beside the description of another. Returns the record written."""
    from filelock import FileLock

    from clinseg.datasets.io import journaled_write_all
    from clinseg.pipelines import runs

    models_dir = Path(models_dir)
    if not isinstance(state, bytes):
        buffer = io.BytesIO()
        torch.save(state, buffer)
        state = buffer.getvalue()
    record = {**record, "sha256": hashlib.sha256(state).hexdigest(), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    text = json.dumps(record, indent=2) + "\n"
    writes = [
        (models_dir / runs.MODEL_FILE, lambda tmp: Path(tmp).write_bytes(state)),
        (models_dir / runs.MODEL_RECORD, lambda tmp: Path(tmp).write_text(text)),
    ]
    lock = models_dir / runs.PROMOTION_LOCK  # taken by a reader that completes a journal a kill left
    with FileLock(str(lock), timeout=600):
        try:
            journaled_write_all(writes, models_dir / runs.PROMOTION_JOURNAL)
        finally:
            # removed while held, so the run's folder keeps only its files; a reader that locks a new file later
            # finds no journal left to complete
            lock.unlink(missing_ok=True)
    return record


class DescribedDiskSaver(AtomicDiskSaver):
    """:class:`AtomicDiskSaver` of ``model.pt`` that writes its ``model.json`` with it
    (:func:`write_described_model`), once ``describe`` is set: a function giving the record of the model being
    saved."""

    def __init__(self, saver):
        super().__init__(saver)
        self.describe: Callable[[], dict] | None = None

    def __call__(self, checkpoint, filename: str, metadata=None) -> None:
        if self.describe is None:
            return super().__call__(checkpoint, filename, metadata)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_described_model(self.dirname, buffer.getvalue(), self.describe())
        self._pending_removals = []  # the one file name is replaced in place


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` (same arguments) whose every write goes through :class:`AtomicDiskSaver`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name in ("_final_checkpoint", "_key_metric_checkpoint", "_interval_checkpoint"):
            checkpoint = getattr(self, name, None)
            if checkpoint is not None:
                checkpoint.save_handler = AtomicDiskSaver(checkpoint.save_handler)


class BestModelSaver(AtomicCheckpointSaver):
    """``models/model.pt``: the network's weights (a plain state dict) each time the key validation metric improves.
    Attached to the validator; its ranking is kept in the latest checkpoint, so a resumed run only replaces
    ``model.pt`` with a better model. Given a record (:meth:`describe_with`), it writes ``model.json`` with each model
    in one step (:func:`write_described_model`)."""

    def __init__(self, save_dir: str, network: torch.nn.Module, filename: str = "model.pt"):
        super().__init__(
            save_dir=save_dir, save_dict={"model": network}, save_key_metric=True, key_metric_filename=filename
        )
        self.models_dir = Path(save_dir)
        self.writer = DescribedDiskSaver(self._key_metric_checkpoint.save_handler.saver)
        self._key_metric_checkpoint.save_handler = self.writer

    def describe_with(self, describe: Callable[[], dict]) -> None:
        """Write each saved model's ``model.json`` with it: ``describe()`` gives its record (the run's, with the key
        metric's value and epoch), so that whenever the run stops, ``model.pt`` is described by its own record."""
        self.writer.describe = describe


def best_model_saver(handlers: list) -> BestModelSaver | None:
    """The :class:`BestModelSaver` among a validator's ``handlers``, or None."""
    return next((h for h in handlers if isinstance(h, BestModelSaver)), None)


class LatestCheckpointSaver(AtomicCheckpointSaver):
    """``latest_checkpoint_epoch=N.pt`` after every epoch (one kept): everything a resumed run needs, the network,
    optimizer, LR scheduler, trainer counters and :class:`TrainingProgress`."""

    def __init__(
        self,
        save_dir: str,
        network: torch.nn.Module,
        optimizer,
        lr_scheduler,
        trainer: Engine,
        validator: Engine,
        validate_handlers: list,
        train_handlers: list,
    ):
        save_dict = {
            "model": network,
            "optimizer": optimizer,
            "lr_scheduler": lr_scheduler,
            "trainer": trainer,
            "progress": TrainingProgress(validator, validate_handlers, train_handlers, trainer),
        }
        super().__init__(save_dir=save_dir, save_dict=save_dict, file_prefix="latest", save_interval=1, n_saved=1)

    def interval_completed(self, engine: Engine) -> None:
        # the run's buffered losses are written (to the store, or its spool) before the checkpoint that claims their
        # iterations: the tracker's own epoch-end write is registered at the run's start, after this saver, and a
        # process killed between the two left a checkpoint whose run lacked its last epoch's losses (a gap when
        # resumed)
        tracker = self.save_dict["progress"].tracker()
        if tracker is not None and tracker.cur_run is not None:
            tracker.flush()
        super().interval_completed(engine)
