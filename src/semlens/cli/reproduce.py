"""``semlens reproduce <experiment>``: re-run a published experiment on built-in data.

Each experiment module in :mod:`semlens.experiments` that defines ``register_reproduce(app)`` adds
its own command to this sub-app (e.g. ``blocknorm`` in :mod:`semlens.experiments.blocknorm`); to add
an experiment, write such a function in a new module; nothing here needs editing. The modules (which
import torch and more) are imported only when ``semlens reproduce ...`` itself runs, so the other
commands and ``semlens --help`` start fast.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Any

import typer
from typer.core import TyperGroup


def _discover(app: typer.Typer) -> None:
    import semlens.experiments as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.ispkg or info.name.startswith("_") or info.name == "demo":
            continue
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        hook = getattr(module, "register_reproduce", None)
        if callable(hook):
            hook(app)


class _LazyExperiments(TyperGroup):
    """A command group whose experiment commands are discovered on first use."""

    _loaded = False

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        found = typer.Typer()
        _discover(found)
        if found.registered_commands:
            for name, cmd in typer.main.get_group(found).commands.items():
                self.add_command(cmd, name)

    def list_commands(self, ctx: Any) -> list[str]:
        self._load()
        return super().list_commands(ctx)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        self._load()
        return super().get_command(ctx, cmd_name)


reproduce_app = typer.Typer(name="reproduce", help="Reproduce published experiments on built-in data.",
                            no_args_is_help=True, cls=_LazyExperiments)


def register(app: typer.Typer) -> None:
    app.add_typer(reproduce_app, name="reproduce")
