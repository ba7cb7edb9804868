"""Rules declared by the user (docs/explain.md, "Adding your own rule"), preset parameters checked against their
declarations, one default method, and no edit left on the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semlens.explain import (
    Attributor,
    Composite,
    DeclaredRule,
    Epsilon,
    Gamma,
    LayerOp,
    Mix,
    ModifiedRule,
    Part,
    Term,
    attribute,
)
from semlens.explain.composites import method_parameters
from semlens.explain.plans import FoldedPlan, GeneralPlan, compile_rule


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4)).double()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn_like(p))
    return net


def test_a_user_declared_rule_matches_its_matrix_oracle():
    net = _net()
    x = torch.rand(3, 6, dtype=torch.float64)
    # exactly the docs' example rule, on the dense layers here
    gamma_plus = ModifiedRule(weight=lambda w: w + 0.5 * w.clamp(min=0), bias=lambda b: b + 0.5 * b.clamp(min=0))
    R = attribute(net, x, 2, composite=Composite(layer_map=[(nn.Linear, gamma_plus)]))

    def oracle(a, w, b, r_out, eps=1e-6):  # R_i = a_i sum_j w'_ji R_j / stab(z'_j), float64 matrix algebra
        wm, bm = w + 0.5 * w.clamp(min=0), b + 0.5 * b.clamp(min=0)
        zm = a @ wm.T + bm
        zm = zm + eps * torch.where(zm >= 0, 1.0, -1.0)
        return a * ((r_out / zm) @ wm)

    with torch.no_grad():
        a1 = F.relu(net[0](x))
        r_out = F.one_hot(torch.full((3,), 2), 4) * net[2](a1)
        expect = oracle(x, net[0].weight, net[0].bias, oracle(a1, net[2].weight, net[2].bias, r_out))
    torch.testing.assert_close(R, expect, rtol=1e-9, atol=1e-12)
    # without modifiers the declared rule is LRP-epsilon
    plain = attribute(net, x, 2, composite=Composite(layer_map=[(nn.Linear, ModifiedRule(stabilizer=0.1))]))
    torch.testing.assert_close(plain, attribute(net, x, 2, composite=Composite(layer_map=[(nn.Linear, Epsilon(0.1))])))
    with pytest.raises(ValueError, match="must keep their shapes"):
        attribute(net, x, 2, composite=Composite(layer_map=[(nn.Linear, ModifiedRule(weight=lambda w: w[:1]))]))


def test_preset_keywords_are_checked_against_their_declarations():
    net, x = _net(), torch.rand(2, 6, dtype=torch.float64)
    assert method_parameters("epsilon-plus") == ["epsilon", "zero_params"]
    assert method_parameters("lrp-0") == [] and method_parameters("gradient") == []
    with pytest.raises(ValueError, match=r"'epsilon-plus' has no parameter 'gamma'; valid: epsilon, zero_params"):
        attribute(net, x, 0, "epsilon-plus", gamma=0.5)
    with pytest.raises(ValueError, match=r"has no parameter 'epsilom'"):
        Attributor(net, "lrp-epsilon", epsilom=0.1)
    with pytest.raises(ValueError, match=r"method 'gradient' has no parameter 'epsilon'; valid: none"):
        attribute(net, x, 0, "gradient", epsilon=0.1)
    with pytest.raises(ValueError, match="not to an explicit composite"):
        Attributor(net, composite=Composite(), epsilon=0.1)
    # a declared parameter still works, and the z^B bounds are taken by every method
    e = attribute(net, x, 0, "lrp-epsilon", epsilon=0.1)
    assert not torch.equal(e, attribute(net, x, 0, "lrp-epsilon"))
    torch.testing.assert_close(attribute(net, x, 0, "gradient", low=0.0, high=1.0), attribute(net, x, 0, "gradient"))


def test_one_default_method_and_no_attribute_left_on_the_model():
    net, x = _net(), torch.rand(2, 6, dtype=torch.float64)
    torch.testing.assert_close(attribute(net, x, 1), attribute(net, x, 1, "epsilon-plus-flat"))
    assert Attributor(net).method == "epsilon-plus-flat"
    with pytest.raises(RuntimeError, match="boom"), Attributor(net, "lrp-epsilon") as attr:
        attr(x, 0)
        assert all("forward" in m.__dict__ for m in (net[0], net[2]))  # the bound layers
        raise RuntimeError("boom")
    assert not any("forward" in m.__dict__ for m in net.modules())


def _gamma_rule(gw: float, gb: float) -> DeclaredRule:
    """LRP-γ with its own γ for the biases, declared as data (Zennit's generalised γ when gw == gb)."""
    up_w, down_w, up_b, down_b = Mix(1, gw), Mix(1, 0, gw), Mix(1, gb), Mix(1, 0, gb)
    return DeclaredRule([
        Term([Part("positive", up_w, up_b), Part("negative", down_w, None)], outputs="positive"),
        Term([Part("positive", down_w, down_b), Part("negative", up_w, None)], outputs="negative"),
    ])


def _gamma_oracle(a, w, b, r_out, gw, gb, eps=1e-6):
    """float64 contribution matrices (N, out, in) of the rule above."""
    ap, an = a.clamp(min=0)[:, None, :], a.clamp(max=0)[:, None, :]
    wp, wn = w.clamp(min=0), w.clamp(max=0)
    z = a @ w.T + b
    cp = ap * (w + gw * wp) + an * (w + gw * wn)
    cn = ap * (w + gw * wn) + an * (w + gw * wp)
    zp = cp.sum(-1) + b + gb * b.clamp(min=0)
    zn = cn.sum(-1) + b + gb * b.clamp(max=0)
    zp, zn = zp + eps * torch.where(zp >= 0, 1.0, -1.0), zn + eps * torch.where(zn >= 0, 1.0, -1.0)
    share = torch.where((z > 0)[..., None], cp / zp[..., None], 0.0) + torch.where((z < 0)[..., None],
                                                                                  cn / zn[..., None], 0.0)
    return (share * r_out[..., None]).sum(1)


def test_a_rule_declared_as_terms_matches_its_oracle_and_gets_the_fast_plan():
    net = _net()
    x = torch.randn(4, 6, dtype=torch.float64)  # signed input: the general plan at layer 0
    weighting = torch.randn(4, 4, dtype=torch.float64)  # relevance reaches negative outputs of layer 2 too
    rule = _gamma_rule(0.5, 0.1)
    R = attribute(net, x, weighting, composite=Composite(layer_map=[(nn.Linear, rule)]))
    with torch.no_grad():
        a1 = F.relu(net[0](x))
        r1 = _gamma_oracle(a1, net[2].weight, net[2].bias, weighting * net[2](a1), 0.5, 0.1)
        expect = _gamma_oracle(x, net[0].weight, net[0].bias, r1, 0.5, 0.1)
    torch.testing.assert_close(R, expect, rtol=1e-9, atol=1e-12)
    # the compiler reads the declaration: layer 2's input is a ReLU output (proven by the probe), so the a⁻ parts go,
    # the Mix modifiers make both terms dominate z on the outputs they serve (stabilizer folded, one wider layer);
    # their weights add up to (2 + γ) w but their biases to (2 + γ_b) b, so the true output is evaluated once more
    op = LayerOp(net[2], "2", nonnegative_input=True)
    plan = compile_rule(rule.declaration(), op, True)
    assert isinstance(plan, FoldedPlan) and plan.cat and plan.s is None
    assert compile_rule(_gamma_rule(0.5, 0.5).declaration(), op, True).s == 2.5  # z = (z⁺ + z⁻) / 2.5
    assert isinstance(compile_rule(rule.declaration(), LayerOp(net[0], "0"), False), GeneralPlan)
    # with equal γ it is the built-in Gamma, bit for bit
    same = attribute(net, x, weighting, composite=Composite(layer_map=[(nn.Linear, _gamma_rule(0.25, 0.25))]))
    assert torch.equal(same, attribute(net, x, weighting, composite=Composite(layer_map=[(nn.Linear, Gamma(0.25))])))


def test_a_declared_w_squared_rule_on_positive_inputs_conserves():
    net = _net()
    x = torch.randn(3, 6, dtype=torch.float64)
    w2_plus = DeclaredRule(Term([Part("positive", weight=lambda w: w ** 2, bias=None)]))
    comp = Composite(name_map={"0": w2_plus, "2": w2_plus})
    r_in = attribute(net, x, 1, composite=comp)
    r_mid = attribute(net, x, 1, composite=comp, layer="1")  # relevance of layer 2's input (the ReLU output)

    def oracle(a, w, r_out, eps=1e-6):  # R_i = a⁺_i Σ_j w_ji² R_j / (Σ_i' a⁺_i' w_ji'² + ε)
        c = a.clamp(min=0)[:, None, :] * w ** 2
        return (c / (c.sum(-1) + eps)[..., None] * r_out[..., None]).sum(1)

    with torch.no_grad():
        a1 = F.relu(net[0](x))
        out = net[2](a1)
        r_out = F.one_hot(torch.full((3,), 1), 4) * out
        expect_mid = oracle(a1, net[2].weight, r_out)
        expect_in = oracle(x, net[0].weight, expect_mid)
    torch.testing.assert_close(r_mid, expect_mid, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(r_in, expect_in, rtol=1e-9, atol=1e-12)
    # no bias in the denominators: every layer passes on all its relevance (up to the stabilizer) wherever some
    # positive input reaches an output
    torch.testing.assert_close(r_mid.sum(1), r_out.sum(1), rtol=1e-5, atol=1e-9)
    alive = ((x.clamp(min=0) @ (net[0].weight ** 2).T) > 0).all()
    assert bool(alive)
    torch.testing.assert_close(r_in.sum(1), r_mid.sum(1), rtol=1e-5, atol=1e-9)


def test_malformed_declarations_are_refused_where_they_are_written():
    """A typo in a declaration is an error naming the field, raised by the object that holds it."""
    from semlens.explain import DeclaredRule, Part, Term

    with pytest.raises(ValueError, match=r"Part.inputs must be .* got 'sideways'"):
        Part("sideways")
    with pytest.raises(ValueError, match=r"Term.outputs must be .* got 'up'"):
        Term([Part()], outputs="up")
    with pytest.raises(ValueError, match="at least one part"):
        Term([])
    with pytest.raises(ValueError, match="at least one term"):
        DeclaredRule([])
