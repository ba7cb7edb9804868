"""Shared timing helper for the benchmarks: median seconds (wall or CPU time) with CUDA synchronisation."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def median_time(fn: Callable[[], object], repeats: int, device: torch.device | None = None, warmup: int = 1,
                cpu_time: bool = False) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs: wall time (synchronised on
    CUDA), or with ``cpu_time`` on CPU this process's CPU time (robust to other jobs on a shared machine; at one
    thread it is the single-core figure)."""
    cuda = device is not None and torch.device(device).type == "cuda"
    clock = time.process_time if cpu_time and not cuda else time.perf_counter
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = clock()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(clock() - t0)
    return statistics.median(times)
