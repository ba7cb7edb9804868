"""A planted dictionary for testing embeddings: ``Z = S·D + noise`` with a decision ``y = wᵀS`` on a few atoms."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PlantedDictionary", "planted_dictionary", "matched_correlation"]


@dataclass
class PlantedDictionary:
    """``z`` ``(N, d)``, ``y`` ``(N, 1)``, sources ``s`` ``(N, m)`` (sparse, non-negative), atoms ``d_atoms``
    ``(m, d)``, decision weights ``w`` ``(m,)`` (zero outside ``decision``)."""

    z: torch.Tensor
    y: torch.Tensor
    s: torch.Tensor
    atoms: torch.Tensor
    w: torch.Tensor
    decision: list[int]


def planted_dictionary(n: int = 2000, d: int = 24, m: int = 6, decision: tuple[int, ...] = (0, 1, 2),
                       active: float = 0.35, noise: float = 0.05, seed: int = 0) -> PlantedDictionary:
    """Sources: each atom active with probability ``active``, amplitude Exp(1); unit-norm random atoms."""
    g = torch.Generator().manual_seed(seed)
    on = torch.rand(n, m, generator=g) < active
    s = torch.empty(n, m).exponential_(1.0, generator=g) * on
    atoms = torch.randn(m, d, generator=g)
    atoms = atoms / atoms.norm(dim=1, keepdim=True)
    z = s @ atoms + noise * torch.randn(n, d, generator=g)
    w = torch.zeros(m)
    w[list(decision)] = torch.linspace(1.0, 0.6, len(decision))
    return PlantedDictionary(z, (s @ w)[:, None], s, atoms, w, list(decision))


def matched_correlation(x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of each column of ``s`` ``(N, a)`` with its Hungarian-matched column of ``x`` ``(N, k)``.

    Works for ``k != a`` (unmatched sources get 0). Returns ``(a,)``.
    """
    from scipy.optimize import linear_sum_assignment

    xc, sc = x - x.mean(0), s - s.mean(0)
    den = xc.norm(dim=0)[:, None] * sc.norm(dim=0)[None, :]
    corr = (xc.T @ sc) / den.clamp(min=1e-12)  # (k, a)
    rows, cols = linear_sum_assignment(-corr.numpy())
    out = torch.zeros(s.shape[1])
    out[torch.as_tensor(cols)] = corr[torch.as_tensor(rows), torch.as_tensor(cols)]
    return out
