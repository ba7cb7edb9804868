"""Attribution on whole models: conservation, residual nets, BatchNorm canonization, model checks, state, bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from semlens.explain import (
    Attributor,
    Composite,
    Epsilon,
    InputShapeError,
    UnsupportedModelError,
    ZBox,
    attribute,
    list_methods,
)
from semlens.layers import UnknownLayerError, count_hooks

DT = torch.float64


def cnn(bias: bool = False, seed: int = 0, bn: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers = [nn.Conv2d(3, 6, 3, padding=1, bias=bias)]
    if bn:
        layers.append(nn.BatchNorm2d(6))
    layers += [nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 8, 3, padding=1, bias=bias)]
    if bn:
        layers.append(nn.BatchNorm2d(8))
    layers += [nn.ReLU(inplace=True), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8 * 2 * 2, 7, bias=bias), nn.ReLU(),
               nn.Dropout(0.5), nn.Linear(7, 4, bias=bias)]
    net = nn.Sequential(*layers).to(DT)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.relu = nn.ReLU()  # shared: called twice per forward

    def forward(self, x):
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        out = out + x  # the skip connection is a plain tensor addition
        return self.relu(out)


class ResStack(nn.Module):
    def __init__(self, depth: int, c: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.blocks = nn.Sequential(*[Block(c) for _ in range(depth)])
        self.head = nn.Linear(c, 3, bias=False)
        with torch.no_grad():  # small residual branches, as in trained ResNets
            for b in self.blocks:
                b.conv2.weight.mul_(0.3)

    def forward(self, x):
        h = self.blocks(F.relu(self.stem(x)))
        return self.head(h.mean((2, 3)))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs()).max().detach())


def test_list_methods_names():
    names = set(list_methods())
    assert {"gradient", "gradient-x-input", "sensitivity", "epsilon-plus-flat", "epsilon-plus", "epsilon-gamma-box",
            "epsilon-alpha2-beta1", "epsilon-alpha2-beta1-flat", "lrp-0", "lrp-epsilon"} <= names


@pytest.mark.parametrize("method", ["lrp-0", "gradient-x-input"])
def test_conservation_lrp0_bias_free(method):
    net = cnn()
    x = torch.rand(3, 3, 8, 8, dtype=DT)
    logits = net(x)
    R = attribute(net, x, torch.tensor([0, 1, 3]), method)
    assert rel_err(R.flatten(1).sum(1), logits[torch.arange(3), [0, 1, 3]]) <= 1e-5


def test_conservation_zbox_and_layerwise():
    net = cnn()
    x = torch.rand(3, 3, 8, 8, dtype=DT)
    logit = net(x)[:, 2]
    comp = Composite(first_map=[(nn.Conv2d, ZBox(0.0, 1.0))], layer_map=[((nn.Conv2d, nn.Linear), Epsilon(0.0))])
    R = attribute(net, x, 2, composite=comp)
    assert rel_err(R.flatten(1).sum(1), logit) <= 1e-5
    for layer in ["1", "4", "9"]:  # relevance read at hidden layers also sums to the logit
        RL = attribute(net, x, 2, "lrp-0", layer=layer)
        assert rel_err(RL.flatten(1).sum(1), logit) <= 1e-5


def test_epsilon_leakage_is_bounded_and_grows_with_epsilon():
    net = cnn()
    x = torch.rand(4, 3, 8, 8, dtype=DT)
    logit = net(x)[:, 1].detach()
    leaks = []
    for eps in [1e-6, 1e-2, 1e-1]:
        R = attribute(net, x, 1, "lrp-epsilon", epsilon=eps).flatten(1).sum(1)
        leaks.append(float(((logit - R) / logit).abs().max()))
        assert float((R.abs() - logit.abs()).max()) <= 1e-9  # epsilon absorbs, it never creates relevance
    assert leaks[0] < 1e-3 and leaks[0] < leaks[1] < leaks[2] < 1.0


def test_residual_net_conserves_while_naive_propagation_blows_up():
    depth = 8
    net = ResStack(depth).to(DT).eval()
    x = torch.rand(2, 3, 6, 6, dtype=DT)
    logit = net(x)[:, 0].detach()
    R = attribute(net, x, 0, "lrp-0")
    assert rel_err(R.flatten(1).sum(1), logit) <= 1e-5
    for method in ["epsilon-plus", "epsilon-gamma-box", "epsilon-alpha2-beta1"]:
        s = attribute(net, x, 0, method).flatten(1).sum(1)
        assert float((s / logit).abs().max()) < 3.0, method  # the right order of magnitude, not 2**depth
    # naive rule (Zennit/Captum without a residual canonizer): relevance is passed unchanged to both summands
    with torch.no_grad():
        h = F.relu(net.stem(x))
        acts = []
        for b in net.blocks:
            acts.append(h)
            h = b(h)
        pooled = h.mean((2, 3))
        r = pooled * net.head.weight[0]  # LRP-0 at the head (bias-free), per channel
        r = (r / (h.shape[2] * h.shape[3]))[:, :, None, None].expand_as(h).clone()  # avg-pool: split evenly
        for b, a in zip(reversed(net.blocks), reversed(acts), strict=True):
            u = F.relu(b.conv1(a))
            z = b.conv2(u) + a
            # branch: LRP-0 through conv2 and conv1 via gradient x input on the branch's pre-activations
            with torch.enable_grad():
                aa = a.detach().requires_grad_(True)
                zz = b.conv2(F.relu(b.conv1(aa)))
                (g,) = torch.autograd.grad(zz, aa, r * (z > 0) / zz)
            r = aa.detach() * g + r * (z > 0)  # skip branch: relevance copied, not split
    naive = r.flatten(1).sum(1)
    assert float((naive / logit).abs().min()) > 100  # hundreds of times too large
    assert float((R.flatten(1).sum(1) / logit - 1).abs().max()) < 1e-5


def fold_by_hand(net: nn.Sequential) -> nn.Sequential:
    layers = []
    mods = list(net)
    i = 0
    while i < len(mods):
        m = copy.deepcopy(mods[i])
        if isinstance(m, nn.Conv2d) and i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm2d):
            bn = mods[i + 1]
            s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            with torch.no_grad():
                m.weight.mul_(s.view(-1, 1, 1, 1))
                b0 = m.bias if m.bias is not None else torch.zeros_like(s)
                m.bias = nn.Parameter((b0 - bn.running_mean) * s + bn.bias)
            i += 1
        layers.append(m)
        i += 1
    return nn.Sequential(*layers).eval()


@pytest.mark.parametrize("method", ["epsilon-gamma-box", "epsilon-alpha2-beta1-flat", "lrp-epsilon"])
def test_bn_canonization_equals_prefolded_and_restores_bit_identically(method):
    net = cnn(bias=True, bn=True)
    folded = fold_by_hand(net)
    x = torch.rand(3, 3, 8, 8, dtype=DT)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params_before = {k: id(p) for k, p in net.named_parameters()}
    torch.testing.assert_close(net(x), folded(x))
    R = attribute(net, x, 1, method)
    R_ref = attribute(folded, x, 1, method)
    torch.testing.assert_close(R, R_ref, rtol=1e-9, atol=1e-12)
    after = net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert params_before == {k: id(p) for k, p in net.named_parameters()}
    assert not any("forward" in m.__dict__ for m in net.modules())


def _state(model: nn.Module):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [id(p) for p in model.parameters()], [p.grad for p in model.parameters()],
            [sorted(m.__dict__) for m in model.modules()], count_hooks(model))


def test_state_and_hooks_identical_after_a_raising_call():
    net = cnn(bias=True, bn=True)
    net.train()
    net[0].weight.requires_grad_(False)
    net.register_forward_hook(lambda *a: None)  # a user hook stays
    before = _state(net)
    x = torch.rand(2, 3, 8, 8, dtype=DT)
    with pytest.raises(ValueError, match="out of range"):
        attribute(net, x, 9, "epsilon-gamma-box")  # raises after canonization and rule binding
    assert _state(net) == before
    with pytest.raises(UnknownLayerError):
        attribute(net, x, 0, "epsilon-plus", units={"nope": [0]})
    assert _state(net) == before
    with pytest.raises(RuntimeError, match="boom"), Attributor(net, "epsilon-plus") as attr:
        attr(x, 0)
        assert count_hooks(net) == before[-1]
        raise RuntimeError("boom")
    assert _state(net) == before
    # the model still computes the same function and gradients of parameters stay untouched
    assert all(p.grad is None for p in net.parameters())


def test_unsupported_model_lists_every_culprit():
    class Gate(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)  # product of two activations

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.norm = nn.LayerNorm([4, 6, 6])
            self.gate = Gate()
            self.act = nn.Tanh()
            self.w = nn.Parameter(torch.randn(5, 4 * 36))
            self.out = nn.Softmax(dim=1)

        def forward(self, x):
            h = self.act(self.gate(self.norm(self.conv(x))))
            return self.out(F.linear(h.flatten(1), self.w))

    net = Net().to(DT)
    with pytest.raises(UnsupportedModelError) as err:
        attribute(net, torch.rand(2, 3, 8, 8, dtype=DT), 0, "epsilon-plus")
    msg = str(err.value)
    for culprit in ["norm (LayerNorm)", "gate (Gate)", "'mul'", "'sigmoid'", "act (Tanh)", "'tanh'",
                    "'linear'", "out (Softmax)", "'softmax'"]:
        assert culprit in msg, culprit
    assert len(err.value.culprits) >= 6
    # the gradient methods do not need rules and still work on this model
    assert attribute(net, torch.rand(2, 3, 8, 8, dtype=DT), 0, "gradient").shape == (2, 3, 8, 8)


def test_unfoldable_batchnorm_is_refused_clearly():
    class PreAct(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            h = self.conv(x)
            return self.fc(F.relu(self.bn(h) + h).mean((2, 3)))  # conv output used twice

    with pytest.raises(UnsupportedModelError, match=r"bn \(BatchNorm\): cannot be folded.*also used elsewhere"):
        attribute(PreAct().to(DT).eval(), torch.rand(1, 3, 5, 5, dtype=DT), 0, "lrp-epsilon")


def test_layer_called_twice_is_handled():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)
            self.b = nn.Linear(4, 2, bias=False)

        def forward(self, x):
            return self.b(F.relu(self.a(F.relu(self.a(x)))))

    torch.manual_seed(0)
    net = Twice().to(DT)
    x = torch.rand(3, 4, dtype=DT)
    for method in ["lrp-0", "epsilon-plus"]:
        R = attribute(net, x, 1, method)
        assert rel_err(R.sum(1), net(x)[:, 1]) <= 1e-4
    with pytest.raises(ValueError, match="more than once"):
        attribute(net, x, 1, "lrp-0", layer="a")


def test_units_filtering_decomposes_the_heatmap():
    net = cnn()
    x = torch.rand(2, 3, 8, 8, dtype=DT)
    full = attribute(net, x, 0, "epsilon-plus")
    parts = [attribute(net, x, 0, "epsilon-plus", units={"4": [c]}) for c in range(8)]
    torch.testing.assert_close(sum(parts), full)
    both = attribute(net, x, 0, "epsilon-plus", units={"4": [2, 5]})
    torch.testing.assert_close(both, parts[2] + parts[5])
    mask = torch.zeros(2, 8, dtype=DT)
    mask[0, 2] = mask[1, 5] = 1
    per_sample = attribute(net, x, 0, "epsilon-plus", units={"4": mask})
    torch.testing.assert_close(per_sample[0], parts[2][0])
    torch.testing.assert_close(per_sample[1], parts[5][1])
    layer_rel = attribute(net, x, 0, "lrp-0", layer="4", units={"4": [3]})
    assert layer_rel.shape == (2, 8, 4, 4) and float(layer_rel[:, [0, 1, 2, 4, 5, 6, 7]].abs().max()) == 0.0
    with pytest.raises(ValueError, match="out of range"):
        attribute(net, x, 0, "epsilon-plus", units={"4": [8]})


def test_targets_weighting_and_linearity():
    net = cnn(bias=True)
    x = torch.rand(3, 3, 8, 8, dtype=DT)
    w = torch.randn(3, 4, dtype=DT)
    R = attribute(net, x, w, "epsilon-gamma-box")
    per_class = sum(attribute(net, x, c, "epsilon-gamma-box") * w[:, c, None, None, None] for c in range(4))
    torch.testing.assert_close(R, per_class)
    idx = attribute(net, x, [0, 2, 1], "epsilon-plus-flat")
    for i, c in enumerate([0, 2, 1]):
        torch.testing.assert_close(idx[i], attribute(net, x[i:i + 1], c, "epsilon-plus-flat")[0])
    chunked = attribute(net, x, [0, 2, 1], "epsilon-plus-flat", batch_size=2)
    torch.testing.assert_close(chunked, idx)


def test_gradient_and_sensitivity():
    net = cnn(bias=True)
    x = torch.rand(2, 3, 8, 8, dtype=DT).requires_grad_(True)
    (g,) = torch.autograd.grad(net(x)[:, 3].sum(), x)
    torch.testing.assert_close(attribute(net, x.detach(), 3, "gradient"), g)
    torch.testing.assert_close(attribute(net, x.detach(), 3, "sensitivity"), g ** 2)
    torch.testing.assert_close(attribute(net, x.detach(), 3, "gradient-x-input"), g * x.detach())


def test_bad_inputs_raise_clear_errors():
    net = cnn(bias=True)
    x = torch.rand(2, 3, 8, 8, dtype=DT)
    with pytest.raises(InputShapeError, match="4 channels.*expects 3"):
        attribute(net, torch.rand(2, 4, 8, 8, dtype=DT), 0, "epsilon-plus")
    with pytest.raises(InputShapeError, match="rank 3"):
        attribute(net, torch.rand(3, 8, 8, dtype=DT), 0, "gradient")
    bad = x.clone()
    bad[1, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/Inf \(samples \[1\]\)"):
        attribute(net, bad, 0, "lrp-0")
    bad[1, 0, 2, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN/Inf"):
        attribute(net, bad, 0, "lrp-0")
    with pytest.raises(ValueError, match="target class 4 out of range"):
        attribute(net, x, 4, "gradient")
    with pytest.raises(ValueError, match=r"out of range"):
        attribute(net, x, torch.tensor([0, -1]), "epsilon-plus")
    with pytest.raises(ValueError, match="weighting has shape"):
        attribute(net, x, torch.ones(2, 5, dtype=DT), "epsilon-plus")
    with pytest.raises(UnknownLayerError, match="unknown layer 'features.0'"):
        attribute(net, x, 0, "lrp-0", layer="features.0")
    with pytest.raises(ValueError, match="unknown method"):
        attribute(net, x, 0, "lrp-magic")
    with pytest.raises(ValueError, match="read the model input"):
        attribute(net, x, 0, composite=Composite(name_map={"3": ZBox(0.0, 1.0)}))
    with pytest.raises(ValueError, match="bounds do not contain"):
        attribute(net, x, 0, "epsilon-gamma-box", low=0.5, high=1.0)


def test_input_layer_rule_on_a_model_that_transforms_its_input_warns():
    class Normalised(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(F.relu(self.conv((x - 0.5) / 0.25)).mean((2, 3)))

    net = Normalised().to(DT)
    x = torch.rand(2, 3, 6, 6, dtype=DT)
    with pytest.warns(UserWarning, match="no Linear/Conv layer reads the model input"):
        R = attribute(net, x, 0, "epsilon-plus-flat")
    torch.testing.assert_close(R, attribute(net, x, 0, "epsilon-plus"))


def test_subclass_with_custom_forward_is_checked_not_trusted():
    class ScaledConv(nn.Conv2d):
        def forward(self, x):
            return torch.tanh(super().forward(x))

    net = nn.Sequential(ScaledConv(3, 2, 3), nn.Flatten(), nn.Linear(2 * 4 * 4, 2)).to(DT)
    with pytest.raises(UnsupportedModelError, match=r"0 \(ScaledConv\): op 'tanh'"):
        attribute(net, torch.rand(1, 3, 6, 6, dtype=DT), 0, "lrp-epsilon")


class _ReluUses(nn.Module):
    """Each conv's output is used differently: module ReLU after BN, functional in-place ReLU, clamp, residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.d = nn.Conv2d(4, 4, 3, padding=1)
        self.e = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.relu(self.bn(self.a(x)))  # a: ReLU after a folded BN (in place)
        h = F.relu(self.b(h), inplace=True)  # b: functional in-place ReLU
        h = self.c(h).clamp(min=0)  # c: ReLU written as clamp
        d = self.d(h)
        h = F.relu(d) + d  # d: also used by an addition -> negative outputs get relevance
        h = F.relu(self.e(h))
        h = h + h.mean()  # e's ReLU output is reused; e itself is still followed only by a ReLU
        return self.head(h.mean((2, 3)))


