"""Heatmaps of x-features: LRP (or Excitation Backprop) from each contribution ``w_i x_i`` through the embedding's
encoder into the CNN, for all ``k`` x-features of a batch in one batched backward.

:class:`XFeatureModel` is an ``nn.Module`` of standard layers mapping images ``(N, 3, H, W)`` to the contributions
``(N, k)`` of one explained class (the model's forward with the layer's output captured, average pooling for conv
maps, the encoder with the standardisation folded into its first layer, and a diagonal layer ``w ⊙ x``). The batch is
replicated ``k`` times and replica ``i`` seeds only output ``i`` (weighting ``one-hot(i)``), so one forward and one
backward of the project's :class:`~semlens.explain.Attributor` give every map; with conservative rules
(``zero_params="bias"`` or ``excitation-backprop``) the map of x-feature ``i`` sums to ``w_i x_i``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from semlens.embed.activations import pool_activation
from semlens.embed.base import Embedding
from semlens.explain import PRESETS, Attributor, Epsilon, preset
from semlens.layers import get_module

__all__ = ["XFeatureModel", "xfeature_heatmaps", "xfeature_layer_maps", "concept_mass", "distinctness"]


class XFeatureModel(nn.Module):
    """Images ``(N, 3, H, W)`` → contributions ``(N, k)`` of one class (see module docstring)."""

    def __init__(self, model: nn.Module, layer: str, encoder: nn.Module, weight: torch.Tensor) -> None:
        super().__init__()
        get_module(model, layer)
        self.model = model
        self.layer = layer
        self.encoder = encoder
        self.weigh = self.diagonal(weight)

    @staticmethod
    def diagonal(weight: torch.Tensor) -> nn.Linear:
        """``x ↦ w ⊙ x`` as a bias-free ``nn.Linear`` (so LRP sees a standard layer)."""
        k = weight.shape[0]
        lin = nn.Linear(k, k, bias=False).to(weight.device)
        with torch.no_grad():
            lin.weight.copy_(torch.diag(weight.float()))
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        store: dict[str, torch.Tensor] = {}

        def hook(_m: nn.Module, _i: Any, out: torch.Tensor) -> None:
            store["a"] = out

        handle = get_module(self.model, self.layer).register_forward_hook(hook)
        try:
            self.model(x)
        finally:
            handle.remove()
        return self.weigh(self.encoder(pool_activation(store["a"])))


def xfeature_model(model: nn.Module, layer: str, emb: Embedding, target: int) -> tuple[XFeatureModel, int]:
    """The :class:`XFeatureModel` explaining class ``target`` and the embedding group it uses."""
    g, o = emb.group_of(target)
    w = emb.head_weights()[0][g, :, o]
    dev = next(model.parameters()).device
    return XFeatureModel(model, layer, emb.encoder_module(g).to(dev), w.to(dev)), g


def xfeature_heatmaps(model: nn.Module, layer: str, emb: Embedding, x: torch.Tensor, target: int,
                      method: str = "excitation-backprop", heat_layer: str | None = None,
                      **params: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Heatmaps of every x-feature of class ``target`` for the image batch ``x`` ``(N, 3, H, W)``.

    Returns ``(heat, contributions)``: ``heat`` ``(N, k, *shape)`` with ``shape`` the input's (``(3, H, W)``) or
    ``heat_layer``'s output shape (e.g. ``"model.features.conv3"`` to stop at a conv layer as the paper does);
    ``contributions`` ``(N, k)`` = ``w_i x_i`` (zero for x-features a TopK embedding did not select).
    """
    if method not in PRESETS:
        raise ValueError(f"x-feature heatmaps need an LRP method; got {method!r} (choose from {', '.join(PRESETS)})")
    net, g = xfeature_model(model, layer, emb, target)
    n, k = x.shape[0], emb.k
    # the diagonal weighting w ⊙ x passes relevance unchanged (LRP-0): a positive-weight rule would drop w_i < 0
    composite = preset(method, **params).with_rules({"weigh": Epsilon(0.0)})
    with Attributor(net, composite=composite) as attr:
        with torch.no_grad():
            contrib = net(x)
        if emb.method == "topk":
            from semlens.layers import capture_activations

            with capture_activations(model, layer) as cap, torch.no_grad():
                model(x)
            mask = emb.active_mask(pool_activation(cap[layer]).cpu())[:, g].to(x.device)
        else:
            mask = torch.ones(n, k, device=x.device)
        weighting = torch.eye(k, device=x.device).repeat_interleave(n, 0) * mask.repeat(k, 1)  # (k*N, k)
        rel = attr(x.repeat(k, *([1] * (x.ndim - 1))), weighting, layer=heat_layer)
    heat = rel.reshape(k, n, *rel.shape[1:]).transpose(0, 1)
    return heat, contrib * mask


