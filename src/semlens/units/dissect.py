"""Network Dissection: which units of which layers detect which human concepts (Bau et al. 2017).

Two streamed passes over a Broden-format dataset (see ``docs/dissection.md``):

1. **Thresholds.** For every unit ``k`` of every probed layer, ``T_k`` is the ``1 − quantile`` quantile
   of its activations over every spatial location of every image (exact when the needed top values
   fit in ``quantile_memory`` bytes, otherwise a fixed-memory sketch with a documented error bound;
   :mod:`semlens.units.quantile`).
2. **Tally.** Activation maps are upsampled bilinearly (``align_corners=False``) to the mask
   resolution, binarised with ``S_k(x) > T_k`` and counted against the concept masks: per unit ×
   concept intersections (``bincount`` over ``unit · L + label`` keys of the active pixels), per unit ×
   category activated pixels restricted to images annotated in that category, and per concept
   label pixels, all in int64. A pixel carries a set of concepts (pixel-map entries of every chosen
   category plus the image's whole-image labels), each counted once.

``IoU[k, c] = I[k, c] / (A[k, cat(c)] + L[c] − I[k, c] + 1e-10)`` exactly as NetDissect-Lite. Each unit
is labelled with its best concept over all categories; it is a detector when that IoU exceeds
``iou_threshold``; a layer's unique detectors are the distinct concepts of its detectors.

Memory does not depend on the number of images; runs resume from a checkpoint directory; under
``torchrun`` each process takes a contiguous shard and integer counts are summed, so the result is
identical to a one-process run.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import inspect
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from semlens import distributed
from semlens.layers import frozen, resolve_layers
from semlens.runtime import resolve_device
from semlens.streaming import (
    all_gather_cat,
    checkpoint_path,
    forward_until,
    load_state,
    run_batches,
    save_state,
)
from semlens.units.quantile import ExactTopQuantile, HistogramQuantileSketch, make_quantile_estimator

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

    def save(self, out: str | os.PathLike) -> dict[str, Path]:
        """Write ``units.csv``, ``layers.csv`` and ``dissection.json`` to ``out``; return their paths."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"units": out / "units.csv", "layers": out / "layers.csv", "json": out / "dissection.json"}
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
# labels: per batch, a set of concept columns per pixel


@dataclass
class _Labels:
    pixel: torch.Tensor  # (B, Kp, P) int64 column + 1 (0 = none), deduplicated per pixel
    image: torch.Tensor  # (B, Ki) int64 column + 1, deduplicated per image
    annotated: torch.Tensor  # (B, n_categories) float64 0/1

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.pixel, self.image, self.annotated))


def _dedupe(labels: torch.Tensor) -> torch.Tensor:
    """Zero entries of channel k (dim 1) that repeat an earlier channel, so each concept counts once."""
    out = labels.clone()
    for k in range(1, labels.shape[1]):
        repeat = (labels[:, k:k + 1] == labels[:, :k]).any(1)
        out[:, k].masked_fill_(repeat, 0)
    return out


