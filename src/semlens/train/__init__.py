"""Training: the deterministic trainer (checkpoint/resume, extra loss terms) and regularizers. The captioner's
trainer and interpretive loss live in :mod:`semlens.captioning.training`."""

from semlens.train.trainer import ExtraTerm, TrainConfig, Trainer

__all__ = ["ExtraTerm", "TrainConfig", "Trainer"]
