"""An exponential moving average of the network's weights, validated (and saved as the best model) in place of the
weights of the last step.

On a few training images the weights of single steps scatter around what the training has learnt: each
validation scores one draw of that scatter, and the best model is the luckiest draw. The average of the last few
hundred steps sits nearer the middle of it (as in Polyak averaging and timm's ``ModelEmaV2``).
"""

from __future__ import annotations

import torch
from ignite.engine import Engine, Events
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


class WeightAverage:
    """Keep an exponential moving average of ``network``'s parameters and normalisation statistics, updated after
    every training step with ``decay`` (at step n, at most ``(1 + n) / (10 + n)``, so the first steps are not
    outweighed by the random initialisation); while ``validator`` runs during the training, ``network`` holds the
    average, and its own weights are put back when validation ends. Everything that validation saves (the best
    model, the decision rule) is therefore the average's.

    Args:
        network: the trained network (the one the validator evaluates).
        validator: the training's validation engine.
        decay: the weight of the past per step; 0 turns averaging off (the handler does nothing).
    """

    def __init__(self, network: torch.nn.Module, validator: Engine, decay: float = 0.995):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if isinstance(network, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            network = network.module  # the average is of the weights, not of the wrapper (which cannot be copied)
        self.network, self.validator, self.decay = network, validator, float(decay)
        self.average = None
        self._own_weights = None

    def _decay_at(self, step: int) -> float:
        return min(self.decay, (1.0 + step) / (10.0 + step))

    def attach(self, engine: Engine) -> None:
        if self.decay == 0.0:
            return
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.update)
        engine.add_event_handler(Events.STARTED, self._watch_validation)
        engine.add_event_handler(Events.COMPLETED, self._stop_watching_validation)

    def _watch_validation(self, _trainer: Engine) -> None:
        if not self.validator.has_event_handler(self.swap_in, Events.STARTED):
            self.validator.add_event_handler(Events.STARTED, self.swap_in)
            self.validator.add_event_handler(Events.COMPLETED, self.swap_out)

    def _stop_watching_validation(self, _trainer: Engine) -> None:
        # the validator may run again after training (a benchmark scoring the best checkpoint it loaded): it then
        # evaluates the weights it is given, not the average
        if self.validator.has_event_handler(self.swap_in, Events.STARTED):
            self.validator.remove_event_handler(self.swap_in, Events.STARTED)
            self.validator.remove_event_handler(self.swap_out, Events.COMPLETED)

    def _build(self) -> AveragedModel:
        if self.average is None:  # built at the first step: the network is on its device and the seed applied
            self.average = AveragedModel(self.network, use_buffers=True)
        return self.average

    def update(self, engine: Engine) -> None:
        self._build()
        decay = self._decay_at(engine.state.iteration)
        self.average.multi_avg_fn = get_ema_multi_avg_fn(decay)
        self.average.update_parameters(self.network)

    def swap_in(self, _validator: Engine) -> None:
        if self.average is None or self._own_weights is not None:
            return
        self._own_weights = {k: v.detach().clone() for k, v in self.network.state_dict().items()}
        self.network.load_state_dict(self.average.module.state_dict())

    def swap_out(self, _validator: Engine) -> None:
        if self._own_weights is not None:
            self.network.load_state_dict(self._own_weights)
            self._own_weights = None

    def state_dict(self) -> dict:
        """The average so far, for the training's latest checkpoint (a resumed training continues it)."""
        if self.average is None:
            return {}
        return {"weights": self.average.module.state_dict(), "n_averaged": int(self.average.n_averaged)}

    def load_state_dict(self, state: dict) -> None:
        if not state or self.decay == 0.0:
            return
        average = self._build()
        average.module.load_state_dict(state["weights"])
        average.n_averaged.fill_(int(state["n_averaged"]))
