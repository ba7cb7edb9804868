"""End-to-end jobs behind ``semlens embed fit`` and ``semlens embed explain``."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semlens.embed.activations import collect_activations
from semlens.embed.base import Embedding
from semlens.embed.heatmaps import HEATMAP_METHOD
from semlens.embed.io import METHODS, check_compatible, load_embedding, save_embedding
from semlens.layers import capture_activations, get_module

__all__ = ["make_embedding", "fit_embedding_job", "explain_job", "parse_target", "class_evidence"]


def parse_target(target: str) -> int | list[int] | str:
    """``"all"``, ``"3"`` or ``"1,4"`` → ``"all"``, ``3`` or ``[1, 4]``."""
    t = target.strip()
    if t == "all":
        return "all"
    try:
        vals = [int(v) for v in t.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"--target must be a class index, a comma-separated list or 'all', got {target!r}") from err
    return vals[0] if len(vals) == 1 else vals


def make_embedding(method: str, k: int, target: int | list[int] | str, seed: int = 0, epochs: int = 20,
                   mode: str = "one-vs-all", init: str = "pretrain") -> Embedding:
    """A fresh embedding of the named method (``srae``, ``srae-joint``, ``srae-ica``, ``topk``, ``nmf``, ``pca``);
    ``init`` is the SRAE's start (``"pretrain"`` or ``"ica"``; ``srae-ica`` is ``srae`` with ``init="ica"``)."""
    from semlens.embed.baselines import NMFEmbedding, PCAEmbedding, TopKSAE
    from semlens.embed.srae import SRAE

    if method in ("srae", "srae-ica"):
        return SRAE(k=k, target=target, mode=mode, epochs=epochs, seed=seed,
                    init="ica" if method == "srae-ica" else init)
    if method == "srae-joint":
        return SRAE(k=k, target=target, mode="joint", epochs=epochs, seed=seed, init=init)
    if method == "topk":
        return TopKSAE(k=k, target=target, epochs=epochs, seed=seed)
    if method == "nmf":
        return NMFEmbedding(k=k, target=target, seed=seed)
    if method == "pca":
        return PCAEmbedding(k=k, target=target, seed=seed)
    raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")


def class_evidence(class_names: Sequence[str], concept_names: Sequence[str]) -> dict[int, list[int]]:
    """Evidence concepts per class from its name: every word naming a concept (``"red circle"`` → red, circle)."""
    index = {n: i for i, n in enumerate(concept_names) if n and n != "-"}
    return {c: [index[w] for w in name.split() if w in index] for c, name in enumerate(class_names)}


def _splits(ds: Any, holdout: float) -> tuple[list[int], list[int]]:
    names = set(ds.splits)
    fit = ds.split_indices("train") if "train" in names else list(range(len(ds)))
    for s in ("test", "val"):
        if s in names:
            return fit, ds.split_indices(s)
    cut = max(1, int(round(len(fit) * (1 - holdout))))
    if cut >= len(fit):
        raise ValueError(f"dataset too small to hold out {holdout:.0%} of {len(fit)} images for evaluation")
    return fit[:cut], fit[cut:]


