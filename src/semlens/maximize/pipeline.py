"""End-to-end jobs behind the CLI: fit a prior on a data directory; maximise units and write the outputs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semlens.maximize.checks import heldout_density, self_checks, unit_scores
from semlens.maximize.data import colour_share, load_images, load_unit_names
from semlens.maximize.run import MaximizeConfig, PrototypeSet, prototypes, write_outputs
from semlens.maximize.stats import fit_image_stats
from semlens.maximize.store import fit_prior, load_prior, save_prior

__all__ = ["fit_prior_job", "maximize_job"]


def fit_prior_job(data: str | os.PathLike, kind: str, out: str | os.PathLike, limit: int | None = None,
                  seed: int = 0, **options: Any) -> Path:
    """Fit a prior of ``kind`` on the images of ``data`` and save it to ``out`` (.safetensors)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out} must end in .safetensors")
    images = load_images(data, limit)
    return save_prior(fit_prior(kind, images, seed=seed, **options), out)


def _colour_hits(ps: PrototypeSet, names: dict[int, tuple[str, str, float]]) -> torch.Tensor:
    hits = torch.full((len(ps.units),), float("nan"))
    for i, u in enumerate(ps.units):
        concept, category, _ = names.get(u, ("", "", 0.0))
        if category == "color" and ps.images.shape[1] == 3:
            hits[i] = float(colour_share(ps.images[i:i + 1].clamp(0, 1), concept)[0])
    return hits


def maximize_job(model: nn.Module, layer: str, units: list[int], data: str | os.PathLike, out: str | os.PathLike,
                 cfg: MaximizeConfig, prior_path: str | os.PathLike | None = None,
                 names_path: str | os.PathLike | None = None, limit: int | None = 2000,
                 device: str | torch.device = "cpu", images: torch.Tensor | None = None) -> dict[str, Path]:
    """Prototypes of ``units`` of ``layer`` with self-checks against the images of ``data``; see
    :func:`semlens.maximize.run.write_outputs` for the files. Colour units named in ``names_path``
    (a dissection units.csv) get ``concept_hit`` = the share of pixels of their colour. ``images``: the
    (N, C, H, W) images of ``data`` already read (as ``load_images(data, limit)`` reads them), for several jobs on
    one data set."""
    if images is None:
        images = load_images(data, limit)
    half = images.shape[0] // 2
    stats = fit_image_stats(images)
    model = model.to(device).eval()
    prior = load_prior(prior_path) if prior_path is not None else None
    scores = unit_scores(model, layer, cfg.kind, images[:half], device=device)
    bad = [u for u in units if u >= scores.shape[1]]
    if bad:
        raise ValueError(f"unit index {bad[:5]} out of range for layer {layer!r} with {scores.shape[1]} units")
    ps = prototypes(model, layer, units, stats, prior, cfg, device=device)
    ps.checks = self_checks(model, layer, cfg.kind, units, ps.images, images[:half], heldout_density(images[half:]),
                            scores=scores, device=device)
    if names_path is not None:
        names = load_unit_names(names_path, layer)
        ps.names = {u: n[0] for u, n in names.items()}
        ps.concept_hit = _colour_hits(ps, names)
    return write_outputs(ps, stats, out)
