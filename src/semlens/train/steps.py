"""What one training step of :class:`~semlens.train.Trainer` computes, and where its batches come from.

A *step* maps ``(model, batch)`` to a :class:`StepOutput`: the batch's task loss (mean over its samples), the
number of samples, values to log and tensors that extra terms may use (``ExtraTerm.inputs``). The default,
:class:`ClassificationStep`, is cross-entropy on ``(x, y)`` batches of a ``Dataset``; a sequence model brings
its own step (e.g. :class:`semlens.captioning.training.CaptionStep`) and a :class:`BatchSource`, which draws
the epoch's sample order and forms the batch of a set of sample indices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["StepOutput", "TrainStep", "BatchSource", "ClassificationStep"]


@dataclass
class StepOutput:
    """The result of one training step on a batch of ``size`` samples.

    ``loss``: () task loss, the mean over the batch's samples (extra terms are added by the trainer).
    ``logs``: values to log, each the *sum* over the batch's samples (the epoch record holds sum / samples,
    e.g. ``{"train_acc": number correct}``). ``outputs``: tensors handed to the extra terms that name them
    in ``inputs`` (e.g. ``{"vbar": (B, D), "topic_target": (B, K)}``; ``None`` where the batch has none).
    """

    loss: Tensor
    size: int
    logs: dict[str, float] = field(default_factory=dict)
    outputs: dict[str, Tensor | None] = field(default_factory=dict)


class TrainStep(Protocol):
    """``step(model, batch) -> StepOutput``: the forward pass and task loss of one batch (training mode;
    the trainer back-propagates, clips and steps the optimizer)."""

    def __call__(self, model: nn.Module, batch: Any) -> StepOutput: ...


@runtime_checkable
class BatchSource(Protocol):
    """The training data of a custom step.

    ``len(source)``: samples per epoch (sets the number of steps per epoch). ``epoch_order(epoch)``: (n,) int64
    indices of the samples of epoch ``epoch`` in training order (a pure function of the epoch, so a resumed run
    sees the same batches). ``batch(idx, device)``: the step's input for the samples ``idx`` (b,), on ``device``.
    """

    def __len__(self) -> int: ...

    def epoch_order(self, epoch: int) -> Tensor: ...

    def batch(self, idx: Tensor, device: torch.device) -> Any: ...


class ClassificationStep:
    """The default step: ``loss_fn(model(x), y)`` (cross-entropy) on an ``(x, y)`` batch.

    Logs ``train_acc`` (correct predictions, for (B, C) logits and (B,) labels; 0 otherwise); outputs
    ``logits`` (B, C) and ``targets`` (B,).
    """

    def __init__(self, loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None) -> None:
        self.loss_fn = loss_fn or F.cross_entropy

    def __call__(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> StepOutput:
        x, y = batch
        logits = model(x)
        task = self.loss_fn(logits, y)
        correct = (logits.argmax(1) == y).sum().item() if logits.dim() == 2 and y.dim() == 1 else 0
        return StepOutput(task, int(y.shape[0]), {"train_acc": float(correct)}, {"logits": logits, "targets": y})
