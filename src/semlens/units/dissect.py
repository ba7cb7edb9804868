"""Network Dissection: which units of which layers detect which human concepts (Bau et al. 2017).

Two streamed passes over a Broden-format dataset (see ``docs/dissection.md``):

1. **Thresholds.** For every unit ``k`` of every probed layer, ``T_k`` is the ``1 − quantile`` quantile
   of its activations over every spatial location of every image (exact when the needed top values
   fit in ``quantile_memory`` bytes, otherwise a fixed-memory sketch with a documented error bound;
   :mod:`semlens.units.quantile`). The exact estimator keeps a running lower bound of ``T_k``.
2. **Tally.** Activation maps are upsampled bilinearly (``align_corners=False``) to the mask
   resolution, binarised with ``S_k(x) > T_k`` and counted against the concept masks: per unit ×
   concept intersections (``bincount`` over ``unit · L + label`` keys of the active pixels), per unit ×
   category activated pixels restricted to images annotated in that category, and per concept
   label pixels, all in int64. A pixel carries a set of concepts (pixel-map entries of every chosen
   category plus the image's whole-image labels), each counted once.

The upsampling is sparse: only the 2×2-cell "blocks" with a corner above the threshold are evaluated
(float64, the exact ``F.interpolate`` formula). During pass 1 the blocks above the running lower bound
(a superset of those above the final ``T_k``; a few % of the cells) are kept with their corner values,
and the encoded labels too, while they fit in ``cache_bytes``; pass 2 then needs no second forward.
Layers with the same map size are processed as one group (their units concatenated).

``IoU[k, c] = I[k, c] / (A[k, cat(c)] + L[c] − I[k, c] + 1e-10)`` exactly as NetDissect-Lite. Each unit
is labelled with its best concept over all categories; it is a detector when that IoU exceeds
``iou_threshold``; a layer's unique detectors are the distinct concepts of its detectors.

Memory does not depend on the number of images (the cache is capped; beyond it the data are streamed
twice); runs resume from a checkpoint directory; under ``torchrun`` each process takes a contiguous
shard and integer counts are summed, so the result is identical to a one-process run.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import csv
import hashlib
import inspect
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from semlens import distributed
from semlens.artefacts import model_signature
from semlens.layers import frozen, resolve_layers
from semlens.runtime import resolve_device
from semlens.streaming import (
    ForwardTap,
    all_gather_cat,
    checkpoint_path,
    forward_until,
    load_state,
    run_batches,
    save_state,
    worker_index,
)
from semlens.units import dissect_kernels
from semlens.units.backend import Backend
from semlens.units.names import UnitNames, save_unit_names
from semlens.units.quantile import QuantileEstimator, make_quantile_estimator
from semlens.units.top_images import FILE_NAME as TOP_IMAGES_FILE
from semlens.units.top_images import TopImages, save_top_images
from semlens.units.upsample import _SparseUpsampler, bilinear_axis  # noqa: F401 - bilinear_axis: public here too

__all__ = [
    "SegmentationBatch",
    "SegmentationDataset",
    "TensorSegmentationDataset",
    "LayerDissection",
    "DissectionResult",
    "Dissector",
    "dissect",
    "DissectionError",
]


class DissectionError(ValueError):
    """Input that dissection cannot work with (a message names the culprit)."""


@dataclass
class SegmentationBatch:
    """A batch of images with concept annotations (the fields of ``semlens.world.BrodenBatch``).

    images: (B, 3, H, W) float in [0, 1]; pixel[cat]: (B, K, sh, sw) int64 concept numbers (0 = none);
    image_level[cat]: (B, K) int64 whole-image concept numbers; annotated[cat]: (B,) bool.
    """

    images: torch.Tensor
    pixel: dict[str, torch.Tensor] = field(default_factory=dict)
    image_level: dict[str, torch.Tensor] = field(default_factory=dict)
    annotated: dict[str, torch.Tensor] = field(default_factory=dict)


class SegmentationDataset(Protocol):
    """What dissection reads: ``semlens.world.BrodenDataset`` or :class:`TensorSegmentationDataset`."""

    categories: list[str]
    labels: list[tuple[int, str, str]]  # (concept number, name, primary category)

    def __len__(self) -> int: ...

    def load_batch(self, indices: Sequence[int]) -> Any: ...


class TensorSegmentationDataset:
    """An in-memory Broden-like dataset from tensors (hand-made data, tests, custom annotations).

    images: (N, 3, H, W) float; labels: (number, name, category) per concept (numbers ≥ 1);
    pixel: category -> (N, K, sh, sw) int64; image_level: category -> (N, K) int64;
    annotated: category -> (N,) bool (default: the image has a non-zero entry in that category).
    """

    def __init__(self, images: torch.Tensor, labels: Sequence[tuple[int, str, str]],
                 pixel: Mapping[str, torch.Tensor] | None = None,
                 image_level: Mapping[str, torch.Tensor] | None = None,
                 annotated: Mapping[str, torch.Tensor] | None = None) -> None:
        if images.ndim != 4:
            raise DissectionError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
        self.images = images
        self.pixel = dict(pixel or {})
        self.image_level = dict(image_level or {})
        self.labels = [(int(n), str(s), str(c)) for n, s, c in labels]
        self.categories = list(dict.fromkeys([*self.pixel, *self.image_level]))
        n = images.shape[0]
        for cat, t in [*self.pixel.items(), *self.image_level.items()]:
            if t.shape[0] != n:
                raise DissectionError(f"annotations of category {cat!r} cover {t.shape[0]} images, not {n}")
        self.annotated = {}
        for cat in self.categories:
            if annotated is not None and cat in annotated:
                self.annotated[cat] = annotated[cat].bool()
                continue
            flag = torch.zeros(n, dtype=torch.bool)
            if cat in self.pixel:
                flag |= self.pixel[cat].reshape(n, -1).gt(0).any(1)
            if cat in self.image_level:
                flag |= self.image_level[cat].reshape(n, -1).gt(0).any(1)
            self.annotated[cat] = flag
        self.image_size = tuple(images.shape[-2:])
        seg = {tuple(t.shape[-2:]) for t in self.pixel.values()}
        self.seg_size = seg.pop() if len(seg) == 1 else self.image_size

    def __len__(self) -> int:
        return self.images.shape[0]

    def load_batch(self, indices: Sequence[int]) -> SegmentationBatch:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return SegmentationBatch(
            images=self.images[idx],
            pixel={c: t[idx] for c, t in self.pixel.items()},
            image_level={c: t[idx] for c, t in self.image_level.items()},
            annotated={c: t[idx] for c, t in self.annotated.items()},
        )


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


# ----------------------------------------------------------------------------------------------
# labels: per batch, a set of concept numbers per pixel


@dataclass
class _Labels:
    pixel: torch.Tensor  # (B * P, Kp) concept numbers (0 = none), deduplicated per pixel; uint8/int16/int32
    image: torch.Tensor  # (B, Ki) int64 concept numbers, deduplicated per image
    annotated: torch.Tensor  # (B, n_categories) float64 0/1
    label_pixels: torch.Tensor  # (n_numbers,) int64 labelled pixels per concept number in this batch

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.pixel, self.image, self.annotated, self.label_pixels))


def _dedupe(labels: torch.Tensor) -> torch.Tensor:
    """Zero entries of channel k (dim 1) that repeat an earlier channel, so each concept counts once."""
    out = labels.clone()
    for k in range(1, labels.shape[1]):
        repeat = (labels[:, k:k + 1] == labels[:, :k]).any(1)
        out[:, k].masked_fill_(repeat, 0)
    return out


def _compact_dtype(n_numbers: int) -> torch.dtype:
    """Smallest integer dtype holding concept numbers 0 .. n_numbers − 1."""
    if n_numbers <= 256:
        return torch.uint8
    return torch.int16 if n_numbers <= 2**15 else torch.int32


class _LabelEncoder:
    """Turns a batch's label maps into deduplicated concept-number sets per pixel (0 = none).

    Each pixel-label channel (an entry k of a category's (B, K, sh, sw) maps) is histogrammed once;
    two channels (or a channel and the whole-image labels) are compared pixel by pixel only when
    their histograms share a concept, i.e. only when a duplicate is possible in this batch.
    """

    def __init__(self, categories: list[str], n_numbers: int, seg: tuple[int, int], device: torch.device,
                 backend: Backend | None = None):
        self.categories, self.n_numbers, self.seg, self.device = categories, n_numbers, seg, device
        self.backend = backend or Backend.for_device(device)
        self.dtype = _compact_dtype(n_numbers)
        self.pool: concurrent.futures.Executor | None = None  # threads the fused kernel may use
        self.workers = 1

    def _hist(self, t: torch.Tensor, where: str) -> torch.Tensor:
        """(n_numbers,) int64 histogram of the 1-D integer tensor ``t``; bad numbers raise DissectionError."""
        try:
            hist = self.backend.bincount(t, self.n_numbers)  # raises on negative numbers
        except (RuntimeError, ValueError):
            hist = None
        if hist is None or hist.numel() > self.n_numbers:
            bad = int(t.min()) if hist is None else int(t.max())
            raise DissectionError(f"{where} holds concept number {bad}, which is not in the dataset's label table")
        return hist

    def encode(self, batch: Any, b: int) -> _Labels:
        P = self.seg[0] * self.seg[1]
        maps: list[tuple[str, torch.Tensor]] = []
        img, ann = [], []
        for cat in self.categories:
            t = (getattr(batch, "pixel", None) or {}).get(cat)
            if t is not None and t.numel():
                if t.ndim != 4 or t.shape[0] != b:
                    raise DissectionError(f"pixel labels of {cat!r} must be (B, K, sh, sw), got {tuple(t.shape)}")
                if tuple(t.shape[-2:]) != self.seg:
                    raise DissectionError(f"masks of category {cat!r} are {tuple(t.shape[-2:])}, expected "
                                          f"{self.seg} (mismatched mask size)")
                if t.is_floating_point() or t.dtype == torch.bool:
                    raise DissectionError(f"pixel labels of {cat!r} must be integers, got {t.dtype}")
                t = t.to(self.device)
                maps.append((cat, t))
            s = (getattr(batch, "image_level", None) or {}).get(cat)
            if s is not None and s.numel():
                s = s.to(self.device, torch.long).reshape(b, -1)
                self._hist(s.reshape(-1), f"whole-image labels of {cat!r}")
                img.append(s)
            a = (getattr(batch, "annotated", None) or {}).get(cat)
            if a is None:
                a = torch.zeros(b, dtype=torch.bool, device=self.device)
                if t is not None and t.numel():
                    a = a | t.reshape(b, -1).gt(0).any(1)
                if s is not None and s.numel():
                    a = a | s.gt(0).any(1)
            ann.append(a.to(self.device).reshape(b).bool())
        image = _dedupe(torch.cat(img, 1)) if img else torch.zeros(b, 0, dtype=torch.long, device=self.device)
        image_hist = torch.bincount(image.reshape(-1), minlength=self.n_numbers)
        if self.backend.uses_fused(image):
            try:
                pixel, hist = dissect_kernels.encode_pixels(maps, image, self.n_numbers, self.dtype, self.pool,
                                                            self.workers)
            except ValueError as err:
                raise DissectionError(str(err)) from None
            return _Labels(pixel, image, torch.stack(ann, 1).double(), P * image_hist + hist)
        chans, hists = [], []
        for cat, t in maps:
            for j in range(t.shape[1]):
                chans.append(t[:, j].reshape(-1))
                hists.append(self._hist(chans[-1], f"pixel labels of {cat!r}"))
        present = [h[1:] > 0 for h in hists]
        in_image = image_hist[1:] > 0
        for k, ch in enumerate(chans):
            dup = None
            for j in range(k):  # the same concept in an earlier channel at the same pixel
                if bool((present[k] & present[j]).any()):
                    same = ch == chans[j]
                    dup = same if dup is None else dup | same
            if bool((present[k] & in_image).any()):  # a whole-image concept already covers every pixel
                covered = (ch.view(b, P, 1) == image.view(b, 1, -1)).any(-1).view(-1)
                dup = covered if dup is None else dup | covered
            if dup is not None:
                chans[k] = ch.masked_fill(dup, 0)
                hists[k] = self.backend.bincount(chans[k], self.n_numbers)
        if chans:
            pixel = torch.stack([c.to(self.dtype) for c in chans], 1)
        else:
            pixel = torch.zeros(b * P, 0, dtype=self.dtype, device=self.device)
        label_pixels = P * image_hist
        for h in hists:
            label_pixels += h
        return _Labels(pixel, image, torch.stack(ann, 1).double(), label_pixels)


# ----------------------------------------------------------------------------------------------
# accumulators


_Estimator = QuantileEstimator


def _fold_state(parts: list[_Estimator]) -> dict[str, torch.Tensor]:
    """The state of one estimator that saw what all of ``parts`` saw (exact), leaving them unchanged."""
    return type(parts[0]).fold_state(parts)  # type: ignore[attr-defined]


class _ThresholdPass:
    """Pass-1 estimators per layer group, one set per :func:`run_batches` worker (``lanes``)."""

    def __init__(self, lanes: list[dict[str, _Estimator]]):
        self.lanes = lanes

    @property
    def estimators(self) -> dict[str, _Estimator]:
        """The first worker's estimators (all workers' after :meth:`fold_lanes`)."""
        return self.lanes[0]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{g}/{k}": v for g in self.lanes[0]
                for k, v in _fold_state([lane[g] for lane in self.lanes]).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for g, e in self.lanes[0].items():
            e.load_state_dict({k.split("/", 1)[1]: v for k, v in state.items() if k.split("/", 1)[0] == g})
        for lane in self.lanes[1:]:  # the saved state holds every worker's values: the others start empty
            for e in lane.values():
                e.load_state_dict(e.cleared_state())

    def fold_lanes(self) -> None:
        """Fold the other workers' estimators into the first worker's (exact); drop them."""
        if len(self.lanes) > 1:
            for g, e in self.lanes[0].items():
                e.load_state_dict(_fold_state([lane[g] for lane in self.lanes]))
            self.lanes = self.lanes[:1]

    def merge_across_processes(self) -> None:
        for e in self.estimators.values():
            e.merge_across_processes()


class _Lanes:
    """Per-worker pass-2 tallies as one accumulator for :func:`run_batches` (state = their sum)."""

    def __init__(self, parts: list[_TallyPass]) -> None:
        self.parts = parts

    def state_dict(self) -> dict[str, torch.Tensor]:
        if len(self.parts) == 1:
            return self.parts[0].state_dict()
        total = copy.deepcopy(self.parts[0])
        for p in self.parts[1:]:
            total.absorb(p)
        return total.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.parts[0].load_state_dict(state)  # the saved sum; the other workers start from zero

    def fold(self) -> _TallyPass:
        """The first worker's tally with every other worker's added."""
        for p in self.parts[1:]:
            self.parts[0].absorb(p)
        self.parts = self.parts[:1]
        return self.parts[0]


class _TallyPass:
    """Pass-2 counts: intersections and activated pixels per group of layers, top images per layer."""

    def __init__(self, groups: dict[str, int], layers: dict[str, int], n_cols: int, n_cats: int, top_n: int,
                 device: torch.device, backend: Backend | None = None):
        self.backend = backend or Backend.for_device(device)
        z = {"dtype": torch.int64, "device": device}
        self.inter = {g: torch.zeros(c, n_cols, **z) for g, c in groups.items()}
        self.act = {g: torch.zeros(c, n_cats, **z) for g, c in groups.items()}
        self.top_val = {n: torch.full((c, top_n), float("-inf"), device=device) for n, c in layers.items()}
        self.top_idx = {n: torch.full((c, top_n), -1, **z) for n, c in layers.items()}
        self.label_pixels = torch.zeros(n_cols, **z)
        self.annotated = torch.zeros(n_cats, **z)
        self.top_n = top_n

    def state_dict(self) -> dict[str, torch.Tensor]:
        s = {"label_pixels": self.label_pixels, "annotated": self.annotated}
        for key in ("inter", "act", "top_val", "top_idx"):
            s.update({f"{key}/{n}": t for n, t in getattr(self, key).items()})
        return s

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        dev = self.label_pixels.device
        self.label_pixels, self.annotated = state["label_pixels"].to(dev), state["annotated"].to(dev)
        for key in ("inter", "act", "top_val", "top_idx"):
            d = getattr(self, key)
            for n in d:
                d[n] = state[f"{key}/{n}"].to(dev)

    def add_top(self, name: str, maxima: torch.Tensor, indices: torch.Tensor) -> None:
        """maxima: (B, C) spatial maxima; indices: (B,) dataset indices."""
        if self.backend.uses_fused(self.top_val[name]):  # one insertion kernel, not a dozen small tensor ops
            dissect_kernels.insert_top(self.top_val[name], self.top_idx[name], maxima, indices)
            return
        self._merge_top(name, maxima.t().float(), indices.view(1, -1).expand(maxima.shape[1], -1))

    def _merge_top(self, name: str, vals: torch.Tensor, idx: torch.Tensor) -> None:
        """Merge (C, m) candidate values/indices into the top list: largest first, the smaller index on ties, so
        the list does not depend on the order batches (or workers, or processes) arrive in."""
        vals = torch.cat([self.top_val[name], vals], 1)
        idx = torch.cat([self.top_idx[name], idx], 1)
        # one int64 key per entry, ordered like (value, −index): the float32's order-preserving bit pattern above
        # the complemented index (an image appears once per row, so keys are distinct and topk is exact)
        bits = vals.contiguous().view(torch.int32).long()
        key = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits) * 2**32 + (2**32 - 2 - idx)
        top = key.topk(min(self.top_n, key.shape[1]), dim=1).indices
        self.top_val[name], self.top_idx[name] = vals.gather(1, top), idx.gather(1, top)

    def absorb(self, other: _TallyPass) -> None:
        """Add another worker's counts and top lists to these (integer sums: exact in any order)."""
        self.label_pixels += other.label_pixels
        self.annotated += other.annotated
        for g in self.inter:
            self.inter[g] += other.inter[g]
            self.act[g] += other.act[g]
        for n in self.top_val:
            self._merge_top(n, other.top_val[n], other.top_idx[n])

    def merge_across_processes(self) -> None:
        if not distributed.is_distributed():
            return
        for t in [self.label_pixels, self.annotated, *self.inter.values(), *self.act.values()]:
            distributed.all_reduce_sum(t)
        for n in self.top_val:
            vals = all_gather_cat(self.top_val[n], dim=1)
            idx = all_gather_cat(self.top_idx[n], dim=1)
            self.top_val[n], self.top_idx[n] = self.top_val[n][:, :0], self.top_idx[n][:, :0]
            self._merge_top(n, vals, idx)




