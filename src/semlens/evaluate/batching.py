"""Choosing the forward batch size by measurement.

On CPUs the fastest batch for a given model and input size is often not the largest (a 256-image batch of
64x64 inputs falls out of cache on some machines and is slower per image than 64), so the perturbation
metrics measure it once per (model, input shape, dtype, device) instead of assuming it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["fastest_batch_size", "CANDIDATES"]

CANDIDATES = (16, 32, 64, 128, 256)
_CACHE: dict[tuple, int] = {}


@torch.no_grad()
def fastest_batch_size(model: nn.Module, sample: torch.Tensor, candidates: Sequence[int] = CANDIDATES,
                       needed: int | None = None, repeats: int = 2) -> int:
    """The candidate batch size with the lowest forward time per input for ``model`` on inputs shaped like
    ``sample`` (``(1, ...)`` or ``(N, ...)``: only its first row and shape are used).

    ``needed``: the number of inputs the caller will forward; candidates above it are not tried (a batch larger
    than the work is never faster). Each candidate is timed ``repeats`` times (best kept) after one warm-up.
    The result is cached per (model, per-input shape, dtype, device); the model must be in the state used
    afterwards (eval mode, on its device).
    """
    shape = tuple(sample.shape[1:])
    key = (id(model), shape, sample.dtype, sample.device.type, tuple(candidates), needed)
    if key in _CACHE:
        return _CACHE[key]
    tried = [b for b in sorted(candidates) if needed is None or b <= max(needed, min(candidates))]
    x = sample[:1].expand(max(tried), *shape).contiguous()
    sync = torch.cuda.synchronize if sample.device.type == "cuda" else (lambda: None)
    model(x[: tried[0]])  # warm-up (allocations, lazy kernels)
    best, best_rate = tried[0], float("inf")
    for b in tried:
        times = []
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            model(x[:b])
            sync()
            times.append(time.perf_counter() - t0)
        rate = min(times) / b
        if rate < best_rate:
            best, best_rate = b, rate
    _CACHE[key] = best
    return best