def test_probe_finds_layers_followed_only_by_relu():
    from semlens.explain.graph_check import probe_model

    net = _ReluUses().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    g = probe_model(net, torch.rand(1, 3, 8, 8))
    assert sorted(g.relu_only) == ["a", "b", "c", "e"]
    # inputs proven >= 0: after a ReLU (module, in-place functional, clamp) or a sum/mean of ReLU outputs; not the model
    # input (a) nor relu(d) + d (e)
    assert sorted(g.nonnegative_input) == ["b", "c", "d", "head"]


class _SignUses(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(8, 4, 1), nn.Conv2d(4, 4, 1)
        self.d, self.e = nn.Linear(4, 3), nn.Linear(4, 2)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.a(x)), 2)
        h = self.b(torch.cat([h, h.flip(1)], 1))  # b: cat of pooled ReLU outputs -> proven
        r = F.relu(h)
        v = r.view(r.shape[0], 4, -1)
        r.sub_(0.5)  # in place: the earlier view v is no longer proven either
        h = self.c(v.view_as(r) + 0.0)  # c: not proven
        p = F.leaky_relu(h).mean((2, 3))
        return self.e(F.relu(self.d(p) - 1.0).sum(1, keepdim=True).expand(-1, 4))  # d: leaky -> no; e: relu -> yes


