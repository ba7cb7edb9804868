"""Correcting an image classifier through units named by Network Dissection.

A remark "image S misses concept C" becomes:

1. the units of the probed layer whose dissection label is C (``units.csv``, IoU above a threshold);
2. their reference activation: the mean (over locations, then over training images that contain C)
   of each unit's activation — one streamed pass over a Broden-format dataset for all concepts at once;
3. activation enhancement: those channels of S's feature map get the reference added at every location
   (the immediate fix: the prediction from the enhanced map);
4. correction propagation: the parameters of the layers up to the probed layer are fine-tuned so that
   the model itself produces the enhanced map (:func:`semlens.correct.engine.propagate`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from semlens.artefacts import model_signature
from semlens.correct.engine import PropagationResult, enhance, propagate
from semlens.correct.references import ConceptReferences
from semlens.layers import HookHandles, capture_activations, frozen, get_module, patch_activations
from semlens.units.names import UnitNames

__all__ = ["UnitNames", "ConceptReferences", "ClassifierCorrector", "fit_references", "parameters_up_to"]


def parameters_up_to(model: nn.Module, layer: str, example: torch.Tensor) -> list[nn.Parameter]:
    """Parameters of the modules that run before ``layer`` finishes (``layer`` included), found by running
    ``model(example)`` once with hooks (removed afterwards)."""
    target = get_module(model, layer)
    seen: list[nn.Module] = []
    done = {"flag": False}

    def pre(module: nn.Module, _inputs: object) -> None:
        if not done["flag"]:
            seen.append(module)

    def post(_module: nn.Module, _inputs: object, _output: object) -> None:
        done["flag"] = True

    with HookHandles() as handles, torch.no_grad(), frozen(model):
        for m in model.modules():
            handles.add(m.register_forward_pre_hook(pre))
        handles.add(target.register_forward_hook(post))
        model(example)
    params: list[nn.Parameter] = []
    ids: set[int] = set()
    for m in seen:
        if m is model:
            continue
        for p in m.parameters(recurse=False):
            if id(p) not in ids:
                ids.add(id(p))
                params.append(p)
    for p in target.parameters():
        if id(p) not in ids:
            ids.add(id(p))
            params.append(p)
    return params


@torch.no_grad()
def fit_references(model: nn.Module, layer: str, dataset: Any, indices: Sequence[int], batch_size: int = 64,
                   device: str | torch.device = "cpu") -> ConceptReferences:
    """One pass over Broden-format ``dataset`` images ``indices``: per concept, the mean spatially averaged
    activation of every unit of ``layer`` (output (N, C, h, w)) over the images containing that concept."""
    device = torch.device(device)
    n_concepts = len(dataset.labels)
    sums: torch.Tensor | None = None
    count = torch.zeros(n_concepts, dtype=torch.float64)
    with frozen(model), capture_activations(model, layer) as acts:
        for _, batch in dataset.iter_batches(batch_size, indices):
            model(batch.images.to(device))
            feat = acts[layer]
            if feat.dim() != 4:
                raise ValueError(f"layer {layer!r} outputs shape {tuple(feat.shape)}, not a (N, C, h, w) map")
            mean = feat.mean(dim=(2, 3)).double().cpu()  # (B, C)
            present = torch.zeros(mean.shape[0], n_concepts, dtype=torch.float64)
            for cat in batch.pixel:
                maps = batch.pixel[cat].flatten(1)
                present.scatter_(1, maps, 1.0)
                present.scatter_(1, batch.image_level[cat], 1.0)
            present[:, 0] = 0.0
            sums = present.T @ mean if sums is None else sums + present.T @ mean
            count += present.sum(0)
    if sums is None:
        raise ValueError("no images to compute reference activations from")
    mean = (sums / count.clamp_min(1).unsqueeze(1)).float()
    return ConceptReferences(mean, count.long(), [name for _, name, _ in dataset.labels], layer,
                             model_signature(model))


class ClassifierCorrector:
    """Enhance and propagate corrections on an image classifier, in terms of dissection unit names.

    model: a classifier ``(N, 3, H, W) -> (N, classes)``; layer: the dissected layer (output ``(N, C, h, w)``);
    names: its :class:`UnitNames`; references: its stored :class:`ConceptReferences` (or ``None`` and
    :meth:`fit_references` later). The model is modified in place by :meth:`propagate`.
    """

    def __init__(self, model: nn.Module, layer: str, names: UnitNames, references: ConceptReferences | None = None,
                 *, min_iou: float = 0.04, device: str | torch.device = "cpu") -> None:
        if names.layer != layer:
            raise ValueError(f"unit names are for layer {names.layer!r}, not {layer!r}")
        if references is not None and references.layer and references.layer != layer:
            raise ValueError(f"concept references are for layer {references.layer!r}, not {layer!r}")
        get_module(model, layer)
        self.model, self.layer, self.names, self.min_iou = model, layer, names, min_iou
        self.device = torch.device(device)
        self.references = references

    def fit_references(self, dataset: Any, indices: Sequence[int], batch_size: int = 64) -> ConceptReferences:
        """Compute (and keep) the references over ``dataset`` images ``indices`` (see :func:`fit_references`)."""
        self.references = fit_references(self.model, self.layer, dataset, indices, batch_size, self.device)
        return self.references

    def _ready(self) -> ConceptReferences:
        if self.references is None:
            raise RuntimeError("no concept references: pass references= or call fit_references(...) first")
        return self.references

    def units(self, concept: str) -> torch.Tensor:
        """Units of the layer named ``concept`` (error with suggestions for unknown / uncarried concepts)."""
        self._ready().reference(concept)  # validates the name
        return self.names.units_for(concept, self.min_iou)

    def delta(self, concepts: Sequence[str], n_channels: int) -> torch.Tensor:
        """(C,) amount added to each channel for the given missing concepts."""
        refs = self._ready()
        out = torch.zeros(n_channels)
        for concept in concepts:
            out = enhance(out, self.units(concept), refs.reference(concept))
        return out

    @torch.no_grad()
    def predict(self, images: torch.Tensor, enhance_concepts: Sequence[str] = ()) -> torch.Tensor:
        """Logits ``(N, classes)``; with ``enhance_concepts`` the layer's output is enhanced first."""
        images = images.to(self.device)
        with frozen(self.model):
            if not enhance_concepts:
                return self.model(images)

            def boost(y: torch.Tensor) -> torch.Tensor:
                return enhance(y, torch.arange(y.shape[1]), self.delta(enhance_concepts, y.shape[1]).to(y), dim=1)

            with patch_activations(self.model, {self.layer: boost}):
                return self.model(images)

    def propagate(self, images: torch.Tensor, concepts: Sequence[Sequence[str]], *, mu: float = 1e-2,
                  steps: int = 50, lr: float = 1e-3, stop: Callable[[nn.Module], bool] | None = None
                  ) -> PropagationResult:
        """Fine-tune the layers up to ``layer`` so image n's map approaches its map enhanced with
        ``concepts[n]``. images: (N, 3, H, W). ``stop(model)``, called after every step, may end early."""
        if len(concepts) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(concepts)} concept lists")
        images = images.to(self.device)
        with torch.no_grad(), frozen(self.model), capture_activations(self.model, self.layer) as acts:
            self.model(images)
            v = acts[self.layer]
        targets = torch.stack([
            enhance(v[n], torch.arange(v.shape[1]), self.delta(cs, v.shape[1]).to(v), dim=0)
            for n, cs in enumerate(concepts)
        ])
        params = parameters_up_to(self.model, self.layer, images[:1])
        return propagate(self.model, images, targets, representation=self.layer, params=params,
                         mu=mu, steps=steps, lr=lr, stop=stop)
