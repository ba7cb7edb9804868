"""A small, deterministic supervised trainer with checkpoint/resume and pluggable extra loss terms.

Determinism: the batch order of epoch ``e`` is a pure function of ``(seed, e)``; model init is the
caller's; dropout and other global randomness come from torch's RNG, whose state is checkpointed.
Killing a run and resuming from ``checkpoint_dir`` therefore gives bit-identical weights on CPU.

Checkpoint files (written atomically, every epoch and optionally every ``checkpoint_every`` steps):
``last.safetensors`` (model weights + JSON config, for users) and ``last.pt`` (model, optimizer and
RNG states, counters and history; loadable with ``torch.load(weights_only=True)``; used to resume).

Extra terms: any object with ``layers: list[str]`` (outputs captured with gradients during the
forward) and ``__call__(model, activations) -> scalar tensor`` added to the loss; its value is logged
under ``getattr(term, "name", type(term).__name__)``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from semlens.checkpoint import CheckpointError, save_weights
from semlens.layers import capture_activations, frozen
from semlens.runtime import progress, resolve_device

__all__ = ["TrainConfig", "Trainer", "ExtraTerm"]


class ExtraTerm(Protocol):
    """A loss term added to the task loss (regularizer, interpretive loss)."""

    layers: list[str]

    def __call__(self, model: nn.Module, activations: dict[str, Tensor]) -> Tensor: ...


@dataclass
class TrainConfig:
    """Training settings. ``lr_schedule``: ``"constant"`` or ``"cosine"`` (per step, to 0 at the end).

    ``checkpoint_every``: also checkpoint every this many optimizer steps (``None`` = per epoch only).
    ``num_workers``: DataLoader workers for generic datasets (tensor datasets are sliced directly).
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "constant"
    seed: int = 0
    device: str = "auto"
    checkpoint_every: int | None = None
    num_workers: int = 0
    grad_clip: float | None = None
    show_progress: bool | None = None

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {self.lr_schedule!r}")
        if self.checkpoint_every is not None and self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 or None, got {self.checkpoint_every}")


def _term_name(term: object, i: int, seen: set[str]) -> str:
    name = getattr(term, "name", None) or type(term).__name__
    if name in seen:
        name = f"{name}_{i}"
    seen.add(name)
    return name


