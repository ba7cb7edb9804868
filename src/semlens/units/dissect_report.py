"""Report sections for a dissection: per-layer bar charts of unique detectors and unit cards."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semlens.layers import frozen
from semlens.report import Section
from semlens.streaming import forward_until
from semlens.units.dissect import DissectionResult

__all__ = ["unique_detector_figure", "unit_cards_figure", "dissection_sections", "best_units", "activation_region",
           "concept_mask"]

CATEGORY_COLORS = {"color": "#d62728", "object": "#1f77b4", "part": "#2ca02c", "material": "#8c564b",
                   "texture": "#9467bd", "scene": "#ff7f0e"}


def unique_detector_figure(result: DissectionResult, title: str = "") -> Any:
    """Bar chart: one group of bars per layer, one bar per category (unique detectors)."""
    from semlens.report import subplots

    layers = list(result.layers)
    cats = result.categories
    fig, ax = subplots(figsize=(max(4.0, 1.3 * len(layers) + 1), 3.0))
    width = 0.8 / max(1, len(cats))
    for j, cat in enumerate(cats):
        vals = [result.unique_detectors(name)[cat] for name in layers]
        ax.bar([i + (j - (len(cats) - 1) / 2) * width for i in range(len(layers))], vals, width,
               label=cat, color=CATEGORY_COLORS.get(cat))
    ax.set_xticks(range(len(layers)), layers)
    ax.set_ylabel("unique detectors")
    ax.set_title(title or f"unique detectors per layer (IoU > {result.iou_threshold:g})")
    ax.legend(fontsize=7, ncol=min(len(cats), 6))
    return fig


def best_units(result: DissectionResult, count: int = 6) -> list[tuple[str, int]]:
    """The ``count`` (layer, unit) pairs with the highest best-IoU, at most two per layer first."""
    ranked = sorted(((float(d.best_iou[u]), name, u) for name, d in result.layers.items() for u in range(d.units)),
                    reverse=True)
    chosen: list[tuple[str, int]] = []
    per_layer: dict[str, int] = {}
    for _, name, u in ranked:
        if per_layer.get(name, 0) < 2:
            chosen.append((name, u))
            per_layer[name] = per_layer.get(name, 0) + 1
        if len(chosen) == count:
            break
    for _, name, u in ranked:
        if len(chosen) >= count:
            break
        if (name, u) not in chosen:
            chosen.append((name, u))
    return chosen


def activation_region(model: nn.Module, x: torch.Tensor, layer: str, unit: int, threshold: float,
                      seg: tuple[int, int], transform: Callable[[torch.Tensor], torch.Tensor] | None = None
                      ) -> torch.Tensor:
    """(B, sh, sw) bool on the CPU: where ``unit`` of ``layer`` exceeds ``threshold`` on images ``x`` (B, 3, H, W)
    as dissection binarises it (the map upsampled bilinearly, ``align_corners=False``, to the mask size ``seg``)."""
    with frozen(model), torch.no_grad():
        act = forward_until(model, transform(x) if transform else x, [layer])[layer][:, unit:unit + 1].float()
        return (F.interpolate(act, size=seg, mode="bilinear", align_corners=False) > threshold)[:, 0].cpu()


def concept_mask(batch: Any, number: int, seg: tuple[int, int]) -> torch.Tensor:
    """(B, sh, sw) bool: pixels carrying concept ``number`` (whole image for image-level labels)."""
    b = batch.images.shape[0]
    out = torch.zeros(b, *seg, dtype=torch.bool)
    for t in (batch.pixel or {}).values():
        if t.numel():
            out |= (t.cpu() == number).any(1)
    for t in (batch.image_level or {}).values():
        if t.numel():
            out |= (t.cpu() == number).any(1).view(b, 1, 1)
    return out


def _mask_colour(concept: str, category: str) -> tuple[torch.Tensor, str]:
    """The tint of a concept's mask: a colour concept in its own colour (when light enough to see on the
    darkened image), every other concept in red. Returns ``(rgb (3,), name)``."""
    from semlens.world.concepts import COLORS

    rgb = COLORS.get(concept) if category == "color" else None
    if rgb is not None and 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] > 0.25:
        return torch.tensor(rgb), concept
    return torch.tensor([1.0, 0.1, 0.1]), "red"


def unit_cards_figure(result: DissectionResult, model: nn.Module, dataset: Any, units: Sequence[tuple[str, int]],
                      *, images: int = 4, transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      ) -> Any:
    """Unit cards: per unit, its top-activating images with the thresholded region (row 1) and the
    best concept's mask (row 2), titled with layer, unit, concept and IoU."""
    from semlens.report import subplots

    fig, axes = subplots(2 * len(units), images, figsize=(1.5 * images + 0.9, 3.1 * len(units)), squeeze=False)
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with frozen(model), torch.no_grad():
        for r, (name, u) in enumerate(units):
            d = result.layers[name]
            idx = [i for i in d.top_images[u, :images].tolist() if i >= 0]
            batch = dataset.load_batch(idx)
            x = batch.images.to(device, torch.float32)
            size = tuple(batch.images.shape[-2:])
            region = activation_region(model, x, name, u, float(d.thresholds[u]), result.seg_size, transform)
            region = F.interpolate(region[:, None].float(), size=size, mode="nearest")[:, 0].cpu()
            c = int(d.best_concept[u])
            concept = F.interpolate(concept_mask(batch, result.concept_numbers[c], result.seg_size)[:, None].float(),
                                    size=size, mode="nearest")[:, 0]
            img = batch.images.cpu().permute(0, 2, 3, 1).clamp(0, 1)
            colour, colour_name = _mask_colour(result.concept_names[c], result.concept_categories[c])
            for j in range(images):
                top, bottom = axes[2 * r, j], axes[2 * r + 1, j]
                top.axis("off")
                bottom.axis("off")
                if j >= len(idx):
                    continue
                top.imshow((img[j] * (0.2 + 0.8 * region[j, :, :, None])).numpy())
                tint = img[j] * 0.35 + 0.65 * colour * concept[j, :, :, None]
                bottom.imshow(torch.where(concept[j, :, :, None] > 0, tint, img[j] * 0.35).numpy())
            axes[2 * r, 0].set_title(f"{name} unit {u}: {result.concept_names[c]} ({result.concept_categories[c]}) "
                                     f"IoU {float(d.best_iou[u]):.2f}", fontsize=8, loc="left")
            labels = ((2 * r, "unit's region\n(top images)"),
                      (2 * r + 1, f"'{result.concept_names[c]}' mask\n(in {colour_name})"))
            for row, label in labels:
                axes[row, 0].text(-0.06, 0.5, label, transform=axes[row, 0].transAxes, ha="right", va="center",
                                  fontsize=6)
    fig.tight_layout()
    return fig


