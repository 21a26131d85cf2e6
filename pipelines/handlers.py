"""Small engine handlers used by the bundle configs."""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar
from ignite.handlers.checkpoint import BaseSaveHandler
from monai.handlers import CheckpointSaver, EarlyStopHandler

from clinseg.datasets.io import atomic_write

logger = logging.getLogger(__name__)


def loss_from_output(output, key: str = "loss") -> float:
    """The loss of an iteration, whether the engine decollates its output (a list of dicts) or not (a dict)."""
    value = output[0][key] if isinstance(output, list) else output[key]
    return float(value)


class LossProgressBar(ProgressBar):
    """ignite's tqdm progress bar, showing the running loss if ``loss_key`` is set, whose line is ended when the run
    fails mid-epoch (before the error is printed).

    Bundle handler lists can only call ``attach(engine)``, so the output transform is chosen here.
    """

    def __init__(self, loss_key: str | None = "loss", **kwargs):
        kwargs.setdefault("persist", True)
        super().__init__(**kwargs)
        self.loss_key = loss_key

    def attach(self, engine: Engine, metric_names=None, output_transform=None, **kwargs) -> None:
        if output_transform is None and self.loss_key is not None:
            key = self.loss_key

            def output_transform(output):
                return {key: loss_from_output(output, key)}

        super().attach(engine, metric_names=metric_names, output_transform=output_transform, **kwargs)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._close_after_last_iteration)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._end_line)

    def _close_after_last_iteration(self, engine: Engine) -> None:
        # the bar's line ends with the epoch's last iteration, before the epoch's handlers run (validation, saves):
        # an error they raise is printed on a line of its own
        length = engine.state.epoch_length
        if length and engine.state.iteration % length == 0:
            self._close(engine)

    def _end_line(self, engine: Engine, error: BaseException) -> None:
        """A run that fails mid-epoch: the bar's line is ended as it stands (not filled to 100 %), so the error's
        one line is printed on a line of its own; the error then goes on."""
        if self.pbar is not None:
            self.pbar.close()
            self.pbar = None
        raise error


class EpochSummary:
    """One log line per training epoch: mean loss, the key validation metric (and its best so far), lr, time."""

    def __init__(self, validator: Engine | None = None, key_metric: str | None = None, loss_key: str = "loss"):
        self.validator, self.key_metric, self.loss_key = validator, key_metric, loss_key
        self.logger = logging.getLogger("train")
        self._losses: list[float] = []
        self._start = 0.0
        self._best: tuple[float, int] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._epoch_started)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._iteration_completed)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)

    def _epoch_started(self, engine: Engine) -> None:
        self._losses, self._start = [], time.perf_counter()

    def _iteration_completed(self, engine: Engine) -> None:
        self._losses.append(loss_from_output(engine.state.output, self.loss_key))

    def _epoch_completed(self, engine: Engine) -> None:
        parts = [f"epoch {engine.state.epoch}/{engine.state.max_epochs}"]
        if self._losses:
            parts.append(f"loss {sum(self._losses) / len(self._losses):.4f}")
        metrics = self.validator.state.metrics if self.validator is not None else {}
        if self.key_metric and self.key_metric in metrics:
            value = float(metrics[self.key_metric])
            if self._best is None or value > self._best[0]:
                self._best = (value, engine.state.epoch)
            parts.append(f"{self.key_metric} {value:.4f} (best {self._best[0]:.4f} at epoch {self._best[1]})")
        optimizer = getattr(engine, "optimizer", None)
        if optimizer is not None:
            parts.append(f"lr {optimizer.param_groups[0]['lr']:.2e}")
        parts.append(f"{time.perf_counter() - self._start:.1f} s")
        self.logger.info(" | ".join(parts))


class TrainingMonitor:
    """What follows each validation and what a person watching a training sees: the LR schedule stepped on the key
    validation metric (on every rank, so the ranks stay in step), one summary line per epoch and a progress bar
    with the running loss (rank 0 only)."""

    def __init__(self, validator: Engine, lr_scheduler, key_metric: str, progress_bar: bool = True):
        from monai.handlers import LrScheduleHandler

        from clinseg.pipelines.workflow import is_rank_zero

        self.lr_schedule = LrScheduleHandler(
            lr_scheduler, print_lr=False, step_transform=lambda engine: validator.state.metrics.get(key_metric, 0.0)
        )
        self.summary = EpochSummary(validator, key_metric) if is_rank_zero() else None
        self.progress = LossProgressBar() if progress_bar and is_rank_zero() else None

    def attach(self, engine: Engine) -> None:
        for handler in (self.lr_schedule, self.summary, self.progress):
            if handler is not None:
                handler.attach(engine)


