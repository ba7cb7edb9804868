"""Small generators trained on the user's data, for activation maximization in code space.

* :class:`ConvDecoder` (``arch="conv-bn"``, the default, or ``arch="conv"``): z (B, d) -> image (B, C, H, W):
  a linear map to a (4w, ⌈H/8⌉, ⌈W/8⌉) grid, then three nearest-neighbour ×2 upsamplings each followed by a
  3×3 conv, the output squashed into the data's per-channel range [lo, hi] with a sigmoid; ``conv-bn`` puts a
  batch normalisation on the grid and after each hidden conv (as DCGAN's generator). Without it, the GAN
  collapsed on the 64×64 concept world (its images' std over codes 0.10 against the data's 0.31; best of 500
  samples −0.04 of a unit's natural maximum); with it 0.29 and 1.24. ``conv`` is the format of older files;
* :class:`Decoder` (``arch="mlp"``, the format of older prior files): the same contract with an MLP. On
  the 64×64 concept world its outputs barely vary with z (std over codes 0.09 against the data's 0.31),
  so activation maximization in its code space cannot move a unit: the conv decoder is the default;
* :func:`fit_vae`: a VAE (encoder of the same family + decoder, Gaussian code prior N(0, I)), trained
  with the negative ELBO (squared error reconstruction with a fixed noise scale);
* :func:`fit_gan`: the same decoder as a GAN generator against a discriminator of the same family with
  spectral normalisation of its weights (non-saturating loss).

Only the decoder / generator is kept (:class:`CodePrior` wraps it with its config for saving).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from semlens.runtime import progress

__all__ = ["Decoder", "ConvDecoder", "CodePrior", "fit_vae", "fit_gan", "default_epochs", "ARCHS", "DEFAULT_STEPS"]

#: decoder families: ``conv-bn`` (default), ``conv`` and ``mlp``
ARCHS = ("conv-bn", "conv", "mlp")


class Decoder(nn.Module):
    """z (B, code_dim) -> (B, C, H, W) in [lo, hi] per channel: Linear-ReLU-Linear-ReLU-Linear-sigmoid."""

    def __init__(self, shape: tuple[int, int, int], code_dim: int, hidden: int = 256) -> None:
        super().__init__()
        self.shape = tuple(shape)
        d = int(np.prod(shape))
        self.net = nn.Sequential(nn.Linear(code_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, d))
        self.register_buffer("lo", torch.zeros(shape[0]))
        self.register_buffer("hi", torch.ones(shape[0]))

    def forward(self, z: Tensor) -> Tensor:
        x = torch.sigmoid(self.net(z)).reshape(z.shape[0], *self.shape)
        lo, hi = self.lo.to(x)[:, None, None], self.hi.to(x)[:, None, None]
        return lo + (hi - lo) * x


def _grid(shape: tuple[int, ...]) -> tuple[int, int]:
    """The conv decoder's starting grid: (⌈H/8⌉, ⌈W/8⌉)."""
    return -(-int(shape[1]) // 8), -(-int(shape[2]) // 8)


class ConvDecoder(nn.Module):
    """z (B, code_dim) -> (B, C, H, W) in [lo, hi] per channel.

    Linear -> (4·width, ⌈H/8⌉, ⌈W/8⌉), then 3 × (nearest ×2 upsampling, 3×3 conv), ReLU between; the
    result is cut to (H, W) and squashed with a sigmoid into [lo, hi]. ``width``: channels of the last
    hidden conv (the grid has 4·width, then 2·width, width). ``norm``: a batch normalisation before each ReLU
    (in eval mode, as the decoder is used after fitting, a fixed per-channel affine map).
    """

    def __init__(self, shape: tuple[int, int, int], code_dim: int, width: int = 16, norm: bool = False) -> None:
        super().__init__()
        self.shape = tuple(shape)
        c, w = int(shape[0]), int(width)
        self.grid = _grid(self.shape)
        self.fc = nn.Linear(code_dim, 4 * w * self.grid[0] * self.grid[1])
        up = nn.Upsample(scale_factor=2, mode="nearest")

        def act(channels: int) -> list[nn.Module]:
            return [nn.BatchNorm2d(channels), nn.ReLU()] if norm else [nn.ReLU()]

        self.net = nn.Sequential(*act(4 * w), up, nn.Conv2d(4 * w, 2 * w, 3, padding=1), *act(2 * w),
                                 up, nn.Conv2d(2 * w, w, 3, padding=1), *act(w),
                                 up, nn.Conv2d(w, c, 3, padding=1))
        self.register_buffer("lo", torch.zeros(c))
        self.register_buffer("hi", torch.ones(c))

    def forward(self, z: Tensor) -> Tensor:
        h = self.fc(z).reshape(z.shape[0], -1, *self.grid)
        x = torch.sigmoid(self.net(h)[:, :, :self.shape[1], :self.shape[2]])
        lo, hi = self.lo.to(x)[:, None, None], self.hi.to(x)[:, None, None]
        return lo + (hi - lo) * x


def _conv_encoder(shape: tuple[int, ...], out: int, width: int, slope: float = 0.0) -> nn.Sequential:
    """(B, C·H·W) flat images -> (B, out): zero-padded at the bottom/right to 8× the decoder's grid, 3
    stride-2 4×4 convs (width, 2·width, 4·width) down to that grid, then a linear map; ``slope`` > 0 uses
    leaky ReLUs (a GAN discriminator)."""
    c, w = int(shape[0]), int(width)

    def act() -> nn.Module:
        return nn.LeakyReLU(slope) if slope > 0 else nn.ReLU()

    grid = _grid(shape)
    pad = nn.ZeroPad2d((0, 8 * grid[1] - int(shape[2]), 0, 8 * grid[0] - int(shape[1])))
    return nn.Sequential(nn.Unflatten(1, tuple(int(s) for s in shape)), pad,
                         nn.Conv2d(c, w, 4, 2, 1), act(), nn.Conv2d(w, 2 * w, 4, 2, 1), act(),
                         nn.Conv2d(2 * w, 4 * w, 4, 2, 1), act(), nn.Flatten(),
                         nn.Linear(4 * w * grid[0] * grid[1], out))


class CodePrior(nn.Module):
    """A generator with a N(0, I) code prior: ``kind`` is ``"vae"`` or ``"gan"``; ``arch`` ``"conv-bn"`` or
    ``"conv"`` (a :class:`ConvDecoder` with ``hidden`` as its width, with or without batch normalisation) or
    ``"mlp"`` (a :class:`Decoder` of ``hidden`` units)."""

    def __init__(self, kind: str, shape: tuple[int, int, int], code_dim: int, hidden: int = 16,
                 arch: str = "conv-bn") -> None:
        super().__init__()
        if kind not in ("vae", "gan"):
            raise ValueError(f"unknown generator kind {kind!r}: use vae or gan")
        if arch not in ARCHS:
            raise ValueError(f"unknown generator architecture {arch!r}: use one of {', '.join(ARCHS)}")
        self.kind, self.shape, self.code_dim, self.hidden = kind, tuple(shape), int(code_dim), int(hidden)
        self.arch = arch
        self.decoder = (Decoder(self.shape, self.code_dim, self.hidden) if arch == "mlp"
                        else ConvDecoder(self.shape, self.code_dim, self.hidden, norm=arch == "conv-bn"))

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "input_shape": list(self.shape), "code_dim": self.code_dim, "hidden": self.hidden,
                "arch": self.arch}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> CodePrior:
        arch = cfg.get("arch", "mlp")  # files written before the conv decoder hold an MLP
        return cls(cfg["kind"], tuple(cfg["input_shape"]), int(cfg["code_dim"]),
                   int(cfg.get("hidden", 256 if arch == "mlp" else 16)), arch)

    def make_critic(self, out: int, slope: float = 0.0) -> nn.Module:
        """An encoder (VAE, ``out`` = 2·code_dim) or discriminator (GAN, ``out`` = 1) of the decoder's family,
        taking flat (B, C·H·W) images."""
        d = int(np.prod(self.shape))
        if self.arch != "mlp":
            return _conv_encoder(self.shape, out, self.hidden, slope)
        act = (lambda: nn.LeakyReLU(slope)) if slope > 0 else nn.ReLU
        layers = [nn.Linear(d, self.hidden), act()]
        if slope > 0:  # the GAN's discriminator has a second hidden layer, the VAE's encoder one
            layers += [nn.Linear(self.hidden, self.hidden), act()]
        return nn.Sequential(*layers, nn.Linear(self.hidden, out))

    def forward(self, z: Tensor) -> Tensor:
        return self.decoder(z)


