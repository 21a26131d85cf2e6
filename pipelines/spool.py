"""Tracking that outlives an unreachable MLflow server.

While a run is tracked, every record (params, metric values with their steps and timestamps, tags, texts,
artifacts, the run's end) goes through a :class:`TrackingLink`. When the store does not answer, the record is
appended to the run's **spool**, a folder (``tracking_spool/`` in the run's output folder) holding:

- ``mlflow_records.jsonl``: one JSON record per line, appended and fsync'd one by one, never rewritten (a line
  torn by a crash is skipped, never the ones before it);
- ``mlflow_sent.jsonl``: the ledger, one line per record sent (or refused by the store), also append-only: a
  record is never sent twice, whoever replays the spool;
- ``files/<seq>/``: copies (hard links where possible) of artifact files that lie outside the run's folder, as
  they were when they were logged.

Training goes on meanwhile; the link asks the server (``/health``, with a short timeout) at a later tracking call,
no more often than every few seconds (backing off while it stays down), and replays the spool, in order, once it
answers; the run's end is replayed last, with its true status and time. What is left when the process ends is sent
by ``python -m clinseg.pipelines.experiments sync FOLDER`` (:func:`sync_spools`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from clinseg.datasets.errors import DataError

logger = logging.getLogger("clinseg.pipelines.tracking")

SPOOL_FOLDER = "tracking_spool"
RECORDS_FILE = "mlflow_records.jsonl"
SENT_FILE = "mlflow_sent.jsonl"
PROBE_INTERVAL_S = 5.0  # the first check after a failure; doubled after each failed check, up to the maximum
MAX_PROBE_INTERVAL_S = 60.0
PROBE_TIMEOUT_S = 2.0
MAX_METRICS, MAX_PARAMS_OR_TAGS = 1000, 100  # MLflow's limits per log_batch request

# MLflow's own defaults retry one request for about 4 minutes (7 retries, 120 s timeout): a training would stall
# that long at every tracking call. A tracked run uses these unless the user set them (README, "A tracking
# server"): two attempts of at most 3 s each. A record that does not get through is spooled, not lost.
HTTP_LIMITS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "3",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
}
# an artifact upload (a checkpoint) can need longer than 3 s for the server's answer (it stores the file first)
ARTIFACT_TIMEOUT_S = 60
_OWN_LIMITS: set[str] = set()


class TrackingUnavailableError(DataError):
    """The configured tracking store cannot be used: a server that does not answer, a local database kept locked by
    another process (raised before any training starts)."""


def bound_http_requests() -> dict[str, str]:
    """Set :data:`HTTP_LIMITS` in this process's environment (MLflow reads them at every request), keeping any the
    user set. Returns the limits in force."""
    for key, value in HTTP_LIMITS.items():
        if key not in os.environ:
            os.environ[key] = value
            _OWN_LIMITS.add(key)
    return {key: os.environ[key] for key in HTTP_LIMITS}


@contextlib.contextmanager
def request_timeout(seconds: float):
    """A longer MLflow request timeout for the calls inside, unless the user chose the timeout."""
    key = "MLFLOW_HTTP_REQUEST_TIMEOUT"
    if key not in _OWN_LIMITS or os.environ.get(key) != HTTP_LIMITS[key]:
        yield
        return
    os.environ[key] = str(int(seconds))
    try:
        yield
    finally:
        os.environ[key] = HTTP_LIMITS[key]


class _NoRetryWarnings(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Retrying")


_NO_RETRY_WARNINGS = _NoRetryWarnings()


@contextlib.contextmanager
def quiet_retries():
    """urllib3 logs a warning for every retried request; the link reports an outage in one line of its own."""
    pool = logging.getLogger("urllib3.connectionpool")
    pool.addFilter(_NO_RETRY_WARNINGS)
    try:
        yield
    finally:
        pool.removeFilter(_NO_RETRY_WARNINGS)


def is_refusal(error: BaseException) -> bool:
    """Whether the store answered and refused the request (an HTTP 4xx answer, an invalid value, a local file that
    cannot be read): it would refuse it again, so it is not kept for later. Anything else (no answer, a timeout, a
    server error, a locked database) may pass once the store is back."""
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
    else:
        status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(status, int):
        return 400 <= status < 500 and status not in (408, 429)
    # a file that cannot be read is refused for good; a store that cannot be written now (mounted read-only, full)
    # may take it later
    retryable = (errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EIO)
    return isinstance(error, OSError) and error.filename is not None and error.errno not in retryable


def is_unknown_run(error: BaseException) -> bool:
    """Whether the store answered that it has no such run, or that the run or its experiment is deleted: the
    records are not at fault, the store is (a mistyped --tracking_uri, a server restarted on an empty database, an
    experiment deleted in the UI). Dropping them would lose them for good; they are kept for a sync to the right
    store, or after the experiment is restored."""
    from mlflow.exceptions import MlflowException

    if not isinstance(error, MlflowException):
        return False
    text = str(error)
    return error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_STATE") or "must be in the 'active' state" in text


def short_reason(error: BaseException) -> str:
    """The cause of a failed request in a few words (``[Errno 111] Connection refused``, ``timed out``)."""
    text = str(error)
    found = re.search(r"\[Errno -?\d+\][^'\")\]]*", text)
    if found:
        return found.group(0).strip()
    if "timed out" in text.lower() or "timeout" in text.lower():
        return "timed out"
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return first[:200]


def probe(tracking_uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the store answers: ``/health`` for a server; a local store is tried by replaying."""
    if not tracking_uri.startswith(("http://", "https://")):
        return True
    import urllib.request

    try:
        with urllib.request.urlopen(tracking_uri.rstrip("/") + "/health", timeout=timeout_s) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def _append_line(path: Path, line: str) -> None:
    """Append one line and fsync it. A file whose last line was torn by a crash gets its line ended first, so the
    torn line stays a line of its own (skipped when read) and never swallows the next record."""
    new = not path.exists()
    with open(path, "ab") as f:
        if not new and f.tell() > 0:
            with open(path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    f.write(b"\n")
        f.write(line.encode("utf-8") + b"\n")
        f.flush()
        os.fsync(f.fileno())
    if new:  # the new name itself must survive a crash
        _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    entries = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and isinstance(entry.get("seq"), int):
                    entries.append(entry)
    return entries


def _snapshot(source: Path, target: Path) -> None:
    """``source`` as it is now: hard links (a later atomic replace of the file does not change a link's content),
    or copies where links are impossible."""

    def link_or_copy(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    target.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, target, copy_function=link_or_copy)
    else:
        link_or_copy(source, target)


class Spool:
    """The append-only record and ledger files of one run's spool folder (see the module's docstring)."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.records_path = self.folder / RECORDS_FILE
        self.sent_path = self.folder / SENT_FILE
        self._next_seq: int | None = None

    def exists(self) -> bool:
        return self.records_path.is_file()

    @property
    def base(self) -> Path:
        """The run's folder, which holds the spool: artifact paths inside it are kept as they are."""
        return self.folder.parent

    def append(self, record: dict) -> int:
        self.folder.mkdir(parents=True, exist_ok=True)
        if self._next_seq is None:
            self._next_seq = max((r["seq"] for r in self.records()), default=0) + 1
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        record = {"seq": seq, **record}
        args = record.get("args", {})
        if "path" in args:
            path, base = Path(args["path"]).resolve(), self.base.resolve()
            if path != base and base not in path.parents:  # not the run's own file: keep it as it is now
                copy = self.folder / "files" / str(seq) / path.name
                _snapshot(path, copy)
                path = copy.resolve()
            args["path"] = str(path)
            args["in_run_folder"] = os.path.relpath(path, base)
        _append_line(self.records_path, json.dumps(record, separators=(",", ":")))
        return seq

    def records(self) -> list[dict]:
        return _read_lines(self.records_path)

    def outcomes(self) -> dict[int, str]:
        return {entry["seq"]: entry.get("outcome", "sent") for entry in _read_lines(self.sent_path)}

    def pending(self) -> list[dict]:
        done = self.outcomes()
        return [record for record in self.records() if record["seq"] not in done]

    def mark(self, seqs: Iterable[int], outcome: str = "sent", reason: str | None = None) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        now = int(time.time() * 1000)
        extra = {"reason": reason} if reason else {}
        lines = [{"seq": seq, "outcome": outcome, "time": now, **extra} for seq in seqs]
        if lines:
            _append_line(self.sent_path, "\n".join(json.dumps(line, separators=(",", ":")) for line in lines))

    @contextlib.contextmanager
    def lock(self, timeout_s: float):
        """Held while replaying, so two processes (a training and ``experiments sync``) never send one record twice.
        Yields False when another process holds it for longer than ``timeout_s``."""
        from filelock import FileLock, Timeout

        self.folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.folder / ".lock"))
        try:
            lock.acquire(timeout=timeout_s)
        except Timeout:
            yield False
            return
        try:
            yield True
        finally:
            lock.release()


