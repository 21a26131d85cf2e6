"""The segmentation workflow every bundle shares: what runs before, around and after a bundle's trainer.

A bundle's configs declare their task (data, classes, network, transforms, metrics) and the MONAI engines at the
Model Zoo's ids; the steps here are what is the same for every task, written once and called from the configs'
``initialize`` and ``training`` expressions:

- :func:`initialize`: config values checked before anything runs (:data:`SHARED_PARAMETER_KINDS` plus the
  bundle's own kinds), determinism, writable folders, a reachable tracking server;
- :func:`run_training`: early stopping, the latest-checkpoint saver, resume, the time limit, the run itself, and
  ``models/model.pt`` left behind in every case (the best validated model, or the final one when no validation
  ran).

Every step is rank-aware: under ``torchrun`` only rank 0 writes outputs, checkpoints and tracking records.
"""

from __future__ import annotations

import ast
import difflib
import inspect
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import ignite
import torch
import torch.distributed as dist
from ignite.engine import Engine, Events

from clinseg.pipelines.cli import ConfigError, check_parameters, require_writable_dir
from clinseg.pipelines.paths import require_output_outside_input

logger = logging.getLogger(__name__)

# the config values every bundle exposes, by config id, and the kind each must be (see clinseg.pipelines.cli)
SHARED_PARAMETER_KINDS = {
    "seed": "int",
    "learning_rate": "number>0",
    "batch_size": "int>0",
    "train#trainer#max_epochs": "int>0",
    "val_interval": "int>0",
    "val_fraction": "fraction",
    "early_stop_patience": "int>=0",
    "train_time_limit_s": "number>=0",
    "resume": "bool",
    "num_workers": "int>=0",
    "cache": "one of: memory, disk, none",
    "cache_rate": "rate",
    "class_names": "list[str]",
    "pixel_size_um": "number>0?",
    "dataset_dir": "path",
    "output_dir": "path",
    "checkpoint_path": "path",
}


def running_parser():
    """The ``ConfigParser`` of the bundle workflow being run (after command-line overrides), or None.

    MONAI hands a config expression no reference to its workflow, so the ``ConfigWorkflow`` is found on the call
    stack (expressions and handlers run inside its ``initialize`` / ``run``)."""
    from monai.bundle import ConfigWorkflow

    for frame_info in inspect.stack(context=0):
        candidate = frame_info.frame.f_locals.get("self")
        if isinstance(candidate, ConfigWorkflow):
            return candidate.parser
    return None


def is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def check_config_values(bundle_kinds: Mapping[str, str] | None = None, parser=None) -> None:
    """Check every shared and bundle-specific value the running config defines; ids it lacks are skipped (an
    inference config has no ``learning_rate``). Raises ``ConfigError`` naming the first wrong key."""
    parser = parser if parser is not None else running_parser()
    if parser is None:
        return
    checks = {}
    for key, kind in {**SHARED_PARAMETER_KINDS, **(bundle_kinds or {})}.items():
        if key in parser:
            checks[key] = [parser.get_parsed_content(key), kind]
    check_parameters(checks)


# the options of ``monai.bundle run`` itself: everything else on its command line is a config override
RUN_OPTIONS = {
    "run_id",
    "init_id",
    "final_id",
    "meta_file",
    "config_file",
    "logging_file",
    "tracking",
    "args_file",
    "workflow_type",
    "workflow_name",
    "properties_path",
}


def command_line_overrides(argv: list[str] | None = None) -> tuple[list[str], dict[str, str]] | None:
    """The config files and the ``--id value`` overrides of a ``python -m monai.bundle run`` command line (also
    under ``torchrun``); None for any other program."""
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or not argv[0].replace(os.sep, "/").endswith("monai/bundle/__main__.py") or argv[1] != "run":
        return None
    overrides, tokens, index = {}, argv[2:], 0
    while index < len(tokens):
        token = tokens[index]
        index += 1
        if not token.startswith("--"):
            continue  # the run id
        key, has_value, value = token[2:].partition("=")
        if not has_value and index < len(tokens) and not tokens[index].startswith("--"):
            value, index = tokens[index], index + 1
        overrides[key.replace("-", "_") if "#" not in key else key] = value
    files = overrides.get("config_file", "")
    try:
        parsed = ast.literal_eval(files)
    except (ValueError, SyntaxError):
        parsed = files
    files = [str(f) for f in parsed] if isinstance(parsed, (list, tuple)) else [f for f in str(parsed).split(",") if f]
    return files, overrides


def _config_ids(node, prefix: str = "") -> dict[str, object]:
    ids = {}
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        name = f"{prefix}#{key}" if prefix else str(key)
        ids[name] = value
        ids.update(_config_ids(value, name))
    return ids


