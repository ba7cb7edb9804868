"""What Network Dissection returns: per-layer IoU tables and unit labels (:class:`LayerDissection`), the whole
result with its detectors, tables and files (:class:`DissectionResult`)."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from semlens.units.names import UnitNames, save_unit_names
from semlens.units.top_images import FILE_NAME as TOP_IMAGES_FILE
from semlens.units.top_images import TopImages, save_top_images


@dataclass
class LayerDissection:
    """Dissection of one layer with C units over L concepts.

    thresholds: (C,) float32; intersection: (C, L) int64 pixel counts; activation: (C, n_categories)
    int64 active pixels on images annotated in each category; iou: (C, L) float64;
    best_concept: (C,) int64 column into the result's concepts; best_iou: (C,) float64;
    top_images: (C, top_n) int64 dataset indices by spatial maximum (−1 = none); top_values likewise.
    """

    name: str
    thresholds: torch.Tensor
    intersection: torch.Tensor
    activation: torch.Tensor
    iou: torch.Tensor
    best_concept: torch.Tensor
    best_iou: torch.Tensor
    top_images: torch.Tensor
    top_values: torch.Tensor

    @property
    def units(self) -> int:
        return int(self.thresholds.shape[0])


@dataclass
class DissectionResult:
    """Result of :func:`dissect`: per-layer unit labels plus the concept table they refer to."""

    layers: dict[str, LayerDissection]
    concept_numbers: list[int]
    concept_names: list[str]
    concept_categories: list[str]
    categories: list[str]
    label_pixels: torch.Tensor  # (L,) int64 annotated pixels per concept
    annotated_images: dict[str, int]
    n_images: int
    quantile: float
    iou_threshold: float
    seg_size: tuple[int, int]
    exact_thresholds: dict[str, bool]
    model: str = ""  # model_signature of the dissected model ("" = unknown)
    image_names: dict[int, str] = field(default_factory=dict)  # dataset row -> image file (rows in top_images)
    data: str = ""  # the dataset directory ("" = in-memory data)

    def detectors(self, layer: str) -> torch.Tensor:
        """(C,) bool: units whose best IoU exceeds the threshold."""
        return self.layers[layer].best_iou > self.iou_threshold

    def unique_detectors(self, layer: str) -> dict[str, int]:
        """Distinct concepts among the layer's detectors, per category (and ``"total"``)."""
        d = self.layers[layer]
        concepts = sorted({int(c) for c in d.best_concept[self.detectors(layer)].tolist()})
        counts = {cat: 0 for cat in self.categories}
        for c in concepts:
            counts[self.concept_categories[c]] += 1
        counts["total"] = len(concepts)
        return counts

    def total_unique_detectors(self) -> int:
        """Sum over layers of unique detectors (the block-norm paper's interpretability score)."""
        return sum(self.unique_detectors(name)["total"] for name in self.layers)

    def unit_rows(self) -> list[dict[str, Any]]:
        """One row per layer × unit: layer, unit, concept, category, iou, threshold."""
        rows = []
        for name, d in self.layers.items():
            for u, (c, iou, t) in enumerate(zip(d.best_concept.tolist(), d.best_iou.tolist(),
                                                d.thresholds.tolist(), strict=True)):
                rows.append({"layer": name, "unit": u, "concept": self.concept_names[c],
                             "category": self.concept_categories[c], "iou": iou, "threshold": t})
        return rows

    def layer_rows(self) -> list[dict[str, Any]]:
        """One row per layer: units, detectors, unique detectors in total and per category."""
        rows = []
        for name, d in self.layers.items():
            u = self.unique_detectors(name)
            rows.append({"layer": name, "units": d.units, "detectors": int(self.detectors(name).sum()),
                         "unique_detectors": u.pop("total"), **u,
                         "zero_threshold_units": int((d.thresholds <= 0).sum())})
        return rows

    def unit_names(self, layer: str) -> UnitNames:
        """The stored-artefact form of ``layer``'s labels: every unit's best concept and IoU (float64)."""
        d = self.layers[layer]
        return UnitNames(layer, torch.arange(d.units), tuple(self.concept_names[c] for c in d.best_concept.tolist()),
                         d.best_iou.clone(), self.model)

    def top_images(self) -> TopImages:
        """Every layer's top images per unit with the file names of the dataset rows they refer to."""
        return TopImages({n: d.top_images for n, d in self.layers.items()},
                         {n: d.top_values for n, d in self.layers.items()}, dict(self.image_names), self.data)

    def save(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write ``units.csv``, ``layers.csv``, ``dissection.json``, the names file ``unit_names.safetensors``
        (read by ``semlens feedback init``) and ``top_images.safetensors`` (each unit's top images, read by
        ``semlens serve``; :mod:`semlens.units.top_images`) to ``out``; return their paths."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"units": out / "units.csv", "layers": out / "layers.csv", "json": out / "dissection.json"}
        paths["names"] = save_unit_names(out / "unit_names.safetensors", [self.unit_names(n) for n in self.layers])
        paths["top_images"] = save_top_images(out / TOP_IMAGES_FILE, self.top_images())
        _write_csv(paths["units"], self.unit_rows(), ["layer", "unit", "concept", "category", "iou", "threshold"])
        _write_csv(paths["layers"], self.layer_rows())
        summary = {
            "n_images": self.n_images, "quantile": self.quantile, "iou_threshold": self.iou_threshold,
            "seg_size": list(self.seg_size), "categories": self.categories,
            "annotated_images": self.annotated_images, "exact_thresholds": self.exact_thresholds,
            "total_unique_detectors": self.total_unique_detectors(), "layers": self.layer_rows(),
        }
        paths["json"].write_text(json.dumps(summary, indent=2))
        return paths


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str] | None = None) -> None:
    cols = columns or (list(rows[0]) if rows else [])
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    os.replace(tmp, path)

