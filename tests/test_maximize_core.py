"""Activation maximization core: exact optima of the three variants, batching, hooks and state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from semlens.layers import count_hooks
from semlens.maximize import (
    Augment,
    CodeParam,
    Objective,
    PixelParam,
    channel,
    class_logit,
    code_penalty,
    direction,
    diversity,
    expert_term,
    l2_penalty,
    maximize,
    neuron,
)
from semlens.maximize.experts import fit_gaussian

SHAPE = (3, 4, 4)
D = 48


def _linear_model(seed: int = 0, outputs: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(D, outputs))


def _close(x: torch.Tensor, target: torch.Tensor) -> None:
    x, target = x.reshape(x.shape[0], -1).double(), target.reshape(target.shape[0], -1).double()
    cos = torch.nn.functional.cosine_similarity(x, target, dim=1)
    ratio = x.norm(dim=1) / target.norm(dim=1)
    assert bool((cos >= 0.999).all()), cos
    assert bool(((ratio - 1).abs() <= 0.01).all()), ratio


def test_plain_am_linear_unit_reaches_mean_plus_w_over_2lambda() -> None:
    model = _linear_model()
    w = model[1].weight.detach()  # (3, D): one linear unit per class
    xbar = torch.rand(SHAPE)
    lam = 0.25
    res = maximize(model, class_logit([0, 1, 2]), PixelParam(SHAPE, start=xbar), regulariser=l2_penalty(lam, xbar),
                   steps=400, lr=0.1)
    _close(res.images - xbar, w / (2 * lam))


def test_local_am_is_anchored_to_each_example() -> None:
    model = _linear_model()
    w = model[1].weight.detach()
    x0 = torch.rand(3, *SHAPE)  # one example per row
    res = maximize(model, class_logit([0, 1, 2]), PixelParam(SHAPE, start=x0), regulariser=l2_penalty(1.0, x0),
                   steps=400, lr=0.1)
    _close(res.images - x0, w / 2)


def test_gaussian_expert_optimum_is_mu_plus_sigma_w_over_lambda() -> None:
    # max wᵀx + λ log N(x; μ, Σ)  =>  w − λ Σ⁻¹ (x − μ) = 0  =>  x* = μ + Σ w / λ
    g = torch.Generator().manual_seed(1)
    data = torch.rand(300, *SHAPE, generator=g) * torch.linspace(0.5, 1.5, D).reshape(SHAPE)
    expert = fit_gaussian(data, k=D)  # full covariance
    model = _linear_model(2)
    w = model[1].weight.detach()
    lam = 2.0
    res = maximize(model, class_logit([0, 1, 2]), PixelParam(SHAPE, start=expert.mean.reshape(SHAPE)),
                   regulariser=expert_term(lam, expert.log_prob), steps=600, lr=0.02)
    target = expert.cov_mul(w) / lam
    _close(res.images.reshape(3, -1) - expert.mean, target)
    # and Σ is the fitted covariance: U diag(s) Uᵀ + σ²(I − UUᵀ) reproduces the sample covariance
    emp = torch.cov(data.reshape(300, -1).double().T)
    assert torch.allclose(expert.cov_mul(torch.eye(D)).double(), emp, atol=1e-4)


def test_code_space_linear_decoder_optimum() -> None:
    # max wᵀGz − λ‖z‖²  =>  z* = Gᵀw / (2λ)
    torch.manual_seed(3)
    gen = nn.Linear(6, D, bias=False)
    model = _linear_model(4)
    w = model[1].weight.detach()
    lam = 0.5
    param = CodeParam(gen, 6, SHAPE, clip=None)
    res = maximize(model, class_logit([0, 1, 2]), param, regulariser=code_penalty(lam), steps=400, lr=0.05)
    _close(res.params, w @ gen.weight.detach() / (2 * lam))


def test_code_clip_keeps_codes_within_three_sigma() -> None:
    torch.manual_seed(3)
    gen = nn.Linear(6, D, bias=False)
    res = maximize(_linear_model(4), class_logit([0, 1]), CodeParam(gen, 6, SHAPE, clip=3.0),
                   regulariser=code_penalty(1e-4), steps=100, lr=0.5)
    assert float(res.params.abs().max()) == pytest.approx(3.0)


class _Conv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(6, 5, 3, padding=1)
        self.bn = nn.BatchNorm2d(5)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.conv2(self.relu1(self.conv1(x)))))


def _conv_model() -> nn.Module:
    torch.manual_seed(5)
    return _Conv().double()


def test_batched_equals_one_at_a_time_with_augmented_views() -> None:
    model = _conv_model()
    units, seeds = [0, 3, 4, 1, 0], [7, 7, 7, 7, 8]
    obj = channel("conv2", units) + 0.5 * neuron("conv1", [1, 2, 3, 4, 5]) - direction(
        "conv2", torch.linspace(-1, 1, 25, dtype=torch.float64).reshape(5, 5)) * 0.1
    param = PixelParam((3, 8, 8), noise=0.1)
    aug = Augment(views=3, pad=2, jitter=1, rotate=10, seed=4)
    kw = dict(regulariser=l2_penalty(0.05, torch.zeros(3, 8, 8)), steps=25, lr=0.05, augment=aug,
              dtype=torch.float64)
    batched = maximize(model, obj, param, seeds=seeds, **kw)
    for b in range(len(units)):
        single = maximize(model, obj.take([b]), param, seeds=[seeds[b]], **kw)
        assert torch.allclose(single.images[0], batched.images[b], atol=1e-5, rtol=0)
        assert float(single.activation[0]) == pytest.approx(float(batched.activation[b]), abs=1e-5)


def test_diversity_couples_only_rows_of_the_same_group() -> None:
    model = _conv_model()
    obj = channel("conv2", [0, 0, 1, 1]) + 0.3 * diversity("conv1", [0, 0, 1, 1])
    kw = dict(steps=10, lr=0.05, dtype=torch.float64)
    param = PixelParam((3, 8, 8), noise=0.5)
    batched = maximize(model, obj, param, seeds=[1, 2, 3, 4], **kw)
    pair = maximize(model, obj.take([2, 3]), param, seeds=[3, 4], **kw)
    assert torch.allclose(pair.images, batched.images[2:], atol=1e-6)
    alone = maximize(model, obj.take([2]), param, seeds=[3], **kw)  # without its partner the term is 0
    assert not torch.allclose(alone.images[0], batched.images[2], atol=1e-4)
    # with augmented views, and inside a concatenated batch: still only the group's rows interact
    aug = Augment(views=2, seed=1)
    cat = Objective.cat([obj, channel("conv2", [4, 4])])
    both = maximize(model, cat, param, seeds=[1, 2, 3, 4, 5, 6], augment=aug, **kw)
    pair = maximize(model, obj.take([2, 3]), param, seeds=[3, 4], augment=aug, **kw)
    assert torch.allclose(pair.images, both.images[2:4], atol=1e-6)


def test_hooks_state_and_grads_restored_after_a_raising_call() -> None:
    model = _conv_model()
    model.train()
    model.conv1.weight.requires_grad_(False)
    model.conv2.weight.grad = torch.full_like(model.conv2.weight, 3.0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = count_hooks(model)

    def boom(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        maximize(model, channel("conv2", [0]), PixelParam((3, 8, 8)), regulariser=boom, steps=3, dtype=torch.float64)
    res = maximize(model, channel("conv2", [0]), PixelParam((3, 8, 8)), steps=3, dtype=torch.float64)
    assert res.images.shape == (1, 3, 8, 8)
    assert count_hooks(model) == hooks
    assert model.training and model.bn.training
    assert not model.conv1.weight.requires_grad and model.conv2.weight.requires_grad
    assert torch.equal(model.conv2.weight.grad, torch.full_like(model.conv2.weight, 3.0))
    assert model.conv1.weight.grad is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # BN running stats untouched (eval mode during the run)


def test_hooks_only_on_read_layers() -> None:
    model = _conv_model()
    seen: dict[str, int] = {}
    original = nn.Module.register_forward_hook

    def spy(self: nn.Module, hook, *a, **k):  # noqa: ANN001
        name = next(n for n, m in model.named_modules() if m is self)
        seen[name] = seen.get(name, 0) + 1
        return original(self, hook, *a, **k)

    nn.Module.register_forward_hook = spy  # type: ignore[method-assign]
    try:
        maximize(model, channel("conv1", [0]) + neuron("head.2", [1]), PixelParam((3, 8, 8)), steps=1,
                 dtype=torch.float64)
    finally:
        nn.Module.register_forward_hook = original  # type: ignore[method-assign]
    assert seen == {"conv1": 1, "head.2": 1}


def test_bad_objectives_name_the_culprit() -> None:
    model = _conv_model()
    with pytest.raises(KeyError, match="conv9"):
        maximize(model, channel("conv9", [0]), PixelParam((3, 8, 8)), steps=1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"unit index \[5\] out of range for layer 'conv2' with 5 units"):
        maximize(model, channel("conv2", [0, 5]), PixelParam((3, 8, 8)), steps=1, dtype=torch.float64)
    with pytest.raises(ValueError, match="cannot add objectives for 2 and 1 samples"):
        channel("conv2", [0, 1]) + channel("conv1", [0])


def test_objective_algebra_is_per_sample() -> None:
    acts = {"a": torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)}
    means = acts["a"].mean(dim=(2, 3))  # (2, 3)
    obj = 2 * channel("a", [0, 2]) - channel("a", [1, 1]) * torch.tensor([1.0, 3.0])
    expected = torch.stack([2 * means[0, 0] - means[0, 1], 2 * means[1, 2] - 3 * means[1, 1]])
    assert torch.allclose(obj(acts), expected)
    assert torch.allclose(neuron("a", [2, 0], y=[1, 0], x=[0, 1])(acts),
                          torch.stack([acts["a"][0, 2, 1, 0], acts["a"][1, 0, 0, 1]]))
    cat = Objective.cat([channel("a", [1]), neuron("a", [2], 0, 0)])
    assert torch.allclose(cat(acts), torch.stack([means[0, 1], acts["a"][1, 2, 0, 0]]))


class _ViewNet(nn.Module):
    """Flattens with ``view``, which a channels-last activation refuses."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 8 * 8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.shape[0], -1))


