"""Command-line behaviour shared by bundle runs: input errors print as one clear message, not a stack trace.

Bundle configs import this module (``"imports": ["$import pipelines.cli"]``), which installs the hook. A
:class:`datasets.DataError` (a file) or :class:`ConfigError` (a config key) anywhere in the cause chain of the
exception that ends the process is printed as ``error: <file or key>: <problem>`` plus its hint; set
``PIPELINE_TRACEBACK=1`` to see the full traceback as well. Every other exception prints its normal traceback.

The checks bundles run first, in ``initialize``, live here too: :func:`check_parameters` (values given on the
command line arrive typed by ``fire``, so ``--batch_size four`` or ``--resume maybe`` would otherwise fail deep in
PyTorch, or silently do the wrong thing) and :func:`require_writable_dir` (an unwritable output folder should stop
a run before hours of training, not after).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile

from clinseg.datasets.errors import DataError, InputError


class ConfigError(InputError):
    """A config value cannot be used. ``key`` is the config id (as given to ``--key`` overrides)."""

    def __init__(self, key: str, problem: str, hint: str | None = None):
        self.key = key
        super().__init__(f"config key '{key}'", problem, hint)


def parse_overrides(items: list[str]) -> dict:
    """Config overrides given on a command line as ``KEY=JSON`` (``network_def#channels=[8,16,32]``)."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"error: override {item!r} is not KEY=JSON.")
        overrides[key] = json.loads(value)
    return overrides


def find_input_error(error: BaseException | None, types: tuple[type, ...] = (InputError,)) -> BaseException | None:
    """The first error of ``types`` in the cause chain: MONAI wraps errors raised in transforms and expressions."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, types):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _excepthook(exc_type, exc, tb, _previous=sys.excepthook):
    data_error = find_input_error(exc)
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


def require_writable_dir(path: str | os.PathLike, what: str) -> str:
    """Create ``path`` if needed and prove it writable (a file is written and removed); else a :class:`DataError`.

    ``os.access`` is not enough: it says yes to root on a read-only mount, and knows nothing of quotas.
    """
    path = os.path.abspath(os.fspath(path))
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as e:
        raise DataError(path, f"{what} cannot be created or written ({e.strerror or e}).") from e
    return path


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


_KINDS = {
    "int": (_is_int, "an integer"),
    "int>0": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "int>=0": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "number>0": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "number>=0": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "fraction": (lambda v: _is_number(v) and 0 < v < 1, "a number between 0 and 1 (exclusive)"),
    "rate": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "probability": (lambda v: _is_number(v) and 0 <= v <= 1, "a probability in [0, 1]"),
    # fire reads `--resume true` as the text 'true' (and 'false' is truthy): only True and False are accepted
    "bool": (lambda v: isinstance(v, bool), "True or False (capitalised on the command line: --key True)"),
    "path": (lambda v: isinstance(v, (str, os.PathLike)) and os.fspath(v) != "", "a path (text)"),
    "str": (lambda v: isinstance(v, str) and v != "", "a non-empty text"),
}
_LIST_KIND = re.compile(r"^list\[(?P<kind>[^\]]+)\](?:\*(?P<length>\d+))?$")


def _check(value, kind: str) -> str | None:
    """``None`` if ``value`` is of ``kind``, else what was expected. Kinds: the keys of ``_KINDS``, ``X?`` (X or
    null), ``one of: a, b`` and ``list[X]*N`` (N items of X; without ``*N`` any non-empty length)."""
    if kind.endswith("?"):
        if value is None:
            return None
        expected = _check(value, kind[:-1])
        return expected and f"{expected} or null"
    if kind.startswith("one of:"):
        choices = [choice.strip() for choice in kind[len("one of:") :].split(",")]
        return None if value in choices else f"one of {choices}"
    match = _LIST_KIND.match(kind)
    if match:
        length = match["length"] and int(match["length"])
        expected = f"a list of {length or 'one or more'} items, each {_KINDS[match['kind']][1]}"
        if not isinstance(value, (list, tuple)) or not value or (length and len(value) != length):
            return expected
        return None if all(_check(item, match["kind"]) is None for item in value) else expected
    test, expected = _KINDS[kind]
    return None if test(value) else expected


def check_parameters(*checks: dict) -> None:
    """Check config values before anything runs; a :class:`ConfigError` names the first key of the wrong kind.

    Each ``checks`` dict maps a config id to ``[value, kind]``; bundles pass the values as ``@id`` references, so
    overrides are checked as given (``pipelines/configs/engines.json#parameter_checks`` and each bundle's own).
    """
    for spec in checks:
        for key, (value, kind) in spec.items():
            expected = _check(value, kind)
            if expected is not None:
                raise ConfigError(
                    key, f"expected {expected}, got {value!r} ({type(value).__name__}).",
                    f"Fix it in the config or on the command line (--{key} ...).",
                )  # fmt: skip
