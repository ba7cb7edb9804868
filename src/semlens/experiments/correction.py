"""Human-in-the-loop correction of an image classifier through dissection-named units.

``semlens reproduce correction`` (issue "Human-in-the-loop correction", image variant):

1. generate concept images; in the training set keep only ``keep_fraction`` of the images of
   ``rare_class`` (default "red square": red and squares are common elsewhere, but rarely together);
2. train ``alexnet-like``; dissect its conv layers on Broden-format training images; pick the deepest
   conv layer with at least one unit that detects ``concept`` (default "red"; the trained model calls red
   squares red circles, so the shape is what it misses, but no unit detects "square" — the run reports that);
3. :func:`evaluate_correction`: remarks are test images of the concept's classes that the model gets
   wrong, each saying "misses <concept>"; measured are the immediate fix (activation enhancement) on
   the remarked images, then correction propagation on them, its generalization to *held-out* test
   images of those classes, and overall accuracy before/after.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from semlens.correct.classifier import ClassifierCorrector, UnitNames
from semlens.report import Section

__all__ = ["ImageCorrectionConfig", "run_image_correction", "evaluate_correction", "deepest_layer_with",
           "correction_sections"]


@dataclass
class ImageCorrectionConfig:
    rare_class: str = "red square"
    concept: str = "red"
    keep_fraction: float = 0.04
    n_train: int = 16000
    n_test: int = 1500
    n_reference: int = 1500
    size: int = 64
    epochs: int = 8
    batch_size: int = 64
    lr: float = 2e-3
    n_remarks: int = 16
    mu: float = 1e-2
    steps: int = 50
    correct_lr: float = 1e-4
    min_iou: float = 0.04
    seed: int = 0
    device: str = "auto"

    @classmethod
    def fast(cls, **overrides: Any) -> ImageCorrectionConfig:
        return cls(**{"n_train": 5000, "n_test": 800, "n_reference": 600, "epochs": 4, **overrides})


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1).cpu() == labels).float().mean()) if len(labels) else float("nan")


def deepest_layer_with(units_csv: str | Path, layers: list[str], concept: str, min_iou: float = 0.04) -> str | None:
    """The last of ``layers`` with a unit that detects ``concept`` (IoU > ``min_iou``), or None."""
    for name in reversed(layers):
        try:
            UnitNames.from_csv(units_csv, name).units_for(concept, min_iou)
            return name
        except KeyError:
            continue
    return None


def evaluate_correction(corrector: ClassifierCorrector, images: torch.Tensor, labels: torch.Tensor,
                        class_names: list[str], concept: str, *, n_remarks: int = 16, mu: float = 1e-2,
                        steps: int = 50, lr: float = 1e-4) -> dict[str, Any]:
    """Remarks "misses <concept>" on test images of the classes whose name contains ``concept`` that the
    model assigns to a class *without* it; measured before, with enhancement and after propagation:
    concept recall (share of those classes' images predicted as a class with the concept — the image
    analogue of "the caption now mentions the topic"), accuracy on them, on other classes and overall.
    The corrector's model is changed in place."""
    has = torch.tensor([concept in name.split(" ") for name in class_names])
    if not bool(has.any()):
        raise ValueError(f"no class name contains {concept!r}: {', '.join(class_names)}")
    logits = corrector.predict(images)
    pred = logits.argmax(-1).cpu()
    on_target = has[labels]
    remarked = torch.nonzero(on_target & ~has[pred]).flatten()[:n_remarks]
    held = torch.nonzero(on_target).flatten()
    held = held[~torch.isin(held, remarked)]
    x_rem, y_rem = images[remarked], labels[remarked]
    enhanced = corrector.predict(x_rem, [concept]) if len(remarked) else torch.empty(0, logits.shape[1])

    def recall(lg: torch.Tensor) -> float:
        return float(has[lg.argmax(-1).cpu()].float().mean()) if len(lg) else float("nan")

    def scores(lg: torch.Tensor) -> dict[str, float]:
        return {"test_accuracy": _accuracy(lg, labels),
                "concept_classes_heldout_accuracy": _accuracy(lg[held], labels[held]),
                "concept_heldout_recall": recall(lg[held]),
                "other_classes_accuracy": _accuracy(lg[~on_target], labels[~on_target]),
                "remarked_accuracy": _accuracy(lg[remarked], y_rem), "remarked_recall": recall(lg[remarked])}

    before = scores(logits)
    prop = None
    if len(remarked):
        prop = corrector.propagate(x_rem, [[concept]] * len(remarked), mu=mu, steps=steps, lr=lr)
    after = scores(corrector.predict(images))
    return {
        "concept": concept, "layer": corrector.layer, "units": corrector.units(concept).tolist(),
        "remarks": len(remarked), "heldout_images": len(held),
        "enhanced_remarked_accuracy": _accuracy(enhanced, y_rem), "enhanced_remarked_recall": recall(enhanced),
        "before": before, "after": after,
        "propagation_distance": [prop.data_loss[0], prop.data_loss[-1]] if prop else None,
        "params": {"mu": mu, "steps": steps, "lr": lr},
    }


