"""Loss terms of the Sparse Reconstruction Autoencoder (Qi, Khorram & Li, arXiv 1709.05360).

``L = α_pred L_faith + α_rec L_SR + α_PT L_PT``; shapes: ``N`` samples, ``d`` layer width, ``k`` x-features.
"""

from __future__ import annotations

import torch

__all__ = ["faithfulness_loss", "log_penalty_reconstruction", "pull_away", "pull_away_vectors", "PULL_AWAY_VARIANTS",
           "RECONSTRUCTION_VARIANTS", "SILENCE"]

#: ``"correlation"`` (default): 1 − (1 − ρ²)·h_a·h_b between the columns of S, with ρ the Pearson correlation of the
#: centred columns and ``h`` a column's share of the contribution variance (a silent column counts as fully
#: redundant, not as orthogonal); see :func:`pull_away`. ``"features"``: cos² between the raw columns of S (x-feature
#: bases, ``PT_inverse=0``; what the paper's text describes). ``"images"``: cos² between the rows of S (samples of a
#: batch; ``PT_inverse=1``, the reference driver's default).
PULL_AWAY_VARIANTS = ("correlation", "features", "images")
#: ``τ`` of the ``"correlation"`` pull-away: a column whose variance is a small share ``p`` of the total contribution
#: variance is silent to the degree ``τ² / (p + τ²)`` (0.5 at ``p = τ²`` = 0.25 %).
SILENCE = 0.05
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


def pull_away_vectors(v: torch.Tensor, centred: bool = False, silence: float = 0.0,
                      eps: float = 1e-8) -> torch.Tensor:
    """Mean pairwise redundancy of ``n`` vectors, ``v`` ``(B, n, length)`` → ``(B,)``; 0 when ``n < 2``.

    ``silence = 0``: ``1/(n(n−1)) Σ_{a≠b} cos²(v_a, v_b)`` with ``v / (‖v‖ + eps)`` (the EBGAN pull-away; an all-zero
    vector has cosine 0 with everything). ``silence = τ > 0``: the redundancy of a pair is
    ``1 − h_a h_b (1 − cos²_ab)`` with ``h_a = ‖v_a‖² / (‖v_a‖² + τ² Σ_c ‖v_c‖² + eps)``: a vector that is a negligible
    share of the total counts as redundant with every other (1 for a silent one), a healthy pair costs its cos².
    ``centred``: vectors centred first (cos = Pearson correlation).
    """
    n = v.shape[1]
    if n < 2:
        return v.sum((1, 2)) * 0.0
    if centred:
        v = v - v.mean(2, keepdim=True)
    if silence > 0:
        n2 = (v * v).sum(2)
        u = v / (n2 + eps * eps).sqrt().unsqueeze(-1)
        cos2 = (u @ u.transpose(1, 2)) ** 2
        h = n2 / (n2 + silence ** 2 * n2.sum(1, keepdim=True) + eps)
        r = 1 - h.unsqueeze(2) * h.unsqueeze(1) * (1 - cos2)
    else:
        u = v / (v.norm(dim=2, keepdim=True) + eps)
        r = (u @ u.transpose(1, 2)) ** 2
    off = r.sum((1, 2)) - torch.diagonal(r, dim1=1, dim2=2).sum(1)
    return off / (n * (n - 1))


def pull_away(s: torch.Tensor, along: str = "correlation", eps: float = 1e-8) -> torch.Tensor:
    """Pull-away term (EBGAN) on the weighted x-features ``s = x ⊙ w``.

    ``s``: ``(N, k)``, or ``(N, k, m)`` for ``m`` outputs (the mean over outputs is returned).
    ``along="features"``: ``1/(k(k−1)) Σ_{a≠b} cos²(s_:a, s_:b)`` (columns); ``along="images"``:
    ``1/(N(N−1)) Σ_{n≠m} cos²(s_n:, s_m:)`` (rows). Vectors are divided by ``‖·‖ + eps`` (an all-zero vector has
    cosine 0 with everything instead of NaN). ``along="correlation"``: the columns, centred (Pearson ρ), pair cost
    ``1 − (1 − ρ²_ab) h_a h_b`` with ``h`` the share weight of :func:`pull_away_vectors` (``τ =`` :data:`SILENCE`), so
    an x-feature that contributes nothing is fully redundant instead of orthogonal. Returns 0 when there are fewer
    than two vectors.
    """
    if along not in PULL_AWAY_VARIANTS:
        raise ValueError(f"unknown pull-away variant {along!r}; use one of {PULL_AWAY_VARIANTS}")
    if s.ndim == 2:
        s = s.unsqueeze(-1)
    v = s.permute(2, 0, 1) if along == "images" else s.permute(2, 1, 0)  # (m, vectors, length)
    corr = along == "correlation"
    return pull_away_vectors(v, centred=corr, silence=SILENCE if corr else 0.0, eps=eps).mean()
