"""The Optuna vocabulary shared by the search's workers (:mod:`clinseg.pipelines.search`) and the trial reporter
inside a training (:mod:`clinseg.pipelines.engine.handlers.trials`): the study storage, the pruner, and the
variable through which a worker hands a training its trial.
"""

from __future__ import annotations

import os
import re

from clinseg.datasets.errors import InputError
from clinseg.pipelines.paths import sqlite_lock, sqlite_wait_s, wait_for_sqlite_locks

SEARCH_TRIAL_ENV = "PIPELINE_SEARCH_TRIAL"  # the trial a worker hands its training: JSON of study, storage, pruner
HEARTBEAT_INTERVAL_S = int(os.environ.get("PIPELINE_SEARCH_HEARTBEAT_S", "30"))
HEARTBEAT_GRACE_S = 4 * HEARTBEAT_INTERVAL_S


def make_pruner(spec: str, warmup_epochs: int):
    """``median`` (a trial below the median of earlier trials at the same epoch stops), ``none``, or
    ``threshold:LOW`` (a trial whose key metric is below LOW stops)."""
    import optuna

    kind, _, arg = spec.partition(":")
    if kind == "median" and not arg:
        return optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=warmup_epochs)
    if kind == "none" and not arg:
        return optuna.pruners.NopPruner()
    if kind == "threshold":
        try:
            return optuna.pruners.ThresholdPruner(lower=float(arg), n_warmup_steps=warmup_epochs)
        except ValueError:
            pass
    raise InputError(f"--pruner {spec!r}", "is not one of median, none, threshold:LOW.")


def shown_url(url: str) -> str:
    """The storage URL without its password, for tags and messages."""
    return re.sub(r"://([^:/@]+):[^@]*@", r"://\1:***@", url)


def quiet_optuna() -> None:
    """Optuna's own logging down to warnings, and none about the heartbeat API being experimental (it is used as
    its documentation describes, with ask and tell rather than ``optimize``)."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


def open_storage(url: str):
    import optuna

    quiet_optuna()
    engine_kwargs = {"pool_pre_ping": True}
    if url.startswith("sqlite:"):
        sqlite_wait_s()  # refuses a bad PIPELINE_SQLITE_WAIT_S, naming it
        wait_for_sqlite_locks()  # the storage's connections wait for the other workers' writes
        engine_kwargs = {}
    with sqlite_lock(url):  # the storage makes a new database's tables as it opens: one process at a time
        return optuna.storages.RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=HEARTBEAT_INTERVAL_S,
            grace_period=HEARTBEAT_GRACE_S,
            # a trial whose worker died is run again once, with the same values
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
