"""End-to-end jobs behind the CLI: fit a prior or a concept judge on a data directory; maximise units and write
the outputs."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semlens.maximize.checks import heldout_density, self_checks, unit_scores
from semlens.maximize.data import load_images, load_unit_names
from semlens.maximize.judge import (
    Judge,
    by_palette,
    concept_scores,
    fit_judge_broden,
    load_judge,
    save_judge,
    score_hits,
)
from semlens.maximize.run import MaximizeConfig, prototypes, write_outputs
from semlens.maximize.stats import fit_image_stats
from semlens.maximize.store import PRIOR_KINDS, fit_prior, load_prior, save_prior

__all__ = ["fit_prior_job", "fit_judge_job", "maximize_job"]


def _new_file(out: str | os.PathLike, overwrite: bool) -> Path:
    """``out`` as a Path, refused unless it ends in .safetensors and (without ``overwrite``) does not exist."""
    from semlens.errors import OutputError

    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out {out} must end in .safetensors")
    if out.exists() and (out.is_dir() or not overwrite):
        raise OutputError(f"{out} exists; choose another --out" + ("" if out.is_dir() else " or pass --overwrite"))
    return out


def fit_prior_job(data: str | os.PathLike, kind: str, out: str | os.PathLike, limit: int | None = None,
                  seed: int = 0, overwrite: bool = False, **options: Any) -> Path:
    """Fit a prior of ``kind`` on the images of ``data`` and save it to ``out`` (.safetensors); an existing
    ``out`` is refused unless ``overwrite``."""
    out = _new_file(out, overwrite)
    if kind not in PRIOR_KINDS:  # before reading the data: a typo should not wait for it
        raise ValueError(f"unknown prior kind {kind!r}: use one of {', '.join(PRIOR_KINDS)}")
    images = load_images(data, limit)
    return save_prior(fit_prior(kind, images, seed=seed, **options), out)


def fit_judge_job(data: str | os.PathLike, out: str | os.PathLike, epochs: int = 3, limit: int | None = None,
                  seed: int = 0, overwrite: bool = False) -> Judge:
    """Fit a concept judge on the Broden-format directory ``data`` and save it to ``out`` (.safetensors); an
    existing ``out`` is refused unless ``overwrite``."""
    out = _new_file(out, overwrite)
    judge = fit_judge_broden(data, limit=limit, seed=seed, epochs=epochs)
    save_judge(judge, out)
    return judge


def _unit_concepts(units: list[int], names: dict[int, tuple[str, str, float]]) -> list[tuple[str, str]]:
    return [names[u][:2] if u in names else ("", "") for u in units]


def _check_judge(judge: Judge, concepts: list[tuple[str, str]]) -> None:
    """Refuse before maximising: a named unit, not a colour of the palette, whose concept the judge does not know."""
    for name, category in concepts:
        if name and not by_palette(name, category):
            judge.index(name, category)


def maximize_job(model: nn.Module, layer: str, units: list[int], data: str | os.PathLike, out: str | os.PathLike,
                 cfg: MaximizeConfig, prior_path: str | os.PathLike | None = None,
                 names_path: str | os.PathLike | None = None, limit: int | None = 2000,
                 device: str | torch.device = "cpu", images: torch.Tensor | None = None,
                 judge_path: str | os.PathLike | None = None) -> dict[str, Path]:
    """Prototypes of ``units`` of ``layer`` with self-checks against the images of ``data``; see
    :func:`semlens.maximize.run.write_outputs` for the files. Units named in ``names_path`` (a dissection
    units.csv) get ``concept_score`` and ``concept_hit`` (:func:`semlens.maximize.judge.concept_hits`): colour
    units always, the others when a judge file ``judge_path`` (``semlens maximize fit-judge``) is given; a judge
    fitted on other inputs, or not knowing a named unit's concept, is refused before maximising. ``images``: the
    (N, C, H, W) images of ``data`` already read (as ``load_images(data, limit)`` reads them), for several jobs on
    one data set."""
    if judge_path is not None and names_path is None:
        raise ValueError("--judge scores the units named in --names: pass a dissection units.csv with --names")
    if images is None:
        images = load_images(data, limit)
    half = images.shape[0] // 2
    stats = fit_image_stats(images)
    names = load_unit_names(names_path, layer) if names_path is not None else {}
    judge = load_judge(judge_path) if judge_path is not None else None
    if judge is not None:
        judge.check_compatible(stats.shape, stats.channel_mean, stats.channel_std, what=f"the images of {data}")
        _check_judge(judge, _unit_concepts(units, names))
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
        ps.names = {u: n[0] for u, n in names.items()}
        concepts = _unit_concepts(ps.units, names)
        ps.concept_score = concept_scores(ps.images, concepts, judge)
        ps.concept_hit = score_hits(ps.concept_score, concepts)
    return write_outputs(ps, stats, out)
