"""Parameterisations: how the optimised tensor ``p`` (one row per sample) becomes images x = render(p).

* :class:`PixelParam`: x = p (optionally projected into a box after each step);
* :class:`FourierParam`: p = complex spectrum of colour-decorrelated channels, scaled by the data's
  amplitude spectrum (or 1/f), x = squash(colour(irfft2(p * amplitude)));
* :class:`MacoParam`: phase-only (Fel et al. 2023): magnitude fixed to the data's, p = phase;
* :class:`CodeParam`: p = z, a generator's code, x = g(z); z clipped to ±clip·σ after each step.

Every render is per-sample (sample b of x depends on row b of p only) and seeded per sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from semlens.maximize.stats import ImageStats

__all__ = ["Parameterisation", "PixelParam", "FourierParam", "MacoParam", "CodeParam", "seeded_normal"]


def seeded_normal(seeds: Sequence[int] | Tensor, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> Tensor:
    """(B, *shape) standard normal draws, row b drawn from a generator seeded with ``seeds[b]`` (so a
    sample's start does not depend on the rest of the batch)."""
    rows = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64)
            for s in torch.as_tensor(seeds).reshape(-1).tolist()]
    return torch.stack(rows).to(dtype)


class Parameterisation:
    """Base: ``init(seeds) -> p`` (a leaf tensor), ``render(p) -> x`` (B, C, H, W), ``project(p)`` in place."""

    #: the input shape (C, H, W) rendered
    shape: tuple[int, int, int]
    #: multiplies the optimiser's learning rate, so that one ``lr`` suits every parameterisation
    lr_scale: float = 1.0

    def init(self, seeds: Sequence[int] | Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        raise NotImplementedError

    def render(self, p: Tensor) -> Tensor:
        raise NotImplementedError

    def project(self, p: Tensor) -> None:
        """Called under ``no_grad`` after every optimiser step (default: nothing)."""

    def code(self, p: Tensor) -> Tensor | None:
        """The latent code, for code-space priors (None for image parameterisations)."""
        return None


class PixelParam(Parameterisation):
    """x = p. Starts at ``start`` ((C, H, W) or (B, C, H, W); default zeros) plus ``noise`` · N(0, 1);
    ``lo``/``hi`` ((C,) per channel) project x into the box after every step when given."""

    def __init__(self, shape: Sequence[int], start: Tensor | None = None, noise: float = 0.01,
                 lo: Tensor | None = None, hi: Tensor | None = None) -> None:
        self.shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
        self.start, self.noise, self.lo, self.hi = start, noise, lo, hi

    def init(self, seeds: Sequence[int] | Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        p = seeded_normal(seeds, self.shape, dtype) * self.noise
        if self.start is not None:
            p = p + self.start.to(dtype)
        return p.requires_grad_(True)

    def render(self, p: Tensor) -> Tensor:
        return p

    def project(self, p: Tensor) -> None:
        if self.lo is not None and self.hi is not None:
            p.copy_(torch.maximum(torch.minimum(p, self.hi.to(p)[:, None, None]), self.lo.to(p)[:, None, None]))


def _freq_radius(h: int, w: int) -> Tensor:
    fy = torch.fft.fftfreq(h)[:, None]
    fx = torch.fft.rfftfreq(w)[None, :]
    return (fy ** 2 + fx ** 2).sqrt()


class FourierParam(Parameterisation):
    """Spectrum parameterisation of colour-decorrelated channels with the data's amplitude spectrum.

    p: (B, C, H, W//2+1, 2) real/imaginary parts. ``spectrum="data"`` scales coefficient (c, u, v)
    by the data's mean amplitude ``stats.amplitude``; ``spectrum="1/f"`` by 1/max(f, 1/size)^decay
    normalised to the same total energy. The image is ``stats.squash(stats.colour(irfft2(...)))``,
    i.e. colours mixed with the data's colour covariance and mapped smoothly into the data's range.
    """

    lr_scale = 4.0  # measured: at lr 0.05 spectrum coefficients move 4-10x too slowly on the concept world

    def __init__(self, stats: ImageStats, spectrum: str = "data", decay: float = 1.0, init_scale: float = 0.05) -> None:
        self.stats, self.shape, self.init_scale = stats, stats.shape, init_scale
        c, h, w = self.shape
        if spectrum == "data":
            scale = stats.amplitude
        elif spectrum == "1/f":
            base = 1.0 / _freq_radius(h, w).clamp_min(1.0 / max(h, w)) ** decay
            scale = base.expand(c, -1, -1) * (stats.amplitude.norm() / (base.norm() * math.sqrt(c)))
        else:
            raise ValueError(f"unknown spectrum {spectrum!r}: use 'data' or '1/f'")
        self.scale = scale.clone()

    def init(self, seeds: Sequence[int] | Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        c, h, w = self.shape
        return (seeded_normal(seeds, (c, h, w // 2 + 1, 2), dtype) * self.init_scale).requires_grad_(True)

    def render(self, p: Tensor) -> Tensor:
        spec = torch.view_as_complex(p.contiguous()) * self.scale.to(p)
        z = torch.fft.irfft2(spec, s=self.shape[1:], norm="ortho")
        return self.stats.squash(self.stats.colour(z))


class MacoParam(Parameterisation):
    """Phase-only spectrum (MaCo): the magnitude is the data's amplitude spectrum, p (B, C, H, W//2+1)
    is the phase; each decorrelated channel is standardised to zero mean and unit variance before the
    colour mixing and squash (so only the spatial structure is free)."""

    lr_scale = 4.0  # phases in radians

    def __init__(self, stats: ImageStats) -> None:
        self.stats, self.shape = stats, stats.shape

    def init(self, seeds: Sequence[int] | Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        c, h, w = self.shape
        return (seeded_normal(seeds, (c, h, w // 2 + 1), dtype) * math.pi).requires_grad_(True)

    def render(self, p: Tensor) -> Tensor:
        mag = self.stats.amplitude.to(p)
        spec = torch.polar(mag.expand_as(p), p)
        z = torch.fft.irfft2(spec, s=self.shape[1:], norm="ortho")
        z = (z - z.mean(dim=(2, 3), keepdim=True)) / z.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        return self.stats.squash(self.stats.colour(z))


class CodeParam(Parameterisation):
    """x = generator(z), z (B, code_dim) from N(0, init_std²); z clipped to ±``clip`` after every step
    (the code prior is N(0, I), so σ = 1)."""

    #: a code coordinate spans ±3 (σ = 1) where a pixel spans [0, 1]: at the pixels' step size (lr 0.05) codes did
    #: not leave the decoder's mean image in 96–192 steps (concept world, 32 units: median activation ratio 0.00,
    #: concept hit rate 0.38; at 10× 0.07 and 0.56)
    lr_scale = 10.0

    def __init__(self, generator: nn.Module, code_dim: int, shape: Sequence[int], clip: float = 3.0,
                 init_std: float = 0.1) -> None:
        self.generator, self.code_dim, self.clip, self.init_std = generator, int(code_dim), clip, init_std
        self.shape = tuple(int(s) for s in shape)  # type: ignore[assignment]

    def init(self, seeds: Sequence[int] | Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        return (seeded_normal(seeds, (self.code_dim,), dtype) * self.init_std).requires_grad_(True)

    def render(self, p: Tensor) -> Tensor:
        x = self.generator(p)
        return x.reshape(p.shape[0], *self.shape)

    def project(self, p: Tensor) -> None:
        if self.clip is not None and self.clip > 0:
            p.clamp_(-self.clip, self.clip)

    def code(self, p: Tensor) -> Tensor:
        return p
