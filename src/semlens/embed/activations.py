"""Layer activations for explanation embeddings, streamed in batches.

A layer's output is turned into one vector per image: linear layers give ``(N, d)`` directly; conv maps
``(N, C, H, W)`` are **average-pooled over positions** to ``(N, C)``. Why pooled rather than per position: the
faithfulness target of the SRAE is the class logit, an image-level number, so every training vector needs its own
logit; per-position vectors share one logit among ``H*W`` positions (the per-position regression is ill-posed) and
multiply the data ``H*W``-fold. Where an x-feature sits in the image is recovered afterwards by its heatmap
(:mod:`semlens.embed.heatmaps`), and a pooled channel's relevance flows back to every position exactly (the average
is linear).

:func:`collect_activations` runs the model once over a dataset in batches and writes the vectors and logits to an
:class:`ActivationStore` — a NumPy memory map on disk when ``path`` is given (only one batch in RAM), in memory
otherwise. Fitting then streams shuffled batches from the store.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from semlens.layers import capture_activations, frozen, get_module
from semlens.runtime import progress

__all__ = ["ActivationStore", "collect_activations", "pool_activation", "NonFiniteActivationError", "as_loader"]


class NonFiniteActivationError(ValueError):
    """Activations (or logits) containing NaN/Inf."""


def pool_activation(out: torch.Tensor) -> torch.Tensor:
    """``(N, d)`` from a layer output: ``(N, d)`` unchanged, ``(N, C, *spatial)`` averaged over positions."""
    if out.ndim == 2:
        return out
    if out.ndim < 2:
        raise ValueError(f"layer output must be batched (N, ...), got shape {tuple(out.shape)}")
    return out.flatten(2).mean(2)


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise :class:`NonFiniteActivationError` naming ``what`` and the first bad rows."""
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        rows = bad.reshape(t.shape[0], -1).any(1).nonzero().flatten().tolist()
        raise NonFiniteActivationError(f"{what} contain NaN/Inf (rows {rows[:10]})")


