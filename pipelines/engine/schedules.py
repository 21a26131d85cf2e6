"""Learning-rate schedules that know the training's budget.

A training given ``--train_time_limit_s`` stops at a wall-clock time that no epoch count predicts: a plateau
schedule then ends wherever the clock stops it, usually at a high learning rate (the DRIVE benchmark's validation
F1 swung by 0.005 from one validation to the next in its last minutes). :class:`PolyLR` is nnU-Net's polynomial
decay, spanning whichever ends first, the epochs or the time budget, so the learning rate reaches zero as the
training ends. On the DRIVE benchmark it settles where the plateau schedule does (validation F1 0.810-0.811 over
the last ten validations of 600 s, ``bundles/vessels/docs/README.md``), so the bundles keep ``ReduceLROnPlateau``;
``lr_scheduler`` selects it for a training with a budget.
"""

from __future__ import annotations

import time

import torch

from clinseg.datasets.errors import ConfigError


class PolyLR(torch.optim.lr_scheduler.PolynomialLR):
    """Torch's ``PolynomialLR`` over ``max_epochs`` (``lr = base_lr * (1 - progress) ** exponent``, stepped once per
    epoch), where ``progress`` is the larger of the fraction of the epochs done and, when ``time_limit_s`` > 0, the
    fraction of the time budget spent.

    The budget's clock starts with the training (:meth:`start_clock`, called at the trainer's ``STARTED`` by
    :class:`clinseg.pipelines.engine.handlers.schedule.TrainingMonitor`), as the time limit's own does
    (:func:`clinseg.pipelines.engine.workflow.run_training`); until then only epochs count. A resumed run restores
    the epoch count from its checkpoint; its time budget is its own (the limit applies to each run), so the decay
    spans that run's budget again. The clock is not part of the state dict.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_epochs: int,
        time_limit_s: float = 0,
        exponent: float = 0.9,
        last_epoch: int = -1,
    ):
        if max_epochs < 1:
            raise ConfigError("lr_scheduler#max_epochs", f"is {max_epochs}; the schedule needs at least one epoch.")
        if time_limit_s < 0 or exponent <= 0:
            raise ConfigError(
                "lr_scheduler", f"time_limit_s {time_limit_s} and exponent {exponent}: need >= 0 and > 0."
            )
        self.time_limit_s = float(time_limit_s)
        self._clock_start: float | None = None
        super().__init__(optimizer, total_iters=int(max_epochs), power=float(exponent), last_epoch=last_epoch)

    def start_clock(self, *_) -> None:
        """Start the time budget now (the trainer's ``STARTED``); a later call restarts it."""
        self._clock_start = time.monotonic()

    def progress(self) -> float:
        """The fraction of the training done, 0 to 1: epochs, or the time budget where that is further along."""
        done = max(self.last_epoch, 0) / self.total_iters
        if self.time_limit_s > 0 and self._clock_start is not None:
            done = max(done, (time.monotonic() - self._clock_start) / self.time_limit_s)
        return min(done, 1.0)

    def get_lr(self) -> list[float]:
        # the closed form, not torch's step-to-step ratio: the time budget moves progress between steps unevenly
        factor = (1.0 - self.progress()) ** self.power
        return [base_lr * factor for base_lr in self.base_lrs]

    def state_dict(self) -> dict:
        state = super().state_dict()
        state.pop("_clock_start", None)  # a moment of this process, meaningless to another; loading keeps our own
        return state
