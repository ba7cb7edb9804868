"""Under ``torchrun``, the rank that fails first is named as the root cause, with its own exception.

Without the elastic error file, ``torchrun`` can only say that a worker exited with a non-zero code, and the
first message a user sees is a peer's gloo error ("Connection closed by peer"). ``semlens.cli.main.main``
records the failing rank's exception in ``TORCHELASTIC_ERROR_FILE``; ``torchrun`` prints it under
"Root Cause (first observed failure)".
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from torch import nn

TESTS = Path(__file__).resolve().parent
MESSAGE = "planted failure on rank 0, the root cause"


class PlantedFailure(Exception):
    """An exception no CLI error handler knows: it must reach torchrun's summary unchanged."""


def fails_on_rank0(num_classes: int, image_size: int = 64) -> nn.Module:
    """A model factory for ``semlens train``: rank 0 raises, rank 1 builds a model and goes on."""
    if os.environ.get("RANK") == "0":
        raise PlantedFailure(MESSAGE)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * image_size * image_size, num_classes))


def test_torchrun_names_the_failing_rank_and_its_exception(tmp_path):
    from typer.testing import CliRunner

    from semlens.cli.main import app

    data = tmp_path / "concepts"
    r = CliRunner().invoke(app, ["data", "concepts", "--out", str(data), "--n", "20", "--size", "16",
                                 "--workers", "1"])
    assert r.exit_code == 0, r.output
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SEMLENS_PROGRESS": "0",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "semlens.cli.main", "train", "--model", "test_cli_torchrun_errors:fails_on_rank0", "--data", str(data),
           "--epochs", "1", "--device", "cpu", "--out", str(tmp_path / "run")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "Root Cause (first observed failure)" in out, out[-3000:]
    root_cause = out.split("Root Cause (first observed failure)", 1)[1]
    # the summary names rank 0 and carries its exception's message and type (not "error_file: <N/A>")
    assert "rank      : 0" in root_cause, root_cause[-3000:]
    assert MESSAGE in root_cause and "PlantedFailure" in root_cause, root_cause[-3000:]
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_semlens_progress_setting_forces_or_hides_bars(monkeypatch, capsys):
    """``SEMLENS_PROGRESS=1`` draws bars off a terminal too (the wheel check relies on it), ``=0`` never."""
    from semlens.runtime import progress

    monkeypatch.setenv("SEMLENS_PROGRESS", "1")
    assert list(progress(range(3), total=3, desc="forced")) == [0, 1, 2]
    assert "forced" in capsys.readouterr().err
    monkeypatch.setenv("SEMLENS_PROGRESS", "0")
    assert list(progress(range(3), total=3, desc="hidden", enabled=None)) == [0, 1, 2]
    assert "hidden" not in capsys.readouterr().err


def _stamp(path: Path) -> int:
    import json

    return int(json.loads(path.read_text())["message"]["extraInfo"]["timestamp"])


def test_record_failure_first_wins_and_lost_peers_come_later(tmp_path, monkeypatch):
    import time

    import torch.distributed as dist

    from semlens.distributed import record_failure

    assert record_failure(ValueError("not under torchrun")) is False  # no error file: nothing written
    own, peer = tmp_path / "own.json", tmp_path / "peer.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(own))
    try:
        raise PlantedFailure(MESSAGE)
    except PlantedFailure as err:
        before = int(time.time())
        assert record_failure(err) is True
        assert record_failure(RuntimeError("a later error")) is False  # the first failure of a process wins
    text = own.read_text()
    assert MESSAGE in text and "PlantedFailure" in text and "a later error" not in text
    assert before <= _stamp(own) <= int(time.time())
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(peer))
    try:
        raise dist.DistBackendError("[pair.cc:537] Connection closed by peer [127.0.0.1]:1234")
    except RuntimeError as err:
        before = int(time.time())
        assert record_failure(err) is True
    assert before + 1 <= _stamp(peer) <= int(time.time()) + 1  # stamped a second later: never wins a tie
    # gloo also reports a vanished peer as a plain RuntimeError ("Read error ... Connection reset by peer"); seen in
    # CI when rank 1's broadcast lost rank 0, whose own failure then tied and lost torchrun's root-cause pick
    reset = tmp_path / "reset.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(reset))
    try:
        raise RuntimeError("[gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:59802: Connection reset by peer.")
    except RuntimeError as err:
        before = int(time.time())
        assert record_failure(err) is True
    assert before + 1 <= _stamp(reset) <= int(time.time()) + 1
