"""``semlens reproduce maximize``: activation maximization on the built-in concept world.

1. An alexnet-like classifier is trained as in the demo (12k images, 3 epochs, Adam 2e-3, cosine) and
   dissected; the units labelled with IoU ≥ 0.1 are visualised.
2. For each variant and parameterisation (plain pixel / Fourier / MaCo, expert Gaussian / GMM / RBM,
   code VAE / GAN) all those units (of all layers) are maximised as ONE batch; each unit's objective is
   its channel mean divided by its natural range (maximum − mean over natural images; positive, so units
   whose natural maximum is negative, pre-ReLU, are still maximised), so λ is per unit of natural range.
   The reported activation ratio is the activation ÷ the natural maximum, for units whose maximum is > 0.
3. Per configuration, over the units: median activation ratio, median held-out log-likelihood per
   dimension (a PCA-Gaussian fitted on other images, never an expert), concept hit rate (colour units:
   ≥ 5 % of pixels nearest to the colour; other units: a resnet-small judge trained on the world's
   masks says the concept is present) and median path similarity; the units' top-9 natural images give
   the ceiling.
4. Slide (d): a classifier trained where a planted corner mark (a magenta square) decides the class: every
   class-0 image carries it, and 10 % of the other images carry it and are relabelled 0. Plain AM and
   expert AM (Gaussian, λ swept) of the class-0 logit run in one batch from the data mean; the table
   gives the share of magenta pixels in each prototype and where it falls to the level of natural images.

Cached artefacts (classifiers, dissection, judge, priors) make a second run fast.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from semlens.experiments._maximize_parts import (
    MARK,
    accuracy,
    concept_hits,
    labelled_units,
    mark_images,
    mark_score,
    plant_shortcut,
    train_classifier,
    train_judge,
)

__all__ = ["MaxEvalConfig", "run_maximize_eval", "CONFIGS", "markdown_tables"]

#: (name, variant, parameterisation, prior kind)
CONFIGS = [("plain/pixel", "plain", "pixel", None), ("plain/fourier", "plain", "fourier", None),
           ("plain/maco", "plain", "maco", None), ("expert-gaussian/pixel", "expert", "pixel", "gaussian"),
           ("expert-gaussian/fourier", "expert", "fourier", "gaussian"), ("expert-gmm/pixel", "expert", "pixel", "gmm"),
           ("expert-rbm/pixel", "expert", "pixel", "rbm"), ("code/vae", "code", "pixel", "vae"),
           ("code/gan", "code", "pixel", "gan")]


@dataclass
class MaxEvalConfig:
    seed: int = 0
    n_train: int = 12000
    epochs: int = 3
    n_broden: int = 1000
    n_prior: int = 2000
    n_natural: int = 1000
    n_judge: int = 4000
    n_shortcut: int = 6000
    judge_epochs: int = 3
    min_iou: float = 0.1
    max_units: int = 32
    steps: int = 192
    views: int = 2
    plain_strength: float = 0.1  # λ = strength / D (per input dimension, per unit of natural range); as the library
    expert_strength: float = 0.1  # λ = strength / D, log-density per input dimension (1.0 held Gaussian/GMM at x̄)
    lam_code: float = 1e-4
    expert_sweep: tuple[float, ...] = (1.0, 0.1, 0.01, 0.001)  # λ·D of the expert-strength table (pixel param.)
    prior_epochs: int = 30  # the RBM's
    generator_epochs: int | None = None  # the VAE's and GAN's; None: the library's default (4,000 steps)
    shortcut_strengths: tuple[float, ...] = (0.01, 0.1, 1.0, 10.0, 30.0, 100.0)
    shortcut_epochs: int = 6
    shortcut_lam_plain: float = 1e-5  # ℓ2 weight of slide (d)'s plain row (1e-3 holds the class-0 logit at the mean)
    shortcut_extra: float = 0.1  # share of other-class images marked and relabelled 0

    @classmethod
    def fast(cls) -> MaxEvalConfig:
        return cls(n_train=1500, epochs=2, n_broden=200, n_prior=400, n_natural=200, n_judge=600, judge_epochs=1,
                   n_shortcut=800, shortcut_epochs=2,
                   max_units=6, steps=16, prior_epochs=2, generator_epochs=2, min_iou=0.04,
                   shortcut_strengths=(0.1, 10.0),
                   expert_sweep=(1.0, 0.01))


def _world(cfg: MaxEvalConfig) -> dict[str, Any]:
    from semlens.world import generate_concepts

    s = cfg.seed
    return {"train": generate_concepts(cfg.n_train, 64, seed=s + 1, masks=False),
            "prior": generate_concepts(cfg.n_prior, 64, seed=s + 3, masks=False).images,
            "heldout": generate_concepts(cfg.n_prior, 64, seed=s + 4, masks=False).images,
            "natural": generate_concepts(cfg.n_natural, 64, seed=s + 5, masks=False).images}


def _priors(root: Path, images: torch.Tensor, cfg: MaxEvalConfig) -> dict[str, Any]:
    from semlens.maximize.store import fit_prior, load_prior, save_prior

    opts = {"gaussian": {"k": 64}, "gmm": {"components": 16, "patch": 8, "stride": 8},
            "rbm": {"hidden": 128, "epochs": cfg.prior_epochs}, "vae": {"code_dim": 32, "epochs": cfg.generator_epochs},
            "gan": {"code_dim": 32, "epochs": cfg.generator_epochs}}  # epochs None: fit_vae's / fit_gan's default
    out = {}
    for kind, o in opts.items():
        path = root / "priors" / f"{kind}.safetensors"
        if not path.is_file():
            save_prior(fit_prior(kind, images, seed=cfg.seed, **o), path)
        out[kind] = load_prior(path)
    return out


def _objective(units: list[dict[str, Any]], scale: torch.Tensor):  # noqa: ANN202
    """Each unit's channel mean divided by its (positive) natural range ``scale``: the direction of ascent is the
    unit's own, also for units whose natural maximum is negative (pre-ReLU conv outputs); dividing by that maximum
    would turn them into minimisations."""
    from semlens.maximize import Objective, channel

    return Objective.cat([channel(u["layer"], [u["unit"]]) * (1.0 / float(m)) for u, m in zip(units, scale,
                                                                                                  strict=True)])


def _natural_range(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """From (N, U) natural-image scores: the maxima (U,) and the objectives' scales max − mean (U,), > 0."""
    dmax = scores.max(dim=0).values
    return dmax, (dmax - scores.mean(dim=0)).clamp(min=1e-6)


