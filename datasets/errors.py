"""Errors raised for unusable input data.

Every error names the file (or folder) and the problem, so a user can fix the input without a
debugger. :mod:`pipelines.cli` prints them without a stack trace when they end a bundle run.
"""

from __future__ import annotations

import os


class InputError(ValueError):
    """Something the user supplied cannot be used: ``where`` names it (a file, a folder, a config key)."""

    def __init__(self, where: str, problem: str, hint: str | None = None):
        self.problem = problem
        self.hint = hint
        super().__init__(f"{where}: {problem}" + (f"\n{hint}" if hint else ""))


class DataError(InputError):
    """An input file or folder cannot be used. ``path`` is what was read, ``problem`` what is wrong."""

    def __init__(self, path: str | os.PathLike, problem: str, hint: str | None = None):
        self.path = os.fspath(path)
        super().__init__(self.path, problem, hint)


class NoUsableDataError(DataError):
    """A dataset folder holds nothing any reader accepts."""


class ConfigError(InputError):
    """A config value cannot be used. ``key`` is the config id (as given to ``--key`` overrides)."""

    def __init__(self, key: str, problem: str, hint: str | None = None):
        self.key = key
        super().__init__(f"config key '{key}'", problem, hint)


def find_input_error(error: BaseException | None, types: tuple[type, ...] = (InputError,)) -> BaseException | None:
    """The first error of ``types`` in the cause chain: MONAI wraps errors raised in transforms and expressions."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, types):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def source_of(value: object, default: str) -> str:
    """The file a loaded value (a MONAI ``MetaTensor``) was read from, for an error naming it; ``default`` (its
    dictionary key, say) for a value without that record."""
    meta = getattr(value, "meta", None)
    return str(meta.get("filename_or_obj", default)) if isinstance(meta, dict) else str(default)
