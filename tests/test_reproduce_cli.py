"""`semlens reproduce` commands are declared in semlens.cli like every other command group."""

from __future__ import annotations

from typer.testing import CliRunner

from semlens.cli.main import app
from semlens.cli.reproduce import reproduce_app


def test_reproduce_commands_are_registered_by_the_cli():
    assert sorted(c.name for c in reproduce_app.registered_commands) == [
        "blocknorm", "correction", "dong", "maximize", "xnn"]
    res = CliRunner().invoke(app, ["reproduce", "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and all(n in res.output for n in ("blocknorm", "correction", "dong"))
    res = CliRunner().invoke(app, ["reproduce", "dong", "--out", "x", "--seeds", "0"])
    assert res.exit_code == 2 and "--seeds must be >= 1" in res.output
    import semlens.experiments.dong as dong

    assert not hasattr(dong, "register_reproduce")
