"""The shared fitting helper (semlens.train.fit_module) and its seeded batch schedules."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from semlens.train import fit_module, full_batches, sampled_batches, shuffled_batches


def test_batch_schedules_are_seeded_and_drawn_like_the_loops_they_replace():
    g = torch.Generator().manual_seed(3)
    want = [i for _ in range(2) for i in torch.randperm(10, generator=g).split(4)]
    got = list(shuffled_batches(10, 4, epochs=2, seed=3))
    assert [len(b) for b in got] == [4, 4, 2, 4, 4, 2]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    g = torch.Generator().manual_seed(1)
    want = [torch.randint(5, (5,), generator=g) for _ in range(3)]  # batch_size capped at n, with replacement
    assert all(torch.equal(a, b) for a, b in zip(sampled_batches(5, 256, steps=3, seed=1), want, strict=True))
    assert list(full_batches(3)) == [None, None, None]


def test_fit_module_equals_a_plain_adam_loop_and_calls_after_step():
    x = torch.randn(30, 4, generator=torch.Generator().manual_seed(0))
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + 0.3

    def make():
        torch.manual_seed(0)
        return nn.Linear(4, 1)

    net, seen = make(), []
    with torch.no_grad():  # gradients are enabled inside
        losses = fit_module(net.parameters(), lambda idx: ((net(x[idx]).squeeze(1) - y[idx]) ** 2).mean(),
                            shuffled_batches(30, 8, epochs=20, seed=2), lr=0.05, weight_decay=1e-3,
                            after_step=seen.append)
    assert len(losses) == 80 and seen == list(range(80)) and losses[-1] < 0.05 * losses[0]
    ref = make()
    opt = torch.optim.Adam(ref.parameters(), lr=0.05, weight_decay=1e-3)
    g = torch.Generator().manual_seed(2)
    for _ in range(20):
        order = torch.randperm(30, generator=g)
        for s in range(0, 30, 8):
            idx = order[s: s + 8]
            loss = ((ref(x[idx]).squeeze(1) - y[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert torch.equal(ref.weight, net.weight) and torch.equal(ref.bias, net.bias)
    full = make()
    fit_module(full.parameters(), lambda idx: ((full(x).squeeze(1) - y) ** 2).mean(), full_batches(5), lr=0.1)
    assert not torch.equal(full.weight, make().weight)
    with pytest.raises(ValueError, match="parameter"):
        fit_module([], lambda idx: torch.zeros(()), full_batches(1), lr=0.1)
