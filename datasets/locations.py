"""The project root: the one place that knows where the project keeps its state.

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


def project_root() -> Path:
    """``CLINSEG_HOME`` if set; else the repository this library lives in; else the current folder."""
    if os.environ.get("CLINSEG_HOME"):
        return Path(os.environ["CLINSEG_HOME"]).resolve()
    if (_CHECKOUT / "bundles").is_dir() and (_CHECKOUT / "pipelines").is_dir():
        return _CHECKOUT
    return Path.cwd()


PROJECT_ROOT = project_root()