def _pack_by_unit(coords: torch.Tensor, values: torch.Tensor, bound: torch.Tensor,
                  shape: tuple[int, ...], backend: Backend) -> torch.Tensor:
    """(C, m) values above ``bound`` (C,) grouped by unit (−inf padded); coords (3, n): (image, unit, cell)
    of each value in (B, C, h, w), in ascending order (grouped by image, then unit).

    No sort: a value's slot in its unit's row is the count of that unit's values in earlier images
    plus its rank within its (image, unit) plane.
    """
    B, C = shape[:2]
    unit = coords[1].long()
    plane = coords[0].long() * C + unit
    sel = backend.nonzero_coords(values > backend.take(bound, unit))[0]
    plane, unit, values = plane.index_select(0, sel), unit.index_select(0, sel), values.index_select(0, sel)
    counts = torch.bincount(plane, minlength=B * C)
    per_image = counts.view(B, C)
    before = (torch.cumsum(per_image, 0) - per_image).view(-1)  # same unit, earlier images
    start = torch.cumsum(counts, 0) - counts
    slot = (before - start).index_select(0, plane) + torch.arange(plane.numel(), device=plane.device)
    m = int(per_image.sum(0).max()) if B else 0
    packed = torch.full((C * m,), float("-inf"), dtype=values.dtype, device=values.device)
    packed.index_copy_(0, unit * m + slot, values)
    return packed.view(C, m)


