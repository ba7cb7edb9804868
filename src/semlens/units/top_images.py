"""The top dataset images of every dissected unit, stored beside the dissection tables.

``top_images.safetensors`` (artefact kind ``"top-images"``) holds, per layer, ``<layer>/indices`` (C, k) int64:
the dataset rows of the k images with the largest spatial maximum of the unit's activation map, best first
(−1 = no image), and ``<layer>/values`` (C, k) float32: those maxima (activation units of the layer). The
header names the image file of every row referenced (``images``: row -> file name relative to the dataset's
``images/`` folder), so a reader looks images up by name: a dataset whose index was reordered, or another copy
of it, never shows the wrong image silently.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from semlens.artefacts import ArtefactError, load_artefact, save_artefact
from semlens.outputs import atomic_write

__all__ = ["TopImages", "TopImagesError", "save_top_images", "load_top_images", "FILE_NAME"]

KIND, VERSION = "top-images", 1
FILE_NAME = "top_images.safetensors"


class TopImagesError(ArtefactError):
    """A top-images file that is missing, corrupt or inconsistent (the message names the file)."""


@dataclass
class TopImages:
    """Top images per unit of each dissected layer.

    indices[layer]: (C, k) int64 dataset rows, best first, −1 = none; values[layer]: (C, k) float32 spatial
    maxima of the unit's activation map on those images; names: dataset row -> image file name (relative to
    ``images/``) for every row referenced, empty when the dataset had no file names (in-memory data);
    data: the dataset directory the dissection read ("" = unknown).
    """

    indices: dict[str, torch.Tensor]
    values: dict[str, torch.Tensor]
    names: dict[int, str] = field(default_factory=dict)
    data: str = ""

    def of(self, layer: str, unit: int) -> list[tuple[int, float, str | None]]:
        """The unit's top images, best first: ``(dataset row, activation maximum, file name or None)``."""
        if layer not in self.indices:
            raise KeyError(f"no top images for layer {layer!r}; layers: {', '.join(self.indices) or 'none'}")
        idx, val = self.indices[layer], self.values[layer]
        if not 0 <= unit < idx.shape[0]:
            raise KeyError(f"layer {layer!r} has no unit {unit} (units 0..{idx.shape[0] - 1})")
        return [(int(i), float(v), self.names.get(int(i))) for i, v in zip(idx[unit].tolist(), val[unit].tolist(),
                                                                            strict=True) if i >= 0]


def save_top_images(path: str | os.PathLike, top: TopImages) -> Path:
    """Write ``top`` to ``path`` atomically (readers see the old file or the new one); returns ``path``."""
    tensors: dict[str, torch.Tensor] = {}
    for layer, idx in top.indices.items():
        val = top.values[layer]
        if idx.shape != val.shape or idx.dim() != 2:
            raise ValueError(f"top images of layer {layer!r}: indices {tuple(idx.shape)} and values "
                             f"{tuple(val.shape)} must both be (C, k)")
        tensors[f"{layer}/indices"] = idx.long()
        tensors[f"{layer}/values"] = val.float()
    meta = {"layers": list(top.indices), "images": {str(k): v for k, v in sorted(top.names.items())},
            "data": top.data}
    return atomic_write(path, lambda tmp: save_artefact(tmp, KIND, VERSION, tensors, meta))


def load_top_images(path: str | os.PathLike) -> TopImages:
    """Read a file written by :func:`save_top_images`; a missing, corrupt or inconsistent file raises
    :class:`TopImagesError` naming it."""
    path = Path(path)
    try:
        tensors, header = load_artefact(path, KIND, VERSION)
    except ArtefactError as err:
        raise TopImagesError(str(err)) from err
    layers = header.get("layers")
    images = header.get("images")
    if not isinstance(layers, list) or not isinstance(images, Mapping):
        raise TopImagesError(f"corrupt top-images file {path}: its header lacks 'layers' or 'images'")
    indices, values = {}, {}
    for layer in layers:
        idx, val = tensors.get(f"{layer}/indices"), tensors.get(f"{layer}/values")
        if idx is None or val is None or idx.shape != val.shape or idx.dim() != 2:
            raise TopImagesError(f"corrupt top-images file {path}: layer {layer!r} lacks (C, k) indices and values")
        indices[layer], values[layer] = idx.long(), val.float()
    try:
        names = {int(k): str(v) for k, v in images.items()}
    except ValueError as err:
        raise TopImagesError(f"corrupt top-images file {path}: image rows must be integers ({err})") from err
    return TopImages(indices, values, names, str(header.get("data", "")))
