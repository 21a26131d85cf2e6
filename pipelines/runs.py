"""Run-owned state: each run writes under its own folder, and the bundle's model changes only by promotion.

A training run named ``R`` writes everything under ``<bundle_root>/outputs/R/``: its reports, and its checkpoints
in ``outputs/R/models/`` (``latest_checkpoint_epoch=N.pt`` and its best validated ``model.pt``, each described by
``model.json``). Nothing a run writes is deleted or replaced by another run.

The bundle's ``models/model.pt`` (what evaluation, inference, export and Deploy use by default) is replaced only by
an explicit, atomic, logged **promotion**:

- at the end of a training, only when the run's best key metric beats the model in place *measured on the same
  validation data* (the same key metric, the same validation fingerprint); the decision, with both values, is
  written to ``outputs/R/promotion.json``, logged, and recorded on the MLflow run; where the two cannot be
  compared (the model in place was validated on other data, or carries no record), it is kept, and the log says
  how to promote by hand;
- on request: ``python -m clinseg.pipelines.experiments promote BUNDLE R``.

A promotion holds a lock on the bundle's ``models/`` folder, so two trainings ending together decide one after
the other, and writes ``model.pt``, ``model.json`` and the bundle's ``large_files.yml`` (the Model Zoo's record
of where the weights come from, with their SHA-256) together: each staged whole, then a journal of the renames,
then the renames, so a promotion whose process dies midway is completed by the next reader or promotion.

Resume continues a named run (``--resume R``) or the newest run of this bundle root (``--resume True``), in that
run's folder and from its own latest checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path

import torch.distributed as dist

from clinseg.datasets.errors import ConfigError, DataError, InputError

logger = logging.getLogger(__name__)

RUNS_FOLDER = "outputs"  # <bundle_root>/outputs/<run name>/
MODEL_FILE, MODEL_RECORD = "model.pt", "model.json"
LARGE_FILES = "large_files.yml"  # the Model Zoo's list of a bundle's files kept out of its folder
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _same_on_every_rank(name: str) -> str:
    """Rank 0's ``name`` on every rank of a distributed run (each rank draws its own unique name otherwise)."""
    if dist.is_available() and dist.is_initialized():
        names = [name]
        dist.broadcast_object_list(names, src=0)
        return names[0]
    return name


def runs_dir(bundle_root: str | os.PathLike) -> Path:
    return Path(bundle_root) / RUNS_FOLDER


def resumable_runs(bundle_root: str | os.PathLike) -> list[Path]:
    """The run folders under ``bundle_root`` holding a latest checkpoint, oldest first (by that checkpoint's time)."""
    found = []
    for checkpoint in runs_dir(bundle_root).glob("*/models/latest_checkpoint_epoch=*.pt"):
        try:
            found.append((checkpoint.stat().st_mtime, checkpoint.parents[1]))
        except FileNotFoundError:  # another training replaced its latest checkpoint between the listing and now
            continue
    return [folder for _, folder in sorted(found)]


def check_run_name(name: str, what: str = "run name") -> str:
    if not isinstance(name, str) or not _RUN_NAME.match(name) or name in (".", ".."):
        raise InputError(f"{what} {name!r}", "is not a run name (letters, digits, '.', '_' and '-'; no path).")
    return name


def run_name(workflow: str, bundle_root: str | os.PathLike, resume: bool | str | None = None) -> str:
    """This run's name, which is also its folder under ``<bundle_root>/outputs/``: a new unique name, or with
    ``resume`` the resumed run's (``True``: the newest run with a latest checkpoint; a name: that run). The same on
    every rank of a distributed run.

    Raises:
        InputError: a resume name that is not a run of this bundle root, or no run to resume.
    """
    from clinseg.pipelines.paths import unique_run_name

    if resume is None or resume is False:
        return _same_on_every_rank(unique_run_name(workflow))
    if resume is True:
        runs = resumable_runs(bundle_root)
        if not runs:
            raise DataError(
                runs_dir(bundle_root).resolve(),
                "holds no run with a latest checkpoint to resume.",
                "Start a new training without --resume, or pass the run's --bundle_root.",
            )
        return runs[-1].name

    name = str(resume)
    if not _RUN_NAME.match(name) or not (runs_dir(bundle_root) / name).is_dir():
        known = ", ".join(r.name for r in resumable_runs(bundle_root)[-5:]) or "none"
        raise ConfigError(
            "resume",
            f"{resume!r} is not a run in {runs_dir(bundle_root).resolve()}.",
            f"Runs that can be resumed (newest last): {known}. --resume True takes the newest.",
        )
    return name


_CLAIMED: dict[str, object] = {}  # this process's run folders, locked until it exits (the OS frees a dead one's)
RUN_LOCK = ".run.lock"