def dissection_sections(result: DissectionResult, model: nn.Module | None = None, dataset: Any = None, *,
                        title: str = "Network Dissection", cards: int = 6, images: int = 4,
                        transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> list[Section]:
    """A section with the per-layer table and bar chart, plus unit cards when ``model`` and ``dataset`` are given."""
    sec = Section(title)
    sec.text(f"{result.n_images} images, quantile {result.quantile:g}, IoU threshold {result.iou_threshold:g}, "
             f"masks at {result.seg_size[0]}x{result.seg_size[1]}. A unit is labelled with its best concept over "
             f"all categories; unique detectors are the distinct concepts among units with IoU above the threshold. "
             f"Total unique detectors over layers: {result.total_unique_detectors()}.")
    sec.table(result.layer_rows(), caption="unique detectors per layer and category")
    sec.figure(unique_detector_figure(result), caption="unique detectors per layer and category")
    out = [sec]
    if model is not None and dataset is not None and cards > 0:
        chosen = best_units(result, cards)
        cs = Section(f"{title}: unit cards")
        cs.text("For each unit: its top-activating images with the region above the unit's threshold (others "
                "darkened), and below them the mask of the unit's best concept (a colour concept in its own colour, "
                "others in red, as the row label says).")
        cs.figure(unit_cards_figure(result, model, dataset, chosen, images=images, transform=transform),
                  caption="unit cards (highest IoU first)")
        out.append(cs)
    return out
