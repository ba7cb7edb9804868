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

Data parallel (``torchrun --nproc_per_node=N``, see docs/training.md): when a process group is
initialised before the trainer is built, each global batch (the same batches as one process) is cut
into ``N`` contiguous slices, one per rank. Rank ``r`` back-propagates ``(n_r / b)`` times its slice's
task loss and activation terms (terms with non-empty ``layers``), and rank 0 alone adds the weight
terms (empty ``layers``, e.g. :class:`~semlens.train.regularizers.BlockNorm`); the gradients, a
has-gradient flag per parameter and the step's statistics are then summed in one flattened
``all_reduce``, so every rank holds the gradient of the full-batch objective and takes the same
optimizer step. Parameters and buffers are broadcast from rank 0 at the start, buffers (BatchNorm
running statistics) again after every step. Only rank 0 writes files or shows progress bars.

Other models (sequence models, multi-part objectives) plug in a ``step`` (``step(model, batch) ->``
:class:`~semlens.train.steps.StepOutput`: task loss, batch size, logged sums, tensors for the extra terms) and
train on a :class:`~semlens.train.steps.BatchSource` (the epoch's sample order and the batch of a set of
indices); ``param_groups`` sets optimizer groups (e.g. extra weight decay on one head), ``epoch_seed`` re-seeds
torch's RNG at the start of every epoch, and :class:`~semlens.train.callbacks.Callback` objects add
validation, model selection and early stopping (:class:`~semlens.train.callbacks.ModelSelection`). An extra
term may then also read step outputs (``inputs``) and return ``(value, {name: batch mean})`` to log more. A
custom step trains in one process (torchrun data parallelism is for the default classification step).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from semlens import distributed
from semlens.checkpoint import CheckpointError, save_weights
from semlens.layers import capture_activations, frozen
from semlens.runtime import progress, resolve_device
from semlens.train.callbacks import Callback
from semlens.train.steps import BatchSource, ClassificationStep, StepOutput, TrainStep

__all__ = ["TrainConfig", "Trainer", "ExtraTerm"]


