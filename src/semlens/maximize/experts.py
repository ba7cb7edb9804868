"""Density experts log p(x) fitted on the user's data, differentiable in torch.

* :class:`GaussianExpert`: N(μ, Σ) with Σ = U diag(s) Uᵀ + σ²(I − UUᵀ) (k principal directions with
  their variances, isotropic σ² on the rest: probabilistic PCA, fitted with scikit-learn's PCA);
* :class:`GMMPatchExpert`: sum over (strided) patches of a full-covariance Gaussian mixture's log
  density (fitted with scikit-learn's ``GaussianMixture``);
* :class:`RBMExpert`: Gaussian-binary RBM as in Montavon et al. (2018):
  log p(x) = Σ_j softplus(w_jᵀv + b_j) − ½‖v − a‖² − Σ_i log s_i + const, v = (x − m)/s,
  trained by contrastive divergence (CD-1).

Each takes images (B, C, H, W) in the model's input space and returns log-densities (B,) in nats
(the RBM's up to its unknown log-partition constant).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GaussianExpert", "GMMPatchExpert", "RBMExpert", "fit_gaussian", "fit_gmm_patches", "fit_rbm"]


class GaussianExpert(nn.Module):
    """Gaussian in a PCA basis. Buffers: mean (D,), basis (k, D) orthonormal rows, variances (k,),
    noise (σ², scalar). D = C·H·W."""

    kind = "gaussian"

    def __init__(self, shape: tuple[int, int, int], k: int) -> None:
        super().__init__()
        self.shape = tuple(shape)
        d = int(np.prod(shape))
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("basis", torch.zeros(k, d))
        self.register_buffer("variances", torch.ones(k))
        self.register_buffer("noise", torch.ones(()))

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "input_shape": list(self.shape), "k": int(self.basis.shape[0])}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> GaussianExpert:
        return cls(tuple(cfg["input_shape"]), int(cfg["k"]))

    def log_prob(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B,) log N(x; μ, Σ)."""
        d = x.reshape(x.shape[0], -1) - self.mean.to(x)
        proj = d @ self.basis.to(x).T
        rest = (d * d).sum(dim=1) - (proj * proj).sum(dim=1)
        var, noise = self.variances.to(x), self.noise.to(x)
        maha = (proj * proj / var).sum(dim=1) + rest / noise
        dim, k = d.shape[1], var.shape[0]
        logdet = var.log().sum() + (dim - k) * noise.log()
        return -0.5 * (maha + logdet + dim * math.log(2 * math.pi))

    def cov_mul(self, w: Tensor) -> Tensor:
        """Σ w for w (B, D): U diag(s) Uᵀw + σ²(w − UUᵀw) (used by tests of the exact optimum)."""
        u = self.basis.to(w)
        proj = w @ u.T
        return (proj * self.variances.to(w)) @ u + self.noise.to(w) * (w - proj @ u)


def fit_gaussian(images: Tensor, k: int = 64, seed: int = 0) -> GaussianExpert:
    """Fit a :class:`GaussianExpert` with ``k`` principal directions on ``images`` (N, C, H, W)."""
    from sklearn.decomposition import PCA

    n = images.shape[0]
    flat = images.reshape(n, -1).double().numpy()
    k = max(1, min(k, n - 1, flat.shape[1]))
    pca = PCA(n_components=k, svd_solver="full" if flat.shape[1] <= 2000 else "randomized", random_state=seed)
    pca.fit(flat)
    expert = GaussianExpert(tuple(images.shape[1:]), k)
    expert.mean.copy_(torch.from_numpy(pca.mean_))
    expert.basis.copy_(torch.from_numpy(pca.components_))
    expert.variances.copy_(torch.from_numpy(pca.explained_variance_).clamp_min(1e-8))
    noise = float(pca.noise_variance_) if k < flat.shape[1] else float(pca.explained_variance_[-1])
    expert.noise.fill_(max(noise, 1e-8))
    return expert


def _patches(x: Tensor, size: int, stride: int) -> Tensor:
    """(B, C, H, W) -> (B, L, C·size²)."""
    return F.unfold(x, size, stride=stride).transpose(1, 2)


