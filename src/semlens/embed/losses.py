"""Loss terms of the Sparse Reconstruction Autoencoder (Qi, Khorram & Li, arXiv 1709.05360).

``L = α_pred L_faith + α_rec L_SR + α_PT L_PT``; shapes: ``N`` samples, ``d`` layer width, ``k`` x-features.
"""

from __future__ import annotations

import torch

__all__ = ["faithfulness_loss", "log_penalty_reconstruction", "pull_away", "PULL_AWAY_VARIANTS",
           "RECONSTRUCTION_VARIANTS"]

#: ``"features"``: cos² between the columns of S (x-feature bases, ``PT_inverse=0``; what the paper's text
#: describes: near-orthogonal x-features). ``"images"``: cos² between the rows of S (samples of a batch;
#: ``PT_inverse=1``, the reference driver's default).
PULL_AWAY_VARIANTS = ("features", "images")
#: ``"dimension"``: batch mean inside the log, one term per dimension (reference ``logpenaltyFC``);
#: ``"element"``: ``mean(log(1 + q (Ẑ - Z)²))`` over every element.
RECONSTRUCTION_VARIANTS = ("dimension", "element")


def faithfulness_loss(y_hat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the head's prediction and the DNN's score(s), same shape ``(N, ...)``."""
    return ((y_hat - y) ** 2).mean()


def log_penalty_reconstruction(z_hat: torch.Tensor, z: torch.Tensor, q: float = 100.0,
                               variant: str = "dimension") -> torch.Tensor:
    """Sparse (log-penalty) reconstruction loss, ``z``/``z_hat`` ``(N, d)`` (standardised units).

    ``"dimension"``: ``(1/d) Σ_j log(1 + q · mean_n (ẑ_nj − z_nj)²)`` — a dimension with a large error costs only
    about ``log(q · err)``, so the decoder may give up on part of the layer. ``"element"``:
    ``mean_{n,j} log(1 + q (ẑ_nj − z_nj)²)``.
    """
    if variant == "dimension":
        return torch.log1p(q * ((z_hat - z) ** 2).mean(0)).mean()
    if variant == "element":
        return torch.log1p(q * (z_hat - z) ** 2).mean()
    raise ValueError(f"unknown reconstruction variant {variant!r}; use one of {RECONSTRUCTION_VARIANTS}")


def pull_away(s: torch.Tensor, along: str = "features", eps: float = 1e-8) -> torch.Tensor:
    """Pull-away term (EBGAN) on the weighted x-features ``s = x ⊙ w``.

    ``s``: ``(N, k)``, or ``(N, k, m)`` for ``m`` outputs (the mean over outputs is returned).
    ``along="features"``: ``1/(k(k−1)) Σ_{a≠b} cos²(s_:a, s_:b)`` (columns); ``along="images"``:
    ``1/(N(N−1)) Σ_{n≠m} cos²(s_n:, s_m:)`` (rows). Vectors are divided by ``‖·‖ + eps`` (an all-zero vector has
    cosine 0 with everything instead of NaN). Returns 0 when there are fewer than two vectors.
    """
    if along not in PULL_AWAY_VARIANTS:
        raise ValueError(f"unknown pull-away variant {along!r}; use one of {PULL_AWAY_VARIANTS}")
    if s.ndim == 2:
        s = s.unsqueeze(-1)
    v = s.permute(2, 1, 0) if along == "features" else s.permute(2, 0, 1)  # (m, vectors, length)
    n = v.shape[1]
    if n < 2:
        return s.sum() * 0.0
    u = v / (v.norm(dim=2, keepdim=True) + eps)
    cos = u @ u.transpose(1, 2)
    off = (cos ** 2).sum((1, 2)) - (torch.diagonal(cos, dim1=1, dim2=2) ** 2).sum(1)
    return (off / (n * (n - 1))).mean()
