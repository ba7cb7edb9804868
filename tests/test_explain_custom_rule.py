"""A rule declared by the user (docs/explain.md, "Adding your own rule"), preset parameters checked against their
declarations, one default method, and no edit left on the model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semlens.explain import Attributor, Composite, Epsilon, ModifiedRule, attribute
from semlens.explain.composites import method_parameters


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
