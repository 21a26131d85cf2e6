"""The project's library around the bundles, in two stages:

- :mod:`clinseg.pipelines.engine`: what runs inside a bundle's MONAI engines and is named by its configs (the shared
  workflow steps, handlers, metrics, losses, inferers, caching, checkpoints, writers and pictures);
- the orchestration around them, the command-line entry points: :mod:`~clinseg.pipelines.experiments` (compare, fetch,
  sweep, cv, search, ui), :mod:`~clinseg.pipelines.export`, :mod:`~clinseg.pipelines.deploy`,
  :mod:`~clinseg.pipelines.new_task`, :mod:`~clinseg.pipelines.demo` and :mod:`~clinseg.pipelines.benchmarks`.

Both stand on a few shared modules: :mod:`~clinseg.pipelines.cli` (the error contract), :mod:`~clinseg.pipelines.paths`
(the project's locations), :mod:`~clinseg.pipelines.context` (the bundle run in progress),
:mod:`~clinseg.pipelines.config_checks` (override ids and values checked before anything runs),
:mod:`~clinseg.pipelines.tracking` (the MLflow vocabulary: names, tags, the store), :mod:`~clinseg.pipelines.spool`
(tracking records kept through outages), :mod:`~clinseg.pipelines.runs` (run folders, provenance, promotion) and
:mod:`~clinseg.pipelines.studies` (the Optuna storage and pruner). The engine never imports the orchestration
modules, and no module imports itself back through others (``tests/test_layout.py``).

The import name is ``clinseg.pipelines`` (the ``clinseg`` root also holds ``clinseg.datasets`` and
``clinseg.transforms``); bundle configs import it as ``"$import clinseg.pipelines as pipelines"``. Importing it
installs the command-line error hook (:mod:`clinseg.pipelines.cli`). The other submodules load on first use
(``pipelines.<module>`` in config expressions works as with eager imports), so a deployed application that only
runs inference never imports the tracking stack (MLflow).
"""

import importlib

from clinseg.pipelines import cli

_SUBMODULES = ("config_checks", "context", "engine", "export", "paths", "runs", "spool", "studies", "tracking")

__all__ = ["cli", *_SUBMODULES]


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
