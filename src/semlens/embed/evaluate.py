"""Evaluating an embedding on held-out images: faithfulness, reconstruction, sparsity, orthogonality, compactness
(streamed over the whole split), and heatmap distinctness and concept recovery against pixel masks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from semlens.embed.activations import as_loader, check_finite, pool_activation
from semlens.embed.base import Embedding
from semlens.embed.heatmaps import HEATMAP_METHOD, XFeatureExplainer, concept_mass, distinctness, positive_map
from semlens.embed.metrics import FVE, R2, ContributionStats, Firing
from semlens.layers import capture_activations, frozen, patch_activations

__all__ = ["evaluate_embedding", "concept_recovery", "world_evidence_concepts"]


def _replacement(emb: Embedding, g: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Layer output → the same output with its (pooled) content replaced by group ``g``'s reconstruction.

    Linear layers: ``ẑ`` itself. Conv maps: every position shifted by ``ẑ − pool(z)`` per channel, so the pooled map
    equals the reconstruction (the spatial pattern around the mean is kept: pooled embeddings cannot rebuild it).
    """

    def fn(out: torch.Tensor) -> torch.Tensor:
        z = pool_activation(out)
        z_hat = emb.reconstruct(z.detach().cpu())[:, g].to(out)
        if out.ndim == 2:
            return z_hat
        return out + (z_hat - z).view(*z.shape, *([1] * (out.ndim - 2)))

    return fn


def evaluate_embedding(model: nn.Module, layer: str, emb: Embedding, data: Dataset | DataLoader | torch.Tensor, *,
                       batch_size: int = 128, device: str | torch.device = "cpu",
                       replaced_accuracy: bool = True) -> dict[str, Any]:
    """Streamed metrics of ``emb`` on a held-out split of ``(image, label)`` pairs.

    Returns a dict: ``r2`` (mean over explained classes of the R² of their logits), ``r2_per_class``, ``agreement``
    (argmax of the rebuilt logits = argmax of the model's, over the explained classes; NaN for one class),
    ``fve`` (mean over groups), ``l0``, ``dead``, ``orthogonality``, ``compactness`` (means over classes),
    ``model_accuracy``, ``replaced_accuracy`` (mean over groups), ``mean_contribution`` ``[C_e][k]``.
    """
    loader = as_loader(data, batch_size)
    r2, fire, stats = R2(), Firing(), ContributionStats()
    fves = [FVE() for _ in range(emb.n_groups)]
    agree = correct = total = 0
    replaced = torch.zeros(emb.n_groups, dtype=torch.float64)
    cls = emb.classes_
    with frozen(model), torch.no_grad():
        for batch in loader:
            x, y = (batch[0], batch[1]) if isinstance(batch, (tuple, list)) else (batch, None)
            x = x.to(device)
            with capture_activations(model, layer) as cap:
                logits = model(x)
            z = pool_activation(cap[layer]).cpu()
            check_finite(z, f"activations of layer {layer!r}")
            logits = logits.cpu()
            pred, z_hat = emb.predict(z), emb.reconstruct(z)
            r2.update(pred, logits[:, cls])
            for g, f in enumerate(fves):
                f.update(z, z_hat[:, g])
            fire.update(emb.encode(z))
            stats.update(emb.contributions(z))
            if len(cls) > 1:
                agree += int((pred.argmax(1) == logits[:, cls].argmax(1)).sum())
            if y is not None:
                correct += int((logits.argmax(1) == y).sum())
                if replaced_accuracy:
                    for g in range(emb.n_groups):
                        with patch_activations(model, {layer: _replacement(emb, g)}):
                            replaced[g] += int((model(x).argmax(1).cpu() == y).sum())
            total += x.shape[0]
    r2v, st, fv = r2.value(), stats.value(), fire.value()
    return {
        "r2": float(r2v.mean()), "r2_per_class": r2v.tolist(),
        "agreement": agree / total if len(cls) > 1 else float("nan"),
        "fve": sum(f.value() for f in fves) / len(fves), "l0": fv["l0"], "dead": fv["dead"],
        "orthogonality": float(st["orthogonality"].mean()), "compactness": float(st["compactness"].mean()),
        "model_accuracy": correct / total,
        "replaced_accuracy": float(replaced.mean()) / total if replaced_accuracy else float("nan"),
        "mean_contribution": st["mean_contribution"].tolist(), "n": total,
    }


