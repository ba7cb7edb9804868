"""The API shared by every explanation embedding (SRAE and the baselines).

An embedding maps a layer's (pooled) activations ``z`` ``(N, d)`` to ``k`` x-features per *group* (one group per
explained class for one-vs-all SRAEs, one shared group otherwise) and explains each class logit as
``ŷ_c = Σ_i w_ci x_i + b_c``. Methods take raw activations (the embedding standardises internally):

* ``encode(z)`` → ``(N, G, k)`` x-features; ``reconstruct(z)`` → ``(N, G, d)`` in raw units;
* ``contributions(z)`` → ``(N, C_e, k)``: ``w_ci x_i`` per explained class (logit units);
* ``predict(z)`` → ``(N, C_e)``: the rebuilt logits;
* ``encoder_module(g)``: an ``nn.Module`` of standard layers ``(N, d) → (N, k)`` for LRP heatmaps;
* ``active_mask(z)`` → ``(N, G, k)`` 1 where an x-feature is selected (all ones except for TopK).
"""

from __future__ import annotations

from typing import Any

import torch

from semlens.embed.activations import ActivationStore

__all__ = ["Embedding", "NotFittedError"]


class NotFittedError(RuntimeError):
    """An embedding used before ``fit``/``load``."""


class Embedding:
    """Base class: configuration in the constructor, ``fit(store) -> self``, learned attributes end in ``_``."""

    method = "base"
    k: int
    target: int | list[int] | str
    seed: int

    # --------------------------------------------------------------- checks and shared setup
    def _validate(self, store: ActivationStore) -> None:
        if not isinstance(self.k, int) or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        if self.k > store.dim:
            where = f" of layer {store.layer!r}" if store.layer else ""
            raise ValueError(f"k={self.k} x-features is larger than the width {store.dim}{where}")
        if len(store) < 2:
            raise ValueError(f"need at least 2 activation vectors to fit, got {len(store)}")
        self._resolve_classes(store.n_classes)

    def _resolve_classes(self, n_classes: int) -> list[int]:
        t = self.target
        if isinstance(t, str):
            if t != "all":
                raise ValueError(f"target must be a class index, a list of them, or 'all'; got {t!r}")
            return list(range(n_classes))
        cls = [t] if isinstance(t, int) else list(t)
        if not cls:
            raise ValueError("target lists no class")
        bad = [c for c in cls if not isinstance(c, int) or not 0 <= c < n_classes]
        if bad:
            raise ValueError(f"class index {bad[0]!r} out of range for a model with {n_classes} outputs")
        return cls

    def _begin_fit(self, data: ActivationStore | Any, y: Any = None) -> ActivationStore:
        """What every ``fit`` starts with: ``data`` as an :class:`ActivationStore` (arrays ``(N, d)`` with labels
        ``y`` are wrapped), validated (the estimator's own ``_validate``), and the common learned attributes set."""
        store = data if isinstance(data, ActivationStore) else ActivationStore.from_arrays(data, y)
        self._validate(store)
        self._setup_common(store)
        return store

    def _setup_common(self, store: ActivationStore) -> None:
        self.classes_ = self._resolve_classes(store.n_classes)
        self.n_classes_ = store.n_classes
        self.n_features_in_ = store.dim
        self.layer_ = store.layer
        self.model_name_ = store.model_name
        self.mean_, self.scale_ = store.moments()
        self.scale_ = torch.where(self.scale_ > 1e-6, self.scale_, torch.ones_like(self.scale_))

    def standardize(self, z: torch.Tensor) -> torch.Tensor:
        """``(z - mean_) / scale_`` per dimension (constant dimensions only centred)."""
        return (z - self.mean_.to(z)) / self.scale_.to(z)

    def _check_fitted(self) -> None:
        if not hasattr(self, "classes_"):
            raise NotFittedError(f"this {type(self).__name__} is not fitted yet; call fit() or load() first")

    def class_position(self, c: int) -> int:
        """Position of class ``c`` in ``classes_`` (error naming it when it is not explained)."""
        self._check_fitted()
        if c not in self.classes_:
            raise ValueError(f"class {c} is not explained by this embedding (explained: {self.classes_})")
        return self.classes_.index(c)

    def group_of(self, c: int) -> tuple[int, int]:
        """``(group, head output)`` that explains class ``c``."""
        return 0, self.class_position(c)

    # --------------------------------------------------------------- to implement
    def encode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def reconstruct(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W (G, k, m), b (G, m))`` in logit units."""
        raise NotImplementedError

    def encoder_module(self, g: int) -> torch.nn.Module:
        raise NotImplementedError

    def active_mask(self, z: torch.Tensor) -> torch.Tensor:
        return torch.ones(z.shape[0], self.n_groups, self.k)

    @property
    def n_groups(self) -> int:
        return 1

    # --------------------------------------------------------------- derived
    def _index(self) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.group_of(c) for c in self.classes_]
        return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs])

    def contributions(self, z: torch.Tensor) -> torch.Tensor:
        """``w_ci x_i`` ``(N, C_e, k)`` for every explained class ``c`` (logit units)."""
        self._check_fitted()
        z = self._check_input(z)
        x = self.encode(z)
        w, _ = self.head_weights()
        g, o = self._index()
        return x[:, g, :] * w[g, :, o].unsqueeze(0)

    def predict(self, z: torch.Tensor) -> torch.Tensor:
        """Rebuilt logits ``(N, C_e)``."""
        _, b = self.head_weights()
        g, o = self._index()
        return self.contributions(z).sum(-1) + b[g, o]

    def _check_input(self, z: torch.Tensor) -> torch.Tensor:
        z = torch.as_tensor(z, dtype=torch.float32)
        if z.ndim != 2 or z.shape[1] != self.n_features_in_:
            raise ValueError(f"activations must be (N, {self.n_features_in_}) for layer {self.layer_!r}, got "
                             f"{tuple(z.shape)}")
        if not bool(torch.isfinite(z).all()):
            raise ValueError(f"activations of layer {self.layer_!r} contain NaN/Inf")
        return z

    def get_params(self) -> dict[str, Any]:
        """Constructor parameters (scikit-learn convention)."""
        import inspect

        names = [p for p in inspect.signature(type(self).__init__).parameters if p != "self"]
        return {n: getattr(self, n) for n in names}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k}, target={self.target!r})"
