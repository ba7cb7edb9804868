"""Concept references: the activation that enhancement adds for a missing concept (or topic).

``mean[l]`` is the mean activation of every unit of the representation over the reference samples that
contain concept ``l`` (a classifier: spatially averaged conv maps over training images; a captioner: the
time-mean of ``v`` over training videos, Dong et al. 2017 §3.3). They are computed once, when a correction
project is made, and stored (artefact kind ``"concept-references"``), so a remark never re-runs the
training split.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from semlens.artefacts import ArtefactError, load_artefact, model_signature, save_artefact
from semlens.layers import suggest

__all__ = ["ConceptReferences"]

KIND, VERSION = "concept-references", 1


@dataclass(frozen=True)
class ConceptReferences:
    """mean: (L, C) float32 reference activation of each of C units per concept (rows of concepts no reference
    sample contains are 0 or NaN); count: (L,) int64 reference samples containing each concept; names: concept
    name per row ("-" = no concept); layer: the representation; model: the model's
    :func:`~semlens.artefacts.model_signature` (``""`` = unknown)."""

    mean: torch.Tensor
    count: torch.Tensor
    names: list[str]
    layer: str = ""
    model: str = field(default="")

    def reference(self, concept: str) -> torch.Tensor:
        """(C,) reference activation of ``concept``; unknown names and concepts without samples raise."""
        if concept not in self.names:
            raise KeyError(f"unknown concept {concept!r}.{suggest(concept, [n for n in self.names if n != '-'])}")
        number = self.names.index(concept)
        if int(self.count[number]) == 0:
            raise ValueError(f"no reference image contains {concept!r}; its reference activation is undefined")
        return self.mean[number]

    def save(self, path: str | os.PathLike) -> Path:
        """Write to a ``.safetensors`` artefact file (mean, count; names, layer and model in the header)."""
        if self.mean.dim() != 2 or self.count.shape != self.mean.shape[:1] or len(self.names) != self.mean.shape[0]:
            raise ValueError(f"mean {tuple(self.mean.shape)}, count {tuple(self.count.shape)} and {len(self.names)} "
                             "names do not match")
        return save_artefact(path, KIND, VERSION, {"mean": self.mean.float(), "count": self.count.long()},
                             {"names": list(self.names), "layer": self.layer, "model": self.model})

    @classmethod
    def load(cls, path: str | os.PathLike, *, model: nn.Module | None = None, layer: str | None = None,
             names: list[str] | None = None) -> ConceptReferences:
        """Read a references file; with ``model`` / ``layer`` / ``names`` (the concept or topic names the
        caller uses), references made for another model, layer or vocabulary raise :class:`ArtefactError`."""
        tensors, h = load_artefact(path, KIND, VERSION)
        refs = cls(tensors["mean"], tensors["count"], list(h["names"]), h.get("layer", ""), h.get("model", ""))
        if model is not None and refs.model and refs.model != model_signature(model):
            raise ArtefactError(f"references file {path} was made for another model (signature {refs.model}, "
                                f"this model {model_signature(model)})")
        if layer is not None and refs.layer != layer:
            raise ArtefactError(f"references file {path} is for layer {refs.layer!r}, not {layer!r}")
        if names is not None and refs.names != list(names):
            diff = sorted(set(names) ^ set(refs.names))[:5]
            raise ArtefactError(f"references file {path} was made for another vocabulary of {len(refs.names)} "
                                f"concepts/topics (this one has {len(names)}; differing: {', '.join(diff) or 'order'})")
        return refs
