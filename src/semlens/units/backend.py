"""How dissection computes on one device: the back-end object chosen once (from the device) and passed in.

On CPU, NumPy's kernels are several times faster than torch's for the large sparse gathers, comparisons and
nonzero scans dissection does, and the fused numba kernels of :mod:`semlens.units.dissect_kernels` build block
tables and tallies in one pass each; on CUDA everything stays in torch. Every method gives the same values on every
back-end (tests run a dissection with each and compare the integer counts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from semlens.units import dissect_kernels

__all__ = ["Backend"]

_NUMPY_DTYPES = (torch.float32, torch.float64, torch.int64, torch.int32, torch.int16, torch.uint8, torch.bool)


@dataclass(frozen=True)
class Backend:
    """numpy: CPU tensors take NumPy's kernels (False: torch only, the path CUDA takes); fused: CPU block tables,
    tallies, label encoding and top-image insertion use the fused numba kernels (needs ``numpy`` and numba)."""

    numpy: bool = True
    fused: bool = True

    @classmethod
    def for_device(cls, device: torch.device | str) -> Backend:
        """The fastest back-end for ``device``: NumPy and the fused kernels (when numba is present) on CPU."""
        cpu = torch.device(device).type == "cpu"
        return cls(numpy=cpu, fused=cpu and dissect_kernels.AVAILABLE)

    def uses_fused(self, t: torch.Tensor) -> bool:
        """True when ``t`` (on its device) goes through the fused kernels."""
        return self.fused and self.numpy and dissect_kernels.AVAILABLE and t.device.type == "cpu"

    def _cpu(self, *ts: torch.Tensor) -> bool:
        return self.numpy and all(t.device.type == "cpu" for t in ts)

    def bincount(self, t: torch.Tensor, minlength: int) -> torch.Tensor:
        """``torch.bincount`` of a 1-D integer tensor (NumPy's on CPU). Raises on negatives."""
        if self._cpu(t):
            return torch.from_numpy(np.bincount(t.numpy(), minlength=minlength))
        return torch.bincount(t, minlength=minlength)

    def greater(self, a: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) bool ``a > bound`` per channel (bound: (C,))."""
        if self._cpu(a) and a.dtype in (torch.float32, torch.float64) and a.is_contiguous():
            return torch.from_numpy(np.greater(a.numpy(), bound.to(a.dtype).numpy().reshape(1, -1, 1, 1)))
        return a > bound.view(1, -1, 1, 1)

    def take(self, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``t.index_select(0, idx)``."""
        if self._cpu(t, idx) and t.dtype in _NUMPY_DTYPES:
            return torch.from_numpy(t.numpy()[idx.numpy()])
        return t.index_select(0, idx)

    def take_cols(self, t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """``t.index_select(1, idx)`` for a 2-D ``t``, contiguous."""
        if self._cpu(t, idx) and t.dtype in _NUMPY_DTYPES:
            return torch.from_numpy(np.ascontiguousarray(t.numpy()[:, idx.numpy()]))
        return t.index_select(1, idx)

    def or_shifted(self, mask: torch.Tensor, shift: int) -> torch.Tensor:
        """(n,) bool ``mask[i] | mask[i + shift]`` (the last ``shift`` entries unchanged)."""
        if shift >= mask.numel():
            return mask
        if self._cpu(mask):
            m = mask.numpy()
            out = m.copy()
            np.logical_or(m[:-shift], m[shift:], out=out[:-shift])
            return torch.from_numpy(out)
        out = mask.clone()
        out[:-shift] |= mask[shift:]
        return out

    def nonzero_coords(self, mask: torch.Tensor) -> torch.Tensor:
        """(ndim, n) int64 coordinates of the True entries of a bool tensor, in ascending (row-major) order."""
        if self._cpu(mask) and mask.ndim == 1:
            return torch.from_numpy(np.flatnonzero(mask.numpy())).unsqueeze(0)
        if self._cpu(mask) and mask.ndim == 3:
            m = mask.numpy()
            a, b, n = m.shape
            flat = np.flatnonzero(m)
            # entries per (i, j) plane from the sorted flat indices: no division over the n entries
            counts = np.diff(np.searchsorted(flat, np.arange(a * b + 1) * n))
            planes = np.arange(a * b)
            coords = np.stack([np.repeat(planes // b, counts), np.repeat(planes % b, counts),
                               flat - np.repeat(planes * n, counts)])
            return torch.from_numpy(coords)
        return mask.nonzero().t()
