"""Exact streaming quantile: lazy top-k with a running lower bound, exact against numpy in every order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from semlens.units.quantile import ExactTopQuantile, _prefilter


def _stream(x: torch.Tensor, q: float, chunk: int) -> ExactTopQuantile:
    est = ExactTopQuantile(x.shape[0], x.shape[1], q)
    bounds = []
    for part in x.split(chunk, dim=1):
        est.update(part)
        bounds.append(est.lower_bound.clone())
    kth = x.double().sort(dim=1, descending=True).values[:, est.k - 1]
    for b in bounds:  # the running bound never exceeds the final k-th largest value
        assert (b.double() <= kth).all()
    return est


@pytest.mark.parametrize("order", ["random", "ascending", "descending"])
@pytest.mark.parametrize("q", [0.005, 0.05, 0.4])
def test_streamed_quantile_equals_numpy_in_any_order(order, q):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 20000, generator=g)
    x[1] = 0.0  # all tied
    x[2, :15000] = 3.0  # a tie at the top
    x[3] *= 1e-3
    if order == "ascending":
        x = x.sort(dim=1).values
    elif order == "descending":
        x = x.sort(dim=1, descending=True).values
    ref = torch.from_numpy(np.quantile(x.double().numpy(), 1 - q, axis=1))
    for chunk in (997, 20000):
        est = _stream(x, q, chunk)
        torch.testing.assert_close(est.result().double(), ref, rtol=1e-6, atol=0)
        kept = est.values.double().sort(dim=1, descending=True).values
        torch.testing.assert_close(kept, x.double().sort(dim=1, descending=True).values[:, :est.k], rtol=0, atol=0)


def test_update_takes_transposed_activation_views():
    g = torch.Generator().manual_seed(2)
    acts = torch.randn(10, 4, 5, 5, generator=g)  # (B, C, h, w)
    est = ExactTopQuantile(4, 10 * 25, 0.05)
    for part in acts.split(3):
        est.update(part.transpose(0, 1))  # (C, B, h, w) view, not contiguous
    values = acts.transpose(0, 1).reshape(4, -1).double().numpy()
    np.testing.assert_allclose(est.result().numpy(), np.quantile(values, 0.95, axis=1), rtol=1e-6)


def test_merge_and_state_round_trip_equal_one_stream():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 9000, generator=g)
    one = _stream(x, 0.01, 1000)
    a, b = ExactTopQuantile(3, 9000, 0.01), ExactTopQuantile(3, 9000, 0.01)
    for part in x[:, :4000].split(700, 1):
        a.update(part)
    for part in x[:, 4000:].split(700, 1):
        b.update(part)
    resumed = ExactTopQuantile(3, 9000, 0.01)
    resumed.load_state_dict(a.state_dict())
    resumed.merge(b.values)
    assert torch.equal(resumed.result(), one.result())


def test_prefilter_keeps_every_rows_k_largest_even_when_the_sample_misleads():
    n, k = 48000, 5000
    stride = n // 4096
    x = torch.zeros(3, n)
    x[0, ::stride] = 5.0  # the sample sees only large values, fewer than k exist: the row is kept whole
    x[1] = torch.arange(n, dtype=torch.float32)
    x[1, ::stride] = -1.0  # the sample sees only small values: its level is too low, many are kept
    x[2] = torch.linspace(-1, 1, n)
    packed = _prefilter(x, k)
    assert packed.shape[1] < n or bool((x[0] == 5.0).sum() < k)
    assert torch.equal(packed.topk(k, dim=1).values, x.topk(k, dim=1).values)


@pytest.mark.parametrize("rising", [False, True], ids=["exchangeable", "rising"])
@pytest.mark.parametrize("q", [0.005, 0.05, 0.5])
def test_fused_buffer_feeding_equals_numpy_and_survives_checkpoints(q, rising):
    """Batches fed by the fused scan into the estimator's top-k buffer (rows cut many times, inside the kernel
    too when every batch beats the last), with a state round trip and a tensor update in between, give numpy's
    quantile exactly; the guess stays ≥ the bound."""
    from semlens.units import dissect_kernels as K

    g = torch.Generator().manual_seed(int(q * 1000))
    batches = [torch.randn(4, 3, 6, 5, generator=g).round(decimals=2) + (3 * i if rising else 0) for i in range(7)]
    total = sum(b.shape[0] * 30 for b in batches)
    est = ExactTopQuantile(3, total, q)
    for i, b in enumerate(batches):
        if i == 3:  # a checkpoint: leaves buffer mode; a resumed estimator continues from the saved values
            state = est.state_dict()
            est = ExactTopQuantile(3, total, q)
            est.load_state_dict(state)
            est._seen = 3 * 4 * 30  # what a resumed run has seen (the dissection's count of values)
        if i == 5:
            est.update(b.transpose(0, 1))  # the tensor path in between
            continue
        bound = est.lower_bound.clone()
        guess = est.likely_bound()
        assert bool((guess >= bound).all())
        sample = b[::2].transpose(0, 1).reshape(3, -1) if i == 0 else None  # a sampled first level, verified
        est.feed(lambda top, b=b: K.scan(b, None, top), b.shape[0] * 30, sample=sample)
    ref = np.quantile(torch.cat(batches).transpose(0, 1).reshape(3, -1).double().numpy(), 1 - q, axis=1)
    assert np.allclose(est.result().numpy(), ref.astype(np.float32), rtol=0, atol=1e-6)
    assert est.values.shape == (3, est.k)


def test_estimators_fed_with_each_others_floors_fold_to_numpys_quantile():
    """Two workers' estimators, each dropping what the other's bound already excludes (rows then hold fewer than
    k values), fold to the exact quantile of all batches."""
    from semlens.units import dissect_kernels as K
    from semlens.units.dissect_passes import _fold_state

    g = torch.Generator().manual_seed(11)
    batches = [torch.randn(5, 4, 6, 6, generator=g).round(decimals=2) + 3.0 * (i % 2 == 0) for i in range(10)]
    total = sum(b.shape[0] * 36 for b in batches)
    workers = [ExactTopQuantile(4, total, 0.02) for _ in range(2)]
    floor = None
    for i, b in enumerate(batches):
        est = workers[i % 2]
        sample = b[::2].transpose(0, 1).reshape(4, -1) if est.seen == 0 else None
        est.feed(lambda top, b=b: K.scan(b, None, top), b.shape[0] * 36, sample=sample, floor=floor)
        low = est.lower_bound.numpy()
        floor = low if floor is None else np.maximum(floor, low)
    short = [w.values.shape[1] < w.k or bool((w.values == float("-inf")).any()) for w in workers]
    assert short == [False, True]  # the floor from the high batches left the other worker's rows short
    folded = ExactTopQuantile(4, total, 0.02)
    folded.load_state_dict(_fold_state(workers))
    ref = np.quantile(torch.cat(batches).transpose(0, 1).reshape(4, -1).double().numpy(), 0.98, axis=1)
    assert np.allclose(folded.result().numpy(), ref.astype(np.float32), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["exact", "sketch"])
def test_both_estimators_share_one_interface_for_folding_and_merging(kind):
    from semlens.units.quantile import HistogramQuantileSketch

    make = ExactTopQuantile if kind == "exact" else HistogramQuantileSketch
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 2000, generator=g)
    whole, a, b = make(3, 2000, 0.02), make(3, 2000, 0.02), make(3, 2000, 0.02)
    whole.update(x)
    a.update(x[:, :1200])
    b.update(x[:, 1200:])
    folded = make(3, 2000, 0.02)
    folded.load_state_dict(type(a).fold_state([a, b]))
    folded.merge_across_processes()  # one process: nothing to merge
    assert folded.exact == (kind == "exact") and (folded.lower_bound is None) == (kind == "sketch")
    assert torch.equal(folded.result(), whole.result())
    a.load_state_dict(a.cleared_state())
    a.update(x)
    assert torch.equal(a.result(), whole.result())
