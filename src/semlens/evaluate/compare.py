"""Comparison runner: every explanation method on every metric, with bootstrap confidence intervals.

:func:`compare_methods` explains a labelled image set with each method, scores every example on each
metric of :data:`semlens.evaluate.explanations.METRICS`, and returns a :class:`Comparison`, which ranks
the methods (mean rank over ``rank_by`` metrics, each ranked by its mean score in its own direction), writes
the ranked table (CSV + JSON) and the pixel-flipping curves (PNG), and builds report sections.

Bootstrap: the examples are resampled with replacement ``n_boot`` times, the same resamples for every
method (paired), and the 2.5 / 97.5 percentiles of the resampled means give the 95 % interval.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semlens.evaluate.explanations import (
    METRICS,
    ExplainFn,
    MetricInputError,
    complexity,
    continuity,
    perturbation_curve,
    pointing_game,
    randomization_check,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    sparseness,
)
from semlens.layers import frozen
from semlens.runtime import progress
from semlens.stats import bootstrap_means

__all__ = ["CompareConfig", "Comparison", "compare_methods", "resolve_explainers", "bootstrap_means",
           "LOCALISATION_METRICS", "DEFAULT_METRICS", "RANDOM_METHOD"]

LOCALISATION_METRICS = ("relevance_mass_accuracy", "relevance_rank_accuracy", "pointing_game")
DEFAULT_METRICS = (*LOCALISATION_METRICS, "aopc_morf", "aopc_lerf", "aopc_morf_minus_random", "selectivity",
                   "continuity", "randomization_spearman", "sparseness_gini", "complexity_entropy")
RANDOM_METHOD = "random"
"""A built-in reference "method": i.i.d. uniform noise as attribution (the chance row of the table)."""


@dataclass
class CompareConfig:
    """Settings of a comparison (all logged in the JSON output).

    patch_size / baseline / steps / patches_per_step: region perturbation (see
    :func:`~semlens.evaluate.explanations.perturbation_curve`); ``perturb_batch_size``: inputs per forward
    (None: the fastest of 16..256, measured once for the model and input size, see
    :func:`~semlens.evaluate.batching.fastest_batch_size`).
    batch_size: examples explained at once. continuity_*: see :func:`~semlens.evaluate.explanations.continuity`.
    randomization_samples: examples (the first ones) used by the costly randomisation check (None = all).
    input_bounds: valid input range ``(low, high)``: the z^B bounds passed to LRP, the range of the uniform-noise
    baseline and the clipping range of continuity's noisy inputs.
    rank_by: metrics whose per-metric ranks are averaged into the overall rank.
    """

    metrics: tuple[str, ...] = DEFAULT_METRICS
    rank_by: tuple[str, ...] = ("relevance_mass_accuracy", "aopc_morf", "randomization_spearman")
    patch_size: int = 8
    baseline: str = "uniform"
    steps: int | None = None
    patches_per_step: int = 1
    perturb_batch_size: int | None = None
    batch_size: int = 32
    continuity_perturbations: int = 4
    continuity_noise: float = 0.02
    randomization_samples: int | None = None
    pointing_tolerance: int = 0
    input_bounds: tuple[float, float] = (0.0, 1.0)
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        self.metrics, self.rank_by = tuple(self.metrics), tuple(self.rank_by)
        unknown = [m for m in (*self.metrics, *self.rank_by) if m not in METRICS]
        if unknown:
            raise MetricInputError(f"unknown metric(s) {unknown}; available: {', '.join(METRICS)}")
        if self.n_boot < 1 or self.batch_size < 1:
            raise MetricInputError("n_boot and batch_size must be >= 1")


class _RandomExplainer:
    """Uniform noise attributions from a seeded generator (the chance reference)."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.rand(x.shape, generator=self.generator, dtype=x.dtype).to(x.device)


