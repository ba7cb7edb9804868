"""Demo step: explain the world step's classifier on held-out concept images (heatmap grid + conservation table)."""

from __future__ import annotations

import time
from typing import Any

import torch

from semlens.report import Section

METHODS = ["gradient", "gradient-x-input", "epsilon-plus-flat", "epsilon-gamma-box", "epsilon-alpha2-beta1"]
N_IMAGES = 4


def explain_batch(model: torch.nn.Module, images: torch.Tensor, evidence: torch.Tensor | None,
                  methods: list[str] = METHODS) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]], torch.Tensor]:
    """Relevance maps of ``model``'s predicted class for each method, and one summary row per method.

    images: ``(N, 3, H, W)`` in [0, 1]; evidence: optional ``(N, H, W)`` bool mask of label-determining pixels.
    Row fields: ``sum R / logit`` (conservation: 1 for exact LRP-0/z^B, slightly below with ε leakage and
    stabilizers), the share of positive relevance on evidence pixels, and the time per image.
    """
    from semlens.explain import UnsupportedModelError, attribute

    device = next(model.parameters()).device
    x = images.to(device)
    with torch.no_grad():
        logits = model(x)
    pred = logits.argmax(1)
    logit = logits.gather(1, pred[:, None])[:, 0]
    maps: dict[str, torch.Tensor] = {}
    rows: list[dict[str, Any]] = []
    for method in methods:
        t0 = time.perf_counter()
        try:
            rel = attribute(model, x, pred, method)
        except UnsupportedModelError as err:
            rows.append({"method": method, "note": f"refused: {err.culprits[:3]}"})
            continue
        seconds = (time.perf_counter() - t0) / len(x)
        maps[method] = rel.sum(1).cpu()
        row: dict[str, Any] = {"method": method}
        if method in ("gradient", "sensitivity"):
            row["sum R / logit"] = "n/a (not a decomposition)"
        else:
            ratio = rel.flatten(1).sum(1) / logit
            row["sum R / logit"] = f"{float(ratio.mean()):.4f} (min {float(ratio.min()):.4f})"
        if evidence is not None:
            pos = maps[method].clamp(min=0)
            inside = (pos * evidence.to(pos.dtype)).flatten(1).sum(1) / pos.flatten(1).sum(1).clamp(min=1e-12)
            row["positive relevance on evidence"] = float(inside.mean())
            row["evidence area"] = float(evidence.float().mean())
        row["ms / image"] = round(seconds * 1e3, 1)
        rows.append(row)
    return maps, rows, pred.cpu()


def _figure(images: torch.Tensor, maps: dict[str, torch.Tensor], titles: list[str]):
    from semlens.explain import heatmap_rgb
    from semlens.report import subplots

    n, cols = images.shape[0], 1 + len(maps)
    fig, axes = subplots(n, cols, figsize=(1.7 * cols, 1.7 * n), squeeze=False)
    for i in range(n):
        axes[i, 0].imshow(images[i].permute(1, 2, 0).clamp(0, 1).numpy())
        axes[i, 0].set_ylabel(titles[i], fontsize=7)
        for j, (method, m) in enumerate(maps.items(), start=1):
            axes[i, j].imshow(heatmap_rgb(m[i]))
            if i == 0:
                axes[i, j].set_title(method, fontsize=7)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("input", fontsize=7)
    fig.tight_layout()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    bar = fig.colorbar(ScalarMappable(Normalize(-1, 1), cmap="bwr"), ax=axes[:, 1:].ravel().tolist(), shrink=0.5,
                       pad=0.02, ticks=[-1, 0, 1])
    bar.ax.set_yticklabels(["−max", "0", "+max"], fontsize=6)
    bar.set_label("relevance (each map scaled to its 99.5th percentile of |R|)", fontsize=6)
    return fig


def run(ctx) -> list[Section]:
    """Uses ``ctx.artifacts["classifier"]`` and ``ctx.artifacts["concepts_test"]`` (from the world step)."""
    section = Section("Explaining single predictions (sensitivity analysis and LRP)")
    missing = [k for k in ("classifier", "concepts_test") if k not in ctx.artifacts]
    if missing:
        section.text(f"Skipped: the world step did not provide {', '.join(missing)}.")
        return [section]
    model = ctx.artifacts["classifier"]
    ci = ctx.artifacts["concepts_test"]
    images = torch.as_tensor(ci.images[:N_IMAGES]).float()
    evidence = getattr(ci, "evidence", None)
    evidence = None if evidence is None else torch.as_tensor(evidence[:N_IMAGES]).bool()
    maps, rows, pred = explain_batch(model, images, evidence)
    names = list(getattr(ci, "class_names", []))
    labels = torch.as_tensor(ci.labels[:N_IMAGES]).tolist()

    def name(k: int) -> str:
        return names[k] if 0 <= k < len(names) else str(k)

    titles = [f"true {name(t)}\npred {name(p)}" for t, p in zip(labels, pred.tolist(), strict=True)]
    section.text(
        "Heatmaps of the classifier's predicted class on held-out concept images: red = evidence for the class, "
        "blue = against (channel sum, colour scale clipped at the 99.5th percentile of |R|). Gradient and "
        "gradient×input are noisy; the LRP composites (Zennit presets: flat or z^B at the input, z+/γ/αβ on "
        "convolutions, ε on dense layers) concentrate relevance on the object."
    )
    if maps:
        section.figure(_figure(images, maps, titles), caption="Rows: test images; columns: attribution methods.")
    section.table(rows, caption="Conservation: sum of input relevance divided by the explained logit (LRP "
                                "redistributes the logit; biases and stabilizers absorb a little). Positive "
                                "relevance on evidence: share of positive relevance that falls on the pixels that "
                                "determine the label (higher is better; compare with the evidence area).")
    return [section]
