"""LRP rules against an independent float64 oracle: explicit contribution matrices z_ij on tiny nets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semlens.explain import (
    AlphaBeta,
    Composite,
    Epsilon,
    Flat,
    Gamma,
    WSquare,
    ZBox,
    ZPlus,
    attribute,
)

EPS = 1e-6


@pytest.fixture(autouse=True)
def _float64():
    """Every tensor and layer of these tests is float64 (restored afterwards: other test modules are unaffected)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def stab(d, eps=EPS):
    return d + eps * torch.where(d >= 0, 1.0, -1.0)


def oracle(rule, a, W, b, R, low=None, high=None):
    """Relevance R_i of a dense layer ``z = W a + b`` for upper relevance R_j: explicit (N, out, in) contributions."""
    Wp, Wn = W.clamp(min=0), W.clamp(max=0)
    ap, an = a.clamp(min=0)[:, None, :], a.clamp(max=0)[:, None, :]
    A = a[:, None, :]
    bb = torch.zeros(W.shape[0]) if b is None else b
    z = (A * W).sum(-1) + bb
    if isinstance(rule, Epsilon):
        c = A * W
        den = c.sum(-1) + (0 if "bias" in rule.zero_params else bb)
        den = den if rule.epsilon == 0 else stab(den, rule.epsilon)
        return (c / den[..., None] * R[..., None]).sum(1)
    bm = torch.zeros_like(bb) if "bias" in rule.zero_params else bb  # the bias in the modified denominators
    if isinstance(rule, Gamma):
        g = rule.gamma
        cp = ap * (W + g * Wp) + an * (W + g * Wn)
        cn = ap * (W + g * Wn) + an * (W + g * Wp)
        dp = stab(cp.sum(-1) + bm + g * bm.clamp(min=0))
        dn = stab(cn.sum(-1) + bm + g * bm.clamp(max=0))
        c = torch.where((z > 0)[..., None], cp / dp[..., None], torch.zeros_like(cp)) + torch.where(
            (z < 0)[..., None], cn / dn[..., None], torch.zeros_like(cn))
        return (c * R[..., None]).sum(1)
    if isinstance(rule, AlphaBeta):  # includes ZPlus
        p = ap * Wp + an * Wn
        n = ap * Wn + an * Wp
        zp = stab(p.sum(-1) + bm.clamp(min=0))
        zn = stab(n.sum(-1) + bm.clamp(max=0))
        return ((rule.alpha * p / zp[..., None] - rule.beta * n / zn[..., None]) * R[..., None]).sum(1)
    if isinstance(rule, ZBox):
        L, H = low[:, None, :], high[:, None, :]
        c = A * W - L * Wp - H * Wn
        return (c / stab(c.sum(-1))[..., None] * R[..., None]).sum(1)
    if isinstance(rule, Flat):
        c = torch.ones_like(A * W)
        return (c / stab(c.sum(-1))[..., None] * R[..., None]).sum(1)
    if isinstance(rule, WSquare):
        c = (W ** 2).expand_as(A * W)
        b2 = 0 if "bias" in rule.zero_params else bb ** 2
        return (c / stab(c.sum(-1) + b2)[..., None] * R[..., None]).sum(1)
    raise AssertionError(rule)


def two_layer(seed=0, d=(6, 5, 4)):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d[0], d[1]), nn.ReLU(), nn.Linear(d[1], d[2]))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p))
    return net


LOCAL_RULES = [Epsilon(0.0), Epsilon(0.1), Epsilon(0.0, zero_params="bias"), Gamma(0.25), Gamma(1.0),
               AlphaBeta(2.0, 1.0), AlphaBeta(1.0, 0.0), ZPlus(),
               # zero_params: the bias leaves the modified denominators (then z⁺ may be <= 0 where z > 0)
               Gamma(0.25, zero_params="bias"), AlphaBeta(2.0, 1.0, zero_params="bias"), ZPlus(zero_params="bias")]


