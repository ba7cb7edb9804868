"""The error types that mean "the user asked for something that cannot be done".

The command line prints these (and plain validation errors: ``ValueError``, ``KeyError``,
``FileNotFoundError``, ``FileExistsError``, ``PermissionError``) as one line and exits with status 2;
every other exception (``TypeError``, ``RuntimeError``, ...) is a bug and shows its traceback.
This module imports nothing heavy, so the command line can use it at start-up.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

__all__ = ["SemlensError", "UserInputError", "OutputError", "ModelLoadError", "USER_ERRORS", "suggest"]


def suggest(name: str, choices: Sequence[str], n: int = 3, cutoff: float = 0.5) -> str:
    """`` Did you mean: a, b?`` for the closest ``choices`` (empty string when none is close)."""
    close = difflib.get_close_matches(name, list(choices), n=n, cutoff=cutoff)
    return f" Did you mean: {', '.join(close)}?" if close else ""


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
