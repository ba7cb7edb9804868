"""Small generators trained on the user's data, for activation maximization in code space.

* :class:`Decoder`: z (B, d) -> image (B, C, H, W): an MLP whose output is squashed into the data's
  per-channel range [lo, hi] with a sigmoid;
* :func:`fit_vae`: a VAE (MLP encoder + :class:`Decoder`, Gaussian code prior N(0, I)), trained with
  the negative ELBO (squared error reconstruction with a fixed noise scale);
* :func:`fit_gan`: the same decoder as a GAN generator against an MLP discriminator (non-saturating loss).

Only the decoder / generator is kept (:class:`CodePrior` wraps it with its config for saving).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Decoder", "CodePrior", "fit_vae", "fit_gan"]


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


class CodePrior(nn.Module):
    """A generator with a N(0, I) code prior: ``kind`` is ``"vae"`` or ``"gan"``."""

    def __init__(self, kind: str, shape: tuple[int, int, int], code_dim: int, hidden: int = 256) -> None:
        super().__init__()
        if kind not in ("vae", "gan"):
            raise ValueError(f"unknown generator kind {kind!r}: use vae or gan")
        self.kind, self.shape, self.code_dim, self.hidden = kind, tuple(shape), int(code_dim), int(hidden)
        self.decoder = Decoder(self.shape, self.code_dim, self.hidden)

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "input_shape": list(self.shape), "code_dim": self.code_dim, "hidden": self.hidden}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> CodePrior:
        return cls(cfg["kind"], tuple(cfg["input_shape"]), int(cfg["code_dim"]), int(cfg.get("hidden", 256)))

    def forward(self, z: Tensor) -> Tensor:
        return self.decoder(z)


def _range_init(prior: CodePrior, images: Tensor) -> None:
    per = images.transpose(0, 1).reshape(images.shape[1], -1)
    prior.decoder.lo.copy_(per.min(dim=1).values)
    prior.decoder.hi.copy_(per.max(dim=1).values)


def _start(kind: str, images: Tensor, code_dim: int, hidden: int, seed: int
           ) -> tuple[CodePrior, torch.Generator, Tensor]:
    """A seeded, range-initialised :class:`CodePrior` of ``kind``, its batch-order generator and the images
    flattened to (N, C·H·W) float: what both generator trainings start from."""
    torch.manual_seed(seed)
    prior = CodePrior(kind, tuple(images.shape[1:]), code_dim, hidden)
    _range_init(prior, images)
    return prior, torch.Generator().manual_seed(seed), images.reshape(images.shape[0], -1).float()


def fit_vae(images: Tensor, code_dim: int = 32, hidden: int = 256, epochs: int = 30, lr: float = 1e-3,
            batch_size: int = 64, noise_std: float = 0.1, seed: int = 0) -> CodePrior:
    """Train a VAE on ``images`` (N, C, H, W); return its decoder as a :class:`CodePrior` ("vae")."""
    prior, g, flat = _start("vae", images, code_dim, hidden, seed)
    n, d = flat.shape
    encoder = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, 2 * code_dim))
    opt = torch.optim.Adam(list(encoder.parameters()) + list(prior.parameters()), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(batch_size):
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


def fit_gan(images: Tensor, code_dim: int = 32, hidden: int = 256, epochs: int = 30, lr: float = 2e-4,
            batch_size: int = 64, seed: int = 0) -> CodePrior:
    """Train a GAN on ``images`` (N, C, H, W); return its generator as a :class:`CodePrior` ("gan")."""
    prior, g, flat = _start("gan", images, code_dim, hidden, seed)
    n, d = flat.shape
    disc = nn.Sequential(nn.Linear(d, hidden), nn.LeakyReLU(0.2), nn.Linear(hidden, hidden), nn.LeakyReLU(0.2),
                         nn.Linear(hidden, 1))
    opt_g = torch.optim.Adam(prior.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(disc.parameters(), lr=lr, betas=(0.5, 0.999))
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(batch_size):
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