def _ratio(act: torch.Tensor, dmax: torch.Tensor) -> torch.Tensor:
    """Activation ÷ the unit's natural maximum; NaN (left out of the medians) where that maximum is <= 0."""
    return torch.where(dmax > 0, act / dmax.where(dmax > 0, torch.ones_like(dmax)), torch.full_like(act, float("nan")))


def _natural_scores(model, units, images) -> torch.Tensor:  # noqa: ANN001
    """(N, U) channel means of each selected unit on the natural images."""
    from semlens.maximize.checks import unit_scores

    cols = []
    for layer in dict.fromkeys(u["layer"] for u in units):
        sc = unit_scores(model, layer, "channel", images)
        cols += [(i, sc[:, u["unit"]]) for i, u in enumerate(units) if u["layer"] == layer]
    return torch.stack([c for _, c in sorted(cols, key=lambda t: t[0])], dim=1)


def _run_config(model, units, scale, stats, prior, variant, param, cfg: MaxEvalConfig):  # noqa: ANN001, ANN202
    from semlens.maximize import Augment, maximize
    from semlens.maximize.run import MaximizeConfig, build_variant

    dims = stats.mean.numel()
    lam = {"plain": cfg.plain_strength / dims, "expert": cfg.expert_strength / dims, "code": cfg.lam_code}[variant]
    p, reg = build_variant(MaximizeConfig(variant=variant, param=param, lam=lam), stats, prior)
    res = maximize(model, _objective(units, scale), p, regulariser=reg, seeds=torch.arange(len(units)),
                   steps=cfg.steps, augment=Augment(views=cfg.views, seed=cfg.seed) if cfg.views else None)
    return res