@pytest.mark.parametrize("rule", LOCAL_RULES, ids=repr)
def test_local_rule_matches_matrix_oracle(rule):
    net = two_layer()
    x = torch.randn(5, 6)  # signed inputs: exercises the 4-term path at layer 0; layer 2 sees ReLU outputs
    weighting = torch.randn(5, 4)  # relevance reaches negative outputs too
    R = attribute(net, x, weighting, composite=Composite(name_map={"0": rule, "2": rule}))
    a1 = F.relu(net[0](x))
    out = net[2](a1)
    R1 = oracle(rule, a1, net[2].weight, net[2].bias, weighting * out)
    expect = oracle(rule, x, net[0].weight, net[0].bias, R1)
    torch.testing.assert_close(R, expect, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("rule", [ZBox(-3.0, 3.0), Flat(), WSquare(), WSquare(zero_params="bias")], ids=repr)
def test_input_rule_matches_matrix_oracle(rule):
    net = two_layer(1)
    x = torch.randn(5, 6).clamp(-2.9, 2.9)
    upper = Epsilon(0.1)
    R = attribute(net, x, 2, composite=Composite(name_map={"0": rule, "2": upper}))
    a1 = F.relu(net[0](x))
    out = net[2](a1)
    R1 = oracle(upper, a1, net[2].weight, net[2].bias, F.one_hot(torch.tensor([2] * 5), 4) * out)
    low, high = torch.full_like(x, -3.0), torch.full_like(x, 3.0)
    expect = oracle(rule, x, net[0].weight, net[0].bias, R1, low, high)
    torch.testing.assert_close(R, expect, rtol=1e-9, atol=1e-12)


def conv_as_matrix(conv: nn.Conv2d, shape, weight=None):
    """Dense matrix of a conv on a (C, H, W) input, built by applying it to the standard basis."""
    n = int(torch.tensor(shape).prod())
    basis = torch.eye(n).view(n, *shape)
    w = conv.weight if weight is None else weight
    cols = F.conv2d(basis, w, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return cols.reshape(n, -1).T, cols.shape[1:]


@pytest.mark.parametrize("rule", [Epsilon(0.01), Gamma(0.25), AlphaBeta(2.0, 1.0), ZPlus(), ZBox(0.0, 1.0), Flat(),
                                  WSquare()], ids=repr)
def test_conv_rules_match_dense_oracle(rule):
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
    net = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), nn.Linear(3 * 3 * 3, 2))
    x = torch.rand(2, 2, 5, 5)
    R = attribute(net, x, 1, composite=Composite(name_map={"0": rule, "3": Epsilon(0.0)}), low=0.0, high=1.0)
    M, oshape = conv_as_matrix(conv, (2, 5, 5))
    bias = conv.bias[:, None, None].expand(oshape).reshape(-1)
    a1 = F.relu(conv(x)).flatten(1)
    out = net[3](a1)
    R1 = F.one_hot(torch.tensor([1, 1]), 2) * out @ torch.eye(2)
    R1 = (a1[:, None, :] * net[3].weight / stab(out, 0)[..., None] * R1[..., None]).sum(1)  # LRP-0 on the top
    if isinstance(rule, Flat):
        ones, _ = conv_as_matrix(conv, (2, 5, 5), torch.ones_like(conv.weight))
        expect = (ones / stab(ones.sum(-1))[:, None] * R1[..., None]).sum(1)
    else:
        xs = x.flatten(1)
        expect = oracle(rule, xs, M, bias, R1, torch.zeros_like(xs), torch.ones_like(xs))
    torch.testing.assert_close(R.flatten(1), expect, rtol=1e-8, atol=1e-12)


def test_alpha_beta_validation():
    with pytest.raises(ValueError, match="alpha - beta"):
        AlphaBeta(2.0, 0.5)
    with pytest.raises(ValueError, match=">= 0"):
        AlphaBeta(-1.0, -2.0)
    with pytest.raises(ValueError, match="zero_params"):
        Epsilon(zero_params="gamma")