def fit_embedding_job(model: nn.Module, model_name: str, layer: str, data: Path, out: Path, *, target: str = "all",
                      k: int = 5, method: str = "srae", mode: str = "one-vs-all", epochs: int = 20, seed: int = 0,
                      batch_size: int = 128, holdout: float = 0.2, per_class: int = 8,
                      device: str = "cpu", init: str = "pretrain") -> dict[str, Any]:
    """Fit an embedding on ``data``'s training images and evaluate it on its held-out images.

    Writes ``out/embedding.safetensors`` + ``out/embedding.json``, ``out/metrics.json`` and ``out/xfeatures.csv``
    (``class, xfeature, mean_contribution, concept, mass_accuracy``). Returns the metrics.
    """
    from torch.utils.data import TensorDataset

    from semlens.embed.evaluate import concept_recovery, evaluate_embedding
    from semlens.world import BrodenDataset

    get_module(model, layer)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    ds = BrodenDataset(data)
    if ds.task_labels is None:
        raise ValueError(f"{data} has no task.csv: not a concept-world dataset with class labels")
    fit_idx, test_idx = _splits(ds, holdout)
    x_fit, y_fit = _load(ds, fit_idx)
    from semlens.embed.srae import INITS

    if init not in INITS:
        raise ValueError(f"unknown SRAE init {init!r}; use one of {', '.join(INITS)}")
    emb = make_embedding(method, k, parse_target(target), seed, epochs, mode, init)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".activations"
    try:
        store = collect_activations(model, layer, TensorDataset(x_fit, y_fit), batch_size=batch_size, path=tmp,
                                    device=device, model_name=model_name)
        emb._resolve_classes(store.n_classes)  # clear error for a class out of range before fitting
        emb.fit(store)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    x_te, y_te = _load(ds, test_idx)
    metrics = evaluate_embedding(model, layer, emb, TensorDataset(x_te, y_te), batch_size=batch_size, device=device)
    batch = ds.load_batch(test_idx)
    pixel = {f"{cat}{j}": batch.pixel[cat][:, j] for cat in batch.pixel for j in range(batch.pixel[cat].shape[1])}
    names = _concept_names(ds)
    rec = concept_recovery(model, layer, emb, x_te.to(device), y_te, pixel,
                           class_evidence(ds.class_names or [], names), len(names), per_class=per_class)
    metrics.update({k2: rec[k2] for k2 in ("mass_accuracy", "recovery", "distinctness")})
    metrics["recovery_per_class"] = {
        str(c): {"recovered": v["recovered"], "evidence": [names[e] for e in v["evidence"]]}
        for c, v in rec["per_class"].items()}
    history = getattr(emb, "history_", [])
    save_embedding(emb, out, model=model_name, extra={"history": history, "data": str(data)})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    with open(out / "xfeatures.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "xfeature", "mean_contribution", "concept", "mass_accuracy"])
        for r in rec["rows"]:
            w.writerow([r["class"], r["xfeature"], f"{r['mean_contribution']:.6g}", names[r["concept"]],
                        f"{r['mass_accuracy']:.4f}"])
    return metrics


def _concept_names(ds: Any) -> list[str]:
    top = max((int(n) for n, _, _ in ds.labels), default=0)
    names = ["-"] * (top + 1)
    for n, name, _ in ds.labels:
        names[int(n)] = name
    return names


def _load(ds: Any, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.cat([b.images for _, b in ds.iter_batches(256, idx, categories=[])])
    return images, ds.task_labels[idx]


def explain_job(model: nn.Module, model_name: str, embedding: Path, inputs: Sequence[Path], out: Path, *,
                target: int | None = None, method: str = HEATMAP_METHOD, device: str = "cpu"
                ) -> list[dict[str, Any]]:
    """For each input image write ``out/<stem>.png`` (the decision as a sum of x-feature contributions, one heatmap
    each) and ``out/<stem>.json`` (class, logit, rebuilt logit, bias, contributions). The explained class is
    ``target`` or the model's prediction (which must be a class the embedding explains)."""
    from semlens.embed.activations import pool_activation
    from semlens.embed.heatmaps import xfeature_heatmaps
    from semlens.explain.files import load_input
    from semlens.outputs import distinct_stems

    emb = load_embedding(embedding, model=model_name)
    layer = emb.layer_
    get_module(model, layer)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for path, stem in zip(inputs, distinct_stems(inputs), strict=True):  # same-name inputs: distinct outputs
        x, _ = load_input(Path(path))
        x = x[:1].to(device)
        with capture_activations(model, layer) as cap, torch.no_grad():
            logits = model(x)
        z = pool_activation(cap[layer]).cpu()
        check_compatible(emb, z.shape[1])
        c = int(logits.argmax(1)) if target is None else target
        if not 0 <= c < logits.shape[1]:
            raise ValueError(f"class index {c} out of range for a model with {logits.shape[1]} outputs")
        emb.class_position(c)
        heat, contrib = xfeature_heatmaps(model, layer, emb, x, c, method=method)
        g, o = emb.group_of(c)
        bias = float(emb.head_weights()[1][g, o])
        info = {"input": str(path), "class": c, "logit": float(logits[0, c]), "bias": bias,
                "rebuilt_logit": float(contrib[0].sum()) + bias, "contributions": contrib[0].tolist(),
                "embedding": str(embedding), "layer": layer, "method": emb.method, "heatmap_rule": method}
        (out / f"{stem}.json").write_text(json.dumps(info, indent=1))
        _figure(x[0].cpu(), heat[0].cpu(), info, out / f"{stem}.png")
        results.append(info)
    return results


def _figure(image: torch.Tensor, heat: torch.Tensor, info: dict[str, Any], path: Path) -> None:
    from semlens.explain import heatmap_rgb
    from semlens.report import subplots

    k = heat.shape[0]
    fig, axes = subplots(1, k + 1, figsize=(2.0 * (k + 1), 2.4))
    axes[0].imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
    axes[0].set_title(f"class {info['class']}: {info['rebuilt_logit']:.2f}\n= b {info['bias']:.2f} + Σ", fontsize=8)
    for i in range(k):
        axes[i + 1].imshow(heatmap_rgb(heat[i], image))
        axes[i + 1].set_title(f"x{i}: w·x = {info['contributions'][i]:+.2f}", fontsize=8)
    for a in axes:
        a.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
