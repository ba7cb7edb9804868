"""Unit names: which concept each unit of a layer detects (written by dissection, read by correction).

A names file (``unit_names.safetensors``, artefact kind ``"unit-names"``) holds the names of one or more
layers of one model: per layer the unit indices, their best concept and its IoU, plus the model's
:func:`~semlens.artefacts.model_signature`, so that names made for another model are refused when loaded.
Dissection's ``units.csv`` (same content, IoUs rounded to 6 digits, no model signature) is read too.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from semlens.artefacts import ArtefactError, load_artefact, model_signature, save_artefact
from semlens.layers import suggest

__all__ = ["UnitNames", "save_unit_names"]

KIND, VERSION = "unit-names", 1


@dataclass(frozen=True)
class UnitNames:
    """Unit → concept labels of one layer.

    units: (U,) int64 unit indices; concepts: their best concept names; ious: (U,) float IoU;
    model: the :func:`~semlens.artefacts.model_signature` of the model they describe (``""`` = unknown,
    e.g. names read from a CSV file).
    """

    layer: str
    units: torch.Tensor
    concepts: tuple[str, ...]
    ious: torch.Tensor
    model: str = ""

    @classmethod
    def from_csv(cls, path: str | os.PathLike, layer: str) -> UnitNames:
        """Names of ``layer`` from dissection's ``units.csv`` (columns layer, unit, concept, iou)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"unit names file not found: {path}")
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            missing = {"layer", "unit", "concept", "iou"} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path} lacks column(s) {sorted(missing)}")
            rows = [r for r in reader if r["layer"] == layer]
        if not rows:
            raise KeyError(f"{path} names no unit of layer {layer!r}")
        return cls(layer, torch.tensor([int(r["unit"]) for r in rows]), tuple(r["concept"] for r in rows),
                   torch.tensor([float(r["iou"]) for r in rows]))

    def save(self, path: str | os.PathLike) -> Path:
        """Write this layer's names to a names file (see :func:`save_unit_names`)."""
        return save_unit_names(path, [self])

    @classmethod
    def load(cls, path: str | os.PathLike, layer: str, model: nn.Module | None = None) -> UnitNames:
        """Names of ``layer`` from a names file (``.csv``: dissection's ``units.csv``).

        With ``model``, names made for a model of another architecture raise :class:`ArtefactError`.
        """
        if Path(path).suffix == ".csv":
            return cls.from_csv(path, layer)
        tensors, header = load_artefact(path, KIND, VERSION)
        layers = header.get("layers", {})
        if layer not in layers:
            raise ArtefactError(f"names file {path} has no names for layer {layer!r}.{suggest(layer, list(layers))}"
                                f" Its layers: {', '.join(layers) or 'none'}")
        if model is not None and header.get("model") and header["model"] != model_signature(model):
            raise ArtefactError(f"names file {path} was made for another model (signature {header['model']}, "
                                f"this model {model_signature(model)}); dissect this model to name its units")
        return cls(layer, tensors[f"{layer}/units"].long(), tuple(layers[layer]), tensors[f"{layer}/ious"],
                   header.get("model", ""))

    def units_for(self, concept: str, min_iou: float = 0.04) -> torch.Tensor:
        """Indices of the units labelled ``concept`` with IoU > ``min_iou``, strongest first."""
        hit = torch.tensor([c == concept for c in self.concepts], dtype=torch.bool) & (self.ious > min_iou)
        if not bool(hit.any()):
            carried = sorted({c for c, i in zip(self.concepts, self.ious.tolist(), strict=True) if i > min_iou})
            raise KeyError(f"no unit of layer {self.layer!r} is a detector (IoU > {min_iou}) of {concept!r}."
                           f"{suggest(concept, carried)} Concepts with detectors: {', '.join(carried) or 'none'}")
        order = torch.argsort(self.ious[hit], descending=True)
        return self.units[hit][order]


def save_unit_names(path: str | os.PathLike, names: Sequence[UnitNames]) -> Path:
    """Write the names of several layers of one model to one names file (artefact ``unit-names`` v1)."""
    if not names:
        raise ValueError("no unit names to save")
    models = {n.model for n in names}
    if len(models) != 1:
        raise ValueError(f"unit names of several models cannot share one file (signatures {sorted(models)})")
    tensors: dict[str, torch.Tensor] = {}
    for n in names:
        if n.units.shape != n.ious.shape or len(n.concepts) != n.units.numel():
            raise ValueError(f"layer {n.layer!r}: {n.units.numel()} units, {n.ious.numel()} IoUs and "
                             f"{len(n.concepts)} concepts do not match")
        tensors[f"{n.layer}/units"] = n.units.long()
        tensors[f"{n.layer}/ious"] = n.ious
    return save_artefact(path, KIND, VERSION, tensors,
                         {"model": models.pop(), "layers": {n.layer: list(n.concepts) for n in names}})