def _path_similarity(model, units, protos, natural, top) -> torch.Tensor:  # noqa: ANN001
    from semlens.maximize.checks import path_vectors, previous_layer

    sims = torch.full((len(units),), float("nan"))
    for i, u in enumerate(units):
        via = previous_layer(model, u["layer"])
        if via is None:
            continue
        idx = torch.tensor([u["unit"]])
        pv = path_vectors(model, u["layer"], "channel", idx, protos[i:i + 1], via)
        nv = path_vectors(model, u["layer"], "channel", idx.repeat(top.shape[1]), natural[top[i]], via)
        nv = torch.nn.functional.normalize(nv, dim=1).mean(dim=0, keepdim=True)
        sims[i] = torch.nn.functional.cosine_similarity(pv, nv, dim=1)[0]
    return sims


def _median(t: torch.Tensor) -> float:
    t = t[torch.isfinite(t)]
    return float(t.median()) if t.numel() else float("nan")


def _summarise(name: str, ratio, loglik, hits, paths, seconds: float | None = None) -> dict[str, Any]:  # noqa: ANN001
    """One table row; ``per_unit`` keeps the (U,) values for the report's unit cards."""
    per_unit = {"ratio": ratio.tolist(), "loglik": loglik.tolist(), "hit": hits.tolist(), "path": paths.tolist()}
    return {"per_unit": per_unit, "configuration": name, "median activation ratio": round(_median(ratio), 3),
            "median held-out loglik / dim": round(_median(loglik), 3),
            "concept hit rate": round(float(hits.mean()), 3), "median path similarity": round(_median(paths), 3),
            "seconds": None if seconds is None else round(seconds, 1)}


