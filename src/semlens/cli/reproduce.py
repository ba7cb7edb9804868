"""``semlens reproduce <experiment>``: re-run a published experiment on built-in data.

Each experiment module in :mod:`semlens.experiments` that defines ``register_reproduce(app)`` adds
its own command to this sub-app (e.g. ``blocknorm`` in :mod:`semlens.experiments.blocknorm`); to add
an experiment, write such a function in a new module; nothing here needs editing.
"""

from __future__ import annotations

import importlib
import pkgutil

import typer

reproduce_app = typer.Typer(name="reproduce", help="Reproduce published experiments on built-in data.",
                            no_args_is_help=True)


def _discover() -> None:
    import semlens.experiments as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda m: m.name):
        if info.ispkg or info.name.startswith("_") or info.name == "demo":
            continue
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        hook = getattr(module, "register_reproduce", None)
        if callable(hook):
            hook(reproduce_app)


def register(app: typer.Typer) -> None:
    _discover()
    app.add_typer(reproduce_app, name="reproduce")
