"""Batched MLPs: ``T`` independent copies of one architecture trained side by side (one per explained class).

Parameters are stacked along a leading dimension ``T``; a :class:`BatchedLinear` maps ``(T, N, in)`` to
``(T, N, out)`` with one ``baddbmm``. Adam and weight decay act elementwise, so training the sum of the ``T`` losses
gives exactly the updates of ``T`` separate trainings.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["BatchedLinear", "SRAENet", "default_hidden"]


class BatchedLinear(nn.Module):
    """``T`` linear maps: weight ``(T, in, out)``, bias ``(T, 1, out)``; input ``(T, N, in)`` or ``(N, in)``."""

    def __init__(self, copies: int, n_in: int, n_out: int, generator: torch.Generator | None = None) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(max(n_in, 1))
        w = (torch.rand(copies, n_in, n_out, generator=generator) * 2 - 1) * bound
        b = (torch.rand(copies, 1, n_out, generator=generator) * 2 - 1) * bound
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 2:
            x = x.unsqueeze(0).expand(self.weight.shape[0], -1, -1)
        return torch.baddbmm(self.bias, x, self.weight)

    def linear(self, t: int) -> nn.Linear:
        """Copy ``t`` as an ``nn.Linear`` (``(N, in) -> (N, out)``)."""
        w, b = self.weight[t].detach(), self.bias[t, 0].detach()
        lin = nn.Linear(w.shape[0], w.shape[1])
        with torch.no_grad():
            lin.weight.copy_(w.T)
            lin.bias.copy_(b)
        return lin


def default_hidden(d: int, k: int) -> tuple[int, int]:
    """Hidden widths ``(h1, h2)``: the reference ``(800, 100)`` for wide layers, scaled down for narrow ones."""
    return min(800, max(4 * k, d)), min(100, max(4 * k, d // 4, 8))


class SRAENet(nn.Module):
    """``T`` SRAEs (the encoder/decoder of Qi et al.) on standardised activations ``z`` ``(N, d)``.

    encoder ``d→h1`` ReLU, dropout, ``h1→h2`` ReLU, ``h2→k`` ReLU → x ``(T, N, k)`` (non-negative x-features);
    head ``k→m`` (linear, ``m`` outputs) → ŷ ``(T, N, m)``; decoder ``k→h2`` ReLU, ``h2→h1`` ReLU, ``h1→d`` (no final
    ReLU: standardised ``z`` is signed) → ẑ ``(T, N, d)``.
    """

    def __init__(self, copies: int, d: int, k: int, n_out: int, hidden: tuple[int, int], dropout: float = 0.02,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        h1, h2 = hidden
        g = generator
        self.enc = nn.ModuleList([BatchedLinear(copies, d, h1, g), BatchedLinear(copies, h1, h2, g),
                                  BatchedLinear(copies, h2, k, g)])
        self.dec = nn.ModuleList([BatchedLinear(copies, k, h2, g), BatchedLinear(copies, h2, h1, g),
                                  BatchedLinear(copies, h1, d, g)])
        self.head = BatchedLinear(copies, k, n_out, g)
        self.dropout = nn.Dropout(dropout)

    @property
    def copies(self) -> int:
        return int(self.head.weight.shape[0])

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        h = self.dropout(torch.relu(self.enc[0](z)))
        h = torch.relu(self.enc[1](h))
        return torch.relu(self.enc[2](h))

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.dec[0](x))
        h = torch.relu(self.dec[1](h))
        return self.dec[2](h)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.encode(z)
        return x, self.head(x), self.decode(x)

    def subset(self, idx: list[int]) -> SRAENet:
        """A new net holding copies ``idx`` (parameters cloned)."""
        import copy

        net = copy.deepcopy(self)
        with torch.no_grad():
            for p_new, p_old in zip(net.parameters(), self.parameters(), strict=True):
                p_new.data = p_old.data[idx].clone()
        return net

    def assign(self, idx: list[int], other: SRAENet) -> None:
        """Overwrite copies ``idx`` with ``other``'s copies (``len(idx)`` of them, in order)."""
        with torch.no_grad():
            for p, q in zip(self.parameters(), other.parameters(), strict=True):
                p.data[idx] = q.data.to(p.dtype)
