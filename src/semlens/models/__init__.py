"""Reference models and the model registry.

Built-in architectures register themselves with :func:`register_model` when their module is imported
below; user models are reached as ``package.module:factory``. :func:`load` is the one way to get a model with
its weights (see :mod:`semlens.models.loader`).
"""

from semlens.models import cnn  # noqa: F401  (registers the reference CNNs)
from semlens.models.loader import load, stored_preprocessing, weights_config
from semlens.models.registry import ModelSpecError, available_models, build_model, register_model

__all__ = ["ModelSpecError", "available_models", "build_model", "register_model", "load", "weights_config",
           "stored_preprocessing"]
