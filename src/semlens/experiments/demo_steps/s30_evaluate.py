"""Demo step: rank explanation methods on the trained concept classifier against ground-truth evidence.

Uses ``ctx.artifacts["classifier"]`` and ``ctx.artifacts["concepts_test"]`` (from ``s10_world``); scores
every method on localisation (relevance mass / rank accuracy, pointing game), faithfulness (region
perturbation AOPC, MoRF and LeRF), continuity, the randomisation sanity check and complexity; writes
``evaluate/ranking.{csv,json}`` and ``evaluate/perturbation_curves.png``. Budget: about 60 s on 2 CPU cores.
"""

from __future__ import annotations

import time
from typing import Any

from semlens.evaluate.compare import CompareConfig, compare_methods
from semlens.explain import list_methods
from semlens.report import Section

DEMO_METHODS = ("gradient", "gradient-x-input", "sensitivity", "epsilon-plus-flat", "epsilon-gamma-box",
                "epsilon-alpha2-beta1", "random")
N_EXAMPLES = 32


def run(ctx: Any) -> list[Section]:
    missing = [k for k in ("classifier", "concepts_test") if k not in ctx.artifacts]
    if missing:
        raise KeyError(f"the evaluate step needs the artifacts {missing} of the world step (s10_world); "
                       "run the demo without --only, or with the world step included")
    model = ctx.artifacts["classifier"]
    test = ctx.artifacts["concepts_test"]
    n = min(N_EXAMPLES, len(test))
    known = set(list_methods())
    methods = [m for m in DEMO_METHODS if m == "random" or m in known]
    size = test.images.shape[-1]
    cfg = CompareConfig(
        patch_size=8 if size >= 32 else 4, baseline="uniform", patches_per_step=4, batch_size=n,
        continuity_perturbations=1, randomization_samples=16, n_boot=1000, seed=ctx.seed,
    )
    t0 = time.perf_counter()
    result = compare_methods(model, test.images[:n], test.labels[:n], methods, masks=test.evidence[:n],
                             config=cfg, device=ctx.device)
    elapsed = time.perf_counter() - t0
    paths = result.write(ctx.path("evaluate", "ranking.csv").parent)
    rows = result.table()
    sections = result.sections("Explanation quality: which method is right? (ground-truth evidence)")
    sec = sections[0]
    best, second = rows[0], rows[1]
    margins = result.margins()
    mass = margins.get("relevance_mass_accuracy", {})
    chance = float(test.evidence[:n].float().mean())
    sec.text(
        f"Winner: {best['method']} (mean rank {best['mean_rank']:.2f} vs {second['mean_rank']:.2f} for "
        f"{second['method']}). Relevance mass accuracy {best['relevance_mass_accuracy']:.3f} vs chance "
        f"{chance:.3f} (evidence covers {100 * chance:.1f}% of the pixels); AOPC(MoRF) "
        f"{best['aopc_morf']:.3f} vs {second['aopc_morf']:.3f}; randomisation correlation "
        f"{best['randomization_spearman']:.3f}. Best on mass accuracy: {mass.get('best', '-')} "
        f"(+{mass.get('difference', float('nan')):.3f} over {mass.get('runner_up', '-')}, ahead in "
        f"{100 * mass.get('p_best_ahead', float('nan')):.0f}% of bootstrap resamples). "
        f"{n} held-out images, {int(result.correct.sum())} classified correctly; {elapsed:.1f} s. "
        f"Files: {paths['csv'].name}, {paths['json'].name}."
    )
    ctx.artifacts["explanation_ranking"] = rows
    ctx.artifacts["explanation_ranking_dir"] = paths["csv"].parent
    return sections
