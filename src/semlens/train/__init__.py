"""Training: the one deterministic trainer (checkpoint/resume, pluggable steps, extra loss terms, callbacks),
regularizers, and one small fitting helper for auxiliary models (probes, topic heads, judges). The captioner's
step, batches and interpretive term live in :mod:`semlens.captioning.training`."""

from semlens.train.callbacks import Callback, ModelSelection
from semlens.train.fit import fit_module, full_batches, sampled_batches, shuffled_batches
from semlens.train.steps import BatchSource, ClassificationStep, StepOutput, TrainStep
from semlens.train.trainer import ExtraTerm, TrainConfig, Trainer

__all__ = ["ExtraTerm", "TrainConfig", "Trainer", "StepOutput", "TrainStep", "BatchSource", "ClassificationStep",
           "Callback", "ModelSelection", "fit_module", "shuffled_batches", "sampled_batches", "full_batches"]
