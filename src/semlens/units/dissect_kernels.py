"""Fused CPU kernels for dissection's sparse bilinear upsampling (numba; optional).

The vectorized tensor path in :mod:`semlens.units.dissect` builds and consumes block tables with a
dozen elementwise passes, gathers and ``nonzero`` calls over temporary arrays; on a CPU those
temporaries, not arithmetic, dominate. These kernels do the same work in one pass each, with the
same float64 formula in the same operation order, so their integer counts are identical (tested):

* :func:`block_table` — blocks of a (B, C, h, w) activation tensor with a corner above a per-unit
  bound: coords (3, n) rows (image, unit, cell y·w + x) in ascending order and corners (4, n) float32.
* :func:`tally` — evaluates the upsampled value of every pixel of every block with a corner above its
  unit's threshold, and for the pixels above it counts per unit × concept intersections (int64, added
  in place) and per image × unit active pixels.

Both release the GIL and split their work over ``workers`` threads (independent planes / chunks of
blocks with private counters), so they parallelise without numba's threading layer. CUDA tensors
keep the tensor path. ``AVAILABLE`` is False when numba cannot be imported; the tensor path is then
used everywhere.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

AVAILABLE = importlib.util.find_spec("numba") is not None
_compiled: dict[str, Callable[..., Any]] = {}
_compile_lock = threading.Lock()


def _jit(name: str) -> Callable[..., Any]:
    """The numba-compiled kernel ``name`` (compiled on first use, cached on disk by numba; numba is imported
    only then, so importing semlens does not pay for it)."""
    with _compile_lock:  # pool threads may ask at once
        if not _compiled:
            from numba import njit

            jit = njit(cache=True, nogil=True)
            _compiled.update({f.__name__: jit(f) for f in (_scan, _tally_blocks, _encode_channels)})
    return _compiled[name]


__all__ = ["AVAILABLE", "Axes", "encode_pixels", "scan", "tally"]


def _scan(acts, plane_max, value_bound, block_bound, units, u_lo, u_hi, coords, corners, values, n_values):
    """Units u_lo..u_hi of every image of ``acts`` (planes image·units + unit, (h, w) each, maxima plane_max),
    one pass:

    * blocks with a corner above block_bound[unit] -> coords/corners while they fit (returns how many
      there are; the caller retries with room when more);
    * cells above value_bound[unit] -> values[unit, n_values[unit]++] while they fit (n_values counts all).
    """  # pragma: no cover - compiled
    n_planes, h, w = acts.shape
    images = n_planes // units
    cap, cap_v = coords.shape[1], values.shape[1]
    colmax = np.empty(w, dtype=acts.dtype)
    j = 0
    for u in range(u_lo, u_hi):
        n_values[u] = 0
    for b in range(images):  # image-major: the planes of a span are read in memory order
        for u in range(u_lo, u_hi):
            tb, tv = block_bound[u], value_bound[u]
            t = min(tb, tv)
            nv = n_values[u]
            p = b * units + u
            if plane_max[p] <= t:  # (most planes of small maps) no cell of this plane is above t
                continue
            for y in range(h):
                y1 = min(y + 1, h - 1)
                hits = 0
                for x in range(w):  # branch-free (vectorised): the max of the two rows; any above min(tb, tv)?
                    v = max(acts[p, y, x], acts[p, y1, x])
                    colmax[x] = v
                    hits += v > t
                if hits == 0:  # most rows: nothing to record
                    continue
                for x in range(w):
                    a00 = acts[p, y, x]
                    if a00 > tv:
                        if nv < cap_v:
                            values[u, nv] = a00
                        nv += 1
                    x1 = min(x + 1, w - 1)
                    if colmax[x] > tb or colmax[x1] > tb:
                        if j < cap:
                            coords[0, j] = b
                            coords[1, j] = u
                            coords[2, j] = y * w + x
                            corners[0, j] = a00
                            corners[1, j] = acts[p, y, x1]
                            corners[2, j] = acts[p, y1, x]
                            corners[3, j] = acts[p, y1, x1]
                        j += 1
            n_values[u] = nv
    return j


def _tally_blocks(coords, corners, thr, w, row_start, row_len, ly, col_start, col_len, lx, sw, labels, plane,
                  lo, hi, inter, count):  # pragma: no cover - compiled
    """Blocks lo..hi: add active pixels to inter[unit, label] (every label channel) and count[image, unit]."""
    n_lab = labels.shape[1]
    for j in range(lo, hi):
        u = coords[1, j]
        t = thr[u]
        c0, c1, c2, c3 = np.float64(corners[0, j]), np.float64(corners[1, j]), np.float64(corners[2, j]), \
            np.float64(corners[3, j])
        if not (c0 > t or c1 > t or c2 > t or c3 > t):
            continue
        b = coords[0, j]
        cell = coords[2, j]
        y, x = cell // w, cell % w
        base = b * plane
        # the value is bilinear in (ly, lx), both increasing within a block: along a row its maximum is at
        # an end column, over the block at a vertex. Rows / blocks clearly below t are skipped (the margin is
        # far above the rounding error of the formula; the pixels evaluated below use the exact formula)
        low = t - 1e-9 * max(max(abs(c0), abs(c1)), max(abs(c2), abs(c3)))
        a, z = lx[col_start[x]], lx[col_start[x] + col_len[x] - 1]
        top_a, bottom_a = (1 - a) * c0 + a * c1, (1 - a) * c2 + a * c3
        top_z, bottom_z = (1 - z) * c0 + z * c1, (1 - z) * c2 + z * c3
        r, s = ly[row_start[y]], ly[row_start[y] + row_len[y] - 1]
        if max(max((1 - r) * top_a + r * bottom_a, (1 - r) * top_z + r * bottom_z),
               max((1 - s) * top_a + s * bottom_a, (1 - s) * top_z + s * bottom_z)) < low:
            continue
        for ii in range(row_len[y]):
            i = row_start[y] + ii
            wy = ly[i]
            if max((1 - wy) * top_a + wy * bottom_a, (1 - wy) * top_z + wy * bottom_z) < low:
                continue
            for kk in range(col_len[x]):
                k = col_start[x] + kk
                wx = lx[k]
                top = (1 - wx) * c0 + wx * c1
                bottom = (1 - wx) * c2 + wx * c3
                if (1 - wy) * top + wy * bottom > t:
                    count[b, u] += 1
                    pix = base + i * sw + k
                    for q in range(n_lab):
                        inter[u, labels[pix, q]] += 1


def _encode_channels(labels, image, k0, b_lo, b_hi, out, hist):  # pragma: no cover - compiled
    """Channels k0.. of ``out`` (B·P, Kp) for images b_lo..b_hi from ``labels`` (B, K, P): a concept number that
    an earlier channel of the same pixel or the image's whole-image labels (B, Ki) already hold becomes 0
    (counted once); ``hist`` (n,) counts the written numbers. Returns −1, or the first number outside
    [0, n) (nothing valid is promised then)."""
    B, K, P = labels.shape
    n = hist.shape[0]
    for k in range(K):
        for b in range(b_lo, b_hi):
            for p in range(P):  # contiguous in labels
                row = b * P + p
                v = labels[b, k, p]
                if v < 0 or v >= n:
                    return v
                if v != 0:
                    for j in range(k0 + k):
                        if out[row, j] == v:
                            v = 0
                            break
                    for i in range(image.shape[1]):
                        if image[b, i] == v:
                            v = 0
                            break
                out[row, k0 + k] = v
                hist[v] += 1
    return -1


def _spans(n: int, workers: int) -> list[tuple[int, int]]:
    step = -(-n // max(1, workers))
    return [(s, min(n, s + step)) for s in range(0, n, max(1, step))] or [(0, 0)]


def _run(pool: concurrent.futures.Executor | None, fn, spans: list[tuple[int, int]]) -> None:
    """fn(k, lo, hi) for every span k, on the pool's threads when there is one and several spans."""
    if pool is None or len(spans) == 1:
        for k, (lo, hi) in enumerate(spans):
            fn(k, lo, hi)
        return
    for f in [pool.submit(fn, k, lo, hi) for k, (lo, hi) in enumerate(spans)]:
        f.result()


