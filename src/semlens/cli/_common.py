"""Helpers shared by the command modules: turning library errors into clean CLI errors."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import typer
from rich.console import Console

err_console = Console(stderr=True, soft_wrap=True)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Print ``ValueError``/``KeyError``/``FileNotFoundError``/``TypeError`` as one red line, exit 2."""
    try:
        yield
    except (ValueError, KeyError, FileNotFoundError, TypeError, RuntimeError) as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        err_console.print(f"[bold red]error:[/] {msg}", highlight=False)
        raise typer.Exit(code=2) from err