def world_evidence_concepts() -> dict[int, list[int]]:
    """Concept-world classes → the global numbers of the concepts that define them (key object's shape, colour)."""
    from semlens.world.concepts import CLASSES, VOCABULARY

    return {c: [VOCABULARY.number("object", o), VOCABULARY.number("color", col)] for c, (o, col) in enumerate(CLASSES)}


def concept_recovery(model: nn.Module, layer: str, emb: Embedding, images: torch.Tensor, labels: torch.Tensor,
                     pixel_labels: dict[str, torch.Tensor], evidence: dict[int, Sequence[int]], n_concepts: int, *,
                     per_class: int = 8, method: str = HEATMAP_METHOD, min_mass: float = 0.6,
                     batch_size: int = 16, **params: Any) -> dict[str, Any]:
    """Which concept each x-feature's heatmap falls on, against pixel masks, for every explained class.

    For class ``c`` the first ``per_class`` images labelled ``c`` are explained; per x-feature the mass share of each
    concept mask is averaged over them; its concept is the argmax and its *mass accuracy* that share. The x-features
    and the class's evidence concepts are matched by the Hungarian algorithm on the mass shares (rectangular: works
    for ``k ≠`` number of concepts); an evidence concept is *recovered* when its match has mass ≥ ``min_mass``.
    ``distinctness``: mean pairwise IoU of the top-10 % masks (lower: more distinct maps).
    """
    from scipy.optimize import linear_sum_assignment

    rows: list[dict[str, Any]] = []
    per: dict[int, dict[str, Any]] = {}
    iou_sum, iou_pairs = 0.0, 0
    for c in emb.classes_:
        idx = (labels == c).nonzero().flatten()[:per_class]
        if len(idx) == 0:
            continue
        mass = torch.zeros(emb.k, n_concepts, dtype=torch.float64)
        contrib = torch.zeros(emb.k, dtype=torch.float64)
        with XFeatureExplainer(model, layer, emb, c, method, **params) as xf:  # model prepared once per class
            for part in idx.split(batch_size):  # streamed: one batch of maps at a time
                heat, con = xf(images[part])
                pos = positive_map(heat.cpu())
                size = next(iter(pixel_labels.values())).shape[-2:]
                if pos.shape[-2:] != size:  # segmentation at another resolution: pool the maps onto it
                    pos = torch.nn.functional.interpolate(pos, size=tuple(size), mode="area")
                s, p = distinctness(pos)
                iou_sum, iou_pairs = iou_sum + s, iou_pairs + p
                mass += concept_mass(pos, {k: v[part] for k, v in pixel_labels.items()}, n_concepts).double().sum(0)
                contrib += con.cpu().double().sum(0)
        mass /= len(idx)
        contrib /= len(idx)
        best = mass.max(1)
        ev = list(evidence.get(c, []))
        matched, recovered = {}, 0
        if ev:
            r, col = linear_sum_assignment(-mass[:, ev].numpy())
            for i, j in zip(r.tolist(), col.tolist(), strict=True):
                matched[ev[j]] = (i, float(mass[i, ev[j]]))
                recovered += int(mass[i, ev[j]] >= min_mass)
        per[c] = {"recovered": recovered, "evidence": ev, "matched": matched}
        for i in range(emb.k):
            rows.append({"class": c, "xfeature": i, "mean_contribution": float(contrib[i]),
                         "concept": int(best.indices[i]), "mass_accuracy": float(best.values[i])})
    n_ev = sum(len(v["evidence"]) for v in per.values())
    return {
        "rows": rows, "per_class": per,
        "recovery": sum(v["recovered"] for v in per.values()) / n_ev if n_ev else float("nan"),
        "mass_accuracy": sum(r["mass_accuracy"] for r in rows) / len(rows) if rows else float("nan"),
        "distinctness": iou_sum / iou_pairs if iou_pairs else float("nan"),
    }


