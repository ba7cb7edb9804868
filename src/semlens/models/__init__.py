"""Reference models and the model registry.

Built-in architectures register themselves with :func:`register_model` when their module is imported
below; user models are reached as ``package.module:factory``.
"""

from semlens.models import cnn  # noqa: F401  (registers the reference CNNs)
from semlens.models.registry import ModelSpecError, available_models, build_model, register_model

__all__ = ["ModelSpecError", "available_models", "build_model", "register_model"]
