"""What follows each validation: the learning-rate schedule stepped on the key metric, early stopping, and the
progress a person watching sees (:mod:`clinseg.pipelines.engine.handlers.progress`).
"""

from __future__ import annotations

import logging

import torch
from ignite.engine import Engine, Events
from monai.handlers import EarlyStopHandler

from clinseg.pipelines.engine.handlers.averaging import WeightAverage
from clinseg.pipelines.engine.handlers.progress import EpochSummary, LossProgressBar

logger = logging.getLogger(__name__)


class TrainingMonitor:
    """What follows each validation and what a person watching a training sees: the LR schedule stepped each epoch
    (a ``ReduceLROnPlateau`` on the key validation metric, any other scheduler by its own count), on every rank so
    the ranks stay in step, one summary line per epoch and a progress bar with the running loss (rank 0 only).
    With ``network`` and a ``weight_average_decay`` above 0, validation sees a moving average of the weights
    (:class:`~clinseg.pipelines.engine.handlers.averaging.WeightAverage`), on every rank."""

    def __init__(
        self,
        validator: Engine,
        lr_scheduler,
        key_metric: str,
        progress_bar: bool = True,
        network: torch.nn.Module | None = None,
        weight_average_decay: float = 0.0,
    ):
        from monai.handlers import LrScheduleHandler

        from clinseg.pipelines.context import is_rank_zero

        # MONAI passes what step_transform returns to scheduler.step(); only a plateau scheduler takes a metric,
        # any other would read it as a (deprecated) epoch number, so it keeps MONAI's default: step() alone
        if isinstance(lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.lr_schedule = LrScheduleHandler(
                lr_scheduler, print_lr=False, step_transform=lambda engine: validator.state.metrics.get(key_metric, 0.0)
            )
        else:
            self.lr_schedule = LrScheduleHandler(lr_scheduler, print_lr=False)
        self.summary = EpochSummary(validator, key_metric) if is_rank_zero() else None
        self.progress = LossProgressBar() if progress_bar and is_rank_zero() else None
        # on every rank, as the schedule: each rank validates the same (averaged) weights
        self.weight_average = (
            WeightAverage(network, validator, weight_average_decay)
            if network is not None and weight_average_decay > 0
            else None
        )

    def attach(self, engine: Engine) -> None:
        # a schedule that spans a time budget (clinseg.pipelines.engine.schedules.PolyLR) starts its clock with
        # the training, as the time limit does
        start_clock = getattr(self.lr_schedule.lr_scheduler, "start_clock", None)
        if start_clock is not None:
            engine.add_event_handler(Events.STARTED, start_clock)
        for handler in (self.lr_schedule, self.summary, self.progress, self.weight_average):
            if handler is not None:
                handler.attach(engine)


def early_stop_on(key_metric: str, patience: int) -> EarlyStopHandler:
    """Stop training when ``key_metric`` has not improved for ``patience`` validations; 0 never stops. The trainer
    is set by :func:`clinseg.pipelines.engine.workflow.run_training`."""
    return EarlyStopHandler(
        patience=patience if patience > 0 else 2**31,
        score_function=lambda engine: engine.state.metrics[key_metric],
        epoch_level=True,
    )
