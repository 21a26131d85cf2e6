"""The README's PostgreSQL recipe, for real: a PostgreSQL server (Debian's packages) in a temporary folder on
127.0.0.1, ``mlflow server --backend-store-uri postgresql+psycopg2://...`` in front of it, and two trainings of the
oct_layers bundle at tiny sizes recording into it at the same time.

PostgreSQL is looked for in ``/usr/lib/postgresql/<version>/bin`` (Debian), then on ``PATH``; when absent and running
as root with ``apt-get``, ``apt-get install -y postgresql`` installs it. Where it cannot be had, the test fails as
root or under ``CI=true`` (CI's case) and is skipped with the reason only for a developer without root. PostgreSQL
refuses to run as root: as root, the server runs as the ``postgres`` system user (created by the package), in a
folder owned by that user.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import OCT_BUNDLE, REPO_ROOT, RUNNING_AS_ROOT, free_port, prerequisite_missing, server_answers
from tests.test_error_contract import TINY

TRAIN = OCT_BUNDLE / "configs" / "train.json"
EPOCHS = 2
RATES = ("0.001", "0.005")  # one learning rate per run: which run is which


def postgres_bindir() -> Path | None:
    """The newest Debian PostgreSQL (``/usr/lib/postgresql/<version>/bin``), else ``initdb`` on ``PATH``."""
    versions = {}
    for initdb in glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        with contextlib.suppress(ValueError):
            versions[float(Path(initdb).parts[-3])] = Path(initdb).parent
    if versions:
        return versions[max(versions)]
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def install_postgres() -> Path:
    """``apt-get install -y postgresql`` (root only): the bin folder, or why not (:func:`prerequisite_missing`)."""
    if not RUNNING_AS_ROOT or shutil.which("apt-get") is None:
        prerequisite_missing("PostgreSQL is not installed (apt-get install -y postgresql, as root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "postgresql"]):
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
        except subprocess.TimeoutExpired:
            prerequisite_missing(f"{' '.join(command)} did not finish in 900 s")
        if result.returncode != 0:
            prerequisite_missing(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout[-2000:]}{result.stderr[-3000:]}"
            )
    bindir = postgres_bindir()
    if bindir is None:
        prerequisite_missing("apt-get install -y postgresql succeeded, but no initdb is in /usr/lib/postgresql/*/bin")
    return bindir


def as_server_user(command: list[str]) -> list[str]:
    """``command`` as the ``postgres`` user when running as root (PostgreSQL refuses root), else as is."""
    if not RUNNING_AS_ROOT:
        return command
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--", *command]
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--", *command]


def checked(command: list[str], what: str, timeout: float = 120) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{what} failed ({result.returncode}): {result.stdout[-2000:]}{result.stderr[-3000:]}"
    )
    return result.stdout


@pytest.fixture(scope="module")
def postgres() -> dict:
    """A PostgreSQL server on 127.0.0.1 (a free port) with a database ``mlflow`` owned by the password-protected
    role ``mlflow``; stopped and its folder removed at teardown, whatever happened."""
    try:
        import psycopg2  # noqa: F401  (the driver of postgresql+psycopg2://, pinned in requirements-dev.txt)
    except ImportError:
        prerequisite_missing("psycopg2 is not installed: pip install -r requirements-dev.txt")
    bindir = postgres_bindir() or install_postgres()
    if RUNNING_AS_ROOT:
        try:
            import pwd

            server_user = pwd.getpwnam("postgres")
        except KeyError:
            prerequisite_missing("running as root and there is no 'postgres' system user to run PostgreSQL as")
    # not under pytest's tmp_path (nor $TMPDIR): its parents are private to root, and the server runs as 'postgres'
    root = Path(tempfile.mkdtemp(prefix="clinseg-postgres-", dir="/tmp" if RUNNING_AS_ROOT else None))
    if RUNNING_AS_ROOT:
        os.chown(root, server_user.pw_uid, server_user.pw_gid)
    data, log = root / "data", root / "server.log"
    version = checked([str(bindir / "postgres"), "--version"], "postgres --version").strip()
    started = False
    try:
        checked(
            as_server_user(
                [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8"]
                + ["--auth-local=trust", "--auth-host=scram-sha-256"]
            ),
            "initdb",
        )
        for _ in range(3):  # a free port can be taken between the look and the start: try another
            port = free_port()
            options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off"
            command = [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o", options]
            result = subprocess.run(as_server_user([*command, "start"]), capture_output=True, text=True, timeout=90)
            if result.returncode == 0:
                started = True
                break
        server_log = log.read_text()[-3000:] if log.exists() else ""
        assert started, f"PostgreSQL did not start: {result.stderr[-2000:]}\n{server_log}"
        psql = [str(bindir / "psql"), "-h", str(root), "-p", str(port), "-U", "postgres", "-v", "ON_ERROR_STOP=1"]
        checked(as_server_user([*psql, "-c", "CREATE ROLE mlflow LOGIN PASSWORD 'mlflow-test'"]), "CREATE ROLE")
        checked(as_server_user([*psql, "-c", "CREATE DATABASE mlflow OWNER mlflow"]), "CREATE DATABASE")
        yield {
            "uri": f"postgresql+psycopg2://mlflow:mlflow-test@127.0.0.1:{port}/mlflow",
            "port": port,
            "version": version,
        }
    finally:
        if (data / "postmaster.pid").exists():  # started, or left starting by a start that timed out
            stop = [str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "60", "stop"]
            if subprocess.run(as_server_user([*stop, "-m", "fast"]), capture_output=True, timeout=90).returncode:
                subprocess.run(as_server_user([*stop, "-m", "immediate"]), capture_output=True, timeout=90)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def tracking_server(postgres, tmp_path_factory) -> str:
    """``mlflow server`` on 127.0.0.1 with the PostgreSQL backend store and local artifacts; its URI."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = (folder / "server.log").open("w")
    # MLflow's background job runner (GenAI jobs, several processes) has no part in tracking: off, on 2 CPU cores
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server"]
        + ["--backend-store-uri", postgres["uri"], "--artifacts-destination", str(folder / "artifacts")]
        + ["--host", "127.0.0.1", "--port", str(port), "--workers", "2"],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        if not server_answers(uri, server, 120):
            log.flush()
            pytest.fail(f"mlflow server did not start:\n{(folder / 'server.log').read_text()[-5000:]}")
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from clinseg.datasets.oct.phantom import write_phantom_dataset

    out = tmp_path_factory.mktemp("oct_data")
    write_phantom_dataset(out, n_subjects=3, n_bscans=2, height=48, width=64, seed=3)
    return out


