"""Per-unit top-quantile thresholds over a stream of activations, in bounded memory.

Both estimators are vectorized over units, are fed ``(C, n)`` blocks of values (one row per unit),
and merge exactly across processes, so a sharded run gives the same thresholds as one process.

* :class:`ExactTopQuantile` keeps only the ``k`` largest values per unit that the requested level
  needs (``k ≈ q · total + 2``) and returns exactly ``numpy.quantile(values, 1 - q)`` (linear
  interpolation between order statistics). Memory: at most ``3 · C · k`` floats. Its running
  ``lower_bound`` (the k-th largest value so far) lets callers drop values that cannot matter.
* :class:`HistogramQuantileSketch` is the fallback when ``C · k`` does not fit: a histogram over the
  float32 bit pattern (sign, 8 exponent bits and the top ``m`` mantissa bits). Memory
  ``C · 2**(9 + m)`` int64 counts, independent of the amount of data. Its error bound is
  deterministic: with ``s_lo ≤ t ≤ s_hi`` the two order statistics the exact quantile ``t``
  interpolates, the estimate ``t̂`` satisfies

      |t̂ − t| ≤ 2**−(m+1) · max(|s_lo|, |s_hi|) + 2**−149,

  because every bin holds floats that share sign, exponent and top ``m`` mantissa bits (a relative
  width below ``2**−m``) and the estimate interpolates bin midpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar

import numpy as np
import torch

from semlens import distributed
from semlens.streaming import all_gather_cat
from semlens.units.dissect_kernels import TopBuffer

T = TypeVar("T")

__all__ = ["quantile_positions", "QuantileEstimator", "ExactTopQuantile", "HistogramQuantileSketch",
           "make_quantile_estimator"]


class QuantileEstimator(Protocol):
    """What both estimators offer: ``exact`` (the thresholds are exact and a running ``lower_bound`` (units,)
    exists; ``None`` for a sketch), ``update``, ``result``, ``max_bytes``, checkpoint state, folding the states
    of several estimators that saw disjoint values (:meth:`fold_state`), an empty state (:meth:`cleared_state`)
    and the exact merge over ``torchrun`` processes (:meth:`merge_across_processes`)."""

    exact: bool
    units: int

    @property
    def max_bytes(self) -> int: ...

    @property
    def lower_bound(self) -> torch.Tensor | None: ...

    def update(self, x: torch.Tensor) -> None: ...

    def result(self) -> torch.Tensor: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...

    def cleared_state(self) -> dict[str, torch.Tensor]: ...

    def merge_across_processes(self) -> None: ...


def quantile_positions(total: int, q: float) -> tuple[int, float]:
    """Ascending order-statistic index ``lo`` and fraction ``frac`` of the ``1 - q`` quantile.

    The quantile of ``total`` sorted values ``s`` is ``s[lo] + frac · (s[lo+1] − s[lo])`` (numpy's
    default "linear" method).
    """
    if total < 1:
        raise ValueError("cannot take a quantile of zero values")
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile must be in (0, 1), got {q}")
    pos = (1.0 - q) * (total - 1)
    lo = int(math.floor(pos))
    return lo, pos - lo


GUESS_MARGIN = (2.0, 8.0)  # likely_bound(): the kept value of rank a·e + b·√e (e = expected final top-k values seen)


def _pack_rows(x: torch.Tensor, keep: torch.Tensor, numpy: bool = True) -> torch.Tensor:
    """(units, m) the entries of ``x`` (units, ...) where ``keep``, row by row, −inf padded (m = most kept).
    ``numpy``: CPU tensors take NumPy's kernels (several times faster; False: torch only, the path CUDA takes)."""
    if numpy and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):  # several times faster
        xn, kn = x.reshape(x.shape[0], -1).numpy(), keep.reshape(x.shape[0], -1).numpy()
        vals = xn[kn]  # row-major: grouped by row
        cnt = np.count_nonzero(kn, axis=1)
        m = int(cnt.max()) if cnt.size else 0
        rows = np.repeat(np.arange(x.shape[0]) * m - (np.cumsum(cnt) - cnt), cnt)  # row·m − row start
        out = np.full(x.shape[0] * m, -np.inf, dtype=xn.dtype)
        out[rows + np.arange(vals.size)] = vals
        return torch.from_numpy(out.reshape(x.shape[0], m))
    count = keep.sum(tuple(range(1, x.ndim)))
    m = int(count.max()) if count.numel() else 0
    vals = x[keep]  # ordered by unit (logical order of x)
    rows = torch.repeat_interleave(torch.arange(x.shape[0], device=x.device), count)
    slot = torch.arange(rows.numel(), device=x.device) - (torch.cumsum(count, 0) - count)[rows]
    packed = torch.full((x.shape[0], m), float("-inf"), dtype=x.dtype, device=x.device)
    packed[rows, slot] = vals
    return packed