def correction_sections(res: dict[str, Any], title: str) -> list[Section]:
    """A report section with the before / enhanced / after table."""
    sec = Section(title)
    if "error" in res:
        return [sec.text(res["error"])]
    b, a = res["before"], res["after"]
    sec.text(f"{res['remarks']} remarks 'misses {res['concept']}' on misclassified test images; the "
             f"{len(res['units'])} units of {res['layer']} named '{res['concept']}' by dissection "
             f"({', '.join(map(str, res['units'][:8]))}) are enhanced, then correction propagation fine-tunes the "
             f"layers up to {res['layer']} (mu={res['params']['mu']}, {res['params']['steps']} steps).")
    sec.table([
        {"measure": f"remarked images predicted with '{res['concept']}'", "before": b["remarked_recall"],
         "enhanced": res["enhanced_remarked_recall"], "after propagation": a["remarked_recall"]},
        {"measure": f"held-out '{res['concept']}' images predicted with it", "before": b["concept_heldout_recall"],
         "enhanced": "", "after propagation": a["concept_heldout_recall"]},
        {"measure": "accuracy on the remarked images", "before": b["remarked_accuracy"],
         "enhanced": res["enhanced_remarked_accuracy"], "after propagation": a["remarked_accuracy"]},
        {"measure": f"held-out images of '{res['concept']}' classes ({res['heldout_images']})",
         "before": b["concept_classes_heldout_accuracy"], "enhanced": "",
         "after propagation": a["concept_classes_heldout_accuracy"]},
        {"measure": "images of other classes", "before": b["other_classes_accuracy"], "enhanced": "",
         "after propagation": a["other_classes_accuracy"]},
        {"measure": "whole test set", "before": b["test_accuracy"], "enhanced": "",
         "after propagation": a["test_accuracy"]},
    ])
    return [sec]


def run_image_correction(out: str | Path, cfg: ImageCorrectionConfig | None = None) -> dict[str, Any]:
    """Train with a rare class, dissect, correct; write ``out/results.json`` and return the results."""
    from semlens.models import build_model
    from semlens.runtime import resolve_device, seed_everything
    from semlens.train import TrainConfig, Trainer
    from semlens.units.dissect import dissect
    from semlens.world import BrodenDataset, generate_concepts, write_concepts

    cfg = cfg or ImageCorrectionConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    t0 = time.perf_counter()
    train = generate_concepts(cfg.n_train, size=cfg.size, seed=cfg.seed + 1, masks=False)
    test = generate_concepts(cfg.n_test, size=cfg.size, seed=cfg.seed + 2, masks=False)
    if cfg.rare_class not in train.class_names:
        raise ValueError(f"unknown class {cfg.rare_class!r}; classes: {', '.join(train.class_names)}")
    rare = train.labels == train.class_names.index(cfg.rare_class)
    g = torch.Generator().manual_seed(cfg.seed)
    keep = ~rare | (torch.rand(len(train), generator=g) < cfg.keep_fraction)
    train = train.subset(torch.nonzero(keep).flatten())
    kwargs = {"num_classes": len(train.class_names), "image_size": cfg.size}
    model = build_model("alexnet-like", **kwargs)
    trainer = Trainer(model, train.dataset(), None,
                      TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                                  weight_decay=0.0, device=str(device), lr_schedule="cosine"),
                      model_config={"model": "alexnet-like", "model_kwargs": kwargs})
    trainer.fit()
    trainer.save(out / "rare-trained.safetensors")
    model.eval()
    t_train = time.perf_counter() - t0
    broden = BrodenDataset(write_concepts(out / "reference", n=cfg.n_reference, size=cfg.size, seed=cfg.seed + 3))
    dissect(model, broden, model.conv_layers, device=device, batch_size=100).save(out / "dissection")
    summary: dict[str, Any] = {"config": asdict(cfg), "train_images": len(train),
                               "rare_train_images": int((train.labels == train.class_names.index(cfg.rare_class))
                                                        .sum()), "train_seconds": t_train}
    layer = deepest_layer_with(out / "dissection" / "units.csv", model.conv_layers, cfg.concept, cfg.min_iou)
    if layer is None:
        summary["error"] = f"no conv unit detects {cfg.concept!r} (IoU > {cfg.min_iou}); nothing to enhance"
    else:
        corr = ClassifierCorrector(model, layer, UnitNames.from_csv(out / "dissection" / "units.csv", layer),
                                   min_iou=cfg.min_iou, device=device)
        corr.fit_references(broden, range(len(broden)))
        is_rare = test.labels == test.class_names.index(cfg.rare_class)
        rare_before = _accuracy(corr.predict(test.images[is_rare]), test.labels[is_rare])
        summary.update(evaluate_correction(corr, test.images, test.labels, test.class_names, cfg.concept,
                                           n_remarks=cfg.n_remarks, mu=cfg.mu, steps=cfg.steps, lr=cfg.correct_lr))
        summary["rare_class_accuracy"] = {"before": rare_before, "after": _accuracy(
            corr.predict(test.images[is_rare]), test.labels[is_rare])}
    summary["total_seconds"] = time.perf_counter() - t0
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    return summary
