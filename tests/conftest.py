"""Shared fixtures: a tiny phantom dataset, a private MLflow store, the location of the real data, the one rule
for a test whose prerequisite is missing (:func:`prerequisite_missing`), the layer-order check of OCT label maps, and
the threads each worker of a parallel run (``pytest -n``, as ``make test`` runs) may use."""

from __future__ import annotations

import atexit
import functools
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SHARED_DATA_DIR", REPO_ROOT.parent / "shared" / "data"))
OCT_BUNDLE = REPO_ROOT / "bundles" / "oct_layers"
IN_CI = os.environ.get("CI", "").lower() == "true"
RUNNING_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
WITHOUT_FILE_PERMISSION_OVERRIDE = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
                                    "--bounding-set=-dac_override,-dac_read_search"]  # fmt: skip
"""A command prefix: root without the capabilities that let it read and write any file, so file permissions apply
to it (CI runs as root)."""


def pytest_configure(config):
    """In a worker of ``pytest -n N`` (pytest-xdist), cap the threads of this process and of the bundle runs it starts
    at the cores per worker. torch and OpenMP otherwise each take every core, and N workers doing so share the cores
    between N times too many spinning threads, which is slower than no parallelism at all. A value set by the caller
    is kept."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(variable, threads)


PROJECT_STORE = REPO_ROOT / "mlruns"
_PROJECT_STORE_AT_START: set[Path] = set()


def _project_store_files() -> set[Path]:
    return {p for p in PROJECT_STORE.rglob("*") if p.is_file()} if PROJECT_STORE.is_dir() else set()


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # the controller of ``pytest -n``, or a run without workers
        _PROJECT_STORE_AT_START.update(_project_store_files())


def pytest_sessionfinish(session, exitstatus):
    """Fail the session when files appeared in the project's MLflow store (``mlruns/``): every test records into a
    store of its own (:func:`tracking_uri`), and an experiment created without an artifact location puts its
    artifacts under ``./mlruns`` whatever its store, into the user's own."""
    if hasattr(session.config, "workerinput"):
        return
    added = sorted(_project_store_files() - _PROJECT_STORE_AT_START)
    if added:
        shown = ", ".join(str(p.relative_to(REPO_ROOT)) for p in added[:5])
        files = f"{len(added)} file{'s' if len(added) > 1 else ''}"
        sys.stderr.write(f"\nerror: the test session wrote {files} into the project's store: {shown}\n")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the system picks it, so parallel workers get different
    ones)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_at_once(folder: Path, imports: str, action: str, *args: str, count: int = 4) -> list[tuple[int, str]]:
    """Run ``action`` in ``count`` Python processes released at one moment, after each has run ``imports`` (the
    slow part, so they start together); ``args`` are their ``sys.argv[1:]``. Returns each one's exit code and
    output."""
    go = folder / "go"
    script = "\n".join([
        "import pathlib, sys, time", imports, "pathlib.Path(sys.argv.pop()).touch()",
        f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.005)", action,
    ])  # fmt: skip
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", script, *args, str(folder / f"ready{index}")],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for index in range(count)
    ]
    deadline = time.time() + 120
    while len(list(folder.glob("ready*"))) < count:
        if time.time() > deadline or any(p.poll() is not None for p in processes):
            for process in processes:
                process.kill()
            pytest.fail("the processes did not all start: " + " | ".join(p.communicate()[0][-500:] for p in processes))
        time.sleep(0.05)
    go.touch()
    results = []
    for process in processes:  # communicate, not wait: a process blocked on a full pipe would never end
        output = process.communicate(timeout=120)[0]
        results.append((process.returncode, output))
    return results


def where_permissions_apply(command: list[str]) -> list[str]:
    """``command`` run so that file permissions apply to it: as is for a user, without root's override as root."""
    return [*WITHOUT_FILE_PERMISSION_OVERRIDE, *command] if RUNNING_AS_ROOT else command


def prerequisite_missing(reason: str):
    """A test cannot run here (a program, server or mount it needs is missing or refused). It is skipped with the
    reason only for a developer who may lack it, and fails as root or under ``CI=true``: CI runs ``make test`` as root,
    which installs every program these tests need, and root can install PostgreSQL and mount file systems itself;
    there a skip would mean the test never runs anywhere, silently."""
    if RUNNING_AS_ROOT or IN_CI:
        who = "CI=true" if IN_CI else "running as root"
        pytest.fail(f"{who}, so this test must run, but {reason}", pytrace=False)
    pytest.skip(reason)


