"""Training: the deterministic trainer (checkpoint/resume, extra loss terms), regularizers, interpretive loss."""

from semlens.train.trainer import ExtraTerm, TrainConfig, Trainer

__all__ = ["ExtraTerm", "TrainConfig", "Trainer"]
