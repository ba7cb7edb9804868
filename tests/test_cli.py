"""The console command: discovery of command groups and clean errors."""

from __future__ import annotations

import subprocess
import sys


def test_cli_help_lists_demo():
    out = subprocess.run([sys.executable, "-m", "semlens.cli.main", "--help"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "demo" in out.stdout
