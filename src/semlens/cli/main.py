"""Entry point of the ``semlens`` console command."""

from __future__ import annotations

import importlib
import os
import pkgutil

import typer

import semlens.cli as _cli_pkg

app = typer.Typer(
    name="semlens",
    help="Make deep neural networks readable: explain, name units, train interpretable models, correct them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain help: flags without "<bool>", starts without rich's help renderer
    context_settings={"max_content_width": 120, "help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root() -> None:
    """semlens: explain decisions, name units, train interpretable models, correct them, measure it all."""


def _register_all() -> None:
    for info in sorted(pkgutil.iter_modules(_cli_pkg.__path__), key=lambda m: m.name):
        if info.name == "main" or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{_cli_pkg.__name__}.{info.name}")
        register = getattr(module, "register", None)
        if callable(register):
            register(app)


_register_all()


def main() -> None:
    """Run the command line; under ``torchrun`` a failing rank also records its exception.

    ``torchrun`` reads each worker's error file (``TORCHELASTIC_ERROR_FILE``) to report the *root cause*:
    the first rank that failed and its traceback. Without it the user sees a peer's "connection closed by
    peer" first. Commands that open :func:`semlens.distributed.session` record there already, before the
    process group goes; this catches what fails outside a session. Plain runs import nothing extra.
    """
    if "TORCHELASTIC_ERROR_FILE" not in os.environ:
        app()
        return
    from semlens.distributed import record_failure

    try:
        app()
    except Exception as err:
        record_failure(err)
        raise


if __name__ == "__main__":
    main()
