"""MONAI Deploy applications of the project's bundles: the command line, its checks and the error contract.

The applications themselves (Holoscan operators around the bundle's own pipeline) are in :mod:`.operators`:
:class:`~.operators.CTHeartApp` (ct_heart: a DICOM study in; DICOM SEG, NIfTI mask, JSON heart volume and views out)
and :class:`~.operators.ImageSegmentationApp` (vessels, oct_layers: images in; label maps, overlays and JSON out).

Both run as the SDK documents: ``python app.py -i IN -o OUT -m MODEL`` or with ``HOLOSCAN_INPUT_PATH``,
``HOLOSCAN_OUTPUT_PATH`` and ``HOLOSCAN_MODEL_PATH``. :func:`main` checks the command line and the paths before it
imports the SDK (which imports Holoscan and the whole of MONAI: seconds), then loads the model, then runs the
application, so a wrong argument is answered at once.

Error contract (:func:`clinseg.pipelines.cli.report_error`): a wrong argument, a missing input or model, an unusable
output folder or an unusable input (no CT series, missing slices, an unreadable image) ends the run with one line,
``error: <file or argument>: <problem>``, on stderr and exit status 1; an unexpected error with one line and the path
of its saved traceback. A failed run writes no result files (outputs are staged, :func:`.runtime.staged_outputs`)
and removes the output folder if it created it; an existing output folder keeps its contents.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from clinseg.datasets.errors import DataError, InputError
from clinseg.pipelines.cli import ArgumentParser, find_input_error, report_error
from clinseg.pipelines.deploy.runtime import find_model_file
from clinseg.pipelines.paths import earlier_results, require_output_outside_input

logger = logging.getLogger(__name__)

LOG_LEVELS = ("DEBUG", "INFO", "WARN", "ERROR", "CRITICAL")


CommandLineParser = ArgumentParser  # the project's parser under the error contract


def argument_parser(prog: str = "app.py") -> CommandLineParser:
    """The SDK's options (``-i``, ``-o``, ``-m``, ``-l``, ``-w``; ``-t`` is refused: the model runs in-process) and
    Holoscan's own, which are passed on to Holoscan."""
    parser = CommandLineParser(prog=prog, description="Run the application (MONAI Deploy SDK command line).")
    add = parser.add_argument
    add("-i", "--input", help="input folder or file (default: $HOLOSCAN_INPUT_PATH, else ./input)")
    add("-o", "--output", help="output folder, created if absent (default: $HOLOSCAN_OUTPUT_PATH, else ./output)")
    add("-m", "--model", help="model file, or a folder holding one *.ts/*.pt (default: $HOLOSCAN_MODEL_PATH, "
        "else ./models)")  # fmt: skip
    add("-l", "--log-level", dest="log_level", type=str.upper, choices=LOG_LEVELS, help="logging level (INFO)")
    add("-w", "--workdir", help="workspace folder (default: $HOLOSCAN_WORKDIR); unused by these applications")
    add("-t", "--triton-server-netloc", dest="triton_server_netloc", help=argparse.SUPPRESS)
    holoscan = parser.add_argument_group("Holoscan options (passed on to Holoscan)")
    for flag in ("--driver", "--worker"):
        holoscan.add_argument(flag, action="store_true")
    for option in ("--address", "--worker-address", "--config"):
        holoscan.add_argument(option)
    holoscan.add_argument("--fragments", nargs="+")
    return parser


@dataclass(frozen=True)
class AppPaths:
    input: Path
    output: Path
    model: Path
    created: Path | None  # the outermost folder of ``output`` that does not exist yet (the run creates it)


def _pick(value: str | None, variable: str, default: str, option: str) -> tuple[Path, str]:
    """A path from the command line, else the SDK's environment variable, else the SDK's default; and whence."""
    if value:
        return Path(value).expanduser().absolute(), option
    if os.environ.get(variable):
        return Path(os.environ[variable]).expanduser().absolute(), variable
    return Path(default).absolute(), f"the default, without {option} or {variable}"


