"""Statistics shared by the jobs: ROC AUC, rank correlation, bootstrap intervals, paired tests over seeds and
linear probes. One home, so that the selectivity of named neurons, the explanation metrics, the method ranking
and the experiments' verdicts are computed the same way everywhere.

* :func:`auc`: ROC AUC per column by the Mann–Whitney U statistic with average ranks (ties count half);
* :func:`average_ranks`, :func:`spearman`: Spearman's ρ per row (Pearson correlation of average ranks);
* :func:`bootstrap_means`: paired percentile bootstrap of per-example means (Efron & Tibshirani 1993);
* :func:`mean_std`, :func:`paired_gap`: summaries over seeds and the paired t test of their differences;
* :func:`linear_probe`: accuracy of a logistic regression on frozen features (Alain & Bengio 2016).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["auc", "average_ranks", "spearman", "bootstrap_means", "mean_std", "paired_gap", "linear_probe"]


def auc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ROC AUC of ``scores`` (N, M) separating ``labels`` (N, M) bool, per column (M,); ties count half.

    NaN where a column has no positive or no negative. Mann-Whitney U via average ranks (vectorized).
    """
    scores = scores.double()
    N = scores.shape[0]
    order = scores.argsort(0)
    sorted_s = scores.gather(0, order)
    ranks_sorted = torch.arange(1, N + 1, dtype=torch.float64, device=scores.device)[:, None].expand_as(scores)
    # average ranks of ties: group equal consecutive values
    new_group = torch.ones_like(sorted_s, dtype=torch.bool)
    new_group[1:] = sorted_s[1:] != sorted_s[:-1]
    gid = new_group.long().cumsum(0) - 1  # (N, M)
    sums = torch.zeros_like(sorted_s).scatter_add_(0, gid, ranks_sorted)
    cnts = torch.zeros_like(sorted_s).scatter_add_(0, gid, torch.ones_like(sorted_s))
    avg = (sums / cnts.clamp(min=1)).gather(0, gid)
    ranks = torch.empty_like(avg).scatter_(0, order, avg)
    pos = labels.bool()
    n1 = pos.sum(0).double()
    n0 = N - n1
    u = (ranks * pos).sum(0) - n1 * (n1 + 1) / 2
    out = u / (n1 * n0)
    return torch.where((n1 > 0) & (n0 > 0), out, torch.full_like(out, float("nan")))


def average_ranks(v: torch.Tensor) -> torch.Tensor:
    """1-based ranks along dim 1 of ``v: (N, M)`` with ties given their average rank (as ``scipy.stats.rankdata``)."""
    n, m = v.shape
    sorted_v, order = v.sort(dim=1, stable=True)
    pos = torch.arange(m, device=v.device).expand(n, m)
    starts = torch.ones(n, m, dtype=torch.bool, device=v.device)
    starts[:, 1:] = sorted_v[:, 1:] != sorted_v[:, :-1]
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    first = torch.where(starts, pos, 0).cummax(1).values
    last = torch.where(ends, pos, m).flip(1).cummin(1).values.flip(1)
    avg = (first + last).to(torch.float64) / 2 + 1
    ranks = torch.empty_like(avg)
    ranks.scatter_(1, order, avg)
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per row of ``a, b: (N, ...)`` -> ``(N,)`` float64 (average ranks for ties).

    Rows where either side is constant have no defined correlation and score 0. Shapes must match.
    """
    if a.shape != b.shape:
        raise ValueError(f"cannot correlate shapes {tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = average_ranks(a.flatten(1)), average_ranks(b.flatten(1))
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    den = (ra.square().sum(1) * rb.square().sum(1)).sqrt()
    return torch.where(den > 0, (ra * rb).sum(1) / den.clamp_min(1e-300), torch.zeros_like(den))


def bootstrap_means(values: torch.Tensor, n_boot: int = 1000, seed: int = 0,
                    level: float = 0.95) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Paired bootstrap of per-example scores ``values: (M, N)`` (NaN = missing, ignored).

    Returns ``(mean (M,), lo (M,), hi (M,), boot (M, n_boot))``: the plain means, the percentile interval
    at ``level`` and the resampled means (the same resampled example indices for every row).
    """
    values = values.to(torch.float64)
    m, n = values.shape
    valid = ~torch.isnan(values)
    filled = torch.where(valid, values, torch.zeros_like(values))
    mean = filled.sum(1) / valid.sum(1)
    idx = torch.randint(0, n, (n_boot, n), generator=torch.Generator().manual_seed(seed))
    ones = torch.ones(n_boot, n, dtype=torch.float64)
    counts = torch.zeros(n_boot, n, dtype=torch.float64).scatter_add_(1, idx, ones)  # resample multiplicities
    boot = (counts @ filled.T) / (counts @ valid.T.to(torch.float64))  # (n_boot, M)
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    lo, hi = torch.nanquantile(boot, q, dim=0)
    return mean, lo, hi, boot.T


def mean_std(values: Sequence[float | None]) -> dict[str, float]:
    """Mean, sample standard deviation (ddof 1; 0 for one value) and count of the values that are not None/NaN."""
    arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=np.float64)
    if arr.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if arr.size > 1 else 0.0, "n": int(arr.size)}


def paired_gap(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Paired comparison of per-seed values ``b`` − ``a`` (same seeds, same order): mean and std of the
    differences, the paired t statistic with its two-sided p-value (NaN for < 2 seeds or zero spread), and
    the number of seeds where ``b`` > ``a``."""
    if len(a) != len(b) or not a:
        raise ValueError(f"need equally many (>= 1) values per model; got {len(a)} and {len(b)}")
    from scipy import stats

    d = np.asarray(b, dtype=np.float64) - np.asarray(a, dtype=np.float64)
    n = d.size
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    t = p = float("nan")
    if n > 1 and sd > 0:
        t = float(d.mean() / (sd / math.sqrt(n)))
        p = float(2 * stats.t.sf(abs(t), df=n - 1))
    return {"mean_diff": float(d.mean()), "std_diff": sd, "n": n, "t": t, "p_two_sided": p,
            "wins": int((d > 0).sum())}


def linear_probe(x_train: torch.Tensor, y_train: Sequence[int] | torch.Tensor, x_test: torch.Tensor,
                 y_test: Sequence[int] | torch.Tensor, C: float = 1.0, seed: int = 0) -> float:
    """Accuracy of a multinomial logistic regression on standardized frozen features (N, D)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=2000, random_state=seed))
    clf.fit(np.asarray(x_train, dtype=np.float64), np.asarray(y_train))
    return float(clf.score(np.asarray(x_test, dtype=np.float64), np.asarray(y_test)))