class Trainer:
    """Train ``model`` on ``train_data`` (a Dataset of ``(x, y)``) with cross-entropy plus extra terms.

    ``fit()`` returns the history (one dict per epoch) and leaves the model on the configured device
    with its original train/eval mode. ``model_config`` is stored as JSON in every ``.safetensors``
    file written (e.g. ``{"model": "alexnet-like", "model_kwargs": {...}}``).
    """

    def __init__(self, model: nn.Module, train_data: Dataset, val_data: Dataset | None = None,
                 config: TrainConfig | None = None, extra_terms: Sequence[ExtraTerm] = (),
                 checkpoint_dir: str | os.PathLike | None = None, model_config: dict[str, Any] | None = None,
                 loss_fn: Any = None) -> None:
        self.model = model
        self.train_data = train_data
        self.val_data = val_data
        self.config = config or TrainConfig()
        self.extra_terms = list(extra_terms)
        for t in self.extra_terms:
            if not callable(t) or not hasattr(t, "layers"):
                raise TypeError(f"extra term {t!r} needs a 'layers' attribute and __call__(model, activations)")
        seen: set[str] = set()
        self.term_names = [_term_name(t, i, seen) for i, t in enumerate(self.extra_terms)]
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.model_config = dict(model_config or {})
        self.loss_fn = loss_fn or F.cross_entropy
        self.device = resolve_device(self.config.device)
        if len(train_data) == 0:  # type: ignore[arg-type]
            raise ValueError("train_data is empty")
        self.history: list[dict[str, Any]] = []
        self.global_step = 0

    # -- data ------------------------------------------------------------------------------------
    def _batches(self, data: Dataset, order: Tensor, batch_size: int):
        """Yield ``(x, y)`` batches of ``data`` in the order of ``order`` (1-D index tensor)."""
        if isinstance(data, TensorDataset) and len(data.tensors) >= 2:
            x_all, y_all = data.tensors[0], data.tensors[1]
            for s in range(0, len(order), batch_size):
                idx = order[s: s + batch_size]
                yield x_all[idx], y_all[idx]
            return
        chunks = [order[s: s + batch_size].tolist() for s in range(0, len(order), batch_size)]
        # an own generator keeps the loader from drawing its base seed from torch's global RNG
        loader = DataLoader(data, batch_sampler=chunks, num_workers=self.config.num_workers,
                            generator=torch.Generator().manual_seed(self.config.seed))
        for batch in loader:
            yield batch[0], batch[1]

    def _epoch_order(self, epoch: int) -> Tensor:
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_data), generator=g)  # type: ignore[arg-type]

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_data) / self.config.batch_size)  # type: ignore[arg-type]

    # -- optimisation ----------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"{type(self.model).__name__} has no trainable parameters")
        if c.optimizer == "sgd":
            return torch.optim.SGD(params, lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay)
        return torch.optim.Adam(params, lr=c.lr, weight_decay=c.weight_decay)

    def _lr(self, step: int) -> float:
        c = self.config
        if c.lr_schedule == "constant":
            return c.lr
        total = max(1, c.epochs * self.steps_per_epoch())
        return c.lr * 0.5 * (1 + math.cos(math.pi * min(step, total) / total))

    def _loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
        """Forward one batch; return total loss, task loss, logits and the extra terms' values."""
        layers = list(dict.fromkeys(n for t in self.extra_terms for n in t.layers))
        if layers:
            with capture_activations(self.model, layers, detach=False) as acts:
                logits = self.model(x)
                captured = dict(acts)
        else:
            logits, captured = self.model(x), {}
        task = self.loss_fn(logits, y)
        values = []
        for name, term in zip(self.term_names, self.extra_terms, strict=True):
            v = term(self.model, {k: captured[k] for k in term.layers})
            if not isinstance(v, Tensor) or v.numel() != 1:
                raise TypeError(f"extra term {name!r} must return a scalar tensor, got {type(v).__name__}")
            values.append(v.reshape(()))
        total = task + sum(values) if values else task
        return total, task, logits, values

    # -- checkpoints -----------------------------------------------------------------------------
    def _weights_config(self, epoch: int) -> dict[str, Any]:
        return {**self.model_config, "train": asdict(self.config), "epoch": epoch, "step": self.global_step}

    def _save_checkpoint(self, opt: torch.optim.Optimizer, epoch: int, step_in_epoch: int,
                         running: dict[str, float]) -> None:
        if self.checkpoint_dir is None:
            return
        d = self.checkpoint_dir
        d.mkdir(parents=True, exist_ok=True)
        state = {
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            "optimizer": opt.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": self.global_step,
            "running": dict(running),
            "history": list(self.history),
            "config": asdict(self.config),
        }
        tmp = d / "last.pt.tmp"
        torch.save(state, tmp)
        save_weights(self.model, d / "last.safetensors", config=self._weights_config(epoch))
        os.replace(tmp, d / "last.pt")

    def _load_checkpoint(self, opt: torch.optim.Optimizer) -> tuple[int, int, dict[str, float]] | None:
        if self.checkpoint_dir is None or not (self.checkpoint_dir / "last.pt").is_file():
            return None
        path = self.checkpoint_dir / "last.pt"
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except Exception as err:  # noqa: BLE001 - any failure means an unusable checkpoint
            raise CheckpointError(f"cannot resume from {path}: {type(err).__name__}: {err}") from err
        saved = state.get("config", {})
        for key in ("batch_size", "seed", "epochs", "optimizer"):
            if saved.get(key) != getattr(self.config, key):
                raise CheckpointError(f"{path} was written with {key}={saved.get(key)!r}, but this run has "
                                      f"{key}={getattr(self.config, key)!r}; use another checkpoint_dir")
        torch.set_rng_state(state["rng_cpu"])
        if torch.cuda.is_available() and state["rng_cuda"]:
            torch.cuda.set_rng_state_all(state["rng_cuda"])
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        return int(state["epoch"]), int(state["step_in_epoch"]), dict(state["running"])

    # -- public API ------------------------------------------------------------------------------
    def fit(self) -> list[dict[str, Any]]:
        """Train for ``config.epochs`` epochs (resuming from ``checkpoint_dir/last.pt`` if present).

        Returns one dict per epoch: ``epoch``, ``loss``, ``task_loss``, one key per extra term,
        ``train_acc`` (running, on the training batches), ``val_acc`` (if val_data), ``lr``, ``seconds``.
        """
        c = self.config
        was_training = self.model.training
        self.model.to(self.device)
        opt = self._make_optimizer()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        # dropout & co. draw from torch's RNG, seeded here and isolated from the caller's RNG state
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(c.seed)
            try:
                return self._fit(opt)
            finally:
                self.model.train(was_training)

    def _fit(self, opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
        c = self.config
        start_epoch, start_step, running = 0, 0, {}
        self.history, self.global_step = [], 0
        resumed = self._load_checkpoint(opt)
        if resumed is not None:
            start_epoch, start_step, running = resumed
        n_steps = self.steps_per_epoch()
        for epoch in range(start_epoch, c.epochs):
            t0 = time.perf_counter()
            self.model.train()
            skip = start_step if epoch == start_epoch else 0
            if skip == 0:
                running = {"loss": 0.0, "task_loss": 0.0, "correct": 0.0, "seen": 0.0,
                           **{n: 0.0 for n in self.term_names}}
            order = self._epoch_order(epoch)[skip * c.batch_size:]
            batches = self._batches(self.train_data, order, c.batch_size)
            step = skip
            for x, y in progress(batches, total=n_steps - skip, desc=f"epoch {epoch + 1}/{c.epochs}",
                                 enabled=c.show_progress):
                x, y = x.to(self.device), y.to(self.device)
                if not torch.isfinite(x).all():
                    raise ValueError(f"training batch {step} of epoch {epoch} contains NaN or inf inputs")
                for group in opt.param_groups:
                    group["lr"] = self._lr(self.global_step)
                total, task, logits, values = self._loss(x, y)
                if not torch.isfinite(total):
                    raise FloatingPointError(f"loss became {total.item()} at epoch {epoch}, step {step}")
                opt.zero_grad(set_to_none=True)
                total.backward()
                if c.grad_clip is not None:
                    nn.utils.clip_grad_norm_(self.model.parameters(), c.grad_clip)
                opt.step()
                b = y.shape[0]
                running["loss"] += total.item() * b
                running["task_loss"] += task.item() * b
                for name, v in zip(self.term_names, values, strict=True):
                    running[name] += v.item() * b
                if logits.dim() == 2 and y.dim() == 1:
                    running["correct"] += (logits.argmax(1) == y).sum().item()
                running["seen"] += b
                step += 1
                self.global_step += 1
                if c.checkpoint_every and self.global_step % c.checkpoint_every == 0 and step < n_steps:
                    self._save_checkpoint(opt, epoch, step, running)
            seen = max(running["seen"], 1.0)
            record: dict[str, Any] = {"epoch": epoch + 1, "loss": running["loss"] / seen,
                                      "task_loss": running["task_loss"] / seen,
                                      **{n: running[n] / seen for n in self.term_names},
                                      "train_acc": running["correct"] / seen, "lr": self._lr(self.global_step)}
            if self.val_data is not None:
                record["val_acc"] = self.evaluate(self.val_data)
            record["seconds"] = time.perf_counter() - t0
            self.history.append(record)
            self._save_checkpoint(opt, epoch + 1, 0, {})
        return self.history

    @torch.no_grad()
    def evaluate(self, dataset: Dataset, batch_size: int | None = None) -> float:
        """Top-1 accuracy of the model on ``dataset`` of ``(x, y)`` (eval mode; model state restored)."""
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("cannot evaluate on an empty dataset")
        correct = 0
        with frozen(self.model):
            for x, y in self._batches(dataset, torch.arange(n), batch_size or max(256, self.config.batch_size)):
                logits = self.model(x.to(self.device))
                correct += (logits.argmax(1).cpu() == y.cpu()).sum().item()
        return correct / n

    def save(self, path: str | os.PathLike, extra_config: dict[str, Any] | None = None) -> Path:
        """Write the model's weights with ``model_config`` (+ history, + ``extra_config``) as safetensors."""
        cfg = {**self._weights_config(len(self.history)), "history": self.history, **(extra_config or {})}
        return save_weights(self.model, path, config=cfg)
