"""Baselines behind the SRAE's API: a TopK sparse autoencoder of the same width, NMF (CRAFT-style), PCA.

All three are unsupervised: they learn ``k`` shared x-features (one group) and a linear head ``k → C_e`` is then fitted
to the explained logits by least squares (streamed normal equations), so contributions ``w_ci x_i`` are comparable.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from semlens.embed.activations import ActivationStore
from semlens.embed.base import Embedding

__all__ = ["TopKSAE", "NMFEmbedding", "PCAEmbedding", "fit_linear_head"]


def fit_linear_head(emb: Embedding, store: ActivationStore, ridge: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares ``(W (1, k, C_e), b (1, C_e))`` from ``emb.encode`` codes to the explained logits."""
    k1 = emb.k + 1
    xtx = torch.zeros(k1, k1, dtype=torch.float64)
    xty = torch.zeros(k1, len(emb.classes_), dtype=torch.float64)
    for z, logits, _ in store.batches(4096):
        x = emb.encode(z)[:, 0].double()
        xa = torch.cat([x, torch.ones_like(x[:, :1])], 1)
        xtx += xa.T @ xa
        xty += xa.T @ logits[:, emb.classes_].double()
    scale = float(torch.diagonal(xtx).mean()) or 1.0
    sol = torch.linalg.solve(xtx + ridge * scale * torch.eye(k1, dtype=torch.float64), xty).float()
    return sol[:-1].unsqueeze(0), sol[-1:].clone()


