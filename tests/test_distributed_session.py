"""`distributed.session`: the process group it creates is destroyed on success and on error."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch.distributed as dist

from semlens import distributed


def _one_process_group(tmp_path):
    def init(backend=None):
        store = dist.FileStore(str(tmp_path / "store"), 1)
        dist.init_process_group(backend or "gloo", store=store, rank=0, world_size=1)
        return True
    return init


def test_session_without_torchrun_is_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with distributed.session() as parallel:
        assert parallel is False and distributed.world_size() == 1
    assert not distributed.is_distributed()


def test_session_destroys_its_group_on_success_and_on_error(tmp_path, monkeypatch):
    monkeypatch.setattr(distributed, "init_from_env", _one_process_group(tmp_path))
    with distributed.session() as parallel:
        assert parallel and distributed.is_distributed()
    assert not distributed.is_distributed()
    monkeypatch.setattr(distributed, "init_from_env", _one_process_group(tmp_path / "again"))
    (tmp_path / "again").mkdir()
    with pytest.raises(ValueError, match="boom"), distributed.session():
        assert distributed.is_distributed()
        raise ValueError("boom")
    assert not distributed.is_distributed()


def test_session_leaves_a_group_it_did_not_create(tmp_path):
    _one_process_group(tmp_path)()
    try:
        with distributed.session() as parallel:
            assert parallel
        assert distributed.is_distributed()
    finally:
        dist.destroy_process_group()


ERROR_SCRIPT = """
import time
import torch
from semlens import distributed
with distributed.session(backend="gloo"):
    if distributed.rank() == 1:
        time.sleep(0.5)
        raise ValueError("rank 1 fails")
    distributed.all_reduce_sum(torch.ones(3))  # rank 0 waits here for a peer that has failed
"""


def test_an_error_on_one_rank_ends_both_at_once_without_an_abort(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(ERROR_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    # a hang (rank 0 waiting for gloo's 30-minute timeout) would end in TimeoutExpired
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "ValueError: rank 1 fails" in out
    assert "Connection closed by peer" in out  # rank 0 did not wait for the timeout
    assert "terminate called" not in out and "SIGABRT" not in out