_SPECIAL_KEYS = {"_disabled_", "_desc_", "_requires_", "_mode_"}


def _accepts_new_setting(component, name: str) -> bool:
    """Whether ``name`` can be added to ``component``: MONAI's special keys, any key of a plain dict, and a
    parameter that a ``_target_``'s constructor takes (``--network_def#act PRELU``), but not a misspelt one
    (``--network_def#chanels``)."""
    if isinstance(component, list):
        return name.isdigit()
    if not isinstance(component, dict):
        return False
    if name in _SPECIAL_KEYS or "_target_" not in component:
        return True
    from pydoc import locate

    from monai.bundle import ConfigComponent

    try:  # the constructor the config would call, found the way MONAI finds it ("UNet" -> monai.networks.nets.UNet)
        obj = locate(ConfigComponent({"_target_": component["_target_"]}).resolve_module_name())
        parameters = inspect.signature(obj).parameters
    except Exception:  # noqa: BLE001 - a target that cannot be inspected is not second-guessed
        return True
    return name in parameters or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def check_override_keys(argv: list[str] | None = None) -> None:
    """Refuse a command-line override whose id the config does not have (``--batchsize 1`` would otherwise be
    ignored, and the run use the default), naming the nearest id. A new setting inside an existing component
    (``--handlers#0#_disabled_ True``) is accepted."""
    from monai.bundle import ConfigParser

    found = command_line_overrides(argv)
    if found is None or not found[0]:
        return
    files, overrides = found
    ids = _config_ids(ConfigParser.load_config_files(files))
    for key in overrides:
        normalized = key.replace("::", "#")
        if key in RUN_OPTIONS or normalized in ids:
            continue
        parent, _, name = normalized.rpartition("#")
        if parent and _accepts_new_setting(ids.get(parent), name):
            continue
        nearest = difflib.get_close_matches(normalized, list(ids), n=1, cutoff=0.6)
        hint = f"Did you mean --{nearest[0]}?" if nearest else "See the bundle's configs for the ids it has."
        raise ConfigError(key, "is not an id of this bundle's config, so its value would be ignored.", hint)


def initialize(
    parameter_kinds: Mapping[str, str] | None = None,
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

    check_override_keys()
    check_config_values(parameter_kinds)
    if seed is not None:
        set_determinism(seed=seed)
    if ckpt_dir is not None:  # every rank reads checkpoints (resume)
        require_writable_dir(ckpt_dir, "the checkpoint folder")
    if is_rank_zero():
        if output_dir is not None:
            require_output_outside_input(output_dir, input_path)
            require_writable_dir(output_dir, "the output folder")
        if tracking_uri is not None:
            from clinseg.pipelines.tracking import check_tracking_uri

            check_tracking_uri(tracking_uri)


def save_final_model(network: torch.nn.Module, ckpt_dir: str | os.PathLike) -> Path:
    """Write ``network``'s weights (a plain state dict, as the best-model saver writes) to ``<ckpt_dir>/model.pt``,
    atomically."""
    from clinseg.datasets.io import atomic_write

    module = network.module if isinstance(network, torch.nn.parallel.DistributedDataParallel) else network
    path = Path(ckpt_dir) / "model.pt"
    atomic_write(path, lambda tmp: torch.save(module.state_dict(), tmp))
    return path


def run_training(
    trainer: Engine,
    latest_checkpoint,
    early_stop,
    validator: Engine,
    ckpt_dir: str,
    resume: bool = False,
    time_limit_s: float = 0,
) -> None:
    """Run ``trainer`` as every bundle does; ``models/model.pt`` exists afterwards whatever the validation interval.

    ``model.pt`` is the best validated model (written by the validation's best-model saver). When this training
    ran no validation at all (``max_epochs`` below ``val_interval``), the final weights are written there instead,
    so ``inferring``, evaluation and export work after any training."""
    from clinseg.pipelines.handlers import resume_from_latest

    early_stop.set_trainer(trainer)
    if is_rank_zero():
        latest_checkpoint.attach(trainer)
    resumed = resume_from_latest(trainer, latest_checkpoint, ckpt_dir) if resume else None
    if time_limit_s > 0:
        trainer.add_event_handler(Events.ITERATION_COMPLETED, ignite.handlers.TimeLimit(int(time_limit_s)))

    def leave_a_model(engine: Engine) -> None:
        # registered before the tracking handler's completion (attached at STARTED), so MLflow logs this file
        model_file = Path(ckpt_dir) / "model.pt"
        if is_rank_zero() and ((validator.state.iteration == 0 and not resumed) or not model_file.is_file()):
            path = save_final_model(engine.network, ckpt_dir)
            logger.info(f"no validation ran in this training: the final model is saved as {path}")

    trainer.add_event_handler(Events.COMPLETED, leave_a_model)
    trainer.run()
