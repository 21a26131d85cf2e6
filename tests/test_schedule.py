"""The learning-rate schedule a bundle declares is stepped as that scheduler expects."""

from __future__ import annotations

import math
import time

import pytest
import torch
from ignite.engine import Engine, Events

from clinseg.pipelines.engine.handlers.schedule import TrainingMonitor
from clinseg.pipelines.engine.schedules import PolyLR


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


def test_the_poly_schedule_reaches_zero_at_the_last_epoch():
    rates = _train(lambda opt: PolyLR(opt, max_epochs=4), metrics=[0.9] * 4)
    assert rates == pytest.approx([(1 - epoch / 4) ** 0.9 for epoch in range(1, 5)])
    assert rates[-1] == 0.0


def test_the_poly_schedule_spans_a_time_budget_that_starts_with_the_training():
    budget_s = 1.0
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = PolyLR(optimizer, max_epochs=1000, time_limit_s=budget_s)
    time.sleep(0.5)  # data caching and the like before the training: not the training's budget

    def step(engine, batch):
        optimizer.step()
        time.sleep(0.2)
        return {"loss": 0.0}

    trainer = Engine(step)
    clock: dict[str, list[float]] = {"started": [], "epoch": []}
    # the moments around the monitor's own handlers bound what the schedule's clock can have read
    trainer.add_event_handler(Events.STARTED, lambda _: clock["started"].append(time.monotonic()))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: clock["epoch"].append(time.monotonic()))
    validator = Engine(lambda engine, batch: None)
    validator.state.metrics = {"val_f1": 0.9}
    TrainingMonitor(validator, scheduler, "val_f1", progress_bar=False).attach(trainer)
    rates = []

    def after_step(engine):
        rates.append(optimizer.param_groups[0]["lr"])
        clock["epoch"].append(time.monotonic())

    trainer.add_event_handler(Events.STARTED, lambda _: clock["started"].append(time.monotonic()))
    trainer.add_event_handler(Events.EPOCH_COMPLETED, after_step)
    trainer.run([0], max_epochs=4)
    first, last = clock["started"]
    for epoch, rate in enumerate(rates):
        before, after = clock["epoch"][2 * epoch], clock["epoch"][2 * epoch + 1]
        # by epochs alone the rate would stay above 0.99; by the clock it follows the 1 s budget from the start
        fastest = max(0.0, 1 - (before - last) / budget_s) ** 0.9
        slowest = max(0.0, 1 - (after - first) / budget_s) ** 0.9
        assert slowest <= rate <= fastest, (epoch, rate, slowest, fastest)
    assert rates[-1] < 0.5


def test_the_poly_schedule_resumes_its_epochs_but_not_another_process_clock():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = PolyLR(optimizer, max_epochs=10, time_limit_s=60)
    scheduler.start_clock()
    for _ in range(3):
        optimizer.step()
        scheduler.step()
    state = scheduler.state_dict()
    assert "_clock_start" not in state
    resumed = PolyLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), max_epochs=10, time_limit_s=60)
    resumed.load_state_dict(state)
    assert resumed.last_epoch == 3 and resumed.get_last_lr() == pytest.approx([0.7**0.9])
    assert resumed.progress() == pytest.approx(0.3), "the new run's budget starts with its own training"
