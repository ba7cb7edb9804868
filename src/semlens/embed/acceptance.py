"""The SRAE's automatic acceptance test (Qi, Khorram & Li, arXiv 1709.05360)."""

from __future__ import annotations

import torch

__all__ = ["accept", "REC_FACTOR", "PT_FACTOR"]

#: on rejection α_rec is multiplied by REC_FACTOR and α_PT by PT_FACTOR before retraining
REC_FACTOR = 1.2
PT_FACTOR = 0.8


def accept(mean_contribution: torch.Tensor, min_positive: int = 2, ratio: float = 0.3) -> torch.Tensor:
    """Acceptance of each embedding from its mean contributions ``mean(w_i x_i)``.

    ``mean_contribution``: ``(..., k)``. Sorted in decreasing order, an embedding is accepted when at least
    ``min_positive`` entries are > 0 and (second largest) / (largest) >= ``ratio``. Returns ``(...)`` bool.
    """
    top = mean_contribution.sort(dim=-1, descending=True).values
    positive = (top > 0).sum(-1) >= min_positive
    if top.shape[-1] < 2:
        return positive & (min_positive <= 1)
    first, second = top[..., 0], top[..., 1]
    good_ratio = second >= ratio * first
    return positive & good_ratio & (first > 0)
