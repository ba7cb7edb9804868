"""Batched random views (pad, jitter, scale, rotate) for transformation-robust activation maximization.

At step t, V random affine transforms are drawn from a generator seeded with ``(seed, t)`` and shared
by every sample of the batch; the batch (B, C, H, W) becomes (V·B, C, H, W), view-major (row
``v·B + b`` is view v of sample b). Because the draws do not depend on the batch, a sample optimised
alone sees exactly the views it sees in a batch. Defaults suit small (32-64 px) inputs: no resizing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Augment"]


@dataclass
class Augment:
    """V views per step: reflect-pad by ``pad`` px, shift by up to ``jitter`` px, scale by a factor in
    ``scale``, rotate by up to ``rotate`` degrees, crop back to (H, W). ``views=1`` with all ranges zero
    is the identity."""

    views: int = 4
    pad: int = 2
    jitter: int = 2
    scale: tuple[float, float] = (0.95, 1.05)
    rotate: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.views < 1:
            raise ValueError(f"views must be >= 1, got {self.views}")
        if self.pad < 0 or self.jitter < 0 or self.rotate < 0 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError(f"invalid augmentation ranges: {self}")

    def thetas(self, step: int, size: tuple[int, int]) -> Tensor:
        """(V, 2, 3) affine matrices (normalised coordinates) of step ``step`` for padded images of ``size``."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        u = torch.rand(self.views, 4, generator=g, dtype=torch.float64)
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 0]
        a = math.radians(self.rotate) * (2 * u[:, 1] - 1)
        h, w = size
        ty = (2 * u[:, 2] - 1) * self.jitter * 2 / h
        tx = (2 * u[:, 3] - 1) * self.jitter * 2 / w
        cos, sin = torch.cos(a) / s, torch.sin(a) / s
        return torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)

    def __call__(self, x: Tensor, step: int) -> Tensor:
        """(B, C, H, W) -> (V·B, C, H, W) views of step ``step``."""
        b, c, h, w = x.shape
        xp = F.pad(x, (self.pad,) * 4, mode="reflect") if self.pad > 0 else x
        hp, wp = xp.shape[2:]
        theta = self.thetas(step, (hp, wp)).to(x).repeat_interleave(b, dim=0)
        grid = F.affine_grid(theta, [self.views * b, c, hp, wp], align_corners=False)
        out = F.grid_sample(xp.repeat(self.views, 1, 1, 1), grid, mode="bilinear", padding_mode="reflection",
                            align_corners=False)
        return out[:, :, self.pad:self.pad + h, self.pad:self.pad + w]
