"""Fused CPU kernels for dissection's sparse bilinear upsampling (numba; optional).

The vectorized tensor path in :mod:`semlens.units.dissect` builds and consumes block tables with a
dozen elementwise passes, gathers and ``nonzero`` calls over temporary arrays; on a CPU those
temporaries, not arithmetic, dominate. These kernels do the same work in one pass each, with the
same float64 formula in the same operation order, so their integer counts are identical (tested):

* :func:`scan` — blocks of a (B, C, h, w) activation tensor with a corner above a per-unit bound
  (coords (3, n) rows (image, unit, cell y·w + x) and corners (4, n) float32), and, in the same pass,
  every cell above a unit's quantile bound appended to its row of an exact top-k buffer
  (:class:`TopBuffer`, cut in place when full).
* :func:`tally` — evaluates the upsampled value of every pixel of every block with a corner above its
  unit's threshold, and for the pixels above it counts per unit × concept intersections (int64, added
  in place) and per image × unit active pixels.
* :func:`encode_pixels` — deduplicated concept sets per pixel and their histogram.
* :func:`insert_top` — a batch's spatial maxima into the per-unit lists of top images.

They release the GIL and split their work over ``workers`` threads (independent units / chunks of
blocks / images with private counters), so they parallelise without numba's threading layer (and run
on one thread each when dissection runs whole batches on workers). CUDA tensors keep the tensor path.
``AVAILABLE`` is False when numba cannot be imported; the tensor path is then used everywhere.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import threading
from collections.abc import Callable
from dataclasses import dataclass
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
            for helper in (_select_top, _cut):  # called by the kernels: compiled first (in this order) and put
                globals()[helper.__name__] = _compiled[helper.__name__] = jit(helper)  # in the module's place
            _compiled.update({f.__name__: jit(f) for f in (_scan, _tally_blocks, _encode_channels, _keep_top,
                                                           _kth_largest, _cut_rows, _insert_top)})
    return _compiled[name]


__all__ = ["AVAILABLE", "Axes", "TopBuffer", "encode_pixels", "insert_top", "scan", "tally"]


def _select_top(row, n, k):  # pragma: no cover - compiled
    """Reorder row[:n] (n >= k >= 1) so that row[:k] holds its k largest values (Hoare's FIND); return their minimum."""
    lo, hi, target = 0, n - 1, k - 1
    while lo < hi:
        mid = (lo + hi) >> 1
        a, b, c = row[lo], row[mid], row[hi]
        pivot = max(min(a, b), min(max(a, b), c))  # median of three
        i, j = lo, hi
        while i <= j:  # descending: values > pivot to the left, < pivot to the right, ties on either side
            while row[i] > pivot:
                i += 1
            while row[j] < pivot:
                j -= 1
            if i <= j:
                row[i], row[j] = row[j], row[i]
                i += 1
                j -= 1
        if target <= j:
            hi = j
        elif target >= i:
            lo = i
        else:  # row[j+1 .. i-1] all equal the pivot and hold the target position
            break
    m = row[0]
    for t in range(1, k):
        m = min(m, row[t])
    return m


def _cut(row, n, k):  # pragma: no cover - compiled
    """Drop values of row[:n] (n > k) that cannot be among its k largest: returns (kept, level) with row[:kept]
    the values above ``level`` and kept >= k (so the row's k-th largest is above ``level``).

    One counting and one compacting pass around a pivot selected in a strided sample of 128 values, chosen to keep
    about k + (n − k)/8; Hoare's selection (exact k) only when the sample misleads.
    """
    m = min(n, 128)
    step = n // m
    sample = np.empty(m, dtype=row.dtype)
    for i in range(m):
        sample[i] = row[i * step]
    above = ((k + (n - k) // 8) * m) // n + 1  # sample values at or above the level: about k + (n − k)/8 of n
    if above < m:
        level = _select_top(sample, m, above)
        c = 0
        for i in range(n):  # branch-free (vectorised)
            c += row[i] > level
        if k <= c < n:
            j = 0
            for i in range(n):  # branch-free compaction
                v = row[i]
                row[j] = v
                j += v > level
            return j, level
    return k, _select_top(row, n, k)


def _cut_rows(values, count, k, limit, bound):  # pragma: no cover - compiled
    """Cut every row holding more than ``limit`` (> k) values (see :func:`_cut`); bound rises accordingly."""
    for u in range(values.shape[0]):
        if count[u] > limit:
            count[u], level = _cut(values[u], count[u], k)
            bound[u] = max(bound[u], level)


def _keep_top(values, count, k, u_lo, u_hi, bound):  # pragma: no cover - compiled
    """Rows u_lo..u_hi: cut values[u, :count[u]] to its min(k, count[u]) largest; bound[u] = their minimum once k."""
    for u in range(u_lo, u_hi):
        if count[u] >= k:
            bound[u] = max(bound[u], _select_top(values[u], count[u], k))
            count[u] = k


def _kth_largest(values, count, r, u_lo, u_hi, scratch, out):  # pragma: no cover - compiled
    """out[u] = the r-th largest of values[u, :count[u]] (count[u] >= r), for rows u_lo..u_hi (scratch: a row copy)."""
    for u in range(u_lo, u_hi):
        n = count[u]
        scratch[:n] = values[u, :n]
        out[u] = _select_top(scratch, n, r)


def _scan(acts, plane_max, block_bound, units, u_lo, u_hi, coords, corners, top, top_count, top_bound, k):
    """Units u_lo..u_hi of every image of ``acts`` (planes image·units + unit, (h, w) each, maxima plane_max),
    one pass:

    * blocks with a corner above block_bound[unit] -> coords/corners while they fit (returns how many
      there are; the caller retries with room when more);
    * cells above top_bound[unit] are appended to top[unit, top_count[unit]++] (an exact top-k buffer): a full
      row is first cut to its k largest values and top_bound[unit] rises to the smallest of them.
    """  # pragma: no cover - compiled
    n_planes, h, w = acts.shape
    images = n_planes // units
    cap, cap_v = coords.shape[1], top.shape[1]
    colmax = np.empty(w, dtype=acts.dtype)
    hits_b = np.empty(h, dtype=np.int64)
    hits_v = np.empty(h, dtype=np.int64)
    j = 0
    for b in range(images):  # image-major: the planes of a span are read in memory order
        for u in range(u_lo, u_hi):
            tb = block_bound[u]
            p = b * units + u
            if plane_max[p] <= min(tb, top_bound[u]):  # (most planes of small maps) nothing of this plane counts
                continue
            tv = top_bound[u]
            for y in range(h):  # cells above each bound per row (branch-free: vectorised)
                nb = 0
                nv = 0
                for x in range(w):
                    v = acts[p, y, x]
                    nb += v > tb
                    nv += v > tv
                hits_b[y] = nb
                hits_v[y] = nv
            for y in range(h):
                if hits_v[y] > 0:  # feed the row's values above tv
                    n = top_count[u]
                    if n + w > cap_v:  # not room for the whole row: drop what cannot be among the k largest
                        n, level = _cut(top[u], n, k)
                        tv = max(tv, level)
                        top_bound[u] = tv
                    if n + w <= cap_v:
                        for x in range(w):  # branch-free append
                            v = acts[p, y, x]
                            top[u, n] = v
                            n += v > tv
                    else:  # a row wider than the room left after a cut (tiny k): one value at a time
                        for x in range(w):
                            v = acts[p, y, x]
                            if v > tv:
                                if n == cap_v:
                                    n, level = _cut(top[u], n, k)
                                    tv = max(tv, level)
                                    top_bound[u] = tv
                                if v > tv:
                                    top[u, n] = v
                                    n += 1
                    top_count[u] = n
                y1 = min(y + 1, h - 1)
                if hits_b[y] == 0 and hits_b[y1] == 0:  # no block of this row has a corner above tb
                    continue
                for x in range(w):
                    colmax[x] = max(acts[p, y, x], acts[p, y1, x])
                for x in range(w):
                    x1 = min(x + 1, w - 1)
                    if colmax[x] > tb or colmax[x1] > tb:
                        if j < cap:
                            coords[0, j] = b
                            coords[1, j] = u
                            coords[2, j] = y * w + x
                            corners[0, j] = acts[p, y, x]
                            corners[1, j] = acts[p, y, x1]
                            corners[2, j] = acts[p, y1, x]
                            corners[3, j] = acts[p, y1, x1]
                        j += 1
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
        active = 0
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
                    active += 1
                    pix = base + i * sw + k
                    for q in range(n_lab):
                        inter[u, labels[pix, q]] += 1
        count[b, u] += active


def _encode_channels(labels, image, in_image, k0, b_lo, b_hi, out, hist, present):  # pragma: no cover - compiled
    """Channels k0.. of ``out`` (B·P, Kp) for images b_lo..b_hi from ``labels`` (B, K, P): a concept number that
    an earlier channel of the same pixel or the image's whole-image labels (B, Ki) already hold becomes 0
    (counted once); ``hist`` (n,) counts the written numbers. Returns −1, or the first number outside
    [0, n) (nothing valid is promised then).

    Masks are piecewise constant: a tight loop copies the numbers and finds runs of one number; each run
    is then checked once: the range, whether the image holds the number as a whole-image label
    (``in_image[v]``: any image of the batch does), and which earlier channels may hold it (``present[v]``:
    bit j set once channel j (< 63) wrote v on one of these images); only then are its pixels compared
    with those channels. Categories with their own concept numbers thus cost a copy and a run count per pixel.
    """
    B, K, P = labels.shape
    n = hist.shape[0]
    for k in range(K):
        c = k0 + k
        below = (np.int64(1) << c) - 1 if c < 63 else np.int64(-1)  # the channels before c (all beyond 62)
        for b in range(b_lo, b_hi):
            base = b * P
            last, lo = labels[b, k, 0], 0
            for p in range(P + 1):  # contiguous in labels; p == P closes the last run
                if p < P:
                    v = labels[b, k, p]
                    out[base + p, c] = v
                    if v == last:
                        continue
                # the run lo..p of number `last`
                if last < 0 or last >= n:
                    return last
                kept = p - lo if last != 0 else 0  # pixels of the run that keep a (non-zero) number
                if last != 0:
                    drop = False
                    if in_image[last]:
                        for i in range(image.shape[1]):
                            if image[b, i] == last:
                                drop = True
                                break
                    if drop:
                        for q in range(lo, p):
                            out[base + q, c] = 0
                        kept = 0
                    else:
                        m = present[last] & below
                        if m != 0:
                            for q in range(lo, p):
                                for j in range(c):
                                    if (j > 62 or (m >> j) & 1) and out[base + q, j] == last:
                                        out[base + q, c] = 0
                                        kept -= 1
                                        break
                    if kept > 0 and c < 63:
                        present[last] |= np.int64(1) << c
                    hist[last] += kept
                hist[0] += p - lo - kept
                if p < P:
                    last, lo = v, p
    return -1


def _insert_top(top_val, top_idx, maxima, indices):  # pragma: no cover - compiled
    """Rows of top_val / top_idx (C, n), sorted by value (descending) then index (ascending; −1 = empty, last),
    take the images ``indices`` (B,) with their per-unit values ``maxima`` (B, C)."""
    C, n = top_val.shape
    for u in range(C):
        for b in range(maxima.shape[0]):
            v, i = maxima[b, u], indices[b]
            j = n
            while j > 0 and (v > top_val[u, j - 1] or (v == top_val[u, j - 1]
                                                        and (top_idx[u, j - 1] < 0 or i < top_idx[u, j - 1]))):
                j -= 1  # (v, i) ranks before entry j - 1
            if j == n:
                continue
            for t in range(n - 1, j, -1):
                top_val[u, t] = top_val[u, t - 1]
                top_idx[u, t] = top_idx[u, t - 1]
            top_val[u, j] = v
            top_idx[u, j] = i


def insert_top(top_val: torch.Tensor, top_idx: torch.Tensor, maxima: torch.Tensor, indices: torch.Tensor) -> None:
    """Merge a batch into per-unit top lists in place (the tensor path: ``_TallyPass._merge_top``).

    top_val (C, n) float32 / top_idx (C, n) int64, contiguous CPU tensors sorted by value (descending) then index
    (ascending, −1 = empty); maxima (B, C) values of the images ``indices`` (B,).
    """
    _jit("_insert_top")(top_val.numpy(), top_idx.numpy(), maxima.detach().float().contiguous().numpy(),
                        indices.detach().long().contiguous().numpy())


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


@dataclass
class TopBuffer:
    """An exact top-k buffer per unit that :func:`scan` appends to in place (see ``ExactTopQuantile.buffer``).

    values (C, cap) float32: row u holds ``count[u]`` values, in no order, a superset of the k largest values
    fed so far; bound (C,) float32: only values above it are fed (a level below the row's k-th largest at its
    last cut, or −inf). A row that reaches ``cap`` (> k) is cut: values that cannot be among its k largest are
    dropped (at least k stay) and ``bound`` rises.
    """

    values: np.ndarray
    count: np.ndarray
    bound: np.ndarray
    k: int

    def keep_top(self, k: int) -> None:
        """Cut every row to its min(k, count) largest values (bound rises to the k-th largest where count ≥ k)."""
        _jit("_keep_top")(self.values, self.count, k, 0, self.values.shape[0], self.bound)

    def cut(self, limit: int) -> None:
        """Cut the rows holding more than ``limit`` (> k) values: keeps the bound close to the k-th largest."""
        _jit("_cut_rows")(self.values, self.count, self.k, limit, self.bound)

    def kth_largest(self, r: int) -> np.ndarray:
        """(C,) float32 the r-th largest value of every row (every row must hold at least r values)."""
        out = np.empty(self.values.shape[0], dtype=np.float32)
        scratch = np.empty(self.values.shape[1], dtype=np.float32)
        _jit("_kth_largest")(self.values, self.count, r, 0, self.values.shape[0], scratch, out)
        return out


def scan(acts: torch.Tensor, block_bound: torch.Tensor | None, top: TopBuffer | None = None,
         pool: concurrent.futures.Executor | None = None, workers: int = 1, hint: int = 0,
         maxima: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One pass over ``acts`` (B, C, h, w) float32 (CPU): a block table and/or feeding an exact top-k buffer.

    block_bound (C,): returns the blocks with a corner cell (y|y+1, x|x+1, clamped) above it, as coords (3, n)
    int16 (int32 when a size exceeds 32767) rows (image, unit, cell y·w + x), ascending within each thread's
    range of units, and corners (4, n) float32 (both transposed views of (n, 3) / (n, 4) arrays): the table of
    :meth:`_SparseUpsampler.block_table`; None: no table.
    top: every cell above ``top.bound`` is appended to its unit's row of ``top`` (in place).
    ``hint``: expected number of blocks (e.g. the previous batch's), to size the table in one go.
    ``maxima``: (B, C) spatial maxima of ``acts`` if already known (planes below both bounds are skipped).
    """
    B, C, h, w = acts.shape
    a = acts.detach().float().contiguous().view(B * C, h, w).numpy()
    top_cells = acts.detach().float().amax(dim=(2, 3)) if maxima is None else maxima.detach().float()
    plane_max = top_cells.cpu().contiguous().view(-1).numpy()
    inf = np.full(C, np.inf, dtype=np.float32)
    tb = inf if block_bound is None else block_bound.detach().float().cpu().contiguous().numpy()
    if top is None:
        top = TopBuffer(np.empty((C, 0), np.float32), np.zeros(C, np.int64), inf.copy(), 0)
    elif top.values.shape[1] <= top.k:
        raise ValueError(f"a top-k buffer needs room beyond k = {top.k}, has {top.values.shape[1]}")
    dtype = np.int16 if max(B, C, h * w) < 2**15 else np.int32
    spans = _spans(C, workers)
    # table size: a guess (the hint with a margin, else 1/8 of the cells); if it overflows, a second pass
    # builds the table alone (the buffer was fed once, in the first pass)
    cells = B * C * h * w
    room = [0 if block_bound is None else max(1024, hint * 5 // 4 if hint else cells // 8) * (hi - lo) // C
            for lo, hi in spans]
    found = [0] * len(spans)
    for attempt in range(2):
        # one block per row ((n, 3) and (n, 4), handed over as (3, n) / (4, n) views): the first n rows are the
        # table, so it is trimmed in place instead of copied
        parts = [(np.empty((r, 3), dtype), np.empty((r, 4), np.float32)) for r in room]
        feed = top if attempt == 0 else TopBuffer(np.empty((C, 0), np.float32), np.zeros(C, np.int64), inf, 0)

        def run(k: int, lo: int, hi: int, parts=parts, feed=feed) -> None:
            found[k] = _jit("_scan")(a, plane_max, tb, C, lo, hi, parts[k][0].T, parts[k][1].T, feed.values,
                                     feed.count, feed.bound, feed.k)

        _run(pool, run, spans)
        if all(f <= r for f, r in zip(found, room, strict=True)):
            break
        room = list(found)
    if block_bound is None:
        return None
    if len(parts) == 1:
        (coords, corners), f = parts[0], found[0]
        coords.resize((f, 3), refcheck=False)  # give back the unused room (no copy)
        corners.resize((f, 4), refcheck=False)
    else:
        coords = np.concatenate([c[:f] for (c, _), f in zip(parts, found, strict=True)])
        corners = np.concatenate([c[:f] for (_, c), f in zip(parts, found, strict=True)])
    return torch.from_numpy(coords).t(), torch.from_numpy(corners).t()


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
    present = np.zeros((len(spans), n_numbers), dtype=np.int64)  # per thread: which channels wrote a number
    img = image.detach().cpu().long().contiguous().numpy()
    in_image = np.zeros(n_numbers, dtype=np.bool_)
    in_image[img[(img > 0) & (img < n_numbers)]] = True
    bad = np.full(len(spans), -1, dtype=np.int64)
    k0 = 0
    for cat, t in maps:
        lab = t.detach().cpu().contiguous().view(B, t.shape[1], P).numpy()

        def run(j: int, lo: int, hi: int, lab: np.ndarray = lab, k0: int = k0) -> None:
            bad[j] = _jit("_encode_channels")(lab, img, in_image, k0, lo, hi, out, hists[j], present[j])

        _run(pool, run, spans)
        if (bad != -1).any():
            raise ValueError(f"pixel labels of {cat!r} hold concept number {int(bad[bad != -1][0])}, which is not in "
                             "the dataset's label table")
        k0 += t.shape[1]
    return torch.from_numpy(out), torch.from_numpy(hists.sum(0))
