"""The error contract of every entry point, and the checks bundle runs make before anything else.

One contract (documented in the README, "When an input is wrong"): a problem of the input, the config or the
environment ends the process with one line naming the file or config key and the cause, and exit status 1; an
unexpected internal error ends it with one line plus the path of its saved traceback. :func:`report_error` prints
that line; bundle configs import this module, which installs it as ``sys.excepthook`` for ``monai.bundle run``; the
other entry points (``pipelines.experiments``, export, deploy build, the Deploy apps) call it themselves.
``PIPELINE_TRACEBACK=1`` prints the full traceback as well.

The checks bundles run first, in ``initialize``, live here too: :func:`require_writable_dir` (an unwritable output
folder should stop a run before hours of training, not after); the config checks are in
:mod:`clinseg.pipelines.config_checks`.
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from clinseg.datasets.errors import (  # noqa: F401 (ConfigError and find_input_error re-exported)
    ConfigError,
    DataError,
    InputError,
    find_input_error,
)


def parse_overrides(items: list[str]) -> dict:
    """Config overrides given on a command line as ``KEY=JSON`` (``network_def#channels=[8,16,32]``)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: override {item!r} is not KEY=JSON.")
        overrides[key] = json.loads(value)
    return overrides


def split_values(text: str, what: str) -> list[str]:
    """``text`` split at the commas outside brackets, braces and quotes: the values of ``--grid KEY=V1,V2`` and
    ``choice:V1,V2``, where a value may itself be a list or a mapping (``[8,16,32],[16,32,64]`` is two values).

    Raises:
        InputError: naming ``what``, for unbalanced brackets or quotes.
    """
    values, quote, start = [], None, 0
    closing = {"]": "[", "}": "{", ")": "("}
    opened: list[str] = []
    for index, char in enumerate(text):
        if quote is not None:
            quote = None if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{(":
            opened.append(char)
        elif char in closing:
            if not opened or opened.pop() != closing[char]:
                raise InputError(what, f"{char!r} at character {index + 1} closes no bracket of {text!r}.")
        elif char == "," and not opened:
            values.append(text[start:index])
            start = index + 1
    if opened or quote is not None:
        raise InputError(what, f"{text!r} leaves {(quote or opened[-1])!r} unclosed.")
    values.append(text[start:])
    return values


def add_set_argument(parser, measured_against: str, example: str) -> None:
    """A benchmark's ``--set KEY=JSON ...``: config overrides, one choice measured against ``measured_against``
    (read with :func:`parse_overrides`)."""
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="KEY=JSON",
        help=f"config overrides, one choice measured against {measured_against} ({example})",
    )


# operating-system failures that are the environment's, not the program's: they name a path and a cause
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR,
    errno.ENOENT, errno.EEXIST, errno.ENAMETOOLONG, errno.EMFILE, errno.ENFILE, errno.EIO,
}  # fmt: skip


def _environment_error(error: BaseException | None) -> OSError | None:
    found = find_input_error(error, (OSError,))
    if isinstance(found, OSError) and found.errno in ENVIRONMENT_ERRNOS and found.filename:
        return found
    return None


def error_dir() -> Path:
    """Where internal errors' tracebacks are saved: ``$CLINSEG_ERROR_DIR``, else ``<tmp>/clinseg-errors``."""
    return Path(os.environ.get("CLINSEG_ERROR_DIR") or Path(tempfile.gettempdir()) / "clinseg-errors")


def save_traceback(error: BaseException) -> Path | None:
    """Write ``error``'s full traceback (with the command line) to a new file in :func:`error_dir`; None if that
    cannot be written either (the message then says so)."""
    program = Path(sys.argv[0]).stem if sys.argv and sys.argv[0] else "python"
    try:
        folder = error_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{program}-{os.getpid()}.txt"
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        path.write_text(f"command: {' '.join(sys.argv)}\ncwd: {os.getcwd()}\n\n{text}")
        return path
    except OSError:
        return None


def describe_error(error: BaseException) -> tuple[str, bool]:
    """The contract's one line for ``error`` and whether it is a user-side problem (input, config, environment).

    - an :class:`InputError` anywhere in the cause chain (a file, a folder, a config key): ``error: <where>:
      <problem>`` plus its hint;
    - an operating-system failure naming a path (disk full, no permission, read-only, a file where a folder is
      expected): ``error: <path>: <cause>.``;
    - a component's constructor refusing the settings a command-line override gave it (``UNet`` given channels and
      strides of different lengths): ``error: config key '<key>': ...``;
    - a checkpoint whose weights do not fit the network the config builds (:func:`checkpoint_mismatch`);
    - anything else is internal: ``internal error: <type>: <message>`` and where its traceback was saved.
    """
    found = find_input_error(error)
    if found is not None:
        return f"error: {found}", True
    os_error = _environment_error(error)
    if os_error is not None:
        return f"error: {os_error.filename}: {os_error.strerror or os_error}.", True
    refused = refused_override(error)
    if refused is not None:
        return f"error: {refused}", True
    mismatch = checkpoint_mismatch(error)
    if mismatch is not None:
        return f"error: {mismatch}", True
    memory = out_of_memory(error)
    if memory is not None:
        return f"error: {memory}", True
    origin = _origin(error)  # the error itself, not MONAI's "Failed to evaluate ..." wrapped around it
    message = str(origin).strip().splitlines()
    return f"internal error: {type(origin).__name__}: {message[0] if message else ''}", False


def _origin(error: BaseException) -> BaseException:
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    return error


def remove_unused_dirs() -> list[str]:
    """Remove the folders this process made for its outputs (:func:`require_writable_dir`) that hold no file: a
    run that failed before writing anything leaves no empty folder behind (a folder holding any file, another
    run's included, is kept). The folders removed."""
    removed = []
    while _created_dirs:
        top = _created_dirs.pop()
        walked = list(os.walk(top, topdown=False))
        if any(files for _, _, files in walked):
            continue
        try:
            for root, _, _ in walked:  # deepest first
                os.rmdir(root)  # fails, and so keeps the folder, if anything appeared in it meanwhile
        except OSError:
            continue
        removed.append(top)
    return removed


def report_error(error: BaseException) -> int:
    """Print the one line of the error contract for ``error`` to stderr and return the exit status (1).

    An internal error's full traceback is saved (:func:`save_traceback`) and its path printed on the same line;
    ``PIPELINE_TRACEBACK=1`` prints the traceback as well, for every kind. Output folders the run made and left
    empty are removed (:func:`remove_unused_dirs`)."""
    _close_progress_bars()
    remove_unused_dirs()
    if os.environ.get("PIPELINE_TRACEBACK"):
        traceback.print_exception(type(error), error, error.__traceback__, file=sys.stderr)
    line, user_side = describe_error(error)
    if not user_side:
        saved = save_traceback(error)
        where = f"the traceback is saved in {saved}" if saved else f"the traceback could not be saved in {error_dir()}"
        line = f"{line} ({where}; set PIPELINE_TRACEBACK=1 to print it)"
    print(line, file=sys.stderr)
    return 1


def _close_progress_bars() -> None:
    """End any open progress bar's line, so that the error line starts a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - reporting an error must not raise another
            pass


_INSTANTIATE_FAILURE = re.compile(r"^Failed to instantiate component '(?P<target>[^']+)'")


def refused_override(error: BaseException | None) -> ConfigError | None:
    """A :class:`ConfigError` when ``error`` is MONAI failing to build a component whose settings a command-line
    override changed (the constructor's own ``ValueError`` / ``TypeError`` is the problem), else None. Without an
    override involved, a constructor failure is the config's own (internal) error."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        match = _INSTANTIATE_FAILURE.match(str(error)) if isinstance(error, RuntimeError) else None
        cause = error.__cause__
        if match and isinstance(cause, (ValueError, TypeError)) and not isinstance(cause, InputError):
            key = _override_feeding(match["target"])
            if key is not None:
                return ConfigError(
                    key, f"{match['target']} refused the value: {str(cause).strip().splitlines()[0]}",
                    f"Fix it in the config or on the command line (--{key} ...).",
                )  # fmt: skip
        error = error.__cause__ or error.__context__
    return None


_STATE_DICT_FAILURE = "Error(s) in loading state_dict for "


def checkpoint_mismatch(error: BaseException | None, argv: list[str] | None = None) -> InputError | None:
    """An :class:`InputError` naming the checkpoint when ``error`` is PyTorch refusing its weights for the network
    the config builds, else None. The project's own runs compare a checkpoint's recorded settings with the config
    before loading it; MONAI's own commands (``ckpt_export``, ``verify_net_in_out``...) load it as it is, and a model
    trained with other network settings fails there with PyTorch's list of mismatched tensors. The checkpoint is
    named from the command line (``--ckpt_file``, ``--checkpoint_path``), else as "the checkpoint"."""
    origin = _origin(error) if error is not None else None
    text = str(origin) if isinstance(origin, RuntimeError) else ""
    if not text.startswith(_STATE_DICT_FAILURE):
        return None
    network = text[len(_STATE_DICT_FAILURE) :].split(":", 1)[0]
    detail = next((line.strip().rstrip(".") for line in text.splitlines()[1:] if line.strip()), "")
    from clinseg.pipelines.config_checks import option_values

    options = option_values(list(sys.argv if argv is None else argv)[1:])
    checkpoint = options.get("ckpt_file") or options.get("checkpoint_path") or "the checkpoint"
    return InputError(
        checkpoint,
        f"its weights do not fit the {network} the config builds ({detail[:240]}): it was trained with other "
        "network settings.",
        "Pass the settings it was trained with (its model.json records them: --network_def#channels ...), or "
        "export it with python -m clinseg.pipelines.export, which reads them.",
    )


_ALLOCATION_FAILURES = ("can't allocate memory", "out of memory", "DefaultCPUAllocator")


def out_of_memory(error: BaseException | None, argv: list[str] | None = None) -> InputError | None:
    """An :class:`InputError` naming the input when ``error`` is the machine running out of memory (``MemoryError``,
    PyTorch's CPU allocator or CUDA refusing an allocation), else None. It is the environment's limit met by the
    input's size, not a bug: the line says so and names the input (``--input_path``, ``--input_dir`` or
    ``--dataset_dir`` of the command line), with what was asked for."""
    origin = _origin(error) if error is not None else None
    # the whole message: a DataLoader worker re-raises the worker's error with its traceback as text
    text = str(origin) if origin is not None else ""
    if not (isinstance(origin, MemoryError) or (isinstance(origin, RuntimeError) and any(
            failure in text for failure in _ALLOCATION_FAILURES))):  # fmt: skip
        return None
    if "CUDA" in text:
        return InputError(
            "the GPU",
            "out of memory (CUDA): the batch and the windows do not fit the GPU's memory.",
            "Lower batch_size, the patch or sliding-window size (patch_size, sw_roi_size) or sw_batch_size.",
        )
    from clinseg.pipelines.config_checks import option_values

    options = option_values(list(sys.argv if argv is None else argv)[1:])
    source = next((options[k] for k in ("input_path", "input_dir", "dataset_dir") if options.get(k)), "the input")
    asked = re.search(r"allocate (\d+) bytes", text)
    detail = f"an allocation of {int(asked.group(1)) / 2**30:.1f} GiB failed" if asked else text.strip()[:200]
    return InputError(
        source,
        f"not enough memory to process it ({detail}): the input is too large for this machine's memory.",
        "Run it on a machine with more memory, or give smaller inputs (crop or resample them); a CT needs about 70 "
        "bytes per voxel (6 GB for 512 x 512 x 300).",
    )


def _override_feeding(target: str) -> str | None:
    """The command-line override that sets a setting of a component whose ``_target_`` is ``target``, directly
    (``--network_def#channels``) or through a reference (``--learning_rate`` behind ``"lr": "@learning_rate"``)."""
    from clinseg.pipelines.config_checks import override_feeds

    try:
        return override_feeds(target)
    except Exception:  # noqa: BLE001 - reporting an error must not raise another
        return None


def _excepthook(exc_type, exc, tb, _previous=sys.excepthook):
    if issubclass(exc_type, KeyboardInterrupt):
        _previous(exc_type, exc, tb)
        return
    report_error(exc)  # the interpreter then exits with status 1


def install() -> None:
    if sys.excepthook is not _excepthook:
        sys.excepthook = _excepthook


install()


def require_file(path: str | list[str], what: str, hint: str) -> str | list[str]:
    """Return ``path`` if it is a file (or, for a list such as an ensemble's checkpoints, if each is), else raise a
    :class:`DataError` naming the first that is not (used by bundle configs)."""
    if not isinstance(path, (str, os.PathLike)) and not path:
        raise ConfigError("checkpoint_path", f"is an empty list: {what} needs one file, or several for an ensemble.")
    for one in [path] if isinstance(path, (str, os.PathLike)) else path:
        if not os.path.isfile(one):
            raise DataError(os.path.abspath(one), f"{what} does not exist.", hint)
    return path


_created_dirs: list[str] = []
"""The outermost folders :func:`require_writable_dir` made in this process, for :func:`remove_unused_dirs`."""


def require_writable_dir(path: str | os.PathLike, what: str) -> str:
    """Create ``path`` if needed and prove it writable (a file is written and removed); else a :class:`DataError`.
    A folder made here is removed again if the run fails before anything is written in it (:func:`report_error`).

    ``os.access`` is not enough: it says yes to root on a read-only mount, and knows nothing of quotas.
    """
    path = os.path.abspath(os.fspath(path))
    first_missing = None
    ancestor = path
    while not os.path.lexists(ancestor) and os.path.dirname(ancestor) != ancestor:
        first_missing, ancestor = ancestor, os.path.dirname(ancestor)
    try:
        os.makedirs(path, exist_ok=True)
        if first_missing is not None:
            _created_dirs.append(first_missing)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        from clinseg.datasets.io import write_error

        refused = write_error(path, e)  # "is a file, not a folder", "is mounted read-only", ...
        cause = refused.problem.removeprefix("cannot be written: ").rstrip(".") if refused else e.strerror or e
        raise DataError(path, f"{what} cannot be created or written ({cause}).") from e
    return path


class ArgumentParser(argparse.ArgumentParser):
    """``argparse`` under the error contract: a wrong argument raises an :class:`InputError` naming it (one line and
    exit status 1 once reported by :func:`entry_point` or the hook), not argparse's usage text and status 2.
    ``--help`` still prints the usage."""

    def error(self, message: str):
        argument, sep, problem = message.partition(": ")
        if message.startswith("argument ") and sep:  # "argument -l/--log-level: invalid choice: ..."
            raise InputError(argument.removeprefix("argument "), f"{problem} (see --help).")
        if message.startswith("unrecognized arguments: "):
            unknown = message.removeprefix("unrecognized arguments: ")
            options = "is not an option" if " " not in unknown else "are not options"
            raise InputError(unknown, f"{options} of {self.prog} (see --help).")
        if message.startswith("the following arguments are required: "):
            missing = message.removeprefix("the following arguments are required: ")
            raise InputError(missing, f"{'is' if ', ' not in missing else 'are'} required (see --help).")
        raise InputError(self.prog, f"{message} (see --help).")


def entry_point(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap a command's ``main(argv)`` in the error contract: any error it raises is reported by
    :func:`report_error` (one line; an internal error's traceback saved) and the status is 1."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except (SystemExit, KeyboardInterrupt):
            raise
        except Exception as error:  # noqa: BLE001 - every error ends in the contract's one line
            return report_error(error)

    return wrapped


def text_table(lines: list[list]) -> str:
    """Rows of cells (the header first) as left-aligned columns."""
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines)