def first_missing(path: Path) -> Path | None:
    """The outermost folder of ``path`` (``path`` included) that does not exist: what a run would create."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def check_paths(args: argparse.Namespace) -> AppPaths:
    """The input, output and model paths the SDK would use, checked before anything is imported or written."""
    if args.triton_server_netloc:
        raise InputError("--triton-server-netloc", "is not supported: these applications run their model "
                         "in-process.")  # fmt: skip
    input_path, given = _pick(args.input, "HOLOSCAN_INPUT_PATH", "input", "-i")
    if not input_path.exists():
        raise DataError(input_path, f"the input does not exist (given by {given}).")
    model_path, given = _pick(args.model, "HOLOSCAN_MODEL_PATH", "models", "-m")
    if not model_path.exists():
        raise DataError(model_path, f"the model does not exist (given by {given}).")
    model_file = find_model_file(model_path)
    output_path, given = _pick(args.output, "HOLOSCAN_OUTPUT_PATH", "output", "-o")
    if output_path.exists() and not output_path.is_dir():
        raise DataError(output_path, f"is a file; the output (given by {given}) must be a folder.")
    created = first_missing(output_path)
    if created is not None:
        parent = created.parent
        if not parent.is_dir():
            raise DataError(output_path, f"the output folder cannot be created: {parent} is a file.")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise DataError(output_path, f"the output folder cannot be created: no permission to write in {parent}.")
    elif not os.access(output_path, os.W_OK | os.X_OK):
        raise DataError(output_path, "the output folder cannot be written (no permission).")
    else:
        earlier, shown = earlier_results(output_path)
        if earlier:  # as the bundles' inference: results of two runs in one folder would mix under one summary
            raise DataError(
                output_path,
                f"the output folder holds an earlier run's results ({len(earlier)} in all: {shown}); this run's "
                f"would replace some of them and leave the others beside its own (given by {given}).",
                "Give each run its own output folder (-o).",
            )
    workdir = args.workdir or os.environ.get("HOLOSCAN_WORKDIR")
    if workdir and Path(workdir).exists() and not Path(workdir).is_dir():
        raise DataError(Path(workdir).absolute(), "is a file; the workspace (-w) must be a folder.")
    try:  # results inside the input folder are read as inputs next time
        require_output_outside_input(output_path, input_path)
    except InputError as e:
        raise DataError(output_path, f"the output folder {e.problem}") from None
    return AppPaths(input_path, output_path, model_file, created)


def remove_created(output: Path, created: Path | None) -> None:
    """Remove the folders a failed run created for ``output`` (only empty ones, from ``output`` up to ``created``)."""
    if created is None:
        return
    for folder in (output, *output.parents):
        try:
            folder.rmdir()
        except OSError:
            return
        if folder == created:
            return


def reportable(error: BaseException) -> BaseException:
    """``error``, or the input error it stands for: a ``FileNotFoundError`` without an errno (raised with a message
    by a library) is an input problem too."""
    found = find_input_error(error, (InputError, FileNotFoundError))
    if isinstance(found, FileNotFoundError) and not (found.errno and found.filename):
        where, sep, problem = str(found).partition(": ")
        return InputError(where, problem) if sep else InputError(str(found.filename or "input"), str(found))
    return error


def run_application(app: str, config_path: Path, paths: AppPaths, log_level: str | None, argv: list[str]):
    """Import the SDK, load the model and run the application; the failure its operators recorded, or None."""
    from monai.deploy.core.arg_parser import set_up_logging

    from clinseg.pipelines.deploy import operators
    from clinseg.pipelines.deploy.runtime import BundleRuntime

    set_up_logging(log_level)  # the SDK's format and level (a logging.json in the working folder overrides them)
    runtime = BundleRuntime(config_path, paths.model)
    logger.info(f"{runtime.bundle_name}: model {paths.model}; input {paths.input}; output {paths.output}")
    application = getattr(operators, app)(runtime, paths.input, paths.output, [sys.executable, *argv])
    application.run()
    return application.failure


def main(app: str, config_path: str | Path, argv: list[str] | None = None) -> int:
    """Run the application named ``app`` (``"CTHeartApp"``, ``"ImageSegmentationApp"``) with the bundle config at
    ``config_path``; ``argv`` as ``sys.argv`` (program first). Exit status 0, or 1 with the contract's one line."""
    argv = list(sys.argv if argv is None else argv)
    paths = None
    try:
        args = argument_parser((Path(argv[0]).name if argv else "") or "app.py").parse_args(argv[1:])
        paths = check_paths(args)
        failure = run_application(app, Path(config_path), paths, args.log_level, argv)
    except Exception as e:  # noqa: BLE001 - every failure ends in the contract's one line
        failure = e
    except BaseException:  # KeyboardInterrupt: nothing of the run stays behind either
        if paths is not None:
            remove_created(paths.output, paths.created)
        raise
    if failure is None:
        return 0
    if paths is not None:
        remove_created(paths.output, paths.created)
    return report_error(reportable(failure))
