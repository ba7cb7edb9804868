"""The two passes of Network Dissection as objects that keep their state across batches (and checkpoints):
the label encoder, the threshold pass (quantile estimators per unit) and the tally pass (intersection and area
counts, top images), with the sparse tally kernels they call."""

from __future__ import annotations

import concurrent.futures
import copy
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from semlens import distributed
from semlens.streaming import (
    all_gather_cat,
)
from semlens.units import dissect_kernels
from semlens.units.backend import Backend
from semlens.units.quantile import QuantileEstimator
from semlens.units.segmentation import DissectionError
from semlens.units.upsample import _SparseUpsampler

#: the quantile estimators' one interface (exact top-k or fixed-memory sketch), :mod:`semlens.units.quantile`
_Estimator = QuantileEstimator



@dataclass
class _Labels:
    pixel: torch.Tensor  # (B * P, Kp) concept numbers (0 = none), deduplicated per pixel; uint8/int16/int32
    image: torch.Tensor  # (B, Ki) int64 concept numbers, deduplicated per image
    annotated: torch.Tensor  # (B, n_categories) float64 0/1
    label_pixels: torch.Tensor  # (n_numbers,) int64 labelled pixels per concept number in this batch

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.pixel, self.image, self.annotated, self.label_pixels))


class _CacheEntry(NamedTuple):
    """One batch of pass 1 kept for pass 2."""

    tables: dict[str, tuple[torch.Tensor, torch.Tensor]]  # per group: block coordinates and corner values
    maxima: dict[str, torch.Tensor]  # per layer: spatial maxima (B, C) for the top images
    labels: _Labels  # the batch's encoded concept labels
    bounds: dict[str, torch.Tensor | None]  # per group: the bound its block table was built with


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