class _LabelEncoder:
    """Turns a batch's label maps into concept-number sets per pixel (0 = none)."""

    def __init__(self, categories: list[str], n_numbers: int, seg: tuple[int, int], device: torch.device):
        self.categories, self.n_numbers, self.seg, self.device = categories, n_numbers, seg, device

    def _cols(self, t: torch.Tensor, where: str) -> torch.Tensor:
        t = t.to(self.device, torch.long)
        if t.numel():
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= self.n_numbers:
                bad = hi if hi >= self.n_numbers else lo
                raise DissectionError(f"{where} holds concept number {bad}, which is not in the dataset's label table")
        return t

    def encode(self, batch: Any, b: int) -> _Labels:
        P = self.seg[0] * self.seg[1]
        pix, img, ann = [], [], []
        for cat in self.categories:
            t = (getattr(batch, "pixel", None) or {}).get(cat)
            if t is not None and t.numel():
                if t.ndim != 4 or t.shape[0] != b:
                    raise DissectionError(f"pixel labels of {cat!r} must be (B, K, sh, sw), got {tuple(t.shape)}")
                if tuple(t.shape[-2:]) != self.seg:
                    raise DissectionError(f"masks of category {cat!r} are {tuple(t.shape[-2:])}, expected "
                                          f"{self.seg} (mismatched mask size)")
                pix.append(self._cols(t.reshape(b, -1, P), f"pixel labels of {cat!r}"))
            s = (getattr(batch, "image_level", None) or {}).get(cat)
            if s is not None and s.numel():
                img.append(self._cols(s.reshape(b, -1), f"whole-image labels of {cat!r}"))
            a = (getattr(batch, "annotated", None) or {}).get(cat)
            if a is None:
                a = torch.zeros(b, dtype=torch.bool, device=self.device)
                if t is not None and t.numel():
                    a = a | t.reshape(b, -1).to(self.device).gt(0).any(1)
                if s is not None and s.numel():
                    a = a | s.reshape(b, -1).to(self.device).gt(0).any(1)
            ann.append(a.to(self.device).reshape(b).bool())
        pixel = _dedupe(torch.cat(pix, 1)) if pix else torch.zeros(b, 0, P, dtype=torch.long, device=self.device)
        image = _dedupe(torch.cat(img, 1)) if img else torch.zeros(b, 0, dtype=torch.long, device=self.device)
        if pixel.shape[1] and image.shape[1]:  # a whole-image concept already covers every pixel
            covered = (pixel.unsqueeze(-1) == image[:, None, None, :]).any(-1)
            pixel = pixel.masked_fill(covered, 0)
        return _Labels(pixel, image, torch.stack(ann, 1).double())


# ----------------------------------------------------------------------------------------------
# accumulators


class _ThresholdPass:
    def __init__(self, estimators: dict[str, ExactTopQuantile | HistogramQuantileSketch]):
        self.estimators = estimators

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{n}/{k}": v for n, e in self.estimators.items() for k, v in e.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for n, e in self.estimators.items():
            e.load_state_dict({k.split("/", 1)[1]: v for k, v in state.items() if k.split("/", 1)[0] == n})

    def merge_across_processes(self) -> None:
        if not distributed.is_distributed():
            return
        for e in self.estimators.values():
            if isinstance(e, ExactTopQuantile):
                gathered = all_gather_cat(e.values.contiguous(), dim=1)
                e.values = e.values[:, :0]
                e.update(gathered)
            else:
                distributed.all_reduce_sum(e.counts)


class _TallyPass:
    def __init__(self, shapes: dict[str, int], n_cols: int, n_cats: int, top_n: int, device: torch.device):
        z = {"dtype": torch.int64, "device": device}
        self.inter = {n: torch.zeros(c, n_cols, **z) for n, c in shapes.items()}
        self.act = {n: torch.zeros(c, n_cats, **z) for n, c in shapes.items()}
        self.top_val = {n: torch.full((c, top_n), float("-inf"), device=device) for n, c in shapes.items()}
        self.top_idx = {n: torch.full((c, top_n), -1, **z) for n, c in shapes.items()}
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
        vals = torch.cat([self.top_val[name], maxima.t().float()], 1)
        idx = torch.cat([self.top_idx[name], indices.view(1, -1).expand(maxima.shape[1], -1)], 1)
        top = vals.topk(min(self.top_n, vals.shape[1]), dim=1)
        self.top_val[name], self.top_idx[name] = top.values, idx.gather(1, top.indices)

    def merge_across_processes(self) -> None:
        if not distributed.is_distributed():
            return
        for t in [self.label_pixels, self.annotated, *self.inter.values(), *self.act.values()]:
            distributed.all_reduce_sum(t)
        for n in self.top_val:
            vals = all_gather_cat(self.top_val[n], dim=1)
            idx = all_gather_cat(self.top_idx[n], dim=1)
            top = vals.topk(self.top_n, dim=1)
            self.top_val[n], self.top_idx[n] = top.values, idx.gather(1, top.indices)