class TrainingProgress:
    """The training state that lives outside the engines, saved in the latest checkpoint so that a resumed run
    continues it instead of silently restarting it: the validator's best metric and its epoch, the ranking of the
    best-model saver (``model.pt`` is only replaced by a better model), the early-stopping counter, the report's
    best value, and the MLflow run of the interrupted training, to which the resumed run is linked.
    """

    def __init__(self, validator: Engine, validate_handlers: list, train_handlers: list):
        self.validator, self.validate_handlers, self.train_handlers = validator, validate_handlers, train_handlers

    def _find(self, handlers: list, kind: str):
        return next((h for h in handlers if type(h).__name__ == kind), None)

    def state_dict(self) -> dict:
        state = {
            "best_metric": getattr(self.validator.state, "best_metric", -1.0),
            "best_metric_epoch": getattr(self.validator.state, "best_metric_epoch", -1),
        }
        saver = next((h for h in self.validate_handlers if getattr(h, "_key_metric_checkpoint", None)), None)
        if saver is not None:
            state["best_model_saver"] = saver._key_metric_checkpoint.state_dict()
        early_stop = self._find(self.validate_handlers, "EarlyStopHandler")
        if early_stop is not None and getattr(early_stop, "_handler", None) is not None:
            state["early_stop"] = dict(early_stop._handler.state_dict())
        report = self._find(self.validate_handlers, "EvaluationReport")
        if report is not None and report.best is not None:
            state["report_best"] = list(report.best)
        tracker = self._find(self.train_handlers, "BundleMLflowHandler")
        if tracker is not None and tracker.cur_run is not None:
            state["mlflow_run_id"] = tracker.cur_run.info.run_id
        return state

    def load_state_dict(self, state: dict) -> None:
        self.validator.state.best_metric = state.get("best_metric", -1.0)
        self.validator.state.best_metric_epoch = state.get("best_metric_epoch", -1)
        saver = next((h for h in self.validate_handlers if getattr(h, "_key_metric_checkpoint", None)), None)
        if saver is not None and "best_model_saver" in state:
            saver.load_state_dict(state["best_model_saver"])
        early_stop = self._find(self.validate_handlers, "EarlyStopHandler")
        if early_stop is not None and getattr(early_stop, "_handler", None) is not None and "early_stop" in state:
            early_stop._handler.load_state_dict(state["early_stop"])
        report = self._find(self.validate_handlers, "EvaluationReport")
        if report is not None and "report_best" in state:
            report.best = tuple(state["report_best"])
        tracker = self._find(self.train_handlers, "BundleMLflowHandler")
        if tracker is not None and state.get("mlflow_run_id"):
            tracker.link_resumed_run(state["mlflow_run_id"])


def latest_checkpoints(ckpt_dir: str) -> dict:
    """The ``latest_checkpoint_epoch=N.pt`` files in ``ckpt_dir``, by epoch."""
    found = {}
    for path in Path(ckpt_dir).glob("latest_checkpoint_epoch=*.pt"):
        match = re.fullmatch(r"latest_checkpoint_epoch=(\d+)\.pt", path.name)
        if match:
            found[int(match.group(1))] = path
    return found


def resume_from_latest(trainer: Engine, latest_checkpoint, ckpt_dir: str) -> str:
    """Attach a loader of the newest ``latest_checkpoint_epoch=N.pt`` in ``ckpt_dir`` (network, optimizer, LR
    scheduler, trainer epoch and iteration, :class:`TrainingProgress`), so ``trainer.run()`` continues from it.

    Raises:
        DataError: when ``ckpt_dir`` holds no latest checkpoint to resume from.
    """
    from clinseg.datasets.errors import DataError
    from clinseg.pipelines.checkpoints import CheckpointLoader

    found = latest_checkpoints(ckpt_dir)
    if not found:
        raise DataError(
            Path(ckpt_dir).resolve(),
            "holds no latest_checkpoint_epoch=N.pt to resume from.",
            "Start a new training without --resume, or point --ckpt_dir at the interrupted run's models folder.",
        )
    resumed_epoch = max(found)
    path = found[resumed_epoch]
    logger.info(f"resuming from {path} (epoch {resumed_epoch})")
    CheckpointLoader(load_path=str(path), load_dict=latest_checkpoint.save_dict, map_location="cpu").attach(trainer)

    def drop_resumed_checkpoint(engine: Engine) -> None:
        # the new run's saver keeps one latest checkpoint but does not know the one resumed from: remove that once
        # a newer one is on disk, never before (a second interruption must still find something to resume)
        if any(epoch > resumed_epoch for epoch in latest_checkpoints(ckpt_dir)):
            path.unlink(missing_ok=True)
            engine.remove_event_handler(drop_resumed_checkpoint, Events.EPOCH_COMPLETED)

    trainer.add_event_handler(Events.EPOCH_COMPLETED, drop_resumed_checkpoint)
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
    ``model.pt`` with a better model."""

    def __init__(self, save_dir: str, network: torch.nn.Module, filename: str = "model.pt"):
        super().__init__(
            save_dir=save_dir, save_dict={"model": network}, save_key_metric=True, key_metric_filename=filename
        )


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
            "progress": TrainingProgress(validator, validate_handlers, train_handlers),
        }
        super().__init__(save_dir=save_dir, save_dict=save_dict, file_prefix="latest", save_interval=1, n_saved=1)


def early_stop_on(key_metric: str, patience: int) -> EarlyStopHandler:
    """Stop training when ``key_metric`` has not improved for ``patience`` validations; 0 never stops. The trainer
    is set by :func:`clinseg.pipelines.workflow.run_training`."""
    return EarlyStopHandler(
        patience=patience if patience > 0 else 2**31,
        score_function=lambda engine: engine.state.metrics[key_metric],
        epoch_level=True,
    )
