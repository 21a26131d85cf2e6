"""The project root: the one place that knows where the project keeps its state, and where its sources are.

In a checkout (the library installed editable, as ``make install`` does) the project root is the repository; the
generated phantoms and caches live in ``<root>/data`` and the MLflow store in ``<root>/mlruns``. Installed from a
wheel, or to put the state elsewhere, set ``CLINSEG_HOME``. A bundle copied out of the repository therefore still
finds its phantom data and the store without any path of its own.

It lives in the data layer, the lowest of the library's three (``clinseg.datasets`` < ``clinseg.transforms`` <
``clinseg.pipelines``), so that every layer reads the same root; :mod:`clinseg.pipelines.paths` builds the
project's other locations on it.
"""

from __future__ import annotations

import os
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]


def source_root() -> Path:
    """Where the bundles and the library's sources are: the repository this library lives in; else the current
    folder (a wheel carries no bundles: they are then named by path, ``--bundle_root``)."""
    if (_CHECKOUT / "bundles").is_dir() and (_CHECKOUT / "pipelines").is_dir():
        return _CHECKOUT
    return Path.cwd()


def project_root() -> Path:
    """Where the project keeps its state (phantoms, caches, the MLflow store): ``CLINSEG_HOME`` if set; else the
    source root. Kept apart from :func:`source_root`, so that a state kept elsewhere still finds the bundles."""
    if os.environ.get("CLINSEG_HOME"):
        return Path(os.environ["CLINSEG_HOME"]).resolve()
    return source_root()


SOURCE_ROOT = source_root()
PROJECT_ROOT = project_root()