def bilinear_axis(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices ``i0, i1`` (n_out,) int64 and weights ``lam`` (n_out,) float64 of 1-D bilinear
    resampling with ``align_corners=False`` (as ``F.interpolate``): ``out[i] = (1−lam)·in[i0] + lam·in[i1]``."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, src - i0


class _SparseUpsampler:
    """Bilinear upsampling (h, w) -> (sh, sw) evaluated only where it can exceed a threshold.

    Output pixel (i, j) is a convex combination of the source cells (i0(i) | i1(i), j0(j) | j1(j)),
    with i1 ∈ {i0, i0 + 1}. Grouping output pixels by (i0, j0) partitions them into blocks; block
    (y, x) can only hold a value above ``T`` when one of the cells (y|y+1, x|x+1) is above ``T``. So
    only blocks next to an active cell (about ``quantile`` of all cells) are evaluated, in float64,
    each output pixel at most once: O(active cells × scale²) work instead of O(units × sh × sw).
    """

    def __init__(self, h: int, w: int, seg: tuple[int, int], device: torch.device) -> None:
        self.seg = seg
        self.iy0, self.iy1, self.ly = (t.to(device) for t in bilinear_axis(h, seg[0]))
        self.ix0, self.ix1, self.lx = (t.to(device) for t in bilinear_axis(w, seg[1]))
        self.rows_of = self._blocks(self.iy0, h).to(device)  # (h, R)
        self.cols_of = self._blocks(self.ix0, w).to(device)  # (w, K)
        # per block: weights of its output rows/cols (0 in padding) and the second source index
        # NaN in padding slots: their values compare False with any threshold, no validity mask needed
        self.ly_block = torch.where(self.rows_of >= 0, self.ly[self.rows_of.clamp_min(0)], float("nan"))
        self.lx_block = torch.where(self.cols_of >= 0, self.lx[self.cols_of.clamp_min(0)], float("nan"))
        self.next_y = torch.clamp(torch.arange(h, device=device) + 1, max=h - 1)
        self.next_x = torch.clamp(torch.arange(w, device=device) + 1, max=w - 1)

    @staticmethod
    def _blocks(i0: torch.Tensor, n_in: int) -> torch.Tensor:
        """(n_in, R): output indices whose first source index is each input index (−1 padded)."""
        counts = torch.bincount(i0, minlength=n_in)
        width = max(1, int(counts.max()))
        table = torch.full((n_in, width), -1, dtype=torch.long)
        order = torch.argsort(i0, stable=True)
        slot = torch.arange(i0.numel()) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        table[i0[order], slot] = order
        return table

    def active_pixels(self, acts: torch.Tensor, thresholds: torch.Tensor,
                      max_elements: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield chunks of active pixels as (image, unit, pixel index) int64 triples, each pixel once.

        acts: (B, C, h, w); thresholds: (C,). A pixel is active when its upsampled value > threshold.
        """
        sw = self.seg[1]
        # block (y, x) needs evaluation when one of the cells (y|y+1, x|x+1) exceeds the threshold:
        # expand each active cell to the (up to) 4 blocks that read it, then deduplicate (sparse work)
        B, C, h, w = acts.shape
        cb, cu, cy, cx = (acts > thresholds.view(1, -1, 1, 1)).nonzero(as_tuple=True)
        dy = torch.tensor([0, -1, 0, -1], device=acts.device)
        dx = torch.tensor([0, 0, -1, -1], device=acts.device)
        ny, nx = cy.unsqueeze(1) + dy, cx.unsqueeze(1) + dx
        ok = (ny >= 0) & (nx >= 0)
        keys = (((cb * C + cu) * h).unsqueeze(1) + ny) * w + nx
        keys = torch.unique(keys[ok])
        b, rest = keys // (C * h * w), keys % (C * h * w)
        u, y, x = rest // (h * w), (rest % (h * w)) // w, rest % w
        flat = acts.reshape(-1)
        lyr, lxc = self.ly_block, self.lx_block
        R, K = self.rows_of.shape[1], self.cols_of.shape[1]
        chunk = max(1, max_elements // (R * K))
        for s in range(0, b.numel(), chunk):
            bs, us, ys, xs = b[s:s + chunk], u[s:s + chunk], y[s:s + chunk], x[s:s + chunk]
            base = (bs * C + us) * (h * w)
            y1, x1 = self.next_y[ys], self.next_x[xs]  # i1, j1 of the block (the block shares its 2x2 cells)
            a00, a01 = flat[base + ys * w + xs].double(), flat[base + ys * w + x1].double()
            a10, a11 = flat[base + y1 * w + xs].double(), flat[base + y1 * w + x1].double()
            lx, ly = lxc[xs], lyr[ys]  # (n, K), (n, R); padding slots hold NaN
            top = (1 - lx) * a00.unsqueeze(1) + lx * a01.unsqueeze(1)  # (n, K)
            bottom = (1 - lx) * a10.unsqueeze(1) + lx * a11.unsqueeze(1)
            val = (1 - ly).unsqueeze(2) * top.unsqueeze(1) + ly.unsqueeze(2) * bottom.unsqueeze(1)  # (n, R, K)
            k, r, c = (val > thresholds[us].double().view(-1, 1, 1)).nonzero(as_tuple=True)
            ysk, xsk = ys[k], xs[k]
            yield bs[k], us[k], self.rows_of[ysk, r] * sw + self.cols_of[xsk, c]


def _tally_layer(acts: torch.Tensor, thresholds: torch.Tensor, upsampler: _SparseUpsampler, labels: _Labels,
                 inter: torch.Tensor, act: torch.Tensor, max_elements: int) -> None:
    """Add one batch of one layer to the int64 counts (in place). acts: (B, C, h, w)."""
    B, C = acts.shape[:2]
    n_cols = inter.shape[1]
    for bb, uu, pix in upsampler.active_pixels(acts, thresholds, max_elements):
        pair = bb * C + uu
        count = torch.bincount(pair, minlength=B * C).view(B, C)  # active pixels per image and unit
        if labels.pixel.shape[1]:
            keys = (uu * n_cols).unsqueeze(1) + labels.pixel[bb, :, pix]
            inter += torch.bincount(keys.flatten(), minlength=C * n_cols).view(C, n_cols)
        cnt = count.t().double()  # (C, B)
        if labels.image.shape[1]:
            onehot = torch.zeros(B, n_cols, dtype=torch.float64, device=acts.device)
            onehot.scatter_(1, labels.image, 1.0)
            inter += (cnt @ onehot).round().long()
        act += (cnt @ labels.annotated).round().long()


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


def _check_images(images: Any, expected: tuple[int, ...] | None, indices: Sequence[int]) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise DissectionError(f"dataset images must be a (B, C, H, W) tensor, got {shape}")
    if expected is not None and tuple(images.shape[1:]) != expected:
        raise DissectionError(
            f"mismatched image size: images {indices[:3]}... are {tuple(images.shape[1:])}, the first image is "
            f"{expected}; resize the dataset to one size"
        )
    if not torch.isfinite(images).all():
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
) -> DissectionResult:
    """Dissect ``layers`` (dotted names, outputs (N, C, h, w)) of ``model`` over ``dataset``.

    dataset: ``semlens.world.BrodenDataset`` or anything with ``categories``, ``labels`` and
    ``load_batch(indices)`` returning images (B, 3, H, W) in [0, 1] and label maps (see
    :class:`SegmentationBatch`). ``transform`` maps images before the model (e.g. normalisation).
    ``categories``: subset of the dataset's categories (default all). ``seg_size``: mask resolution
    (default: the dataset's masks). ``checkpoint``: a directory; a killed run resumes from it.
    ``cache_bytes``: keep activations and encoded labels of the first pass in memory when they fit,
    so the second pass needs no forward; 0 streams twice. ``quantile_memory``: bytes for exact
    thresholds before falling back to the sketch. ``max_elements``: upsampled values per chunk.
    ``indices``: dissect only these images of ``dataset`` (e.g. a held-out split); ``top_images`` then
    hold dataset indices.
    The model's train/eval mode, ``requires_grad`` flags and device are restored on return.
    """
    names = list(resolve_layers(model, layers))
    if not 0.0 < quantile < 1.0:
        raise DissectionError(f"quantile must be in (0, 1), got {quantile}")
    if iou_threshold < 0:
        raise DissectionError(f"iou_threshold must be >= 0, got {iou_threshold}")
    if batch_size < 1:
        raise DissectionError(f"batch_size must be >= 1, got {batch_size}")
    dev = resolve_device(device)
    pick = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    n = len(pick)
    if n == 0:
        raise DissectionError("the dataset (or the chosen indices) is empty")
    if not all(0 <= i < len(dataset) for i in pick):
        raise DissectionError(f"indices must lie in [0, {len(dataset)}) for this dataset")
    try:
        takes_categories = "categories" in inspect.signature(dataset.load_batch).parameters
    except (TypeError, ValueError):
        takes_categories = False
    available = list(dataset.categories)
    cats = list(categories) if categories is not None else available
    missing = [c for c in cats if c not in available]
    if missing:
        raise DissectionError(f"dataset has no masks for categor{'y' if len(missing) == 1 else 'ies'} "
                              f"{missing}; it has {available}")
    concepts = [(int(num), name, cat) for num, name, cat in dataset.labels if int(num) > 0 and cat in cats]
    if not concepts:
        raise DissectionError(f"the dataset's label table has no concept in categories {cats}")
    max_num = max(int(num) for num, _, _ in dataset.labels)
    n_cols = max_num + 1  # counts are kept per global concept number; chosen concepts are read out at the end
    concept_cols = torch.tensor([c[0] for c in concepts])
    cat_of_col = torch.tensor([cats.index(c[2]) for c in concepts])
    ckpt_dir = Path(checkpoint) if checkpoint is not None else None

    with frozen(model), _on_device(model, dev), torch.no_grad():
        # probe one image: layer shapes, image size, mask size
        def read(rows: list[int]) -> Any:
            real = [pick[i] for i in rows]
            return dataset.load_batch(real, categories=cats) if takes_categories else dataset.load_batch(real)

        probe = read([0])
        images0 = _check_images(probe.images, None, [pick[0]])
        img_shape = tuple(images0.shape[1:])
        x0 = images0.to(dev, torch.float32)
        try:
            out0 = forward_until(model, transform(x0) if transform else x0, names)
        except (RuntimeError, TypeError) as err:
            raise DissectionError(f"the model cannot process images of size {img_shape}: {err}") from err
        shapes = {}
        for name in names:
            t = out0[name]
            if t.ndim != 4:
                raise DissectionError(f"layer {name!r} outputs shape {tuple(t.shape)}, not a spatial map "
                                      "(N, C, h, w); choose a convolutional layer")
            shapes[name] = tuple(t.shape[1:])
        if seg_size is None:
            seg_size = getattr(dataset, "seg_size", None)
            if seg_size is None:
                pix = [t for c, t in (probe.pixel or {}).items() if c in cats and t.numel()]
                seg_size = tuple(pix[0].shape[-2:]) if pix else tuple(img_shape[-2:])
        seg = (int(seg_size[0]), int(seg_size[1]))
        encoder = _LabelEncoder(cats, n_cols, seg, dev)
        fingerprint = {"layers": names, "shapes": {k: list(v) for k, v in shapes.items()}, "quantile": quantile,
                       "categories": cats, "concepts": len(concepts), "seg": list(seg), "image": list(img_shape),
                       "top_n": top_n, "quantile_memory": quantile_memory,
                       "indices": hashlib.sha1(torch.tensor(pick).numpy().tobytes()).hexdigest()}

        def load(indices: list[int]) -> tuple[dict[str, torch.Tensor], _Labels | None, Any]:
            batch = read(indices)
            imgs = _check_images(batch.images, img_shape, [pick[i] for i in indices]).to(dev, torch.float32)
            acts = forward_until(model, transform(imgs) if transform else imgs, names)
            for name, a in acts.items():
                if not (torch.isfinite(a.amax()) and torch.isfinite(a.amin())):
                    raise DissectionError(f"layer {name!r} produced NaN/Inf on images {indices[:5]}...")
            return acts, batch, len(indices)

        # pass 1: thresholds
        estimators = {name: make_quantile_estimator(c, n * h * w, quantile, dev, quantile_memory)
                      for name, (c, h, w) in shapes.items()}
        thr_pass = _ThresholdPass(estimators)
        thr_file = checkpoint_path(ckpt_dir / "thresholds.safetensors") if ckpt_dir else None
        cache: list[tuple[dict[str, torch.Tensor], _Labels]] | None = [] if cache_bytes > 0 else None
        cached = 0
        thresholds: dict[str, torch.Tensor]
        if thr_file is not None and thr_file.exists():
            state, meta = load_state(thr_file)
            if meta.get("fingerprint") != json.loads(json.dumps(fingerprint)):
                raise DissectionError(f"checkpoint {thr_file} belongs to a different dissection; delete "
                                      f"{ckpt_dir} to start over")
            thresholds = {name: state[name].to(dev) for name in names}
            cache = None
        else:
            def step1(indices: list[int], _b: int) -> None:
                nonlocal cache, cached
                acts, batch, b = load(indices)
                for name, a in acts.items():
                    estimators[name].update(a.transpose(0, 1).reshape(a.shape[1], -1))
                if cache is not None:
                    labels = encoder.encode(batch, b)
                    cached += labels.nbytes() + sum(a.numel() * a.element_size() for a in acts.values())
                    if cached <= cache_bytes:
                        cache.append((acts, labels))
                    else:
                        cache = None

            info = run_batches(n, batch_size, step1, accumulator=thr_pass,
                               checkpoint=ckpt_dir / "pass1.safetensors" if ckpt_dir else None,
                               every=checkpoint_every, fingerprint=fingerprint, desc="dissect: thresholds",
                               show_progress=show_progress)
            if info.resumed_at > 0:
                cache = None
            thr_pass.merge_across_processes()
            thresholds = {name: e.result().to(dev) for name, e in estimators.items()}
            if thr_file is not None:
                save_state(thr_file, thresholds, {"fingerprint": fingerprint})

        # pass 2: tally
        upsamplers = {name: _SparseUpsampler(h, w, seg, dev) for name, (_, h, w) in shapes.items()}
        tally = _TallyPass({k: v[0] for k, v in shapes.items()}, n_cols, len(cats), top_n, dev)

        def step2(indices: list[int], b: int) -> None:
            if cache is not None:
                acts, labels = cache[b]
                cache[b] = ({}, labels)  # release memory as we go
            else:
                acts, batch, nb = load(indices)
                labels = encoder.encode(batch, nb)
            idx = torch.as_tensor([pick[i] for i in indices], device=dev)
            for name, a in acts.items():
                _tally_layer(a, thresholds[name], upsamplers[name], labels, tally.inter[name], tally.act[name],
                             max_elements)
                tally.add_top(name, a.amax(dim=(2, 3)), idx)
            P = seg[0] * seg[1]
            tally.label_pixels += torch.bincount(labels.pixel.flatten(), minlength=n_cols)
            tally.label_pixels += P * torch.bincount(labels.image.flatten(), minlength=n_cols)
            tally.annotated += labels.annotated.sum(0).round().long()

        run_batches(n, batch_size, step2, accumulator=tally,
                    checkpoint=ckpt_dir / "pass2.safetensors" if ckpt_dir else None, every=checkpoint_every,
                    fingerprint=fingerprint, desc="dissect: tally", show_progress=show_progress)
        tally.merge_across_processes()

    annotated = {c: int(v) for c, v in zip(cats, tally.annotated.tolist(), strict=True)}
    if categories is not None:
        empty = [c for c, v in annotated.items() if v == 0]
        if empty:
            raise DissectionError(f"dataset has no masks for categor{'y' if len(empty) == 1 else 'ies'} {empty}: "
                                  "no image is annotated in it")
    label_pixels = tally.label_pixels.cpu()[concept_cols]
    results = {}
    for name in names:
        inter = tally.inter[name].cpu()[:, concept_cols]
        act = tally.act[name].cpu()[:, cat_of_col]
        iou = inter.double() / (act.double() + label_pixels.double() - inter.double() + 1e-10)
        best_iou, best = iou.max(dim=1)
        results[name] = LayerDissection(
            name=name, thresholds=thresholds[name].float().cpu(), intersection=inter, activation=tally.act[name].cpu(),
            iou=iou, best_concept=best, best_iou=best_iou, top_images=tally.top_idx[name].cpu(),
            top_values=tally.top_val[name].cpu(),
        )
    return DissectionResult(
        layers=results, concept_numbers=[c[0] for c in concepts], concept_names=[c[1] for c in concepts],
        concept_categories=[c[2] for c in concepts], categories=cats, label_pixels=label_pixels,
        annotated_images=annotated, n_images=n, quantile=quantile, iou_threshold=iou_threshold, seg_size=seg,
        exact_thresholds={k: isinstance(e, ExactTopQuantile) for k, e in estimators.items()},
    )


class Dissector:
    """scikit-learn style wrapper: configuration in the constructor, ``fit`` sets ``result_``."""

    def __init__(self, layers: str | Sequence[str], **options: Any) -> None:
        self.layers = layers
        self.options = options

    def fit(self, model: nn.Module, dataset: SegmentationDataset) -> Dissector:
        self.result_ = dissect(model, dataset, self.layers, **self.options)
        return self
