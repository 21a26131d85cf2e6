"""Orchestration around the bundles: tracking, reports, losses and metrics, export and deployment, command-line
entry points.

Importing the package installs the command-line error hook (:mod:`pipelines.cli`). The other submodules load on
first use (``pipelines.<module>`` from bundle config expressions works as with eager imports), so a deployed
application that only runs inference never imports the tracking stack (MLflow).
"""

import importlib

from . import cli

_SUBMODULES = ("export", "handlers", "inferers", "losses", "metrics", "reports", "tracking")

__all__ = ["cli", *_SUBMODULES]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
