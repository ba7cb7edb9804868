"""Heatmaps of x-features: LRP (or Excitation Backprop) from each contribution ``w_i x_i`` through the embedding's
encoder into the CNN, for all ``k`` x-features of a batch in one forward and one batched backward.

:class:`XFeatureModel` is an ``nn.Module`` of standard layers mapping images ``(N, 3, H, W)`` to the contributions
``(N, k)`` of one explained class (the model's forward with the layer's output captured, average pooling for conv
maps, the encoder with the standardisation folded into its first layer, and a diagonal layer ``w ⊙ x``).

Every LRP rule's backward is linear in the relevance it receives once the forward has fixed its ratios (``z / z'``
with the stabilisers, the ReLU gates, the max-pool winners), so the ``k`` maps are one forward of the batch and one
backward batched over the ``k`` seeds ``one-hot(i)`` (:class:`~semlens.explain.Attributor` with an ``(k, N, k)``
target). The CNN runs forward once, not ``k`` times; its backward runs ``k`` times (each map needs its own transposed
convolutions), so the cost is about ``(F + k·B) / (F + B)`` of one LRP pass (``F``, ``B``: forward and backward of an
LRP pass). With conservative rules (``zero_params="bias"`` or ``excitation-backprop``) the map of x-feature ``i`` sums
to ``w_i x_i``, and since relevance is linear in the seed the ``k`` maps sum to the map of the rebuilt decision
``Σ_i w_i x_i``.

:class:`XFeatureExplainer` keeps the model prepared (probed, BatchNorm folded, rules bound) for many batches;
:func:`xfeature_heatmaps` is the one-call form.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from semlens.embed.activations import pool_activation
from semlens.embed.base import Embedding
from semlens.explain import PRESETS, Attributor, Composite, Epsilon, preset
from semlens.layers import get_module

__all__ = ["XFeatureModel", "XFeatureExplainer", "xfeature_heatmaps", "xfeature_layer_maps", "concept_mass",
           "distinctness", "HEATMAP_METHOD"]

#: The default rule set for x-feature maps: ε on dense layers (the SRAE encoder and the CNN's classifier), γ = 0.25
#: on convolutions, the box rule on the first one. Why not the paper's Excitation Backprop: it applies the positive-
#: weight rule to the encoder's dense layers too, so the k maps of an image come out alike (top-10 % IoU 0.99–1.0
#: between x-features on the concept world) and they fall less on the concepts (mass accuracy 0.27–0.31 vs 0.46–0.48,
#: evidence concepts recovered 0.46–0.54 vs 0.62–0.67; docs/embed.md). Excitation Backprop (``method=
#: "excitation-backprop"``) is conservative (the maps sum to ``w_i x_i``); with this default the biases absorb part
#: of the relevance, so the maps show *where* and the contributions ``w_i x_i`` say *how much*.
HEATMAP_METHOD = "epsilon-gamma-box"


class XFeatureModel(nn.Module):
    """Images ``(N, 3, H, W)`` → contributions ``(N, k)`` of one class (see module docstring).

    After each forward, ``pooled`` holds the (pooled) layer activations ``(N, d)`` and ``contributions`` the output
    ``(N, k)``, both detached, so a caller gets them from the attribution's own forward.
    """

    def __init__(self, model: nn.Module, layer: str, encoder: nn.Module, weight: torch.Tensor) -> None:
        super().__init__()
        get_module(model, layer)
        self.model = model
        self.layer = layer
        self.encoder = encoder
        self.weigh = self.diagonal(weight)
        self.pooled: torch.Tensor | None = None
        self.contributions: torch.Tensor | None = None

    @staticmethod
    def diagonal(weight: torch.Tensor) -> nn.Linear:
        """``x ↦ w ⊙ x`` as a bias-free ``nn.Linear`` (so LRP sees a standard layer)."""
        k = weight.shape[0]
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        lin = nn.Linear(k, k, bias=False, device=weight.device, dtype=dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.diag(weight.to(dtype)))
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
        z = pool_activation(store["a"])
        out = self.weigh(self.encoder(z))
        self.pooled, self.contributions = z.detach(), out.detach()
        return out


def xfeature_model(model: nn.Module, layer: str, emb: Embedding, target: int) -> tuple[XFeatureModel, int]:
    """The :class:`XFeatureModel` explaining class ``target`` and the embedding group it uses."""
    g, o = emb.group_of(target)
    w = emb.head_weights()[0][g, :, o]
    p = next(model.parameters())  # encoder and weighting follow the model's device and dtype
    enc = emb.encoder_module(g).to(device=p.device, dtype=p.dtype)
    return XFeatureModel(model, layer, enc, w.to(device=p.device, dtype=p.dtype)), g


def _check_method(method: str) -> None:
    if method not in PRESETS:
        raise ValueError(f"x-feature heatmaps need an LRP method; got {method!r} (choose from {', '.join(PRESETS)})")


def _seeds(k: int, n: int, like: torch.Tensor) -> torch.Tensor:
    """``(k, N, k)`` output weightings: replica ``i`` seeds x-feature ``i`` of every sample."""
    return torch.eye(k, dtype=like.dtype, device=like.device).unsqueeze(1).expand(k, n, k).contiguous()


def _silence(emb: Embedding, g: int, pooled: torch.Tensor, heat: torch.Tensor,
             contrib: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the maps and contributions of x-features a TopK embedding did not select (``heat`` ``(N, k, ...)``)."""
    if emb.method != "topk":
        return heat, contrib
    mask = emb.active_mask(pooled.cpu())[:, g].to(device=heat.device, dtype=heat.dtype)  # (N, k)
    return heat * mask.view(*mask.shape, *([1] * (heat.ndim - 2))), contrib * mask


