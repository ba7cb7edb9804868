"""Dissection at scale: a killed run resumes to the same result; two gloo processes equal one process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from _dissect_helpers import random_dataset, tiny_net
from semlens.units import dissect

TESTS = Path(__file__).resolve().parent
SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import torch
    from _dissect_helpers import random_dataset, tiny_net
    from semlens import distributed
    from semlens.units import dissect

    with distributed.session(backend="gloo"):
        ds = random_dataset(n=9)
        calls = {{"n": 0}}
        load = ds.load_batch

        def counting_load(indices):
            calls["n"] += 1
            if calls["n"] == int(os.environ.get("DIE_AT", "0")):
                os.kill(os.getpid(), signal.SIGKILL)
            return load(indices)

        ds.load_batch = counting_load
        res = dissect(tiny_net(), ds, ["0", "2"], quantile=0.05, batch_size=1, device="cpu", cache_bytes=0,
                      checkpoint=os.environ.get("CKPT") or None, checkpoint_every=int(os.environ.get("EVERY", "1")),
                      show_progress=False, workers=int(os.environ.get("WORKERS", "1")))
        if distributed.rank() == 0:
            saved = {{n: d.iou for n, d in res.layers.items()}}
            saved |= {{"t" + n: d.thresholds for n, d in res.layers.items()}}
            torch.save(saved | {{"calls": torch.tensor(calls["n"])}}, sys.argv[1])
    assert not distributed.is_distributed()
    """
)


def _reference() -> dict[str, torch.Tensor]:
    res = dissect(tiny_net(), random_dataset(n=9), ["0", "2"], quantile=0.05, batch_size=1, device="cpu")
    return {n: d.iou for n, d in res.layers.items()} | {"t" + n: d.thresholds for n, d in res.layers.items()}


def _run(script: Path, out: Path, env: dict[str, str], launcher: list[str] | None = None) -> int:
    full = {**os.environ, "OMP_NUM_THREADS": "1", "SEMLENS_PROGRESS": "0", **env}
    cmd = [sys.executable, *(launcher or []), str(script), str(out)]
    proc = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=120)
    if proc.returncode not in (0, -9):
        print(proc.stdout[-3000:], proc.stderr[-3000:])
    return proc.returncode


@pytest.mark.parametrize("workers", [1, 2])
def test_killed_dissection_resumes_to_the_same_result(tmp_path, workers):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    ref = _reference()
    # 9 images, batch 1: load 1 = probe, loads 2..10 = thresholds pass, 11..19 = tally pass; with two workers,
    # checkpoints every 2 batches: each chunk of 2 runs on both workers, whose states are saved folded
    every = 1 if workers == 1 else 2
    env = {"WORKERS": str(workers), "EVERY": str(every)}
    for die_at, expect_calls in ((5, 1 + 6 + 9), (14, 1 + 6)) if workers == 1 else ((6, 1 + 5 + 9), (15, 1 + 5)):
        ckpt, out = tmp_path / f"ckpt{die_at}", tmp_path / f"out{die_at}.pt"
        assert _run(script, out, {**env, "DIE_AT": str(die_at), "CKPT": str(ckpt)}) == -9  # SIGKILL
        assert not out.exists() and any(ckpt.iterdir())
        assert _run(script, out, {**env, "CKPT": str(ckpt)}) == 0
        got = torch.load(out, weights_only=True)
        assert int(got.pop("calls")) == expect_calls  # finished batches were not redone
        for k, v in ref.items():
            assert torch.equal(got[k], v), k


@pytest.mark.parametrize("workers", [1, 2])
def test_two_gloo_processes_equal_one_process(tmp_path, workers):
    script = tmp_path / "job.py"
    script.write_text(SCRIPT.format(tests=str(TESTS)))
    out = tmp_path / "dist.pt"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert _run(script, out, {"WORKERS": str(workers)}, launcher) == 0  # each process: batches on `workers`
    got = torch.load(out, weights_only=True)
    assert int(got.pop("calls")) == 1 + 5 + 5  # rank 0 read only its shard (5 of 9 images) in each pass
    for k, v in _reference().items():
        assert torch.equal(got[k], v), k