@pytest.mark.parametrize("objective,augmented", [("channel", False), ("class", False), ("channel", True),
                                                 ("class", True)])
def test_channels_last_input_gives_the_same_prototypes_and_falls_back_for_view(objective: str,
                                                                               augmented: bool) -> None:
    """memory_format='auto' (channels-last on CPU) optimises the same images as 'contiguous' (float rounding
    only); a model that cannot take channels-last input (``view``) runs contiguous after its first forward — also
    when the augmented views were rendered channels-last."""
    torch.manual_seed(0)
    model = _ViewNet().eval()
    obj = channel("conv", [0, 1]) if objective == "channel" else class_logit([0, 1])
    aug = Augment(views=2, seed=1) if augmented else None
    results = {}
    for mode in ("auto", "contiguous"):
        param = PixelParam((3, 8, 8), start=torch.full((3, 8, 8), 0.5), lo=torch.zeros(3), hi=torch.ones(3))
        results[mode] = maximize(model, obj, param, regulariser=l2_penalty(0.01, torch.full((3, 8, 8), 0.5)),
                                 steps=20, memory_format=mode, augment=aug, show_progress=False)
    torch.testing.assert_close(results["auto"].images, results["contiguous"].images, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(results["auto"].activation, results["contiguous"].activation, rtol=1e-4, atol=1e-5)
    assert count_hooks(model) == 0
    with pytest.raises(RuntimeError):  # forced channels-last on this model fails: no silent fallback when asked for
        maximize(model, class_logit([0]), PixelParam((3, 8, 8)), steps=1, memory_format="channels_last",
                 show_progress=False)
