"""Regularizers that make convolutional filters interpretable (Concept Group Learning, Varshneya et al. 2021).

Every term follows the trainer's extra-term protocol: an attribute ``layers`` (dotted names whose
outputs the term needs, captured with gradients during the forward; empty for weight penalties)
and ``__call__(model, activations) -> scalar tensor`` (added to the loss). They work in any plain
training loop too::

    term = BlockNorm(p=2, q=1, groups=5, strength=5e-3)
    loss = F.cross_entropy(model(x), y) + term(model, {})

Groups are ``G`` contiguous blocks of output filters (channels). When ``C`` is not divisible by
``G``, ``remainder="last"`` (default) lets the last group absorb the ``C mod G`` extra filters so every
filter is regularized; ``remainder="drop"`` leaves them out, as the CGL reference code does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from semlens.layers import get_module

__all__ = ["BlockNorm", "WeightDecay", "ActivationGroupLoss", "SpatialLoss", "group_bounds", "block_norm",
           "soft_receptive_field"]


def group_bounds(channels: int, groups: int, remainder: str = "last") -> list[tuple[int, int]]:
    """``[start, stop)`` of each of ``min(groups, channels)`` contiguous channel groups."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if remainder not in ("last", "drop"):
        raise ValueError(f"remainder must be 'last' or 'drop', got {remainder!r}")
    g = min(groups, channels)
    m = channels // g
    bounds = [(i * m, (i + 1) * m) for i in range(g)]
    if remainder == "last":
        bounds[-1] = (bounds[-1][0], channels)
    return bounds


def _check_norm_order(name: str, value: float) -> float:
    value = float(value)
    if not (value >= 1 or math.isinf(value)):
        raise ValueError(f"{name} must satisfy 1 <= {name} <= inf, got {value}")
    return value


def block_norm(weight: torch.Tensor, p: float = 2, q: float = 1, groups: int = 5,
               remainder: str = "last") -> torch.Tensor:
    """Ω(w) = ‖(‖w̃_1‖_p, …, ‖w̃_G‖_p)‖_q for one weight of shape (C_out, ...); a scalar.

    ``w̃_g`` is the vector of all weights of the filters in group ``g``. p=q=2 gives ‖w‖₂; q=1, p=2 the
    group lasso Σ_g ‖w̃_g‖₂. Zero groups get the zero subgradient.
    """
    p, q = _check_norm_order("p", p), _check_norm_order("q", q)
    bounds = group_bounds(weight.shape[0], groups, remainder)
    flat = weight.reshape(weight.shape[0], -1)
    m = bounds[0][1] - bounds[0][0]
    equal = len(bounds) - 1  # groups of exactly m filters before the last one
    norms = []
    if equal:
        norms.append(torch.linalg.vector_norm(flat[: equal * m].reshape(equal, -1), ord=p, dim=1))
    last = flat[bounds[-1][0]: bounds[-1][1]].reshape(1, -1)
    norms.append(torch.linalg.vector_norm(last, ord=p, dim=1))
    return torch.linalg.vector_norm(torch.cat(norms), ord=q)


def _weights(model: nn.Module, layers: None | str | Sequence[str] | Mapping[str, float], strength: float,
             kinds: tuple[type, ...]) -> list[tuple[str, torch.Tensor, float]]:
    if layers is None:
        found = [(n, m.weight, strength) for n, m in model.named_modules() if isinstance(m, kinds)]
        if not found:
            raise ValueError(f"{type(model).__name__} has no {'/'.join(k.__name__ for k in kinds)} layer to regularize")
        return found
    if isinstance(layers, str):
        layers = [s.strip() for s in layers.split(",") if s.strip()]
    items = layers.items() if isinstance(layers, Mapping) else [(n, strength) for n in layers]
    out = []
    for name, s in items:
        w = getattr(get_module(model, name), "weight", None)
        if not isinstance(w, torch.Tensor):
            raise ValueError(f"layer {name!r} has no weight tensor to regularize")
        out.append((name, w, float(s)))
    return out