def _range_init(prior: CodePrior, images: Tensor) -> None:
    per = images.transpose(0, 1).reshape(images.shape[1], -1)
    prior.decoder.lo.copy_(per.min(dim=1).values)
    prior.decoder.hi.copy_(per.max(dim=1).values)


def _start(kind: str, images: Tensor, code_dim: int, hidden: int | None, seed: int, arch: str = "conv-bn"
           ) -> tuple[CodePrior, torch.Generator, Tensor]:
    """A seeded, range-initialised :class:`CodePrior` of ``kind``, its batch-order generator and the images
    flattened to (N, C·H·W) float: what both generator trainings start from."""
    torch.manual_seed(seed)
    if hidden is None:
        hidden = 256 if arch == "mlp" else 16
    prior = CodePrior(kind, tuple(images.shape[1:]), code_dim, hidden, arch)
    _range_init(prior, images)
    return prior, torch.Generator().manual_seed(seed), images.reshape(images.shape[0], -1).float()


#: optimiser steps of a generator's default training: 30 epochs on 2,000 concept-world images (940 steps) left the
#: VAE's samples blurred (best of 500 samples 0.23 of a unit's natural maximum; code AM median ratio 0.07), 120
#: epochs (3,840 steps) gave 0.46 and 3.1
DEFAULT_STEPS = 4000


