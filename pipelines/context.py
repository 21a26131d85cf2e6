"""The bundle run in progress: its config parser, its command-line arguments and its rank.

MONAI hands a config expression or a handler no reference to the workflow that runs it, so the ``ConfigWorkflow``
and the arguments of ``monai.bundle run`` are found on the call stack, here and nowhere else. Used by the engine
(the shared workflow, the handlers), the config checks and the run names in tracking.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from types import FrameType

import torch.distributed as dist

# the config files and overrides of a bundle workflow that a Python caller builds and runs itself (a benchmark's
# ConfigWorkflow), where no ``monai.bundle`` frame holds them
_DECLARED_RUN_ARGUMENTS: ContextVar[tuple[list[str], dict] | None] = ContextVar("declared_run_arguments", default=None)


def _calling_frames() -> Iterator[FrameType]:
    """The frames of the call stack, innermost first, from the function that calls this one. Walked by
    hand: ``inspect.stack`` reads every frame's source file, which costs seconds over the config expressions and
    handlers of one run."""
    frame = sys._getframe(1)  # 0 is this generator's own frame
    while frame is not None:
        yield frame
        frame = frame.f_back


def running_parser():
    """The ``ConfigParser`` of the bundle workflow being run (after command-line overrides), or None.

    MONAI hands a config expression no reference to its workflow, so the ``ConfigWorkflow`` is found on the call
    stack (expressions and handlers run inside its ``initialize`` / ``run``)."""
    from monai.bundle import ConfigWorkflow

    for frame in _calling_frames():
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, ConfigWorkflow):
            return candidate.parser
    return None


def is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def from_every_rank(value) -> list:
    """``value`` of every rank of a distributed run, in rank order (``[value]`` outside a process group): what each
    rank holds of its own share of the cases. Every rank must call it (a collective)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    shares: list = [None] * dist.get_world_size()
    dist.all_gather_object(shares, value)
    return shares


def validation_sampler(dataset, key: str = "val_fraction"):
    """A ``DistributedSampler`` that gives each rank its own validation cases, none padded or repeated (so that
    every metric counts each case once), in order.

    Raises:
        ConfigError: naming ``key`` (what sets the number of validation cases), when there are fewer cases than
            processes: a rank without one would stop the others at their first gather.
    """
    from monai.data import DistributedSampler

    from clinseg.datasets.errors import ConfigError

    processes = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if len(dataset) < processes:
        raise ConfigError(
            key,
            f"leaves {len(dataset)} validation case(s) for the {processes} processes of this run; each process "
            "validates at least one.",
            "Validate on more cases, or run fewer processes (torchrun --nproc_per_node).",
        )
    return DistributedSampler(dataset, even_divisible=False, shuffle=False)


def running_run_arguments() -> tuple[list[str], dict] | None:
    """The config files and the overrides (typed, as ``fire`` read them) of the ``monai.bundle`` run in progress,
    from the command line or in-process (``monai.bundle.run(...)``); None outside one. MONAI keeps neither after
    building the workflow, so they are read from its ``create_workflow`` frame, which runs ``initialize``, or once
    the workflow runs, from the frame of ``monai.bundle.scripts.run`` (its ``override`` keyword arguments). A caller
    that builds its own ``ConfigWorkflow`` declares them with :func:`declared_run_arguments`."""
    declared = _DECLARED_RUN_ARGUMENTS.get()
    if declared is not None:
        return declared
    for frame in _calling_frames():
        if frame.f_globals.get("__name__") != "monai.bundle.scripts":
            continue
        if frame.f_code.co_name in ("create_workflow", "run"):
            arguments_name = "_args" if frame.f_code.co_name == "create_workflow" else "override"
            files, arguments = frame.f_locals.get("config_file"), frame.f_locals.get(arguments_name) or {}
            if files is None:
                return None
            files = [str(f) for f in files] if isinstance(files, (list, tuple)) else [str(files)]
            return files, dict(arguments)
    return None


@contextlib.contextmanager
def declared_run_arguments(config_files: list[str], overrides: dict):
    """While the block runs, :func:`running_run_arguments` answers ``config_files`` and ``overrides``: a workflow
    built in-process (``ConfigWorkflow(config_file, **overrides)``) is then named and compared by what it changed,
    as the same run from the command line would be."""
    token = _DECLARED_RUN_ARGUMENTS.set(([str(f) for f in config_files], dict(overrides)))
    try:
        yield
    finally:
        _DECLARED_RUN_ARGUMENTS.reset(token)
