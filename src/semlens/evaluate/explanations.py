"""Explanation-quality metrics: batched tensor code with Quantus-style metadata.

Every metric takes a batch and returns one score per example, shape ``(N,)`` (float32/float64 on the
input's device); the comparison runner (:mod:`semlens.evaluate.compare`) averages them with bootstrap
confidence intervals. Definitions follow Samek et al. 2017 (region perturbation, AOPC), Arras et al. 2022
(relevance mass / rank accuracy), Montavon et al. 2018 (continuity), Adebayo et al. 2018 (randomisation),
Chalasani et al. 2020 (sparseness, Gini) and Bhatt et al. 2020 (complexity, entropy):

* **faithfulness** — region perturbation / pixel-flipping curves (:func:`perturbation_curve`), AOPC for
  MoRF, LeRF and random order (:func:`aopc`), selectivity = area under the MoRF curve of ``f``.
* **localisation** against ground-truth evidence — relevance mass accuracy, relevance rank accuracy
  (Arras et al. 2022) and the pointing game (Zhang et al. 2018).
* **robustness** — explanation continuity (Montavon et al. 2018).
* **randomisation** — the cascading model-parameter randomisation check (Adebayo et al. 2018).
* **complexity** — sparseness (Gini index) and complexity (entropy).

Conventions: inputs ``x`` are ``(N, C, H, W)`` float images in ``[low, high]`` (``[0, 1]`` in semlens);
attributions have the shape of ``x`` or are already pooled to ``(N, H, W)``; masks are ``(N, H, W)``
(or ``(N, 1, H, W)``) bool/0-1 tensors; ``target`` is an ``int`` or an ``(N,)`` integer tensor of class
indices; the scored quantity ``f`` is the target **logit** of ``model(x)`` (shape ``(N, n_classes)``).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from semlens.layers import frozen, get_module
from semlens.runtime import progress
from semlens.stats import spearman

__all__ = [
    "MetricInputError",
    "MetricInfo",
    "METRICS",
    "ExplainFn",
    "pool_channels",
    "patch_relevance",
    "patch_ranks",
    "make_baseline",
    "PerturbationCurve",
    "perturbation_curve",
    "aopc",
    "selectivity",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "pointing_game",
    "sparseness",
    "complexity",
    "continuity",
    "spearman",
    "RandomizationResult",
    "randomization_check",
    "parameter_layers",
]

ExplainFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""``explain(model, x, target) -> attribution`` with ``x: (N, C, H, W)``, ``target: (N,)`` int64."""

Pooling = Literal["sum", "max-norm", "l2-norm", "pos-sum"]
Order = Literal["morf", "lerf", "random"]


class MetricInputError(ValueError):
    """Inputs of an explanation metric that do not fit together (shapes, NaN, empty masks...)."""


@dataclass(frozen=True)
class MetricInfo:
    """Metadata of a metric: its name, score direction, family and a one-line definition."""

    name: str
    higher_is_better: bool
    category: str
    description: str


METRICS: dict[str, MetricInfo] = {
    m.name: m
    for m in (
        MetricInfo("relevance_mass_accuracy", True, "localisation",
                   "share of positive (channel-summed) relevance inside the evidence mask"),
        MetricInfo("relevance_rank_accuracy", True, "localisation",
                   "share of the |GT| most relevant pixels that lie in the evidence mask (chance = |GT|/HW)"),
        MetricInfo("pointing_game", True, "localisation", "the most relevant pixel lies in the evidence mask"),
        MetricInfo("aopc_morf", True, "faithfulness",
                   "area over the most-relevant-first region-perturbation curve of the target logit"),
        MetricInfo("aopc_lerf", False, "faithfulness",
                   "area over the least-relevant-first curve (a good map keeps the logit flat)"),
        MetricInfo("aopc_morf_minus_random", True, "faithfulness", "AOPC(MoRF) minus AOPC of a random patch order"),
        MetricInfo("selectivity", False, "faithfulness",
                   "area under the MoRF curve of the target logit (normalised by the number of steps)"),
        MetricInfo("continuity", False, "robustness",
                   "max ||R(x)-R(x')||_1 / (||R(x)||_1 ||x-x'||_2) over small perturbations keeping the class"),
        MetricInfo("randomization_spearman", False, "randomisation",
                   "mean Spearman correlation between explanations of the trained and cascade-randomised model"),
        MetricInfo("sparseness_gini", True, "complexity", "Gini index of |channel-summed relevance|"),
        MetricInfo("complexity_entropy", False, "complexity",
                   "entropy (nats) of normalised |channel-summed relevance|"),
    )
}


