"""Block-norm, activation-group, spatial and weight-decay regularizers: hand-computed values and gradchecks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from semlens.train.regularizers import (
    ActivationGroupLoss,
    BlockNorm,
    SpatialLoss,
    WeightDecay,
    block_norm,
    group_bounds,
    soft_receptive_field,
)


def _w(c_out: int = 7, seed: int = 0) -> torch.Tensor:
    return torch.randn(c_out, 3, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_group_bounds_remainder_policies():
    assert group_bounds(7, 3) == [(0, 2), (2, 4), (4, 7)]
    assert group_bounds(7, 3, "drop") == [(0, 2), (2, 4), (4, 6)]
    assert group_bounds(2, 5) == [(0, 1), (1, 2)]
    with pytest.raises(ValueError, match="remainder"):
        group_bounds(4, 2, "spread")


def test_p2_q2_is_plain_l2_norm():
    w = _w()
    torch.testing.assert_close(block_norm(w, 2, 2, groups=3), w.norm())


def test_q1_p2_is_group_lasso_by_hand():
    w = _w()
    flat = w.reshape(7, -1)
    expected = flat[0:2].norm() + flat[2:4].norm() + flat[4:7].norm()
    torch.testing.assert_close(block_norm(w, 2, 1, groups=3), expected)
    dropped = flat[0:2].norm() + flat[2:4].norm() + flat[4:6].norm()
    torch.testing.assert_close(block_norm(w, 2, 1, groups=3, remainder="drop"), dropped)


def test_p_inf_q_inf_and_mixed_orders_by_hand():
    w = _w()
    flat = w.reshape(7, -1)
    groups = [flat[0:2], flat[2:4], flat[4:7]]
    torch.testing.assert_close(block_norm(w, math.inf, math.inf, groups=3), w.abs().max())
    p, q = 3.0, 1.5
    inner = torch.stack([g.abs().pow(p).sum().pow(1 / p) for g in groups])
    torch.testing.assert_close(block_norm(w, p, q, groups=3), inner.pow(q).sum().pow(1 / q))
    torch.testing.assert_close(block_norm(w, 1, 1, groups=3), w.abs().sum())


@pytest.mark.parametrize("p,q", [(2, 1), (1, 2), (3, 1.5), (2, 2), (math.inf, 1), (2, math.inf)])
def test_block_norm_gradcheck(p, q):
    w = _w(6, seed=1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: block_norm(t, p, q, groups=3), (w,))


def test_zero_group_gets_finite_subgradient():
    w = _w(6).clone()
    w[:2] = 0
    w.requires_grad_(True)
    block_norm(w, 2, 1, groups=3).backward()
    assert torch.isfinite(w.grad).all() and (w.grad[:2] == 0).all()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.Flatten(), nn.Linear(6 * 4 * 4, 2))


def test_block_norm_term_sums_layers_with_strengths_and_weight_decay_baseline():
    net = _net()
    term = BlockNorm(groups=2, strength=0.1)
    assert term.layers == []
    expected = 0.1 * (block_norm(net[0].weight, 2, 1, 2) + block_norm(net[2].weight, 2, 1, 2))
    torch.testing.assert_close(term(net, {}), expected)
    per_layer = BlockNorm(groups=2, layers={"0": 1.0, "2": 0.0})
    torch.testing.assert_close(per_layer(net, {}), block_norm(net[0].weight, 2, 1, 2))
    wd = WeightDecay(0.5)
    hand = 0.25 * sum(m.weight.pow(2).sum() for m in (net[0], net[2], net[4]))
    torch.testing.assert_close(wd(net, {}), hand)
    with pytest.raises(KeyError, match="nope"):
        BlockNorm(layers=["nope"])(net, {})
    with pytest.raises(ValueError, match="p must"):
        BlockNorm(p=0.5)


def _soft_iou_distance_loop(psi: torch.Tensor, groups: list[tuple[int, int]]) -> torch.Tensor:
    """Reference: all unordered pairs per group, plain loops, d = 1 - Σmin/Σmax."""
    total = torch.zeros((), dtype=psi.dtype)
    for start, stop in groups:
        pairs = [(u, v) for u in range(start, stop) for v in range(u + 1, stop)]
        acc = torch.zeros((), dtype=psi.dtype)
        for b in range(psi.shape[0]):
            for u, v in pairs:
                acc = acc + 1 - torch.minimum(psi[b, u], psi[b, v]).sum() / torch.maximum(psi[b, u], psi[b, v]).sum()
        total = total + acc / (len(pairs) * psi.shape[0])
    return total


def test_activation_group_loss_equals_one_minus_soft_iou_reference():
    a = torch.randn(3, 7, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    term = ActivationGroupLoss(["x"], groups=3, strength=2.0)
    psi = soft_receptive_field(a)
    expected = 2.0 * _soft_iou_distance_loop(psi, group_bounds(7, 3))
    torch.testing.assert_close(term(None, {"x": a}), expected)
    # identical maps within every group: zero loss
    same = a[:, :1].expand(3, 6, 4, 5).clone()
    assert ActivationGroupLoss(["x"], groups=2, a1=1.0)(None, {"x": same}).abs() < 1e-12


def test_activation_and_spatial_gradcheck_and_random_pairs():
    a = torch.randn(2, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: ActivationGroupLoss(["x"], groups=2)(None, {"x": t}), (a,))
    assert torch.autograd.gradcheck(lambda t: SpatialLoss(["x"])(None, {"x": t}), (a,))
    torch.manual_seed(0)
    sampled = ActivationGroupLoss(["x"], groups=2, pairs=6)(None, {"x": a})
    assert 0 <= float(sampled.detach()) <= 1


def test_spatial_loss_hand_cases():
    a = torch.zeros(1, 2, 5, 5, dtype=torch.float64)
    a[0, 0, 2, 2] = 1.0  # a single point: zero spread
    a[0, 1, 0, 0] = a[0, 1, 4, 4] = 1.0  # two points at distance 4*sqrt(2): spread 2*sqrt(2)
    term = SpatialLoss(["x"], strength=1.0, eps=0.0, soft=False)
    torch.testing.assert_close(term(None, {"x": a}), torch.tensor((0 + 2 * math.sqrt(2)) / 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="not \\(B, C, h, w\\)"):
        term(None, {"x": torch.zeros(2, 3)})
    with pytest.raises(KeyError, match="were not captured"):
        term(None, {})
