"""``semlens reproduce xnn``: SRAE vs TopK SAE vs NMF vs PCA on the built-in concept images.

An ``alexnet-like`` is trained as in the demo (concept images, Adam, cosine schedule); on its last conv layer
(``features.relu5``, average-pooled) and its penultimate linear layer (``classifier.relu7``) every method fits
``k`` x-features for all 12 classes (SRAE: one-vs-all, one SRAE per class with the acceptance loop;
``srae-joint``: one SRAE with a 12-output head; baselines: one shared embedding with a least-squares head), for
several seeds. Each is evaluated on held-out images: R² of the logits, decision agreement, accuracy with the layer
replaced by the reconstruction, FVE, L0, dead x-features, orthogonality, compactness, and — with the default x-feature
heatmaps (``HEATMAP_METHOD``, ε-γ-box) and with Excitation Backprop (the paper's; columns ``*_eb``) against the
world's pixel masks — mass accuracy, recovery of each class's evidence concepts (key object's
shape and colour) and heatmap distinctness. Finished runs are stored in ``OUT/runs/*.json`` and skipped when the
command runs again.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["XNNConfig", "run_xnn", "summarise", "markdown_table"]

METRICS = ("r2", "agreement", "replaced_accuracy", "fve", "l0", "dead", "orthogonality", "compactness",
           "mass_accuracy", "recovery", "distinctness", "mass_accuracy_eb", "recovery_eb", "distinctness_eb",
           "accepted", "fit_seconds")
TABLE = METRICS + ("stability",)


@dataclass
class XNNConfig:
    """Experiment settings (defaults: the full run; :meth:`fast` for a smoke run)."""

    out: str = "xnn-out"
    seeds: tuple[int, ...] = (0, 1, 2)
    layers: tuple[str, ...] = ("features.relu5", "classifier.relu7")
    methods: tuple[str, ...] = ("srae", "srae-ica", "srae-joint", "topk", "nmf", "pca")
    k: int = 5
    n_train_cnn: int = 12000
    cnn_epochs: int = 3
    n_fit: int = 2000
    n_test: int = 600
    srae_epochs: int = 10
    per_class: int = 8
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def fast(cls, out: str) -> XNNConfig:
        return cls(out=out, seeds=(0,), n_train_cnn=2000, cnn_epochs=1, n_fit=600, n_test=120, srae_epochs=2,
                   per_class=2)


def _classifier(cfg: XNNConfig, root: Path):
    from semlens.checkpoint import load_weights
    from semlens.models import build_model
    from semlens.train import TrainConfig, Trainer
    from semlens.world import generate_concepts

    kwargs = {"num_classes": 12, "image_size": 64}
    torch.manual_seed(0)
    model = build_model("alexnet-like", **kwargs)
    path = root / "classifier.safetensors"
    if path.is_file():
        load_weights(model, path)
        return model.eval(), json.loads((root / "classifier.json").read_text())
    train = generate_concepts(n=cfg.n_train_cnn, size=64, seed=1, masks=False)
    tcfg = TrainConfig(epochs=cfg.cnn_epochs, batch_size=64, lr=2e-3, optimizer="adam", weight_decay=0.0,
                       lr_schedule="cosine", seed=0, device=cfg.device)
    trainer = Trainer(model, train.dataset(), None, tcfg,
                      model_config={"model": "alexnet-like", "model_kwargs": kwargs, "class_names": train.class_names})
    t0 = time.perf_counter()
    trainer.fit()
    info = {"train_seconds": time.perf_counter() - t0}
    trainer.save(path)
    (root / "classifier.json").write_text(json.dumps(info))
    return model.eval(), info


def _one_run(cfg: XNNConfig, model, layer: str, method: str, seed: int, store, test) -> dict[str, Any]:
    from torch.utils.data import TensorDataset

    from semlens.embed.evaluate import concept_recovery, evaluate_embedding, world_evidence_concepts
    from semlens.embed.pipeline import make_embedding
    from semlens.world import VOCABULARY

    t0 = time.perf_counter()
    emb = make_embedding(method, cfg.k, "all", seed, cfg.srae_epochs).fit(store)
    fit_s = time.perf_counter() - t0
    m = evaluate_embedding(model, layer, emb, TensorDataset(test.images, test.labels), batch_size=200)
    rec = concept_recovery(model, layer, emb, test.images, test.labels, test.pixel_labels, world_evidence_concepts(),
                           len(VOCABULARY), per_class=cfg.per_class)  # the default maps (HEATMAP_METHOD)
    eb = concept_recovery(model, layer, emb, test.images, test.labels, test.pixel_labels, world_evidence_concepts(),
                          len(VOCABULARY), per_class=cfg.per_class, method="excitation-backprop")  # the paper's
    accepted = float(emb.accepted_.float().mean()) if hasattr(emb, "accepted_") else float("nan")
    rounds = emb.rounds_.tolist() if hasattr(emb, "rounds_") else []
    return {**{k: v for k, v in m.items() if k != "mean_contribution"}, "mass_accuracy": rec["mass_accuracy"],
            "recovery": rec["recovery"], "distinctness": rec["distinctness"], "mass_accuracy_eb": eb["mass_accuracy"],
            "recovery_eb": eb["recovery"], "distinctness_eb": eb["distinctness"], "accepted": accepted,
            "rounds": rounds, "fit_seconds": fit_s, "rows": rec["rows"], "layer": layer, "method": method, "seed": seed}


def run_xnn(cfg: XNNConfig) -> dict[str, Any]:
    """Run (or resume) the experiment; returns ``{"runs": [...], "summary": {...}, "classifier": {...}}``."""
    from torch.utils.data import TensorDataset

    from semlens.embed import collect_activations
    from semlens.runtime import seed_everything
    from semlens.world import generate_concepts

    root = Path(cfg.out)
    (root / "runs").mkdir(parents=True, exist_ok=True)
    model, info = _classifier(cfg, root)
    fit_images = generate_concepts(n=cfg.n_fit, size=64, seed=11, masks=False)
    test = generate_concepts(n=cfg.n_test, size=64, seed=12)
    with torch.no_grad():
        info["test_accuracy"] = float((model(test.images).argmax(1) == test.labels).float().mean())
    runs = []
    for layer in cfg.layers:
        store = collect_activations(model, layer, TensorDataset(fit_images.images, fit_images.labels),
                                    batch_size=250, path=root / "activations" / layer, model_name="alexnet-like")
        for method in cfg.methods:
            for seed in cfg.seeds:
                path = root / "runs" / f"{layer}-{method}-{seed}.json"
                if path.is_file():
                    runs.append(json.loads(path.read_text()))
                    continue
                seed_everything(seed)
                run = _one_run(cfg, model, layer, method, seed, store, test)
                path.write_text(json.dumps(run))
                runs.append(run)
                print(f"{layer} {method} seed {seed}: r2 {run['r2']:.3f} recovery {run['recovery']:.2f} "
                      f"({run['fit_seconds']:.0f}s)", flush=True)
    result = {"config": asdict(cfg), "classifier": info, "runs": runs, "summary": summarise(runs)}
    (root / "results.json").write_text(json.dumps(result, indent=1))
    (root / "table.md").write_text(markdown_table(result["summary"]))
    return result


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """``layer → method → metric → [mean, std, n]`` over seeds."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for r in runs:
        out.setdefault(r["layer"], {}).setdefault(r["method"], {})
    for layer, methods in out.items():
        for method in methods:
            sel = [r for r in runs if r["layer"] == layer and r["method"] == method]
            for key in METRICS:
                vals = [float(r[key]) for r in sel if r.get(key) is not None and r[key] == r[key]]
                if vals:
                    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                    methods[method][key] = [statistics.fmean(vals), sd, len(vals)]
            methods[method]["stability"] = [concept_stability(sel), 0.0, len(sel)]
    return out