@dataclass
class ActivationStore:
    """Pooled activations ``z`` ``(N, d)``, model logits ``(N, C)`` and labels ``(N,)`` of one split.

    Arrays are NumPy (possibly memory-mapped). ``layer``/``model_name`` record where they came from.
    """

    z: np.ndarray
    logits: np.ndarray
    labels: np.ndarray
    layer: str = ""
    model_name: str = ""

    def __post_init__(self) -> None:
        if self.z.ndim != 2 or self.logits.ndim != 2 or self.z.shape[0] != self.logits.shape[0]:
            raise ValueError(f"activation store needs z (N, d) and logits (N, C) with equal N, got "
                             f"{self.z.shape} and {self.logits.shape}")

    @classmethod
    def from_arrays(cls, z: np.ndarray | torch.Tensor, logits: np.ndarray | torch.Tensor,
                    labels: np.ndarray | torch.Tensor | None = None, layer: str = "") -> ActivationStore:
        """In-memory store from ``z`` ``(N, d)`` and targets ``(N,)`` or ``(N, C)``; checks finiteness."""
        zt, yt = torch.as_tensor(z, dtype=torch.float32), torch.as_tensor(logits, dtype=torch.float32)
        if yt.ndim == 1:
            yt = yt[:, None]
        if zt.ndim != 2:
            raise ValueError(f"activations must be (N, d), got shape {tuple(zt.shape)}")
        check_finite(zt, f"activations of layer {layer!r}" if layer else "activations")
        check_finite(yt, "targets")
        lab = np.zeros(len(zt), np.int64) if labels is None else np.asarray(labels, np.int64)
        return cls(zt.numpy(), yt.numpy(), lab, layer)

    def __len__(self) -> int:
        return int(self.z.shape[0])

    @property
    def dim(self) -> int:
        return int(self.z.shape[1])

    @property
    def n_classes(self) -> int:
        return int(self.logits.shape[1])

    def batches(self, batch_size: int, shuffle: bool = False, generator: torch.Generator | None = None,
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield ``(z (B, d), logits (B, C), labels (B,))`` float32 tensors; shuffled order when asked."""
        n = len(self)
        order = torch.randperm(n, generator=generator).numpy() if shuffle else None
        for start in range(0, n, batch_size):
            if order is None:
                idx: slice | np.ndarray = slice(start, start + batch_size)
            else:
                idx = np.sort(order[start:start + batch_size])
            yield (torch.from_numpy(np.array(self.z[idx], np.float32)),  # copies: memory maps may be read-only
                   torch.from_numpy(np.array(self.logits[idx], np.float32)),
                   torch.from_numpy(np.array(self.labels[idx], np.int64)))

    def moments(self, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-dimension mean and standard deviation ``(d,)`` (float64 accumulation, one streamed pass)."""
        s = torch.zeros(self.dim, dtype=torch.float64)
        ss = torch.zeros(self.dim, dtype=torch.float64)
        for z, _, _ in self.batches(chunk):
            z = z.double()
            s += z.sum(0)
            ss += (z * z).sum(0)
        n = max(len(self), 1)
        mean = s / n
        var = (ss / n - mean * mean).clamp(min=0)
        return mean.float(), var.sqrt().float()


def as_loader(data: Dataset | DataLoader | torch.Tensor, batch_size: int) -> DataLoader:
    """A DataLoader over ``data`` (a Dataset yielding ``(x, y)`` or ``x``, a DataLoader, or an image tensor)."""
    if isinstance(data, DataLoader):
        return data
    if isinstance(data, torch.Tensor):
        data = TensorDataset(data, torch.zeros(len(data), dtype=torch.int64))
    return DataLoader(data, batch_size=batch_size, shuffle=False)


def _split(batch: object) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None  # type: ignore[return-value]


def collect_activations(model: nn.Module, layer: str, data: Dataset | DataLoader | torch.Tensor, *,
                        batch_size: int = 128, path: str | Path | None = None, device: str | torch.device = "cpu",
                        model_name: str = "") -> ActivationStore:
    """Run ``model`` over ``data`` once and store the pooled output of ``layer`` with the logits.

    Args:
        model: maps images ``(B, 3, H, W)`` to logits ``(B, C)``; state is restored afterwards.
        layer: dotted module name (unknown names raise ``UnknownLayerError`` with suggestions).
        data: a Dataset of ``(image, label)`` / images, a DataLoader, or an image tensor ``(N, 3, H, W)``.
        path: directory for memory-mapped ``z.npy``/``logits.npy``/``labels.npy`` (None: in memory).

    Returns:
        :class:`ActivationStore` with ``z`` ``(N, d)`` float32 (pooled for conv layers), ``logits`` ``(N, C)``.
    """
    get_module(model, layer)
    loader = as_loader(data, batch_size)
    n = len(loader.dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError("the dataset is empty")
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    device = torch.device(device)
    with frozen(model), capture_activations(model, layer, transform=lambda _n, t: pool_activation(t)) as store, \
            torch.no_grad():
        for batch in progress(loader, total=math.ceil(n / (loader.batch_size or 1)), desc=f"activations {layer}"):
            x, y = _split(batch)
            logits = model(x.to(device))
            z = store[layer]
            check_finite(z, f"activations of layer {layer!r}")
            check_finite(logits, "model logits")
            if not arrays:
                arrays = _allocate(path, n, z.shape[1], logits.shape[1])
            b = z.shape[0]
            arrays["z"][offset:offset + b] = z.float().cpu().numpy()
            arrays["logits"][offset:offset + b] = logits.float().cpu().numpy()
            arrays["labels"][offset:offset + b] = (y.cpu().numpy() if y is not None else 0)
            offset += b
    return ActivationStore(arrays["z"], arrays["logits"], arrays["labels"], layer, model_name)


def _allocate(path: str | Path | None, n: int, d: int, c: int) -> dict[str, np.ndarray]:
    shapes = {"z": ((n, d), np.float32), "logits": ((n, c), np.float32), "labels": ((n,), np.int64)}
    if path is None:
        return {k: np.zeros(s, t) for k, (s, t) in shapes.items()}
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    return {k: np.lib.format.open_memmap(root / f"{k}.npy", mode="w+", dtype=t, shape=s)
            for k, (s, t) in shapes.items()}
