"""Demo step: activation-maximization prototypes of the demo classifier's best-named units.

The units of the last conv layer with the highest dissection IoU are maximised in two of the paper's
variants — plain AM in the MaCo (phase-only) parameterisation and AM with a Gaussian density expert fitted
on the demo's images — one batch per variant, with the self-checks of ``semlens maximize``. The outputs
(``maximize/<variant>/prototypes.npy``, ``summary.csv``, one PNG per unit) are what the web app's unit
cards show once attached to a project (the serve step does that).
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import numpy as np

from semlens.experiments.demo import DemoContext
from semlens.report import Section

#: units shown (highest IoU first), optimisation steps, the concept judge's epochs, and the variants: (folder,
#: variant, parameterisation)
UNITS, STEPS, JUDGE_EPOCHS = 6, 96, 2
VARIANTS = (("plain", "plain", "maco"), ("expert", "expert", "pixel"))


def _read_summary(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _figure(layer: str, units: list[int], names: dict[int, tuple[str, str, float]],
            outs: dict[str, Path], rows: dict[str, list[dict[str, str]]]):  # noqa: ANN202
    """One row per unit: its prototype in each variant, titled with the activation ratio."""
    from semlens.report import subplots

    fig, axes = subplots(len(units), len(outs), figsize=(2.0 * len(outs), 2.0 * len(units)), squeeze=False)
    for c, (folder, out) in enumerate(outs.items()):
        protos = np.load(out / "prototypes.npy")
        for r, unit in enumerate(units):
            ax = axes[r, c]
            ax.imshow(np.clip(protos[r].transpose(1, 2, 0), 0, 1), interpolation="nearest")
            ratio, hit = float(rows[folder][r]["ratio"]), rows[folder][r]["concept_hit"]
            concept, _category, iou = names[unit]
            shows = {"1.0": "shows it", "0.0": "does not show it"}.get(hit, "not judged")
            ax.set_title(f"{folder}: unit {unit} = {concept} (IoU {iou:.2f})\nactivation ÷ max {ratio:.2f}; {shows}",
                         fontsize=6)
            ax.axis("off")
    fig.suptitle(f"Prototypes of {layer}", fontsize=8)
    fig.tight_layout()
    return fig


def run(ctx: DemoContext) -> list[Section]:
    """Uses the world step's classifier and concept images and the dissection step's ``units.csv``."""
    from semlens.maximize.data import load_images, load_unit_names
    from semlens.maximize.judge import fit_judge_broden, save_judge
    from semlens.maximize.pipeline import maximize_job
    from semlens.maximize.run import MaximizeConfig
    from semlens.maximize.store import fit_prior, save_prior

    model, data = ctx.artifacts["classifier"], ctx.artifacts["concepts_dir"]
    units_csv = ctx.artifacts["dissection_units"]
    layer = model.conv_layers[-1]
    names = load_unit_names(units_csv, layer)
    units = sorted(sorted(names, key=lambda u: -names[u][2])[:UNITS])
    t0 = time.perf_counter()
    images = load_images(data, 1000)  # read once: the prior and every job use the same images
    prior = save_prior(fit_prior("gaussian", images, seed=ctx.seed, k=64), ctx.path("maximize", "gaussian.safetensors"))
    judge = ctx.path("maximize", "judge.safetensors")  # another network and seed than the classifier: concept hits
    save_judge(fit_judge_broden(data, limit=1000, seed=ctx.seed + 1, epochs=JUDGE_EPOCHS), judge)
    outs: dict[str, Path] = {}
    rows: dict[str, list[dict[str, str]]] = {}
    for folder, variant, param in VARIANTS:
        cfg = MaximizeConfig(variant=variant, param=param, steps=STEPS, views=2, seed=ctx.seed)
        paths = maximize_job(model, layer, units, data, ctx.path("maximize", folder), cfg,
                             prior_path=prior if variant == "expert" else None, names_path=units_csv,
                             limit=1000, device=ctx.device, images=images, judge_path=judge)
        outs[folder] = paths["dir"]
        rows[folder] = _read_summary(paths["summary"])
    elapsed = time.perf_counter() - t0
    ctx.artifacts["prototypes_dirs"] = dict(outs)
    sec = Section("Activation maximization: prototypes of named units")
    sec.text(f"The {len(units)} units of {layer} with the highest dissection IoU, maximised as one batch per variant "
             f"({STEPS} steps, 2 augmented views): plain AM in the phase-only (MaCo) parameterisation, and AM with a "
             f"Gaussian density expert fitted on the demo's images; {elapsed:.1f} s on {ctx.device}. 'activation ÷ "
             "max' is the prototype's activation over the unit's maximum on natural images; `summary.csv` in "
             "maximize/<variant>/ also has the held-out log-likelihood and the path similarity. The full "
             "evaluation (all variants, concept hit rates, the planted-shortcut experiment) is "
             "`semlens reproduce maximize`. 'concept hit': whether the prototype shows the unit's dissected concept — "
             "for a colour, ≥ 5 % of its pixels of that colour; otherwise a concept judge (a ResNet fitted by "
             "`semlens maximize fit-judge` on the concept masks) gives it probability ≥ 0.5.")
    sec.table([{"unit": int(r["unit"]), "concept": r.get("concept", ""),
                **{f"{f} ratio": round(float(rows[f][i]["ratio"]), 3) for f in outs},
                **{f"{f} path similarity": round(float(rows[f][i]["path_similarity"]), 3) for f in outs},
                **{f"{f} concept hit": rows[f][i]["concept_hit"] for f in outs}}
               for i, r in enumerate(rows[VARIANTS[0][0]])])
    sec.figure(_figure(layer, units, names, outs, rows), "Per unit (row): the plain (MaCo) and the expert prototype.")
    return [sec]
