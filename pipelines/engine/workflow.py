"""The segmentation workflow every bundle shares: what runs before, around and after a bundle's trainer.

A bundle's configs declare their task (data, classes, network, transforms, metrics) and the MONAI engines at the
Model Zoo's ids; the steps here are what is the same for every task, written once and called from the configs'
``initialize`` and ``training`` expressions:

- :func:`initialize`: override ids and config values checked before anything runs
  (:mod:`clinseg.pipelines.config_checks`), determinism, writable folders, a reachable tracking server;
- :func:`run_training`: early stopping, the latest-checkpoint saver, resume or a start from another model's weights
  (fine-tuning), the time limit, the split written down (``split.json``, to pass back as ``--split_file``), the
  run itself, and ``models/model.pt`` left behind in every case (the best validated model, or the final one when no
  validation ran).

Every step is rank-aware: under ``torchrun`` only rank 0 writes outputs, checkpoints and tracking records.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import ignite
import torch
from ignite.engine import Engine, Events

from clinseg.datasets.value_types import NonNegativeFloat
from clinseg.pipelines.cli import require_writable_dir
from clinseg.pipelines.context import is_rank_zero, running_parser, running_run_arguments
from clinseg.pipelines.paths import require_output_outside_input

logger = logging.getLogger(__name__)


def check_config(parser=None) -> None:
    """The config checks of :mod:`clinseg.pipelines.config_checks` for the running workflow: override ids first,
    then every value against its default and the parameters it feeds. Raises ``ConfigError`` naming the key."""
    from monai.bundle import ConfigParser

    from clinseg.pipelines import config_checks

    parser = parser if parser is not None else running_parser()
    found = running_run_arguments()
    files, overrides = found if found is not None else ([], {})
    if files:
        config_checks.check_override_keys(files, overrides)
    if parser is not None:
        defaults = ConfigParser.load_config_files(files) if files else None
        config_checks.check_values(parser, defaults, overrides)
        config_checks.check_key_metric(parser)
        config_checks.check_class_names(parser)
        if files:
            config_checks.check_bundle_root(files, overrides, parser)


def initialize(
    seed: int | None = None,
    ckpt_dir: str | None = None,
    output_dir: str | None = None,
    tracking_uri: str | None = None,
    input_path: str | None = None,
) -> None:
    """The checks every run makes first, so that a wrong value or an unwritable folder stops it before data loading
    and training, not after an hour of training. ``input_path`` (inference): the inputs, which ``output_dir`` must
    not be or lie inside (:func:`pipelines.paths.require_output_outside_input`), checked before the folder is made."""
    from monai.utils import set_determinism

    check_config()
    if seed is not None:
        # each process of a distributed run its own random draws (rank 0's are a single process's): with one seed,
        # every rank would crop and augment its images alike, step after step; the weights stay rank 0's (DDP)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        set_determinism(seed=seed + (torch.distributed.get_rank() if distributed else 0))
    if is_rank_zero() and output_dir is not None:  # checked before the folder is made in it (below)
        require_output_outside_input(output_dir, input_path)
        require_writable_dir(output_dir, "the output folder")
    # the process group may not be up yet: torchrun's RANK says which process is rank 0
    if ckpt_dir is not None and output_dir is not None and is_rank_zero() and os.environ.get("RANK", "0") == "0":
        from clinseg.pipelines.runs import claim_run_folder

        # a training's run folder is its own: claimed before anything (the checkpoint folder first) is made in it
        claim_run_folder(output_dir, resume=_running_config_value("resume"))
    if ckpt_dir is not None:  # every rank reads checkpoints (resume)
        require_writable_dir(ckpt_dir, "the checkpoint folder")
    if is_rank_zero():
        if tracking_uri is not None:
            from clinseg.pipelines.tracking import check_tracking_uri

            check_tracking_uri(tracking_uri)


def _require_same_run(ckpt_dir: str | os.PathLike, input_settings: dict | None, validation_fingerprint: str | None):
    """A resumed training goes on with the data and settings its run was started with, as its ``model.json`` records
    them: other validation data would make its restored best metric incomparable (a worse model kept as the best, or
    promoted against the wrong yardstick), other input settings a network fed what it never learnt.

    Raises:
        ConfigError: naming what differs.
    """
    from clinseg.datasets.errors import ConfigError
    from clinseg.pipelines import runs

    models = Path(ckpt_dir)
    record = runs.read_record(models)
    if record is None:  # no model saved yet: nothing recorded to compare with
        return
    try:
        runs.require_input_settings(models / runs.MODEL_FILE, input_settings, "--{key} '{value}'")
    except ConfigError as error:
        if not error.key.startswith("network_def#"):  # the checkpoint's own load names the network that differs
            raise
    recorded = record.get("validation_fingerprint")
    if recorded and validation_fingerprint and recorded != validation_fingerprint:
        raise ConfigError(
            "resume",
            f"run {models.parent.name} was validated on other data than this config's (validation fingerprint "
            f"{recorded[:12]}, now {validation_fingerprint[:12]}): its best metric would not compare.",
            "Resume with the run's own --dataset_dir and split settings (its MLflow params), or start a new run.",
        )


def _running_config_value(key: str):
    """``key`` of the running bundle config (``resume``: a run name, True, or None for a new run), or None."""
    parser = running_parser()
    if parser is None or key not in parser:
        return None
    return parser.get_parsed_content(key)


def finish_distributed() -> None:
    """Leave the process group together (the multi-GPU overlays' ``finalize``).

    Rank 0 still promotes the model and closes its MLflow run when the other ranks are done. A rank that destroyed
    its group and exited meanwhile was seen to abort at exit (gloo: "terminate called without an active
    exception"), and ``torchrun`` then stopped rank 0 before its model was promoted. Every rank waits here for the
    others first. Nothing happens outside a process group.
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def final_weights(network: torch.nn.Module, weight_average=None) -> dict:
    """The weights a training that validated nothing leaves as its model: the weight average when it keeps one (what
    its validations would have scored and saved, :class:`clinseg.pipelines.engine.handlers.averaging.WeightAverage`),
    else the network's own."""
    if weight_average is not None and weight_average.average is not None:
        return weight_average.average.module.state_dict()
    module = network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network
    return module.state_dict()


def averaging_record(weight_average) -> dict | None:
    """What ``model.json`` says of a model that is a weight average (its decay and the number of steps averaged), or
    None for the network's own weights."""
    if weight_average is None or weight_average.average is None:
        return None
    return {"decay": weight_average.decay, "steps": int(weight_average.average.n_averaged)}


def save_final_model(
    network: torch.nn.Module, ckpt_dir: str | os.PathLike, record: dict | None = None, weight_average=None
) -> Path:
    """Write the final weights (:func:`final_weights`, a plain state dict, as the best-model saver writes) to
    ``<ckpt_dir>/model.pt``, with ``record`` as its ``model.json`` in the same step when given, atomically."""
    from clinseg.datasets.io import atomic_write
    from clinseg.pipelines.engine.handlers.checkpointing import write_described_model

    path = Path(ckpt_dir) / "model.pt"
    state = final_weights(network, weight_average)
    if record is not None:
        write_described_model(ckpt_dir, state, record)
    else:
        atomic_write(path, lambda tmp: torch.save(state, tmp))
    return path


def start_from(network: torch.nn.Module, initial_weights: str | os.PathLike | None, resume=None) -> dict | None:
    """Load ``initial_weights`` (a bundle checkpoint: another run's ``model.pt`` or a training checkpoint) into
    ``network`` before the first epoch: fine-tuning, e.g. the phantom-trained model on real cases. Checked to fit
    (:func:`clinseg.pipelines.engine.checkpoints.load_network_weights`); returns what was loaded (path, SHA-256 and
    the run it came from, :func:`clinseg.pipelines.runs.provenance`) for the run's ``model.json``, or ``None``.

    Raises:
        ConfigError: ``initial_weights`` together with ``resume`` (a resumed run continues its own weights).
        DataError: naming the file, when it is not a checkpoint of this network.
    """
    if not initial_weights:
        return None
    from clinseg.datasets.errors import ConfigError
    from clinseg.pipelines import runs
    from clinseg.pipelines.engine.checkpoints import load_network_weights

    if resume:
        raise ConfigError(
            "initial_weights",
            "cannot be combined with --resume: a resumed run continues from its own latest checkpoint.",
            "Drop --initial_weights to resume, or drop --resume to start a new run from those weights.",
        )
    source = runs.provenance(initial_weights)  # read before loading: the file is what was loaded
    module = network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network
    load_network_weights(module, initial_weights, map_location=next(module.parameters()).device)
    logger.info(f"training starts from the weights of {source['checkpoint']} (sha256 {source['checkpoint_sha256']})")
    return source


def _non_finite_tensors(module: torch.nn.Module) -> list[str]:
    """The names of ``module``'s floating-point parameters and buffers (normalisation statistics) holding a NaN or an
    infinity."""
    return [
        name
        for name, value in module.state_dict().items()
        if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


# how the refusal of a diverged training begins: a search reads it as a trial its settings could not train
DIVERGED = "the training diverged"


def stop_when_diverged(trainer: Engine, ckpt_dir: str | os.PathLike) -> None:
    """Stop the training with one line when its weights are no longer finite (a learning rate far too high, inputs
    of extreme values): every later step, validation and checkpoint would be of a broken network, and at its end
    the run would leave, and promote, a ``model.pt`` of NaNs. The epoch's latest checkpoint is not written (the
    previous one, of finite weights, stays to start again from), nor is anything promoted.

    A loss that is not finite with finite weights is let through: a batch whose pixels are all unannotated has a
    cross-entropy of 0/0 and no gradient, and mixed precision skips the steps whose gradients overflow. The weights
    are only looked at then, and after each epoch's last step.

    Raises:
        ConfigError: naming ``learning_rate``, the epoch and iteration, and the first tensor that is not finite.
    """
    from clinseg.datasets.errors import ConfigError
    from clinseg.pipelines.engine.handlers.progress import loss_from_output

    network = trainer.network.module if hasattr(trainer.network, "module") else trainer.network

    def check(engine: Engine) -> None:
        try:
            loss = loss_from_output(engine.state.output)
        except (KeyError, IndexError, TypeError, ValueError):  # an output without a loss: nothing to go by
            return
        last_of_epoch = engine.state.epoch_length and engine.state.iteration % engine.state.epoch_length == 0
        if math.isfinite(loss) and not last_of_epoch:
            return
        # the epoch's last step is checked whatever its loss (computed before the step): the validation and the
        # latest checkpoint that follow must not take over weights that step broke
        broken = _non_finite_tensors(network)
        if not broken:
            if not math.isfinite(loss):
                where = f"epoch {engine.state.epoch}, iteration {engine.state.iteration}"
                logger.warning(f"{where}: the loss is {loss} (a batch without annotated pixels?); the weights are "
                               "finite, the training goes on")  # fmt: skip
            return
        optimizer = getattr(engine, "optimizer", None)
        rates = sorted({group["lr"] for group in optimizer.param_groups}) if optimizer is not None else []
        raise ConfigError(
            "learning_rate",
            f"{DIVERGED} at epoch {engine.state.epoch}, iteration {engine.state.iteration}: the loss is "
            f"{loss} and {len(broken)} of the network's tensors are no longer finite (e.g. {broken[0]!r}, learning "
            f"rate {', '.join(f'{r:g}' for r in rates) or 'unknown'}); the run is stopped, nothing is promoted.",
            f"Lower --learning_rate, or check the inputs for extreme values. The checkpoints of the epochs before "
            f"are kept in {Path(ckpt_dir).resolve()} (start a new run from one with --initial_weights).",
        )

    trainer.add_event_handler(Events.ITERATION_COMPLETED, check)


RESUMED_AS_STARTED = (
    "learning_rate",
    "batch_size",
    "patch_size",
    "train_crop_size",
    "repeats_per_epoch",
    "crops_per_image",
    "patches_per_image",
    "weight_average_decay",
)
"""Config values, beside the input settings, that a resumed training must keep: the optimizer's restored state
would silently override another learning rate, the restored epoch length another batch size or count of
samples per epoch, and the restored weight average would go on under another decay (or be dropped, or start over
from the resumed weights) while its model is recorded with the new one."""


def run_settings(
    input_settings: dict | None, validation_fingerprint: str | None, training_images: list[str] | None
) -> dict:
    """What this training trains on and with, recorded in its latest checkpoint so that a resumed run with other
    settings or data is refused (:func:`clinseg.pipelines.engine.handlers.checkpointing.require_same_run_settings`):
    the input settings and :data:`RESUMED_AS_STARTED` as config ids, and fingerprints of the validation and the
    training images."""
    import hashlib

    from clinseg.pipelines.runs import flat_settings

    config = dict(flat_settings(input_settings))
    for key in RESUMED_AS_STARTED:
        value = _running_config_value(key)
        if isinstance(value, (bool, int, float, str, list, tuple)):
            config[key] = list(value) if isinstance(value, tuple) else value
    images = "\n".join(sorted(training_images)) if training_images is not None else None
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return {
        "config": config,
        # the processes share each epoch's cases (DistributedSampler): their number sets the epoch's length, which
        # a resumed run restores from the checkpoint
        "processes": torch.distributed.get_world_size() if distributed else 1,
        "validation_fingerprint": validation_fingerprint,
        "training_fingerprint": hashlib.sha256(images.encode()).hexdigest()[:16] if images is not None else None,
    }


def run_training(
    trainer: Engine,
    latest_checkpoint,
    early_stop,
    validator: Engine,
    ckpt_dir: str,
    resume: bool | str | None = None,
    time_limit_s: NonNegativeFloat = 0,
    promote_to: str | None = None,
    key_metric: str | None = None,
    validation_fingerprint: str | None = None,
    bundle_name: str | None = None,
    initial_weights: str | os.PathLike | None = None,
    input_settings: dict | None = None,
    training_images: list[str] | None = None,
    training_labels: dict | None = None,
) -> None:
    """Run ``trainer`` as every bundle does. Afterwards the run's own ``ckpt_dir`` holds ``model.pt`` whatever the
    validation interval, described by ``model.json``, and that model is promoted to ``promote_to`` (the bundle's
    ``models/``) when it beats the model in place on the same validation data (:mod:`clinseg.pipelines.runs`).

    ``model.pt`` is the best validated model, written with its ``model.json`` in one step by the validation's
    best-model saver, so that the two describe the same weights whenever the run stops. When this training ran no
    validation at all (``max_epochs`` below ``val_interval``), the final weights are written there instead (the
    weight average when the training keeps one, as ``model.json``'s ``weight_average`` says), so ``inferring``,
    evaluation and export work after any training. ``resume``: continue from the newest latest
    checkpoint in ``ckpt_dir`` (the resumed run's own folder, chosen by :func:`clinseg.pipelines.runs.run_name`).
    ``initial_weights``: start from another model's weights (:func:`start_from`), recorded in ``model.json`` as
    ``initialized_from``. ``input_settings``: the config values that shape what the network sees (a spacing, an
    image size), recorded in ``model.json`` so that a run with other values is refused
    (:func:`clinseg.pipelines.runs.require_input_settings`). ``training_images``: the digests of the images it trains
    on (:func:`clinseg.datasets.fingerprint.image_digests`), recorded so that an evaluation on any of them is refused
    (:func:`clinseg.pipelines.engine.ensembles.require_unseen`). ``training_labels``: what the training labels look
    like where inference checks a prediction against it (an OCT retina's height:
    :func:`clinseg.transforms.oct.retina_heights`), recorded as given."""
    from clinseg.pipelines import runs
    from clinseg.pipelines.engine import decision
    from clinseg.pipelines.engine.handlers.checkpointing import best_model_saver, resume_from_latest

    initialized_from = start_from(trainer.network, initial_weights, resume)
    folds = _running_config_value("folds")
    if promote_to is not None and folds:
        # a fold's model saw part of the data and was validated on its own part: it must not become the bundle's
        # model, nor block the full training's promotion ("validated on other data")
        logger.info(f"fold {_running_config_value('fold')} of {folds}: its model is not promoted to {promote_to}")
        promote_to = None
    early_stop.set_trainer(trainer)
    settings = run_settings(input_settings, validation_fingerprint, training_images)
    progress = getattr(latest_checkpoint, "save_dict", {}).get("progress")
    if progress is not None:  # recorded in every latest checkpoint, compared when it is resumed
        progress.run_settings = settings
    if is_rank_zero():
        latest_checkpoint.attach(trainer)
    if resume:
        resume_from_latest(trainer, latest_checkpoint, ckpt_dir, settings)
        # after the checkpoint's own check, which names it when the network differs
        _require_same_run(ckpt_dir, input_settings, validation_fingerprint)
    # a step that leaves the weights NaN stops the run before its epoch is validated, checkpointed or promoted
    stop_when_diverged(trainer, ckpt_dir)
    if time_limit_s > 0:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, ignite.handlers.TimeLimit(int(time_limit_s)))

    weight_average = progress.weight_average() if progress is not None else None
    saver = best_model_saver(progress.validate_handlers) if progress is not None else None

    def describe(value=None, epoch=None, decision_rule=None) -> dict:
        """The run's record of its model.pt (model.json), the model's own values given."""
        return {
            "bundle": bundle_name,
            "training_run_name": Path(ckpt_dir).resolve().parent.name,
            "training_run_id": getattr(trainer.state, "tracking_run_id", None),
            "key_metric": key_metric,
            "value": value,
            "epoch": epoch,
            "mode": "max",
            "validation_fingerprint": validation_fingerprint,
            # the threshold and component filter chosen on the best epoch's validation cases, where the
            # bundle searches one (clinseg.pipelines.engine.decision.DecisionRuleSearch)
            "decision_rule": decision_rule,
            # the model is the exponential moving average of the training's weights (what validation scored)
            "weight_average": averaging_record(weight_average),
            "initialized_from": initialized_from,
            "input_settings": input_settings,
            "training_images": sorted(training_images) if training_images is not None else None,
            "training_labels": training_labels,
        }

    def describe_best() -> dict:
        best = validator.state.best_metric
        return describe(float(best), validator.state.best_metric_epoch)

    if saver is not None and is_rank_zero():
        # each better model is written with its model.json, so that a run killed at any moment leaves the two alike
        saver.describe_with(describe_best)

    def leave_a_model(engine: Engine) -> None:
        # registered before the tracking handler's completion (attached at STARTED), so MLflow logs these files
        if not is_rank_zero():
            return
        model_file = Path(ckpt_dir) / runs.MODEL_FILE
        # validated: in this process, or before the interruption this run resumed (its best epoch restored)
        validated = validator.state.iteration > 0 or getattr(validator.state, "best_metric_epoch", -1) not in (None, -1)
        existing = runs.read_record(ckpt_dir) if validated and model_file.is_file() else None
        if not validated or not model_file.is_file():
            path = save_final_model(engine.network, ckpt_dir, describe(), weight_average)
            what = "the weight average" if weight_average is not None and weight_average.average else "the final model"
            logger.info(f"no validation ran in this training: {what} is saved as {path}")
            record = runs.read_record(ckpt_dir)
        elif existing is not None and existing.get("epoch") is not None:
            # the model.pt on disk is described by the record written with it; the decision rule is chosen on its
            # epoch's validation cases, kept in the latest checkpoint when that epoch came before a resume
            rule = decision.rule_of_epoch(validator, existing["epoch"]) or existing.get("decision_rule")
            kept = {k: v for k, v in existing.items() if k not in ("sha256", "written")}
            record = runs.write_run_record(ckpt_dir, {**kept, **describe(kept["value"], kept["epoch"], rule),
                                                      "weight_average": kept.get("weight_average")})  # fmt: skip
        else:  # a model.pt saved without its record (by an earlier version of this library)
            best = getattr(validator.state, "best_metric", None)
            value = float(best) if best is not None and best != -1 else None
            epoch = getattr(validator.state, "best_metric_epoch", None)
            record = runs.write_run_record(ckpt_dir, describe(value, epoch, decision.rule_from(validator)))
        if promote_to is not None and record is not None:
            decision_file = Path(ckpt_dir).parent / "promotion.json"
            engine.state.promotion = runs.promote(ckpt_dir, promote_to, decision_file=decision_file)

    trainer.add_event_handler(Events.COMPLETED, leave_a_model)
    from clinseg.pipelines.engine.handlers.trials import attach_trial_reporter
    from clinseg.pipelines.studies import SEARCH_TRIAL_ENV

    if os.environ.get(SEARCH_TRIAL_ENV) and is_rank_zero():  # a trial of `pipelines.experiments search`
        attach_trial_reporter(trainer, validator, key_metric)
    dataset_dir = _running_config_value("dataset_dir")
    if is_rank_zero() and dataset_dir is not None:
        from clinseg.datasets.layouts import SPLIT_FILE, write_split

        # the split this run trains and validates with, in the run's folder (logged with it as an artifact): passed
        # back as --split_file, it gives this split again, where the fixed split would move with every case added
        write_split(Path(ckpt_dir).parent / SPLIT_FILE, dataset_dir)
    trainer.run()
