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

    def sampling_matrix(self, step: int, size: tuple[int, int]) -> Tensor:
        """Sparse (V·H·W, H·W) bilinear sampling matrix of step ``step``: row v·H·W + i·W + j holds the
        weights of the input pixels that view v's output pixel (i, j) mixes. It is exactly reflect-pad,
        ``grid_sample`` (bilinear, reflection, ``align_corners=False``) and crop, as a linear map."""
        h, w = size
        hp, wp = h + 2 * self.pad, w + 2 * self.pad
        theta = self.thetas(step, (hp, wp))  # (V, 2, 3) float64
        ii, jj = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64),
                                indexing="ij")
        u = (2 * (jj + self.pad) + 1) / wp - 1
        v = (2 * (ii + self.pad) + 1) / hp - 1
        base = torch.stack([u.reshape(-1), v.reshape(-1), torch.ones(h * w, dtype=torch.float64)])  # (3, HW)
        uv = theta @ base  # (V, 2, HW)
        sx = _reflect_clip(((uv[:, 0] + 1) * wp - 1) / 2, wp)
        sy = _reflect_clip(((uv[:, 1] + 1) * hp - 1) / 2, hp)
        x0, y0 = sx.floor(), sy.floor()
        rows, cols, vals = [], [], []
        out_index = torch.arange(self.views * h * w).reshape(self.views, h * w)
        for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
            px, py = x0 + dx, y0 + dy
            wgt = (1 - (sx - px).abs()) * (1 - (sy - py).abs())
            ok = (px <= wp - 1) & (py <= hp - 1) & (wgt > 0)
            ox = _unpad(px.clamp(max=wp - 1).long(), self.pad, w)
            oy = _unpad(py.clamp(max=hp - 1).long(), self.pad, h)
            rows.append(out_index[ok])
            cols.append((oy * w + ox)[ok])
            vals.append(wgt[ok])
        idx = torch.stack([torch.cat(rows), torch.cat(cols)])
        return torch.sparse_coo_tensor(idx, torch.cat(vals), (self.views * h * w, h * w),
                                       check_invariants=False).coalesce()

    def __call__(self, x: Tensor, step: int, channels_last: bool = False) -> Tensor:
        """(B, C, H, W) -> (V·B, C, H, W) views of step ``step`` (one sparse matrix product).

        On CPU the matrix is multiplied in CSR form (MKL's sparse kernel: about twice as fast as COO for a
        64×64 batch of 64 RGB images, forward + backward). ``channels_last``: return the views in channels-last
        memory (the product's natural order, so no extra copy when the model is fed channels-last).
        """
        b, c, h, w = x.shape
        m = self.sampling_matrix(step, (h, w)).to(device=x.device, dtype=x.dtype)
        if x.device.type == "cpu":
            m = _csr(m)
        flat = x.reshape(b * c, h * w).T  # (HW, B·C)
        views = torch.sparse.mm(m, flat).reshape(self.views, h, w, b, c)  # (V·HW, B·C) -> (V, H, W, B, C)
        if channels_last:  # (V, B, H, W, C) in memory = NHWC
            return views.permute(0, 3, 1, 2, 4).reshape(self.views * b, h, w, c).permute(0, 3, 1, 2)
        return views.permute(0, 3, 4, 1, 2).reshape(self.views * b, c, h, w)

    def reference(self, x: Tensor, step: int) -> Tensor:
        """The same views with reflect-pad + ``grid_sample`` + crop (slower on CPU; for tests)."""
        b, c, h, w = x.shape
        xp = F.pad(x, (self.pad,) * 4, mode="reflect") if self.pad > 0 else x
        hp, wp = xp.shape[2:]
        theta = self.thetas(step, (hp, wp)).to(x).repeat_interleave(b, dim=0)
        grid = F.affine_grid(theta, [self.views * b, c, hp, wp], align_corners=False)
        out = F.grid_sample(xp.repeat(self.views, 1, 1, 1), grid, mode="bilinear", padding_mode="reflection",
                            align_corners=False)
        return out[:, :, self.pad:self.pad + h, self.pad:self.pad + w]


def _csr(m: Tensor) -> Tensor:
    """A coalesced COO matrix as CSR (its beta-state warning silenced: the conversion is exact)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
        return m.to_sparse_csr()


def _reflect_clip(coord: Tensor, size: int) -> Tensor:
    """``grid_sample``'s reflection padding (``align_corners=False``): reflect about -0.5 and size-0.5,
    then clip to [0, size-1]."""
    span = 2 * size
    c = (coord + 0.5).abs() % span
    c = torch.where(c > size, span - c, c) - 0.5
    return c.clamp(0, size - 1)


def _unpad(p: Tensor, pad: int, size: int) -> Tensor:
    """Index into a reflect-padded axis -> index into the original axis (``F.pad(mode="reflect")``)."""
    q = (p - pad).abs()
    return torch.where(q > size - 1, 2 * (size - 1) - q, q)
