"""Run a dataset through a model in batches: progress, atomic checkpoint/resume, torch.distributed sharding.

The shared streaming core of every dataset-wide job (dissection, activation statistics, ...):

* :func:`run_batches` walks this process's shard of ``range(n)`` in fixed batches and calls
  ``step(indices, batch_number)``; the job's accumulators (any object with ``state_dict()`` /
  ``load_state_dict()`` over tensors) are saved atomically every ``every`` batches together with
  the position, and a restarted run continues after the last saved batch.
* :func:`forward_until` runs a model only as far as the deepest requested layer and returns the
  captured outputs.
* :func:`all_gather_cat` concatenates per-process tensors (e.g. top-k buffers) on every process.

Checkpoints carry a JSON "fingerprint" of the job (data size, batch size, layers, options, world
size); resuming with a different fingerprint raises :class:`ResumeMismatchError` instead of
silently mixing two jobs.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from semlens import distributed
from semlens.layers import HookHandles, resolve_layers
from semlens.runtime import progress

__all__ = [
    "Stateful",
    "StreamInfo",
    "ResumeMismatchError",
    "run_batches",
    "batch_slices",
    "checkpoint_path",
    "save_state",
    "load_state",
    "forward_until",
    "ForwardTap",
    "worker_index",
    "all_gather_cat",
]

_POSITION = "__position__"
_META = "semlens_stream"


class Stateful(Protocol):
    """Anything whose progress is a dict of tensors."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


class ResumeMismatchError(ValueError):
    """A checkpoint written by a different job (other data, layers or options)."""


@dataclass
class StreamInfo:
    """What :func:`run_batches` did: batches in this shard, first batch run here, shard indices."""

    batches: int
    resumed_at: int
    indices: range


