"""Where the project keeps its state, under the one project root (:mod:`clinseg.datasets.locations`):
the generated phantoms in ``<root>/data/phantoms``, the MLflow store in ``<root>/mlruns``, and the run names.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
import urllib.parse
import uuid
from pathlib import Path

from clinseg.datasets.errors import InputError
from clinseg.datasets.locations import PROJECT_ROOT, SOURCE_ROOT


def phantom_dir(bundle_name: str) -> str:
    """The folder a bundle's synthetic phantom is generated into on first use."""
    return str(PROJECT_ROOT / "data" / "phantoms" / bundle_name)


def default_store() -> Path:
    return PROJECT_ROOT / "mlruns"


SQLITE_WAIT_ENV = "PIPELINE_SQLITE_WAIT_S"
DEFAULT_SQLITE_WAIT_S = 120.0


def sqlite_wait_s() -> float:
    """How long a connection to a local SQLite store waits for another process's lock: ``PIPELINE_SQLITE_WAIT_S``,
    else 120 s.

    Raises:
        InputError: the variable is not a positive number of seconds.
    """
    text = os.environ.get(SQLITE_WAIT_ENV, "").strip()
    if not text:
        return DEFAULT_SQLITE_WAIT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and seconds > 0):
        raise InputError(f"environment variable {SQLITE_WAIT_ENV}", f"is {text!r}, not a positive number of seconds.")
    return seconds


def wait_for_sqlite_locks() -> None:
    """Make every SQLite connection SQLAlchemy opens in this process wait :func:`sqlite_wait_s` for a lock that
    another process holds, rather than sqlite3's 5 s.

    MLflow opens its store by listing the tables through a plain connection (its sessions set a 20 s wait of their
    own, only later): with search workers and their trainings recording into one store on a loaded machine, a
    commit can keep that first query waiting past 5 s, and the training ended with "database is locked" before
    its first epoch. Installed once per process, as :mod:`clinseg.pipelines.tracking` is imported, so that
    whatever reads a store in such a process waits too, not only the project's openers; engines made earlier are
    covered as well (the listener is the ``Engine`` class's). The stores' openers check :func:`sqlite_wait_s`
    first, so that a bad value is refused naming the variable, not from a connection deep inside MLflow or
    Optuna."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if not event.contains(Engine, "connect", _wait_on_sqlite_locks):
        event.listen(Engine, "connect", _wait_on_sqlite_locks)


def _wait_on_sqlite_locks(dbapi_connection, connection_record) -> None:
    import sqlite3

    if isinstance(dbapi_connection, sqlite3.Connection):
        dbapi_connection.execute(f"PRAGMA busy_timeout = {round(sqlite_wait_s() * 1000)}")


def with_sqlite_wait(url: str) -> str:
    """``url`` (``sqlite:///...``) with :func:`sqlite_wait_s` as its ``timeout`` query parameter, for a process that
    runs none of the project's code and so not its listener (``mlflow server``): SQLAlchemy's SQLite driver passes
    ``timeout`` to every connection it opens. A URL that sets its own ``timeout`` is returned as given."""
    query = urllib.parse.urlsplit(url).query
    if "timeout" in urllib.parse.parse_qs(query):
        return url
    return f"{url}{'&' if query else '?'}timeout={sqlite_wait_s():g}"


@contextlib.contextmanager
def sqlite_lock(url: str, timeout_s: float = 300.0):
    """Hold ``<database>.lock`` beside the database of a ``sqlite:///`` URL, for what must not race between
    processes on it; nothing for other URLs (a server orders its clients' writes itself). MLflow and Optuna both
    make a new database's tables on first use, and two processes doing that at once leave it half-made."""
    if not url.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    database = Path(url[len("sqlite:///") :])
    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(database) + ".lock", timeout=timeout_s):
        yield


def unique_run_name(workflow: str) -> str:
    """``<workflow>-<YYYYmmdd-HHMMSS>-<6 hex>``: distinct for runs started in the same second."""
    return f"{workflow}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def require_output_outside_input(output_dir: str | os.PathLike, input_path: str | os.PathLike | None) -> str:
    """``output_dir``, unless it is the input folder or inside it: the next run over that folder would read the
    results as inputs (a ``*_seg.nii.gz`` is a volume too). For a single input file, the folder holding it counts as
    the input folder only when ``output_dir`` is that very folder (its results would sit beside it). Call it before
    anything is written, the output folder included.

    Raises:
        InputError: naming both folders.
    """
    from clinseg.datasets.errors import InputError

    if input_path is None:
        return os.fspath(output_dir)
    inputs = Path(input_path).expanduser().resolve()
    output = Path(output_dir).expanduser().resolve()
    folder = inputs if inputs.is_dir() else inputs.parent
    if output == folder or (inputs.is_dir() and folder in output.parents):
        where = "is the input folder" if output == folder else f"is inside the input folder {folder}"
        raise InputError(
            f"the output folder {output}",
            f"{where}{' (which holds the input ' + inputs.name + ')' if folder != inputs else ''}: the next run over "
            "it would read these results as inputs.",
            "Choose an output folder outside the input folder (--output_dir PATH).",
        )
    return os.fspath(output_dir)


BUNDLES_DIR = SOURCE_ROOT / "bundles"


def earlier_results(folder: str | os.PathLike) -> tuple[list[str], str]:
    """The entries an earlier run left in an output ``folder`` (hidden ones, such as staging folders, aside), sorted,
    and the first three of them as a message shows them; none when the folder cannot be listed (a write into it
    then names the file and why)."""
    try:
        names = sorted(entry.name for entry in os.scandir(folder) if not entry.name.startswith("."))
    except OSError:
        names = []
    return names, ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def bundle_names() -> list[str]:
    return sorted(p.parent.parent.name for p in BUNDLES_DIR.glob("*/configs/metadata.json"))


def checked_bundle(name: str | None, what: str) -> str:
    """``name`` if it is a bundle of this repository (a folder of ``bundles/`` with a metadata file), so that no
    name can lead outside ``bundles/``."""
    if not name or name not in bundle_names():
        raise InputError(what, f"{name!r} is not a bundle of this repository; the bundles are {bundle_names()}.")
    return name


def process_alive(pid: int) -> bool:
    """Whether a process of this id lives on this machine (another user's included)."""
    if pid <= 0:  # 0 and negative ids name process groups: os.kill would answer for the group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
