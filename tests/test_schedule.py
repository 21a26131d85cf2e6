"""The learning-rate schedule a bundle declares is stepped as that scheduler expects."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Engine, Events

from clinseg.pipelines.engine.handlers.schedule import TrainingMonitor


def _train(scheduler_for, metrics: list[float], epochs: int = 4) -> list[float]:
    """Learning rates after each epoch of a trainer whose validator reports ``metrics`` in turn."""
    weight = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    scheduler = scheduler_for(optimizer)
    validator = Engine(lambda engine, batch: None)

    def step(engine, batch):
        optimizer.step()  # as a trainer does, before the scheduler
        return {"loss": 0.0}

    trainer = Engine(step)

    @trainer.on(Events.EPOCH_COMPLETED)
    def validate(engine):  # attached before the monitor, as ValidationHandler is in the bundles
        validator.state.metrics = {"val_f1": metrics[engine.state.epoch - 1]}

    TrainingMonitor(validator, scheduler, "val_f1", progress_bar=False).attach(trainer)
    rates = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: rates.append(optimizer.param_groups[0]["lr"]))
    trainer.run([0], max_epochs=epochs)
    return rates


def test_a_plateau_schedule_reads_the_key_metric_and_any_other_counts_epochs():
    plateau = _train(
        lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0),
        metrics=[0.5, 0.6, 0.6, 0.6],
    )
    assert plateau == [1.0, 1.0, 0.5, 0.25], "halved once the metric stops rising"
    # a cosine schedule handed the metric would read it as an epoch number (0.9 twice: no progress)
    cosine = _train(lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4), metrics=[0.9] * 4)
    expected = [0.5 * (1 + math.cos(math.pi * epoch / 4)) for epoch in range(1, 5)]
    assert cosine == pytest.approx(expected)