def test_probe_proves_nonnegative_inputs_conservatively():
    from semlens.explain.graph_check import probe_model

    net = _SignUses().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    assert sorted(probe_model(net, torch.rand(1, 3, 8, 8)).nonnegative_input) == ["b", "e"]


def _force_binding(monkeypatch, **forced) -> list[dict]:
    """Every layer binding made from now on gets ``forced`` facts (e.g. ``relu_follows=False``), whatever the probe
    found: the general path the fast one must agree with. Returns the facts each binding had before (filled as
    bindings are made), so a test can check that some fact was actually overridden."""
    import semlens.explain.attributor as attributor_mod

    real_init = attributor_mod._Binding.__init__
    found: list[dict] = []

    def init(self, *args, **kw):
        found.append({k: kw.get(k) for k in forced})
        real_init(self, *args, **{**kw, **forced})

    monkeypatch.setattr(attributor_mod._Binding, "__init__", init)
    return found


@pytest.mark.parametrize("method", ["epsilon-gamma-box", "epsilon-alpha2-beta1", "lrp-zplus"])
def test_probe_proven_signs_equal_the_run_time_check(method, monkeypatch):
    """Plans chosen from the probe's proof of non-negative inputs give exactly what the run-time check gives."""
    torch.manual_seed(0)
    net = _ReluUses().to(DT).eval()
    x = torch.rand(3, 3, 8, 8, dtype=DT)
    proven = attribute(net, x, 1, method)
    found = _force_binding(monkeypatch, nonnegative_input=False)
    assert torch.equal(proven, attribute(net, x, 1, method))
    assert any(f["nonnegative_input"] for f in found)  # the probe had proven some input: the comparison means something


@pytest.mark.parametrize("method", ["epsilon-gamma-box", "epsilon-plus", "epsilon-alpha2-beta1"])
def test_relu_shortcut_equals_general_path(method, monkeypatch):
    """Skipping the negative-output half where a ReLU follows gives the same relevance as computing it."""
    # About 2% of random draws give a network whose ReLUs are all dead (relevance 0 everywhere,
    # so the comparison would prove nothing): draw from a seed known to be alive.
    torch.manual_seed(0)
    net = _ReluUses().to(DT).eval()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.3, 0.3)
        net.bn.running_var.uniform_(0.5, 2.0)
    x = torch.rand(3, 3, 8, 8, dtype=DT)
    fast = attribute(net, x, 1, method)
    found = _force_binding(monkeypatch, relu_follows=False)
    slow = attribute(net, x, 1, method)
    assert any(f["relu_follows"] for f in found)  # some layer did take the shortcut in the fast run
    torch.testing.assert_close(fast, slow, rtol=1e-9, atol=1e-12)
    assert float(fast.abs().sum()) > 0
