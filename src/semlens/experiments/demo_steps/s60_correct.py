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
    """The image-classifier correction, then (when the caption step ran) the captioner correction."""
    sections = _image_sections(ctx)
    if all(k in ctx.artifacts for k in ("caption_models", "caption_prepared", "caption_neurons")):
        sections += _caption_sections(ctx)
    return sections


def _caption_sections(ctx: DemoContext) -> list[Section]:
    """Captioner variant (Dong et al. 2017) on the built-in clips: enhancement, then propagation on
    remarks for half of the clips with a missed topic, measured on the held-out half."""
    from semlens.correct.captioner import evaluate_caption_correction

    t0 = time.perf_counter()
    prep = ctx.artifacts["caption_prepared"]
    model = ctx.artifacts["caption_models"]["LSTM-I"]
    names = ctx.artifacts["caption_neurons"]
    res = evaluate_caption_correction(model, names, prep.train, prep.test, prep.topics.top_words(8), mu=1e-2,
                                      steps=50, lr=1e-4, beam=1, seed=ctx.seed, scores=True, meteor=True)
    sec = Section("Correction through named neurons (video captioner)")
    if res["n_misses"] == 0:
        return [sec.text("No test clip's caption misses a topic that it contains and that neurons carry; "
                         "nothing to correct.")]
    sec.table([
        {"measure": "test clips / (clip, topic) misses", "value": f"{res['n_test']} / {res['n_misses']}"},
        {"measure": "misses fixed by enhancement (caption from v*)", "value": f"{res['enhancement_fix_rate']:.3f}"},
        {"measure": f"misses fixed after propagation, remark clips ({res['n_remark_clips']})",
         "value": f"{res['remark_fix_rate']:.3f}"},
        {"measure": f"misses fixed after propagation, held-out clips ({res['n_heldout_clips']})",
         "value": f"{res['heldout_fix_rate']:.3f}"},
        {"measure": "test captions changed by propagation", "value": f"{res['changed_captions']} / {res['n_test']}"},
        *({"measure": f"test {k} before -> after propagation",
           "value": f"{res['scores_before'][k]:.3f} -> {res['scores_after'][k]:.3f}"}
          for k in ("BLEU-4", "METEOR", "CIDEr") if k in res.get("scores_before", {})),
    ])
    before, after = res.get("scores_before", {}), res.get("scores_after", {})
    drops = {k: before[k] - after[k] for k in ("BLEU-4", "METEOR") if k in before and k in after}
    held = ("held: " + ", ".join(f"{k} changed by {-d:+.3f}" for k, d in drops.items())
            if drops and max(drops.values()) <= 0.02 else
            "NOT held: " + ", ".join(f"{k} changed by {-d:+.3f}" for k, d in drops.items()) if drops else
            "not checked (no scores)")
    sec.text("LSTM-I, greedy decoding; a miss is a topic the clip contains (its LDA topic target) whose top-8 "
             "words are absent from the caption. Propagation: encoder only, mu=1e-2, 50 Adam steps at lr 1e-4 "
             f"(Dong et al. 2017). Took {time.perf_counter() - t0:.1f} s. Tolerance we hold propagation to: "
             f"test BLEU-4 and METEOR may drop by at most 0.02 (about half the seed-to-seed std of BLEU-4); {held}.")
    return [sec]


def _image_sections(ctx: DemoContext) -> list[Section]:
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
                              mu=1e-2, steps=50, lr=1e-4)
    sections = correction_sections(res, "Correction through named units (image classifier)")
    sections[0].text(f"Concept chosen automatically: '{concept}' (the class concept with a detector that the demo "
                     f"classifier misses most often). Took {time.perf_counter() - t0:.1f} s. The full "
                     "experiment with a class made rare in training is `semlens reproduce correction`.")
    return sections