def _artifact_source(args: dict, spool: Spool | None) -> str:
    """The file an artifact record names: in the run's folder (wherever that folder is now), else as recorded."""
    if spool is not None and args.get("in_run_folder"):
        here = spool.base / args["in_run_folder"]
        if here.exists():
            return str(here)
    return args["path"]


def _log_folder(client, run_id: str, folder: str, artifact_path: str | None, exclude: list[str]) -> None:
    """``client.log_artifacts`` of ``folder`` without the folders in ``exclude``, spool folders and lock files."""
    excluded = {Path(p).resolve() for p in exclude}
    root = Path(folder)
    for current, folders, files in os.walk(root):
        here = Path(current)
        folders[:] = sorted(
            f for f in folders if (here / f).resolve() not in excluded and not (here / f / RECORDS_FILE).exists()
        )
        relative = here.relative_to(root).as_posix()
        target = "/".join(p for p in (artifact_path, "" if relative == "." else relative) if p) or None
        for name in sorted(files):
            if name.startswith(".") and name.endswith(".lock"):  # a run's or a promotion's lock: no result
                continue
            client.log_artifact(run_id, str(here / name), target)


def execute(client, record: dict, spool: Spool | None = None) -> None:
    """Send one record with ``client`` (raises what the client raises)."""
    from mlflow.entities import Metric, Param, RunTag

    op, run_id, args = record["op"], record["run_id"], record.get("args", {})
    if op == "log_batch":
        client.log_batch(
            run_id,
            metrics=[Metric(k, float(v), int(t), int(s)) for k, v, t, s in args.get("metrics", [])],
            params=[Param(k, v) for k, v in args.get("params", [])],
            tags=[RunTag(k, v) for k, v in args.get("tags", [])],
        )
    elif op == "log_text":
        client.log_text(run_id, args["text"], args["artifact_file"])
    elif op in ("log_artifact", "log_artifacts"):
        source = _artifact_source(args, spool)
        with request_timeout(ARTIFACT_TIMEOUT_S):
            if os.path.isdir(source):
                _log_folder(client, run_id, source, args.get("artifact_path"), args.get("exclude", []))
            else:
                client.log_artifact(run_id, source, args.get("artifact_path"))
    elif op == "set_terminated":
        client.set_terminated(run_id, args["status"], end_time=args.get("end_time"))
    elif op == "end_if_running":  # a run left RUNNING by a killed process, found while the store was unreachable
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, args["status"], end_time=args.get("end_time"))
    else:
        raise ValueError(f"unknown tracking record {op!r}")


