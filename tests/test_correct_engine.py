"""Activation enhancement and correction propagation (generic engine)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from semlens.correct.engine import enhance, propagate, reference_activations
from semlens.layers import count_hooks


def test_reference_activations_average_time_then_containing_samples():
    f = torch.arange(2 * 3 * 4, dtype=torch.float64).view(2, 3, 4)
    ref = reference_activations(f, torch.tensor([False, True]))
    torch.testing.assert_close(ref, f[1].mean(0))
    with pytest.raises(ValueError, match="no sample contains"):
        reference_activations(f, torch.tensor([False, False]))


def test_enhance_adds_exactly_the_reference_on_exactly_the_named_units():
    torch.manual_seed(0)
    v = torch.randn(2, 5, 6)  # (N, T, D)
    ref = torch.randn(6)
    out = enhance(v, [1, 4], ref)
    diff = out - v
    expected = torch.zeros(6)
    expected[[1, 4]] = ref[[1, 4]]
    torch.testing.assert_close(diff, expected.expand_as(v))
    maps = torch.randn(2, 6, 3, 3)
    out2 = enhance(maps, torch.tensor([0]), ref, dim=1)
    torch.testing.assert_close((out2 - maps)[:, 0], ref[0].expand(2, 3, 3))
    assert torch.equal(out2[:, 1:], maps[:, 1:])
    with pytest.raises(ValueError, match="unit indices"):
        enhance(v, [6], ref)


def _encoder() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6))


def test_propagation_moves_representation_towards_target_and_restores_state():
    model = _encoder().train()
    x = torch.randn(16, 4)
    with torch.no_grad():
        v = model(x)
    target = enhance(v, [2], torch.full((6,), 1.5))
    res = propagate(model, x, target, representation="2", mu=0.0, steps=200, lr=1e-2)
    assert res.data_loss[-1] < 0.2 * res.data_loss[0]
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters()) and count_hooks(model) == 0


def test_huge_mu_leaves_parameters_unchanged():
    model = _encoder()
    before = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(8, 4)
    target = torch.randn(8, 6)
    propagate(model, x, target, representation=lambda m, inp: m(inp), mu=1e12, steps=20, lr=1e-2)
    for p, b in zip(model.parameters(), before, strict=True):
        assert (p - b).abs().max() < 1e-8


def test_mu_trades_fidelity_for_staying_close():
    x = torch.randn(16, 4)
    target = torch.randn(16, 6)
    anchors = []
    for mu in (0.0, 10.0):
        model = _encoder()
        res = propagate(model, x, target, representation="2", mu=mu, steps=60, lr=1e-2)
        anchors.append(res.anchor[-1])
    assert anchors[1] < anchors[0]


def test_propagation_is_deterministic_and_validates():
    x = torch.randn(6, 4)
    t = torch.randn(6, 6)
    outs = []
    for _ in range(2):
        m = _encoder()
        propagate(m, x, t, representation="2", steps=5, lr=1e-2, batch_size=4)
        outs.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
    with pytest.raises(ValueError, match="targets"):
        propagate(_encoder(), x, t[:3], representation="2")
    with pytest.raises(ValueError, match="NaN"):
        propagate(_encoder(), x, t * float("nan"), representation="2")
    with pytest.raises(ValueError, match="representation has shape"):
        propagate(_encoder(), x, t, representation="0")


def test_propagation_stops_the_forward_at_the_representation():
    """Layers after the representation are not run (they cannot change the loss), and the result equals a run through
    a model truncated at that layer."""
    torch.manual_seed(0)
    full = nn.Sequential(_encoder(), nn.Linear(6, 3))
    truncated = copy.deepcopy(full[0])  # an independent copy of the encoder alone
    calls = []
    full[1].register_forward_hook(lambda *_: calls.append(1))
    x, t = torch.randn(8, 4), torch.randn(8, 6)
    propagate(full, x, t, representation="0.2", mu=0.1, steps=5, lr=1e-2)
    propagate(truncated, x, t, representation="2", mu=0.1, steps=5, lr=1e-2)
    assert calls == []
    for a, b, c in zip(full[0].parameters(), truncated.parameters(), _encoder().parameters(), strict=True):
        torch.testing.assert_close(a, b)
        assert not torch.equal(a, c)  # both moved away from the initial weights

    class Skips(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Linear(4, 6), nn.Linear(4, 6)

        def forward(self, inp):
            return self.used(inp)

    with pytest.raises(ValueError, match="did not run"):
        propagate(Skips(), x, t, representation="unused", steps=1)
