"""Prediction-difference maximization and selectivity (semlens.captioning.naming)."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from semlens.captioning.naming import (
    LinearTopicMap,
    auc,
    contains_topic,
    name_neurons,
    prediction_difference,
    topic_selectivity,
)


def hand_made_f():
    """K=3 topics, D=7 neurons: neurons 0,1 -> topic 0; 2,3 -> topic 1; 4,5 -> topic 2; neuron 6 unused."""
    carry = [0, 0, 1, 1, 2, 2]
    W = torch.zeros(3, 7, dtype=torch.float64)
    for j, t in enumerate(carry):
        W[t, j] = 2.0 + 0.5 * j
    b = torch.tensor([0.1, -0.2, 0.0], dtype=torch.float64)
    return (lambda v: torch.softmax(v.double() @ W.T + b, -1)), carry


def reference_delta(f, vbar, fill):
    """Plain float64 loop over neurons (the oracle)."""
    vbar = vbar.double()
    P = f(vbar)
    out = []
    for j in range(vbar.shape[1]):
        vb = vbar.clone()
        vb[:, j] = fill[j]
        out.append((P - f(vb)).mean(0))
    return torch.stack(out)


def test_pdm_names_the_neuron_it_was_built_for():
    f, carry = hand_made_f()
    g = torch.Generator().manual_seed(0)
    vbar = torch.rand(50, 7, generator=g, dtype=torch.float64) * 0.5 + 0.5  # positive activations
    res = name_neurons(f, vbar, topic_names=["dog", "girl", "dance"])
    assert res.topic[:6].tolist() == carry
    assert res.topic[6].item() == -1  # a neuron f ignores gets no topic
    assert res.neurons_of(0) == [1, 0]  # neuron 1 has the larger weight, so the larger drop
    assert {r["neuron"] for r in res.table()} == set(range(6))
    assert [r["n_neurons"] for r in res.topic_table()] == [2, 2, 2]


@pytest.mark.parametrize("chunk", [1, 3, None])
def test_pdm_matches_loop_reference(chunk):
    torch.manual_seed(1)
    mlp = torch.nn.Sequential(torch.nn.Linear(9, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()

    def f(v):
        return torch.softmax(mlp(v.double()), -1)

    vbar = torch.randn(23, 9, dtype=torch.float64)
    got = prediction_difference(f, vbar, chunk=chunk)
    torch.testing.assert_close(got.double(), reference_delta(f, vbar, torch.zeros(9)).float().double(),
                               atol=1e-6, rtol=0)
    got_mean = prediction_difference(f, vbar, removal="mean", chunk=chunk)
    torch.testing.assert_close(got_mean.double(), reference_delta(f, vbar, vbar.mean(0)).float().double(),
                               atol=1e-6, rtol=0)
    # marginalizing over a reference whose rows are all equal is removal by that value
    ref = vbar.mean(0, keepdim=True).expand(5, -1)
    got_marg = prediction_difference(f, vbar, removal="marginal", reference=ref, n_samples=4, chunk=chunk)
    torch.testing.assert_close(got_marg, got_mean, atol=1e-6, rtol=0)


def test_pdm_bad_input():
    f, _ = hand_made_f()
    with pytest.raises(ValueError, match="NaN"):
        prediction_difference(f, torch.tensor([[float("nan")] * 7]))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        prediction_difference(f, torch.zeros(7))
    with pytest.raises(ValueError, match="unknown removal"):
        prediction_difference(f, torch.zeros(2, 7), removal="drop")


def test_auc_matches_sklearn_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40, 3), generator=g).double()  # many ties
    labels = torch.rand(40, 3, generator=g) > 0.6
    got = auc(scores, labels)
    for m in range(3):
        assert got[m].item() == pytest.approx(roc_auc_score(labels[:, m].numpy(), scores[:, m].numpy()))
    assert torch.isnan(auc(scores[:, :1], torch.zeros(40, 1, dtype=torch.bool))).all()


def test_selectivity_of_a_perfect_and_a_random_neuron():
    f, carry = hand_made_f()
    g = torch.Generator().manual_seed(0)
    N = 200
    s = torch.softmax(torch.randn(N, 3, generator=g) * 3, -1)
    has = contains_topic(s)
    vbar = torch.rand(N, 7, generator=g, dtype=torch.float64)
    vbar[:, 0] = has[:, 0].double() - 0.5 * (~has[:, 0]).double()  # topic-0 neuron: +1 with topic, -0.5 without
    vbar[:, 1] = -has[:, 0].double()  # negative coding is oriented, not penalized
    res = name_neurons(f, torch.rand(N, 7, generator=g, dtype=torch.float64) + 0.5)
    sel = topic_selectivity(res, vbar, s, vbar, s)
    assert sel["auc_per_topic"][0] == pytest.approx(1.0)
    assert 0.35 < sel["auc_per_topic"][1] < 0.65 and 0.35 < sel["auc_per_topic"][2] < 0.65
    assert sel["n_named"] == 6 and sel["n_topics_scored"] == 3


@pytest.mark.parametrize("softmax", [True, False])
@pytest.mark.parametrize("removal", ["zero", "mean", "marginal"])
def test_closed_form_equals_masking_for_a_linear_map(softmax, removal):
    g = torch.Generator().manual_seed(3)
    W = torch.randn(5, 11, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    f = LinearTopicMap(W, b, softmax=softmax)
    vbar = torch.randn(37, 11, generator=g, dtype=torch.float64)
    ref = torch.randn(20, 11, generator=g, dtype=torch.float64)
    kw = {"removal": removal, "reference": ref, "n_samples": 6, "seed": 2}
    closed = prediction_difference(f, vbar, method="closed", chunk=4, **kw)
    masked = prediction_difference(f, vbar, method="masking", **kw)
    torch.testing.assert_close(closed, masked, atol=1e-6, rtol=0)
    assert prediction_difference(f, vbar, **kw).equal(closed)  # "auto" picks the closed form
    # independent oracle: the plain float64 loop (zero / mean removal)
    if removal != "marginal":
        fill = torch.zeros(11, dtype=torch.float64) if removal == "zero" else ref.mean(0)
        torch.testing.assert_close(closed.double(), reference_delta(f, vbar, fill), atol=1e-6, rtol=0)


def test_closed_form_recognises_nn_linear_and_checks_its_input():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 3).double()
    vbar = torch.randn(9, 6, dtype=torch.float64)
    got = prediction_difference(layer, vbar, method="closed")
    with torch.no_grad():
        want = prediction_difference(lambda v: layer(v), vbar, method="masking")
        # affine f: Δ[j, t] = W[t, j] · mean_k v̄_kj, by hand
        by_hand = (layer.weight.T * vbar.mean(0)[:, None]).float()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got, by_hand, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="expects 6 neurons"):
        prediction_difference(layer, torch.randn(9, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="method='closed' needs"):
        prediction_difference(lambda v: v, vbar, method="closed")
    with pytest.raises(ValueError, match="unknown method"):
        prediction_difference(layer, vbar, method="fast")
    with pytest.raises(ValueError, match=r"weight must be \(K, D\)"):
        LinearTopicMap(torch.zeros(3))
