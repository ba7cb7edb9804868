"""What the web app shows of a correction project, read from stored artefacts only.

A :class:`ProjectView` opens a project directory made by ``semlens feedback init`` (``.semlens/project.json``,
the feedback store, the stored unit names and references) and, optionally, a dissection output directory
(``units.csv``, ``layers.csv``, ``dissection.json``) for the per-layer pages. Nothing here runs a model over a
dataset: a page reads tables, one sample's image, or asks the current version's corrector about one sample.
Correctors (the model of a version, loaded once) are cached per version.
"""

from __future__ import annotations

import csv
import json
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from semlens.correct.project import CorrectionProject, Corrector
from semlens.correct.store import ModelVersion, Remark
from semlens.serve.unit_media import UnitMedia

__all__ = ["ProjectView", "UnitRow", "LayerRow", "NotFound", "SAMPLE_ID"]

SAMPLE_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


class NotFound(LookupError):
    """A page names something the project does not have (unit, layer, sample, version); the message says what."""


@dataclass(frozen=True)
class UnitRow:
    """One unit of a dissected layer: its best concept, the concept's category and the IoU (dimensionless)."""

    layer: str
    unit: int
    concept: str
    category: str
    iou: float
    threshold: float = float("nan")  # the dissection's activation threshold T_k (layer units; NaN = not recorded)


@dataclass(frozen=True)
class LayerRow:
    """Per-layer dissection summary: units, detector units (IoU above the threshold), unique detected concepts."""

    layer: str
    units: int
    detectors: int
    unique_detectors: int
    categories: dict[str, int]


