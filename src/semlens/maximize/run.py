"""High-level API: the paper's three variants as options, many units in one batch, files on disk.

:func:`build_variant` turns (variant, parameterisation, prior, λ) into a parameterisation and a
regulariser; :func:`prototypes` maximises every unit (× seeds) of a layer as one batch and keeps the
best seed per unit; :func:`write_outputs` writes ``prototypes.npy`` (U, C, H, W) float32,
``unit_XXXX.png`` per unit and ``summary.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from semlens.maximize.checks import SelfChecks
from semlens.maximize.engine import MaxResult, Regulariser, code_penalty, expert_term, l2_penalty, maximize
from semlens.maximize.objectives import unit_objective
from semlens.maximize.params import CodeParam, FourierParam, MacoParam, Parameterisation, PixelParam
from semlens.maximize.stats import ImageStats
from semlens.maximize.store import Prior
from semlens.maximize.transforms import Augment

__all__ = ["VARIANTS", "PARAMS", "DEFAULT_LAMBDA", "MaximizeConfig", "PrototypeSet", "build_variant", "prototypes",
           "write_outputs", "parse_units"]

VARIANTS = ("plain", "expert", "code")
PARAMS = ("pixel", "fourier", "maco")
#: default λ per variant (inputs in [0, 1], objectives of order 1). The plain and expert ones are *per input
#: dimension*: λ = DEFAULT_LAMBDA[variant] / D with D = C·H·W, because ‖x − x̄‖² and log p(x) sum over D
#: dimensions while a channel objective (a spatial mean) spreads its gradient over them: a fixed 1e-3 outweighed a
#: unit's activation on 64×64 inputs and the prototype stayed at the data mean (plain pixel/Fourier AM on the
#: concept world: median activation ratio −0.02 at λ = 1e-3, 3.1 / 4.4 at 1e-5 ≈ 0.12 / D). The expert's 0.1/D: at
#: 1/D the Gaussian and patch-GMM experts held the 32 dissected units' prototypes at the data mean (median ratio
#: 0.08 / 0.004, concept hit rate 0.375 / 0.375); at 0.1/D the Gaussian and RBM experts move the units (7.3 / 10.7,
#: hits 0.63 / 0.88) with a higher held-out likelihood than plain AM; weaker still, the expert no longer matters.
DEFAULT_LAMBDA = {"plain": 0.1, "expert": 0.1, "code": 1e-4}


@dataclass
class MaximizeConfig:
    """Options of :func:`prototypes` (see docs/maximize.md for the defaults' rationale)."""

    variant: str = "plain"
    param: str = "pixel"
    kind: str = "channel"
    lam: float | None = None
    steps: int = 256
    lr: float = 0.05
    seeds: int = 1
    views: int = 4
    augment: bool = True
    clip: float = 3.0
    seed: int = 0
    anchor: Tensor | None = None  # (C, H, W) or (U, C, H, W): local AM around examples x0

    def lam_value(self, dims: int) -> float:
        """λ for inputs of ``dims`` = C·H·W numbers: ``lam`` when given, else the variant's default (the
        plain and expert ones divided by ``dims``)."""
        if self.lam is not None:
            return float(self.lam)
        per_dim = self.variant in ("plain", "expert")
        return DEFAULT_LAMBDA[self.variant] / dims if per_dim else DEFAULT_LAMBDA[self.variant]


def parse_units(text: str) -> list[int]:
    """``"0-3,7"`` -> ``[0, 1, 2, 3, 7]``."""
    out: list[int] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        lo, sep, hi = part.partition("-")
        try:
            out.extend(range(int(lo), int(hi) + 1) if sep else [int(lo)])
        except ValueError as err:
            raise ValueError(f"bad unit range {part!r} in --units {text!r}: use e.g. 0-63 or 1,4,9") from err
    if not out:
        raise ValueError(f"no units in {text!r}")
    return out


def _image_param(kind: str, stats: ImageStats, start: Tensor) -> Parameterisation:
    if kind == "pixel":
        return PixelParam(stats.shape, start=start, noise=0.05, lo=stats.lo, hi=stats.hi)
    if kind == "fourier":
        return FourierParam(stats)
    if kind == "maco":
        return MacoParam(stats)
    raise ValueError(f"unknown parameterisation {kind!r}: use one of {', '.join(PARAMS)}")


def build_variant(cfg: MaximizeConfig, stats: ImageStats,
                  prior: Prior | None = None) -> tuple[Parameterisation, Regulariser]:
    """Parameterisation and regulariser of ``cfg.variant``; a variant needing a prior refuses ``None``."""
    if cfg.variant not in VARIANTS:
        raise ValueError(f"unknown variant {cfg.variant!r}: use one of {', '.join(VARIANTS)}")
    lam = cfg.lam_value(stats.mean.numel())
    if cfg.variant == "plain":
        anchor = stats.mean if cfg.anchor is None else cfg.anchor
        return _image_param(cfg.param, stats, anchor), l2_penalty(lam, anchor)
    if prior is None:
        need = "a density prior (gaussian, gmm or rbm)" if cfg.variant == "expert" else "a generator prior (vae or gan)"
        raise ValueError(f"variant {cfg.variant!r} needs {need}: fit one with `semlens maximize fit-prior` "
                         "and pass it with --prior")
    prior.check_compatible(stats)
    if cfg.variant == "expert":
        if not prior.is_expert:
            raise ValueError(f"variant 'expert' needs a density prior (gaussian, gmm or rbm), got a {prior.kind!r}")
        return _image_param(cfg.param, stats, stats.mean), expert_term(lam, prior.module.log_prob)
    if prior.is_expert:
        raise ValueError(f"variant 'code' needs a generator prior (vae or gan), got a {prior.kind!r}")
    if cfg.param != "pixel":
        raise ValueError(f"variant 'code' optimises the generator's code; --param {cfg.param!r} does not apply")
    return CodeParam(prior.module, prior.module.code_dim, stats.shape, clip=cfg.clip), code_penalty(lam)


@dataclass
class PrototypeSet:
    """Best-of-seeds prototypes: images (U, C, H, W), activation (U,), per unit of ``units``."""

    layer: str
    units: list[int]
    variant: str
    param: str
    images: Tensor
    activation: Tensor
    raw: MaxResult | None = None
    checks: SelfChecks | None = None
    names: dict[int, str] = field(default_factory=dict)
    concept_hit: Tensor | None = None  # (U,) 1 / 0 (NaN: not scored), see semlens.maximize.judge.concept_hits
    concept_score: Tensor | None = None  # (U,) colour share or judge probability (NaN: not scored)


def prototypes(model: nn.Module, layer: str, units: Sequence[int], stats: ImageStats, prior: Prior | None = None,
               cfg: MaximizeConfig | None = None, device: str | torch.device = "cpu",
               show_progress: bool | None = None) -> PrototypeSet:
    """Maximise units ``units`` of ``layer`` (``cfg.seeds`` seeds each, one batch) and keep each unit's best seed."""
    cfg = cfg or MaximizeConfig()
    u, s = len(units), cfg.seeds
    if s < 1:
        raise ValueError(f"seeds must be >= 1, got {s}")
    if cfg.anchor is not None and cfg.anchor.dim() == 4:
        cfg = dataclasses.replace(cfg, anchor=cfg.anchor.repeat_interleave(s, dim=0))
    param, reg = build_variant(cfg, stats, prior)
    if isinstance(param, CodeParam):
        param.generator.to(device)
    obj = unit_objective(cfg.kind, layer, units).repeat(s)
    seeds = cfg.seed * 10_000 + torch.arange(u * s)
    aug = Augment(views=cfg.views, seed=cfg.seed) if cfg.augment and cfg.views > 0 else None
    res = maximize(model, obj, param, regulariser=reg, seeds=seeds, steps=cfg.steps, lr=cfg.lr, augment=aug,
                   device=device, show_progress=show_progress)
    act = res.activation.reshape(u, s)
    best = act.argmax(dim=1) + torch.arange(u) * s
    return PrototypeSet(layer, list(units), cfg.variant, cfg.param, res.images[best].cpu(),
                        res.activation[best].cpu(), raw=res)


def _png(image: Tensor, stats: ImageStats, path: Path, min_size: int = 192) -> None:
    from PIL import Image

    lo, hi = stats.lo[:, None, None], stats.hi[:, None, None]
    x = ((image.float().cpu() - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1)
    arr = (x.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    arr = arr[:, :, 0] if arr.shape[2] == 1 else arr[:, :, :3]
    factor = max(1, -(-min_size // max(arr.shape[:2])))
    arr = arr.repeat(factor, axis=0).repeat(factor, axis=1)  # nearest-neighbour upscaling
    Image.fromarray(arr).save(path)


def summary_rows(ps: PrototypeSet) -> list[dict[str, object]]:
    """One row per unit: layer, unit, variant, activation, dataset_max, ratio, loglik_heldout,
    path_similarity (+ concept, concept_hit, concept_score when names are known)."""
    rows = []
    for i, unit in enumerate(ps.units):
        row: dict[str, object] = {"layer": ps.layer, "unit": unit, "variant": ps.variant,
                                  "activation": float(ps.activation[i])}
        if ps.checks is not None:
            c = ps.checks
            row.update(dataset_max=float(c.dataset_max[i]), ratio=float(c.ratio[i]),
                       loglik_heldout=float(c.loglik_heldout[i]), path_similarity=float(c.path_similarity[i]))
        if ps.names:
            row["concept"] = ps.names.get(unit, "")
            row["concept_hit"] = "" if ps.concept_hit is None else float(ps.concept_hit[i])
            row["concept_score"] = "" if ps.concept_score is None else float(ps.concept_score[i])
        rows.append(row)
    return rows


def write_outputs(ps: PrototypeSet, stats: ImageStats, out: str | os.PathLike) -> dict[str, Path]:
    """Write ``prototypes.npy``, one PNG per unit and ``summary.csv`` to ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "prototypes.npy", ps.images.float().cpu().numpy().astype(np.float32))
    for i, unit in enumerate(ps.units):
        _png(ps.images[i], stats, out / f"unit_{unit:04d}_{ps.variant}.png")
    rows = summary_rows(ps)
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return {"prototypes": out / "prototypes.npy", "summary": out / "summary.csv", "dir": out}