def _unit_table(model, units, world, priors, judge, heldout, stats,  # noqa: ANN001
                cfg: MaxEvalConfig) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Rows of the per-configuration table (ceiling first), each configuration's prototypes (U, 3, 64, 64), and
    the rows of the expert-strength table."""
    natural = world["natural"]
    scores = _natural_scores(model, units, natural)
    dmax, scale = _natural_range(scores)
    top = scores.topk(9, dim=0).indices.T  # (U, 9)
    concepts = [(u["concept"], u["category"]) for u in units]
    dims = natural[0].numel()
    nat = natural[top.reshape(-1)]
    nat_hits = concept_hits(nat, [c for c in concepts for _ in range(9)], judge).reshape(len(units), 9).mean(1)
    rows = [_summarise("top-9 natural images (ceiling)", _ratio(scores.gather(0, top.T).T.mean(1), dmax),
                       (heldout.log_prob(nat) / dims).reshape(len(units), 9).mean(1), nat_hits,
                       torch.ones(len(units)))]
    protos_by = {"top9": natural[top]}
    for name, variant, param, kind in CONFIGS:
        t0 = time.perf_counter()
        res = _run_config(model, units, scale, stats, priors.get(kind), variant, param, cfg)
        protos_by[name] = res.images
        rows.append(_summarise(name, _ratio(res.activation * scale, dmax), heldout.log_prob(res.images) / dims,
                               concept_hits(res.images, concepts, judge),
                               _path_similarity(model, units, res.images, natural, top), time.perf_counter() - t0))
    sweep = _expert_sweep(model, units, scale, dmax, stats, priors, judge, heldout, natural, top, cfg)
    return rows, protos_by, sweep


def _expert_sweep(model, units, scale, dmax, stats, priors, judge, heldout, natural, top,  # noqa: ANN001
                  cfg: MaxEvalConfig) -> list[dict[str, Any]]:
    """Hit rate against naturalness as the expert's strength λ·D goes down: per expert kind, every (strength,
    unit) row maximised as ONE batch, with the main table's seeds (its 0.1 row is that table's row)."""
    from semlens.maximize import Augment, Objective, expert_term, maximize
    from semlens.maximize.run import MaximizeConfig, build_variant

    dims, u, strengths = stats.mean.numel(), len(units), list(cfg.expert_sweep)
    concepts = [(x["concept"], x["category"]) for x in units] * len(strengths)
    rows = []
    for kind in ("gaussian", "gmm", "rbm"):
        param, _ = build_variant(MaximizeConfig(variant="expert", param="pixel", lam=1.0), stats, priors[kind])
        lam = torch.tensor([st / dims for st in strengths for _ in range(u)])
        t0 = time.perf_counter()
        res = maximize(model, Objective.cat([_objective(units, scale)] * len(strengths)), param,
                       regulariser=expert_term(lam, priors[kind].module.log_prob), seeds=torch.arange(u).repeat(
                           len(strengths)), steps=cfg.steps, augment=Augment(views=cfg.views, seed=cfg.seed)
                       if cfg.views else None)
        hits = concept_hits(res.images, concepts, judge)
        seconds = time.perf_counter() - t0
        for i, st in enumerate(strengths):
            sl = slice(i * u, (i + 1) * u)
            row = _summarise(f"expert-{kind}/pixel", _ratio(res.activation[sl] * scale, dmax),
                             heldout.log_prob(res.images[sl]) / dims, hits[sl],
                             _path_similarity(model, units, res.images[sl], natural, top))
            row.pop("per_unit")
            row.pop("seconds")
            rows.append({"configuration": row.pop("configuration"), "λ·D": st, **row,
                         "seconds (all strengths)": round(seconds, 1)})
    return rows


def _shortcut(root: Path, world: dict[str, Any], stats, gaussian, cfg: MaxEvalConfig) -> dict[str, Any]:  # noqa: ANN001
    """Slide (d): plain AM shows the planted shortcut's colour; expert AM hides it beyond some λ."""
    from semlens.maximize import PixelParam, class_logit, expert_term, l2_penalty, maximize
    from semlens.world import generate_concepts

    train = world["train"].subset(slice(0, cfg.n_shortcut))
    marked, labels = plant_shortcut(train.images, train.labels, 0, cfg.shortcut_extra, cfg.seed + 7)
    model = train_classifier(root / "shortcut_classifier.safetensors", marked, labels, cfg.seed + 1,
                             cfg.shortcut_epochs)
    test = generate_concepts(600, 64, seed=cfg.seed + 6, masks=False)
    is0 = test.labels == 0
    others_marked = mark_images(test.images[~is0], torch.zeros(int((~is0).sum()), dtype=torch.long), 0, 1.0, 0)
    reliance = {"class-0 recall, clean": accuracy(model, test.images[is0], test.labels[is0]),
                "class-0 predictions on marked images of other classes":
                    accuracy(model, others_marked, torch.zeros(len(others_marked), dtype=torch.long))}
    with torch.no_grad():  # the logit's scale where class 0 is expressed: the (marked) training images
        dmax = float(torch.cat([model(marked[s:s + 500])[:, 0] for s in range(0, min(len(marked), 2000), 500)]).max())
    seeds, dims = 3, stats.mean.numel()
    strengths = [0.0] + list(cfg.shortcut_strengths)
    lam = torch.tensor([s / dims for s in strengths for _ in range(seeds)])
    n = len(lam)
    obj = class_logit([0] * n) * (1.0 / dmax)
    expert = expert_term(lam, gaussian.module.log_prob)
    plain = l2_penalty(torch.cat([torch.full((seeds,), cfg.shortcut_lam_plain), torch.zeros(n - seeds)]), stats.mean)

    def reg(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return expert(x, p) + plain(x, p)  # row group 0: plain AM; the others: expert AM with λ = s / D

    param = PixelParam(stats.shape, start=stats.mean, noise=0.05, lo=stats.lo, hi=stats.hi)
    res = maximize(model, obj, param, regulariser=reg, seeds=torch.arange(n), steps=cfg.steps)
    ms = mark_score(res.images).reshape(len(strengths), seeds).mean(1)
    act = res.activation.reshape(len(strengths), seeds).mean(1)
    clean_ref = float(mark_score(world["natural"]).mean())
    area = (MARK[0].stop - MARK[0].start) * (MARK[1].stop - MARK[1].start) / (stats.shape[1] * stats.shape[2])
    visible = clean_ref + area / 2  # at least half a mark's worth of magenta beyond natural images' level
    rows = [{"variant": f"plain (λ_l2 = {cfg.shortcut_lam_plain:g})" if i == 0 else f"expert λ·D = {s:g}",
             "mark colour share": round(float(ms[i]), 4), "logit ÷ training max": round(float(act[i]), 3),
             "mark visible": bool(ms[i] >= visible)} for i, s in enumerate(strengths)]
    hidden_at = next((r["variant"] for r in rows[1:] if not r["mark visible"]), None)
    return {"reliance": reliance, "rows": rows, "mark colour share natural": round(clean_ref, 4),
            "visible threshold": round(visible, 4), "mark hidden from": hidden_at, "images": res.images}


def run_maximize_eval(out: str | Path, cfg: MaxEvalConfig | None = None) -> dict[str, Any]:
    """Run the whole evaluation; write ``results.json``, ``tables.md``, ``prototypes.npz`` and
    ``report.html`` to ``out``."""
    import numpy as np

    from semlens.maximize.checks import heldout_density
    from semlens.maximize.stats import fit_image_stats

    cfg = cfg or MaxEvalConfig()
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    world = _world(cfg)
    model = train_classifier(root / "classifier.safetensors", world["train"].images, world["train"].labels,
                             cfg.seed, cfg.epochs)
    from semlens.world import generate_concepts, write_concepts

    broden = root / "broden"
    if not (broden / "index.csv").is_file():
        write_concepts(broden, n=cfg.n_broden, size=64, seed=cfg.seed)
    units = sorted(labelled_units(model, root, broden, cfg.min_iou), key=lambda r: -r["iou"])[:cfg.max_units]
    if not units:
        raise RuntimeError(f"no unit reaches IoU {cfg.min_iou}; train longer")
    judge = train_judge(root / "judge.safetensors", generate_concepts(cfg.n_judge, 64, seed=cfg.seed + 8),
                        cfg.seed + 9, cfg.judge_epochs)
    stats = fit_image_stats(world["prior"])
    priors = _priors(root, world["prior"], cfg)
    heldout = heldout_density(world["heldout"], k=16)
    rows, protos, sweep = _unit_table(model, units, world, priors, judge, heldout, stats, cfg)
    shortcut = _shortcut(root, world, stats, priors["gaussian"], cfg)
    np.savez_compressed(root / "prototypes.npz", shortcut=shortcut.pop("images").numpy(),
                        **{k.replace("/", "_"): v.numpy() for k, v in protos.items()})
    per_unit = {r["configuration"]: r.pop("per_unit") for r in rows}
    results = {"config": asdict(cfg), "test accuracy": accuracy(model, *_test(cfg)), "units": units,
               "table": rows, "expert strengths": sweep, "per_unit": per_unit,
               "shortcut": shortcut, "seconds": round(time.perf_counter() - t0, 1)}
    (root / "results.json").write_text(json.dumps(results, indent=1))
    (root / "tables.md").write_text(markdown_tables(results))
    from semlens.maximize.report import write_report

    write_report(root)
    return results


def _test(cfg: MaxEvalConfig) -> tuple[torch.Tensor, torch.Tensor]:
    from semlens.world import generate_concepts

    t = generate_concepts(600, 64, seed=cfg.seed + 2, masks=False)
    return t.images, t.labels


def _md(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def markdown_tables(results: dict[str, Any]) -> str:
    """The two result tables as Markdown."""
    cats = statistics.multimode([u["category"] for u in results["units"]])
    sc = results["shortcut"]
    return (f"Units: {len(results['units'])} labelled with IoU >= {results['config']['min_iou']} "
            f"(most common category: {', '.join(cats)}); classifier test accuracy {results['test accuracy']:.3f}.\n\n"
            + _md(results["table"]) + "\n\nExpert strength (pixel parameterisation; λ = strength / D):\n\n"
            + _md(results.get("expert strengths") or [{"": "not run"}])
            + "\n\nSlide (d), planted corner mark; reliance: "
            + ", ".join(f"{k} {v:.3f}" for k, v in sc["reliance"].items())
            + f"; magenta share of natural images {sc['mark colour share natural']}, visible from "
            f"{sc['visible threshold']}; hidden from: {sc['mark hidden from']}.\n\n" + _md(sc["rows"]) + "\n")
