"""The interpretive (topic) loss of Dong et al. 2017 (Dong et al. 2017).

    L = mean_k ( λ ‖f(v̄_k) − s_k‖²  −  Σ_t log p(y_t | y_<t, x_k) )

with ``v̄_k`` the temporal mean of the encoder states over the valid frames of video ``k`` and ``s_k``
its LDA topic distribution. LSTM-B is ``λ = 0``; LSTM-I is ``λ > 0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from semlens.models.captioner import PAD

__all__ = ["InterpretiveLoss", "caption_nll", "topic_loss"]


def caption_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-caption negative log-likelihood (B,): sum over non-PAD positions of −log p(y_t).

    logits: (B, L, V); targets: (B, L) int64 with PAD = 0 at padded positions (ignored).
    """
    if logits.shape[:2] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} disagree")
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=PAD, reduction="none")  # (B, L)
    return nll.sum(1)


def topic_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """‖f(v̄) − s‖² per video (B,). pred, target: (B, K) topic distributions."""
    if pred.shape != target.shape:
        raise ValueError(f"topic prediction {tuple(pred.shape)} and target {tuple(target.shape)} disagree")
    return ((pred - target) ** 2).sum(-1)


class InterpretiveLoss(nn.Module):
    """Caption NLL plus ``lam`` × topic loss, averaged over the batch; returns (total, parts dict).

    ``lam = 0`` gives the LSTM-B objective (the topic term is still reported, without gradient).
    """

    def __init__(self, lam: float = 1.0):
        super().__init__()
        if lam < 0:
            raise ValueError(f"lam must be >= 0; got {lam}")
        self.lam = float(lam)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, topic_pred: torch.Tensor,
                topic_target: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        nll = caption_nll(logits, targets).mean()
        n_words = int((targets != PAD).sum().clamp(min=1))
        parts = {"nll": float(nll.detach()), "nll_per_word": float(nll.detach()) * targets.shape[0] / n_words,
                 "topic": float("nan")}
        if topic_target is None:
            if self.lam > 0:
                raise ValueError("the interpretive loss (lam > 0) needs topic targets")
            return nll, parts
        lt = topic_loss(topic_pred, topic_target).mean()
        parts["topic"] = float(lt.detach())
        return (nll + self.lam * lt if self.lam > 0 else nll), parts