class BlockNorm:
    """Group block-norm penalty Σ_l λ_l Ω(w^l) over conv weights (CGL's λ_bn R_bn).

    layers: ``None`` = every ``nn.Conv2d``; names; or ``{name: strength}`` for per-layer strengths.
    ``self.layers`` is empty (no activations needed); the selection is ``self.weight_layers``.
    """

    def __init__(self, p: float = 2, q: float = 1, groups: int = 5, strength: float = 5e-3,
                 layers: None | str | Sequence[str] | Mapping[str, float] = None, remainder: str = "last") -> None:
        self.p, self.q = _check_norm_order("p", p), _check_norm_order("q", q)
        group_bounds(groups, groups, remainder)  # validates groups and remainder
        self.groups, self.strength, self.remainder = groups, float(strength), remainder
        self.weight_layers = layers
        self.layers: list[str] = []

    def __call__(self, model: nn.Module, activations: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        terms = [s * block_norm(w, self.p, self.q, self.groups, self.remainder)
                 for _, w, s in _weights(model, self.weight_layers, self.strength, (nn.Conv2d,))]
        return torch.stack(terms).sum()

    def __repr__(self) -> str:
        return f"BlockNorm(p={self.p:g}, q={self.q:g}, groups={self.groups}, strength={self.strength:g})"


class WeightDecay:
    """Baseline ``strength · ½ Σ ‖w‖²`` over the weights of conv and linear layers (or the named ones)."""

    def __init__(self, strength: float = 5e-4, layers: None | str | Sequence[str] | Mapping[str, float] = None):
        self.strength, self.weight_layers = float(strength), layers
        self.layers: list[str] = []

    def __call__(self, model: nn.Module, activations: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        ws = _weights(model, self.weight_layers, self.strength, (nn.Conv2d, nn.Linear))
        return torch.stack([0.5 * s * w.pow(2).sum() for _, w, s in ws]).sum()


def soft_receptive_field(a: torch.Tensor, a1: float = 1.0, a2: float = 0.0, eps: float = 5e-3) -> torch.Tensor:
    """ψ = σ(a1 · a / (std(a) + eps) + a2) with std per channel over batch × space; a: (B, C, h, w)."""
    std = a.transpose(0, 1).reshape(a.shape[1], -1).std(dim=1, unbiased=False)
    return torch.sigmoid(a1 * a / (std.view(1, -1, 1, 1) + eps) + a2)


def _spatial_maps(activations: Mapping[str, torch.Tensor], layers: Sequence[str]) -> list[torch.Tensor]:
    out = []
    for name in layers:
        if name not in activations:
            raise KeyError(f"activations of layer {name!r} were not captured (have {sorted(activations)})")
        a = activations[name]
        if a.ndim != 4:
            raise ValueError(f"layer {name!r} output has shape {tuple(a.shape)}, not (B, C, h, w)")
        out.append(a)
    return out


class ActivationGroupLoss:
    """L_g: filters of one group should fire on the same pixels (CGL ``v3``), times ``strength``.

    For channel pairs (u, v) inside a group, d = 2‖ψ_u−ψ_v‖₁ / (‖ψ_u‖₁+‖ψ_v‖₁+‖ψ_u−ψ_v‖₁) = 1 − soft-IoU,
    norms over the h×w map; summed over pairs and images, divided by pairs and batch size, summed over
    groups, averaged over ``layers``. ``pairs=None`` uses every unordered pair of each group
    (deterministic); an int draws that many random ordered pairs per group per call (CGL uses 3m).
    """

    def __init__(self, layers: str | Sequence[str], groups: int = 5, strength: float = 1e-2,
                 pairs: int | None = None, remainder: str = "last", a1: float = 1.0, a2: float = 0.0,
                 eps: float = 5e-3) -> None:
        self.layers = [s.strip() for s in layers.split(",")] if isinstance(layers, str) else list(layers)
        if not self.layers:
            raise ValueError("ActivationGroupLoss needs at least one layer")
        group_bounds(groups, groups, remainder)
        self.groups, self.strength, self.pairs, self.remainder = groups, float(strength), pairs, remainder
        self.a1, self.a2, self.eps = a1, a2, eps

    def _pairs(self, start: int, stop: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        m = stop - start
        if self.pairs is None:
            u, v = torch.triu_indices(m, m, offset=1, device=device)
        else:
            u = torch.randint(0, m, (self.pairs,), device=device)
            v = (u + torch.randint(1, m, (self.pairs,), device=device)) % m  # v != u
        return u + start, v + start

    def __call__(self, model: nn.Module, activations: Mapping[str, torch.Tensor]) -> torch.Tensor:
        per_layer = []
        for a in _spatial_maps(activations, self.layers):
            psi = soft_receptive_field(a, self.a1, self.a2, self.eps).flatten(2)  # (B, C, hw)
            us, vs = [], []
            for start, stop in group_bounds(a.shape[1], self.groups, self.remainder):
                if stop - start < 2:
                    continue
                u, v = self._pairs(start, stop, a.device)
                us.append(u)
                vs.append(v)
            if not us:
                per_layer.append(a.sum() * 0)
                continue
            sizes = [len(u) for u in us]
            u, v = torch.cat(us), torch.cat(vs)
            pu, pv = psi[:, u], psi[:, v]  # (B, pairs, hw)
            diff = (pu - pv).abs().sum(-1)
            d = 2 * diff / (pu.sum(-1) + pv.sum(-1) + diff)  # (B, pairs)
            per_group = torch.stack([blk.sum() / (blk.shape[1] * blk.shape[0]) for blk in d.split(sizes, dim=1)])
            per_layer.append(per_group.sum())
        return self.strength * torch.stack(per_layer).mean()


class SpatialLoss:
    """L_s: each unit's activation concentrated in one area, times ``strength``.

    Per image and channel: centroid c = Σ_p ψ(p) p / Σ_p ψ(p) over cell coordinates p = (row, col);
    spread = Σ_p ψ(p) ‖p − c‖₂ / (Σ_p ψ(p) + eps), in cells. Mean over batch × channels, then layers.
    ``soft=False`` uses the raw non-negative activation instead of ψ.
    """

    def __init__(self, layers: str | Sequence[str], strength: float = 1e-2, eps: float = 1e-4,
                 soft: bool = True) -> None:
        self.layers = [s.strip() for s in layers.split(",")] if isinstance(layers, str) else list(layers)
        if not self.layers:
            raise ValueError("SpatialLoss needs at least one layer")
        self.strength, self.eps, self.soft = float(strength), eps, soft

    def __call__(self, model: nn.Module, activations: Mapping[str, torch.Tensor]) -> torch.Tensor:
        per_layer = []
        for a in _spatial_maps(activations, self.layers):
            w = soft_receptive_field(a) if self.soft else a.clamp_min(0)
            h, wd = a.shape[-2:]
            ys = torch.arange(h, device=a.device, dtype=a.dtype).view(1, 1, h, 1)
            xs = torch.arange(wd, device=a.device, dtype=a.dtype).view(1, 1, 1, wd)
            mass = w.sum((2, 3), keepdim=True)
            safe = mass.clamp_min(torch.finfo(a.dtype).tiny)
            cy, cx = (w * ys).sum((2, 3), keepdim=True) / safe, (w * xs).sum((2, 3), keepdim=True) / safe
            d2 = (ys - cy) ** 2 + (xs - cx) ** 2
            pos = d2 > 0
            dist = torch.where(pos, d2, torch.ones_like(d2)).sqrt() * pos  # exact 0 with zero gradient at c
            spread = (w * dist).sum((2, 3)) / (mass.squeeze(-1).squeeze(-1) + self.eps)
            per_layer.append(spread.mean())
        return self.strength * torch.stack(per_layer).mean()
