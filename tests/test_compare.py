"""The comparison runner: ranking, bootstrap intervals, outputs, and state hygiene."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from torch import nn

from semlens.evaluate.compare import CompareConfig, bootstrap_means, compare_methods
from semlens.evaluate.explanations import MetricInputError
from semlens.layers import count_hooks
from semlens.report import Report


class EvidenceOnlyNet(nn.Module):
    """Only saturated pure-colour pixels (the evidence squares) contribute to the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.detect = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.detect.weight.copy_((torch.eye(3) * 1.5 - 0.5)[:, :, None, None])
            self.detect.bias.fill_(-0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.detect(x)).sum((2, 3))


def data(n: int = 24, size: int = 32, square: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g) * 0.4
    y = torch.randint(0, 3, (n,), generator=g)
    tops = torch.randint(0, size - square + 1, (n, 2), generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    mask = ((yy[None] >= tops[:, :1, None]) & (yy[None] < tops[:, :1, None] + square)
            & (xx[None] >= tops[:, 1:, None]) & (xx[None] < tops[:, 1:, None] + square))
    colour = torch.nn.functional.one_hot(y, 3).float()[:, :, None, None].expand_as(x)
    return torch.where(mask[:, None], colour, x), y, mask


def oracle(model, x, t):  # the evidence, read off the image itself (pure saturated colour)
    return ((x.amax(1) == 1) & (x.amin(1) == 0)).float()[:, None].expand_as(x).clone()


def gradient(model, x, t):
    x = x.detach().clone().requires_grad_(True)
    model(x).gather(1, t[:, None]).sum().backward()
    return x.grad.detach()


def test_runner_ranks_oracle_first_and_writes_outputs(tmp_path):
    torch.manual_seed(0)
    model = EvidenceOnlyNet()
    model.train()
    x, y, mask = data()
    cfg = CompareConfig(patch_size=4, steps=40, batch_size=10, n_boot=200, continuity_perturbations=2,
                        baseline="mean")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = compare_methods(model, x, y, {"oracle": oracle, "gradient": gradient, "random": lambda m, xx, t:
                                        torch.rand(xx.shape, generator=torch.Generator().manual_seed(1))},
                          masks=mask, config=cfg)
    # state hygiene
    assert model.training and all(p.requires_grad for p in model.parameters()) and count_hooks(model) == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert res.correct.all()
    rows = res.table()
    assert rows[0]["method"] == "oracle"
    assert rows[0]["relevance_mass_accuracy"] == pytest.approx(1.0)
    assert rows[0]["relevance_mass_accuracy_lo"] == pytest.approx(1.0)
    by = {r["method"]: r for r in rows}
    assert abs(by["random"]["relevance_rank_accuracy"] - 64 / 1024) < 0.03
    assert by["oracle"]["aopc_morf"] > by["random"]["aopc_morf"] > 0
    assert by["oracle"]["aopc_lerf"] == pytest.approx(0.0, abs=1e-5)  # the background never matters
    assert by["oracle"]["randomization_spearman"] == pytest.approx(1.0)  # the oracle ignores the model
    for r in rows:
        for m in res.metrics:
            assert r[f"{m}_lo"] - 1e-9 <= r[m] <= r[f"{m}_hi"] + 1e-9
    # aopc_morf_minus_random is exactly the difference to the shared random-order curve
    rand_aopc = (res.random_curve[:, :1] - res.random_curve).mean(1)
    assert torch.allclose(res.scores["oracle"]["aopc_morf_minus_random"],
                          res.scores["oracle"]["aopc_morf"] - rand_aopc.double(), atol=1e-5)
    assert res.curves["gradient"]["morf"].shape == (24, 41) and res.fraction.shape == (41,)
    margins = res.margins()
    assert margins["relevance_mass_accuracy"]["best"] == "oracle"
    # the noise row is a reference: shown last, never ranked, never "best" (it would win the randomisation check)
    assert rows[-1]["method"] == "random" and rows[-1]["rank"] == "ref" and rows[-1]["mean_rank"] is None
    assert all("random" not in (mg["best"], mg["runner_up"]) for mg in margins.values())
    assert margins["relevance_mass_accuracy"]["p_best_ahead"] > 0.95
    paths = res.write(tmp_path)
    with open(paths["csv"]) as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == [r["method"] for r in rows]
    saved = json.loads(paths["json"].read_text())
    assert saved["config"]["patch_size"] == 4 and saved["table"][0]["method"] == "oracle"
    assert paths["png"].stat().st_size > 1000
    report = Report()
    for sec in res.sections():
        report.add(sec)
    html = report.write(tmp_path / "r.html").read_text()
    assert "oracle" in html and "data:image/png;base64" in html


def test_bootstrap_matches_loop_reference():
    g = torch.Generator().manual_seed(3)
    v = torch.rand(3, 40, generator=g, dtype=torch.float64)
    v[1, 5] = float("nan")
    mean, lo, hi, boot = bootstrap_means(v, n_boot=300, seed=7)
    idx = torch.randint(0, 40, (300, 40), generator=torch.Generator().manual_seed(7)).numpy()
    arr = v.numpy()
    ref = np.stack([[np.nanmean(arr[i, row]) for row in idx] for i in range(3)])
    np.testing.assert_allclose(boot.numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(mean.numpy(), np.nanmean(arr, 1), rtol=1e-12)
    np.testing.assert_allclose(lo.numpy(), np.quantile(ref, 0.025, axis=1), rtol=1e-12)
    np.testing.assert_allclose(hi.numpy(), np.quantile(ref, 0.975, axis=1), rtol=1e-12)


def test_runner_bad_input():
    model = EvidenceOnlyNet()
    x, y, mask = data(n=4)
    with pytest.raises(MetricInputError, match="need evidence masks"):
        compare_methods(model, x, y, {"o": oracle}, config=CompareConfig(metrics=("pointing_game",)))
    with pytest.raises(MetricInputError, match="unknown metric"):
        CompareConfig(metrics=("accuracy",))
    with pytest.raises(MetricInputError, match="masks of shape"):
        compare_methods(model, x, y, {"o": oracle}, masks=mask[:, :8])
    with pytest.raises(MetricInputError, match="targets must be"):
        compare_methods(model, x, y[:2], {"o": oracle}, masks=mask)
    with pytest.raises(MetricInputError, match="no explanation methods"):
        compare_methods(model, x, y, {}, masks=mask)
    # without masks the default metric set simply leaves localisation out
    res = compare_methods(model, x, y, {"o": oracle}, config=CompareConfig(patch_size=8, n_boot=10,
                                                                             continuity_perturbations=1))
    assert "relevance_mass_accuracy" not in res.metrics and "aopc_morf" in res.metrics


def test_runner_with_semlens_explain_methods():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    x, y, mask = data(n=8, size=16, square=6)
    with pytest.raises(MetricInputError, match="unknown explanation method"):
        compare_methods(model, x, y, ["gradient", "lrp-magic"], masks=mask)
    cfg = CompareConfig(patch_size=4, n_boot=50, continuity_perturbations=1, batch_size=8)
    res = compare_methods(model, x, y, ["gradient", "epsilon-plus-flat", "random"], masks=mask, config=cfg)
    assert [r["method"] for r in res.table()] != [] and set(res.methods) == {"gradient", "epsilon-plus-flat", "random"}
    assert res.randomization_layers == ["7", "3", "0"]
    # the noise reference ignores the model entirely: rank correlation 0 in expectation, explanations unrelated
    assert abs(res.scores["random"]["randomization_spearman"].mean().item()) < 0.1
    assert count_hooks(model) == 0 and all(p.requires_grad for p in model.parameters())
    for method in res.methods:
        for metric in res.metrics:
            assert res.scores[method][metric].shape == (8,)