def _batches(records: list[dict]) -> Iterable[list[dict]]:
    """Consecutive metric records of one run merged into requests of at most :data:`MAX_METRICS` values."""
    group: list[dict] = []
    size = 0
    for record in records:
        args = record.get("args", {})
        metrics_only = record["op"] == "log_batch" and not args.get("params") and not args.get("tags")
        count = len(args.get("metrics", [])) if metrics_only else 0
        same = group and (group[0]["run_id"], group[0].get("uri")) == (record["run_id"], record.get("uri"))
        if metrics_only and same and size + count <= MAX_METRICS:
            group.append(record)
            size += count
            continue
        if group:
            yield group
        group, size = [record], count
        if not metrics_only:
            yield group
            group, size = [], 0
    if group:
        yield group


def _merged(group: list[dict]) -> dict:
    if len(group) == 1:
        return group[0]
    metrics = [m for record in group for m in record["args"]["metrics"]]
    return {**group[0], "args": {"metrics": metrics}}


@dataclass
class ReplayResult:
    sent: int = 0
    dropped: int = 0
    metric_values: int = 0
    remaining: int = 0
    already_sent: int = 0
    error: BaseException | None = None
    locked: bool = False
    other_store: int = 0  # pending records of another store, left for `experiments sync` (``only_uri``)
    runs: dict[str, str] = field(default_factory=dict)  # run id -> status recorded in the spool, if any


