"""What a person watching a training sees: a progress bar with the running loss, and one summary line per epoch."""

from __future__ import annotations

import logging
import time

from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar

logger = logging.getLogger(__name__)


def loss_from_output(output, key: str = "loss") -> float:
    """The loss of an iteration, whether the engine decollates its output (a list of dicts) or not (a dict)."""
    value = output[0][key] if isinstance(output, list) else output[key]
    return float(value.detach()) if hasattr(value, "detach") else float(value)  # (a loss still holds its graph)


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
