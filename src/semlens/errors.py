"""The error types that mean "the user asked for something that cannot be done".

The command line prints these (and plain validation errors: ``ValueError``, ``KeyError``,
``FileNotFoundError``, ``FileExistsError``, ``PermissionError``) as one line and exits with status 2;
every other exception (``TypeError``, ``RuntimeError``, ...) is a bug and shows its traceback.
This module imports nothing heavy, so the command line can use it at start-up.
"""

from __future__ import annotations

__all__ = ["SemlensError", "UserInputError", "OutputError", "ModelLoadError", "USER_ERRORS"]


class SemlensError(Exception):
    """Base of semlens' own user-facing errors."""


class UserInputError(SemlensError, ValueError):
    """An argument or input file that does not fit what was asked (names the culprit)."""


class OutputError(SemlensError, FileExistsError):
    """An output that would overwrite an input or someone else's files."""


class ModelLoadError(SemlensError, ValueError):
    """A model that cannot be built from the given spec and weights (names the model the weights came from)."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    SemlensError, ValueError, KeyError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError,
    NotADirectoryError,
)
