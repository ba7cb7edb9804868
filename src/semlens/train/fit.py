"""One small fitting helper for the library's auxiliary models (topic heads, probes, judges, frame CNNs):
Adam on ``loss_fn(batch indices)`` over a seeded batch schedule, without checkpoints or history.

The schedules are pure functions of their seed: :func:`shuffled_batches` (a fresh permutation every epoch,
cut into batches), :func:`sampled_batches` (independent draws with replacement), :func:`full_batches` (the
whole set every step). Dropout and other global randomness draw from torch's global RNG, which the helper does
not seed: seed it before building the module, as the callers do. For resumable training of a main model use
:class:`~semlens.train.Trainer`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import Tensor, nn

__all__ = ["fit_module", "shuffled_batches", "sampled_batches", "full_batches"]


def shuffled_batches(n: int, batch_size: int, epochs: int, seed: int = 0) -> Iterator[Tensor]:
    """Index batches (b,) int64 of ``epochs`` passes over ``range(n)``, each pass a new permutation drawn from one
    generator seeded with ``seed`` (drawn lazily, at the start of each pass), cut into ``batch_size`` chunks."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        yield from torch.randperm(n, generator=g).split(batch_size)


def sampled_batches(n: int, batch_size: int, steps: int, seed: int = 0) -> Iterator[Tensor]:
    """``steps`` index batches of ``min(batch_size, n)`` indices drawn with replacement from ``range(n)``."""
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(n, (min(batch_size, n),), generator=g)


def full_batches(steps: int) -> Iterator[None]:
    """``steps`` times ``None``: every step sees the whole set (full-batch optimisation)."""
    return itertools.repeat(None, steps)


def fit_module(params: Iterable[nn.Parameter], loss_fn: Callable[[Tensor | None], Tensor],
               batches: Iterable[Tensor | None], *, lr: float, weight_decay: float = 0.0,
               after_step: Callable[[int], None] | None = None) -> list[float]:
    """Adam (``lr``, ``weight_decay``) on ``params``: one step on ``loss_fn(idx)`` (a () tensor) for each ``idx`` of
    ``batches`` (index tensors (b,), or ``None`` for the whole set). ``after_step(i)`` runs after step ``i``
    (e.g. validation). Gradients are enabled even under ``torch.no_grad``. Returns each step's loss.
    """
    params = list(params)
    if not params:
        raise ValueError("fit_module needs at least one parameter")
    opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    losses: list[float] = []
    with torch.enable_grad():
        for i, idx in enumerate(batches):
            loss = loss_fn(idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if after_step is not None:
                after_step(i)
    return losses