def scan(acts: torch.Tensor, value_bound: torch.Tensor | None, block_bound: torch.Tensor | None,
         pool: concurrent.futures.Executor | None = None, workers: int = 1, hint: tuple[int, int] = (0, 0),
         maxima: torch.Tensor | None = None) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, torch.Tensor | None]:
    """One pass over ``acts`` (B, C, h, w) float32 (CPU): a block table and/or the values above a bound.

    block_bound (C,): blocks with a corner cell (y|y+1, x|x+1, clamped) above it, as coords (3, n) int16
    (int32 when a size exceeds 32767) rows (image, unit, cell y·w + x), ascending within each thread's range
    of units, and corners (4, n) float32: the table of :meth:`_SparseUpsampler.block_table`; None: no table.
    value_bound (C,): the cells above it, packed per unit as (C, m) float32 with −inf padding; None: none.
    ``hint``: expected (blocks, values per unit), e.g. the previous batch's, to size the outputs in one go.
    ``maxima``: (B, C) spatial maxima of ``acts`` if already known (planes below both bounds are skipped).
    """
    B, C, h, w = acts.shape
    a = acts.detach().float().contiguous().view(B * C, h, w).numpy()
    top = acts.detach().float().amax(dim=(2, 3)) if maxima is None else maxima.detach().float()
    plane_max = top.cpu().contiguous().view(-1).numpy()
    inf = torch.full((C,), float("inf"))
    tb = (inf if block_bound is None else block_bound.detach().float().cpu()).contiguous().numpy()
    tv = (inf if value_bound is None else value_bound.detach().float().cpu()).contiguous().numpy()
    dtype = np.int16 if max(B, C, h * w) < 2**15 else np.int32
    spans = _spans(C, workers)
    n_values = np.zeros(C, dtype=np.int64)
    cells = B * C * h * w
    # output sizes: a guess (the hint with a margin, else 1/8 of the cells), exact on a second try
    room = [0 if block_bound is None else max(1024, hint[0] * 5 // 4 if hint[0] else cells // 8) * (hi - lo) // C
            for lo, hi in spans]
    room_v = 0 if value_bound is None else max(16, hint[1] * 5 // 4 if hint[1] else B * h * w // 8)
    def attempt(room: list[int], room_v: int) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, list[int]]:
        vals = np.empty((C, room_v), dtype=np.float32)
        parts = [(np.empty((3, r), dtype), np.empty((4, r), np.float32)) for r in room]
        found = [0] * len(spans)

        def run(k: int, lo: int, hi: int) -> None:
            found[k] = _jit("_scan")(a, plane_max, tv, tb, C, lo, hi, parts[k][0], parts[k][1], vals, n_values)

        _run(pool, run, spans)
        return parts, vals, found

    for _ in range(2):
        parts, vals, found = attempt(room, room_v)
        most = int(n_values.max()) if C else 0
        if all(f <= r for f, r in zip(found, room, strict=True)) and most <= room_v:
            break
        room, room_v = found, max(room_v, most)
    vals = vals[:, :most]
    vals[np.arange(most)[None, :] >= n_values[:, None]] = -np.inf  # pad each unit's row
    parts = [(c[:, :f], k[:, :f]) for (c, k), f in zip(parts, found, strict=True)]
    table = None
    if block_bound is not None:
        if len(parts) == 1:
            coords, corners = np.ascontiguousarray(parts[0][0]), np.ascontiguousarray(parts[0][1])
        else:
            coords, corners = np.concatenate([c for c, _ in parts], 1), np.concatenate([c for _, c in parts], 1)
        table = torch.from_numpy(coords), torch.from_numpy(corners)
    return table, (torch.from_numpy(vals) if value_bound is not None else None)


class Axes:
    """Per source index of one axis: the contiguous run of output indices that read it first, and their weights."""

    def __init__(self, i0: torch.Tensor, lam: torch.Tensor, n_in: int) -> None:
        counts = torch.bincount(i0, minlength=n_in)
        self.length = counts.numpy().astype(np.int64)
        self.start = (torch.cumsum(counts, 0) - counts).numpy().astype(np.int64)  # i0 is non-decreasing
        self.weight = lam.double().contiguous().numpy()


def tally(coords: torch.Tensor, corners: torch.Tensor, thresholds: torch.Tensor, w: int, rows: Axes, cols: Axes,
          seg: tuple[int, int], labels: torch.Tensor, images: int, inter: torch.Tensor,
          pool: concurrent.futures.Executor | None = None, workers: int = 1) -> torch.Tensor:
    """Add one block table's active pixels to ``inter`` (units, n_cols) int64 in place; return (images, units) int64
    active pixels per image and unit.

    A pixel is active when ``(1−ly)·((1−lx)·c00 + lx·c01) + ly·((1−lx)·c10 + lx·c11) > T[unit]`` in float64.
    labels: (images · sh · sw, Kp) concept numbers per pixel (each channel counted).
    """
    units, n_cols = inter.shape
    c = coords.numpy()
    k = corners.numpy()
    thr = thresholds.detach().double().contiguous().numpy()
    lab = labels.contiguous().numpy()
    plane = seg[0] * seg[1]
    spans = _spans(c.shape[1], workers if c.shape[1] >= 4096 else 1)
    # one span adds straight into ``inter``; several keep private counters (summed after)
    inters = inter.numpy()[None] if len(spans) == 1 else np.zeros((len(spans), units, n_cols), dtype=np.int64)
    counts = np.zeros((len(spans), images, units), dtype=np.int64)
    kernel = _jit("_tally_blocks")
    _run(pool, lambda j, lo, hi: kernel(c, k, thr, w, rows.start, rows.length, rows.weight, cols.start, cols.length,
                                        cols.weight, seg[1], lab, plane, lo, hi, inters[j], counts[j]), spans)
    if len(spans) > 1:
        inter += torch.from_numpy(inters.sum(0))
    return torch.from_numpy(counts.sum(0))


def encode_pixels(maps: list[tuple[str, torch.Tensor]], image: torch.Tensor, n_numbers: int, dtype: torch.dtype,
                  pool: concurrent.futures.Executor | None = None, workers: int = 1
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Deduplicated per-pixel concept sets in one pass (the tensor path: ``_LabelEncoder.encode``).

    maps: (category, (B, K, sh, sw) integer concept numbers) in channel order; image: (B, Ki) int64
    deduplicated whole-image numbers. Returns pixel (B·sh·sw, ΣK) ``dtype`` and the (n_numbers,) int64
    histogram of its entries. Raises ValueError naming the category of a number outside [0, n_numbers).
    """
    B = image.shape[0]
    P = maps[0][1].shape[-2] * maps[0][1].shape[-1] if maps else 0
    total = sum(t.shape[1] for _, t in maps)
    out = np.empty((B * P, total), dtype=torch.empty(0, dtype=dtype).numpy().dtype)
    spans = _spans(B, workers if B * P * total >= 1 << 16 else 1)  # images per thread
    hists = np.zeros((len(spans), n_numbers), dtype=np.int64)
    img = image.detach().cpu().long().contiguous().numpy()
    bad = np.full(len(spans), -1, dtype=np.int64)
    k0 = 0
    for cat, t in maps:
        lab = t.detach().cpu().contiguous().view(B, t.shape[1], P).numpy()

        def run(j: int, lo: int, hi: int, lab: np.ndarray = lab, k0: int = k0) -> None:
            bad[j] = _jit("_encode_channels")(lab, img, k0, lo, hi, out, hists[j])

        _run(pool, run, spans)
        if (bad != -1).any():
            raise ValueError(f"pixel labels of {cat!r} hold concept number {int(bad[bad != -1][0])}, which is not in "
                             "the dataset's label table")
        k0 += t.shape[1]
    return torch.from_numpy(out), torch.from_numpy(hists.sum(0))
