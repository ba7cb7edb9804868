"""Per-unit top-quantile thresholds over a stream of activations, in bounded memory.

Both estimators are vectorized over units, are fed ``(C, n)`` blocks of values (one row per unit),
and merge exactly across processes, so a sharded run gives the same thresholds as one process.

* :class:`ExactTopQuantile` keeps only the ``k`` largest values per unit that the requested level
  needs (``k ≈ q · total + 2``) and returns exactly ``numpy.quantile(values, 1 - q)`` (linear
  interpolation between order statistics). Memory: ``C · k`` floats.
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

import torch

__all__ = ["quantile_positions", "ExactTopQuantile", "HistogramQuantileSketch", "make_quantile_estimator"]


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


class ExactTopQuantile:
    """Exact ``1 - q`` quantile per unit, keeping the top ``k`` values per unit (descending).

    ``total``: number of values per unit over the whole dataset (all shards), known up front.
    """

    def __init__(self, units: int, total: int, q: float, device: torch.device | str = "cpu") -> None:
        self.units, self.total, self.q = units, total, q
        self.lo, self.frac = quantile_positions(total, q)
        self.k = total - self.lo  # ascending indices lo .. total-1
        self.values = torch.empty(units, 0, device=device)

    @staticmethod
    def needed(total: int, q: float) -> int:
        """Values kept per unit for ``total`` values at level ``1 - q``."""
        return total - quantile_positions(total, q)[0]

    def update(self, x: torch.Tensor) -> None:
        """Add ``x``: (units, n) float values.

        Once ``k`` values are kept, only values above a unit's current k-th largest can still enter
        its top ``k``; they are packed into a (units, m) block (m = most survivors of one unit) first.
        """
        x = x.to(self.values.dtype)
        if self.values.shape[1] == self.k and x.shape[1] > 0:
            keep = x > self.values[:, -1:]
            count = keep.sum(1)
            m = int(count.max())
            if m == 0:
                return
            rows, cols = keep.nonzero(as_tuple=True)
            slot = torch.arange(rows.numel(), device=x.device) - (torch.cumsum(count, 0) - count)[rows]
            packed = torch.full((x.shape[0], m), float("-inf"), dtype=x.dtype, device=x.device)
            packed[rows, slot] = x[rows, cols]
            x = packed
        cat = torch.cat([self.values, x], dim=1)
        self.values = cat.topk(min(self.k, cat.shape[1]), dim=1, sorted=True).values

    def merge(self, other_values: torch.Tensor) -> None:
        """Merge another estimator's kept values, (units, k') (e.g. gathered from another process)."""
        self.update(other_values)

    def result(self) -> torch.Tensor:
        """(units,) float32 thresholds (requires all ``total`` values to have been seen)."""
        if self.values.shape[1] < self.k:
            raise RuntimeError(f"quantile needs {self.k} values per unit, saw only {self.values.shape[1]}")
        v = self.values.double()
        s_lo = v[:, self.k - 1]  # ascending index lo
        s_hi = v[:, self.k - 2] if self.k >= 2 else s_lo
        return (s_lo + self.frac * (s_hi - s_lo)).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"values": self.values}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.values = state["values"].to(self.values.device)


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

    def update(self, x: torch.Tensor) -> None:
        """Add ``x``: (units, n) float values."""
        b = (_float_to_key(x.float()) >> self.shift).long() + self.offset
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


def make_quantile_estimator(units: int, total: int, q: float, device: torch.device | str,
                            memory_bytes: int) -> ExactTopQuantile | HistogramQuantileSketch:
    """The exact estimator when ``units · k`` float32 values fit in ``memory_bytes``, else the sketch."""
    if units * ExactTopQuantile.needed(total, q) * 4 * 2 <= memory_bytes:  # x2: concat buffer during update
        return ExactTopQuantile(units, total, q, device)
    return HistogramQuantileSketch(units, total, q, device)