def replay(
    spool: Spool,
    client_for: Callable[[str], object],
    lock_timeout_s: float = 0.0,
    tracking_uri: str | None = None,
    only_uri: str | None = None,
) -> ReplayResult:
    """Send ``spool``'s pending records in order, each marked in the ledger once sent; stop at the first that does
    not get through (the store is down again, or does not know the run: :func:`is_unknown_run`). A record the store
    refuses is marked dropped, with a warning, so it never blocks the ones after it; of merged records, only the
    one refused. ``tracking_uri`` replaces the records' own store; ``only_uri``: send only the records of that
    store (a training's link leaves an earlier process's records of another store to ``experiments sync``)."""
    result = ReplayResult()
    with spool.lock(lock_timeout_s) as held:
        if not held:
            result.locked = True
            result.remaining = len(spool.pending())
            return result
        records = spool.records()
        done = spool.outcomes()
        pending = [r for r in records if r["seq"] not in done]
        result.already_sent = len(records) - len(pending)
        if only_uri is not None:
            result.other_store = sum(1 for r in pending if r.get("uri") not in (None, only_uri))
            pending = [r for r in pending if r.get("uri") in (None, only_uri)]
        for record in records:
            if record["op"] in ("set_terminated", "end_if_running") and record["run_id"] not in result.runs:
                result.runs[record["run_id"]] = ""
            if record["op"] == "set_terminated":
                result.runs[record["run_id"]] = record["args"]["status"]
        groups = list(_batches(pending))
        while groups:
            group = groups.pop(0)
            merged = _merged(group)
            seqs = [r["seq"] for r in group]
            try:
                with quiet_retries():
                    execute(client_for(tracking_uri or merged.get("uri")), merged, spool)
            except Exception as e:  # noqa: BLE001 - whatever the store or the network raise
                if not is_refusal(e) or is_unknown_run(e):
                    result.error = e
                    break
                if len(group) > 1:  # one bad value refuses the whole request: find it, send the others
                    groups[:0] = [[record] for record in group]
                    continue
                spool.mark(seqs, "dropped", short_reason(e))
                result.dropped += len(seqs)
                logger.warning(
                    f"tracking: the store refused spooled record {seqs[0]} ({merged['op']}) of run "
                    f"{merged['run_id']}: {short_reason(e)}; it is not sent again"
                )
                continue
            spool.mark(seqs)
            result.sent += len(seqs)
            if merged["op"] == "log_batch":
                result.metric_values += len(merged["args"].get("metrics", []))
        result.remaining = len(pending) - result.sent - result.dropped
    return result


