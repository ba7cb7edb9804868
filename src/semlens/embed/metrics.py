"""Metrics of explanation embeddings, accumulated batch by batch over a whole held-out split.

Conventional definitions (every one a streaming accumulator with ``update(...)`` and ``value()``):

* :class:`FVE` — fraction of variance explained ``1 − Σ‖z − ẑ‖² / Σ‖z − z̄‖²`` (``z̄`` the split mean, sums over
  samples and dimensions).
* :class:`R2` — ``1 − Σ(ŷ − y)² / Σ(y − ȳ)²`` per output column.
* :class:`Firing` — L0 (mean number of non-zero x-features per sample) and dead x-features (never non-zero on the
  whole split, not on one batch).
* :class:`ContributionStats` — orthogonality ``1 − mean_{a≠b} |ρ(w_a x_a, w_b x_b)|`` and compactness
  ``exp(H(p))``, ``p_i = mean(w_i x_i)⁺ / Σ_j mean(w_j x_j)⁺`` (effective number of x-features).
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["FVE", "R2", "Firing", "ContributionStats", "effective_number", "orthogonality_from_corr"]


class FVE:
    """Fraction of variance explained, streamed. ``update(z (B, d), z_hat (B, d))``."""

    def __init__(self) -> None:
        self.n = 0
        self.sse = 0.0
        self.s: torch.Tensor | None = None
        self.ss: torch.Tensor | None = None

    def update(self, z: torch.Tensor, z_hat: torch.Tensor) -> None:
        z, z_hat = z.double(), z_hat.double()
        self.sse += float(((z - z_hat) ** 2).sum())
        s, ss = z.sum(0), (z * z).sum(0)
        self.s = s if self.s is None else self.s + s
        self.ss = ss if self.ss is None else self.ss + ss
        self.n += z.shape[0]

    def value(self) -> float:
        if self.n == 0 or self.s is None or self.ss is None:
            return float("nan")
        sst = float((self.ss - self.s ** 2 / self.n).sum())
        return 1.0 - self.sse / sst if sst > 0 else float("nan")


class R2:
    """Coefficient of determination per column, streamed. ``update(y_hat (B, m), y (B, m))``; ``value() (m,)``."""

    def __init__(self) -> None:
        self.n = 0
        self.sse: torch.Tensor | float = 0.0
        self.s: torch.Tensor | float = 0.0
        self.ss: torch.Tensor | float = 0.0

    def update(self, y_hat: torch.Tensor, y: torch.Tensor) -> None:
        y_hat, y = y_hat.double(), y.double()
        self.sse = self.sse + ((y_hat - y) ** 2).sum(0)
        self.s = self.s + y.sum(0)
        self.ss = self.ss + (y * y).sum(0)
        self.n += y.shape[0]

    def value(self) -> torch.Tensor:
        sst = torch.as_tensor(self.ss) - torch.as_tensor(self.s) ** 2 / max(self.n, 1)
        return (1 - torch.as_tensor(self.sse) / sst.clamp(min=1e-300)).float()


class Firing:
    """L0 and dead x-features over a split. ``update(x (B, G, k))``."""

    def __init__(self) -> None:
        self.n = 0
        self.active: torch.Tensor | float = 0.0
        self.fired: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        nz = x != 0
        self.active = self.active + nz.sum(0).double()
        self.fired = nz.any(0) if self.fired is None else self.fired | nz.any(0)
        self.n += x.shape[0]

    def value(self) -> dict[str, Any]:
        assert self.fired is not None, "no batch seen"
        per_group = torch.as_tensor(self.active).sum(-1) / self.n  # (G,)
        dead = (~self.fired).sum(-1)  # (G,)
        return {"l0": float(per_group.mean()), "dead": float(dead.float().mean()), "dead_per_group": dead.tolist()}


def orthogonality_from_corr(corr: torch.Tensor) -> torch.Tensor:
    """``1 − mean_{a≠b} |ρ_ab|`` for correlation matrices ``(..., k, k)``."""
    k = corr.shape[-1]
    if k < 2:
        return torch.ones(corr.shape[:-2])
    off = corr.abs().sum((-1, -2)) - torch.diagonal(corr, dim1=-2, dim2=-1).abs().sum(-1)
    return 1 - off / (k * (k - 1))


def effective_number(mean_contribution: torch.Tensor) -> torch.Tensor:
    """``exp(H(p))`` with ``p = mean⁺ / Σ mean⁺`` along the last dim; 0 when no contribution is positive."""
    pos = mean_contribution.clamp(min=0)
    total = pos.sum(-1, keepdim=True)
    p = pos / torch.where(total > 0, total, torch.ones_like(total))
    h = -torch.xlogy(p, p).sum(-1)
    return torch.where(total[..., 0] > 0, torch.exp(h), torch.zeros_like(h))


class ContributionStats:
    """Mean contributions, orthogonality and compactness of ``c = w_i x_i`` ``(B, C_e, k)``, streamed."""

    def __init__(self) -> None:
        self.n = 0
        self.s: torch.Tensor | float = 0.0
        self.cc: torch.Tensor | float = 0.0

    def update(self, c: torch.Tensor) -> None:
        c = c.double()
        self.s = self.s + c.sum(0)
        self.cc = self.cc + torch.einsum("bci,bcj->cij", c, c)
        self.n += c.shape[0]

    def value(self) -> dict[str, Any]:
        mean = torch.as_tensor(self.s) / self.n  # (C_e, k)
        cov = torch.as_tensor(self.cc) / self.n - mean.unsqueeze(-1) * mean.unsqueeze(-2)
        sd = torch.diagonal(cov, dim1=-2, dim2=-1).clamp(min=0).sqrt()
        den = sd.unsqueeze(-1) * sd.unsqueeze(-2)
        corr = torch.where(den > 1e-12, cov / den.clamp(min=1e-300), torch.zeros_like(cov))
        return {
            "mean_contribution": mean.float(),
            "orthogonality": orthogonality_from_corr(corr).float(),
            "compactness": effective_number(mean).float(),
        }


def nanmean(values: list[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return sum(vals) / len(vals) if vals else float("nan")
