"""Explanation-quality metrics against hand-computed values, loop references and known optima."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from semlens.evaluate.explanations import (
    METRICS,
    MetricInputError,
    aopc,
    complexity,
    continuity,
    make_baseline,
    parameter_layers,
    patch_ranks,
    patch_relevance,
    perturbation_curve,
    pointing_game,
    randomization_check,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    selectivity,
    sparseness,
    spearman,
)
from semlens.explain import attribute
from semlens.layers import count_hooks

# ------------------------------------------------------------------ fixtures: a model that uses only the evidence


def evidence_only_net(size: int = 32) -> nn.Module:
    """logit_c = 0.25 * sum over pixels of relu(x_c - mean(other channels) - 0.5) / 0.5: only saturated
    pure-colour pixels (the evidence squares, 0.25 each) contribute; backgrounds in [0, 0.4] never do."""
    conv = nn.Conv2d(3, 3, 1)
    scale = 0.5 * size * size  # undo the average pool
    with torch.no_grad():
        conv.weight.copy_((torch.eye(3) * 1.5 - 0.5)[:, :, None, None] * scale)
        conv.bias.fill_(-0.5 * scale)
    return nn.Sequential(conv, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())


def evidence_images(n: int = 16, size: int = 32, square: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g) * 0.4
    labels = torch.randint(0, 3, (n,), generator=g)
    tops = torch.randint(0, size - square + 1, (n, 2), generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = ((yy[None] >= tops[:, :1, None]) & (yy[None] < tops[:, :1, None] + square)
            & (xx[None] >= tops[:, 1:, None]) & (xx[None] < tops[:, 1:, None] + square))
    colour = torch.nn.functional.one_hot(labels, 3).float()[:, :, None, None].expand_as(x)
    x = torch.where(mask[:, None], colour, x)
    return x, labels, mask


def gradient(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_(True)
    model(x).gather(1, t[:, None]).sum().backward()
    return x.grad.detach()


class ConstantNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.tensor([1.5, -2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], 2) + 0 * x.sum((1, 2, 3))[:, None]


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 3),
    )


# ------------------------------------------------------------------ the required behaviours


def test_oracle_is_perfect_and_best_on_evidence_only_model():
    model = evidence_only_net()
    x, y, mask = evidence_images()
    oracle = mask[:, None].float().expand_as(x)
    assert torch.allclose(relevance_mass_accuracy(oracle, mask), torch.ones(len(x)))
    assert torch.allclose(relevance_rank_accuracy(oracle, mask), torch.ones(len(x)))
    g = torch.Generator().manual_seed(1)
    candidates = {
        "oracle": oracle,
        "gradient": gradient(model, x, y),
        "gradient-x-input": gradient(model, x, y) * x,
        "random": torch.rand(x.shape, generator=g),
        "inverted-oracle": 1 - oracle,
        **{m: attribute(model, x, y, method=m, low=0.0, high=1.0)
           for m in ("gradient-x-input", "epsilon-plus-flat", "epsilon-alpha2-beta1", "sensitivity")},
    }
    for baseline in ("black", "mean"):
        scores = {k: aopc(model, x, y, a, patch_size=4, baseline=baseline).mean().item() for k, a in candidates.items()}
        best_other = max(v for k, v in scores.items() if k != "oracle")
        assert scores["oracle"] >= best_other - 1e-5, (baseline, scores)
        assert scores["oracle"] > scores["random"] + 0.5 and scores["random"] > scores["inverted-oracle"], scores
    # with a black baseline the logit is 0.25 * remaining evidence pixels: the oracle's drop is greedy-optimal
    curve = perturbation_curve(model, x, y, oracle, patch_size=4, baseline="black")
    assert torch.allclose(curve.scores[:, 0], 0.25 * mask.flatten(1).sum(1).float())
    assert torch.all(curve.scores[:, 1:] <= curve.scores[:, :-1] + 1e-5)  # monotone non-increasing
    lerf = perturbation_curve(model, x, y, oracle, order="lerf", patch_size=4, baseline="black", steps=30)
    assert torch.allclose(lerf.scores, lerf.scores[:, :1].expand_as(lerf.scores))  # 30 of 64 patches hold no evidence


def test_random_attribution_scores_chance():
    g = torch.Generator().manual_seed(0)
    n, s = 400, 32
    x, _, mask = evidence_images(n=n, size=s, square=8, seed=3)
    chance = 64 / (s * s)
    r = torch.rand(n, 3, s, s, generator=g)
    assert abs(relevance_rank_accuracy(r, mask).mean().item() - chance) < 0.01
    assert abs(relevance_mass_accuracy(r, mask).mean().item() - chance) < 0.01
    assert abs(pointing_game(r, mask).mean().item() - chance) < 0.05
    # a constant map: ties are shared, so every example scores chance exactly
    const = torch.ones(n, s, s)
    assert torch.allclose(relevance_rank_accuracy(const, mask), torch.full((n,), chance))
    assert torch.allclose(pointing_game(const, mask), torch.full((n,), chance))


@pytest.mark.parametrize("baseline", ["uniform", "mean", "blur", "black"])
@pytest.mark.parametrize("order", ["morf", "lerf", "random"])
def test_aopc_of_constant_model_is_zero(baseline, order):
    x = torch.rand(5, 3, 16, 16)
    a = torch.randn(5, 3, 16, 16)
    out = aopc(ConstantNet(), x, 1, a, order=order, patch_size=4, baseline=baseline,
               generator=torch.Generator().manual_seed(0))
    assert out.shape == (5,)
    assert torch.equal(out, torch.zeros(5))


# ------------------------------------------------------------------ perturbation engine vs a loop reference


def test_perturbation_curve_matches_loop_reference_float64():
    torch.manual_seed(0)
    model = tiny_cnn().double()
    n, h, w, ps = 3, 10, 9, 4  # ragged grid: 3 x 3 patches, last row/column narrower
    x = torch.rand(n, 3, h, w, dtype=torch.float64)
    a = torch.randn(n, 3, h, w, dtype=torch.float64)
    base = torch.rand(n, 3, h, w, dtype=torch.float64)
    t = torch.tensor([0, 2, 1])
    curve = perturbation_curve(model, x, t, a, patch_size=ps, baseline=base, batch_size=5, steps=9)
    # reference: python loops over images and steps, explicit patch boxes
    ref = np.zeros((n, 10))
    for i in range(n):
        boxes = [(r, c) for r in range(0, h, ps) for c in range(0, w, ps)]
        rel = [a[i, :, r:r + ps, c:c + ps].sum().item() for r, c in boxes]
        order = sorted(range(len(boxes)), key=lambda j: (-rel[j], j))
        xi = x[i].clone()
        ref[i, 0] = model(xi[None])[0, t[i]].item()
        for k, j in enumerate(order, start=1):
            r, c = boxes[j]
            xi[:, r:r + ps, c:c + ps] = base[i, :, r:r + ps, c:c + ps]
            ref[i, k] = model(xi[None])[0, t[i]].item()
    np.testing.assert_allclose(curve.scores.double().numpy(), ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(curve.aopc().numpy(), (ref[:, :1] - ref).mean(1), rtol=1e-5, atol=1e-5)
    assert curve.fraction[-1].item() == 1.0
    # batching does not change anything
    again = perturbation_curve(model, x, t, a, patch_size=ps, baseline=base, batch_size=1000, steps=9)
    assert torch.allclose(curve.scores, again.scores)


def test_patches_per_step_and_aopc_hand_computed():
    class Linear1(nn.Module):  # f(x) = sum of all pixels, one class
        def forward(self, x):
            return x.sum((1, 2, 3))[:, None]

    x = torch.ones(1, 1, 4, 4)
    a = torch.tensor([[4.0, 4, 1, 1], [4, 4, 1, 1], [3, 3, 2, 2], [3, 3, 2, 2]])[None]
    curve = perturbation_curve(Linear1(), x, 0, a, patch_size=2, baseline="black")
    assert curve.scores.tolist() == [[16.0, 12.0, 8.0, 4.0, 0.0]]
    assert curve.aopc().item() == pytest.approx((0 + 4 + 8 + 12 + 16) / 5)
    assert curve.auc().item() == pytest.approx((8 + 12 + 8 + 4 + 0) / 4)
    assert selectivity(Linear1(), x, 0, a, patch_size=2).item() == pytest.approx(8.0)
    two = perturbation_curve(Linear1(), x, 0, a, patch_size=2, baseline="black", patches_per_step=2)
    assert two.scores.tolist() == [[16.0, 8.0, 0.0]]
    assert torch.equal(patch_relevance(a, 2), torch.tensor([[16.0, 4.0, 12.0, 8.0]]))
    assert patch_ranks(patch_relevance(a, 2), "morf").tolist() == [[0, 3, 1, 2]]
    assert patch_ranks(patch_relevance(a, 2), "lerf").tolist() == [[3, 0, 2, 1]]


def test_baselines():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 12, 12, generator=g)
    mean = make_baseline(x, "mean")
    assert torch.allclose(mean[:, :, 5, 7], x.mean((2, 3)))
    const = torch.full((1, 3, 12, 12), 0.3)
    assert torch.allclose(make_baseline(const, "blur", blur_sigma=2.0), const, atol=1e-6)
    blurred = make_baseline(x, "blur", blur_sigma=2.0)
    assert blurred.std() < x.std() and torch.allclose(blurred.mean(), x.mean(), atol=0.02)
    u = make_baseline(x, "uniform", generator=g, low=0.2, high=0.4)
    assert u.min() >= 0.2 and u.max() <= 0.4 and u.shape == x.shape
    assert torch.equal(make_baseline(x, "black"), torch.zeros_like(x))


# ------------------------------------------------------------------ localisation / complexity, hand-computed


def test_localisation_hand_computed():
    # channels sum to [[3, -1], [1, 0]]
    a = torch.tensor([[[2.0, -2], [1, 0]], [[1.0, 1], [0, 0]]])[None]
    mask = torch.tensor([[[1, 1], [0, 0]]])
    assert relevance_mass_accuracy(a, mask).item() == pytest.approx(0.75)  # 3 / (3 + 1); -1 clipped
    assert relevance_mass_accuracy(-a.abs(), mask).item() == 0.0  # no positive relevance at all
    r = torch.tensor([[[4.0, 3], [2, 1]]])
    assert relevance_rank_accuracy(r, torch.tensor([[[1, 0], [1, 0]]])).item() == pytest.approx(0.5)
    ties = torch.tensor([[[1.0, 1], [1, 0]]])
    assert relevance_rank_accuracy(ties, torch.tensor([[[0, 0], [1, 0]]])).item() == pytest.approx(1 / 3)
    assert relevance_rank_accuracy(ties, torch.tensor([[[0, 0], [0, 1]]])).item() == 0.0
    # pointing game with tolerance: max at (0, 0), evidence at (0, 2)
    p = torch.zeros(1, 5, 5)
    p[0, 0, 0] = 1
    m = torch.zeros(1, 5, 5, dtype=torch.bool)
    m[0, 0, 2] = True
    assert pointing_game(p, m).item() == 0.0
    assert pointing_game(p, m, tolerance=1).item() == 0.0
    assert pointing_game(p, m, tolerance=2).item() == 1.0
    # pooling variants
    assert relevance_mass_accuracy(a, mask, pooling="max-norm").item() == pytest.approx((2 + 2) / (2 + 2 + 1))


def test_complexity_hand_computed():
    a = torch.tensor([[[0.0, 0], [0, 1]], [[1.0, 1], [1, 1]], [[1.0, -1], [0, 0]], [[0.0, 0], [0, 0]]])
    assert sparseness(a).tolist() == pytest.approx([0.75, 0.0, 0.5, 0.0])  # [0,0,1,1]: (1 + 3) / (4 * 2)
    assert complexity(a).tolist() == pytest.approx([0.0, math.log(4), math.log(2), math.log(4)])
    # Gini against a float64 reference (mean absolute difference formula)
    v = torch.rand(3, 6, 7, dtype=torch.float64)
    flat = v.flatten(1).numpy()
    ref = [np.abs(f[:, None] - f[None, :]).sum() / (2 * f.size * f.sum()) for f in flat]
    np.testing.assert_allclose(sparseness(v).numpy(), ref, rtol=1e-10)


# ------------------------------------------------------------------ continuity, spearman, randomisation


def test_continuity_hand_computed_translation():
    x = torch.rand(2, 1, 5, 5, dtype=torch.float64)

    def double(m, xx, t):
        return 2 * xx

    out = continuity(ConstantNet().double(), x, 0, double, perturbation="translate", n_perturbations=2,
                     normalize=False)
    shifted_w = torch.cat([x[..., :1], x[..., :-1]], dim=-1)
    shifted_h = torch.cat([x[..., :1, :], x[..., :-1, :]], dim=-2)
    ratios = torch.stack([2 * (s - x).abs().flatten(1).sum(1) / (s - x).flatten(1).norm(dim=1)
                          for s in (shifted_w, shifted_h)])
    assert torch.allclose(out, ratios.amax(0))
    mean = continuity(ConstantNet().double(), x, 0, double, perturbation="translate", n_perturbations=2,
                      normalize=False, reduce="mean")
    assert torch.allclose(mean, ratios.mean(0))
    # an explanation that ignores the input is perfectly continuous
    zero = continuity(ConstantNet(), x.float(), 0, lambda m, xx, t: torch.ones_like(xx),
                      generator=torch.Generator().manual_seed(0))
    assert torch.equal(zero, torch.zeros(2))


def test_spearman_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (4, 30), generator=g).double()
    b = a + torch.randint(0, 3, (4, 30), generator=g).double()
    ref = [spearmanr(a[i].numpy(), b[i].numpy()).statistic for i in range(4)]
    np.testing.assert_allclose(spearman(a, b).numpy(), ref, rtol=1e-10)
    assert spearman(a, torch.ones_like(a)).tolist() == [0.0] * 4


def test_randomization_check_keeps_user_model_and_detects_dependence():
    model = tiny_cnn()
    model.train()
    model[0].weight.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(6, 3, 8, 8)
    res = randomization_check(model, x, torch.zeros(6, dtype=torch.long),
                              {"gradient": gradient, "input": lambda m, xx, t: xx.clone()}, seed=1)
    assert res["gradient"].layers == ["6", "2", "0"] == parameter_layers(model)[::-1]
    assert res["gradient"].correlations.shape == (6, 3)
    assert torch.allclose(res["input"].correlations, torch.ones(6, 3, dtype=torch.float64))  # ignores the model
    assert res["gradient"].score().mean() < 0.9
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and not model[0].weight.requires_grad and model[2].weight.requires_grad
    assert count_hooks(model) == 0
    again = randomization_check(model, x, 0, gradient, seed=1)
    assert torch.allclose(again.correlations, res["gradient"].correlations)  # seeded: reproducible


def test_metric_metadata():
    assert METRICS["aopc_morf"].higher_is_better and not METRICS["aopc_lerf"].higher_is_better
    assert {m.category for m in METRICS.values()} == {
        "localisation", "faithfulness", "robustness", "randomisation", "complexity"}


# ------------------------------------------------------------------ bad input


def test_bad_input_raises_clear_errors():
    x = torch.rand(2, 3, 8, 8)
    a = torch.rand(2, 3, 8, 8)
    mask = torch.ones(2, 8, 8, dtype=torch.bool)
    model = tiny_cnn()
    with pytest.raises(MetricInputError, match="does not match input shape"):
        perturbation_curve(model, x, 0, torch.rand(2, 3, 8, 7))
    with pytest.raises(MetricInputError, match="mask shape"):
        relevance_mass_accuracy(a, torch.ones(2, 4, 4, dtype=torch.bool))
    with pytest.raises(MetricInputError, match=r"empty evidence mask for examples \[1\]"):
        relevance_rank_accuracy(a, torch.stack([mask[0], torch.zeros(8, 8, dtype=torch.bool)]))
    with pytest.raises(MetricInputError, match="only 0 and 1"):
        pointing_game(a, mask.float() * 2)
    nan = a.clone()
    nan[1, 0, 0, 0] = math.nan
    with pytest.raises(MetricInputError, match=r"NaN.*\[1\]"):
        sparseness(nan)
    with pytest.raises(MetricInputError, match="steps=20 exceeds"):
        perturbation_curve(model, x, 0, a, patch_size=4, steps=20)
    with pytest.raises(MetricInputError, match="unknown perturbation baseline"):
        perturbation_curve(model, x, 0, a, baseline="pink")
    with pytest.raises(MetricInputError, match="out of range"):
        perturbation_curve(model, x, 7, a, patch_size=4)
    with pytest.raises(MetricInputError, match="target must be"):
        perturbation_curve(model, x, torch.zeros(3, dtype=torch.long), a, patch_size=4)
    with pytest.raises(KeyError, match="unknown layer"):
        randomization_check(model, x, 0, gradient, layers=["nope"])
    assert count_hooks(model) == 0


def test_curves_share_endpoints_across_orders():
    """Same seed -> same noise: every order starts at f(x) and ends at f(fully perturbed image)."""
    model = tiny_cnn()
    x, a = torch.rand(4, 3, 12, 12), torch.randn(4, 3, 12, 12)
    ends = []
    for order in ("morf", "lerf", "random"):
        c = perturbation_curve(model, x, 1, a, order=order, patch_size=4, generator=torch.Generator().manual_seed(3))
        assert c.steps == 9
        ends.append(c.scores[:, [0, -1]])
    assert torch.allclose(ends[0], ends[1], atol=1e-6) and torch.allclose(ends[0], ends[2], atol=1e-6)
    full = make_baseline(x, "uniform", generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(ends[0][:, 1], model(full)[:, 1], atol=1e-5)
