"""Safe weight files: safetensors with a JSON config in its metadata, or ``torch.load(weights_only=True)``.

Arbitrary pickles are never loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from semlens.outputs import apply_umask

__all__ = ["save_weights", "load_state_dict", "load_weights", "read_config", "CheckpointError"]

_META_KEY = "semlens_config"


class CheckpointError(ValueError):
    """A weight file that is missing, corrupt, or does not fit the model."""


def save_weights(model_or_state: nn.Module | dict[str, torch.Tensor], path: str | os.PathLike,
                 config: dict[str, Any] | None = None) -> Path:
    """Write weights (and an optional JSON-serialisable ``config``) to a ``.safetensors`` file.

    The write is atomic: a temporary file is renamed over ``path`` once complete. The file gets the
    permissions of the user's umask (e.g. 0644), not safetensors' 0600.
    """
    path = Path(path)
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    metadata = {_META_KEY: json.dumps(config or {}, sort_keys=True)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    apply_umask(tmp)  # safetensors creates 0600 files; collaborators must be able to read the weights
    os.replace(tmp, path)
    return path


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """Return the JSON config stored in a semlens ``.safetensors`` file (``{}`` when there is none)."""
    path = _existing(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"cannot read weights file {path}: {err}") from err
    return json.loads(meta.get(_META_KEY, "{}"))


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    return path


def load_state_dict(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a ``.pt``/``.pth`` file (``weights_only=True``).

    A ``.pt`` file holding ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped.
    """
    path = _existing(path)
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path), device=str(map_location))
        else:
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - any parse failure is a corrupt file for the user
        raise CheckpointError(f"cannot read weights file {path}: {type(err).__name__}: {err}") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return state


def non_finite_keys(state: dict[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors of ``state`` holding NaN or an infinity."""
    return [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def load_finite_state(path: str | os.PathLike, what: str, error: type[Exception]) -> dict[str, torch.Tensor]:
    """:func:`load_state_dict`, refusing a file with NaN or infinite values: raises ``error`` naming ``what`` (e.g.
    ``"prior"``), the file and the first offending tensors."""
    state = load_state_dict(path)
    bad = non_finite_keys(state)
    if bad:
        raise error(f"{what} {path} holds NaN or infinite values in {', '.join(bad[:5])}")
    return state


def sub_state(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``state`` under ``prefix`` (e.g. ``"module."``), with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_weights(model: nn.Module, path: str | os.PathLike, strict: bool = True) -> nn.Module:
    """Load weights from ``path`` into ``model`` (in place) and return it.

    Mismatched keys or shapes raise :class:`CheckpointError` naming them.
    """
    state = load_state_dict(path)
    own = model.state_dict()
    bad_shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad_shapes:
        raise CheckpointError(f"{path} does not fit {type(model).__name__}: " + "; ".join(bad_shapes[:10]))
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path} does not fit {type(model).__name__}: missing {missing[:10]}, unexpected {unexpected[:10]}"
        )
    model.load_state_dict(state, strict=strict)
    return model
