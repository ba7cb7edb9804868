"""Helpers shared by the command modules: the command line's error policy.

User mistakes (semlens' own error types and validation errors, see :data:`semlens.errors.USER_ERRORS`)
print as one red line (an unsupported model: one culprit per line) and exit with status 2. Every other
exception (``TypeError``, ``RuntimeError`` ...) is a bug, in semlens or in the user's model, and keeps
its traceback.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer

from semlens.errors import USER_ERRORS

_console = None


def err_console():
    """A stderr rich console (created on first use: rich is not imported at start-up)."""
    global _console
    if _console is None:
        from rich.console import Console

        _console = Console(stderr=True, soft_wrap=True)
    return _console


def error_message(err: BaseException) -> str:
    """The text shown for a user error: a ``KeyError``'s message without the quotes ``str()`` adds."""
    if isinstance(err, KeyError) and err.args:
        return str(err.args[0])
    return str(err) or type(err).__name__


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print user errors as one line (``error: ...``) and exit 2; let every other exception through."""
    try:
        yield
    except USER_ERRORS as err:
        from rich.markup import escape

        err_console().print(f"[bold red]error:[/] {escape(error_message(err))}", highlight=False)
        raise typer.Exit(code=2) from err