def batch_slices(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    """Split ``indices`` into consecutive batches of ``batch_size`` (the last may be shorter)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    idx = list(indices)
    return [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]


def checkpoint_path(path: str | os.PathLike) -> Path:
    """This process's checkpoint file: ``path`` itself in one process, ``stem.rankR-of-W.suffix`` when sharded."""
    path = Path(path)
    if distributed.world_size() == 1:
        return path
    return path.with_name(f"{path.stem}.rank{distributed.rank()}-of-{distributed.world_size()}{path.suffix}")


def save_state(path: str | os.PathLike, state: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> None:
    """Write tensors + JSON metadata to a safetensors file atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={_META: json.dumps(dict(meta), sort_keys=True)})
    os.replace(tmp, path)


def load_state(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a file written by :func:`save_state`; a corrupt file raises ``ValueError`` naming it."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(_META, "{}"))
        return load_file(str(path)), meta
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}; delete it to start over") from err


def run_batches(
    n: int,
    batch_size: int,
    step: Callable[[list[int], int], None],
    *,
    accumulator: Stateful | None = None,
    checkpoint: str | os.PathLike | None = None,
    every: int = 10,
    fingerprint: Mapping[str, Any] | None = None,
    shard: bool = True,
    desc: str = "",
    show_progress: bool | None = None,
    workers: int = 1,
) -> StreamInfo:
    """Call ``step(indices, b)`` for every batch ``b`` of this process's shard of ``range(n)``.

    With ``checkpoint`` (a file path; one file per rank when sharded) the accumulator's state and the
    number of finished batches are saved atomically every ``every`` batches and after the last one;
    an existing checkpoint with the same ``fingerprint`` is loaded first and finished batches are
    skipped. ``step`` must update only the accumulator (or state it can rebuild), so a resumed run
    ends in the same state as an uninterrupted one. Reducing across processes is the caller's job
    once this returns (e.g. :func:`semlens.distributed.all_reduce_sum`).

    ``workers`` > 1 (CPU): batches run side by side on that many threads, each with one intra-op thread
    (``torch.set_num_threads(1)`` meanwhile, restored after), in any order; ``step`` must then be thread-safe
    and keep per-worker state by :func:`worker_index`, and ``accumulator.state_dict()`` must combine the
    workers' states. On small layers this beats intra-op threads, which leave the per-batch bookkeeping
    serial.
    """
    if n < 1:
        raise ValueError("the dataset is empty")
    indices = distributed.shard_indices(n) if shard else range(n)
    batches = batch_slices(indices, batch_size)
    meta = {"fingerprint": dict(fingerprint or {}), "n": n, "batch_size": batch_size,
            "world_size": distributed.world_size() if shard else 1}
    start = 0
    ckpt = checkpoint_path(checkpoint) if checkpoint is not None else None
    if ckpt is not None and ckpt.exists():
        state, saved = load_state(ckpt)
        if saved.get("meta") != json.loads(json.dumps(meta)):
            raise ResumeMismatchError(
                f"checkpoint {ckpt} belongs to a different job ({saved.get('meta')}); delete it to start over"
            )
        start = int(state.pop(_POSITION))
        if accumulator is not None:
            accumulator.load_state_dict(state)

    def save(position: int) -> None:
        if ckpt is None:
            return
        state = dict(accumulator.state_dict()) if accumulator is not None else {}
        state[_POSITION] = torch.tensor(position)
        save_state(ckpt, state, {"meta": meta})

    if workers <= 1:
        for b in progress(range(start, len(batches)), total=len(batches) - start, desc=desc, enabled=show_progress):
            step(batches[b], b)
            if (b + 1) % every == 0 or b + 1 == len(batches):
                save(b + 1)
    else:
        _run_on_workers(batches, start, step, save, every if ckpt is not None else len(batches), workers, desc,
                        show_progress)
    if start == len(batches):
        save(start)
    return StreamInfo(batches=len(batches), resumed_at=start, indices=indices)


_worker = threading.local()


def worker_index() -> int:
    """Which :func:`run_batches` worker thread runs the caller (0 .. workers − 1; 0 outside workers)."""
    return getattr(_worker, "index", 0)


def _run_on_workers(batches: list[list[int]], start: int, step: Callable[[list[int], int], None],
                    save: Callable[[int], None], every: int, workers: int, desc: str,
                    show_progress: bool | None) -> None:
    """Batches ``start ..`` on ``workers`` threads with one intra-op thread each, ``every`` batches between saves.

    Each thread keeps one worker index for the whole run (its per-worker state in ``step``); a chunk of
    ``every`` batches finishes completely before the accumulators are saved, so a checkpoint never holds a
    batch twice or skips one. The first error cancels what has not started and is raised.
    """
    counter = iter(range(workers))
    lock = threading.Lock()

    def init() -> None:
        with lock:
            _worker.index = next(counter)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers share the cores: one intra-op thread each (threads start after this)
    pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="semlens-batch", initializer=init)
    try:
        bar = progress(iter(range(start, len(batches))), total=len(batches) - start, desc=desc,
                       enabled=show_progress)
        for lo in range(start, len(batches), every):
            hi = min(len(batches), (lo // every + 1) * every)
            futures = [pool.submit(step, batches[b], b) for b in range(lo, hi)]
            try:
                for f in concurrent.futures.as_completed(futures):
                    f.result()
                    next(bar, None)
            except BaseException:
                for f in futures:
                    f.cancel()
                concurrent.futures.wait(futures)
                raise
            save(hi)
        for _ in bar:  # close the bar
            pass
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads)


class _Stop(Exception):
    """Raised inside a hook to end a forward pass once every requested output is captured."""


class ForwardTap:
    """Hooks on named layers, registered once, that capture their outputs and stop the forward after the deepest.

    ``with ForwardTap(model, layers) as tap: out = tap(x)``: ``tap(x)`` runs ``model(x)`` only as far as the
    deepest requested layer and returns ``{name: output}``. Calls from several threads at once are safe (each
    thread captures its own forward; the hooks do nothing for forwards outside a call), which is what
    :func:`run_batches` workers need; registering hooks per call would mutate a module's hook table while
    another thread iterates it. Hooks are removed on every exit path.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], *, detach: bool = True) -> None:
        self.model, self.detach = model, detach
        self.modules = resolve_layers(model, list(layers))
        self._local = threading.local()
        self._handles = HookHandles()

    def __enter__(self) -> ForwardTap:
        try:
            for name, module in self.modules.items():
                self._handles.add(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self._handles.remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._handles.remove()

    def _hook(self, name: str) -> Callable[[nn.Module, object, object], None]:
        def hook(_m: nn.Module, _i: object, out: object) -> None:
            store = getattr(self._local, "store", None)
            if store is None or name in store:  # a forward outside a call of this thread, or a second use
                return
            t = out[0] if isinstance(out, (tuple, list)) else out
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"layer {name!r} returned {type(out).__name__}, not a tensor")
            store[name] = t.detach() if self.detach else t
            if len(store) == len(self.modules):
                raise _Stop

        return hook

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        store: dict[str, torch.Tensor] = {}
        self._local.store = store
        try:
            self.model(x)
        except _Stop:
            pass
        finally:
            self._local.store = None
        missing = [n for n in self.modules if n not in store]
        if missing:
            raise ValueError(f"layers {missing} did not run during the forward pass")
        return store


def forward_until(model: nn.Module, x: torch.Tensor, layers: Sequence[str], *,
                  detach: bool = True) -> dict[str, torch.Tensor]:
    """Run ``model(x)`` until each named layer has produced its output (first call) and return them.

    Layers after the deepest requested one are not computed. Hooks are removed on every exit path.
    Outputs are detached unless ``detach=False`` (then they keep their autograd graph, e.g. for a loss on
    them). A module that returns a tuple contributes its first tensor. (:class:`ForwardTap` for many calls.)
    """
    with ForwardTap(model, layers, detach=detach) as tap:
        return tap(x)


def all_gather_cat(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Concatenate ``t`` from every process along ``dim`` (rank order); ``t`` itself in one process.

    Tensors may differ in size along ``dim`` (they are padded for the exchange and trimmed after).
    """
    if not distributed.is_distributed():
        return t
    w = distributed.world_size()
    size = torch.tensor([t.shape[dim]], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(size) for _ in range(w)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    pad_shape = list(t.shape)
    pad_shape[dim] = longest - t.shape[dim]
    padded = torch.cat([t, torch.zeros(pad_shape, dtype=t.dtype, device=t.device)], dim=dim)
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p.narrow(dim, 0, int(s.item())) for p, s in zip(parts, sizes, strict=True)], dim=dim)
