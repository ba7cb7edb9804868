"""Hooks into :meth:`semlens.train.Trainer.fit`: :class:`Callback` (all methods optional) and
:class:`ModelSelection` (keep the weights with the best validation score, early stopping, resumable)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from semlens import distributed
from semlens.checkpoint import CheckpointError, load_state_dict, save_weights

if TYPE_CHECKING:
    from semlens.train.trainer import Trainer

__all__ = ["Callback", "ModelSelection"]


class Callback:
    """Hooks called by :meth:`Trainer.fit`, in the order the callbacks were given. Epochs are 0-based here.

    ``on_fit_start``: after a checkpoint was resumed (``trainer.history`` holds its epochs) or not.
    ``should_stop``: before every epoch; ``True`` ends training (early stopping).
    ``on_epoch_end``: after the epoch's training batches; may add entries to (or rewrite) ``record``, which is
    then appended to the history and checkpointed. Files written here are in place before the checkpoint
    that counts the epoch as done. ``trainer.epoch_samples`` / ``trainer.epoch_seconds``: the epoch's
    training samples and the seconds its batches took.
    ``on_fit_end``: after the last epoch (not after an error).
    """

    def on_fit_start(self, trainer: Trainer) -> None:
        """Called once per fit, after resuming."""

    def should_stop(self, trainer: Trainer) -> bool:
        """Whether to stop before the next epoch."""
        return False

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, Any]) -> None:
        """Called after epoch ``epoch`` (0-based) with its history record."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """Called after the last epoch."""


class ModelSelection(Callback):
    """Keep the weights with the highest ``score(model)``, evaluated every ``every`` epochs and after the last.

    The score is logged as ``record[key]``; the best weights are restored when training ends, and training stops
    once ``patience`` evaluations in a row failed to improve on the best (``None``: never). Ties keep the earlier
    epoch. With the trainer's ``checkpoint_dir`` the best weights are also written to ``best.safetensors``
    (``model_config`` + ``epoch`` + ``key``), so a resumed run selects the same epoch.

    ``best_epoch`` (0-based, -1 before any evaluation), ``best_score`` and ``best_state`` hold the selection.
    """

    def __init__(self, score: Callable[[nn.Module], float], every: int = 1, key: str = "val_score",
                 patience: int | None = None) -> None:
        if every < 1 or (patience is not None and patience < 1):
            raise ValueError(f"every must be >= 1 and patience >= 1 or None; got {every}, {patience}")
        self.score, self.every, self.key, self.patience = score, every, key, patience
        self._reset()

    def _reset(self) -> None:
        self.best_state: dict[str, Tensor] | None = None
        self.best_score = float("-inf")
        self.best_epoch = -1

    def on_fit_start(self, trainer: Trainer) -> None:
        self._reset()
        scored = [(i, float(h[self.key])) for i, h in enumerate(trainer.history) if self.key in h]
        if not scored:
            return
        self.best_epoch, self.best_score = max(scored, key=lambda t: t[1])  # the first of equal scores
        if trainer.checkpoint_dir is None:  # a history without a checkpoint: nothing to restore from
            return
        path = trainer.checkpoint_dir / "best.safetensors"
        if not path.is_file():
            raise CheckpointError(f"checkpoint in {path.parent} lacks best.safetensors (the weights of its best "
                                  f"epoch, {self.best_epoch}); use another checkpoint_dir")
        self.best_state = load_state_dict(path, map_location=trainer.device)

    def should_stop(self, trainer: Trainer) -> bool:
        if self.patience is None:
            return False
        since = [i for i, h in enumerate(trainer.history) if self.key in h and i > self.best_epoch]
        return len(since) >= self.patience

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, Any]) -> None:
        if (epoch + 1) % self.every and epoch + 1 != trainer.config.epochs:
            return
        score = float(self.score(trainer.model))
        record[self.key] = score
        if score > self.best_score:
            self.best_score, self.best_epoch = score, epoch
            self.best_state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            if trainer.checkpoint_dir is not None and distributed.rank() == 0:
                save_weights(self.best_state, trainer.checkpoint_dir / "best.safetensors",
                             config={**trainer.model_config, "epoch": epoch, self.key: score})

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.best_state is not None:
            with torch.no_grad():
                trainer.model.load_state_dict(self.best_state)
