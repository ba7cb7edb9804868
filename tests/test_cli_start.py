"""Fast start: `semlens --help` and the store-only feedback verbs import neither torch nor scikit-learn, the
captioning code, matplotlib or numba (their import alone took ~3 s before). Structural, not timed."""

from __future__ import annotations

import json
import os
import subprocess
import sys

HEAVY = ("torch", "sklearn", "matplotlib", "numba", "semlens.captioning", "scipy")


def _heavy_modules_after(args: list[str], cwd) -> list[str]:
    code = ("import sys\nfrom semlens.cli.main import app\n"
            f"try:\n    app({args!r})\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            f"print('LOADED', [m for m in {HEAVY!r} if m in sys.modules])\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p), "SEMLENS_PROGRESS": "0"}
    res = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    line = next(x for x in res.stdout.splitlines() if x.startswith("LOADED"))
    return json.loads(line.split(" ", 1)[1].replace("'", '"'))


def test_help_and_feedback_list_import_nothing_heavy(tmp_path):
    assert _heavy_modules_after(["--help"], tmp_path) == []
    from semlens.correct.store import FeedbackStore

    FeedbackStore(tmp_path / "p")
    (tmp_path / "p" / ".semlens" / "project.json").write_text('{"kind": "classifier"}')
    for verb in (["list"], ["versions"]):
        assert _heavy_modules_after(["feedback", *verb, "--project", str(tmp_path / "p")], tmp_path) == []
