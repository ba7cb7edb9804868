"""Activation maximization (Montavon, Samek & Müller 2018, part A): prototypes for units, channels,
classes and directions — plain (ℓ2 to the data mean or to an example), with a density expert, and in
a generator's code space — batched over many (unit, variant, seed) rows, with self-checks."""

from semlens.maximize.engine import MaxResult, code_penalty, expert_term, l2_penalty, maximize
from semlens.maximize.objectives import Objective, channel, class_logit, direction, diversity, neuron
from semlens.maximize.params import CodeParam, FourierParam, MacoParam, PixelParam
from semlens.maximize.stats import ImageStats, fit_image_stats
from semlens.maximize.transforms import Augment

__all__ = [
    "Augment", "CodeParam", "FourierParam", "ImageStats", "MacoParam", "MaxResult", "Objective", "PixelParam",
    "channel", "class_logit", "code_penalty", "direction", "diversity", "expert_term", "fit_image_stats",
    "l2_penalty", "maximize", "neuron",
]
