"""What runs inside a bundle's MONAI engines, named by the bundle configs (``pipelines.engine.<module>``):

- :mod:`~clinseg.pipelines.engine.workflow`: the steps every bundle shares, before, around and after its trainer;
- :mod:`~clinseg.pipelines.engine.handlers`: the engine handlers, one concern a module;
- :mod:`~clinseg.pipelines.engine.metrics`, :mod:`~clinseg.pipelines.engine.losses`,
  :mod:`~clinseg.pipelines.engine.inferers`, :mod:`~clinseg.pipelines.engine.ensembles`;
- :mod:`~clinseg.pipelines.engine.caching` (datasets), :mod:`~clinseg.pipelines.engine.checkpoints` (reading them);
- :mod:`~clinseg.pipelines.engine.writers` (result files) and :mod:`~clinseg.pipelines.engine.pictures` (what a person
  looks at).

Submodules load on first use, as in :mod:`clinseg.pipelines`, so inference never imports MLflow.
"""

import importlib

_SUBMODULES = (
    "caching",
    "checkpoints",
    "ensembles",
    "handlers",
    "inferers",
    "losses",
    "metrics",
    "pictures",
    "workflow",
    "writers",
)

__all__ = list(_SUBMODULES)


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