class _HeadMixin(Embedding):
    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head_w_, self.head_b_

    def _state(self) -> dict[str, torch.Tensor]:
        return {"head_w": self.head_w_, "head_b": self.head_b_} | self._codec_state()

    def _load_state(self, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        self.head_w_, self.head_b_ = state["head_w"], state["head_b"]
        self._load_codec(state)

    def _meta(self) -> dict[str, Any]:
        return {}


class TopKSAE(_HeadMixin):
    """TopK sparse autoencoder (Gao et al. 2024 style) with ``k`` latents, ``topk`` of them active per sample.

    On standardised ``z``: ``x = TopK(ReLU(W_e (z − b_d) + b_e))``, ``ẑ = W_d x + b_d`` (unit-norm decoder rows),
    MSE loss, Adam. Default ``topk = max(1, k // 2)``.
    """

    method = "topk"

    def __init__(self, k: int = 5, target: int | list[int] | str = 0, topk: int | None = None, epochs: int = 20,
                 batch_size: int = 128, lr: float = 1e-3, seed: int = 0) -> None:
        self.k = k
        self.target = target
        self.topk = topk
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.seed = seed

    def fit(self, data: ActivationStore | Any, y: Any = None) -> TopKSAE:
        store = self._begin_fit(data, y)
        self.topk_ = self.topk or max(1, self.k // 2)
        if not 1 <= self.topk_ <= self.k:
            raise ValueError(f"topk must be within [1, k={self.k}], got {self.topk_}")
        g = torch.Generator().manual_seed(self.seed)
        d = store.dim
        w = torch.randn(self.k, d, generator=g)
        self.w_dec_ = nn.Parameter(w / w.norm(dim=1, keepdim=True))
        self.w_enc_ = nn.Parameter(self.w_dec_.detach().T.clone())
        self.b_enc_ = nn.Parameter(torch.zeros(self.k))
        self.b_dec_ = nn.Parameter(torch.zeros(d))
        opt = torch.optim.Adam([self.w_enc_, self.b_enc_, self.w_dec_, self.b_dec_], lr=self.lr)
        for _ in range(self.epochs):
            for z, _, _ in store.batches(self.batch_size, shuffle=True, generator=g):
                zs = self.standardize(z)
                loss = ((self._decode(self._code(zs)) - zs) ** 2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    self.w_dec_ /= self.w_dec_.norm(dim=1, keepdim=True).clamp(min=1e-8)
        for p in (self.w_enc_, self.b_enc_, self.w_dec_, self.b_dec_):
            p.requires_grad_(False)
        self.head_w_, self.head_b_ = fit_linear_head(self, store)
        return self

    def _pre(self, zs: torch.Tensor) -> torch.Tensor:
        return torch.relu((zs - self.b_dec_) @ self.w_enc_ + self.b_enc_)

    def _code(self, zs: torch.Tensor) -> torch.Tensor:
        h = self._pre(zs)
        top = h.topk(self.topk_, dim=1)
        return torch.zeros_like(h).scatter(1, top.indices, top.values)

    def _decode(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w_dec_ + self.b_dec_

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._code(self.standardize(z)).unsqueeze(1)

    def active_mask(self, z: torch.Tensor) -> torch.Tensor:
        return (self.encode(z) > 0).float()

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            zs = self._decode(self._code(self.standardize(z)))
        return (zs * self.scale_ + self.mean_).unsqueeze(1)

    def encoder_module(self, g: int) -> nn.Module:
        """``ReLU(W_e (z − b_d) + b_e)`` with the standardisation folded in (TopK selection: see active_mask)."""
        lin = nn.Linear(self.n_features_in_, self.k)
        with torch.no_grad():
            w = self.w_enc_.T / self.scale_  # (k, d)
            lin.weight.copy_(w)
            lin.bias.copy_(self.b_enc_ - w @ self.mean_ - self.w_enc_.T @ self.b_dec_)
        return nn.Sequential(lin, nn.ReLU())

    def _codec_state(self) -> dict[str, torch.Tensor]:
        return {"w_enc": self.w_enc_, "b_enc": self.b_enc_, "w_dec": self.w_dec_, "b_dec": self.b_dec_,
                "topk": torch.tensor(self.topk_)}

    def _load_codec(self, state: dict[str, torch.Tensor]) -> None:
        self.w_enc_, self.b_enc_, self.w_dec_, self.b_dec_ = (state[k] for k in ("w_enc", "b_enc", "w_dec", "b_dec"))
        self.topk_ = int(state["topk"])


class PCAEmbedding(_HeadMixin):
    """PCA of the standardised layer (scikit-learn ``IncrementalPCA``, streamed): x = the first ``k`` scores."""

    method = "pca"

    def __init__(self, k: int = 5, target: int | list[int] | str = 0, batch_size: int = 1024, seed: int = 0) -> None:
        self.k = k
        self.target = target
        self.batch_size = batch_size
        self.seed = seed

    def fit(self, data: ActivationStore | Any, y: Any = None) -> PCAEmbedding:
        from sklearn.decomposition import IncrementalPCA

        store = self._begin_fit(data, y)
        ipca = IncrementalPCA(n_components=self.k)
        bs = max(self.batch_size, self.k)
        for z, _, _ in store.batches(bs):
            if len(z) >= self.k:
                ipca.partial_fit(self.standardize(z).numpy())
        self.components_ = torch.as_tensor(ipca.components_, dtype=torch.float32)  # (k, d)
        self.center_ = torch.as_tensor(ipca.mean_, dtype=torch.float32)
        self.head_w_, self.head_b_ = fit_linear_head(self, store)
        return self

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        return ((self.standardize(z) - self.center_) @ self.components_.T).unsqueeze(1)

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        zs = self.encode(z)[:, 0] @ self.components_ + self.center_
        return (zs * self.scale_ + self.mean_).unsqueeze(1)

    def encoder_module(self, g: int) -> nn.Module:
        lin = nn.Linear(self.n_features_in_, self.k)
        with torch.no_grad():
            w = self.components_ / self.scale_
            lin.weight.copy_(w)
            lin.bias.copy_(-w @ self.mean_ - self.components_ @ self.center_)
        return lin

    def _codec_state(self) -> dict[str, torch.Tensor]:
        return {"components": self.components_, "center": self.center_}

    def _load_codec(self, state: dict[str, torch.Tensor]) -> None:
        self.components_, self.center_ = state["components"], state["center"]


class NMFEmbedding(_HeadMixin):
    """CRAFT-style NMF of the raw (non-negative, post-ReLU) activations: ``Z ≈ X H`` with ``X, H >= 0``.

    Fitted with scikit-learn ``MiniBatchNMF.partial_fit`` (streamed); codes by non-negative least squares
    (multiplicative updates on the fixed dictionary). For heatmaps the encoder is the feed-forward surrogate
    ``ReLU(Z H⁺)`` (pseudo-inverse), because an NNLS solve is no layer; those maps sum to the surrogate's
    contributions.
    """

    method = "nmf"

    def __init__(self, k: int = 5, target: int | list[int] | str = 0, batch_size: int = 1024, epochs: int = 3,
                 transform_iter: int = 200, seed: int = 0) -> None:
        self.k = k
        self.transform_iter = transform_iter
        self.target = target
        self.batch_size = batch_size
        self.epochs = epochs
        self.seed = seed

    def fit(self, data: ActivationStore | Any, y: Any = None) -> NMFEmbedding:
        from sklearn.decomposition import MiniBatchNMF

        store = self._begin_fit(data, y)
        nmf = MiniBatchNMF(n_components=self.k, init="nndsvda", random_state=self.seed, max_iter=50)
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(max(1, self.epochs)):
            for z, _, _ in store.batches(max(self.batch_size, self.k), shuffle=True, generator=g):
                if bool((z < 0).any()):
                    raise ValueError(f"NMF needs non-negative activations; layer {store.layer!r} has negative values "
                                     "(use the output of a ReLU)")
                if len(z) >= self.k:
                    nmf.partial_fit(z.numpy())
        self.components_ = torch.as_tensor(nmf.components_, dtype=torch.float32)  # (k, d)
        self.head_w_, self.head_b_ = fit_linear_head(self, store)
        return self

    def encode(self, z: torch.Tensor) -> torch.Tensor:
        """Codes by non-negative least squares ``min_X>=0 ‖Z − X H‖²`` (multiplicative updates, batched)."""
        z = z.clamp(min=0).double()
        h = self.components_.double()
        hht, zht = h @ h.T, z @ h.T
        x = self._surrogate(z.float()).double().clamp(min=1e-6)
        for _ in range(self.transform_iter):
            x = x * zht / (x @ hht).clamp(min=1e-12)
        return x.float().unsqueeze(1)

    def _surrogate(self, z: torch.Tensor) -> torch.Tensor:
        return torch.relu(z @ torch.linalg.pinv(self.components_))

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        return (self.encode(z)[:, 0] @ self.components_).unsqueeze(1)

    def encoder_module(self, g: int) -> nn.Module:
        lin = nn.Linear(self.n_features_in_, self.k, bias=False)
        with torch.no_grad():
            lin.weight.copy_(torch.linalg.pinv(self.components_).T)
        return nn.Sequential(lin, nn.ReLU())

    def _codec_state(self) -> dict[str, torch.Tensor]:
        return {"components": self.components_}

    def _load_codec(self, state: dict[str, torch.Tensor]) -> None:
        self.components_ = state["components"]