# one batch of pass 1 kept for pass 2: block tables per group, spatial maxima per layer, encoded labels, and the
# bound each group's table was built with
_CacheEntry = tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, torch.Tensor], _Labels,
                    dict[str, torch.Tensor]]


def _prune_cache(cache: list[_CacheEntry], bounds: dict[str, torch.Tensor], backend: Backend) -> int:
    """Drop, in place, the cached blocks whose corners are all ≤ the current lower bounds; return the bytes left.

    Tables of early batches were built with looser bounds; blocks below a later (higher, still valid)
    bound cannot be above the final threshold.
    """
    total = 0
    for tables, maxima, labels, _ in cache:
        for g, (coords, corners) in tables.items():
            top = torch.maximum(torch.maximum(corners[0], corners[1]), torch.maximum(corners[2], corners[3]))
            keep = backend.nonzero_coords(top > backend.take(bounds[g], coords[1].long()))[0]
            tables[g] = (backend.take_cols(coords, keep), backend.take_cols(corners, keep))
            total += sum(t.numel() * t.element_size() for t in tables[g])
        total += labels.nbytes() + sum(m.numel() * m.element_size() for m in maxima.values())
    return total


def _tally_layer(table: tuple[torch.Tensor, torch.Tensor], units: int, thresholds: torch.Tensor,
                 upsampler: _SparseUpsampler, labels: _Labels, inter: torch.Tensor, act: torch.Tensor,
                 max_elements: int) -> None:
    """Add one batch of one layer (a block table of its (B, C, h, w) activations) to the int64 counts."""
    B, C = labels.annotated.shape[0], units
    P = upsampler.seg[0] * upsampler.seg[1]
    n_cols = inter.shape[1]
    # (B, C) active pixels per image and unit: in one go (fused kernel) or per chunk of active pixels
    counts: Iterable[torch.Tensor]
    if upsampler.backend.uses_fused(inter):
        counts = [dissect_kernels.tally(*table, thresholds, upsampler.w, upsampler.rows, upsampler.cols,
                                        upsampler.seg, labels.pixel, B, inter, upsampler.pool, upsampler.workers)]
    else:
        counts = (_count_and_intersect(bb, uu, pix, B, C, P, labels, inter)
                  for bb, uu, pix in upsampler.active_pixels(*table, thresholds, max_elements))
    for count in counts:
        cnt = count.t().double()  # (C, B)
        if labels.image.shape[1]:
            onehot = torch.zeros(B, n_cols, dtype=torch.float64, device=cnt.device)
            onehot.scatter_(1, labels.image, 1.0)
            inter += (cnt @ onehot).round().long()
        act += (cnt @ labels.annotated).round().long()