# ----------------------------------------------------------------------------------------- validation


def _check_finite(name: str, t: torch.Tensor) -> None:
    if not torch.is_tensor(t):
        raise MetricInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = (~torch.isfinite(t)).flatten(1).any(1).nonzero().flatten().tolist()
        raise MetricInputError(f"{name} contains NaN or infinite values (examples {bad[:10]})")


def _check_images(x: torch.Tensor) -> None:
    _check_finite("inputs", x)
    if x.dim() != 4 or not x.is_floating_point():
        raise MetricInputError(f"inputs must be a float tensor of shape (N, C, H, W), got {tuple(x.shape)} {x.dtype}")
    if x.shape[0] == 0:
        raise MetricInputError("inputs hold no examples (N = 0)")


def _check_attribution(attribution: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
    """Validate ``attribution`` ((N, C, H, W) or pooled (N, H, W)) against the inputs ``x``."""
    _check_finite("attribution", attribution)
    if attribution.dim() not in (3, 4):
        raise MetricInputError(f"attribution must be (N, C, H, W) or (N, H, W), got shape {tuple(attribution.shape)}")
    if x is not None:
        ok = attribution.shape == x.shape or (
            attribution.dim() == 3 and attribution.shape == (x.shape[0], *x.shape[2:])
        ) or (attribution.dim() == 4 and attribution.shape == (x.shape[0], 1, *x.shape[2:]))
        if not ok:
            raise MetricInputError(
                f"attribution shape {tuple(attribution.shape)} does not match input shape {tuple(x.shape)} "
                "(expected the input's shape, (N, 1, H, W) or (N, H, W))"
            )
    return attribution


def _check_masks(mask: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
    """Return ``mask`` as an ``(N, H, W)`` bool tensor; wrong size, non-binary or empty masks raise."""
    if not torch.is_tensor(mask):
        raise MetricInputError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dim() == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.shape != (n, h, w):
        raise MetricInputError(
            f"mask shape {tuple(mask.shape)} does not match the attribution: expected ({n}, {h}, {w})"
        )
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise MetricInputError("mask must be boolean or contain only 0 and 1")
        mask = mask.bool()
    empty = (~mask.flatten(1).any(1)).nonzero().flatten().tolist()
    if empty:
        raise MetricInputError(f"empty evidence mask for examples {empty[:10]}{' ...' if len(empty) > 10 else ''}")
    return mask


def _as_targets(target: int | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    if isinstance(target, int):
        return torch.full((n,), target, dtype=torch.long, device=device)
    if not torch.is_tensor(target) or target.dtype.is_floating_point or target.shape != (n,):
        shape = tuple(target.shape) if torch.is_tensor(target) else type(target).__name__
        raise MetricInputError(f"target must be an int or an ({n},) integer tensor, got {shape}")
    return target.to(device=device, dtype=torch.long)


def _target_logits(model: nn.Module, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if not torch.is_tensor(out) or out.dim() != 2:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise MetricInputError(f"model output must be (N, n_classes) logits, got {shape}")
    if int(t.min()) < 0 or int(t.max()) >= out.shape[1]:
        raise MetricInputError(f"target class out of range [0, {out.shape[1]}): {t.unique().tolist()[:10]}")
    return out.gather(1, t[:, None])[:, 0]


# ----------------------------------------------------------------------------------------- pooling


def pool_channels(attribution: torch.Tensor, pooling: Pooling = "sum") -> torch.Tensor:
    """Pool an attribution ``(N, C, H, W)`` to one value per pixel ``(N, H, W)``; ``(N, H, W)`` passes through.

    ``sum``: signed sum over channels (the CLEVR-XAI recommendation, clip afterwards where needed);
    ``pos-sum``: sum of positive parts; ``max-norm``: max of |R| over channels; ``l2-norm``: L2 over channels.
    """
    if attribution.dim() == 3:
        return attribution
    if attribution.dim() != 4:
        raise MetricInputError(f"attribution must be (N, C, H, W) or (N, H, W), got {tuple(attribution.shape)}")
    if pooling == "sum":
        return attribution.sum(1)
    if pooling == "pos-sum":
        return attribution.clamp_min(0).sum(1)
    if pooling == "max-norm":
        return attribution.abs().amax(1)
    if pooling == "l2-norm":
        return attribution.square().sum(1).sqrt()
    raise MetricInputError(f"unknown channel pooling {pooling!r}: use sum, pos-sum, max-norm or l2-norm")


# ----------------------------------------------------------------------------------------- perturbation


def _grid(h: int, w: int, patch_size: int, device: torch.device) -> tuple[int, int, torch.Tensor]:
    """Non-overlapping grid of ``patch_size`` squares (the last row/column may be narrower).

    Returns ``(gh, gw, pixel_to_patch)`` with ``pixel_to_patch: (H*W,)`` int64 row-major patch indices.
    """
    if patch_size < 1:
        raise MetricInputError(f"patch_size must be >= 1, got {patch_size}")
    gh, gw = math.ceil(h / patch_size), math.ceil(w / patch_size)
    rows = torch.arange(h, device=device) // patch_size
    cols = torch.arange(w, device=device) // patch_size
    return gh, gw, (rows[:, None] * gw + cols[None, :]).flatten()


def patch_relevance(attribution: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Channel-summed relevance summed over each patch of the non-overlapping grid: ``(N, gh*gw)``.

    The grid starts at the top-left corner; when ``H`` or ``W`` is not a multiple of ``patch_size`` the
    last patches are narrower (their relevance is the sum over the pixels they contain).
    """
    r = pool_channels(attribution, "sum")
    n, h, w = r.shape
    gh, gw, _ = _grid(h, w, patch_size, r.device)
    r = F.pad(r, (0, gw * patch_size - w, 0, gh * patch_size - h))
    return r.view(n, gh, patch_size, gw, patch_size).sum((2, 4)).flatten(1)


def patch_ranks(relevance: torch.Tensor, order: Order = "morf",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Position at which each patch is perturbed: ``(N, P)`` int64 in ``0..P-1``.

    ``morf``: most relevant first; ``lerf``: least relevant first (ties in index order, stable sort);
    ``random``: a uniformly random order per example drawn from ``generator`` (CPU generator).
    """
    n, p = relevance.shape
    if order == "morf":
        idx = relevance.argsort(dim=1, descending=True, stable=True)
    elif order == "lerf":
        idx = relevance.argsort(dim=1, stable=True)
    elif order == "random":
        idx = torch.rand(n, p, generator=generator).argsort(dim=1).to(relevance.device)
    else:
        raise MetricInputError(f"unknown perturbation order {order!r}: use morf, lerf or random")
    ranks = torch.empty_like(idx)
    ranks.scatter_(1, idx, torch.arange(p, device=idx.device).expand(n, p))
    return ranks


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    y = F.pad(x, (radius, radius, 0, 0), mode="replicate")
    y = F.conv2d(y, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    y = F.pad(y, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(y, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def make_baseline(x: torch.Tensor, kind: str | torch.Tensor = "uniform", *, generator: torch.Generator | None = None,
                  low: float = 0.0, high: float = 1.0, blur_sigma: float = 4.0) -> torch.Tensor:
    """The values a perturbed pixel takes: ``(N, C, H, W)``, fixed per image for the whole curve.

    ``uniform``: i.i.d. uniform noise in ``[low, high]`` (Samek et al.); ``mean``: each image's per-channel
    mean; ``blur``: a Gaussian blur of the image (``blur_sigma`` pixels); ``black``: ``low`` everywhere.
    A tensor broadcastable to ``x`` is used as is.
    """
    if torch.is_tensor(kind):
        _check_finite("baseline", kind)
        try:
            return torch.broadcast_to(kind.to(x), x.shape)
        except RuntimeError as err:
            raise MetricInputError(
                f"baseline of shape {tuple(kind.shape)} does not broadcast to {tuple(x.shape)}"
            ) from err
    if kind == "uniform":
        return (torch.rand(x.shape, generator=generator, dtype=x.dtype) * (high - low) + low).to(x.device)
    if kind == "mean":
        return x.mean((2, 3), keepdim=True).expand_as(x)
    if kind == "blur":
        return _gaussian_blur(x, blur_sigma)
    if kind == "black":
        return torch.full_like(x, low)
    raise MetricInputError(f"unknown perturbation baseline {kind!r}: use uniform, mean, blur, black or a tensor")


@dataclass
class PerturbationCurve:
    """Target logits while patches are replaced, step by step.

    ``scores: (N, L+1)`` — ``scores[:, k]`` is ``f`` after ``k * patches_per_step`` patches were perturbed
    (``k = 0`` is the clean input). ``n_patches`` patches of ``patch_size`` pixels tile the image.
    """

    scores: torch.Tensor
    order: str
    patch_size: int
    baseline: str
    n_patches: int
    patches_per_step: int = 1

    @property
    def steps(self) -> int:
        return self.scores.shape[1] - 1

    @property
    def fraction(self) -> torch.Tensor:
        """Fraction of patches perturbed at each step: ``(L+1,)``."""
        k = torch.arange(self.steps + 1, dtype=torch.float64) * self.patches_per_step
        return (k / self.n_patches).clamp(max=1.0)

    def aopc(self, normalize: bool = False) -> torch.Tensor:
        """AOPC per example ``(N,)``: ``mean_{k=0..L} (f(x^0) - f(x^k))`` (logit units).

        ``normalize=True`` divides by ``f(x^0)`` (Samek et al. 2017; meaningful only for positive scores).
        """
        drop = self.scores[:, :1] - self.scores
        out = drop.mean(1)
        return out / self.scores[:, 0] if normalize else out

    def auc(self) -> torch.Tensor:
        """Area under the curve of ``f`` per example ``(N,)`` (trapezoid over steps, divided by ``L``)."""
        if self.steps == 0:
            return self.scores[:, 0].clone()
        return torch.trapezoid(self.scores, dim=1) / self.steps


def perturbation_curve(
    model: nn.Module,
    x: torch.Tensor,
    target: int | torch.Tensor,
    attribution: torch.Tensor | None,
    *,
    order: Order = "morf",
    patch_size: int = 8,
    baseline: str | torch.Tensor = "uniform",
    steps: int | None = None,
    patches_per_step: int = 1,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    low: float = 0.0,
    high: float = 1.0,
    blur_sigma: float = 4.0,
    show_progress: bool | None = None,
) -> PerturbationCurve:
    """Region perturbation (pixel-flipping for ``patch_size=1``) curve of the target logit.

    The image is tiled by a non-overlapping grid of ``patch_size`` squares, ranked by patch-summed
    (channel-summed, signed) relevance. Step ``k`` replaces the first ``k * patches_per_step`` patches of the
    ranking by the ``baseline`` values (fixed per image, so a perturbed pixel stays perturbed with the same
    value). All ``N * (L+1)`` perturbed inputs are built from cumulative masks of the ranks and evaluated in
    batched forward passes of ``batch_size`` inputs (no loop over images or steps).

    x: (N, C, H, W) in ``[low, high]``; attribution: x's shape or (N, H, W) (ignored, may be None, for
    ``order="random"``); ``steps`` defaults to ``min(100, ceil(P / patches_per_step))``.
    Returns a :class:`PerturbationCurve` with ``scores: (N, L+1)`` on x's device.
    """
    _check_images(x)
    n, _, h, w = x.shape
    if attribution is None:
        if order != "random":
            raise MetricInputError(f"order {order!r} needs an attribution")
        attribution = torch.zeros(n, h, w, device=x.device)
    _check_attribution(attribution, x)
    if patches_per_step < 1 or batch_size < 1:
        raise MetricInputError("patches_per_step and batch_size must be >= 1")
    t = _as_targets(target, n, x.device)
    gh, gw, pix2patch = _grid(h, w, patch_size, x.device)
    n_patches = gh * gw
    max_steps = math.ceil(n_patches / patches_per_step)
    if steps is None:
        steps = min(100, max_steps)
    if not 0 <= steps <= max_steps:
        raise MetricInputError(
            f"steps={steps} exceeds the {max_steps} steps available: {n_patches} patches of {patch_size}px "
            f"in a {h}x{w} image, {patches_per_step} per step"
        )
    # baseline first: with one seed, every order (random included) perturbs with the same noise values
    base = make_baseline(x, baseline, generator=generator, low=low, high=high, blur_sigma=blur_sigma)
    ranks = patch_ranks(patch_relevance(attribution.to(x.device), patch_size), order, generator)
    n_steps = steps + 1
    total = n * n_steps
    scores = torch.empty(total, dtype=torch.float32, device=x.device)
    starts = range(0, total, batch_size)
    with frozen(model), torch.no_grad():
        for start in progress(starts, total=len(starts), desc=f"perturbation ({order})", enabled=show_progress):
            idx = torch.arange(start, min(start + batch_size, total), device=x.device)
            img, k = idx // n_steps, idx % n_steps
            perturbed = ranks[img] < (k * patches_per_step)[:, None]  # (B, P) cumulative patch masks
            pix = perturbed[:, pix2patch].view(-1, 1, h, w)
            scores[idx] = _target_logits(model, torch.where(pix, base[img], x[img]), t[img]).float()
    name = baseline if isinstance(baseline, str) else "tensor"
    return PerturbationCurve(scores.view(n, n_steps), order, patch_size, name, n_patches, patches_per_step)


def aopc(model: nn.Module, x: torch.Tensor, target: int | torch.Tensor, attribution: torch.Tensor, *,
         order: Order = "morf", normalize: bool = False, **kwargs: object) -> torch.Tensor:
    """AOPC per example ``(N,)`` of the ``order`` curve (see :func:`perturbation_curve` for the options)."""
    return perturbation_curve(model, x, target, attribution, order=order, **kwargs).aopc(normalize)  # type: ignore[arg-type]


def selectivity(model: nn.Module, x: torch.Tensor, target: int | torch.Tensor, attribution: torch.Tensor, *,
                patch_size: int = 8, baseline: str | torch.Tensor = "black", **kwargs: object) -> torch.Tensor:
    """Explanation selectivity (Montavon et al. 2018): area under the MoRF curve of ``f``, ``(N,)``; lower is better.

    Defaults follow Quantus ``Selectivity`` (8-pixel patches, black baseline).
    """
    return perturbation_curve(model, x, target, attribution, order="morf", patch_size=patch_size,
                              baseline=baseline, **kwargs).auc()  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------- localisation


def _pooled_with_mask(attribution: torch.Tensor, mask: torch.Tensor,
                      pooling: Pooling) -> tuple[torch.Tensor, torch.Tensor]:
    _check_attribution(attribution)
    r = pool_channels(attribution, pooling)
    n, h, w = r.shape
    return r, _check_masks(mask.to(r.device), n, h, w)


def relevance_mass_accuracy(attribution: torch.Tensor, mask: torch.Tensor, pooling: Pooling = "sum") -> torch.Tensor:
    """Relevance mass accuracy ``(N,)`` in [0, 1]: positive relevance inside the mask / all positive relevance.

    Channels are pooled first (default: signed sum), then negative values are clipped to 0 (CLEVR-XAI).
    An attribution with no positive relevance scores 0.
    """
    r, m = _pooled_with_mask(attribution, mask, pooling)
    r = r.clamp_min(0)
    total = r.sum((1, 2))
    within = (r * m).sum((1, 2))
    return torch.where(total > 0, within / total.clamp_min(torch.finfo(r.dtype).tiny), torch.zeros_like(total))


def relevance_rank_accuracy(attribution: torch.Tensor, mask: torch.Tensor, pooling: Pooling = "sum") -> torch.Tensor:
    """Relevance rank accuracy ``(N,)`` in [0, 1]: share of the ``K = |GT|`` top-ranked pixels inside the mask.

    Pixels tied with the ``K``-th largest value share the remaining top-``K`` places in proportion (the
    expectation under random tie-breaking), so a constant map scores exactly the chance level ``K / (H*W)``.
    """
    r, m = _pooled_with_mask(attribution, mask, pooling)
    r, m = r.flatten(1), m.flatten(1)
    k = m.sum(1)
    kth = r.sort(dim=1, descending=True).values.gather(1, (k - 1)[:, None])
    greater, equal = r > kth, r == kth
    n_greater = greater.sum(1)
    hits = (greater & m).sum(1) + (k - n_greater) * (equal & m).sum(1) / equal.sum(1)
    return hits.to(r.dtype) / k


def _disk_dilate(m: torch.Tensor, radius: int) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, device=m.device)
    disk = ((t[:, None] ** 2 + t[None, :] ** 2) <= radius**2).float()
    return F.conv2d(m[:, None].float(), disk[None, None], padding=radius)[:, 0] > 0


def pointing_game(attribution: torch.Tensor, mask: torch.Tensor, tolerance: int = 0,
                  pooling: Pooling = "sum") -> torch.Tensor:
    """Pointing game ``(N,)``: 1 when the maximum of the pooled map falls inside the mask (dilated by a disk of
    ``tolerance`` pixels, Zhang et al. use 15 at 224 px), else 0; ties at the maximum give the hit fraction.
    """
    r, m = _pooled_with_mask(attribution, mask, pooling)
    if tolerance > 0:
        m = _disk_dilate(m, tolerance)
    at_max = r == r.amax((1, 2), keepdim=True)
    return (at_max & m).sum((1, 2)).to(r.dtype) / at_max.sum((1, 2))


# ----------------------------------------------------------------------------------------- complexity


def _abs_map(attribution: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    _check_attribution(attribution)
    return pool_channels(attribution, pooling).abs().flatten(1)


def sparseness(attribution: torch.Tensor, pooling: Pooling = "sum") -> torch.Tensor:
    """Gini index of ``|pooled relevance|`` per example ``(N,)`` in [0, 1 - 1/HW]; higher = sparser.

    ``G = sum_i (2i - n - 1) a_(i) / (n sum_i a_i)`` with ``a`` sorted ascending (Chalasani et al. 2020);
    an all-zero map scores 0 (like a uniform one).
    """
    a = _abs_map(attribution, pooling).sort(dim=1).values
    n = a.shape[1]
    i = torch.arange(1, n + 1, device=a.device, dtype=a.dtype)
    total = a.sum(1)
    g = ((2 * i - n - 1) * a).sum(1) / (n * total.clamp_min(torch.finfo(a.dtype).tiny))
    return torch.where(total > 0, g, torch.zeros_like(g))


def complexity(attribution: torch.Tensor, pooling: Pooling = "sum") -> torch.Tensor:
    """Entropy (nats) of ``p = |pooled relevance| / sum`` per example ``(N,)`` in [0, log HW]; lower = simpler.

    An all-zero map is treated as uniform (``log HW``).
    """
    a = _abs_map(attribution, pooling)
    total = a.sum(1, keepdim=True)
    p = torch.where(total > 0, a / total.clamp_min(torch.finfo(a.dtype).tiny), torch.full_like(a, 1.0 / a.shape[1]))
    return -torch.xlogy(p, p).sum(1)


# ----------------------------------------------------------------------------------------- continuity


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate images by (dy, dx) pixels, repeating the border (replicate padding)."""
    h, w = x.shape[-2:]
    p = F.pad(x, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode="replicate")
    top, left = max(-dy, 0), max(-dx, 0)
    return p[..., top:top + h, left:left + w]


def continuity(
    model: nn.Module,
    x: torch.Tensor,
    target: int | torch.Tensor,
    explain_fn: ExplainFn,
    *,
    attribution: torch.Tensor | None = None,
    perturbation: Literal["noise", "translate"] = "noise",
    n_perturbations: int = 8,
    noise_std: float = 0.02,
    reduce: Literal["max", "mean"] = "max",
    normalize: bool = True,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
    low: float = 0.0,
    high: float = 1.0,
) -> torch.Tensor:
    """Explanation continuity (Montavon et al. 2018), ``(N,)``, lower is better.

    For each example, ``n_perturbations`` nearby inputs ``x'`` are made (``noise``: Gaussian noise of
    ``noise_std`` clipped to ``[low, high]``; ``translate``: shifts by 1, 1, 2, 2, ... pixels alternately along
    W and H, border repeated). Among those whose predicted class equals that of ``x``, the ratio
    ``||R(x) - R(x')||_1 / ||x - x'||_2`` is reduced by ``max`` (the paper's definition) or ``mean``.
    ``normalize`` divides by ``||R(x)||_1`` so that methods with different relevance scales compare.
    Examples without a valid perturbation score NaN.
    """
    _check_images(x)
    n = x.shape[0]
    t = _as_targets(target, n, x.device)
    if n_perturbations < 1:
        raise MetricInputError("n_perturbations must be >= 1")
    a0 = explain_fn(model, x, t) if attribution is None else attribution
    _check_attribution(a0, x)
    a0 = a0.detach()
    if perturbation == "noise":
        noise = torch.randn((n_perturbations, *x.shape), generator=generator, dtype=x.dtype).to(x.device)
        xp = (x[None] + noise_std * noise).clamp(low, high)
    elif perturbation == "translate":
        shifts = [((i // 2 + 1) if i % 2 else 0, (i // 2 + 1) if i % 2 == 0 else 0) for i in range(n_perturbations)]
        xp = torch.stack([_shift(x, dy, dx) for dy, dx in shifts])
    else:
        raise MetricInputError(f"unknown continuity perturbation {perturbation!r}: use noise or translate")
    xp = xp.flatten(0, 1)  # (S*N, C, H, W), perturbation-major
    tp = t.repeat(n_perturbations)
    with frozen(model), torch.no_grad():
        pred = torch.cat([model(c).argmax(1) for c in x.split(batch_size)])
        pred_p = torch.cat([model(c).argmax(1) for c in xp.split(batch_size)])
    chunks = zip(xp.split(batch_size), tp.split(batch_size), strict=True)
    ap = torch.cat([explain_fn(model, xc, tc).detach() for xc, tc in chunks])
    num = (ap.view(n_perturbations, n, -1) - a0.reshape(1, n, -1)).abs().sum(2)
    den = (xp.view(n_perturbations, n, -1) - x.reshape(1, n, -1)).norm(dim=2)
    ratio = num / den.clamp_min(1e-12)
    if normalize:
        ratio = ratio / a0.reshape(n, -1).abs().sum(1).clamp_min(1e-12)
    valid = (pred_p.view(n_perturbations, n) == pred[None]) & (den > 0)
    if reduce == "max":
        out = torch.where(valid, ratio, torch.full_like(ratio, -math.inf)).amax(0)
    elif reduce == "mean":
        out = (ratio * valid).sum(0) / valid.sum(0)
    else:
        raise MetricInputError(f"unknown reduce {reduce!r}: use max or mean")
    return torch.where(valid.any(0), out, torch.full_like(out, math.nan))


# ----------------------------------------------------------------------------------------- randomisation


def parameter_layers(model: nn.Module) -> list[str]:
    """Dotted names of modules owning parameters directly, in registration (≈ forward) order."""
    return [name for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]


@dataclass
class RandomizationResult:
    """Cascading randomisation: ``correlations[:, i]`` compares the trained model's explanation with the one
    after randomising ``layers[0..i]`` (top layer first); shape ``(N, n_layers)`` float64."""

    layers: list[str]
    correlations: torch.Tensor

    def score(self) -> torch.Tensor:
        """Mean correlation over the cascade, ``(N,)``; lower = the explanation depends more on the model."""
        return self.correlations.mean(1)


def randomization_check(
    model: nn.Module,
    x: torch.Tensor,
    target: int | torch.Tensor,
    explain_fn: ExplainFn | Mapping[str, ExplainFn],
    *,
    layers: Sequence[str] | None = None,
    attributions: torch.Tensor | Mapping[str, torch.Tensor] | None = None,
    absolute: bool = True,
    seed: int = 0,
) -> RandomizationResult | dict[str, RandomizationResult]:
    """Model-parameter randomisation sanity check (Adebayo et al. 2018), cascading from the top layer.

    One deep copy of ``model`` is made; its layers (``layers``, default :func:`parameter_layers` reversed, so
    the output layer first) are re-randomised in place one after the other, cumulatively: each parameter of
    the layer is replaced by ``N(0, sigma^2)`` noise with ``sigma`` the trained tensor's standard deviation
    (a seeded CPU generator, so every call randomises identically). After each layer, every explainer in
    ``explain_fn`` (a function or a ``name -> function`` mapping, all sharing the copy) explains ``x`` again
    and the Spearman correlation with the trained model's explanation is recorded (channel-summed maps,
    absolute values when ``absolute``). The user's model is never modified.

    x: (N, C, H, W); returns a :class:`RandomizationResult` (or a dict of them for a mapping).
    """
    _check_images(x)
    t = _as_targets(target, x.shape[0], x.device)
    fns = dict(explain_fn) if isinstance(explain_fn, Mapping) else {"": explain_fn}
    if attributions is None:
        given: dict[str, torch.Tensor] = {}
    elif isinstance(attributions, Mapping):
        given = dict(attributions)
    else:
        given = {"": attributions}

    def pooled(a: torch.Tensor) -> torch.Tensor:
        _check_attribution(a, x)
        r = pool_channels(a.detach(), "sum")
        return r.abs() if absolute else r

    original = {k: pooled(given[k] if k in given else fn(model, x, t)) for k, fn in fns.items()}
    names = list(layers) if layers is not None else parameter_layers(model)[::-1]
    if not names:
        raise MetricInputError(f"{type(model).__name__} has no layer with parameters to randomise")
    for name in names:
        get_module(model, name)  # unknown names raise before any work
    twin = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    corr: dict[str, list[torch.Tensor]] = {k: [] for k in fns}
    for name in progress(names, total=len(names), desc="randomisation"):
        with torch.no_grad():
            for p in get_module(twin, name).parameters(recurse=False):
                sigma = float(p.std()) if p.numel() > 1 else float(p.abs().max())
                noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
                p.copy_((noise * (sigma if sigma > 0 else 1e-2)).to(p))
        for k, fn in fns.items():
            corr[k].append(spearman(original[k], pooled(fn(twin, x, t))))
    results = {k: RandomizationResult(names, torch.stack(v, 1)) for k, v in corr.items()}
    return results if isinstance(explain_fn, Mapping) else results[""]