class TrackingLink:
    """Sends one run's tracking records to its store with bounded requests, and keeps them in the run's spool while
    the store does not answer (see the module's docstring). No method raises: tracking must never stop a training.

    Args:
        client: the run's ``MlflowClient``.
        run_id: the run.
        spool_dir: the spool folder, made on the first record that has to wait.
        probe_interval_s: the first wait before asking a silent store again (doubled up to a minute).
    """

    def __init__(self, client, run_id: str, spool_dir: str | os.PathLike, probe_interval_s: float = PROBE_INTERVAL_S):
        self.client = client
        self.uri = str(client.tracking_uri)
        self.run_id = run_id
        self.spool = Spool(spool_dir)
        self.probe_interval_s = probe_interval_s
        self.pending = 0
        self.down_since: float | None = None
        self._wait = probe_interval_s
        self._next_probe = 0.0
        self.history: dict[str, list[tuple[int, float]]] = {}
        self.logged_params: set[str] = set()
        self.outage_calls, self.outage_wait_s, self.outage_max_wait_s = 0, 0.0, 0.0
        self._other_store_told = False
        with contextlib.suppress(Exception):  # a resumed run's folder can hold records of the interrupted run
            self.pending = len(self.spool.pending()) if self.spool.exists() else 0

    @property
    def online(self) -> bool:
        return self.down_since is None and self.pending == 0

    # ---- the records

    def log_batch(self, metrics=(), params=(), tags=(), run_id: str | None = None) -> None:
        """``metrics``: (key, value, timestamp in ms, step); ``params`` and ``tags``: (key, value)."""
        metrics = [(str(k), float(v), int(t), int(s)) for k, v, t, s in metrics]
        params = [(str(k), str(v)) for k, v in params]
        tags = [(str(k), str(v)) for k, v in tags]
        if run_id in (None, self.run_id):
            for key, value, _, step in metrics:
                self.history.setdefault(key, []).append((step, value))
            self.logged_params.update(k for k, _ in params)
        for start in range(0, len(params), MAX_PARAMS_OR_TAGS):
            self._send("log_batch", {"params": params[start : start + MAX_PARAMS_OR_TAGS]}, run_id)
        for start in range(0, len(tags), MAX_PARAMS_OR_TAGS):
            self._send("log_batch", {"tags": tags[start : start + MAX_PARAMS_OR_TAGS]}, run_id)
        for start in range(0, len(metrics), MAX_METRICS):
            self._send("log_batch", {"metrics": metrics[start : start + MAX_METRICS]}, run_id)

    def set_tag(self, key: str, value: str, run_id: str | None = None) -> None:
        self.log_batch(tags=[(key, value)], run_id=run_id)

    def log_text(self, text: str, artifact_file: str) -> None:
        self._send("log_text", {"text": text, "artifact_file": artifact_file})

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self._send("log_artifact", {"path": str(path), "artifact_path": artifact_path})

    def log_artifacts(self, folder: str, artifact_path: str | None = None, exclude: Iterable[str] = ()) -> None:
        excluded = [str(Path(p).resolve()) for p in exclude]
        self._send("log_artifacts", {"path": str(folder), "artifact_path": artifact_path, "exclude": excluded})

    def set_terminated(self, status: str, run_id: str | None = None) -> None:
        self._send("set_terminated", {"status": status, "end_time": int(time.time() * 1000)}, run_id)

    def end_if_running(self, run_id: str, status: str = "KILLED") -> None:
        self._send("end_if_running", {"status": status, "end_time": int(time.time() * 1000)}, run_id)

    def read(self, function: Callable, *args, default=None):
        """``function(*args)`` (a query of the store), or ``default`` while the store does not answer. A refusal (a
        run that does not exist) is raised."""
        if self.down_since is not None:
            return default
        try:
            with quiet_retries():
                return function(*args)
        except Exception as e:  # noqa: BLE001
            if is_refusal(e):
                raise
            logger.debug(f"tracking: a query of {self.uri} failed: {short_reason(e)}")
            return default

    def history_points(self) -> dict[str, list[tuple[int, float]]]:
        return {key: list(points) for key, points in self.history.items()}

    # ---- sending, spooling, replaying

    def _send(self, op: str, args: dict, run_id: str | None = None) -> None:
        record = {"op": op, "run_id": run_id or self.run_id, "uri": self.uri, "time": int(time.time() * 1000)}
        record["args"] = args
        started = time.monotonic()
        was_down = self.down_since is not None
        replay_s = 0.0
        try:
            if self.online:
                try:
                    with quiet_retries():
                        execute(self.client, record)
                    return
                except Exception as e:  # noqa: BLE001 - whatever the store or the network raise
                    if is_refusal(e) and not is_unknown_run(e):  # kept when the store, not the record, is at fault
                        reason = short_reason(e)
                        logger.warning(f"tracking: {self.uri} refused {op} for run {record['run_id']}: {reason}")
                        return
                    self._went_down(e)
            self._spool(record)
            replay_s = self._maybe_replay()
        except Exception as e:  # noqa: BLE001 - the spool itself failed (a full disk): the record is lost, not the run
            logger.warning(f"tracking: a {op} record of run {record['run_id']} is lost: {short_reason(e)}")
        finally:
            if was_down or self.down_since is not None:
                waited = time.monotonic() - started - replay_s
                self.outage_calls += 1
                self.outage_wait_s += waited
                self.outage_max_wait_s = max(self.outage_max_wait_s, waited)

    def _spool(self, record: dict) -> None:
        self.spool.append(record)
        self.pending += 1

    def _went_down(self, error: BaseException) -> None:
        self.down_since = time.monotonic()
        self._wait = self.probe_interval_s
        self._next_probe = self.down_since + self._wait
        self.outage_calls, self.outage_wait_s, self.outage_max_wait_s = 0, 0.0, 0.0
        logger.warning(
            f"tracking: the MLflow tracking server {self.uri} does not answer ({short_reason(error)}); training goes "
            f"on and its tracking records are kept in {self.spool.folder} until the server answers again"
        )

    def _maybe_replay(self, force: bool = False) -> float:
        """Ask the store and replay the spool when due; returns the seconds spent replaying."""
        if self.pending == 0 and self.down_since is None:
            return 0.0
        now = time.monotonic()
        if not force and now < self._next_probe:
            return 0.0
        if not probe(self.uri):
            if self.down_since is None:  # records left by an earlier process, and the store is down now
                self._went_down(ConnectionError("no answer at /health"))
            else:
                self._back_off(now)
            return 0.0
        started = time.monotonic()
        result = replay(self.spool, lambda uri: self.client, only_uri=self.uri)
        spent = time.monotonic() - started
        self.pending = result.remaining
        if result.other_store and not self._other_store_told:
            self._other_store_told = True
            logger.warning(
                f"tracking: {result.other_store} records in {self.spool.folder} belong to another store than "
                f"{self.uri} (an earlier process of this run); send them with: "
                f"python -m clinseg.pipelines.experiments sync {self.spool.folder}"
            )
        if result.error is not None or result.locked:
            if result.error is not None and self.down_since is None:
                self._went_down(result.error)
            self._back_off(time.monotonic())
            return spent
        if self.down_since is not None:
            down_s = time.monotonic() - self.down_since
            logger.warning(
                f"tracking: the MLflow tracking server {self.uri} answers again after {down_s:.0f} s: "
                f"{result.sent} spooled records replayed into run {self.run_id} ({result.metric_values} metric values, "
                f"{result.dropped} refused) in {spent:.1f} s; while it was down {self.outage_calls} tracking calls "
                f"took {self.outage_wait_s:.2f} s in all, at most {self.outage_max_wait_s:.2f} s each"
            )
        elif result.sent or result.dropped:
            logger.warning(
                f"tracking: {result.sent} records spooled earlier in {self.spool.folder} were sent to {self.uri}"
            )
        self.down_since = None
        self._wait = self.probe_interval_s
        return spent

    def _back_off(self, now: float) -> None:
        self._next_probe = now + self._wait
        self._wait = min(self._wait * 2, MAX_PROBE_INTERVAL_S)

    def finish(self) -> None:
        """At the end of the run: a last replay, then one line if records are left for ``experiments sync``."""
        try:
            if self.pending:
                self._maybe_replay(force=True)
            if self.pending:
                logger.warning(
                    f"tracking: the MLflow tracking server {self.uri} still does not answer: {self.pending} records "
                    f"of run {self.run_id} stay in {self.spool.folder}; send them once it is back with: "
                    f"python -m clinseg.pipelines.experiments sync {self.spool.folder}"
                )
        except Exception as e:  # noqa: BLE001
            logger.warning(f"tracking: the spooled records in {self.spool.folder} could not be replayed: {e}")


