"""Orchestration around the bundles: tracking, reports, losses and metrics, export and deployment, command-line
entry points.

The import name is ``clinseg.pipelines`` (the ``clinseg`` root also holds ``clinseg.datasets`` and
``clinseg.transforms``); bundle configs import it as ``"$import clinseg.pipelines as pipelines"``. Importing it
installs the command-line error hook (:mod:`clinseg.pipelines.cli`). The other submodules load on first use
(``pipelines.<module>`` in config expressions works as with eager imports), so a deployed application that only
runs inference never imports the tracking stack (MLflow).
"""

import importlib

from clinseg.pipelines import cli

_SUBMODULES = (
    "checkpoints",
    "config_checks",
    "ensembles",
    "export",
    "handlers",
    "inferers",
    "losses",
    "metrics",
    "paths",
    "reports",
    "runs",
    "tracking",
    "workflow",
)

__all__ = ["cli", *_SUBMODULES]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
