"""The weight average (:class:`clinseg.pipelines.engine.handlers.averaging.WeightAverage`) on real ignite engines:
validation sees the exponential moving average of the trained weights, training goes on from its own weights, a
resumed training continues the same average, and a decay of 0 changes nothing."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events

from clinseg.pipelines.engine.handlers.averaging import WeightAverage


def tiny_network() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))


def engines(network: torch.nn.Module, seen: list):
    """A trainer whose every step moves the weights (SGD on a fixed batch), and a validator that records the
    weights it sees."""
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    batch = torch.arange(24, dtype=torch.float32).reshape(8, 3) / 24

    def step(engine, _):
        network.train()
        optimizer.zero_grad()
        loss = network(batch).pow(2).mean()
        loss.backward()
        optimizer.step()
        return {"loss": loss.item()}  # as MONAI's trainer gives it

    validator = Engine(lambda engine, _: None)
    validator.add_event_handler(Events.ITERATION_COMPLETED, lambda _: seen.append(clone(network)))
    trainer = Engine(step)
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: validator.run([0]))
    return trainer, validator


def clone(network: torch.nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in network.state_dict().items()}


def expected_average(history: list[dict], decay: float) -> dict:
    """The average by its definition: the first step's weights, then ``a = d a + (1 - d) w`` with the step's
    ``d = min(decay, (1 + n) / (10 + n))``."""
    average = {k: v.clone() for k, v in history[0].items()}
    for n, weights in enumerate(history[1:], start=2):
        d = min(decay, (1 + n) / (10 + n))
        for k, v in weights.items():
            if v.is_floating_point():
                average[k] = d * average[k] + (1 - d) * v
    return average


def trained(decay: float, steps: int, epochs: int):
    """A tiny network trained ``epochs`` epochs of ``steps`` steps with a weight average of ``decay``, validated
    after each epoch: the network, the weights after every step, the weights each validation saw, and the engines."""
    network, seen = tiny_network(), []
    trainer, validator = engines(network, seen)
    history = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: history.append(clone(network)))
    WeightAverage(network, validator, decay=decay).attach(trainer)
    trainer.run([0] * steps, max_epochs=epochs)
    return network, history, seen, validator


def test_validation_sees_the_average_and_training_continues_from_its_own_weights():
    network, history, seen, _ = trained(decay=0.9, steps=5, epochs=2)

    assert len(seen) == 2
    for validated, steps in zip(seen, (history[:5], history), strict=True):
        average = expected_average(steps, 0.9)
        for key, value in average.items():
            if value.is_floating_point():
                assert torch.allclose(validated[key], value, atol=1e-6), key
    last = clone(network)  # training's own weights are back after each validation, not the average
    assert all(torch.equal(last[k], history[-1][k]) for k in last)
    assert not torch.allclose(seen[-1]["2.weight"], last["2.weight"]), "the average is not the last weights"


def test_a_resumed_training_continues_the_same_average():
    network, seen = tiny_network(), []
    trainer, validator = engines(network, seen)
    average = WeightAverage(network, validator, decay=0.9)
    average.attach(trainer)
    trainer.run([0] * 5, max_epochs=1)
    state = average.state_dict()

    resumed, seen_again = tiny_network(), []
    resumed.load_state_dict(network.state_dict())
    trainer2, validator2 = engines(resumed, seen_again)
    continued = WeightAverage(resumed, validator2, decay=0.9)
    continued.attach(trainer2)
    continued.load_state_dict(state)
    assert continued.state_dict()["n_averaged"] == 5
    restored = continued.state_dict()["weights"]
    assert all(torch.equal(restored[k], seen[0][k]) for k in seen[0]), "the resumed average is the one validated"
    trainer2.run([0] * 1, max_epochs=1)  # one more step: the average moves on from the saved one, not from scratch
    assert continued.state_dict()["n_averaged"] == 6
    assert not torch.allclose(seen_again[0]["2.weight"], resumed.state_dict()["2.weight"])


def test_a_decay_of_zero_changes_nothing_and_a_decay_of_one_is_refused():
    network, history, seen, validator = trained(decay=0.0, steps=3, epochs=1)
    assert all(torch.equal(seen[0][k], history[-1][k]) for k in seen[0])
    with pytest.raises(ValueError, match="decay"):
        WeightAverage(network, validator, decay=1.0)


def test_after_training_the_validator_evaluates_the_weights_it_is_given():
    """A benchmark loads the best checkpoint into the network once training is over and runs the validator again:
    that run must score the loaded weights, not the average of the last steps."""
    network, _, seen, validator = trained(decay=0.9, steps=5, epochs=2)
    loaded = {k: torch.full_like(v, 0.5) if v.is_floating_point() else v for k, v in network.state_dict().items()}
    network.load_state_dict(loaded)
    validator.run([0])
    assert all(torch.equal(seen[-1][k], loaded[k]) for k in loaded)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`:UserWarning")  # its own optimizer
def test_the_training_monitor_keeps_the_average_and_the_latest_checkpoint_carries_it():
    """The bundles turn averaging on through the training monitor (``weight_average_decay``); the training state of
    the latest checkpoint (:class:`TrainingProgress`) holds the average and gives it back to a resumed run."""
    from clinseg.pipelines.engine.handlers.checkpointing import TrainingProgress
    from clinseg.pipelines.engine.handlers.schedule import TrainingMonitor

    def monitored(network, seen):
        trainer, validator = engines(network, seen)
        schedule = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(network.parameters(), lr=0.1), step_size=1)
        monitor = TrainingMonitor(validator, schedule, "loss", progress_bar=False, network=network,
                                  weight_average_decay=0.9)  # fmt: skip
        monitor.attach(trainer)
        return trainer, TrainingProgress(validator, validate_handlers=[], train_handlers=[monitor]), monitor

    network, seen = tiny_network(), []
    trainer, progress, _ = monitored(network, seen)
    trainer.run([0] * 4, max_epochs=1)
    state = progress.state_dict()
    assert state["weight_average"]["n_averaged"] == 4
    assert all(torch.equal(state["weight_average"]["weights"][k], seen[0][k]) for k in seen[0])

    _, resumed_progress, resumed_monitor = monitored(tiny_network(), [])
    resumed_progress.load_state_dict(state)
    restored = resumed_monitor.weight_average.state_dict()["weights"]
    assert all(torch.equal(restored[k], seen[0][k]) for k in seen[0])
    schedule = torch.optim.lr_scheduler.StepLR(torch.optim.SGD(network.parameters(), lr=0.1), step_size=1)
    off = TrainingMonitor(Engine(lambda e, b: None), schedule, "loss", progress_bar=False, network=network)
    assert off.weight_average is None, "a decay of 0 (the default) keeps no average"


@pytest.mark.filterwarnings("ignore:parsing config_file:UserWarning")
def test_a_training_that_validated_nothing_leaves_the_average_and_says_so(tmp_path, tracking_uri):
    """vessels keeps a weight average (0.995): a training of fewer epochs than its validation interval validated
    nothing, and saved the weights of its last step as its model.pt, not the average it was asked to keep; its
    model.json did not say which. Resumed for one more epoch, still without a validation, it kept the first end's
    model.pt (recorded as of epoch -1) instead of the weights it ended with."""
    from clinseg.datasets.fundus.phantom import write_drive_layout
    from clinseg.pipelines import runs
    from tests.conftest import REPO_ROOT, run_bundle, run_models

    write_drive_layout(tmp_path / "drive", n_images=4, shape=(80, 72), seed=2)
    overrides = {"bundle_root": tmp_path / "bundle", "dataset_dir": tmp_path / "drive" / "training",
                 "patch_size": "[32,32]", "patches_per_image": 2, "repeats_per_epoch": 1, "sw_roi_size": "[48,48]",
                 "network_def#channels": "[4,8]", "network_def#strides": "[2]", "val_interval": 5,
                 "train#trainer#max_epochs": 1}  # fmt: skip
    train = [str(REPO_ROOT / "bundles" / "vessels" / "configs" / "train.json")]
    run_bundle("training", train, overrides)
    models = run_models(tmp_path / "bundle")

    def model_is_the_final_average():
        model = torch.load(models / "model.pt", map_location="cpu", weights_only=True)
        (latest,) = models.glob("latest_checkpoint_epoch=*.pt")
        checkpoint = torch.load(latest, map_location="cpu", weights_only=False)
        average = checkpoint["progress"]["weight_average"]
        assert all(torch.equal(model[k], average["weights"][k]) for k in model), f"model.pt is {latest.name}'s average"
        assert any(not torch.equal(model[k], checkpoint["model"][k]) for k in model), "not the last step's weights"
        record = runs.read_record(models)
        assert record["value"] is None and record["epoch"] is None
        assert record["weight_average"] == {"decay": 0.995, "steps": average["n_averaged"]}
        return record

    record = model_is_the_final_average()
    assert runs.read_record(tmp_path / "bundle" / "models")["weight_average"] == record["weight_average"]
    run_bundle("training", train, {**overrides, "train#trainer#max_epochs": 2, "resume": True})
    assert model_is_the_final_average()["weight_average"]["steps"] > record["weight_average"]["steps"]
