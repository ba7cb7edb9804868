"""torch.distributed helpers: which shard of the data is mine, and summing partial results.

All functions work without an initialised process group (one process = rank 0 of 1), so library
code calls them unconditionally. Launch with ``torchrun --nproc_per_node=N`` to shard work.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist

__all__ = ["is_distributed", "rank", "world_size", "local_rank", "shard_indices", "all_reduce_sum", "init_from_env",
           "barrier", "broadcast", "all_gather", "shutdown", "session", "record_failure"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    """This process's index on its machine (``LOCAL_RANK`` set by ``torchrun``; 0 in one process)."""
    return int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    Returns True when running distributed. Backend: ``nccl`` on CUDA, else ``gloo``.
    """
    if is_distributed():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    return True


def shard_indices(n: int, shard_rank: int | None = None, shards: int | None = None) -> range:
    """Contiguous block of ``range(n)`` handled by this process (blocks differ in size by at most 1)."""
    r = rank() if shard_rank is None else shard_rank
    w = world_size() if shards is None else shards
    base, extra = divmod(n, w)
    start = r * base + min(r, extra)
    return range(start, start + base + (1 if r < extra else 0))


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all processes (in place when distributed) and return it.

    Integer and float64 counts stay exact; tensors on CUDA use the process group's backend.
    """
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def _comm(t: torch.Tensor) -> torch.Tensor:
    """``t`` on a device the process group's backend can exchange (NCCL needs CUDA tensors)."""
    if dist.get_backend() == "nccl" and t.device.type != "cuda":
        return t.to(torch.device("cuda", torch.cuda.current_device()))
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``t`` on every process with its value on rank ``src`` (in place) and return it."""
    if is_distributed():
        c = _comm(t)
        dist.broadcast(c, src=src)
        if c is not t:
            t.copy_(c)
    return t


def all_gather(t: torch.Tensor) -> list[torch.Tensor]:
    """``[t of rank 0, t of rank 1, ...]`` on every process (same shape everywhere; ``[t]`` in one process).

    The gathered tensors live on ``t``'s device.
    """
    if not is_distributed():
        return [t]
    c = _comm(t.contiguous())
    parts = [torch.empty_like(c) for _ in range(world_size())]
    dist.all_gather(parts, c)
    return [p.to(t.device) for p in parts]


@contextlib.contextmanager
def session(backend: str | None = None) -> Iterator[bool]:
    """``with session() as parallel:`` initialise from ``torchrun``'s environment, destroy on every exit.

    Yields whether this process runs distributed. A group this context created is destroyed when the
    block ends: after a barrier on success; at once when the block raised (the other processes may never
    reach a barrier), for gloo only. An NCCL group is left to the process exit after an error, since
    destroying it while peers wait in a collective can hang. Either way peers waiting in a collective fail
    with "connection closed by peer" once this process is gone. A group that existed before is left alone.
    """
    created = not is_distributed() and init_from_env(backend)
    try:
        yield is_distributed()
    except BaseException as err:
        if isinstance(err, Exception):
            record_failure(err)  # before the group goes: peers fail only once it is gone, so they come later
        if created and is_distributed() and dist.get_backend() == "gloo":
            dist.destroy_process_group()
            gc.collect()
        raise
    if created:
        shutdown()


def shutdown() -> None:
    """Wait for every process, then destroy the default process group (no-op in one process).

    A garbage collection follows, so that process-group objects caught in reference cycles are freed
    while the interpreter is fully alive: gloo's worker threads aborting the process (``terminate
    called without an active exception``) when a group is torn down during interpreter finalisation
    is a known torch failure.
    """
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()


#: Parts of the messages gloo's TCP transport raises (as ``DistError`` or as a plain ``RuntimeError``, depending on
#: where it is caught) when the process at the other end went away.
_LOST_PEER_MESSAGES = ("closed by peer", "reset by peer", "broken pipe", "connection refused", "gloo/transport/tcp")


def _lost_peer(err: BaseException) -> bool:
    """Whether ``err`` is the consequence of another process failing (its connection closed or reset, a collective
    broken)."""
    text = str(err).lower()
    return isinstance(err, dist.DistError) or any(m in text for m in _LOST_PEER_MESSAGES)


def record_failure(err: BaseException) -> bool:
    """Record ``err`` in ``torchrun``'s elastic error file, once per process; return whether it was written.

    ``torchrun`` names as *root cause* the failed worker whose error file holds the smallest timestamp
    (whole seconds), and prints that worker's message and traceback. Call this from the ``except`` block
    where the error is handled (the traceback is the one being handled). The first failure of a process
    wins: later calls leave the file alone. An error that only reports a lost peer (a ``DistError``, or gloo's
    "connection closed/reset by peer" as a ``RuntimeError``) is stamped one second later, so that the worker that
    really failed first wins a tie within the same second. Without ``TORCHELASTIC_ERROR_FILE`` (not under
    torchrun) nothing happens.
    """
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path or os.path.exists(path):
        return False
    from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

    ErrorHandler().record_exception(err)
    if _lost_peer(err):
        with open(path) as f:
            data = json.load(f)
        info = data["message"]["extraInfo"]
        info["timestamp"] = str(int(info["timestamp"]) + 1)
        with open(path, "w") as f:
            json.dump(data, f)
    return True
