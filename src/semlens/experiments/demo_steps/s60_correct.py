"""Demo step: correcting the demo classifier through units that dissection named."""

from __future__ import annotations

import copy
import time

import torch

from semlens.experiments.demo import DemoContext
from semlens.report import Section


def _pick_concept(units_csv, layers, class_names, labels, pred) -> tuple[str, str] | None:
    """The class-name concept with a detector that the model misses most often (images of its classes
    predicted as a class without it)."""
    from semlens.experiments.correction import deepest_layer_with

    best = None
    for concept in sorted({tok for name in class_names for tok in name.split(" ")}):
        layer = deepest_layer_with(units_csv, layers, concept)
        if layer is None:
            continue
        has = torch.tensor([concept in n.split(" ") for n in class_names])
        errors = int((has[labels] & ~has[pred]).sum())
        if best is None or errors > best[0]:
            best = (errors, concept, layer)
    return None if best is None else (best[1], best[2])


def run(ctx: DemoContext) -> list[Section]:
    from semlens.correct.classifier import ClassifierCorrector, UnitNames
    from semlens.experiments.correction import correction_sections, evaluate_correction
    from semlens.world import BrodenDataset

    missing = [k for k in ("classifier", "concepts_test", "concepts_dir", "dissection_units") if k not in ctx.artifacts]
    if missing:
        raise KeyError(f"the correction step needs the artifacts {missing} of the world and dissection steps")
    t0 = time.perf_counter()
    model = ctx.artifacts["classifier"]
    test = ctx.artifacts["concepts_test"]
    units_csv = ctx.artifacts["dissection_units"]
    with torch.no_grad():
        pred = model(test.images.to(ctx.device)).argmax(-1).cpu()
    choice = _pick_concept(units_csv, model.conv_layers, test.class_names, test.labels, pred)
    if choice is None:
        return [Section("Correction through named units").text(
            "No class concept has a detector unit in the demo classifier; nothing to correct.")]
    concept, layer = choice
    clone = copy.deepcopy(model)  # the demo classifier itself stays as it was
    corr = ClassifierCorrector(clone, layer, UnitNames.from_csv(units_csv, layer), device=ctx.device)
    ds = BrodenDataset(ctx.artifacts["concepts_dir"])
    corr.fit_references(ds, ds.split_indices("train"))
    res = evaluate_correction(corr, test.images, test.labels, test.class_names, concept, n_remarks=16,
                              mu=1e-2, steps=40, lr=1e-3)
    sections = correction_sections(res, "Correction through named units (image classifier)")
    sections[0].text(f"Concept chosen automatically: '{concept}' (the class concept with a detector that the demo "
                     f"classifier misses most often). Took {time.perf_counter() - t0:.1f} s. The full "
                     "experiment with a class made rare in training is `semlens reproduce correction`.")
    return sections