class ProjectView:
    """Read-only access to a project for the web app (thread-safe; correctors cached per model version).

    project_dir: a directory made by ``semlens feedback init``. dissection: a ``semlens dissect`` output
    directory, or ``None`` to use the one recorded in the project (key ``dissection``) if any.
    """

    def __init__(self, project_dir: str | Path, dissection: str | Path | None = None, device: str = "cpu") -> None:
        self.project = CorrectionProject(project_dir)
        self.dir = self.project.dir.resolve()
        self.kind: str = self.project.config["kind"]
        self.device = torch.device(device)
        recorded = self.project.config.get("dissection")
        self.dissection = Path(dissection) if dissection is not None else (Path(recorded) if recorded else None)
        if self.dissection is not None and not (self.dissection / "units.csv").is_file():
            raise FileNotFoundError(f"{self.dissection} is not a dissection output (no units.csv)")
        self._units = self._read_units()
        self._info = self._read_info()
        self._layers = self._read_layers()
        self._lock = threading.Lock()
        self._correctors: dict[int, Corrector] = {}
        self._sample_ids: list[str] | None = None
        self._captions: dict[str, list[str]] | None = None
        self._targets: list[str] | None = None
        cfg = self.project.config
        self.media = UnitMedia(self.dissection, Path(cfg["data"]) if self.kind == "classifier" else None,
                               [Path(p) for p in cfg.get("prototypes", [])],
                               [Path(p) for p in cfg.get("embeddings", [])], cfg.get("class_names"))

    # ---- tables -------------------------------------------------------------------------------------------
    def _read_units(self) -> list[UnitRow]:
        if self.dissection is None:
            return []
        with open(self.dissection / "units.csv", newline="") as f:
            return [UnitRow(r["layer"], int(r["unit"]), r["concept"], r.get("category", ""), float(r["iou"]),
                            float(r.get("threshold") or "nan")) for r in csv.DictReader(f)]

    def _read_info(self) -> dict:
        summary = self.dissection / "dissection.json" if self.dissection is not None else None
        return json.loads(summary.read_text()) if summary is not None and summary.is_file() else {}

    def _read_layers(self) -> list[LayerRow]:
        if self.dissection is None:
            return []
        info = self._info
        cats = info.get("categories", [])
        rows = []
        for r in info.get("layers", []):
            rows.append(LayerRow(r["layer"], int(r["units"]), int(r["detectors"]), int(r["unique_detectors"]),
                                 {c: int(r.get(c, 0)) for c in cats}))
        if not rows:  # no dissection.json: summarise units.csv
            for name in dict.fromkeys(u.layer for u in self._units):
                us = [u for u in self._units if u.layer == name]
                rows.append(LayerRow(name, len(us), len(us), len({u.concept for u in us}), {}))
        return rows

    @property
    def iou_threshold(self) -> float:
        """The dissection's detector threshold (read once with the tables; 0.04 when it records none)."""
        return float(self._info.get("iou_threshold", 0.04))

    def layers(self) -> list[LayerRow]:
        return list(self._layers)

    def layer(self, name: str) -> LayerRow:
        for row in self._layers:
            if row.layer == name:
                return row
        known = ", ".join(r.layer for r in self._layers) or "none (serve with --dissection DIR)"
        raise NotFound(f"unknown layer {name!r}; layers: {known}")

    def units(self, layer: str, concept: str = "", category: str = "", min_iou: float = 0.0) -> list[UnitRow]:
        """Units of ``layer`` whose concept contains ``concept`` (case-insensitive), of ``category``, IoU ≥ min_iou."""
        self.layer(layer)
        c = concept.strip().lower()
        return [u for u in self._units if u.layer == layer and (not c or c in u.concept.lower())
                and (not category or u.category == category) and u.iou >= min_iou]

    def unit(self, layer: str, unit: int) -> UnitRow:
        for u in self.units(layer):
            if u.unit == unit:
                return u
        raise NotFound(f"layer {layer!r} has no unit {unit} (units 0..{self.layer(layer).units - 1})")

    def top_image_png(self, version_id: int, layer: str, unit: int, rank: int) -> bytes:
        """PNG of the unit's top image ``rank`` with its concept mask and (under model version ``version_id``) its
        thresholded activation region outlined (:meth:`UnitMedia.top_png`); rendered once, then cached."""
        row = self.unit(layer, unit)
        self.version(version_id)

        def model() -> tuple[torch.nn.Module, threading.Lock]:
            return self.corrector(version_id).model, self._lock

        return self.media.top_png((version_id,), layer, unit, rank, row.concept, row.threshold, model)

    def prototype_path(self, layer: str, unit: int, i: int) -> Path:
        """The file of the unit's ``i``-th prototype (from the attached maximize outputs)."""
        self.unit(layer, unit)
        protos = self.media.prototypes_of(layer, unit)
        if not 0 <= i < len(protos):
            raise NotFound(f"unit {unit} of layer {layer!r} has no prototype {i} ({len(protos)} attached)")
        return protos[i].path

    # ---- store --------------------------------------------------------------------------------------------
    def versions(self) -> list[ModelVersion]:
        return self.project.store.versions()

    def version(self, version_id: int) -> ModelVersion:
        for v in self.versions():
            if v.id == version_id:
                return v
        raise NotFound(f"unknown model version {version_id}; versions: "
                       f"{', '.join(str(v.id) for v in self.versions()) or 'none'}")

    def current_version(self) -> ModelVersion:
        v = self.project.store.current_version()
        if v is None:
            raise NotFound("the project has no model version")
        return v

    def remarks(self, sample_id: str | None = None) -> list[Remark]:
        rs = self.project.store.remarks()
        return [r for r in rs if sample_id is None or r.sample_id == sample_id]

    # ---- samples ------------------------------------------------------------------------------------------
    def sample_ids(self, limit: int | None = None) -> list[str]:
        """Sample ids: a classifier's from the dataset's ``index.csv`` (image column), a captioner's from
        ``features/*.npy``. A small table read, cached; no image is opened."""
        if self._sample_ids is None:
            root = Path(self.project.config["data"])
            if self.kind == "classifier":
                with open(root / "index.csv", newline="") as f:
                    self._sample_ids = [Path(r["image"]).stem for r in csv.DictReader(f)]
            else:
                self._sample_ids = sorted(p.stem for p in (root / "features").glob("*.npy"))
        return self._sample_ids[:limit] if limit is not None else list(self._sample_ids)

    def image_path(self, sample_id: str) -> Path:
        """The image file of a classifier sample; ids with path characters or outside the data are refused."""
        if self.kind != "classifier":
            raise NotFound("a captioner project has no sample images")
        if not SAMPLE_ID.match(sample_id) or sample_id.startswith("."):
            raise NotFound(f"unknown sample {sample_id!r}")
        root = (Path(self.project.config["data"]) / "images").resolve()
        path = (root / f"{sample_id}{self.project.config.get('image_suffix', '.png')}").resolve()
        if path.parent != root or not path.is_file():
            raise NotFound(f"unknown sample {sample_id!r}")
        return path

    def check_sample(self, sample_id: str) -> None:
        if not SAMPLE_ID.match(sample_id):
            raise NotFound(f"unknown sample {sample_id!r}")
        if self.kind == "classifier":
            self.image_path(sample_id)
        elif not (Path(self.project.config["data"]) / "features" / f"{sample_id}.npy").is_file():
            raise NotFound(f"unknown sample {sample_id!r}")

    def corrector(self, version_id: int) -> Corrector:
        """The corrector (model + stored artefacts) of a ready version, loaded once."""
        with self._lock:
            if version_id not in self._correctors:
                v = self.version(version_id)
                if v.state != "ready" and v.state != "undone":
                    raise NotFound(f"model version {version_id} is {v.state}; it has no weights yet")
                self._correctors[version_id] = self.project.corrector(self.device, version=version_id)
            return self._correctors[version_id]

    def describe(self, version_id: int, sample_id: str, enhanced: Sequence[str] = ()) -> str:
        """The version's prediction (classifier: top classes; captioner: the caption) for one sample."""
        self.check_sample(sample_id)
        corr = self.corrector(version_id)
        with self._lock:
            return corr.describe(sample_id, enhanced)

    def concepts(self) -> list[str]:
        """Concepts (classifier) or topics (captioner) a remark can name: those some unit of the project carries."""
        if self._targets is None:  # fixed by the project's unit names: asked once, not on every sample page
            self._targets = self.corrector(self.current_version().id).targets()
        return self._targets

    def relevance(self, version_id: int, sample_id: str, method: str, unit: tuple[str, int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(relevance (C, H, W), image (C, H, W), explained class) of one classifier sample under ``method``.

        ``unit=(layer, i)``: the concept-conditional heatmap, relevance flowing only through that channel."""
        if self.kind != "classifier":
            raise NotFound("heatmaps are shown for classifier projects")
        units = {unit[0]: [unit[1]]} if unit is not None else None
        rel, x, target = self._attribute(version_id, sample_id, method, units=units)
        return rel.cpu(), x.cpu(), target

    def _attribute(self, version_id: int, sample_id: str, method: str, **options: object
                   ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Relevance of the predicted class for one sample (``options`` go to ``attribute``: ``units``, ``layer``):
        (relevance without the batch dimension, the image (C, H, W), the predicted class)."""
        from semlens.explain import attribute

        self.check_sample(sample_id)
        corr = self.corrector(version_id)
        with self._lock:
            x = corr._images([sample_id]).to(self.device)  # type: ignore[attr-defined]
            with torch.no_grad():
                target = int(corr.model(x).argmax(-1))
            rel = attribute(corr.model, x, target, method, **options)  # type: ignore[arg-type]
        return rel[0].detach(), x[0], target

    def relevant_units(self, version_id: int, sample_id: str, method: str, k: int = 5) -> list[tuple[UnitRow, float]]:
        """The ``k`` units of the corrected layer with the most relevance for the predicted class, with their share
        of the layer's total relevance (LRP read at the layer's output, summed over positions)."""
        layer = self.project.config.get("layer")
        if self.kind != "classifier" or not layer:
            return []
        rel, _, _ = self._attribute(version_id, sample_id, method, layer=layer)
        corr = self.corrector(version_id)
        per_unit = rel.flatten(1).sum(1) if rel.dim() > 1 else rel
        total = float(per_unit.sum()) or 1.0
        names = corr.names  # type: ignore[attr-defined]
        label = {int(u): (c, float(i)) for u, c, i in zip(names.units.tolist(), names.concepts, names.ious.tolist(),
                                                          strict=True)}
        top = torch.topk(per_unit, k=min(k, per_unit.numel()))
        return [(UnitRow(layer, int(u), *label.get(int(u), ("?", 0.0))[:1], "", label.get(int(u), ("?", 0.0))[1]),
                 float(r) / total) for r, u in zip(top.values, top.indices, strict=True)]

    def reference_captions(self, sample_id: str) -> list[str]:
        """A captioner sample's human captions (``captions.csv`` of the corpus, read once)."""
        if self.kind != "captioner":
            return []
        if self._captions is None:
            from semlens.world.msvd import _read_captions

            self._captions = _read_captions(Path(self.project.config["data"]) / "captions.csv")
        return list(self._captions.get(sample_id, []))

    def topic_neurons(self, version_id: int, sample_id: str, k: int = 8) -> list[dict[str, object]]:
        """The ``k`` strongest named neurons of a captioner version with their activation at every frame of
        the clip: rows ``{neuron, topic_name, strength, values: [T floats], points: SVG polyline}``."""
        if self.kind != "captioner":
            return []
        self.check_sample(sample_id)
        corr = self.corrector(version_id)
        with self._lock:
            feats, lengths = corr._feats([sample_id])  # type: ignore[attr-defined]
            with torch.no_grad():
                states, _ = corr.model.encode(feats.to(self.device), lengths.to(self.device))
        rows = corr.engine.names.table(top=k)  # type: ignore[attr-defined]
        if not rows:
            return []
        t = int(lengths[0])
        acts = states[0, :t, [int(r["neuron"]) for r in rows]].T.cpu()  # (k, T)
        lo, hi = float(acts.min()), float(acts.max())
        span = (hi - lo) or 1.0
        for r, a in zip(rows, acts, strict=True):
            ys = (1 - (a - lo) / span) * 28 + 2
            xs = torch.linspace(2, 158, t) if t > 1 else torch.tensor([80.0])
            r["values"] = [round(float(x), 3) for x in a]
            r["points"] = " ".join(f"{float(x):.1f},{float(y):.1f}" for x, y in zip(xs, ys, strict=True))
        return rows

    def class_name(self, k: int) -> str:
        names = self.project.config.get("class_names") or []
        return names[k] if k < len(names) else str(k)