def _count_and_intersect(bb: torch.Tensor, uu: torch.Tensor, pix: torch.Tensor, B: int, C: int, P: int,
                         labels: _Labels, inter: torch.Tensor) -> torch.Tensor:
    """Tensor path: add a chunk of active pixels (image, unit, pixel) to ``inter``; return (B, C) active pixels."""
    n_cols = inter.shape[1]
    if labels.pixel.shape[1]:
        lab = labels.pixel.index_select(0, bb * P + pix)  # (n, Kp) concept numbers at the active pixels
        keys = (uu * n_cols).unsqueeze(1) + lab
        inter += torch.bincount(keys.view(-1), minlength=C * n_cols).view(C, n_cols)
    return torch.bincount(bb * C + uu, minlength=B * C).view(B, C)


# ----------------------------------------------------------------------------------------------
# the driver


@contextlib.contextmanager
def _on_device(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Move ``model`` to ``device`` and back (it must sit on one device)."""
    devices = {t.device for t in [*model.parameters(), *model.buffers()]}
    if len(devices) > 1:
        raise DissectionError(f"model spans several devices {sorted(map(str, devices))}; put it on one")
    original = devices.pop() if devices else device
    try:
        model.to(device)
        yield
    finally:
        model.to(original)


def _group_cat(per_layer: dict[str, torch.Tensor], members: list[str]) -> torch.Tensor:
    """A layer group's (B, C_g, ...) tensor: its layers' (B, C, ...) tensors with their units concatenated."""
    return per_layer[members[0]] if len(members) == 1 else torch.cat([per_layer[m] for m in members], 1)


def _check_images(images: Any, expected: tuple[int, ...] | None, indices: Sequence[int]) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DissectionError(f"dataset images must be a (B, C, H, W) tensor, got {shape}")
    if expected is not None and tuple(images.shape[1:]) != expected:
        raise DissectionError(
            f"mismatched image size: images {indices[:3]}... are {tuple(images.shape[1:])}, the first image is "
            f"{expected}; resize the dataset to one size"
        )
    # one reduction pass: a NaN/Inf anywhere makes the sum non-finite; the exact test runs only then (a sum of
    # finite values can overflow, so the elementwise test decides)
    if not bool(torch.isfinite(images.sum())) and not bool(torch.isfinite(images).all()):
        raise DissectionError(f"images {list(indices)[:5]}... contain NaN or Inf")
    return images


def dissect(
    model: nn.Module,
    dataset: SegmentationDataset,
    layers: str | Sequence[str],
    *,
    quantile: float = 0.005,
    iou_threshold: float = 0.04,
    batch_size: int = 32,
    device: str | torch.device = "auto",
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    categories: Sequence[str] | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 10,
    seg_size: tuple[int, int] | None = None,
    top_n: int = 8,
    cache_bytes: int = 1 << 28,
    quantile_memory: int = 1 << 28,
    max_elements: int = 1 << 24,
    indices: Sequence[int] | None = None,
    show_progress: bool | None = None,
    workers: int | None = None,
    backend: Backend | None = None,
) -> DissectionResult:
    """Dissect ``layers`` (dotted names, outputs (N, C, h, w)) of ``model`` over ``dataset``.

    dataset: ``semlens.world.BrodenDataset`` or anything with ``categories``, ``labels`` and
    ``load_batch(indices)`` returning images (B, 3, H, W) in [0, 1] and label maps (see
    :class:`SegmentationBatch`). ``transform`` maps images before the model (e.g. normalisation).
    ``categories``: subset of the dataset's categories (default all). ``seg_size``: mask resolution
    (default: the dataset's masks). ``checkpoint``: a directory; a killed run resumes from it.
    ``cache_bytes``: keep the first pass's sparse block tables (cells near or above the running
    threshold bound, with their values) and encoded labels in memory while they fit, so the second
    pass needs no forward; 0 (or a sketch threshold) streams twice. ``quantile_memory``: bytes for exact
    thresholds before falling back to the sketch. ``max_elements``: upsampled values per chunk.
    ``indices``: dissect only these images of ``dataset`` (e.g. a held-out split); ``top_images`` then
    hold dataset indices. ``workers``: batches processed side by side on a CPU, each with one intra-op
    thread (default: ``torch.get_num_threads()`` when the fused kernels are available, else 1): on small and
    medium layers this beats splitting every operation over the cores, which leaves the per-batch bookkeeping
    serial. The result does not depend on it (integer counts, exact thresholds, ties in top images broken by
    index).
    ``backend``: how the helpers compute (:class:`~semlens.units.backend.Backend`; default: chosen once from the
    device, NumPy and the fused kernels on CPU); every back-end gives the same counts.
    The model's train/eval mode, ``requires_grad`` flags and device are restored on return.
    """
    run = _Run(model, dataset, layers, quantile=quantile, iou_threshold=iou_threshold, batch_size=batch_size,
               device=device, transform=transform, categories=categories, checkpoint=checkpoint,
               checkpoint_every=checkpoint_every, seg_size=seg_size, top_n=top_n, cache_bytes=cache_bytes,
               quantile_memory=quantile_memory, max_elements=max_elements, indices=indices,
               show_progress=show_progress, workers=workers, backend=backend)
    with frozen(model), _on_device(model, run.dev), torch.no_grad(), contextlib.ExitStack() as stack:
        run.prepare(stack)
        thresholds = run.threshold_pass()
        tally = run.tally_pass(thresholds)
    return run.result(thresholds, tally)


def _chosen_concepts(dataset: SegmentationDataset, categories: Sequence[str] | None
                     ) -> tuple[list[str], list[tuple[int, str, str]], int]:
    """The categories used, the concepts (number, name, category) in them, and the number of concept columns
    (counts are kept per global concept number; the chosen concepts are read out at the end)."""
    available = list(dataset.categories)
    cats = list(categories) if categories is not None else available
    missing = [c for c in cats if c not in available]
    if missing:
        raise DissectionError(f"dataset has no masks for categor{'y' if len(missing) == 1 else 'ies'} "
                              f"{missing}; it has {available}")
    concepts = [(int(num), name, cat) for num, name, cat in dataset.labels if int(num) > 0 and cat in cats]
    if not concepts:
        raise DissectionError(f"the dataset's label table has no concept in categories {cats}")
    return cats, concepts, max(int(num) for num, _, _ in dataset.labels) + 1


class _Run:
    """One dissection: the threshold pass, then the tally pass, over this process's shard of the images.

    Built from :func:`dissect`'s arguments (validated here); :meth:`prepare` probes one image and sets up the
    per-group estimators, upsamplers and label encoder; each pass is a :func:`run_batches` over a step method.
    """

    def __init__(self, model: nn.Module, dataset: SegmentationDataset, layers: str | Sequence[str], *,
                 quantile: float, iou_threshold: float, batch_size: int, device: str | torch.device,
                 transform: Callable[[torch.Tensor], torch.Tensor] | None, categories: Sequence[str] | None,
                 checkpoint: str | os.PathLike | None, checkpoint_every: int, seg_size: tuple[int, int] | None,
                 top_n: int, cache_bytes: int, quantile_memory: int, max_elements: int,
                 indices: Sequence[int] | None, show_progress: bool | None, workers: int | None,
                 backend: Backend | None) -> None:
        self.names = list(resolve_layers(model, layers))
        if not 0.0 < quantile < 1.0:
            raise DissectionError(f"quantile must be in (0, 1), got {quantile}")
        if iou_threshold < 0:
            raise DissectionError(f"iou_threshold must be >= 0, got {iou_threshold}")
        if batch_size < 1:
            raise DissectionError(f"batch_size must be >= 1, got {batch_size}")
        self.dev = dev = resolve_device(device)
        self.backend = backend or Backend.for_device(dev)
        self.pick = pick = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
        self.n = n = len(pick)
        if n == 0:
            raise DissectionError("the dataset (or the chosen indices) is empty")
        if not all(0 <= i < len(dataset) for i in pick):
            raise DissectionError(f"indices must lie in [0, {len(dataset)}) for this dataset")
        try:
            self.takes_categories = "categories" in inspect.signature(dataset.load_batch).parameters
        except (TypeError, ValueError):
            self.takes_categories = False
        self.cats, self.concepts, self.n_cols = _chosen_concepts(dataset, categories)
        self.model, self.dataset, self.transform, self.categories = model, dataset, transform, categories
        self.quantile, self.iou_threshold, self.batch_size, self.seg_size = quantile, iou_threshold, batch_size, \
            seg_size
        self.checkpoint_every, self.top_n, self.cache_bytes = checkpoint_every, top_n, cache_bytes
        self.quantile_memory, self.max_elements, self.show_progress = quantile_memory, max_elements, show_progress
        self.ckpt_dir = Path(checkpoint) if checkpoint is not None else None
        self.fused = self.backend.uses_fused(torch.empty(0, device=dev))
        self.threads = torch.get_num_threads() if dev.type == "cpu" else 1
        if workers is None:  # whole batches side by side on a multi-core CPU (see dissect's docstring)
            workers = self.threads if self.fused else 1
        if workers < 1:
            raise DissectionError(f"workers must be >= 1, got {workers}")
        self.lanes = min(workers, -(-n // batch_size)) if dev.type == "cpu" else 1
        self.read_lock = threading.Lock()  # workers take turns at the dataset (it need not be thread-safe)

    def read(self, rows: list[int]) -> Any:
        """The dataset's batch of shard rows ``rows`` (one worker at a time)."""
        real = [self.pick[i] for i in rows]
        with self.read_lock:
            if self.takes_categories:
                return self.dataset.load_batch(real, categories=self.cats)
            return self.dataset.load_batch(real)

    def _probe(self) -> None:
        """One image through the model: layer shapes, image size, mask size."""
        probe = self.read([0])
        images0 = _check_images(probe.images, None, [self.pick[0]])
        self.img_shape = img_shape = tuple(images0.shape[1:])
        x0 = images0.to(self.dev, torch.float32)
        try:
            out0 = forward_until(self.model, self.transform(x0) if self.transform else x0, self.names)
        except (RuntimeError, TypeError) as err:
            raise DissectionError(f"the model cannot process images of size {img_shape}: {err}") from err
        self.shapes = {}
        for name in self.names:
            t = out0[name]
            if t.ndim != 4:
                raise DissectionError(f"layer {name!r} outputs shape {tuple(t.shape)}, not a spatial map "
                                      "(N, C, h, w); choose a convolutional layer")
            self.shapes[name] = tuple(t.shape[1:])
        seg_size = self.seg_size
        if seg_size is None:
            seg_size = getattr(self.dataset, "seg_size", None)
            if seg_size is None:
                pix = [t for c, t in (probe.pixel or {}).items() if c in self.cats and t.numel()]
                seg_size = tuple(pix[0].shape[-2:]) if pix else tuple(img_shape[-2:])
        self.seg = (int(seg_size[0]), int(seg_size[1]))

    def prepare(self, stack: contextlib.ExitStack) -> None:
        """Probe, group the layers by map size, and build the estimators, upsamplers, label encoder and hooks."""
        self._probe()
        shapes, names, dev = self.shapes, self.names, self.dev
        self.encoder = _LabelEncoder(self.cats, self.n_cols, self.seg, dev, self.backend)
        self.fingerprint = {
            "layers": names, "shapes": {k: list(v) for k, v in shapes.items()}, "quantile": self.quantile,
            "categories": self.cats, "concepts": len(self.concepts), "seg": list(self.seg),
            "image": list(self.img_shape), "top_n": self.top_n, "quantile_memory": self.quantile_memory,
            "version": 2, "indices": hashlib.sha1(torch.tensor(self.pick).numpy().tobytes()).hexdigest()}
        # layers with the same map size are processed as one group (units concatenated): same quantile
        # level, same upsampler, a third of the tensor operations for three 13x13 layers, say
        self.groups: dict[str, list[str]] = {}
        for name in names:
            self.groups.setdefault("x".join(map(str, shapes[name][1:])), []).append(name)
        self.units = {g: sum(shapes[m][0] for m in members) for g, members in self.groups.items()}
        self.offset = {name: sum(shapes[m][0] for m in members[:members.index(name)])
                       for members in self.groups.values() for name in members}
        self.tap = stack.enter_context(ForwardTap(self.model, names))  # one set of hooks, safe for concurrent batches
        # one set of pass-1 estimators per worker (each sees its own batches; folded exactly after the pass); fewer
        # workers when their estimators would not fit in quantile_memory together
        first = self._estimators()
        self.lanes = min(self.lanes, max(1, self.quantile_memory // sum(e.max_bytes for e in first.values())))
        self.thr_pass = _ThresholdPass([first, *(self._estimators() for _ in range(self.lanes - 1))])
        # one batch at a time: the fused kernels split each block table over the threads; without them, pass 2
        # tallies layer groups side by side (their counters are disjoint)
        inner = 1 if self.lanes > 1 else (self.threads if self.fused else min(len(names), self.threads))
        self.pool = stack.enter_context(concurrent.futures.ThreadPoolExecutor(inner)) if inner > 1 else None
        self.upsamplers = {g: _SparseUpsampler(*shapes[m[0]][1:], self.seg, dev, self.backend)
                           for g, m in self.groups.items()}
        if self.fused:
            for up in [*self.upsamplers.values(), self.encoder]:
                up.pool, up.workers = self.pool, inner

    def _estimators(self) -> dict[str, _Estimator]:
        return {g: make_quantile_estimator(self.units[g], self.n * self.shapes[m[0]][1] * self.shapes[m[0]][2],
                                           self.quantile, self.dev, self.quantile_memory, numpy=self.backend.numpy)
                for g, m in self.groups.items()}

    def load(self, indices: list[int]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                dict[str, torch.Tensor], Any, int]:
        """Forward one batch: activations (B, C_g, h, w) and spatial maxima (B, C_g) per group, spatial
        maxima (B, C) per layer, the batch and its size."""
        batch = self.read(indices)
        imgs = _check_images(batch.images, self.img_shape, [self.pick[i] for i in indices]).to(self.dev, torch.float32)
        acts = {k: a.float() for k, a in self.tap(self.transform(imgs) if self.transform else imgs).items()}
        maxima = {}
        for name, a in acts.items():
            hi = a.amax(dim=(2, 3))  # spatial maxima (top images); NaN propagates into them
            if not torch.isfinite(hi).all():
                raise DissectionError(f"layer {name!r} produced NaN/Inf on images {indices[:5]}...")
            maxima[name] = hi
        grouped = {g: _group_cat(acts, m) for g, m in self.groups.items()}
        return grouped, {g: _group_cat(maxima, m) for g, m in self.groups.items()}, maxima, batch, len(indices)

    # ------------------------------------------------------------------ pass 1: thresholds
    def threshold_pass(self) -> dict[str, torch.Tensor]:
        """Per group (C_g,) thresholds: from the checkpoint, or streamed (and, while it fits in cache_bytes, a
        compact cache for pass 2: the block tables of every group above the quantile's running lower bound, and
        the encoded labels)."""
        thr_file = checkpoint_path(self.ckpt_dir / "thresholds.safetensors") if self.ckpt_dir else None
        # the cache needs a running lower bound of each threshold: exact estimators only
        use_cache = self.cache_bytes > 0 and all(e.exact for e in self.thr_pass.estimators.values())
        self.cache: dict[int, _CacheEntry] | None = {} if use_cache else None
        self.cached = 0
        self.cache_lock = threading.Lock()
        # per group, the highest lower bound of the final threshold any worker has (valid for all: each worker's
        # k-th largest can only be lower than the final one); workers feed only values above it (a "floor") and the
        # cache is pruned with it
        self.floors: dict[str, torch.Tensor] = {}
        self.floor_lock = threading.Lock()
        if thr_file is not None and thr_file.exists():
            state, meta = load_state(thr_file)
            if meta.get("fingerprint") != json.loads(json.dumps(self.fingerprint)):
                raise DissectionError(f"checkpoint {thr_file} belongs to a different dissection; delete "
                                      f"{self.ckpt_dir} to start over")
            self.cache = None
            return {g: torch.cat([state[m] for m in members]).to(self.dev) for g, members in self.groups.items()}
        info = run_batches(self.n, self.batch_size, self._step1, accumulator=self.thr_pass,
                           checkpoint=self.ckpt_dir / "pass1.safetensors" if self.ckpt_dir else None,
                           every=self.checkpoint_every, fingerprint=self.fingerprint, desc="dissect: thresholds",
                           show_progress=self.show_progress, workers=self.lanes)
        if info.resumed_at > 0:
            self.cache = None
        self.thr_pass.fold_lanes()
        self.thr_pass.merge_across_processes()
        thresholds = {g: e.result().to(self.dev) for g, e in self.thr_pass.estimators.items()}
        if thr_file is not None:
            per_layer = {m: thresholds[g][self.offset[m]:self.offset[m] + self.shapes[m][0]]
                         for g, ms in self.groups.items() for m in ms}
            save_state(thr_file, per_layer, {"fingerprint": self.fingerprint})
        return thresholds

    def _step1(self, indices: list[int], batch_no: int) -> None:
        estimators = self.thr_pass.lanes[worker_index()]
        acts, group_max, maxima, batch, b = self.load(indices)
        tables: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        guesses: dict[str, torch.Tensor | None] = {}
        for g, a in acts.items():
            est = estimators[g]
            self._feed(g, est, a, group_max[g], tables, guesses)
            if est.exact:
                with self.floor_lock:  # any worker's bound is a lower bound of the final threshold: keep the highest
                    low = est.lower_bound
                    self.floors[g] = torch.maximum(self.floors[g], low) if g in self.floors else low
        if self.cache is not None:
            self._keep(batch_no, batch, b, tables, maxima, guesses)

    def _feed(self, g: str, est: _Estimator, a: torch.Tensor, top: torch.Tensor,
              tables: dict[str, tuple[torch.Tensor, torch.Tensor]], guesses: dict[str, torch.Tensor | None]) -> None:
        """Feed group ``g``'s activations ``a`` (B, C_g, h, w) to its estimator; with a cache, put the group's
        block table and the bound it was built with into ``tables`` / ``guesses``."""
        cells = a.shape[0] * a.shape[2] * a.shape[3]  # values per unit in this batch
        caching, up = self.cache is not None, self.upsamplers[g]
        if self.fused and est.exact:
            # one pass: every value above the running bound into the exact top-k buffer, the table above a guess
            floor = self.floors[g].numpy() if self.lanes > 1 and g in self.floors else None  # other workers' bound
            if est.seen == 0:  # the first batch: no guess yet; its table is built once it is fed
                sample = a[::max(1, a.shape[0] // 16)].transpose(0, 1).reshape(a.shape[1], -1)
                est.feed(lambda buf: up.scan(a, None, buf, top), cells, sample, floor)
                guesses[g] = est.likely_bound() if caching else None
                table = up.block_table(a, guesses[g], top) if caching else None
            else:
                guesses[g] = guess = est.likely_bound() if caching else None
                table = est.feed(lambda buf: up.scan(a, guess, buf, top), cells, floor=floor)
            if table is not None:
                tables[g] = table
        elif not est.exact or not est.full:
            est.update(a.transpose(0, 1))
            if caching:
                guesses[g] = est.lower_bound
                tables[g] = up.block_table(a, guesses[g], top)
        else:  # only values above the running k-th largest can enter the top k
            bound = est.lower_bound
            if caching:
                guesses[g] = bound
                tables[g] = coords, corners = up.block_table(a, bound)
                values = corners[0]  # every cell above the bound is the first corner of its block
            else:
                a = a.contiguous()
                coords = self.backend.nonzero_coords(self.backend.greater(a, bound).view(a.shape[0], a.shape[1], -1))
                values = self.backend.take(a.view(-1), (coords[0] * a.shape[1] + coords[1]) * a[0, 0].numel()
                                           + coords[2])
            est.update(_pack_by_unit(coords, values, bound, a.shape, self.backend), seen=cells)

    def _keep(self, batch_no: int, batch: Any, b: int, tables: dict[str, tuple[torch.Tensor, torch.Tensor]],
              maxima: dict[str, torch.Tensor], guesses: dict[str, torch.Tensor | None]) -> None:
        """Cache one batch for pass 2 (encoded labels, block tables, maxima, bounds); give the cache up when even
        pruned with the risen bounds it exceeds ``cache_bytes``."""
        labels = self.encoder.encode(batch, b)
        size = labels.nbytes() + sum(t.numel() * t.element_size() for t in [
            *maxima.values(), *(x for table in tables.values() for x in table)])
        with self.cache_lock:
            if self.cache is None:
                return
            self.cache[batch_no] = (tables, maxima, labels, guesses)
            self.cached += size
            if self.cached > self.cache_bytes:  # drop blocks the risen bounds exclude; give up if still too big
                with self.floor_lock:
                    bounds = dict(self.floors)
                self.cached = _prune_cache(list(self.cache.values()), bounds, self.backend)
                if self.cached > self.cache_bytes:
                    self.cache = None

    # ------------------------------------------------------------------ pass 2: counts
    def tally_pass(self, thresholds: dict[str, torch.Tensor]) -> _TallyPass:
        """Integer counts over every image (one tally per worker, summed after: exact in any order)."""
        self.thresholds = thresholds
        layer_units = {name: self.shapes[name][0] for name in self.names}
        self.tallies = _Lanes([_TallyPass(self.units, layer_units, self.n_cols, len(self.cats), self.top_n, self.dev,
                                          self.backend) for _ in range(self.lanes)])
        run_batches(self.n, self.batch_size, self._step2, accumulator=self.tallies,
                    checkpoint=self.ckpt_dir / "pass2.safetensors" if self.ckpt_dir else None,
                    every=self.checkpoint_every, fingerprint=self.fingerprint, desc="dissect: tally",
                    show_progress=self.show_progress, workers=self.lanes)
        tally = self.tallies.fold()
        tally.merge_across_processes()
        return tally

    def _step2(self, indices: list[int], b: int) -> None:
        tally, thresholds = self.tallies.parts[worker_index()], self.thresholds
        # a cached table holds the blocks above the bound it was built with; when a guessed bound turned out
        # above a unit's final threshold (data not exchangeable), the batch is run through the model again
        entry = self.cache.pop(b, None) if self.cache is not None else None  # (release memory as we go)
        if entry is not None and all(bool((guesses <= thresholds[g]).all()) for g, guesses in entry[3].items()):
            tables, maxima, labels, _ = entry
        else:
            acts, group_max, maxima, batch, nb = self.load(indices)
            labels = self.encoder.encode(batch, nb)
            tables = {g: self.upsamplers[g].block_table(a, thresholds[g], group_max[g]) for g, a in acts.items()}
            del acts
        idx = torch.as_tensor([self.pick[i] for i in indices], device=self.dev)

        def tally_group(g: str) -> None:
            _tally_layer(tables[g], self.units[g], thresholds[g], self.upsamplers[g], labels, tally.inter[g],
                         tally.act[g], self.max_elements)

        # layer groups write disjoint counters: on a multi-core CPU they are tallied side by side (NumPy
        # gathers and torch kernels release the GIL); the integer counts do not depend on the order
        if self.pool is not None and not self.fused:
            for future in [self.pool.submit(tally_group, g) for g in self.groups]:
                future.result()
        else:
            for g in self.groups:
                tally_group(g)
        for name in self.names:
            tally.add_top(name, maxima[name], idx)
        tally.label_pixels += labels.label_pixels
        tally.annotated += labels.annotated.sum(0).round().long()

    # ------------------------------------------------------------------ result
    def result(self, thresholds: dict[str, torch.Tensor], tally: _TallyPass) -> DissectionResult:
        """IoU per unit and concept from the counts (NetDissect's dataset-level definition)."""
        cats, concepts = self.cats, self.concepts
        annotated = {c: int(v) for c, v in zip(cats, tally.annotated.tolist(), strict=True)}
        if self.categories is not None:
            empty = [c for c, v in annotated.items() if v == 0]
            if empty:
                raise DissectionError(f"dataset has no masks for categor{'y' if len(empty) == 1 else 'ies'} "
                                      f"{empty}: no image is annotated in it")
        concept_cols = torch.tensor([c[0] for c in concepts])
        cat_of_col = torch.tensor([cats.index(c[2]) for c in concepts])
        label_pixels = tally.label_pixels.cpu()[concept_cols]
        results = {}
        group_of = {m: g for g, ms in self.groups.items() for m in ms}
        for name in self.names:
            g, lo, hi = group_of[name], self.offset[name], self.offset[name] + self.shapes[name][0]
            inter = tally.inter[g][lo:hi].cpu()[:, concept_cols]
            layer_act = tally.act[g][lo:hi].cpu()
            act = layer_act[:, cat_of_col]
            iou = inter.double() / (act.double() + label_pixels.double() - inter.double() + 1e-10)
            best_iou, best = iou.max(dim=1)
            results[name] = LayerDissection(
                name=name, thresholds=thresholds[g][lo:hi].float().cpu(), intersection=inter, activation=layer_act,
                iou=iou, best_concept=best, best_iou=best_iou, top_images=tally.top_idx[name].cpu(),
                top_values=tally.top_val[name].cpu(),
            )
        exact = {m: self.thr_pass.estimators[g].exact for m, g in group_of.items()}
        files = getattr(self.dataset, "images", None)  # a Broden directory's image file names (index.csv order)
        rows = sorted({int(i) for d in results.values() for i in d.top_images.flatten().tolist() if i >= 0})
        names = {i: str(files[i]) for i in rows} if isinstance(files, Sequence) and not isinstance(files, str) \
            else {}
        root = getattr(self.dataset, "root", None)
        return DissectionResult(
            layers=results, concept_numbers=[c[0] for c in concepts], concept_names=[c[1] for c in concepts],
            concept_categories=[c[2] for c in concepts], categories=cats, label_pixels=label_pixels,
            annotated_images=annotated, n_images=self.n, quantile=self.quantile, iou_threshold=self.iou_threshold,
            seg_size=self.seg, exact_thresholds=exact, model=model_signature(self.model), image_names=names,
            data=str(root) if root is not None else "",
        )


class Dissector:
    """Network Dissection as an estimator (scikit-learn style): every option an explicit constructor parameter (the
    keywords of :func:`dissect`), ``fit(model, dataset)`` returns self, the learned result in ``result_`` (a
    :class:`DissectionResult`); :meth:`get_params` / :meth:`set_params` as in scikit-learn."""

    def __init__(self, layers: str | Sequence[str], *, quantile: float = 0.005, iou_threshold: float = 0.04,
                 batch_size: int = 32, device: str | torch.device = "auto",
                 transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 categories: Sequence[str] | None = None, checkpoint: str | os.PathLike | None = None,
                 checkpoint_every: int = 10, seg_size: tuple[int, int] | None = None, top_n: int = 8,
                 cache_bytes: int = 1 << 28, quantile_memory: int = 1 << 28, max_elements: int = 1 << 24,
                 show_progress: bool | None = None, workers: int | None = None, backend: Backend | None = None
                 ) -> None:
        self.layers, self.quantile, self.iou_threshold, self.batch_size = layers, quantile, iou_threshold, batch_size
        self.device, self.transform, self.categories, self.checkpoint = device, transform, categories, checkpoint
        self.checkpoint_every, self.seg_size, self.top_n, self.cache_bytes = checkpoint_every, seg_size, top_n, \
            cache_bytes
        self.quantile_memory, self.max_elements, self.show_progress = quantile_memory, max_elements, show_progress
        self.workers, self.backend = workers, backend

    @classmethod
    def _param_names(cls) -> list[str]:
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor parameters and their values."""
        return {name: getattr(self, name) for name in self._param_names()}

    def set_params(self, **params: Any) -> Dissector:
        """Change constructor parameters (an unknown name raises ``ValueError`` listing the valid ones)."""
        valid = self._param_names()
        unknown = [k for k in params if k not in valid]
        if unknown:
            raise ValueError(f"Dissector has no parameter {', '.join(map(repr, unknown))}; valid: {', '.join(valid)}")
        for k, v in params.items():
            setattr(self, k, v)
        return self

    def fit(self, model: nn.Module, dataset: SegmentationDataset, indices: Sequence[int] | None = None) -> Dissector:
        """Dissect ``model`` over ``dataset`` (or its images ``indices``); sets ``result_``, returns self."""
        params = self.get_params()
        self.result_ = dissect(model, dataset, params.pop("layers"), indices=indices, **params)
        return self
