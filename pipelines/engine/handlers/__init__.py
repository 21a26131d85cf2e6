"""Engine handlers, one concern a module:

- :mod:`~clinseg.pipelines.engine.handlers.averaging`: a moving average of the weights, validated in their place;
- :mod:`~clinseg.pipelines.engine.handlers.progress`: the progress bar and the per-epoch summary line;
- :mod:`~clinseg.pipelines.engine.handlers.schedule`: the learning-rate schedule and early stopping on validation;
- :mod:`~clinseg.pipelines.engine.handlers.checkpointing`: atomic checkpoints, the best model, resume;
- :mod:`~clinseg.pipelines.engine.handlers.evaluation`: the per-class report and the metric tables;
- :mod:`~clinseg.pipelines.engine.handlers.tracking`: the run in MLflow;
- :mod:`~clinseg.pipelines.engine.handlers.trials`: a search trial's key metric reported to Optuna, and its pruning.
"""

import importlib

_SUBMODULES = ("averaging", "checkpointing", "evaluation", "progress", "schedule", "tracking", "trials")

__all__ = list(_SUBMODULES)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
