"""Image statistics estimated from the user's data: mean image, value range, colour covariance and
the amplitude spectrum of the colour-decorrelated channels (used by the Fourier parameterisations)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["ImageStats", "fit_image_stats", "channel_means_differ"]


@dataclass
class ImageStats:
    """Statistics of N images (N, C, H, W) in the model's input space.

    mean: (C, H, W) mean image; channel_mean, channel_std, lo, hi: (C,) per-channel mean, std,
    min and max; colour_sqrt / colour_isqrt: (C, C) symmetric square root of the colour covariance
    and its inverse; amplitude: (C, H, W//2+1) mean |rfft2| (``norm="ortho"``) of the
    colour-whitened, mean-centred images (so white noise with this spectrum has the data's spectrum).
    """

    mean: Tensor
    channel_mean: Tensor
    channel_std: Tensor
    lo: Tensor
    hi: Tensor
    colour_sqrt: Tensor
    colour_isqrt: Tensor
    amplitude: Tensor

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.mean.shape)  # type: ignore[return-value]

    def state(self) -> dict[str, Tensor]:
        """Tensors to store in a prior file (key prefix ``stats.``)."""
        return {f"stats.{k}": getattr(self, k) for k in self.__dataclass_fields__}

    @classmethod
    def from_state(cls, state: dict[str, Tensor]) -> ImageStats:
        return cls(**{k: state[f"stats.{k}"].float() for k in cls.__dataclass_fields__})

    def whiten(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> colour-whitened, channel-centred images."""
        centred = x - self.channel_mean.to(x)[:, None, None]
        return torch.einsum("dc,bchw->bdhw", self.colour_isqrt.to(x), centred)

    def colour(self, z: Tensor) -> Tensor:
        """Inverse of :meth:`whiten`: decorrelated (B, C, H, W) -> input-space colours."""
        out = torch.einsum("dc,bchw->bdhw", self.colour_sqrt.to(z), z)
        return out + self.channel_mean.to(z)[:, None, None]

    def squash(self, x: Tensor) -> Tensor:
        """Map any values smoothly into [lo, hi] per channel (slope 1 at the range's centre)."""
        mid = ((self.hi + self.lo) / 2).to(x)[:, None, None]
        half = ((self.hi - self.lo) / 2).clamp_min(1e-6).to(x)[:, None, None]
        return mid + half * torch.tanh((x - mid) / half)


def _sqrt_pair(cov: Tensor) -> tuple[Tensor, Tensor]:
    vals, vecs = torch.linalg.eigh(cov.double())
    vals = vals.clamp_min(vals.max() * 1e-6 + 1e-12)
    sqrt = (vecs * vals.sqrt()) @ vecs.T
    isqrt = (vecs / vals.sqrt()) @ vecs.T
    return sqrt.float(), isqrt.float()


def fit_image_stats(images: Tensor, batch_size: int = 512) -> ImageStats:
    """Estimate :class:`ImageStats` from ``images`` (N, C, H, W) float (streamed in batches)."""
    if images.dim() != 4 or images.shape[0] < 2:
        raise ValueError(f"need at least 2 images of shape (N, C, H, W), got {tuple(images.shape)}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError("the images contain NaN or infinite values")
    x = images.double()
    n, c = x.shape[:2]
    mean = x.mean(dim=0)
    pixels = x.transpose(0, 1).reshape(c, -1)
    channel_mean = pixels.mean(dim=1)
    cov = torch.cov(pixels) if c > 1 else pixels.var().reshape(1, 1)
    sqrt, isqrt = _sqrt_pair(cov)
    stats = ImageStats(mean.float(), channel_mean.float(), pixels.std(dim=1).float(), pixels.min(dim=1).values.float(),
                       pixels.max(dim=1).values.float(), sqrt, isqrt, torch.zeros(0))
    amp = torch.zeros(c, x.shape[2], x.shape[3] // 2 + 1, dtype=torch.float64)
    for s in range(0, n, batch_size):
        w = stats.whiten(images[s:s + batch_size].float()).double()  # DC kept: image brightness varies
        amp += torch.fft.rfft2(w, norm="ortho").abs().sum(dim=0)
    stats.amplitude = (amp / n).float()
    return stats


def channel_means_differ(mean_a: Tensor, std_a: Tensor, mean_b: Tensor, std_b: Tensor) -> bool:
    """Whether two data sets' per-channel statistics (C,) tell of other data or another normalisation: a channel
    mean further than half the larger standard deviation (at least 1e-3) from the other's. The rule by which a
    prior or a judge fitted on other data is refused."""
    gap = (mean_a.float() - mean_b.float()).abs()
    tol = 0.5 * torch.maximum(std_a.float(), std_b.float()).clamp_min(1e-3)
    return bool((gap > tol).any())
