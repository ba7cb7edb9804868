"""Correction through named units (Dong et al. 2017), for any model.

1. :func:`reference_activations` — mean activation of each unit on training samples that contain a
   topic/concept (time-averaged first when features are sequences).
2. :func:`enhance` — add those reference activations to the units named by the topic, at every
   position (time step / spatial location) of a sample's representation: the immediate fix.
3. :func:`propagate` — correction propagation: fine-tune chosen parameters so that the model itself
   produces the enhanced representation, staying close to the old parameters:
   ``mean_n ||v'_n - v*_n||^2 + mu * ||theta' - theta||^2``.
   The data term takes Adam steps; the anchor term is applied as its exact proximal map
   ``theta <- (theta + 2 lr mu theta_0) / (1 + 2 lr mu)``, which is stable for any ``mu`` and leaves the
   parameters at ``theta_0`` as ``mu -> inf``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from semlens.layers import frozen
from semlens.streaming import forward_until

__all__ = ["reference_activations", "enhance", "propagate", "PropagationResult"]


def reference_activations(features: torch.Tensor, contains: torch.Tensor) -> torch.Tensor:
    """Mean activation per unit over the samples that contain a topic.

    features: ``(N, D)`` or ``(N, T, D)`` (sequences are averaged over T first; for image feature maps
    pass ``(N, D)`` spatial means). contains: ``(N,)`` bool. Returns ``(D,)``.
    """
    if features.dim() not in (2, 3):
        raise ValueError(f"features must be (N, D) or (N, T, D), got shape {tuple(features.shape)}")
    contains = torch.as_tensor(contains, dtype=torch.bool, device=features.device)
    if contains.shape != features.shape[:1]:
        raise ValueError(f"contains has shape {tuple(contains.shape)}, expected ({features.shape[0]},)")
    if not bool(contains.any()):
        raise ValueError("no sample contains the topic: its reference activation is undefined")
    per_sample = features.mean(dim=1) if features.dim() == 3 else features
    return per_sample[contains].mean(dim=0)


def enhance(
    v: torch.Tensor, units: torch.Tensor | Iterable[int], reference: torch.Tensor, dim: int = -1
) -> torch.Tensor:
    """Activation enhancement: ``v*`` equals ``v`` except ``v*[..., j] = v[..., j] + reference[j]`` for j in units.

    v: any shape with the unit axis at ``dim`` (``(T, D)``, ``(N, T, D)``, ``(N, C, H, W)`` with ``dim=1``).
    The addition is applied at every other index (every time step or location). Returns a new tensor.
    """
    units = torch.as_tensor(list(units) if not isinstance(units, torch.Tensor) else units, dtype=torch.long)
    n_units = v.shape[dim]
    if reference.shape != (n_units,):
        raise ValueError(f"reference has shape {tuple(reference.shape)}, expected ({n_units},)")
    if units.numel() and (units.min() < 0 or units.max() >= n_units):
        raise ValueError(f"unit indices must lie in [0, {n_units}), got {units.tolist()}")
    delta = torch.zeros(n_units, dtype=v.dtype, device=v.device)
    delta[units.to(v.device)] = reference.to(device=v.device, dtype=v.dtype)[units.to(v.device)]
    shape = [1] * v.dim()
    shape[dim] = n_units
    return v + delta.view(shape)


@dataclass
class PropagationResult:
    """Losses per step (``data`` = mean squared distance to v*, ``anchor`` = ||theta - theta_0||^2)."""

    data_loss: list[float] = field(default_factory=list)
    anchor: list[float] = field(default_factory=list)
    steps: int = 0


def propagate(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    representation: str | Callable[[nn.Module, torch.Tensor], torch.Tensor],
    params: Iterable[nn.Parameter] | None = None,
    mu: float = 1e-2,
    steps: int = 50,
    lr: float = 1e-4,
    batch_size: int | None = None,
    stop: Callable[[nn.Module], bool] | None = None,
) -> PropagationResult:
    """Correction propagation: fine-tune ``params`` (default: all parameters) of ``model`` in place.

    inputs: ``(N, ...)`` samples; targets: the enhanced representations ``v*`` with the shape the
    representation has for those inputs. ``representation`` is a dotted layer name (its output is
    read during ``model(x)``) or a callable ``(model, x) -> v``. Runs in eval mode (no dropout) with
    full-batch steps unless ``batch_size`` is given (then minibatches in a fixed order), so the result is
    deterministic. Modes and ``requires_grad`` flags are restored afterwards; ``stop(model)`` may end
    early. Returns the loss history.
    """
    if mu < 0 or steps < 0 or lr <= 0:
        raise ValueError(f"need mu >= 0, steps >= 0, lr > 0 (got mu={mu}, steps={steps}, lr={lr})")
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(f"{inputs.shape[0]} inputs but {targets.shape[0]} targets")
    if not torch.isfinite(targets).all():
        raise ValueError("targets contain NaN or Inf")
    chosen = list(params) if params is not None else list(model.parameters())
    if not chosen:
        raise ValueError("no parameters to fine-tune")
    anchors = [p.detach().clone() for p in chosen]
    result = PropagationResult()

    def represent(x: torch.Tensor) -> torch.Tensor:
        if callable(representation):
            return representation(model, x)
        return forward_until(model, x, [representation], detach=False)[representation]

    bs = batch_size or inputs.shape[0]
    saved_grads = [p.grad for p in chosen]
    with frozen(model):
        for p in chosen:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(chosen, lr=lr)
        shrink = 1.0 / (1.0 + 2.0 * lr * mu)
        for _ in range(steps):
            total = 0.0
            optimizer.zero_grad(set_to_none=True)
            for start in range(0, inputs.shape[0], bs):
                x, t = inputs[start:start + bs], targets[start:start + bs]
                v = represent(x)
                if v.shape != t.shape:
                    raise ValueError(f"representation has shape {tuple(v.shape)} but targets {tuple(t.shape)}")
                loss = (v - t).pow(2).flatten(1).sum(1).sum() / inputs.shape[0]
                loss.backward()
                total += float(loss.detach())
            optimizer.step()
            with torch.no_grad():
                for p, p0 in zip(chosen, anchors, strict=True):
                    p.mul_(shrink).add_(p0, alpha=1.0 - shrink)
                anchor = sum(float((p - p0).pow(2).sum()) for p, p0 in zip(chosen, anchors, strict=True))
            result.data_loss.append(total)
            result.anchor.append(anchor)
            result.steps += 1
            if stop is not None and stop(model):
                break
        for p, g in zip(chosen, saved_grads, strict=True):
            p.grad = g
    return result
