"""Reading the user's images for fitting priors and self-checks, and unit names from dissection."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["load_images", "load_unit_names", "colour_share"]


def load_images(path: str | os.PathLike, limit: int | None = None, batch_size: int = 256) -> Tensor:
    """Images (N, C, H, W) float32 from a Broden-format directory (e.g. ``semlens data concepts``) or
    a ``.npy`` file of shape (N, C, H, W); at most ``limit`` (the first ones)."""
    path = Path(path)
    if path.suffix == ".npy":
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        arr = np.load(path, allow_pickle=False)
        if arr.ndim != 4:
            raise ValueError(f"{path} holds an array of shape {arr.shape}, expected (N, C, H, W)")
        x = torch.from_numpy(np.ascontiguousarray(arr[:limit])).float()
    else:
        from semlens.world import BrodenDataset

        ds = BrodenDataset(path)
        n = len(ds) if limit is None else min(limit, len(ds))
        x = torch.cat([b.images for _, b in ds.iter_batches(batch_size, range(n), categories=[])])
    if x.shape[0] < 2:
        raise ValueError(f"{path} holds {x.shape[0]} image(s); at least 2 are needed")
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{path} contains NaN or infinite pixel values")
    return x


def load_unit_names(path: str | os.PathLike, layer: str, min_iou: float = 0.0) -> dict[int, tuple[str, str, float]]:
    """``unit -> (concept, category, iou)`` for ``layer`` from a dissection ``units.csv``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"units file not found: {path}")
    out: dict[int, tuple[str, str, float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if {"layer", "unit", "concept"} - set(row):
                raise ValueError(f"{path} is not a dissection units.csv (needs layer, unit, concept columns)")
            iou = float(row.get("iou") or 0.0)
            if row["layer"] == layer and iou >= min_iou:
                out[int(row["unit"])] = (row["concept"], row.get("category", ""), iou)
    return out


def colour_share(images: Tensor, colour: str) -> Tensor:
    """(B,) share of pixels of ``images`` (B, 3, H, W) in [0, 1] whose nearest colour of the concept
    world's palette is ``colour``."""
    from semlens.world.concepts import COLORS

    if colour not in COLORS:
        raise KeyError(f"{colour!r} is not a colour of the concept world's palette")
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32)
    pix = images.float().permute(0, 2, 3, 1).reshape(images.shape[0], -1, 3)
    nearest = torch.cdist(pix, palette.expand(images.shape[0], -1, -1)).argmin(dim=2)
    return (nearest == list(COLORS).index(colour)).float().mean(dim=1)
