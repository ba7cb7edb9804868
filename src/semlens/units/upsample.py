"""Sparse bilinear upsampling for dissection: unit maps (h, w) -> mask resolution (sh, sw), evaluated only near
the cells that can exceed a unit's threshold (used by both passes of :func:`semlens.units.dissect.dissect`)."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator

import torch

from semlens.units import dissect_kernels
from semlens.units.backend import Backend

__all__ = ["bilinear_axis"]


def bilinear_axis(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices ``i0, i1`` (n_out,) int64 and weights ``lam`` (n_out,) float64 of 1-D bilinear
    resampling with ``align_corners=False`` (as ``F.interpolate``): ``out[i] = (1−lam)·in[i0] + lam·in[i1]``."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    return i0, i1, src - i0


def _tiles(i0: torch.Tensor, n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut the output indices of each source index into tiles of at most S = ceil(n_out / n_in).

    Returns table (n_tiles, S) output indices (−1 padded), first (n_in,) first tile of each source
    index and count (n_in,) its number of tiles (0 when no output reads it first).
    """
    n_out = i0.numel()
    size = max(1, -(-n_out // n_in))
    counts = torch.bincount(i0, minlength=n_in)
    tiles_per = -(-counts // size)  # ceil
    first = torch.cumsum(tiles_per, 0) - tiles_per
    order = torch.argsort(i0, stable=True)  # output indices grouped by source index, ascending
    rank = torch.arange(n_out) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    tile = first[i0[order]] + rank // size
    table = torch.full((int(tiles_per.sum()), size), -1, dtype=torch.long)
    table[tile, rank % size] = order
    return table, first, tiles_per


class _SparseUpsampler:
    """Bilinear upsampling (h, w) -> (sh, sw) evaluated only where it can exceed a threshold.

    Output pixel (i, j) is a convex combination of the source cells (i0(i) | i1(i), j0(j) | j1(j)),
    with i1 ∈ {i0, i0 + 1}. Grouping output pixels by (i0, j0) partitions them into blocks; block
    (y, x) can only hold a value above ``T`` when one of its corner cells (y|y+1, x|x+1) is above
    ``T``. So only blocks next to an active cell (about ``quantile`` of all cells) are evaluated, in
    float64 exactly as ``(1−ly)·((1−lx)·a00 + lx·a01) + ly·((1−lx)·a10 + lx·a11)``, each output pixel at
    most once: O(active cells × scale²) work instead of O(units × sh × sw). Blocks are cut into tiles
    of ⌈scale⌉ × ⌈scale⌉ pixels (edge blocks are larger), and a tile is skipped when the bilinear
    form's maximum over the tile (at one of its four extreme (ly, lx) vertices) is clearly below ``T``.

    A *block table* is ``(coords, corners)``: coords (3, n) int16/int32 rows (image, unit, cell y·w + x) of
    the blocks in the (B, C, h, w) activations, corners (4, n) float32 values of cells (y, x), (y, x1),
    (y1, x), (y1, x1). Blocks selected with a bound ``≤ T`` contain every block needed for ``T``, so a
    table built during the threshold pass (with the quantile's running lower bound) replaces the
    activations.
    """

    def __init__(self, h: int, w: int, seg: tuple[int, int], device: torch.device, backend: Backend | None = None
                 ) -> None:
        self.h, self.w, self.seg = h, w, seg
        self.backend = backend or Backend.for_device(device)
        iy0, _, ly = bilinear_axis(h, seg[0])
        ix0, _, lx = bilinear_axis(w, seg[1])
        self.rows, self.cols = dissect_kernels.Axes(iy0, ly, h), dissect_kernels.Axes(ix0, lx, w)  # fused kernels
        self.pool: concurrent.futures.Executor | None = None  # threads the fused kernels may use
        self.workers = 1
        self.last_blocks = 0  # blocks of the last fused scan (sizes the next one)
        ty, self.first_y, self.count_y = (t.to(device) for t in _tiles(iy0, h))
        tx, self.first_x, self.count_x = (t.to(device) for t in _tiles(ix0, w))
        self.size = ty.shape[1], tx.shape[1]
        self.rows_of, self.cols_of = ty.reshape(-1), tx.reshape(-1)  # (tiles · S,) output rows / cols, −1 padded
        # per tile: weights of its output rows/cols; NaN in padding slots: their values compare False
        # with any threshold, so no validity mask is needed
        ly, lx = ly.to(device), lx.to(device)
        self.ly_tile = torch.where(ty >= 0, ly[ty.clamp_min(0)], float("nan"))
        self.lx_tile = torch.where(tx >= 0, lx[tx.clamp_min(0)], float("nan"))
        # extreme weights of each tile (the bilinear form's maximum over a tile sits at one of them)
        self.ly_ext = torch.stack([self.ly_tile.nan_to_num(2.0).amin(1), self.ly_tile.nan_to_num(-1.0).amax(1)], 1)
        self.lx_ext = torch.stack([self.lx_tile.nan_to_num(2.0).amin(1), self.lx_tile.nan_to_num(-1.0).amax(1)], 1)
        # transposed copies: gathering columns gives (S, n) blocks whose long axis is contiguous
        self.ly_tile_t, self.lx_tile_t = self.ly_tile.t().contiguous(), self.lx_tile.t().contiguous()
        self.ly_ext_t, self.lx_ext_t = self.ly_ext.t().contiguous(), self.lx_ext.t().contiguous()
        # per cell (y·w + x): row, column, and flat offsets to its right and lower neighbours (clamped)
        cell = torch.arange(h * w, device=device)
        self.y_of, self.x_of = cell // w, cell % w
        self.d_right = (self.x_of < w - 1).long()
        self.d_down = (self.y_of < h - 1).long() * w

    def block_table(self, acts: torch.Tensor, bound: torch.Tensor, maxima: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Blocks with a corner cell above ``bound`` (C,): coords (3, n) int16 (int32 when a size exceeds
        32767) rows (image, unit, cell y·w + x), in ascending order, and corners (4, n) float32.

        acts: (B, C, h, w); maxima: (B, C) its spatial maxima when known. Dense work: one comparison, two boolean
        ORs and one nonzero over the cells (the fused kernel: one pass over the planes that reach the bound).
        """
        if self.backend.uses_fused(acts):
            table = self.scan(acts, bound, None, maxima)
            assert table is not None
            return table
        acts = acts.contiguous()
        B, C, h, w = acts.shape
        above = self.backend.greater(acts, bound).view(-1)
        # block (y, x) reads cells (y|y+1, x|x+1): OR the flat mask with itself shifted by 1 and by w. The
        # shifts also flag a few blocks at row and plane ends whose (clamped) corners are all below the
        # bound; harmless, since every consumer re-checks the corners against its own threshold
        near = self.backend.or_shifted(self.backend.or_shifted(above, 1), w)
        coords = self.backend.nonzero_coords(near.view(B, C, h * w))
        b, u, cell = coords
        keys = (b * C + u) * (h * w) + cell
        k01 = keys + self.backend.take(self.d_right, cell)
        k10 = keys + self.backend.take(self.d_down, cell)
        k11 = k01 + (k10 - keys)
        flat = acts.view(-1)
        corners = torch.stack([self.backend.take(flat, k) for k in (keys, k01, k10, k11)], 0).float()
        return coords.to(torch.int16 if max(B, C, h * w) < 2**15 else torch.int32), corners

    def scan(self, acts: torch.Tensor, block_bound: torch.Tensor | None, top: dissect_kernels.TopBuffer | None,
             maxima: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Fused CPU pass (:func:`semlens.units.dissect_kernels.scan`): the block table above ``block_bound``
        (None: no table), and every cell above ``top.bound`` appended to the exact top-k buffer ``top``.
        ``maxima``: (B, C) spatial maxima of ``acts`` when known."""
        table = dissect_kernels.scan(acts, block_bound, top, self.pool, self.workers, hint=self.last_blocks,
                                     maxima=maxima)
        if table is not None:
            self.last_blocks = table[0].shape[1]
        return table

    def active_pixels(self, coords: torch.Tensor, corners: torch.Tensor, thresholds: torch.Tensor,
                      max_elements: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield chunks of active pixels as (image, unit, pixel index) int64 triples, each pixel once.

        coords, corners: a block table (see the class docstring); thresholds: (units,). A pixel is
        active when its upsampled value (float64) > its unit's threshold.
        """
        sw = self.seg[1]
        top_corner = torch.maximum(torch.maximum(corners[0], corners[1]), torch.maximum(corners[2], corners[3]))
        # a corner above T
        live = self.backend.nonzero_coords(top_corner > self.backend.take(thresholds, coords[1].long()))[0]
        img, u, cell = self.backend.take_cols(coords, live).long()
        corners = self.backend.take_cols(corners, live)  # (4, n)
        y, x = self.backend.take(self.y_of, cell), self.backend.take(self.x_of, cell)
        # blocks -> tiles (1, 2 or 4 per block)
        ny, nx = self.backend.take(self.count_y, y), self.backend.take(self.count_x, x)
        per = ny * nx
        if bool((per == 1).all()):
            blk = None
            ty, tx = self.backend.take(self.first_y, y), self.backend.take(self.first_x, x)
            c, uu = corners.double(), u
        else:
            blk = torch.repeat_interleave(torch.arange(live.numel(), device=live.device), per)
            j = torch.arange(blk.numel(), device=live.device) - torch.repeat_interleave(torch.cumsum(per, 0) - per, per)
            nxb = self.backend.take(nx, blk)
            ty = self.backend.take(self.first_y, self.backend.take(y, blk)) + j // nxb
            tx = self.backend.take(self.first_x, self.backend.take(x, blk)) + j % nxb
            c, uu = self.backend.take_cols(corners, blk).double(), self.backend.take(u, blk)
        t = self.backend.take(thresholds.double(), uu)
        S, K = self.size
        # corners and weights are (4 | S | K, n): every elementwise op below runs along the long axis n
        if S * K > 4:  # skip tiles whose largest value is clearly below T (vertex bound; margin >> rounding)
            lyv, lxv = self.backend.take_cols(self.ly_ext_t, ty), self.backend.take_cols(self.lx_ext_t, tx)  # (2, n)
            top = (1 - lxv) * c[0] + lxv * c[1]
            bottom = (1 - lxv) * c[2] + lxv * c[3]
            vmax = torch.maximum(torch.maximum((1 - lyv[0]) * top[0] + lyv[0] * bottom[0],
                                               (1 - lyv[0]) * top[1] + lyv[0] * bottom[1]),
                                 torch.maximum((1 - lyv[1]) * top[0] + lyv[1] * bottom[0],
                                               (1 - lyv[1]) * top[1] + lyv[1] * bottom[1]))
            scale = torch.maximum(torch.maximum(c[0].abs(), c[1].abs()), torch.maximum(c[2].abs(), c[3].abs()))
            keep = self.backend.nonzero_coords(vmax >= t - 1e-9 * scale)[0]
            ty, tx, t, uu = (self.backend.take(v, keep) for v in (ty, tx, t, uu))
            c = c.index_select(1, keep)
            blk = keep if blk is None else self.backend.take(blk, keep)
        chunk = max(1, max_elements // (S * K))
        for s in range(0, ty.numel(), chunk):
            cs = c[:, s:s + chunk]
            lx = self.backend.take_cols(self.lx_tile_t, tx[s:s + chunk])  # (K, n); padding slots hold NaN
            ly = self.backend.take_cols(self.ly_tile_t, ty[s:s + chunk])  # (S, n)
            top = (1 - lx) * cs[0] + lx * cs[1]  # (K, n)
            bottom = (1 - lx) * cs[2] + lx * cs[3]
            val = (1 - ly).unsqueeze(1) * top.unsqueeze(0) + ly.unsqueeze(1) * bottom.unsqueeze(0)  # (S, K, n)
            r, cc, k = self.backend.nonzero_coords(val > t[s:s + chunk])
            k = k + s
            rows = self.backend.take(self.rows_of, self.backend.take(ty, k) * S + r)
            cols = self.backend.take(self.cols_of, self.backend.take(tx, k) * K + cc)
            src = k if blk is None else self.backend.take(blk, k)  # the live block of each active pixel
            yield self.backend.take(img, src), self.backend.take(uu, k), rows * sw + cols