class XFeatureExplainer:
    """Heatmaps of every x-feature of class ``target`` for many batches, with the model prepared once.

    A context manager: on entry it builds the :class:`XFeatureModel` and an :class:`~semlens.explain.Attributor`
    whose probe, BatchNorm folding and rule binding happen on the first batch and are reused while the input shape
    stays the same; on exit every edit of the model is undone. ``method``: an LRP preset (default
    :data:`HEATMAP_METHOD`; ``excitation-backprop`` as in the paper); ``params``: its parameters (e.g.
    ``zero_params="bias"``). The diagonal ``w ⊙ x`` gets LRP-0, which passes relevance unchanged (a positive-weight
    rule would drop ``w_i < 0``).

    Example::

        with XFeatureExplainer(model, "features.relu5", srae, target=3) as xf:
            for x in batches:
                heat, contrib = xf(x)        # (N, k, 3, H, W), (N, k)
    """

    def __init__(self, model: nn.Module, layer: str, emb: Embedding, target: int,
                 method: str = HEATMAP_METHOD, **params: Any) -> None:
        _check_method(method)
        self.net, self.group = xfeature_model(model, layer, emb, target)
        self.emb, self.k = emb, emb.k
        self.composite = preset(method, **params).with_rules({"weigh": Epsilon(0.0)})
        self._attr: Attributor | None = None

    def __enter__(self) -> XFeatureExplainer:
        self._attr = Attributor(self.net, composite=self.composite).__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        attr, self._attr = self._attr, None
        if attr is not None:
            attr.__exit__(*exc)

    def __call__(self, x: torch.Tensor, heat_layer: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Maps and contributions for the image batch ``x`` ``(N, 3, H, W)``.

        Returns ``(heat, contributions)``: ``heat`` ``(N, k, *shape)`` with ``shape`` the input's (``(3, H, W)``) or
        ``heat_layer``'s output shape (a name inside :class:`XFeatureModel`, e.g. ``"model.features.conv3"``, to stop
        at a conv layer as the paper does); ``contributions`` ``(N, k)`` = ``w_i x_i`` (zero for x-features a TopK
        embedding did not select, whose maps are zero too). Relevance units: those of the logit (LRP's relevance of
        an output is its value).
        """
        if self._attr is None:
            raise RuntimeError("use XFeatureExplainer as a context manager: `with XFeatureExplainer(...) as xf:`")
        p = next(self.net.parameters())
        rel = self._attr(x, _seeds(self.k, x.shape[0], p), layer=heat_layer)  # (k, N, ...): one batched backward
        assert self.net.pooled is not None and self.net.contributions is not None
        heat = rel.transpose(0, 1)  # (N, k, ...) view
        return _silence(self.emb, self.group, self.net.pooled, heat, self.net.contributions)


def xfeature_heatmaps(model: nn.Module, layer: str, emb: Embedding, x: torch.Tensor, target: int,
                      method: str = HEATMAP_METHOD, heat_layer: str | None = None,
                      **params: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Heatmaps of every x-feature of class ``target`` for the image batch ``x`` ``(N, 3, H, W)``, in one call.

    Same results as :class:`XFeatureExplainer` (see there for shapes and units); use that class to explain many
    batches without preparing the model each time.
    """
    with XFeatureExplainer(model, layer, emb, target, method, **params) as xf:
        return xf(x, heat_layer=heat_layer)


class _Pool(nn.Module):
    """``(N, C, *spatial)`` → ``(N, C)`` average over positions (``(N, d)`` unchanged)."""

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        return pool_activation(a)


def xfeature_layer_maps(model: nn.Module, layer: str, emb: Embedding, x: torch.Tensor, target: int,
                        method: str = HEATMAP_METHOD, **params: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """x-feature maps at the explained layer itself (the paper stops Excitation Backprop at a conv layer).

    One plain forward of the model captures the layer's output ``a`` ``(N, C, h, w)``; LRP then runs only through
    pool → encoder → ``w ⊙ x`` on ``a``, one forward and one backward batched over the ``k`` seeds. Returns
    ``(maps (N, k, C, h, w), contributions (N, k))``; the maps equal those of :func:`xfeature_heatmaps` with
    ``heat_layer="model." + layer`` and sum to ``w_i x_i`` under conservative rules. Upsample ``maps.sum(2)`` to the
    image for display.
    """
    from semlens.layers import capture_activations, frozen

    _check_method(method)
    with frozen(model), capture_activations(model, layer) as cap, torch.no_grad():
        model(x)
    a = cap[layer]
    g, o = emb.group_of(target)
    w = emb.head_weights()[0][g, :, o].to(device=a.device, dtype=a.dtype)
    enc = emb.encoder_module(g).to(device=a.device, dtype=a.dtype)
    head = nn.Sequential(_Pool(), enc, XFeatureModel.diagonal(w))
    full = preset(method, **params)  # its input-layer rule (box, flat) is for pixels: at the layer it has no place
    composite = Composite(full.layer_map, [], full.name_map, full.name).with_rules({"2": Epsilon(0.0)})
    with Attributor(head, composite=composite) as attr:
        rel = attr(a, _seeds(emb.k, a.shape[0], a))
        with torch.no_grad():
            contrib = head(a)
    return _silence(emb, g, pool_activation(a), rel.transpose(0, 1), contrib)


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
