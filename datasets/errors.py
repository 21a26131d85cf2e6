"""Errors raised for unusable input data.

Every error names the file (or folder) and the problem, so a user can fix the input without a
debugger. :mod:`pipelines.cli` prints them without a stack trace when they end a bundle run.
"""

from __future__ import annotations

import os


class DataError(ValueError):
    """An input file or folder cannot be used. ``path`` is what was read, ``problem`` what is wrong."""

    def __init__(self, path: str | os.PathLike, problem: str, hint: str | None = None):
        self.path = os.fspath(path)
        self.problem = problem
        self.hint = hint
        message = f"{self.path}: {problem}"
        if hint:
            message += f"\n{hint}"
        super().__init__(message)


class NoUsableDataError(DataError):
    """A dataset folder holds nothing any reader accepts."""