def resolve_explainers(methods: Sequence[str] | Mapping[str, ExplainFn], seed: int = 0,
                       bounds: tuple[float, float] = (0.0, 1.0)) -> dict[str, ExplainFn]:
    """Map method names to ``explain(model, x, target)`` functions.

    Names go to :func:`semlens.explain.attribute` with ``low, high = bounds`` (checked against
    ``list_methods()`` up front);
    ``"random"`` is the built-in noise reference. A mapping of callables is used as given.
    """
    if isinstance(methods, Mapping):
        if not methods:
            raise MetricInputError("no explanation methods given")
        return dict(methods)
    names = [m.strip() for m in methods if m.strip()]
    if not names:
        raise MetricInputError("no explanation methods given")
    if len(set(names)) != len(names):
        raise MetricInputError(f"duplicate method names in {names}")
    out: dict[str, ExplainFn] = {}
    real = [n for n in names if n != RANDOM_METHOD]
    if real:
        from semlens.explain import attribute, list_methods

        known = list(list_methods())
        unknown = [n for n in real if n not in known]
        if unknown:
            raise MetricInputError(f"unknown explanation method(s) {unknown}; available: {', '.join(known)}")
    for name in names:
        if name == RANDOM_METHOD:
            out[name] = _RandomExplainer(seed)
        else:
            out[name] = _attribute_fn(attribute, name, bounds)
    return out


