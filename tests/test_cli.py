"""The console command: discovery of command groups and clean errors."""

from __future__ import annotations

import subprocess
import sys


def test_cli_help_lists_demo():
    out = subprocess.run([sys.executable, "-m", "semlens.cli.main", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "demo" in out.stdout


def test_help_is_plain_and_readable():
    from typer.testing import CliRunner

    from semlens.cli.main import app

    for cmd in (["train"], ["dissect"], ["explain"], ["feedback", "apply"]):
        out = CliRunner().invoke(app, [*cmd, "--help"], env={"COLUMNS": "120"}).output
        assert "<bool>" not in out and "``" not in out and "╭" not in out, out
    out = CliRunner().invoke(app, ["explain", "--help"], env={"COLUMNS": "120"}).output
    assert "--colorbar" in out and "--random-init" in out
