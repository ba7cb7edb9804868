"""HTML report sections for activation maximization: the evaluation tables, unit cards (three
prototypes side by side, the top-9 natural images, the dissection label, the self-checks) and the
slide-(d) figure. Reads what ``semlens reproduce maximize`` wrote (results.json, prototypes.npz)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from semlens.report import Report, Section

__all__ = ["maximize_sections", "write_report", "CARD_CONFIGS"]

#: the prototypes shown side by side on a unit card
CARD_CONFIGS = ("plain/pixel", "expert-gaussian/pixel", "code/vae", "code/gan")


def _rgb(x: np.ndarray) -> np.ndarray:
    return np.clip(np.transpose(x, (1, 2, 0)), 0, 1)


def _cards_figure(results: dict[str, Any], arrays: dict[str, np.ndarray], cards: int):  # noqa: ANN202
    from matplotlib.figure import Figure  # no pyplot: no backend chosen, no global figure registry

    units = results["units"][:cards]
    cols = len(CARD_CONFIGS) + 3
    fig = Figure(figsize=(1.6 * cols, 1.8 * len(units)))
    grid = fig.add_gridspec(len(units), cols)
    for r, u in enumerate(units):
        for c, name in enumerate(CARD_CONFIGS):
            ax = fig.add_subplot(grid[r, c])
            key = name.replace("/", "_")
            if key in arrays:
                ax.imshow(_rgb(arrays[key][r]), interpolation="nearest")
                ratio = results["per_unit"][name]["ratio"][r]
                hit = results["per_unit"][name]["hit"][r]
                ax.set_title(f"{name.replace('/pixel', '')}\nratio {ratio:.2f}, hit {hit:.0f}", fontsize=6)
        top = arrays["top9"][r]  # (9, C, H, W) -> a 3 x 3 mosaic in the last three columns
        rows = [np.concatenate([_rgb(top[3 * i + j]) for j in range(3)], axis=1) for i in range(3)]
        ax = fig.add_subplot(grid[r, len(CARD_CONFIGS):])
        ax.imshow(np.concatenate(rows, axis=0), interpolation="nearest")
        ax.set_title(f"{u['layer']}:{u['unit']} = {u['concept']} ({u['category']}, IoU {u['iou']:.2f}); top-9",
                     fontsize=6)
    for a in fig.axes:
        a.axis("off")
    fig.tight_layout()
    return fig


def _shortcut_figure(shortcut: dict[str, Any], images: np.ndarray):  # noqa: ANN202
    """Row 1: the class-0 prototype of each variant (first seed); row 2: its pixels of the mark's colour."""
    from semlens.report import subplots

    rows = shortcut["rows"]
    seeds = images.shape[0] // len(rows)
    fig, axes = subplots(2, len(rows), figsize=(1.9 * len(rows), 4.2), squeeze=False)
    for i, row in enumerate(rows):
        img = _rgb(images[i * seeds])
        axes[0, i].imshow(img, interpolation="nearest")
        axes[0, i].set_title(f"{row['variant']}\nmagenta {100 * row['mark colour share']:.1f} %", fontsize=6)
        magenta = (img[..., 0] > 0.6) & (img[..., 2] > 0.6) & (img[..., 1] < 0.4)
        axes[1, i].imshow(magenta, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        for ax in axes[:, i]:
            ax.axis("off")
    fig.tight_layout()
    return fig


def maximize_sections(results: dict[str, Any], arrays: dict[str, np.ndarray], cards: int = 8) -> list[Section]:
    """Report sections from the evaluation's ``results`` and its ``prototypes.npz`` arrays."""
    table = Section("Activation maximization on the concept world")
    table.text(f"{len(results['units'])} units labelled by dissection with IoU ≥ {results['config']['min_iou']}, "
               "all maximised as one batch per configuration (objective: channel mean ÷ the unit's maximum over "
               "natural images). Hit rate: colour units ≥ 5 % of pixels of their colour; other units: a judge "
               f"classifier. Classifier test accuracy {results['test accuracy']:.3f}.")
    table.table(results["table"], caption="Per configuration, over the units: medians of activation ratio, held-out "
                                          "log-likelihood per dimension and path similarity; concept hit rate.")
    section = [table]
    if results.get("expert strengths"):
        sweep = Section("Expert strength: concept hit rate against naturalness")
        sweep.text("Each density expert at several strengths λ·D (pixel parameterisation, the main table's seeds): "
                   "a strong expert keeps prototypes likely under the held-out density, a weak one lets them reach "
                   "the unit's concept.")
        sweep.table(results["expert strengths"])
        section.append(sweep)
    if "top9" in arrays:
        cards_sec = Section("Unit cards")
        cards_sec.figure(_cards_figure(results, arrays, cards), "Per unit: plain, Gaussian-expert, VAE-code and "
                         "GAN-code prototypes (with activation ratio and concept hit), and the unit's top-9 natural "
                         "images.")
        section.append(cards_sec)
    sc = results["shortcut"]
    d = Section("Slide (d): a planted shortcut, revealed by plain AM and hidden by a strong expert")
    d.text("A magenta 6×6 corner mark decides class 0: every class-0 training image carries it, and so do 10 % of "
           "the other images, relabelled 0. Reliance: " + ", ".join(f"{k} {v:.3f}" for k, v in sc["reliance"].items())
           + f". The mark counts as visible in a prototype when its share of magenta pixels is ≥ "
           f"{sc['visible threshold']} (natural images' share plus half a mark's); hidden from: "
           f"{sc['mark hidden from']}.")
    d.table(sc["rows"])
    if "shortcut" in arrays:
        d.figure(_shortcut_figure(sc, arrays["shortcut"]), "Class-0 prototypes (first seed) and, below, "
                                                           "their magenta pixels.")
    section.append(d)
    return section


def write_report(out: str | os.PathLike) -> Path:
    """Write ``out/report.html`` from ``out/results.json`` and ``out/prototypes.npz``."""
    out = Path(out)
    results = json.loads((out / "results.json").read_text())
    with np.load(out / "prototypes.npz", allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files}
    report = Report(title="Activation maximization")
    for s in maximize_sections(results, arrays):
        report.add(s)
    return report.write(out / "report.html")
