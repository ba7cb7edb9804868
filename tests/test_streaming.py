"""The streaming core: batching, atomic checkpoints, resume, fingerprint checks, early-stopping forward."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from semlens.layers import count_hooks
from semlens.streaming import (
    ForwardTap,
    ResumeMismatchError,
    batch_slices,
    forward_until,
    load_state,
    run_batches,
    save_state,
    worker_index,
)


class _Sum:
    def __init__(self) -> None:
        self.total = torch.zeros((), dtype=torch.int64)

    def state_dict(self):
        return {"total": self.total}

    def load_state_dict(self, state):
        self.total = state["total"]


def test_batch_slices_and_uninterrupted_run():
    assert batch_slices(range(7), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError):
        batch_slices(range(3), 0)
    acc = _Sum()
    info = run_batches(10, 4, lambda idx, b: acc.__setattr__("total", acc.total + sum(idx)), accumulator=acc)
    assert int(acc.total) == 45 and info.batches == 3 and info.resumed_at == 0


def test_resume_skips_finished_batches_and_rejects_other_jobs(tmp_path):
    ckpt = tmp_path / "state.safetensors"
    seen: list[int] = []
    acc = _Sum()

    def step(idx, b):
        if b == 3 and not seen_fail:
            seen_fail.append(b)
            raise RuntimeError("killed")
        seen.append(b)
        acc.total = acc.total + sum(idx)

    seen_fail: list[int] = []
    with pytest.raises(RuntimeError, match="killed"):
        run_batches(20, 3, step, accumulator=acc, checkpoint=ckpt, every=2, fingerprint={"job": 1})
    assert seen == [0, 1, 2]
    acc2 = _Sum()
    acc = acc2
    seen.clear()
    info = run_batches(20, 3, step, accumulator=acc2, checkpoint=ckpt, every=2, fingerprint={"job": 1})
    assert info.resumed_at == 2 and seen == [2, 3, 4, 5, 6]  # batch 2 was after the last checkpoint
    assert int(acc2.total) == sum(range(20))
    with pytest.raises(ResumeMismatchError, match="different job"):
        run_batches(20, 3, step, accumulator=_Sum(), checkpoint=ckpt, fingerprint={"job": 2})
    ckpt.write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        run_batches(20, 3, step, accumulator=_Sum(), checkpoint=ckpt, fingerprint={"job": 1})


def test_save_state_is_atomic_round_trip(tmp_path):
    path = tmp_path / "s.safetensors"
    save_state(path, {"a": torch.arange(5)}, {"k": [1, 2]})
    state, meta = load_state(path)
    assert torch.equal(state["a"], torch.arange(5)) and meta == {"k": [1, 2]}
    assert not list(tmp_path.glob("*.tmp"))


def test_forward_until_stops_after_deepest_layer_and_cleans_up():
    calls = []
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    net[2].register_forward_pre_hook(lambda m, i: calls.append("last"))
    hooks = count_hooks(net)
    out = forward_until(net, torch.randn(5, 3), ["1", "0"])
    assert set(out) == {"0", "1"} and calls == [] and count_hooks(net) == hooks
    torch.testing.assert_close(out["1"], torch.relu(out["0"]))
    with pytest.raises(KeyError, match="unknown layer"):
        forward_until(net, torch.randn(1, 3), ["9"])
    assert count_hooks(net) == hooks


def test_forward_tap_captures_each_threads_own_forward():
    """Two threads tapping one model at once get the outputs of their own inputs; forwards outside a tap call
    (the plain model call below) are not captured; the hooks go on exit."""
    net = nn.Sequential(nn.Linear(3, 64), nn.ReLU(), nn.Linear(64, 2))
    xs = [torch.randn(32, 3) for _ in range(2)]
    wrong = []

    def work(tap, x):
        for _ in range(200):
            out = tap(x)
            if not torch.equal(out["0"], net[0](x).detach()):
                wrong.append(1)

    with ForwardTap(net, ["0"]) as tap:
        threads = [threading.Thread(target=work, args=(tap, x)) for x in xs]
        for t in threads:
            t.start()
        net(torch.randn(4, 3))  # not a tap call: nothing is captured, nothing stops
        for t in threads:
            t.join()
    assert not wrong and count_hooks(net) == 0


@pytest.mark.parametrize("every", [3, 100])
def test_workers_run_every_batch_once_and_restore_the_thread_count(tmp_path, every):
    seen, lock = [], threading.Lock()
    threads = torch.get_num_threads()

    def step(idx, b):
        with lock:
            seen.append((b, tuple(idx), worker_index(), torch.get_num_threads()))

    info = run_batches(17, 2, step, checkpoint=tmp_path / "c.safetensors", every=every, workers=2)
    assert sorted(b for b, *_ in seen) == list(range(9)) and info.batches == 9
    assert all(list(idx) == list(range(2 * b, min(17, 2 * b + 2))) for b, idx, *_ in seen)
    assert {w for *_, w, _ in seen} <= {0, 1} and {t for *_, t in seen} == {1}  # one intra-op thread each
    assert torch.get_num_threads() == threads
    with pytest.raises(RuntimeError, match="batch 4"):
        run_batches(17, 2, lambda idx, b: (_ for _ in ()).throw(RuntimeError(f"batch {b}")) if b == 4 else None,
                    workers=2)
    assert torch.get_num_threads() == threads