class ExtraTerm(Protocol):
    """A loss term added to the task loss (regularizer, interpretive loss).

    ``layers``: dotted module names whose outputs are captured (with gradients) during the step's forward.
    Optional ``inputs``: names of the step's :attr:`~semlens.train.steps.StepOutput.outputs` the term reads.
    Both arrive in ``activations``. Returns a () tensor (added to the loss, logged under the term's name) or
    ``(tensor, {name: float})`` whose floats (batch means) are logged too.
    """

    layers: list[str]

    def __call__(self, model: nn.Module, activations: dict[str, Tensor]
                 ) -> Tensor | tuple[Tensor, dict[str, float]]: ...


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

    ``step``: a :class:`~semlens.train.steps.TrainStep` instead of the classification step; ``train_data`` is then
    a :class:`~semlens.train.steps.BatchSource`, and ``val_data`` / ``loss_fn`` are not used (validate in a
    callback). ``param_groups``: the optimizer's parameter groups (dicts with ``"params"`` and optional
    overrides such as ``"weight_decay"``; default: every trainable parameter). ``callbacks``: see
    :class:`~semlens.train.callbacks.Callback`. ``epoch_seed(epoch)``: re-seed torch's RNG (dropout) with this
    at the start of every epoch (default: seeded once per fit, its state checkpointed).
    """

    def __init__(self, model: nn.Module, train_data: Dataset | BatchSource, val_data: Dataset | None = None,
                 config: TrainConfig | None = None, extra_terms: Sequence[ExtraTerm] = (),
                 checkpoint_dir: str | os.PathLike | None = None, model_config: dict[str, Any] | None = None,
                 loss_fn: Any = None, *, step: TrainStep | None = None,
                 param_groups: Sequence[dict[str, Any]] | None = None, callbacks: Sequence[Callback] = (),
                 epoch_seed: Callable[[int], int] | None = None) -> None:
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
        self._check_step(step, loss_fn, val_data)
        self.custom_step = step is not None
        self.step: TrainStep = step if step is not None else ClassificationStep(loss_fn)
        self.param_groups = [dict(g) for g in param_groups] if param_groups is not None else None
        self.callbacks = list(callbacks)
        self.epoch_seed = epoch_seed
        self.device = resolve_device(self.config.device)
        if distributed.is_distributed() and self.device.type == "cuda" and self.device.index is None:
            # one GPU per process under torchrun: LOCAL_RANK picks it (and makes it current, for NCCL)
            self.device = torch.device("cuda", distributed.local_rank() % torch.cuda.device_count())
            torch.cuda.set_device(self.device)
        if len(train_data) == 0:  # type: ignore[arg-type]
            raise ValueError("train_data is empty")
        self.history: list[dict[str, Any]] = []
        #: called with each epoch's history record once the epoch is done (e.g. to print a loss line)
        self.on_epoch: Callable[[dict[str, Any]], None] | None = None
        self.global_step = 0
        #: the optimizer of the last :meth:`fit` (``None`` before)
        self.optimizer: torch.optim.Optimizer | None = None
        #: the last epoch's training samples and the seconds its batches took (for callbacks)
        self.epoch_samples, self.epoch_seconds = 0, 0.0

    def _check_step(self, step: TrainStep | None, loss_fn: Any, val_data: Dataset | None) -> None:
        """Refuse a custom step with classification-only arguments, a non-BatchSource or a process group."""
        if step is None:
            return
        if loss_fn is not None or val_data is not None:
            raise ValueError("loss_fn and val_data belong to the classification step; a custom step computes its "
                             "own loss (validate in a callback)")
        if not isinstance(self.train_data, BatchSource):
            raise TypeError(f"a custom step trains on a BatchSource (len, epoch_order, batch); got "
                            f"{type(self.train_data).__name__}")
        if distributed.is_distributed():
            raise ValueError("a custom step trains in one process: torchrun data parallelism supports the default "
                             "classification step only; run without torchrun")

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

    def _shard_batches(self, data: Dataset, order: Tensor, batch_size: int):
        """Yield ``(x, y, b)``: this rank's contiguous slice of each global batch of ``order`` and the global
        batch size ``b``; ``x`` and ``y`` are ``None`` where the slice is empty (batches smaller than the world).
        """
        r, w = distributed.rank(), distributed.world_size()
        parts = []
        for s in range(0, len(order), batch_size):
            b = min(batch_size, len(order) - s)
            mine = distributed.shard_indices(b, r, w)
            parts.append((order[s + mine.start: s + mine.stop], b))
        if isinstance(data, TensorDataset) and len(data.tensors) >= 2:
            x_all, y_all = data.tensors[0], data.tensors[1]
            for idx, b in parts:
                yield (x_all[idx], y_all[idx], b) if len(idx) else (None, None, b)
            return
        chunks = [idx.tolist() for idx, _ in parts if len(idx)]
        loader = iter(DataLoader(data, batch_sampler=chunks, num_workers=self.config.num_workers,
                                 generator=torch.Generator().manual_seed(self.config.seed)))
        for idx, b in parts:
            if len(idx):
                batch = next(loader)
                yield batch[0], batch[1], b
            else:
                yield None, None, b

    def _epoch_order(self, epoch: int) -> Tensor:
        if self.custom_step:
            return self.train_data.epoch_order(epoch)  # type: ignore[union-attr]
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.train_data), generator=g)  # type: ignore[arg-type]

    def _source_batches(self, order: Tensor, batch_size: int) -> Iterator[Any]:
        """Batches of the custom step's BatchSource for the sample indices ``order``, on the trainer's device."""
        for s in range(0, len(order), batch_size):
            yield self.train_data.batch(order[s: s + batch_size], self.device)  # type: ignore[union-attr]

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_data) / self.config.batch_size)  # type: ignore[arg-type]

    # -- optimisation ----------------------------------------------------------------------------
    def make_optimizer(self) -> torch.optim.Optimizer:
        """A fresh optimizer as :meth:`fit` builds it: ``config.optimizer`` over ``param_groups`` (default: every
        trainable parameter), with the config's learning rate, momentum and weight decay as defaults."""
        c = self.config
        if self.param_groups is not None:
            params: list[Any] = [dict(g) for g in self.param_groups]
        else:
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

    def _loss(self, batch: Any, which: Sequence[int] | None = None
              ) -> tuple[Tensor, StepOutput, list[Tensor], dict[str, float]]:
        """Run the step on one batch; return total loss, the step's output, the extra terms' values and the
        terms' extra logged values (batch means).

        ``which``: indices of the extra terms to evaluate (default all); the values follow that order.
        """
        which = range(len(self.extra_terms)) if which is None else which
        terms = [(self.term_names[i], self.extra_terms[i]) for i in which]
        layers = list(dict.fromkeys(n for _, t in terms for n in t.layers))
        if layers:
            with capture_activations(self.model, layers, detach=False) as acts:
                out = self.step(self.model, batch)
                captured = dict(acts)
        else:
            out, captured = self.step(self.model, batch), {}
        values, logs = [], {}
        for name, term in terms:
            v = term(self.model, self._term_inputs(name, term, captured, out))
            if isinstance(v, tuple):
                v, extra = v
                logs.update({k: float(x) for k, x in extra.items()})
            if not isinstance(v, Tensor) or v.numel() != 1:
                raise TypeError(f"extra term {name!r} must return a scalar tensor, got {type(v).__name__}")
            values.append(v.reshape(()))
        total = out.loss + sum(values) if values else out.loss
        return total, out, values, logs

    @staticmethod
    def _term_inputs(name: str, term: ExtraTerm, captured: dict[str, Tensor], out: StepOutput) -> dict[str, Any]:
        """What ``term`` reads: its captured layers and the step outputs it names in ``inputs``."""
        acts: dict[str, Any] = {k: captured[k] for k in term.layers}
        for k in getattr(term, "inputs", ()):
            if k not in out.outputs:
                raise KeyError(f"extra term {name!r} reads step output {k!r}, but the step gives "
                               f"{sorted(out.outputs)}")
            acts[k] = out.outputs[k]
        return acts

    # -- checkpoints -----------------------------------------------------------------------------
    def _weights_config(self, epoch: int) -> dict[str, Any]:
        return {**self.model_config, "train": asdict(self.config), "epoch": epoch, "step": self.global_step}

    def _save_checkpoint(self, opt: torch.optim.Optimizer, epoch: int, step_in_epoch: int,
                         running: dict[str, float]) -> None:
        if self.checkpoint_dir is None:
            return
        extra: dict[str, Any] = {}
        if distributed.is_distributed():  # collective: every rank's RNG states travel to rank 0
            extra["world_size"] = distributed.world_size()
            extra["rng_cpu_ranks"] = [t.cpu() for t in distributed.all_gather(torch.get_rng_state())]
            if self.device.type == "cuda":
                cuda_state = torch.cuda.get_rng_state(self.device)
                extra["rng_cuda_ranks"] = [t.cpu() for t in distributed.all_gather(cuda_state)]
            if distributed.rank() != 0:
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
            **extra,
        }
        tmp = d / "last.pt.tmp"
        torch.save(state, tmp)
        save_weights(self.model, d / "last.safetensors", config=self._weights_config(epoch))
        os.replace(tmp, d / "last.pt")

    def _load_checkpoint(self, opt: torch.optim.Optimizer) -> tuple[int, int, dict[str, float]] | None:
        if self.checkpoint_dir is None:
            return None
        path = self.checkpoint_dir / "last.pt"
        found = path.is_file()
        if distributed.is_distributed():
            distributed.barrier()  # rank 0 finished writing before anyone reads
            self._agree(float(found), f"{path} exists on some processes only: checkpoint_dir must be on a "
                                      "filesystem shared by all processes")
        if not found:
            return None
        error: Exception | None = None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        except Exception as err:  # noqa: BLE001 - any failure means an unusable checkpoint
            error = err
        if distributed.is_distributed():
            self._agree(float(error is not None), f"cannot resume from {path}: unreadable on some processes")
        if error is not None:
            raise CheckpointError(f"cannot resume from {path}: {type(error).__name__}: {error}") from error
        if distributed.is_distributed():
            self._agree(float(state["global_step"]), f"{path} differs between processes (global_step)")
        saved = state.get("config", {})
        keys = ("batch_size", "seed", "optimizer") + (("epochs",) if self.config.lr_schedule != "constant" else ())
        for key in keys:  # the number of epochs only shapes a decaying learning-rate schedule
            if saved.get(key) != getattr(self.config, key):
                raise CheckpointError(f"{path} was written with {key}={saved.get(key)!r}, but this run has "
                                      f"{key}={getattr(self.config, key)!r}; use another checkpoint_dir")
        self._restore_rng(state)
        self.global_step = int(state["global_step"])
        self.history = list(state["history"])
        return int(state["epoch"]), int(state["step_in_epoch"]), dict(state["running"])

    def _restore_rng(self, state: dict[str, Any]) -> None:
        """Put back the RNG states of a checkpoint: each rank its own when the world size is unchanged."""
        r, w = distributed.rank(), distributed.world_size()
        if w == 1 or state.get("world_size") == w:
            torch.set_rng_state(state["rng_cpu_ranks"][r] if w > 1 else state["rng_cpu"])
        elif r == 0:
            torch.set_rng_state(state.get("rng_cpu_ranks", [state["rng_cpu"]])[0])
        else:  # a different number of processes than the run that wrote it: fresh per-rank streams
            torch.manual_seed(self._rank_seed() + 1_000_003 * int(state["global_step"]))
        if w > 1 and state.get("world_size") == w and self.device.type == "cuda" and state.get("rng_cuda_ranks"):
            torch.cuda.set_rng_state(state["rng_cuda_ranks"][r], self.device)
        elif w == 1 and torch.cuda.is_available() and state["rng_cuda"]:
            torch.cuda.set_rng_state_all(state["rng_cuda"])

    # -- data parallel ---------------------------------------------------------------------------
    def _rank_seed(self) -> int:
        """Seed of this rank's torch RNG (dropout & co.): ``seed`` on rank 0, ``seed + r`` on rank r."""
        return self.config.seed + distributed.rank()

    def _agree(self, value: float, message: str) -> None:
        """Raise ``CheckpointError(message)`` on every rank unless ``value`` is the same on all ranks."""
        values = distributed.all_gather(torch.tensor([value], dtype=torch.float64, device=self.device))
        if any(v.item() != values[0].item() for v in values):
            raise CheckpointError(message)

    def _broadcast_tensors(self, tensors: Sequence[Tensor]) -> None:
        """Overwrite ``tensors`` with rank 0's values: one flattened broadcast per dtype."""
        groups: dict[torch.dtype, list[Tensor]] = {}
        for t in tensors:
            groups.setdefault(t.dtype, []).append(t)
        with torch.no_grad():
            for group in groups.values():
                flat = distributed.broadcast(torch.cat([t.reshape(-1) for t in group]))
                for t, v in zip(group, flat.split([t.numel() for t in group]), strict=True):
                    t.copy_(v.view_as(t))

    def _check_distributed_model(self) -> None:
        """Refuse set-ups that would fail or hang under a process group, naming the culprit."""
        sync = [n for n, m in self.model.named_modules() if isinstance(m, nn.SyncBatchNorm)]
        if not sync:
            return
        if self.device.type != "cuda":
            raise ValueError(f"SyncBatchNorm layers {sync} need CUDA tensors (torch {torch.__version__} has no CPU "
                             "SyncBatchNorm); use plain BatchNorm (rank 0's running statistics are broadcast)")
        n, b, w = len(self.train_data), self.config.batch_size, distributed.world_size()  # type: ignore[arg-type]
        if min(b, n % b or b) < w:
            raise ValueError(f"SyncBatchNorm needs every rank to get samples of every batch, but batch_size={b} with "
                             f"{n} samples leaves a batch smaller than the {w} processes; change batch_size")

    def _local_step(self, opt: torch.optim.Optimizer, batch: Any, epoch: int, step: int) -> dict[str, float]:
        """One optimizer step on the whole batch (one process).

        Returns the step's sums over its samples: ``loss``, ``task_loss``, one per extra term, the step's and the
        terms' logged values, and ``seen`` (the number of samples).
        """
        if not self.custom_step:
            x, y = batch
            batch = x.to(self.device), y.to(self.device)
            if not torch.isfinite(batch[0]).all():
                raise ValueError(f"training batch {step} of epoch {epoch} contains NaN or inf inputs")
        total, out, values, term_logs = self._loss(batch)
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss became {total.item()} at epoch {epoch}, step {step}")
        opt.zero_grad(set_to_none=True)
        total.backward()
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        opt.step()
        b = out.size
        sums = {"loss": total.item() * b, "task_loss": out.loss.item() * b,
                **{n: v.item() * b for n, v in zip(self.term_names, values, strict=True)}}
        sums.update(out.logs)
        sums.update({k: v * b for k, v in term_logs.items()})
        return {**sums, "seen": b}

    def _dist_step(self, opt: torch.optim.Optimizer, params: list[nn.Parameter], x: Tensor | None,
                   y: Tensor | None, b: int, epoch: int, step: int) -> list[float]:
        """One data-parallel optimizer step on this rank's slice ``x, y`` of a global batch of ``b`` samples.

        Returns the step's statistics summed over ranks: ``[loss·b, task·b, term_i·b..., correct, seen]``.
        """
        r = distributed.rank()
        dtype = functools.reduce(torch.promote_types, [p.dtype for p in params], torch.float32)
        weight_terms = [i for i, t in enumerate(self.extra_terms) if not t.layers and not getattr(t, "inputs", ())]
        batch_terms = [i for i, t in enumerate(self.extra_terms) if t.layers or getattr(t, "inputs", ())]
        stats = torch.zeros(5 + len(self.extra_terms), dtype=dtype, device=self.device)
        n = 0 if y is None else int(y.shape[0])
        opt.zero_grad(set_to_none=True)
        if n:
            x, y = x.to(self.device), y.to(self.device)  # type: ignore[union-attr]
            if not torch.isfinite(x).all():
                stats[0] = 1.0  # every rank raises below, after the all_reduce
                n = 0
        if n:
            which = batch_terms + (weight_terms if r == 0 else [])
            _, out, values, term_logs = self._loss((x, y), which)
            if term_logs:
                raise ValueError("extra terms that log more values train in one process; run without torchrun")
            task, logits = out.loss, out.outputs["logits"]
            per_sample = task + sum(values[: len(batch_terms)]) if batch_terms else task
            once = sum(values[len(batch_terms):]) if r == 0 and weight_terms else None
            objective = per_sample * (n / b) if once is None else per_sample * (n / b) + once
            objective.backward()
            with torch.no_grad():
                loss_sum = per_sample.detach() * n + (once.detach() * b if once is not None else 0.0)
                parts = [loss_sum, task.detach() * n]
                term_sums = [torch.zeros((), device=self.device)] * len(self.extra_terms)
                for k, (i, v) in enumerate(zip(which, values, strict=True)):
                    term_sums[i] = v.detach() * (n if k < len(batch_terms) else b)
                parts += term_sums
                if logits.dim() == 2 and y.dim() == 1:  # type: ignore[union-attr]
                    parts.append((logits.argmax(1) == y).sum())
                else:
                    parts.append(torch.zeros((), device=self.device))
                parts.append(torch.tensor(float(n), device=self.device))
                stats[1:] = torch.stack([p.to(dtype).reshape(()) for p in parts])
        # one flattened all_reduce: gradients | has-gradient flags | statistics
        grads = [p.grad.reshape(-1).to(dtype) if p.grad is not None
                 else torch.zeros(p.numel(), dtype=dtype, device=self.device) for p in params]
        flags = torch.tensor([float(p.grad is not None) for p in params], dtype=dtype, device=self.device)
        buf = distributed.all_reduce_sum(torch.cat([*grads, flags, stats]))
        total_stats = buf[-stats.numel():].tolist()
        if total_stats[0] > 0:
            raise ValueError(f"training batch {step} of epoch {epoch} contains NaN or inf inputs")
        if not math.isfinite(total_stats[1]):
            raise FloatingPointError(f"loss became {total_stats[1] / b} at epoch {epoch}, step {step}")
        offset, flags = 0, buf[-stats.numel() - len(params): -stats.numel()]
        for p, has in zip(params, flags.tolist(), strict=True):
            k = p.numel()
            p.grad = buf[offset: offset + k].view_as(p).to(p.dtype) if has > 0 else None
            offset += k
        if self.config.grad_clip is not None:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        opt.step()
        buffers = list(self.model.buffers())
        if buffers:
            self._broadcast_tensors(buffers)
        return total_stats[1:]

    # -- public API ------------------------------------------------------------------------------
    def fit(self) -> list[dict[str, Any]]:
        """Train for ``config.epochs`` epochs (resuming from ``checkpoint_dir/last.pt`` if present).

        Returns one dict per epoch: ``epoch``, ``loss``, ``task_loss``, one key per extra term,
        ``train_acc`` (running, on the training batches), ``val_acc`` (if val_data), ``lr``, ``seconds``.
        """
        was_training = self.model.training
        self.model.to(self.device)
        if distributed.is_distributed():
            self._check_distributed_model()
            self._broadcast_tensors([*self.model.parameters(), *self.model.buffers()])
        opt = self.optimizer = self.make_optimizer()
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        # dropout & co. draw from torch's RNG, seeded here and isolated from the caller's RNG state
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self._rank_seed())
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
            if "correct" in running:  # a mid-epoch checkpoint written before steps logged "train_acc" sums
                running["train_acc"] = running.pop("correct")
        for cb in self.callbacks:
            cb.on_fit_start(self)
        for epoch in range(start_epoch, c.epochs):
            if any(cb.should_stop(self) for cb in self.callbacks):
                break
            t0 = time.perf_counter()
            skip = start_step if epoch == start_epoch else 0
            if skip == 0:
                running = {"loss": 0.0, "task_loss": 0.0, **{n: 0.0 for n in self.term_names}, "seen": 0.0}
                if self.epoch_seed is not None:
                    torch.manual_seed(self.epoch_seed(epoch))
            self._run_epoch(opt, epoch, skip, running)
            self.epoch_samples, self.epoch_seconds = int(running["seen"]), time.perf_counter() - t0
            record = self._epoch_record(epoch, running)
            record["seconds"] = time.perf_counter() - t0
            for cb in self.callbacks:
                cb.on_epoch_end(self, epoch, record)
            self.history.append(record)
            self._save_checkpoint(opt, epoch + 1, 0, {})
            if self.on_epoch is not None and distributed.rank() == 0:
                self.on_epoch(record)
        for cb in self.callbacks:
            cb.on_fit_end(self)
        return self.history

    def _run_epoch(self, opt: torch.optim.Optimizer, epoch: int, skip: int, running: dict[str, float]) -> None:
        """Train the batches of epoch ``epoch`` from its step ``skip`` on, adding each step's sums to ``running``."""
        c = self.config
        n_steps = self.steps_per_epoch()
        parallel = distributed.is_distributed()
        params = [p for g in opt.param_groups for p in g["params"]]
        self.model.train()
        order = self._epoch_order(epoch)[skip * c.batch_size:]
        if parallel:
            batches = self._shard_batches(self.train_data, order, c.batch_size)  # type: ignore[arg-type]
        elif self.custom_step:
            batches = ((batch, None, 0) for batch in self._source_batches(order, c.batch_size))
        else:
            batches = ((x, y, 0) for x, y in self._batches(self.train_data, order, c.batch_size))  # type: ignore[arg-type]
        step = skip
        keys = ["loss", "task_loss", *self.term_names, "train_acc", "seen"]
        for x, y, b in progress(batches, total=n_steps - skip, desc=f"epoch {epoch + 1}/{c.epochs}",
                                enabled=c.show_progress if distributed.rank() == 0 else False):
            for group in opt.param_groups:
                group["lr"] = self._lr(self.global_step)
            if parallel:
                sums = dict(zip(keys, self._dist_step(opt, params, x, y, b, epoch, step), strict=True))
            else:
                sums = self._local_step(opt, x if self.custom_step else (x, y), epoch, step)
            for key, v in sums.items():
                running[key] = running.get(key, 0.0) + v
            step += 1
            self.global_step += 1
            if c.checkpoint_every and self.global_step % c.checkpoint_every == 0 and step < n_steps:
                self._save_checkpoint(opt, epoch, step, running)

    def _epoch_record(self, epoch: int, running: dict[str, float]) -> dict[str, Any]:
        """The history record of epoch ``epoch`` (0-based; recorded 1-based) from its running sums."""
        seen = max(running["seen"], 1.0)
        fixed = {"loss", "task_loss", "seen", *self.term_names}
        record: dict[str, Any] = {"epoch": epoch + 1, "loss": running["loss"] / seen,
                                  "task_loss": running["task_loss"] / seen,
                                  **{n: running[n] / seen for n in self.term_names},
                                  **{k: v / seen for k, v in running.items() if k not in fixed},
                                  "lr": self._lr(self.global_step)}
        if self.val_data is not None:
            record["val_acc"] = self.evaluate(self.val_data)
        return record

    @torch.no_grad()
    def evaluate(self, dataset: Dataset, batch_size: int | None = None) -> float:
        """Top-1 accuracy of the model on ``dataset`` of ``(x, y)`` (eval mode; model state restored).

        Under a process group this is collective (call it on every rank): each rank scores a contiguous
        shard and the correct counts are summed, so every rank returns the accuracy on the whole dataset.
        """
        n = len(dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError("cannot evaluate on an empty dataset")
        mine = distributed.shard_indices(n)
        correct = 0
        with frozen(self.model):
            for x, y in self._batches(dataset, torch.arange(mine.start, mine.stop),
                                      batch_size or max(256, self.config.batch_size)):
                logits = self.model(x.to(self.device))
                correct += (logits.argmax(1).cpu() == y.cpu()).sum().item()
        if distributed.is_distributed():
            correct = int(distributed.all_reduce_sum(torch.tensor([correct], device=self.device)).item())
        return correct / n

    def save(self, path: str | os.PathLike, extra_config: dict[str, Any] | None = None) -> Path:
        """Write the model's weights with ``model_config`` (+ history, + ``extra_config``) as safetensors.

        Under a process group only rank 0 writes (the weights are identical on every rank); all return the path.
        """
        cfg = {**self._weights_config(len(self.history)), "history": self.history, **(extra_config or {})}
        if distributed.rank() != 0:
            return Path(path)
        return save_weights(self.model, path, config=cfg)
