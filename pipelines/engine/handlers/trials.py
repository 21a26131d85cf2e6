"""Inside a training that is a trial of ``python -m clinseg.pipelines.experiments search``: the key metric reported to
the trial after every validation, and the training stopped when the study's pruner says so.
"""

from __future__ import annotations

import json
import math
import os

from clinseg.pipelines.studies import SEARCH_TRIAL_ENV, make_pruner, open_storage


# ------------------------------------------------------------------------------------------ inside the training
def attach_trial_reporter(trainer, validator, key_metric: str) -> None:
    """Report ``key_metric`` to the search trial named by ``PIPELINE_SEARCH_TRIAL`` after every validation, at the
    trainer's epoch, and stop the training when the study's pruner says so (the run then ends as usual, with its
    best model so far). Called by :func:`clinseg.pipelines.engine.workflow.run_training`."""
    import optuna
    from ignite.engine import Events

    settings = json.loads(os.environ[SEARCH_TRIAL_ENV])
    storage = open_storage(settings["storage"])
    pruner = make_pruner(settings["pruner"], int(settings["warmup_epochs"]))
    # the values were sampled by the worker; a plain sampler keeps the trial's construction cheap
    sampler = optuna.samplers.RandomSampler()
    study = optuna.load_study(study_name=settings["study"], storage=storage, pruner=pruner, sampler=sampler)
    trial = optuna.trial.Trial(study, int(settings["trial_id"]))

    def started(engine) -> None:
        trial.set_user_attr("key_metric", key_metric)
        run_id = getattr(engine.state, "tracking_run_id", None)
        if run_id:
            trial.set_user_attr("mlflow_run_id", run_id)

    def validated(engine) -> None:
        value = engine.state.metrics.get(key_metric)
        if value is None or not math.isfinite(float(value)):
            return  # a NaN is no evidence either way; the pruner would read it as the worst value
        epoch = trainer.state.epoch
        trial.report(float(value), step=epoch)
        if trial.should_prune():
            trial.set_user_attr("pruned_at_epoch", epoch)
            print(f"search: trial {trial.number} pruned at epoch {epoch} ({key_metric} {value:.4f})", flush=True)
            trainer.terminate()

    trainer.add_event_handler(Events.STARTED, started)
    validator.add_event_handler(Events.COMPLETED, validated)