def default_epochs(n: int, batch_size: int, steps: int = DEFAULT_STEPS) -> int:
    """Epochs over ``n`` images in batches of ``batch_size`` that make at least ``steps`` optimiser steps."""
    per_epoch = max(1, -(-n // batch_size))
    return max(1, -(-steps // per_epoch))


def _batches(n: int, batch_size: int, g: torch.Generator) -> list[Tensor]:
    """A shuffled epoch of index batches; a last batch of one image is dropped (batch normalisation needs two)."""
    batches = list(torch.randperm(n, generator=g).split(batch_size))
    return batches[:-1] if len(batches) > 1 and len(batches[-1]) < 2 else batches


def _spectral(net: nn.Module) -> nn.Module:
    """``net`` with spectral normalisation on every conv and linear weight (a GAN discriminator)."""
    from torch.nn.utils.parametrizations import spectral_norm

    for name, child in list(net.named_children()):
        if isinstance(child, nn.Conv2d | nn.Linear):
            setattr(net, name, spectral_norm(child))
        else:
            _spectral(child)
    return net


def fit_vae(images: Tensor, code_dim: int = 32, hidden: int | None = None, epochs: int | None = None,
            lr: float = 1e-3, batch_size: int = 64, noise_std: float = 0.1, seed: int = 0,
            arch: str = "conv-bn") -> CodePrior:
    """Train a VAE on ``images`` (N, C, H, W); return its decoder as a :class:`CodePrior` ("vae").

    ``hidden``: the conv decoder's width (default 16) or the MLP's hidden units (default 256). ``epochs``: default
    enough for :data:`DEFAULT_STEPS` optimiser steps (:func:`default_epochs`)."""
    prior, g, flat = _start("vae", images, code_dim, hidden, seed, arch)
    n, d = flat.shape
    encoder = prior.make_critic(2 * code_dim)
    opt = torch.optim.Adam(list(encoder.parameters()) + list(prior.parameters()), lr=lr)
    epochs = default_epochs(n, batch_size) if epochs is None else epochs
    for _ in progress(range(epochs), total=epochs, desc="fit vae"):
        for idx in _batches(n, batch_size, g):
            x = flat[idx]
            mu, logvar = encoder(x).chunk(2, dim=1)
            z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=g)
            rec = prior(z).reshape(len(idx), -1)
            nll = ((rec - x) ** 2).sum(dim=1) / (2 * noise_std ** 2)
            kl = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(dim=1)
            loss = (nll + kl).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return prior.eval().requires_grad_(False)


def fit_gan(images: Tensor, code_dim: int = 32, hidden: int | None = None, epochs: int | None = None,
            lr: float = 2e-4, batch_size: int = 64, seed: int = 0, arch: str = "conv-bn") -> CodePrior:
    """Train a GAN on ``images`` (N, C, H, W); return its generator as a :class:`CodePrior` ("gan").

    ``hidden`` and ``epochs``: as in :func:`fit_vae`."""
    prior, g, flat = _start("gan", images, code_dim, hidden, seed, arch)
    n, d = flat.shape
    disc = _spectral(prior.make_critic(1, slope=0.2))
    opt_g = torch.optim.Adam(prior.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.999))
    epochs = default_epochs(n, batch_size) if epochs is None else epochs
    for _ in progress(range(epochs), total=epochs, desc="fit gan"):
        for idx in _batches(n, batch_size, g):
            real = flat[idx]
            fake = prior(torch.randn(len(idx), code_dim, generator=g)).reshape(len(idx), -1)
            d_loss = F.softplus(-disc(real)).mean() + F.softplus(disc(fake.detach())).mean()
            opt_d.zero_grad()
            d_loss.backward()
            opt_d.step()
            g_loss = F.softplus(-disc(fake)).mean()
            opt_g.zero_grad()
            g_loss.backward()
            opt_g.step()
    return prior.eval().requires_grad_(False)