class GMMPatchExpert(nn.Module):
    """Σ over patches (``patch`` px, ``stride`` px apart) of log Σ_k π_k N(patch; μ_k, Σ_k).

    Buffers: log_weights (K,), means (K, P), prec_chol (K, P, P) with Σ_k⁻¹ = L_k L_kᵀ (scikit-learn's
    ``precisions_cholesky_``), P = C·patch².
    """

    kind = "gmm"

    def __init__(self, shape: tuple[int, int, int], components: int, patch: int, stride: int) -> None:
        super().__init__()
        self.shape, self.patch, self.stride = tuple(shape), int(patch), int(stride)
        p = shape[0] * patch * patch
        self.register_buffer("log_weights", torch.zeros(components))
        self.register_buffer("means", torch.zeros(components, p))
        self.register_buffer("prec_chol", torch.eye(p).repeat(components, 1, 1))

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "input_shape": list(self.shape), "components": int(self.means.shape[0]),
                "patch": self.patch, "stride": self.stride}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> GMMPatchExpert:
        return cls(tuple(cfg["input_shape"]), int(cfg["components"]), int(cfg["patch"]), int(cfg["stride"]))

    def patch_log_prob(self, patches: Tensor) -> Tensor:
        """(..., P) -> (...) log mixture density of each patch."""
        lead = patches.shape[:-1]
        flat = patches.reshape(-1, patches.shape[-1])
        chol = self.prec_chol.to(flat)
        y = torch.einsum("np,kpq->nkq", flat, chol) - torch.einsum("kp,kpq->kq", self.means.to(flat), chol)
        logdet = torch.diagonal(chol, dim1=1, dim2=2).log().sum(dim=1)
        comp = -0.5 * (y * y).sum(dim=2) + logdet - 0.5 * flat.shape[1] * math.log(2 * math.pi)
        return torch.logsumexp(comp + self.log_weights.to(flat), dim=1).reshape(lead)

    def log_prob(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B,) sum of patch log-densities."""
        return self.patch_log_prob(_patches(x, self.patch, self.stride)).sum(dim=1)


def fit_gmm_patches(images: Tensor, components: int = 16, patch: int = 8, stride: int = 8,
                    max_patches: int = 20000, seed: int = 0) -> GMMPatchExpert:
    """Fit a :class:`GMMPatchExpert` on (at most ``max_patches``, randomly chosen) patches of ``images``."""
    from sklearn.mixture import GaussianMixture

    pts = _patches(images.float(), patch, stride).reshape(-1, images.shape[1] * patch * patch)
    g = torch.Generator().manual_seed(seed)
    if pts.shape[0] > max_patches:
        pts = pts[torch.randperm(pts.shape[0], generator=g)[:max_patches]]
    gmm = GaussianMixture(components, covariance_type="full", reg_covar=1e-4, max_iter=200, random_state=seed)
    gmm.fit(pts.double().numpy())
    expert = GMMPatchExpert(tuple(images.shape[1:]), components, patch, stride)
    expert.log_weights.copy_(torch.from_numpy(np.log(gmm.weights_)))
    expert.means.copy_(torch.from_numpy(gmm.means_))
    expert.prec_chol.copy_(torch.from_numpy(gmm.precisions_cholesky_))
    return expert


class RBMExpert(nn.Module):
    """Gaussian-binary RBM on standardised inputs v = (x − m) / s.

    Parameters: weight (J, D), hidden_bias (J,), visible_bias a (D,); buffers m, s (D,).
    log p(x) = Σ_j softplus(w_jᵀv + b_j) − ½‖v − a‖² − Σ_i log s_i (+ the unknown −log Z).
    """

    kind = "rbm"

    def __init__(self, shape: tuple[int, int, int], hidden: int) -> None:
        super().__init__()
        self.shape = tuple(shape)
        d = int(np.prod(shape))
        self.weight = nn.Parameter(torch.zeros(hidden, d))
        self.hidden_bias = nn.Parameter(torch.zeros(hidden))
        self.visible_bias = nn.Parameter(torch.zeros(d))
        self.register_buffer("m", torch.zeros(d))
        self.register_buffer("s", torch.ones(d))

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "input_shape": list(self.shape), "hidden": int(self.weight.shape[0])}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> RBMExpert:
        return cls(tuple(cfg["input_shape"]), int(cfg["hidden"]))

    def standardise(self, x: Tensor) -> Tensor:
        return (x.reshape(x.shape[0], -1) - self.m.to(x)) / self.s.to(x)

    def free_log_prob(self, v: Tensor) -> Tensor:
        """(B, D) standardised -> (B,) unnormalised log p(v)."""
        hidden = F.softplus(v @ self.weight.to(v).T + self.hidden_bias.to(v)).sum(dim=1)
        return hidden - 0.5 * ((v - self.visible_bias.to(v)) ** 2).sum(dim=1)

    def log_prob(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B,) log p(x) up to the log-partition constant."""
        return self.free_log_prob(self.standardise(x)) - self.s.to(x).log().sum()


def fit_rbm(images: Tensor, hidden: int = 128, epochs: int = 20, lr: float = 1e-3, batch_size: int = 64,
            seed: int = 0) -> RBMExpert:
    """Train a :class:`RBMExpert` by CD-1 (unit-variance Gaussian visibles) on ``images`` (N, C, H, W)."""
    g = torch.Generator().manual_seed(seed)
    n = images.shape[0]
    flat = images.reshape(n, -1).float()
    rbm = RBMExpert(tuple(images.shape[1:]), hidden)
    rbm.m.copy_(flat.mean(dim=0))
    rbm.s.copy_(flat.std(dim=0).clamp_min(1e-2))
    with torch.no_grad():
        rbm.weight.normal_(0, 0.01, generator=g)
    v_all = rbm.standardise(flat)
    opt = torch.optim.Adam(rbm.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(n, generator=g).split(batch_size):
            v0 = v_all[idx]
            with torch.no_grad():
                h = torch.bernoulli(torch.sigmoid(v0 @ rbm.weight.T + rbm.hidden_bias), generator=g)
                v1 = h @ rbm.weight + rbm.visible_bias + torch.randn(v0.shape, generator=g)
            # CD-1: the free-energy difference between data and one-step samples
            loss = rbm.free_log_prob(v1).mean() - rbm.free_log_prob(v0).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    return rbm.requires_grad_(False)