def concept_stability(runs: list[dict[str, Any]]) -> float:
    """Mean over classes and seed pairs of the Jaccard index between the sets of concepts the x-features of a class
    fall on (each x-feature's best concept with mass ≥ 0.6) in two seeds; 1 = the same concepts every seed."""
    sets = []
    for r in runs:
        per: dict[int, set[int]] = {}
        for row in r["rows"]:
            if row["mass_accuracy"] >= 0.6:
                per.setdefault(row["class"], set()).add(row["concept"])
        sets.append(per)
    scores = []
    for i in range(len(sets)):
        for j in range(i + 1, len(sets)):
            for c in set(sets[i]) | set(sets[j]):
                a, b = sets[i].get(c, set()), sets[j].get(c, set())
                scores.append(len(a & b) / len(a | b))
    return statistics.fmean(scores) if scores else float("nan")


def markdown_table(summary: dict[str, Any]) -> str:
    lines = []
    for layer, methods in summary.items():
        lines += [f"\n**{layer}**\n", "| method | " + " | ".join(TABLE) + " |",
                  "|---|" + "---|" * len(TABLE)]
        for method, vals in methods.items():
            cells = [(f"{vals[k][0]:.3f}" if k == "stability" else f"{vals[k][0]:.3f} ± {vals[k][1]:.3f}")
                     if k in vals else "—" for k in TABLE]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