def _prefilter(x: torch.Tensor, k: int, numpy: bool = True) -> torch.Tensor:
    """Drop most entries of ``x`` (units, n ≫ k) that cannot be among each row's k largest (exact).

    A strided sample estimates a level a bit below each row's k-th largest; rows where fewer than
    ``k`` entries reach it keep everything, the others keep only entries ≥ it, so the k largest of
    every row survive.
    """
    n = x.shape[1]
    stride = max(1, n // 4096)
    sample = x[:, ::stride]
    rank = min(sample.shape[1], int(1.3 * k * sample.shape[1] / n) + 16)  # about 4 sigma below the k-th
    level = sample.topk(rank, dim=1, sorted=False).values.amin(1, keepdim=True)
    keep = x >= level
    short = keep.sum(1) < k
    if bool(short.any()):
        keep |= short.unsqueeze(1)
    return _pack_rows(x, keep, numpy)


class ExactTopQuantile:
    """Exact ``1 - q`` quantile per unit, keeping the top ``k`` values per unit.

    ``total``: number of values per unit over the whole dataset (all shards), known up front.

    Updates are lazy: once ``k`` values per unit are kept, a block only contributes the values above
    each unit's current k-th largest (``lower_bound``), packed into a pending ``(units, m)`` buffer;
    the ``topk`` over kept ∪ pending runs only when the pending width reaches ``k / 4`` (and before any
    read-out), so most batches cost one comparison. A first block much wider than ``k`` is pre-filtered
    with a sampled level that is verified to leave at least ``k`` values per row (exact). Memory: at
    most about ``3 · units · k`` floats.
    """

    exact = True

    def __init__(self, units: int, total: int, q: float, device: torch.device | str = "cpu", numpy: bool = True
                 ) -> None:
        self.units, self.total, self.q = units, total, q
        self.numpy = numpy  # CPU tensors take NumPy's kernels (False: torch only)
        self.lo, self.frac = quantile_positions(total, q)
        self.k = total - self.lo  # ascending indices lo .. total-1
        self._values = torch.empty(units, 0, device=device)
        self._bound = torch.full((units,), float("-inf"), device=device)  # min of the kept values
        self._pending: list[torch.Tensor] = []
        self._pending_width = 0
        self._seen = 0  # values per unit passed to update (including those below the bound)
        self._covered = 0  # ... of which the kept values are the largest
        self._guess: tuple[int, torch.Tensor] | None = None  # likely_bound() for the current kept values
        self._buffer: TopBuffer | None = None  # while fused CPU kernels feed the estimator (see buffer())
        self._buffer_guess: tuple[int, torch.Tensor] | None = None  # (values seen, guess) in buffer mode
        self._floored = False  # fed with a floor from elsewhere: rows may hold fewer than k values

    @staticmethod
    def needed(total: int, q: float) -> int:
        """Values kept per unit for ``total`` values at level ``1 - q``."""
        return total - quantile_positions(total, q)[0]

    @property
    def max_bytes(self) -> int:
        """Most memory the kept values take (tensor updates: 3k floats per unit; the fused buffer: 2k + 64)."""
        return self.units * max(3 * self.k, 2 * self.k + 64) * 4

    @property
    def values(self) -> torch.Tensor:
        """(units, min(k, seen)) kept values (the largest seen so far per unit, in no particular order)."""
        self._leave_buffer()
        self._compact()
        return self._values

    @values.setter
    def values(self, v: torch.Tensor) -> None:
        self._buffer = None
        self._values, self._pending, self._pending_width, self._guess = v, [], 0, None
        self._bound = v.amin(1) if v.shape[1] else torch.full((self.units,), float("-inf"), device=v.device)

    @property
    def full(self) -> bool:
        """Whether ``k`` values per unit are kept (then ``lower_bound`` is finite)."""
        self._leave_buffer()
        return self._values.shape[1] == self.k

    @property
    def lower_bound(self) -> torch.Tensor:
        """(units,) a lower bound of the final k-th largest value (−inf until ``k`` values were seen).

        Every value that can still matter for the quantile (or lie above the threshold) is
        strictly greater than this bound, at any point of the stream.
        """
        if self._buffer is not None:  # the level of the rows' last cut (feed() cuts them near k every batch)
            return torch.from_numpy(self._buffer.bound.copy())
        if not self.full:
            return torch.full((self.units,), float("-inf"), dtype=self._values.dtype, device=self._values.device)
        return self._bound

    def buffer(self) -> TopBuffer:
        """CPU: the kept values as a :class:`~semlens.units.dissect_kernels.TopBuffer` that fused kernels append to.

        A kernel appends every value above ``bound`` to its unit's row and cuts a full row (capacity 2k + 64) to
        at least its k largest, so the estimator stays exact without a ``topk`` per batch. Feed it through :meth:`feed`.
        Any other read (``values``, ``result``, ``state_dict``, ``update``) first cuts every row to its k largest
        and leaves buffer mode.
        """
        if self._buffer is None:
            if self._values.device.type != "cpu":
                raise RuntimeError("the fused top-k buffer lives in CPU memory; use update() on other devices")
            kept = self.values.float().numpy()
            rows = np.empty((self.units, 2 * self.k + 64), dtype=np.float32)
            rows[:, :kept.shape[1]] = kept
            bound = self.lower_bound.float().numpy().copy()
            self._buffer = TopBuffer(rows, np.full(self.units, kept.shape[1], dtype=np.int64), bound, self.k)
        return self._buffer

    @property
    def seen(self) -> int:
        """Values per unit fed so far (including those below the bound)."""
        return self._seen

    def feed(self, kernel: Callable[[TopBuffer], T], n: int, sample: torch.Tensor | None = None,
             floor: np.ndarray | None = None) -> T:
        """Let a fused kernel append ``n`` values per unit to :meth:`buffer` (``kernel(buffer)``); return its result.

        ``sample``: (units, m) some of those values, for the first batch: the buffer then starts from a level
        estimated on the sample (about 2·k·m/n values per unit above it) instead of −inf, so a wide first batch
        is not fed whole. The level is verified afterwards (every unit must have kept min(k, n) values, so
        nothing it dropped can be among its k largest); if it was too high, the batch is fed again without it.
        ``floor``: (units,) float32 a lower bound of the final k-th largest known from elsewhere (e.g. another
        worker's estimator over other batches: its k-th largest can only be lower than the final one); values
        at or below it are not kept. Estimators fed with floors are exact once folded together
        (their union holds every value above the floor, which includes the k largest), not alone.
        """
        first = sample is not None and self._seen == 0 and self._values.shape[1] == 0 and not self._pending
        buf = self.buffer()
        if floor is not None:
            np.maximum(buf.bound, floor, out=buf.bound)
            self._floored = True
        valid = buf.bound.copy()
        if first:
            assert sample is not None
            m = sample.shape[1]
            rank = min(m, int(2 * self.k * m / n) + 32)
            if rank < m:
                np.maximum(buf.bound, sample.float().topk(rank, dim=1, sorted=False).values.amin(1).numpy(),
                           out=buf.bound)
        out = kernel(buf)
        # the sampled level (where it is above the valid bound) must leave k values per unit of this batch
        if first and bool(((buf.count < min(self.k, n)) & (buf.bound > valid)).any()):
            buf.count[:] = 0
            buf.bound[:] = valid
            out = kernel(buf)
        buf.cut(self.k + self.k // 8)  # a tight bound for the next batch (a row is cut inside only when full)
        self._seen += n
        return out

    def _leave_buffer(self) -> None:
        """Cut the buffer's rows to their k largest values and make them the kept values (exact)."""
        buf, self._buffer = self._buffer, None
        if buf is None:
            return
        buf.keep_top(self.k)
        m = int(buf.count.max())  # every row holds min(k, seen) values now (a row below k was fed everything) ...
        if int(buf.count.min()) != m and not self._floored:
            raise RuntimeError("top-k buffer rows of unequal length: a kernel skipped values it had to keep")
        values = buf.values[:, :m].copy()  # ... unless a floor dropped values: −inf pads the shorter rows
        values[np.arange(m)[None, :] >= buf.count[:, None]] = -np.inf
        self.values = torch.from_numpy(values).to(self._values.dtype)
        self._covered = self._seen

    def likely_bound(self) -> torch.Tensor:
        """(units,) a *guess* at a lower bound of the final threshold, tighter than :attr:`lower_bound` early on.

        The kept values are the largest of the first ``s`` values per unit; if the data are exchangeable,
        about ``e = k · s / total`` of those belong to the final top k. The guess is the kept value of rank
        ``2e + 8√e`` (at least ``lower_bound``). Not guaranteed: a caller relying on it must check it
        against :meth:`result`.
        """
        if self._buffer is not None:
            return self._likely_bound_of_buffer()
        if self._guess is not None and self._guess[0] == self._covered:  # the kept values have not changed
            return self._guess[1]
        kept = self._values
        r = self._guess_rank(self._covered)
        if not 1 <= r <= kept.shape[1]:
            return self.lower_bound
        guess = torch.maximum(kept.kthvalue(kept.shape[1] - r + 1, dim=1).values, self.lower_bound)
        self._guess = (self._covered, guess)
        return guess

    def _guess_rank(self, seen: int) -> int:
        """Rank of the guess among the largest of ``seen`` values per unit: a·e + b·√e (``GUESS_MARGIN``), e = the
        final top-k values expected among them."""
        e = self.k * seen / self.total
        return math.ceil(GUESS_MARGIN[0] * e + GUESS_MARGIN[1] * math.sqrt(e))

    def _likely_bound_of_buffer(self) -> torch.Tensor:
        """:meth:`likely_bound` in buffer mode: the rank ``2e + 8√e`` value of each row (a row holds the k largest
        values seen, and more). Recomputed when the values seen doubled since the last guess; in between the
        previous guess, made from fewer values and so at a lower level (a safer bound), is kept."""
        buf = self._buffer
        assert buf is not None
        if self._buffer_guess is not None and self._seen < 2 * self._buffer_guess[0]:
            return torch.maximum(self._buffer_guess[1], torch.from_numpy(buf.bound))  # never below the bound
        r = self._guess_rank(self._seen)
        if not 1 <= r <= min(self.k, int(buf.count.min())):
            return torch.from_numpy(buf.bound.copy())  # the level of the rows' last cut
        guess = torch.from_numpy(np.maximum(buf.kth_largest(r), buf.bound))
        self._buffer_guess = (self._seen, guess)
        return guess

    def update(self, x: torch.Tensor, seen: int | None = None, prefiltered: bool = False) -> None:
        """Add ``x``: (units, ...) float values (any trailing shape, any strides, e.g. a transposed view).

        ``seen``: how many values per unit ``x`` stands for when the caller already dropped those ≤
        :attr:`lower_bound` (−inf padding allowed); default its size. ``prefiltered``: ``x`` is (units, m)
        and holds only such values and −inf (no second filtering pass).
        """
        self._leave_buffer()
        x = x.to(self._values.dtype)
        if x.ndim == 1:
            x = x.unsqueeze(1)
        if x[0].numel() == 0:
            return
        self._seen += x[0].numel() if seen is None else seen
        if not self.full:
            self._pending.append(x.reshape(self.units, -1))
            self._pending_width += self._pending[-1].shape[1]
            if self._values.shape[1] + self._pending_width >= self.k:
                self._compact()
            return
        # values at most the bound cannot enter the top k (a caller's −inf padding is dropped here too)
        packed = x if prefiltered else _pack_rows(x, x > self._bound.view(-1, *([1] * (x.ndim - 1))), self.numpy)
        if packed.shape[1] == 0:
            return
        self._pending.append(packed)
        self._pending_width += packed.shape[1]
        if self._pending_width * 4 >= self.k:  # compact often enough to keep the bound tight
            self._compact()

    def _compact(self) -> None:
        if not self._pending:
            return
        cat = torch.cat([self._values, *self._pending], dim=1)
        self._pending, self._pending_width = [], 0
        k = min(self.k, cat.shape[1])
        if cat.shape[1] > 8 * k:
            cat = _prefilter(cat, k, self.numpy)
        self._values = cat.topk(k, dim=1, sorted=False).values  # unordered
        self._bound = self._values.amin(1)
        self._covered = self._seen

    def merge(self, other_values: torch.Tensor) -> None:
        """Merge another estimator's kept values, (units, k') (e.g. gathered from another process)."""
        self.update(other_values)
        self._compact()

    def result(self) -> torch.Tensor:
        """(units,) float32 thresholds (requires all ``total`` values to have been seen)."""
        v = self.values
        if v.shape[1] < self.k:
            raise RuntimeError(f"quantile needs {self.k} values per unit, saw only {v.shape[1]}")
        two = v.topk(min(2, self.k), dim=1, largest=False, sorted=True).values.double()  # the two smallest kept
        s_lo = two[:, 0]  # ascending index lo
        s_hi = two[:, 1] if self.k >= 2 else s_lo
        return (s_lo + self.frac * (s_hi - s_lo)).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"values": self.values}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.values = state["values"].to(self._values.device)

    @staticmethod
    def fold_state(parts: Sequence[ExactTopQuantile]) -> dict[str, torch.Tensor]:
        """The state of one estimator that saw what all of ``parts`` saw (exact), leaving them unchanged."""
        values = torch.cat([p.values for p in parts], 1)
        k = min(parts[0].k, values.shape[1])
        return {"values": values if len(parts) == 1 else values.topk(k, dim=1, sorted=False).values}

    def cleared_state(self) -> dict[str, torch.Tensor]:
        """The state of an estimator that saw nothing."""
        return {"values": self.values[:, :0]}

    def merge_across_processes(self) -> None:
        """Keep the k largest values of every process (exact); a no-op in one process."""
        if distributed.is_distributed():
            gathered = all_gather_cat(self.values.contiguous(), dim=1)
            self.values = self.values[:, :0]
            self.merge(gathered)


def _float_to_key(x: torch.Tensor) -> torch.Tensor:
    """Map float32 values to int32 keys with the same order (signed comparison)."""
    bits = x.contiguous().view(torch.int32)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _key_to_float(key: torch.Tensor) -> torch.Tensor:
    bits = torch.where(key < 0, key ^ 0x7FFFFFFF, key).to(torch.int32)
    return bits.view(torch.float32)


class HistogramQuantileSketch:
    """Mergeable fixed-memory quantile sketch over float32 bit patterns (see module docstring).

    ``mantissa_bits`` m in [0, 23]: bins per unit ``2**(9+m)``; relative error ≤ ``2**−(m+1)``.
    """

    exact = False
    lower_bound = None  # a sketch keeps no running bound of the threshold

    def __init__(self, units: int, total: int, q: float, device: torch.device | str = "cpu",
                 mantissa_bits: int = 6) -> None:
        if not 0 <= mantissa_bits <= 23:
            raise ValueError(f"mantissa_bits must be in [0, 23], got {mantissa_bits}")
        self.units, self.total, self.q = units, total, q
        self.lo, self.frac = quantile_positions(total, q)
        self.shift = 23 - mantissa_bits
        self.bins = 1 << (32 - self.shift)
        self.offset = 1 << (31 - self.shift)
        self.counts = torch.zeros(units, self.bins, dtype=torch.int64, device=device)

    @property
    def max_bytes(self) -> int:
        """Memory of the counts (fixed)."""
        return self.counts.numel() * self.counts.element_size()

    def update(self, x: torch.Tensor) -> None:
        """Add ``x``: (units, ...) float values (any trailing shape)."""
        b = (_float_to_key(x.float().reshape(self.units, -1)) >> self.shift).long() + self.offset
        keys = b + torch.arange(self.units, device=b.device).unsqueeze(1) * self.bins
        self.counts += torch.bincount(keys.flatten(), minlength=self.units * self.bins).view(self.units, self.bins)

    def merge(self, other_counts: torch.Tensor) -> None:
        self.counts += other_counts.to(self.counts.device)

    def _midpoint(self, bin_index: torch.Tensor) -> torch.Tensor:
        k_lo = ((bin_index - self.offset) << self.shift).to(torch.int64)
        k_hi = k_lo + (1 << self.shift) - 1
        lo = _key_to_float(k_lo.clamp(-(2**31), 2**31 - 1)).double()
        hi = _key_to_float(k_hi.clamp(-(2**31), 2**31 - 1)).double()
        return (lo + hi) / 2

    def result(self) -> torch.Tensor:
        """(units,) float32 threshold estimates within the documented error bound."""
        cum = self.counts.cumsum(dim=1)
        if int(cum[:, -1].min()) < self.total:
            raise RuntimeError("quantile sketch saw fewer values than announced")
        ranks = torch.tensor([[self.lo, min(self.lo + 1, self.total - 1)]], device=cum.device).expand(self.units, 2)
        idx = torch.searchsorted(cum, ranks.contiguous(), right=True)  # first bin whose cumsum > rank
        mids = self._midpoint(idx)
        return (mids[:, 0] + self.frac * (mids[:, 1] - mids[:, 0])).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"counts": self.counts}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.counts = state["counts"].to(self.counts.device)

    @staticmethod
    def fold_state(parts: Sequence[HistogramQuantileSketch]) -> dict[str, torch.Tensor]:
        """The state of one sketch that saw what all of ``parts`` saw (counts add), leaving them unchanged."""
        return {"counts": sum(p.state_dict()["counts"] for p in parts)}

    def cleared_state(self) -> dict[str, torch.Tensor]:
        """The state of a sketch that saw nothing."""
        return {"counts": torch.zeros_like(self.counts)}

    def merge_across_processes(self) -> None:
        """Sum the counts of every process (exact); a no-op in one process."""
        distributed.all_reduce_sum(self.counts)


def make_quantile_estimator(units: int, total: int, q: float, device: torch.device | str,
                            memory_bytes: int, numpy: bool = True) -> ExactTopQuantile | HistogramQuantileSketch:
    """The exact estimator when ``units · k`` float32 values fit in ``memory_bytes``, else the sketch."""
    if units * ExactTopQuantile.needed(total, q) * 4 * 3 <= memory_bytes:  # x3: kept + pending + topk buffer
        return ExactTopQuantile(units, total, q, device, numpy)
    return HistogramQuantileSketch(units, total, q, device)