def shared_path(*parts: str) -> Path:
    """A path under the real data folder; the calling test is skipped with the reason if it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not available: {path} is absent (set SHARED_DATA_DIR to its folder)")
    return path


def decode(bundle: str, items: list[dict], **overrides) -> list[dict]:
    """Items of a data list (paths) decoded by the bundle's own ``load_transforms`` (its readers and label building),
    as numpy arrays. An input error is re-raised as itself, as a bundle run reports it."""
    import numpy as np
    from monai.bundle import ConfigParser
    from monai.transforms import Compose

    from clinseg.pipelines.cli import find_input_error

    parser = ConfigParser()
    parser.read_config(str(REPO_ROOT / "bundles" / bundle / "configs" / "train.json"))
    for key, value in overrides.items():
        parser[key] = value
    load = Compose(parser.get_parsed_content("load_transforms"))
    decoded = []
    for item in items:
        try:
            out = load(item)
        except Exception as e:
            raise (find_input_error(e) or e) from e
        decoded.append({k: np.asarray(v) if hasattr(v, "shape") else v for k, v in out.items()})
    return decoded


@pytest.fixture(scope="session")
def tiny_oct_dir(tmp_path_factory) -> Path:
    """3 phantom subjects of 4 B-scans of 64 x 96 pixels, in the Duke .mat layout."""
    from clinseg.datasets.oct.phantom import write_phantom_dataset

    out = tmp_path_factory.mktemp("oct_phantom")
    write_phantom_dataset(out, n_subjects=3, n_bscans=4, height=64, width=96, seed=1)
    return out


@functools.cache
def _empty_store() -> Path:
    """An SQLite MLflow store as MLflow creates it on first use, made once per test process: creating one runs
    MLflow's schema migrations, about two seconds of every run that would otherwise open a new store. The tests that
    open a store that does not exist yet build their own URI."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    folder = Path(tempfile.mkdtemp(prefix="clinseg-empty-store-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    database = folder / "mlflow.db"
    store = SqlAlchemyStore(f"sqlite:///{database}", str(REPO_ROOT / "mlruns"))  # what a run from the root creates
    store.engine.dispose()
    return database


def new_store(database: Path) -> str:
    """The URI of a new, empty SQLite MLflow store at ``database`` (its folder created)."""
    database.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_empty_store(), database)
    return f"sqlite:///{database}"


@pytest.fixture()
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A private SQLite MLflow store for one test (the project's mlruns/ is never touched by tests)."""
    uri = new_store(tmp_path / "mlruns" / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def run_bundle(run_id: str, config_files: list[str], overrides: dict, env: dict | None = None, check: bool = True):
    """Run ``python -m monai.bundle run`` from the repository root, as a user does."""
    command = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", str(config_files)]
    for key, value in overrides.items():
        command += [f"--{key}", str(value)]
    result = subprocess.run(
        command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
        )
    return result


def run_models(bundle_root: Path) -> Path:
    """The models folder of the one training run under ``bundle_root`` (``outputs/<run>/models``)."""
    found = sorted(Path(bundle_root).glob("outputs/*/models"))
    assert len(found) == 1, f"expected one training run under {bundle_root}, found {[str(f) for f in found]}"
    return found[0]


def start_experiments_ui(uri: str, port: int, stderr=subprocess.PIPE) -> subprocess.Popen:
    """``python -m clinseg.pipelines.experiments ui`` serving the store at ``uri`` on ``port``; its printed links on
    ``stdout`` (a pipe, read line by line)."""
    return subprocess.Popen(
        [sys.executable, "-m", "clinseg.pipelines.experiments", "ui", "--port", str(port)],
        cwd=REPO_ROOT,
        env={**os.environ, "MLFLOW_TRACKING_URI": uri},
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )


def server_answers(uri: str, process: subprocess.Popen, timeout_s: float) -> bool:
    """Wait until the MLflow server at ``uri`` answers ``/health``; False if ``process`` ends or time runs out."""
    import time
    import urllib.request

    deadline = time.time() + timeout_s
    while process.poll() is None and time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def is_in_layer_order(labels: np.ndarray) -> bool:
    """Every column: background, then layers in increasing order (each once, some absent), then background."""
    for column in labels.T:
        retina = np.flatnonzero(column > 0)
        if retina.size and (
            (column[retina[0] : retina[-1] + 1] == 0).any() or (np.diff(column[retina[0] : retina[-1] + 1]) < 0).any()
        ):
            return False
    return True
