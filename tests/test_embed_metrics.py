"""Embedding metrics: conventional definitions against textbook formulas, streaming = whole-split values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from semlens.embed import SRAE, collect_activations
from semlens.embed.baselines import PCAEmbedding
from semlens.embed.evaluate import concept_recovery, evaluate_embedding
from semlens.embed.metrics import FVE, R2, ContributionStats, Firing, effective_number


def test_fve_matches_textbook_formula_when_streamed():
    g = np.random.default_rng(0)
    z = g.normal(size=(50, 4)) * [1, 2, 3, 4] + [5, -1, 0, 2]
    z_hat = z + g.normal(size=z.shape) * 0.7
    textbook = 1 - ((z - z_hat) ** 2).sum() / ((z - z.mean(0)) ** 2).sum()
    f = FVE()
    for s in (slice(0, 7), slice(7, 30), slice(30, 50)):
        f.update(torch.tensor(z[s]), torch.tensor(z_hat[s]))
    assert f.value() == pytest.approx(textbook, rel=1e-9)


def test_r2_and_firing_and_contribution_stats():
    y = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    r = R2()
    r.update(y[:2] + 0.5, y[:2])
    r.update(y[2:] - 0.5, y[2:])
    assert float(r.value()[0]) == pytest.approx(1 - 1.0 / 5.0)
    f = Firing()
    f.update(torch.tensor([[[1.0, 0.0, 0.0]], [[2.0, 3.0, 0.0]]]))
    f.update(torch.tensor([[[0.0, 1.0, 0.0]]]))
    v = f.value()
    assert v["l0"] == pytest.approx(4 / 3) and v["dead"] == 1.0  # feature 2 never fires over the split
    c = torch.tensor([[1.0, 2.0], [2.0, 4.0], [3.0, 5.0]]).unsqueeze(1)  # (N, 1, k)
    s = ContributionStats()
    s.update(c[:1])
    s.update(c[1:])
    out = s.value()
    rho = float(np.corrcoef(c[:, 0].numpy().T)[0, 1])
    assert float(out["orthogonality"][0]) == pytest.approx(1 - abs(rho), abs=1e-6)
    p = np.array([2.0, 11 / 3]) / (2 + 11 / 3)
    assert float(out["compactness"][0]) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert float(effective_number(torch.tensor([1.0, 1.0, 1.0, -2.0]))) == pytest.approx(3.0)


def test_evaluate_embedding_streams_and_concept_recovery_on_planted_masks():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.rand(60, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    labels = net(x).argmax(1).detach()
    store = collect_activations(net, "1", torch.utils.data.TensorDataset(x, labels), batch_size=16)
    emb = PCAEmbedding(k=3, target="all").fit(store)
    out = evaluate_embedding(net, "1", emb, torch.utils.data.TensorDataset(x, labels), batch_size=7)
    whole = evaluate_embedding(net, "1", emb, torch.utils.data.TensorDataset(x, labels), batch_size=60)
    for key in ("r2", "fve", "l0", "orthogonality", "compactness", "agreement", "replaced_accuracy"):
        assert out[key] == pytest.approx(whole[key], rel=1e-5, abs=1e-6), key
    assert out["model_accuracy"] == 1.0 and out["n"] == 60
    z = store.z
    fve = 1 - ((z - emb.reconstruct(torch.tensor(z))[:, 0].numpy()) ** 2).sum() / ((z - z.mean(0)) ** 2).sum()
    assert out["fve"] == pytest.approx(float(fve), rel=1e-4)
    # concept masks: left half = concept 1, right half = concept 2; black right halves: Excitation Backprop sends no
    # relevance to zero pixels, so every live map lies entirely on concept 1
    xb = x.clone()
    xb[..., 3:] = 0
    pix = torch.zeros(60, 6, 6, dtype=torch.int64)
    pix[:, :, :3], pix[:, :, 3:] = 1, 2
    c = int(labels[0])
    rec = concept_recovery(net, "1", emb, xb, labels, {"object": pix}, {c: [2, 1]}, 3, per_class=4,
                           method="excitation-backprop")
    rows = [r for r in rec["rows"] if r["class"] == c]
    assert len(rows) == 3
    live = [r for r in rows if r["mass_accuracy"] > 0]
    assert live and all(r["concept"] == 1 and r["mass_accuracy"] == pytest.approx(1.0, abs=1e-5) for r in live)
    assert rec["per_class"][c]["recovered"] == 1  # concept 1 matched with mass 1, concept 2 with mass 0
    assert rec["per_class"][c]["matched"][2][1] == pytest.approx(0.0, abs=1e-6)
    assert 0.0 <= rec["distinctness"] <= 1.0


def test_srae_metrics_unfitted_and_width_errors():
    emb = SRAE(k=2)
    with pytest.raises(RuntimeError, match="not fitted"):
        emb.contributions(torch.zeros(3, 4))