def _attribute_fn(attribute: Callable[..., torch.Tensor], name: str, bounds: tuple[float, float]) -> ExplainFn:
    def explain(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return attribute(model, x, target, method=name, low=bounds[0], high=bounds[1])

    explain.__name__ = f"explain_{name}"
    return explain


def _average_rank(scores: list[float], higher_is_better: bool) -> list[float]:
    """1 = best; ties share the average rank; NaN ranks last."""
    key = [(-s if higher_is_better else s) if not math.isnan(s) else math.inf for s in scores]
    return [1 + sum(k2 < k for k2 in key) + (sum(k2 == k for k2 in key) - 1) / 2 for k in key]


@dataclass
class Comparison:
    """Per-example scores of every method on every metric, and the curves behind the AOPC columns.

    scores[method][metric]: (N,) float64 CPU (NaN where undefined); curves[method][order]: (N, L+1) target
    logits for ``"morf"``/``"lerf"``; random_curve: (N, L+1); fraction: (L+1,) share of patches perturbed;
    correct: (N,) bool, the model predicts the target class. references: methods shown but not ranked (the
    ``"random"`` noise row: it is trivially "perfect" on the randomisation check, which it must not win).
    """

    methods: list[str]
    metrics: list[str]
    scores: dict[str, dict[str, torch.Tensor]]
    curves: dict[str, dict[str, torch.Tensor]]
    random_curve: torch.Tensor | None
    fraction: torch.Tensor | None
    correct: torch.Tensor
    config: CompareConfig
    randomization_layers: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return int(self.correct.numel())

    def _subset(self, only_correct: bool) -> torch.Tensor:
        keep = self.correct if only_correct else torch.ones_like(self.correct)
        if not bool(keep.any()):
            raise MetricInputError("no example is predicted correctly; cannot restrict to correct predictions")
        return keep

    @property
    def ranked_methods(self) -> list[str]:
        """The methods that are ranked: all but the references (e.g. the ``"random"`` noise row)."""
        return [m for m in self.methods if m not in self.references]

    def summary(self, only_correct: bool = False) -> dict[str, dict[str, dict[str, float]]]:
        """``metric -> method -> {mean, lo, hi, rank}`` with paired bootstrap intervals (references: rank NaN)."""
        keep = self._subset(only_correct)
        ranked = self.ranked_methods
        out: dict[str, dict[str, dict[str, float]]] = {}
        for metric in self.metrics:
            values = torch.stack([self.scores[m][metric][keep] for m in self.methods])
            mean, lo, hi, _ = bootstrap_means(values, self.config.n_boot, self.config.seed)
            ranks = dict(zip(ranked, _average_rank([float(mean[self.methods.index(m)]) for m in ranked],
                                                   METRICS[metric].higher_is_better), strict=True))
            out[metric] = {
                m: {"mean": float(mean[i]), "lo": float(lo[i]), "hi": float(hi[i]), "rank": ranks.get(m, math.nan)}
                for i, m in enumerate(self.methods)
            }
        return out

    def table(self, only_correct: bool = False) -> list[dict[str, Any]]:
        """Ranked rows: ``rank, method, mean_rank`` then ``<metric>, <metric>_lo, <metric>_hi`` per metric;
        reference rows (not ranked, ``rank = "ref"``) come last."""
        summ = self.summary(only_correct)
        rank_by = [m for m in self.config.rank_by if m in self.metrics] or self.metrics[:1]
        rows = []
        for method in self.methods:
            row: dict[str, Any] = {"method": method}
            row["mean_rank"] = sum(summ[m][method]["rank"] for m in rank_by) / len(rank_by)
            for metric in self.metrics:
                s = summ[metric][method]
                row[metric], row[f"{metric}_lo"], row[f"{metric}_hi"] = s["mean"], s["lo"], s["hi"]
            rows.append(row)
        first = rank_by[0]
        sign = -1.0 if METRICS[first].higher_is_better else 1.0
        ranked = sorted((r for r in rows if r["method"] not in self.references),
                        key=lambda r: (r["mean_rank"], sign * r[first]))
        refs = [{"rank": "ref", **r, "mean_rank": None} for r in rows if r["method"] in self.references]
        return [{"rank": i + 1, **r} for i, r in enumerate(ranked)] + refs

    def margins(self, only_correct: bool = False) -> dict[str, dict[str, Any]]:
        """For each ``rank_by`` metric: best and runner-up method, their difference, and the share of paired
        bootstrap resamples in which the best one is ahead (references excluded)."""
        keep = self._subset(only_correct)
        out: dict[str, dict[str, Any]] = {}
        methods = self.ranked_methods
        for metric in [m for m in self.config.rank_by if m in self.metrics]:
            if len(methods) < 2:
                break
            values = torch.stack([self.scores[m][metric][keep] for m in methods])
            mean, _, _, boot = bootstrap_means(values, self.config.n_boot, self.config.seed)
            sign = 1.0 if METRICS[metric].higher_is_better else -1.0
            order = sorted(range(len(methods)), key=lambda i: -sign * float(mean[i]))
            a, b = order[0], order[1]
            out[metric] = {
                "best": methods[a], "runner_up": methods[b],
                "difference": float(mean[a] - mean[b]),
                "p_best_ahead": float((sign * (boot[a] - boot[b]) > 0).double().mean()),
            }
        return out

    def to_dict(self, only_correct: bool = False) -> dict[str, Any]:
        curves = {m: {o: c.mean(0).tolist() for o, c in oc.items()} for m, oc in self.curves.items()}
        return {
            "n_examples": self.n,
            "n_correct": int(self.correct.sum()),
            "only_correct": only_correct,
            "config": asdict(self.config),
            "metrics": {m: asdict(METRICS[m]) for m in self.metrics},
            "randomization_layers": self.randomization_layers,
            "table": self.table(only_correct),
            "margins": self.margins(only_correct),
            "mean_curves": curves,
            "random_curve": None if self.random_curve is None else self.random_curve.mean(0).tolist(),
            "fraction": None if self.fraction is None else self.fraction.tolist(),
        }

    def write(self, out_dir: str | os.PathLike, only_correct: bool = False) -> dict[str, Path]:
        """Write ``ranking.csv``, ``ranking.json`` and (when curves exist) ``perturbation_curves.png``."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        rows = self.table(only_correct)
        paths = {"csv": out / "ranking.csv", "json": out / "ranking.json"}
        with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        paths["json"].write_text(json.dumps(_finite(self.to_dict(only_correct)), indent=2, allow_nan=False),
                                 encoding="utf-8")
        fig = self.figure()
        if fig is not None:
            paths["png"] = out / "perturbation_curves.png"
            fig.savefig(paths["png"], dpi=110, bbox_inches="tight")
            from semlens.report import close_figure

            close_figure(fig)
        return paths

    def figure(self) -> Any:
        """Mean MoRF and LeRF curves of the target logit per method (random order dashed); None without curves."""
        if not self.curves or self.fraction is None:
            return None
        from semlens.report import subplots

        orders = [o for o in ("morf", "lerf") if any(o in c for c in self.curves.values())]
        fig, axes = subplots(1, len(orders), figsize=(5.2 * len(orders), 3.8), squeeze=False)
        frac = self.fraction.numpy()
        for ax, order in zip(axes[0], orders, strict=True):
            for method in self.methods:
                if order in self.curves.get(method, {}):
                    ax.plot(frac, self.curves[method][order].mean(0).numpy(), label=method, lw=1.6)
            if self.random_curve is not None:
                ax.plot(frac, self.random_curve.mean(0).numpy(), "k--", lw=1.2, label="random order")
            ax.set_xlabel("fraction of patches perturbed")
            ax.set_ylabel("mean target logit")
            ax.set_title(f"{order.upper()} ({self.config.patch_size}px patches, {self.config.baseline} baseline)")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        return fig

    def sections(self, title: str = "Explanation quality: methods ranked") -> list[Any]:
        """Report sections: the ranked table with 95 % intervals, the winner's margins and the curves."""
        from semlens.report import Section

        rows = self.table()
        shown = []
        for r in rows:
            mean_rank = "-" if r["rank"] == "ref" else round(r["mean_rank"], 2)
            row: dict[str, Any] = {"rank": r["rank"], "method": r["method"], "mean rank": mean_rank}
            for m in self.metrics:
                arrow = "↑" if METRICS[m].higher_is_better else "↓"
                row[f"{m} {arrow}"] = f"{r[m]:.3f} [{r[m + '_lo']:.3f}, {r[m + '_hi']:.3f}]"
            shown.append(row)
        sec = Section(title)
        cfg = self.config
        sec.text(
            f"{len(self.methods)} methods on {self.n} examples ({int(self.correct.sum())} predicted correctly), "
            f"ranked by the mean of their ranks on {', '.join(cfg.rank_by)}. Cells: mean [95% paired bootstrap "
            f"interval, {cfg.n_boot} resamples]. Perturbation: {cfg.patch_size}px non-overlapping patches ranked by "
            f"patch-summed relevance, replaced by '{cfg.baseline}' values; AOPC in logit units. Randomisation: mean "
            "Spearman correlation (|channel-summed map|) over the cascade, top layer first (lower = explanation "
            "depends on the weights)."
        )
        sec.table(shown)
        for metric, mg in self.margins().items():
            sec.text(f"{metric}: {mg['best']} leads {mg['runner_up']} by {mg['difference']:+.3f} "
                     f"(ahead in {100 * mg['p_best_ahead']:.0f}% of bootstrap resamples).")
        fig = self.figure()
        if fig is not None:
            sec.figure(fig, caption="Region-perturbation curves: mean target logit as patches are replaced, "
                                    "most relevant first (MoRF, steep = faithful) and least relevant first "
                                    "(LeRF, flat = good).")
        return [sec]


def _checked_metrics(cfg: CompareConfig, images: torch.Tensor, targets: torch.Tensor,
                     masks: torch.Tensor | None) -> list[str]:
    """The metrics to compute (localisation ones dropped without masks, unless asked for explicitly: then an
    error); every input's shape checked before any work."""
    metrics = list(cfg.metrics)
    if masks is None:  # the default metric set drops localisation silently; an explicit request fails
        needing = [m for m in metrics if m in LOCALISATION_METRICS]
        if needing and cfg.metrics != DEFAULT_METRICS:
            raise MetricInputError(f"metrics {needing} need evidence masks; pass masks=...")
        metrics = [m for m in metrics if m not in LOCALISATION_METRICS]
    if not torch.is_tensor(images) or images.dim() != 4:
        raise MetricInputError(f"images must be an (N, C, H, W) tensor, got {getattr(images, 'shape', images)}")
    n = images.shape[0]
    if not torch.is_tensor(targets) or targets.shape != (n,):
        raise MetricInputError(f"targets must be an ({n},) integer tensor, got {getattr(targets, 'shape', targets)}")
    if masks is not None:
        if masks.shape[0] != n or masks.shape[-2:] != images.shape[-2:]:
            raise MetricInputError(f"masks of shape {tuple(masks.shape)} do not fit images of shape "
                                   f"{tuple(images.shape)}")
        empty = (~masks.bool().flatten(1).any(1)).nonzero().flatten().tolist()
        if empty:  # fail before any work, not in the middle of the run
            raise MetricInputError(f"empty evidence mask for examples {empty[:10]}")
    return metrics


@dataclass
class _Batch:
    """One batch of examples with what every method's scoring shares: inputs (B, C, H, W), targets (B,),
    masks (B, H, W) or None, the batch's first example index, the perturbation seed and the random-order
    curve (None when no perturbation metric is asked for) and the randomization-check results."""

    x: torch.Tensor
    t: torch.Tensor
    m: torch.Tensor | None
    start: int
    seed: int
    random_curve: Any = None
    randomization: dict[str, Any] = field(default_factory=dict)


def _score_method(model: nn.Module, name: str, a: torch.Tensor, batch: _Batch, explain: ExplainFn,
                  cfg: CompareConfig, want: set[str], curve_kw: dict[str, Any],
                  s: dict[str, list[torch.Tensor]], curves: dict[str, list[torch.Tensor]]) -> None:
    """Append method ``name``'s (B,) scores on ``batch`` (attribution ``a``) to ``s`` and its curves to ``curves``."""
    x, t, m, rc = batch.x, batch.t, batch.m, batch.random_curve
    low, high = cfg.input_bounds
    if m is not None:
        if "relevance_mass_accuracy" in want:
            s["relevance_mass_accuracy"].append(relevance_mass_accuracy(a, m))
        if "relevance_rank_accuracy" in want:
            s["relevance_rank_accuracy"].append(relevance_rank_accuracy(a, m))
        if "pointing_game" in want:
            s["pointing_game"].append(pointing_game(a, m, tolerance=cfg.pointing_tolerance))
    if want & _MORF_METRICS:
        c = perturbation_curve(model, x, t, a, order="morf", generator=_gen(batch.seed), **curve_kw)
        curves.setdefault("morf", []).append(c.scores.cpu())
        if "aopc_morf" in want:
            s["aopc_morf"].append(c.aopc())
        if "aopc_morf_minus_random" in want:
            s["aopc_morf_minus_random"].append(c.aopc() - rc.aopc())
        if "selectivity" in want:
            s["selectivity"].append(c.auc())
    if "aopc_lerf" in want:
        c = perturbation_curve(model, x, t, a, order="lerf", generator=_gen(batch.seed), **curve_kw)
        curves.setdefault("lerf", []).append(c.scores.cpu())
        s["aopc_lerf"].append(c.aopc())
    if "continuity" in want:
        s["continuity"].append(continuity(
            model, x, t, explain, attribution=a, n_perturbations=cfg.continuity_perturbations,
            noise_std=cfg.continuity_noise, batch_size=cfg.batch_size, generator=_gen(cfg.seed + batch.start),
            low=low, high=high))
    if "randomization_spearman" in want:
        rand = batch.randomization
        score = rand[name].score() if rand else torch.empty(0)
        pad = torch.full((x.shape[0] - score.numel(),), math.nan, dtype=torch.float64)
        s["randomization_spearman"].append(torch.cat([score.cpu(), pad]))
    if "sparseness_gini" in want:
        s["sparseness_gini"].append(sparseness(a))
    if "complexity_entropy" in want:
        s["complexity_entropy"].append(complexity(a))


#: metrics read from the most-relevant-first perturbation curve
_MORF_METRICS = frozenset({"aopc_morf", "aopc_morf_minus_random", "selectivity"})


def compare_methods(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    methods: Sequence[str] | Mapping[str, ExplainFn],
    masks: torch.Tensor | None = None,
    config: CompareConfig | None = None,
    *,
    device: str | torch.device | None = None,
    show_progress: bool | None = None,
) -> Comparison:
    """Score every method on every metric for ``images: (N, C, H, W)`` in [0, 1], ``targets: (N,)`` int64
    class indices and optional evidence ``masks: (N, H, W)`` bool (localisation metrics need them).

    Examples are processed in batches of ``config.batch_size`` on ``device`` (default: the model's device);
    results are gathered on the CPU. The model is evaluated frozen (eval mode); its state is restored after.
    """
    cfg = config or CompareConfig()
    metrics = _checked_metrics(cfg, images, targets, masks)
    n = images.shape[0]
    explainers = resolve_explainers(methods, cfg.seed, cfg.input_bounds)
    low, high = cfg.input_bounds
    names = list(explainers)
    dev = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), torch.device("cpu"))
    want = set(metrics)
    per: dict[str, dict[str, list[torch.Tensor]]] = {m: {k: [] for k in metrics} for m in names}
    curves: dict[str, dict[str, list[torch.Tensor]]] = {m: {} for m in names}
    random_curves: list[torch.Tensor] = []
    correct: list[torch.Tensor] = []
    fraction = None
    layers: list[str] = []
    n_rand = n if cfg.randomization_samples is None else min(n, cfg.randomization_samples)
    perturb_batch = cfg.perturb_batch_size
    if perturb_batch is None:  # measured: the largest batch is not always the fastest per input on CPUs
        from semlens.evaluate.batching import fastest_batch_size

        with frozen(model, freeze_params=False), torch.no_grad():
            perturb_batch = fastest_batch_size(model, images[:1].to(dev),
                                               needed=min(n, cfg.batch_size) * ((cfg.steps or 100) + 1))
    curve_kw: dict[str, Any] = dict(patch_size=cfg.patch_size, baseline=cfg.baseline, steps=cfg.steps,
                                    patches_per_step=cfg.patches_per_step, batch_size=perturb_batch,
                                    low=low, high=high)
    starts = range(0, n, cfg.batch_size)
    with frozen(model, freeze_params=False):
        for start in progress(starts, total=len(starts), desc="evaluate explanations", enabled=show_progress):
            sl = slice(start, min(start + cfg.batch_size, n))
            # the random-order curve uses its own generator state per batch; the baseline values of each
            # image are drawn with a fixed seed so every method and order perturbs with the same noise
            batch = _Batch(images[sl].to(dev, torch.float32), targets[sl].to(dev, torch.long),
                           masks[sl].to(dev) if masks is not None else None, start, cfg.seed + 7919 * (start + 1))
            x, t = batch.x, batch.t
            with torch.no_grad():
                correct.append((model(x).argmax(1) == t).cpu())
            attributions = {name: fn(model, x, t).detach() for name, fn in explainers.items()}
            if want & _MORF_METRICS or "aopc_lerf" in want:
                rc = perturbation_curve(model, x, t, None, order="random", generator=_gen(batch.seed), **curve_kw)
                random_curves.append(rc.scores.cpu())
                fraction, batch.random_curve = rc.fraction, rc
            if "randomization_spearman" in want and start < n_rand:
                k = min(n_rand - start, x.shape[0])
                batch.randomization = randomization_check(
                    model, x[:k], t[:k], explainers, attributions={a: r[:k] for a, r in attributions.items()},
                    seed=cfg.seed)
                layers = next(iter(batch.randomization.values())).layers
            for name, a in attributions.items():
                _score_method(model, name, a, batch, explainers[name], cfg, want, curve_kw, per[name], curves[name])
    scores = {name: {k: torch.cat([v.detach().cpu().double() for v in vals]) for k, vals in per[name].items()}
              for name in names}
    return Comparison(
        methods=names, metrics=metrics, scores=scores,
        curves={name: {o: torch.cat(v) for o, v in oc.items()} for name, oc in curves.items()},
        random_curve=torch.cat(random_curves) if random_curves else None, fraction=fraction,
        correct=torch.cat(correct), config=replace(cfg, perturb_batch_size=perturb_batch),  # the batch used
        randomization_layers=layers,
        references=[m for m in names if m == RANDOM_METHOD],
    )


def _finite(obj: Any) -> Any:
    """NaN/inf floats -> None, recursively (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
