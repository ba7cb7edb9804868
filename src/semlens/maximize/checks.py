"""Self-checks reported with every prototype.

* ``ratio``: the unit's activation on the prototype ÷ its maximum over the dataset images;
* ``loglik_heldout``: the prototype's log-likelihood per input dimension (nats) under a density
  model fitted on held-out images and never used as an expert (a PCA-Gaussian with few components);
* ``path_similarity`` (in the spirit of Geirhos et al. 2023): the cosine between the unit's
  contributions from the channels of an earlier layer (gradient × activation, summed over space)
  on the prototype and on the mean of its top-k natural images. A low value flags a prototype that
  excites the unit through other intermediate units than natural images do.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from semlens.layers import capture_activations, frozen
from semlens.maximize.experts import GaussianExpert, fit_gaussian
from semlens.maximize.objectives import unit_objective

__all__ = ["unit_scores", "heldout_density", "path_vectors", "self_checks", "SelfChecks", "previous_layer"]


def unit_scores(model: nn.Module, layer: str, kind: str, images: Tensor, batch_size: int = 128,
                device: str | torch.device = "cpu") -> Tensor:
    """(N, C) score of every unit of ``layer`` on every image: channel mean over space (``"channel"``),
    centre position (``"neuron"``) or the raw (N, C) output (``"class"``)."""
    def reduce(_name: str, a: Tensor) -> Tensor:
        if a.dim() == 2:
            return a
        if kind == "neuron":
            return a[:, :, a.shape[2] // 2, a.shape[3] // 2]
        return a.reshape(a.shape[0], a.shape[1], -1).mean(dim=2)

    out = []
    with frozen(model), torch.no_grad(), capture_activations(model, [layer], transform=reduce) as acts:
        for s in range(0, images.shape[0], batch_size):
            model(images[s:s + batch_size].to(device))
            out.append(acts[layer].float().cpu())
    return torch.cat(out)


def heldout_density(images: Tensor, k: int = 16, seed: int = 0) -> GaussianExpert:
    """The held-out density: a PCA-Gaussian with ``k`` components on ``images`` (N, C, H, W)."""
    return fit_gaussian(images, k=k, seed=seed)


def previous_layer(model: nn.Module, layer: str) -> str | None:
    """The conv layer before ``layer`` in ``model.conv_layers`` (None when there is none)."""
    names = list(getattr(model, "conv_layers", []) or [])
    if layer in names and names.index(layer) > 0:
        return names[names.index(layer) - 1]
    return None


def path_vectors(model: nn.Module, layer: str, kind: str, units: Tensor, images: Tensor, via: str,
                 device: str | torch.device = "cpu") -> Tensor:
    """(B, C_via) contributions of the channels of ``via`` to unit ``units[b]`` on ``images[b]``:
    Σ over space of activation × ∂unit/∂activation."""
    obj = unit_objective(kind, layer, units)
    with frozen(model), capture_activations(model, [via, layer], detach=False) as acts:
        x = images.to(device).detach().requires_grad_(True)  # builds the graph through the frozen model
        model(x)
        mid = acts[via]
        f = obj({layer: acts[layer]})
        (grad,) = torch.autograd.grad(f.sum(), mid)
        contrib = (grad * mid).detach()
    return contrib.reshape(contrib.shape[0], contrib.shape[1], -1).sum(dim=2).float().cpu()


@dataclass
class SelfChecks:
    """Per prototype (U,): activation, dataset_max, ratio, loglik_heldout (nats/dim), path_similarity
    (NaN when no earlier layer is known); top (U, k) indices of each unit's top natural images."""

    activation: Tensor
    dataset_max: Tensor
    ratio: Tensor
    loglik_heldout: Tensor
    path_similarity: Tensor
    top: Tensor


def self_checks(model: nn.Module, layer: str, kind: str, units: Sequence[int] | Tensor, prototypes: Tensor,
                images: Tensor, heldout: GaussianExpert, *, scores: Tensor | None = None, top_k: int = 9,
                via: str | None = None, device: str | torch.device = "cpu") -> SelfChecks:
    """Checks of ``prototypes`` (U, C, H, W), one per unit of ``units``, against ``images`` (N, C, H, W)
    (``scores``: their precomputed :func:`unit_scores`)."""
    units = torch.as_tensor(units, dtype=torch.long)
    scores = unit_scores(model, layer, kind, images, device=device) if scores is None else scores
    dataset_max = scores.max(dim=0).values[units]
    act = unit_scores(model, layer, kind, prototypes, device=device)[torch.arange(len(units)), units]
    ratio = act / dataset_max.where(dataset_max.abs() > 1e-12, torch.full_like(dataset_max, float("nan")))
    dims = prototypes[0].numel()
    with torch.no_grad():
        loglik = heldout.log_prob(prototypes.cpu().float()) / dims
    k = min(top_k, images.shape[0])
    top = scores[:, units].topk(k, dim=0).indices.T  # (U, k)
    via = via if via is not None else previous_layer(model, layer)
    sim = torch.full((len(units),), float("nan"))
    if via is not None:
        proto_path = path_vectors(model, layer, kind, units, prototypes, via, device)
        nat = path_vectors(model, layer, kind, units.repeat_interleave(k), images[top.reshape(-1)], via, device)
        nat = torch.nn.functional.normalize(nat, dim=1).reshape(len(units), k, -1).mean(dim=1)
        sim = torch.nn.functional.cosine_similarity(proto_path, nat, dim=1)
    return SelfChecks(act, dataset_max, ratio, loglik, sim, top)