def run_in_progress(folder: str | os.PathLike) -> bool:
    """Whether a training holds ``folder`` now (:func:`claim_run_folder`'s lock); a dead one's lock is free."""
    from filelock import FileLock, Timeout

    if not (Path(folder) / RUN_LOCK).exists():
        return False
    lock = FileLock(str(Path(folder) / RUN_LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False


def claim_run_folder(output_dir: str | os.PathLike, resume: bool | str | None = None) -> Path:
    """Make ``output_dir`` this training's own until the process ends: a lock file in it that another training
    cannot take while this one runs (released by the OS if the process dies), and, for a new run, a folder that
    is no other training's run folder (claimed before, or holding checkpoints). Two trainings given one
    ``--run_name``, two ``--resume`` of one run, or a ``--resume True`` that picks a run still training would
    otherwise write over each other's checkpoints, ``model.pt`` and spool.

    Raises:
        InputError: another process holds the run; or a new run's name is already a run's folder.
    """
    from filelock import FileLock, Timeout

    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    if key in _CLAIMED:
        return folder
    # a run's folder: claimed by a training before (its lock file stays), or holding a training's checkpoints
    models = folder / "models"
    was_a_run = (
        (folder / RUN_LOCK).exists()
        or (models / MODEL_FILE).exists()
        or any(models.glob("latest_checkpoint_epoch=*.pt"))
    )
    lock = FileLock(str(folder / RUN_LOCK), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise InputError(
            f"run folder {folder.resolve()}",
            "belongs to a training still running in another process.",
            "Wait for it to end, or start a new run (leave out --run_name and --resume).",
        ) from None
    if not resume and was_a_run:
        lock.release()
        raise InputError(
            f"run name {folder.name!r}",
            f"is taken: {folder.resolve()} is another training's run folder, which a new run must not write over.",
            f"Leave out --run_name (and --output_dir) for a new folder, or pass --resume {folder.name} to continue "
            "that run.",
        )
    _CLAIMED[key] = lock
    return folder


# ---- model records --------------------------------------------------------------------------------------------


def read_record(models_dir: str | os.PathLike) -> dict | None:
    """``model.json`` of a models folder, when it describes the ``model.pt`` beside it (same SHA-256), else None.
    A promotion into the folder left half-done by a process that died is completed first."""
    models_dir = Path(models_dir)
    if (models_dir / PROMOTION_JOURNAL).is_file():
        _complete_abandoned_promotion(models_dir)
    try:
        record = json.loads((models_dir / MODEL_RECORD).read_text())
    except (OSError, ValueError):
        return None
    model = models_dir / MODEL_FILE
    if not isinstance(record, dict) or not model.is_file() or record.get("sha256") != sha256_of(model):
        return None
    return record


def record_of(checkpoint: str | os.PathLike) -> dict | None:
    """The ``model.json`` that describes ``checkpoint`` itself: only a bundle ``model.pt`` has one (a training
    checkpoint beside it is another file, trained to another epoch)."""
    checkpoint = Path(checkpoint)
    return read_record(checkpoint.parent) if checkpoint.name == MODEL_FILE else None


def provenance(checkpoint: str | os.PathLike | list[str]) -> dict:
    """What a checkpoint is, for the outputs' JSON and the MLflow tags of an evaluation or inference: its path and
    SHA-256, and the training run it came from when its ``model.json`` says so (and still matches the file). For an
    ensemble (a list of checkpoints): their number, and each one's."""
    if not isinstance(checkpoint, (str, os.PathLike)):
        members = [provenance(path) for path in checkpoint]
        if len(members) > 1:
            return {"ensemble_size": len(members), "ensemble": members}
        checkpoint = checkpoint[0]
    checkpoint = Path(checkpoint).resolve()
    info = {"checkpoint": str(checkpoint), "checkpoint_sha256": sha256_of(checkpoint) if checkpoint.is_file() else None}
    record = record_of(checkpoint)
    if record is not None:
        for key in ("training_run_id", "training_run_name", "key_metric", "value", "validation_fingerprint"):
            if record.get(key) is not None:
                info[key if key.startswith("training") else f"training_{key}"] = record[key]
        if record.get("decision_rule"):  # how the model's probabilities become a mask (chosen on validation)
            info["decision_rule"] = record["decision_rule"]
    return info


def _same_setting(a, b) -> bool:
    """Two config values alike, numbers within rounding (a spacing of 2 and of 2.0 are one)."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b, strict=True))
    numbers = [isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)]
    return math.isclose(a, b, rel_tol=1e-6) if all(numbers) else a == b


def flat_settings(settings: Mapping | None, prefix: str = "") -> dict:
    """``settings`` with nested sections as config ids: ``{"network_def": {"channels": [..]}}`` becomes
    ``{"network_def#channels": [..]}``, the key a command line or an override sets."""
    flat = {}
    for key, value in (settings or {}).items():
        if isinstance(value, Mapping):
            flat.update(flat_settings(value, f"{prefix}{key}#"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def require_input_settings(
    checkpoint: str | os.PathLike | list[str], settings: Mapping | None, option: str = "--{key} '{value}'"
):
    """Return ``checkpoint`` when the run's ``settings`` (the config values that shape what the network sees, the
    bundle's ``input_settings``: a CT's voxel spacing, an image size, and the network's structure, its
    ``network_def`` section) are those its model was trained with, as its ``model.json`` records them; each member
    of an ensemble is checked. A model without a record (a training checkpoint, a file from elsewhere) is not
    checked, nor a setting its record lacks (recorded since a later version). ``option``: how the caller's command
    line sets a value (the hint of the error).

    A setting the record holds and ``settings`` lack is refused too: the model was trained with a preprocessing
    this config does not apply (a model from a later version, or an option since taken out), and run without it,
    it gives a plausible, wrong mask. Empty ``settings`` check nothing (a benchmark that runs a model otherwise
    than it was trained, on purpose).

    Raises:
        ConfigError: naming the first setting that differs, the model and the value it was trained with: a model
            trained at 1.5 mm run on a 2 mm grid gives a plausible, wrong mask.
    """
    paths = [checkpoint] if isinstance(checkpoint, (str, os.PathLike)) else list(checkpoint)
    current = flat_settings(settings)
    for path in paths:
        trained = flat_settings((record_of(path) or {}).get("input_settings"))
        unknown = [key for key in trained if key not in current]
        if current and unknown:
            raise ConfigError(
                unknown[0],
                f"{path} was trained with {unknown[0]} = {json.dumps(trained[unknown[0]])} (its model.json), a "
                "setting this config does not have, so the model cannot be run as it was trained.",
                "Run it with the version of the bundle it was trained with (its model.json names the training run).",
            )
        for key, value in current.items():
            if key in trained and not _same_setting(value, trained[key]):
                used = json.dumps(trained[key])
                raise ConfigError(
                    key,
                    f"is {json.dumps(value)}, but {path} was trained with {used} (its model.json).",
                    f"Pass {option.format(key=key, value=used)} to run the model as it was trained.",
                )
    return checkpoint


def write_run_record(models_dir: str | os.PathLike, record: dict) -> dict | None:
    """Describe the run's own ``model.pt`` (written by the best-model saver or at the end of training)."""
    from clinseg.datasets.io import atomic_write

    model = Path(models_dir) / MODEL_FILE
    if not model.is_file():
        return None
    record = {**record, "sha256": sha256_of(model), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write(Path(models_dir) / MODEL_RECORD, lambda tmp: tmp.write_text(json.dumps(record, indent=2) + "\n"))
    return record


# ---- promotion ------------------------------------------------------------------------------------------------

# the promotion's list of renames still to do, written (atomically) once every new file is staged beside its target:
# a promotion whose process dies between two renames is completed by the next one that takes the lock, or by the
# next reader, instead of leaving one run's model.pt beside another run's model.json
PROMOTION_JOURNAL = ".promotion-journal.json"
PROMOTION_LOCK = ".promotion.lock"


def _complete_abandoned_promotion(models_dir: Path) -> None:
    """Complete a promotion into ``models_dir`` whose process died midway; one still running (it holds the lock) is
    left to finish."""
    from filelock import FileLock, Timeout

    from clinseg.datasets.io import finish_journal

    try:
        with FileLock(str(models_dir / PROMOTION_LOCK), timeout=0):
            if finish_journal(models_dir / PROMOTION_JOURNAL):
                logger.warning(f"{models_dir}: completed a promotion left unfinished by a process that stopped")
    except Timeout:
        return


def large_files_text(source: Path, sha256: str) -> str:
    """The Model Zoo's ``large_files.yml`` for the promoted model: where ``models/model.pt`` comes from (the
    training run's own file) and its SHA-256, so ``python -m monai.bundle download_large_files --bundle_path B``
    restores exactly this model, or refuses a file that differs."""
    import yaml

    entry = {"path": f"models/{MODEL_FILE}", "url": Path(source).resolve().as_uri(), "hash_val": sha256,
             "hash_type": "sha256"}  # fmt: skip
    return yaml.safe_dump({"large_files": [entry]}, sort_keys=False)


def _is_better(candidate: float, incumbent: float, mode: str) -> bool:
    return candidate < incumbent if mode == "min" else candidate > incumbent


def decide(candidate: dict, incumbent: dict | None, incumbent_present: bool) -> tuple[bool, str]:
    """Whether ``candidate`` (a run's model record) replaces the model in place, and why."""
    if not incumbent_present:
        return True, "no model in place"
    if incumbent is None:
        return False, "the model in place carries no record of its validation (model.json), so it cannot be compared"
    if candidate.get("value") is None:
        return False, "this run validated no model"
    if incumbent.get("value") is None:  # promoted when nothing was in place, before any validation
        return True, "the model in place was never validated"
    if candidate.get("key_metric") != incumbent.get("key_metric"):
        return False, f"the model in place was ranked by {incumbent.get('key_metric')}, not {candidate['key_metric']}"
    if candidate.get("validation_fingerprint") != incumbent.get("validation_fingerprint"):
        return False, "the model in place was validated on other data"
    mode = candidate.get("mode", "max")
    if _is_better(float(candidate["value"]), float(incumbent["value"]), mode):
        return True, f"{candidate['key_metric']} {candidate['value']:.4f} beats {incumbent['value']:.4f}"
    return False, f"{candidate['key_metric']} {candidate['value']:.4f} does not beat {incumbent['value']:.4f}"


def promote(
    run_models_dir: str | os.PathLike,
    bundle_models_dir: str | os.PathLike,
    force: bool = False,
    decision_file: str | os.PathLike | None = None,
) -> dict:
    """Promote a run's ``model.pt`` (with its ``model.json``) to the bundle's ``models/`` when it beats the model in
    place on the same validation data, or unconditionally with ``force`` (on request). Returns the decision:
    ``{"promoted", "reason", "candidate", "incumbent"}``, also written to ``decision_file`` when given.

    Raises:
        DataError: the run has no model to promote.
    """
    from filelock import FileLock

    from clinseg.datasets.io import atomic_write, finish_journal, journaled_write_all

    run_models_dir, bundle_models_dir = Path(run_models_dir), Path(bundle_models_dir)
    candidate = read_record(run_models_dir)
    if candidate is None:
        raise DataError(
            run_models_dir.resolve(), "holds no model.pt with its model.json (the run saved no model) to promote."
        )
    bundle_models_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(str(bundle_models_dir / PROMOTION_LOCK), timeout=600):
        if finish_journal(bundle_models_dir / PROMOTION_JOURNAL):
            logger.warning(f"{bundle_models_dir}: completed a promotion left unfinished by a process that stopped")
        present = (bundle_models_dir / MODEL_FILE).is_file()
        incumbent = read_record(bundle_models_dir) if present else None
        promoted, reason = (True, "promoted on request") if force else decide(candidate, incumbent, present)
        if promoted:
            record = {**candidate, "promoted": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "promotion_reason": reason}
            record["replaced"] = (
                {k: incumbent.get(k) for k in ("training_run_name", "value", "sha256")} if incumbent else None
            )
            source = run_models_dir / MODEL_FILE
            text = json.dumps(record, indent=2) + "\n"
            large_files = large_files_text(source, record["sha256"])
            writes = [
                (bundle_models_dir / MODEL_FILE, lambda tmp: shutil.copyfile(source, tmp)),
                (bundle_models_dir / MODEL_RECORD, lambda tmp: Path(tmp).write_text(text)),
                (bundle_models_dir.parent / LARGE_FILES, lambda tmp: Path(tmp).write_text(large_files)),
            ]
            # a process that dies between the renames leaves a journal the next reader completes
            journaled_write_all(writes, bundle_models_dir / PROMOTION_JOURNAL)
    decision = {"promoted": promoted, "reason": reason, "candidate": candidate, "incumbent": incumbent}
    if decision_file is not None:
        text = json.dumps(decision, indent=2) + "\n"
        atomic_write(decision_file, lambda tmp: Path(tmp).write_text(text))
    where = bundle_models_dir / MODEL_FILE
    if promoted:
        logger.info(f"promoted {run_models_dir / MODEL_FILE} to {where}: {reason}")
    else:
        bundle = candidate.get("bundle") or bundle_models_dir.parent.name
        logger.warning(
            f"kept {where}: {reason}. To use this run's model: python -m clinseg.pipelines.experiments promote "
            f"{bundle} {run_models_dir.parent.name} --bundle_root {bundle_models_dir.parent}"
        )
    return decision


def provenance_tags(checkpoint: str | os.PathLike | list[str]) -> dict[str, str]:
    """:func:`provenance` as MLflow tags (text values; what is unknown is left out); an ensemble's members as
    ``ensemble.<i>.<key>``."""
    info = provenance(checkpoint)
    tags = {key: str(value) for key, value in info.items() if value is not None and key != "ensemble"}
    for index, member in enumerate(info.get("ensemble", [])):
        tags.update({f"ensemble.{index}.{key}": str(value) for key, value in member.items() if value is not None})
    return tags
