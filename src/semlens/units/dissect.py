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
import hashlib
import inspect
import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semlens.artefacts import model_signature
from semlens.layers import frozen, resolve_layers
from semlens.runtime import resolve_device
from semlens.streaming import (
    ForwardTap,
    checkpoint_path,
    forward_until,
    load_state,
    run_batches,
    save_state,
    worker_index,
)
from semlens.units.backend import Backend
from semlens.units.dissect_passes import (
    _CacheEntry,
    _Estimator,
    _LabelEncoder,
    _Lanes,
    _pack_by_unit,
    _prune_cache,
    _tally_layer,
    _TallyPass,
    _ThresholdPass,
)
from semlens.units.dissection_result import DissectionResult, LayerDissection
from semlens.units.quantile import make_quantile_estimator
from semlens.units.segmentation import (
    DissectionError,
    SegmentationBatch,
    SegmentationDataset,
    TensorSegmentationDataset,
    _check_images,
)
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


# ----------------------------------------------------------------------------------------------
# labels: per batch, a set of concept numbers per pixel


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
            self.cache[batch_no] = _CacheEntry(tables, maxima, labels, guesses)
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
