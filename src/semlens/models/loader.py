"""One way to load a model: :func:`load` (used by every command, by correction and by the library).

A weights file written by semlens (``.safetensors``) carries a JSON config naming the model
(``"model"``: a built-in name or ``package.module:factory``) and its keyword arguments
(``"model_kwargs"``); a captioner's file carries ``"captioner"``. So ``load(weights=path)`` rebuilds
the model without being told what it is. Precedence of the factory's keyword arguments, lowest first:
``defaults`` (e.g. the class count seen in the data) < the weights' ``model_kwargs`` < explicit
``overrides``. The factory receives only the keyword arguments its signature accepts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semlens.checkpoint import CheckpointError, load_weights, read_config
from semlens.errors import ModelLoadError
from semlens.models.registry import build_model

__all__ = ["load", "weights_config", "stored_preprocessing", "CAPTIONER"]

CAPTIONER = "captioner"


def weights_config(weights: str | os.PathLike | None) -> dict[str, Any]:
    """The JSON config stored in a ``.safetensors`` file; ``{}`` for ``None`` or a ``.pt`` file."""
    if weights is None or Path(weights).suffix != ".safetensors":
        return {}
    return read_config(weights)


def stored_preprocessing(weights: str | os.PathLike | None) -> tuple[list[float], list[float]] | None:
    """``(mean, std)`` per input channel recorded in the weights' config (``"preprocess"``), else ``None``."""
    pre = weights_config(weights).get("preprocess") or {}
    if "mean" in pre and "std" in pre:
        return [float(v) for v in pre["mean"]], [float(v) for v in pre["std"]]
    return None


def load(spec: str | None = None, weights: str | os.PathLike | None = None, device: str | torch.device = "auto",
         random_init: bool = False, defaults: dict[str, Any] | None = None, **overrides: Any) -> nn.Module:
    """Build the model, load its weights, move it to ``device`` and return it in eval mode.

    spec: built-in name, ``package.module:factory`` or ``"captioner"``; ``None`` = the one the weights'
    config records. weights: ``.safetensors`` (config used) or ``.pt``/``.pth`` (``weights_only``).
    ``random_init=True`` is required to get a model without weights (never silently untrained).
    ``overrides`` whose value is ``None`` are ignored. Raises :class:`ModelLoadError` naming the model the
    weights came from when they do not fit, and :class:`semlens.checkpoint.CheckpointError` for a bad file.
    """
    from semlens.runtime import resolve_device

    config = weights_config(weights)
    dev = resolve_device(device)
    if weights is None and not random_init:
        raise ModelLoadError("no weights given: pass --weights FILE (or --random-init to use an untrained "
                             "model on purpose)")
    if "captioner" in config or spec == CAPTIONER:
        return _load_captioner(spec, weights, config, dev)
    stored = config.get("model")
    name = spec or stored
    if not name:
        where = f"{weights} records no model" if weights is not None else "no model given"
        raise ModelLoadError(f"{where}: pass --model (a built-in name or package.module:factory)")
    legacy = {k: config[k] for k in ("num_classes", "image_size") if k in config}  # older configs: top level
    kwargs = {**(defaults or {}), **legacy, **config.get("model_kwargs", {}),
              **{k: v for k, v in overrides.items() if v is not None}}
    model = build_model(name, **kwargs)
    if weights is not None:
        try:
            load_weights(model, weights)
        except CheckpointError as err:
            if stored and stored != name:
                raise ModelLoadError(f"{weights} holds weights of model {stored!r}, not {name!r}: omit --model "
                                     f"(the weights' config names it) or pass --model {stored}") from err
            raise
    return model.to(dev).eval()


def _load_captioner(spec: str | None, weights: str | os.PathLike | None, config: dict[str, Any],
                    device: torch.device) -> nn.Module:
    from semlens.captioning.model import AttentiveCaptioner

    if spec not in (None, CAPTIONER):
        raise ModelLoadError(f"{weights} holds weights of model 'captioner' (a video captioner), not {spec!r}")
    if weights is None or not config.get("captioner"):
        raise ModelLoadError(f"{weights}: a captioner is rebuilt from its own weights file (written by "
                             "`semlens caption train`)")
    return AttentiveCaptioner.load(weights, map_location=device).eval()
