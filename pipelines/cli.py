"""Command-line behaviour shared by bundle runs: input errors print as one clear message, not a stack trace.

Bundle configs import this module (``"imports": ["$import pipelines.cli"]``), which installs the hook. A
:class:`datasets.DataError` anywhere in the cause chain of the exception that ends the process is printed as
``error: <file>: <problem>`` plus its hint; set ``PIPELINE_TRACEBACK=1`` to see the full traceback as well.
Every other exception prints its normal traceback.
"""

from __future__ import annotations

import os
import sys

from datasets.errors import DataError


def parse_overrides(items: list[str]) -> dict:
    """Config overrides given on a command line as ``KEY=JSON`` (``network_def#channels=[8,16,32]``)."""
    import json

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: override {item!r} is not KEY=JSON.")
        overrides[key] = json.loads(value)
    return overrides


def find_data_error(error: BaseException | None) -> DataError | None:
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, DataError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _excepthook(exc_type, exc, tb, _previous=sys.excepthook):
    data_error = find_data_error(exc)
    if data_error is None or os.environ.get("PIPELINE_TRACEBACK"):
        _previous(exc_type, exc, tb)
    if data_error is not None:
        print(f"\nerror: {data_error}", file=sys.stderr)
        if not os.environ.get("PIPELINE_TRACEBACK"):
            print("(set PIPELINE_TRACEBACK=1 to see the full traceback)", file=sys.stderr)


def install() -> None:
    if sys.excepthook is not _excepthook:
        sys.excepthook = _excepthook


install()


def require_file(path: str, what: str, hint: str) -> str:
    """Return ``path`` if it is a file, else raise a :class:`DataError` naming it (used by bundle configs)."""
    if not os.path.isfile(path):
        raise DataError(os.path.abspath(path), f"{what} does not exist.", hint)
    return path