def train_two_at_once(tmp_path: Path, data_dir: Path, tracking_uri: str) -> None:
    """Two ``python -m monai.bundle run training`` processes, started together, each in its own bundle root."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # --tracking_uri alone decides
    env["OMP_NUM_THREADS"] = "1"
    processes = []
    for rate in RATES:
        overrides = {
            **TINY,
            "train#trainer#max_epochs": EPOCHS,
            "learning_rate": rate,
            "dataset_dir": data_dir,
            "bundle_root": tmp_path / f"bundle_{rate}",
            "tracking_uri": tracking_uri,
        }
        command = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(TRAIN)]
        for key, value in overrides.items():
            command += [f"--{key}", str(value)]
        log = (tmp_path / f"train_{rate}.log").open("w")
        processes.append((subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        for process, log in processes:
            code = process.wait(timeout=600)
            log.close()
            assert code == 0, f"training failed ({code}):\n{Path(log.name).read_text()[-5000:]}"
    finally:
        for process, log in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=30)
            log.close()


def recorded(metric: str) -> str:
    """A training run's MLflow name of a validation metric (oct_layers' key metric is val_mean_dice)."""
    from clinseg.pipelines.tracking import mlflow_metric_name

    return mlflow_metric_name(metric, "train", "val_mean_dice")


def validation_metric_names() -> set[str]:
    """The metrics the validator logs once per epoch (the config's key metric and additional metrics)."""
    validate = json.loads(TRAIN.read_text())["validate"]
    return set(validate["key_metric"]["metrics"]) | set(validate["additional_metrics"]["metrics"])


def assert_two_finished_runs(tracking_uri: str, data_dir: Path) -> list:
    """Both runs FINISHED, distinct, with their own params and one value per epoch of every validation metric."""
    import mlflow

    from clinseg.datasets.oct.datalist import load_oct_datalist

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("oct_layers")
    assert experiment is not None, "no oct_layers experiment was recorded"
    runs = client.search_runs([experiment.experiment_id], "tags.workflow = 'train'")
    assert len(runs) == 2 and len({r.info.run_id for r in runs}) == 2, [r.info.run_id for r in runs]
    assert len({r.info.run_name for r in runs}) == 2
    assert sorted(r.data.params["learning_rate"] for r in runs) == sorted(RATES)
    iterations = math.ceil(len(load_oct_datalist(data_dir, "train")) / int(TINY["batch_size"]))
    for run in runs:
        assert run.info.status == "FINISHED", (run.info.run_id, run.info.status)
        assert run.data.params["max_epochs"] == str(EPOCHS)
        for name in validation_metric_names():
            steps = [m.step for m in client.get_metric_history(run.info.run_id, recorded(name))]
            assert steps == list(range(1, EPOCHS + 1)), (run.info.run_id, name, steps)
        losses = [m.step for m in client.get_metric_history(run.info.run_id, "0_key/train_loss")]
        assert losses == list(range(1, EPOCHS * iterations + 1)), (run.info.run_id, losses)
    return runs


def test_two_trainings_at_once_against_a_tracking_server_on_postgresql(tmp_path, data_dir, postgres, tracking_server):
    import mlflow
    import psycopg2
    import sqlalchemy

    started = time.time()
    train_two_at_once(tmp_path, data_dir, tracking_server)
    trained = time.time() - started
    runs = assert_two_finished_runs(tracking_server, data_dir)
    # the server really wrote into PostgreSQL, not into a store of its own
    dsn = f"host=127.0.0.1 port={postgres['port']} dbname=mlflow user=mlflow password=mlflow-test"
    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT run_uuid, status FROM runs")
        in_database = dict(cursor.fetchall())
        key = recorded("val_mean_dice")
        cursor.execute("SELECT run_uuid, key, count(*) FROM metrics WHERE key = %s GROUP BY run_uuid, key", (key,))
        dice_rows = {run_id: count for run_id, _, count in cursor.fetchall()}
    connection.close()
    assert in_database == {r.info.run_id: "FINISHED" for r in runs}, in_database
    assert dice_rows == {r.info.run_id: EPOCHS for r in runs}, dice_rows
    client = mlflow.MlflowClient(tracking_server)
    for run in runs:  # artifacts travelled through the server
        assert "checkpoint" in {a.path for a in client.list_artifacts(run.info.run_id)}, run.info.run_id
    summary = {
        "postgres": postgres["version"],
        "mlflow": mlflow.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "psycopg2": psycopg2.__version__.split()[0],
        "runs": {
            r.info.run_id: {
                "status": r.info.status,
                "learning_rate": r.data.params["learning_rate"],
                "val_mean_dice_steps": len(client.get_metric_history(r.info.run_id, "0_key/val_mean_dice")),
                "train_loss_steps": len(client.get_metric_history(r.info.run_id, "0_key/train_loss")),
            }
            for r in runs
        },
        "training_s": round(trained, 1),
    }
    print(json.dumps(summary, indent=1))


def at_the_same_moment(action, writers: int = 4) -> tuple[list, list[str]]:
    """``action(index)`` in ``writers`` threads released together (a barrier), as runs that start together; what
    they returned and their errors, one line each."""
    import threading

    barrier = threading.Barrier(writers)
    results, errors = [], []

    def writer(index: int) -> None:
        barrier.wait(timeout=60)
        try:
            results.append(action(index))
        except Exception as e:  # noqa: BLE001  (collected: the assertions show them)
            errors.append(f"writer {index}: {str(e).splitlines()[0][:200]}")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(writers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return results, errors


def first_writes_at_once(tracking_uri: str, write, tags: int = 12) -> list[str]:
    """Four writers write each of ``tags`` new tags of one experiment at the same moment, as runs that start
    together tag their experiment; the errors, one line each."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiment_id = client.create_experiment(f"tag_race_{write.__name__}_{time.time_ns()}")
    errors: list[str] = []
    for tag in range(tags):
        _, failed = at_the_same_moment(
            lambda index, tag=tag: write(
                mlflow.MlflowClient(tracking_uri), experiment_id, f"kind_{tag}", f"writer {index}"
            )
        )
        errors += [f"tag {tag}, {line}" for line in failed]
    tags_written = client.get_experiment(experiment_id).tags
    assert all(f"kind_{tag}" in tags_written for tag in range(tags)), sorted(tags_written)
    return errors


def test_runs_that_tag_their_experiment_at_the_same_moment_all_go_on(postgres, tracking_server):
    """The failure of two trainings started together: both wrote the experiment's kind tag, PostgreSQL refused the
    second insert (duplicate key), and that training stopped. :func:`set_experiment_tag` writes again."""
    from clinseg.pipelines.tracking import set_experiment_tag

    errors = first_writes_at_once(tracking_server, set_experiment_tag)
    assert errors == [], "\n".join(errors)


def test_commands_that_create_the_same_experiment_at_the_same_moment_share_it(postgres, tracking_server):
    """``pipelines.experiments`` commands started together (a sweep and a cv, say) each create the bundle's
    experiment where it is missing: one creates it, the others find it. Ten experiments, four creators each (one
    round alone often misses the race)."""
    import mlflow

    from clinseg.pipelines.tracking import EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND, ensure_experiment

    writers = 4
    for round_ in range(10):
        name = f"created_together_{round_}_{time.time_ns()}"
        ids, errors = at_the_same_moment(
            lambda _, name=name: ensure_experiment(mlflow.MlflowClient(tracking_server), name, tracking_server),
            writers,
        )
        assert errors == [] and len(ids) == writers and len(set(ids)) == 1, (name, ids, errors)
        experiment = mlflow.MlflowClient(tracking_server).get_experiment(ids[0])
        assert experiment.name == name and experiment.tags[EXPERIMENT_KIND_TAG] == MODEL_TRAINING_KIND