# ---- after the fact: python -m clinseg.pipelines.experiments sync


def find_spools(folders: Iterable[str | os.PathLike]) -> list[Path]:
    """The spool folders in or under ``folders`` (a spool, a run's folder, or any folder above them).

    Raises:
        InputError: a folder that does not exist.
    """
    from clinseg.datasets.errors import InputError

    found: list[Path] = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(str(folder), "is not a folder (give a run's folder or its tracking_spool folder).")
        if (folder / RECORDS_FILE).is_file():
            found.append(folder.resolve())
        else:
            found.extend(sorted(p.parent.resolve() for p in folder.rglob(RECORDS_FILE)))
    return list(dict.fromkeys(found))


def sync_spools(
    folders: Iterable[str | os.PathLike], tracking_uri: str | None, open_client: Callable[[str], object]
) -> list[str]:
    """Replay the pending records of every spool in ``folders``; one line per spool. Replaying again sends
    nothing: the ledger remembers what was sent. ``open_client`` makes a store's client (the ``sync`` command's
    :func:`clinseg.pipelines.tracking.client_for` makes a new SQLite store under the store's lock).

    Raises:
        TrackingUnavailableError: a store does not answer (what is left stays spooled for the next sync).
    """
    bound_http_requests()
    clients: dict[str, object] = {}

    def client_for(uri: str):
        if uri not in clients:
            clients[uri] = open_client(uri)
        return clients[uri]

    lines = []
    for folder in find_spools(folders):
        spool = Spool(folder)
        uris = {tracking_uri or r.get("uri") for r in spool.pending()}
        for uri in sorted(u for u in uris if u):
            if not probe(uri, timeout_s=10):
                raise TrackingUnavailableError(
                    uri,
                    f"the MLflow tracking server is unreachable; {len(spool.pending())} records stay in {folder}.",
                    "Start it (see README, 'A tracking server'), or give the store with --tracking_uri.",
                )
        result = replay(spool, client_for, lock_timeout_s=60, tracking_uri=tracking_uri)
        if result.locked:
            raise DataError(folder, "is being replayed by another process (its training?): try again.")
        if result.error is not None and is_unknown_run(result.error):
            raise DataError(
                folder,
                f"its run is unknown to {tracking_uri or next(iter(uris), 'the store')}, or deleted there "
                f"({short_reason(result.error)}); its {result.remaining} records stay here.",
                "Sync to the store the run was made in (--tracking_uri), or restore the run's experiment first.",
            )
        if result.error is not None:
            raise TrackingUnavailableError(
                tracking_uri or next(iter(uris), "the store"),
                f"stopped answering while {folder} was replayed ({short_reason(result.error)}); "
                f"{result.remaining} records stay there.",
                "Run the same sync again once it answers.",
            )
        statuses = []
        for run_id, recorded in result.runs.items():
            status = f"{recorded or 'no end'} as recorded (the store did not say)"
            with contextlib.suppress(Exception), quiet_retries():
                uri = tracking_uri or next(r.get("uri") for r in spool.records() if r["run_id"] == run_id)
                status = client_for(uri).get_run(run_id).info.status
            statuses.append(f"run {run_id} {status}")
        done = (
            f"{result.sent} records sent ({result.metric_values} metric values)"
            + (f", {result.dropped} refused by the store" if result.dropped else "")
            if result.sent or result.dropped
            else "nothing to send"
        )
        lines.append(f"{folder}: {done}; {result.already_sent} sent before; " + (", ".join(statuses) or "no run end"))
    return lines