class _Pool(nn.Module):
    """``(N, C, *spatial)`` → ``(N, C)`` average over positions (``(N, d)`` unchanged)."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return pool_activation(a)


def xfeature_layer_maps(model: nn.Module, layer: str, emb: Embedding, x: torch.Tensor, target: int,
                        method: str = "excitation-backprop", **params: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """x-feature maps at the explained layer itself (the paper stops Excitation Backprop at a conv layer).

    One plain forward of the model captures the layer's output ``a`` ``(N, C, h, w)``; LRP then runs only through
    pool → encoder → ``w ⊙ x`` on ``a`` replicated ``k`` times. Returns ``(maps (N, k, C, h, w), contributions
    (N, k))``; the maps equal those of :func:`xfeature_heatmaps` with ``heat_layer="model." + layer`` and sum to
    ``w_i x_i`` under conservative rules. Upsample ``maps.sum(2)`` to the image for display.
    """
    from semlens.layers import capture_activations, frozen

    if method not in PRESETS:
        raise ValueError(f"x-feature heatmaps need an LRP method; got {method!r} (choose from {', '.join(PRESETS)})")
    with frozen(model), capture_activations(model, layer) as cap, torch.no_grad():
        model(x)
    a = cap[layer]
    g, o = emb.group_of(target)
    w = emb.head_weights()[0][g, :, o].to(a.device)
    enc = emb.encoder_module(g).to(a.device)
    head = nn.Sequential(_Pool(), enc, XFeatureModel.diagonal(w))
    n, k = a.shape[0], emb.k
    if emb.method == "topk":
        mask = emb.active_mask(pool_activation(a).cpu())[:, g].to(a.device)
    else:
        mask = torch.ones(n, k, device=a.device)
    composite = preset(method, **params).with_rules({"2": Epsilon(0.0)})
    with Attributor(head, composite=composite) as attr:
        with torch.no_grad():
            contrib = head(a)
        weighting = torch.eye(k, device=a.device).repeat_interleave(n, 0) * mask.repeat(k, 1)
        rel = attr(a.repeat(k, *([1] * (a.ndim - 1))), weighting)
    return rel.reshape(k, n, *rel.shape[1:]).transpose(0, 1), contrib * mask


def positive_map(heat: torch.Tensor) -> torch.Tensor:
    """``(N, k, H, W)`` positive relevance per pixel from ``(N, k, C, H, W)`` (channels summed)."""
    return heat.sum(2).clamp(min=0) if heat.ndim == 5 else heat.clamp(min=0)


def concept_mass(heat: torch.Tensor, labels: dict[str, torch.Tensor], n_concepts: int) -> torch.Tensor:
    """Share of each map's positive mass inside each concept's mask.

    ``heat``: ``(N, k, H, W)`` non-negative maps; ``labels``: category → ``(N, H, W)`` int64 global concept numbers
    (0 = none; each category partitions the pixels). Returns ``(N, k, V)`` with ``V = n_concepts`` (column 0 unused).
    """
    n, k = heat.shape[:2]
    flat = heat.reshape(n, k, -1).double()
    total = flat.sum(-1, keepdim=True).clamp(min=1e-300)
    out = torch.zeros(n, k, n_concepts, dtype=torch.float64)
    for lab in labels.values():
        idx = lab.reshape(n, 1, -1).long().expand(n, k, -1)
        out.scatter_add_(2, idx, flat)
    out[..., 0] = 0
    return (out / total).float()


def distinctness(heat: torch.Tensor, top: float = 0.1) -> tuple[float, int]:
    """Mean pairwise IoU of the top-``top`` masks of the ``k`` maps of each image (``heat`` ``(N, k, H, W)``).

    Pairs where either map is all zero (x-feature silent on that image) are skipped. Returns ``(sum of IoUs,
    number of pairs)`` so callers can stream over batches.
    """
    n, k = heat.shape[:2]
    flat = heat.reshape(n, k, -1)
    q = max(1, int(round(top * flat.shape[-1])))
    thr = flat.topk(q, dim=-1).values[..., -1:]
    masks = ((flat >= thr) & (flat > 0)).float()
    inter = masks @ masks.transpose(1, 2)
    size = masks.sum(-1)
    union = size.unsqueeze(-1) + size.unsqueeze(-2) - inter
    live = (flat.sum(-1) > 0)
    pair = live.unsqueeze(-1) & live.unsqueeze(-2) & ~torch.eye(k, dtype=torch.bool).unsqueeze(0)
    iou = torch.where(pair, inter / union.clamp(min=1), torch.zeros_like(inter))
    return float(iou.sum() / 2), int(pair.sum()) // 2
