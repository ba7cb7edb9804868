"""Features stage of the captioner: per-frame descriptors of a video's frames from a frozen CNN.

:func:`extract_frame_features` is the one frame descriptor: it pools one or several layers' outputs (or
inputs) — mean, mean+max, optional coarse grid — and serves ``semlens reproduce dong``, the demo and
``semlens data clips --encoder``; :func:`encode_frames` is its default for a user's CNN (the input of the last
Linear layer); :func:`load_trained` rebuilds a CNN saved by ``semlens train``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from semlens.layers import HookHandles, capture_activations, frozen, get_module
from semlens.runtime import progress, resolve_device

__all__ = ["extract_frame_features", "load_trained", "encode_frames"]


def load_trained(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by ``semlens train`` / :meth:`Trainer.save` from its JSON config (eval mode)."""
    from semlens.models import load

    return load(None, path, device="cpu")


def _last_linear(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear layer; pass layer= explicitly")
    return names[-1]


def encode_frames(model: nn.Module, frames: Tensor, device: str | torch.device = "cpu", layer: str | None = None,
                  batch_size: int = 256, show_progress: bool | None = None) -> Tensor:
    """Per-frame features: the input of ``layer`` (default: the model's last Linear layer, i.e. its penultimate
    features) — :func:`extract_frame_features` with ``capture="input"``.

    frames: (N, T, 3, S, S) uint8 or float in [0, 1]. Returns (N, T, D) float32 on the CPU.
    The model's mode and parameters are restored afterwards; hooks are removed on every exit path.
    """
    return extract_frame_features(model, frames, layer=layer or _last_linear(model), batch_size=batch_size,
                                  device=device, capture="input", show_progress=show_progress)


@torch.no_grad()
def extract_frame_features(cnn: nn.Module, frames: torch.Tensor, layer: str | Sequence[str] | None = None,
                           batch_size: int = 256, device: str | torch.device | None = None,
                           pool: str = "mean", grid: int = 0, grid_layers: Sequence[str] | None = None,
                           capture: str = "output", show_progress: bool | None = None) -> torch.Tensor:
    """Per-frame features of a frozen CNN: (N, T, 3, S, S) uint8 or float [0, 1] -> (N, T, F) float32.

    ``layer``: dotted name (or list of names, concatenated in order) whose outputs are used; default the
    CNN's last entry of ``conv_layers``. 4-D maps (C, h, w) are pooled over space: ``pool="mean"`` (C values
    per layer) or ``"meanmax"`` (spatial mean then max: 2C values; small objects survive max pooling but are
    diluted by the mean). ``grid > 0`` appends a coarse spatial layout: the map average-pooled to a
    ``grid`` x ``grid`` grid (``adaptive_avg_pool2d``; C·grid² values, channel-major, cells row-major),
    for the layers in ``grid_layers`` (default: every 4-D layer), so position, size and motion of an
    object stay visible (global pooling discards where it is). ``capture="input"`` uses what the layers
    receive instead of what they return (the input of a model's last Linear layer is its penultimate features:
    :func:`encode_frames`). Frames go through the CNN in batches of ``batch_size``; the CNN's mode and
    ``requires_grad`` flags are restored afterwards, and its hooks removed on every exit path.

    This is the one frame descriptor of the captioner: ``semlens reproduce dong``, the demo and
    ``semlens data clips --encoder`` (with ``--frame-layers/--pool/--grid/--grid-layers``) all call it.
    """
    if frames.dim() != 5 or frames.shape[2] != 3:
        raise ValueError(f"frames must be (N, T, 3, S, S); got {tuple(frames.shape)}")
    if pool not in {"mean", "meanmax"}:
        raise ValueError(f"unknown pool {pool!r}; use 'mean' or 'meanmax'")
    if capture not in {"output", "input"}:
        raise ValueError(f"unknown capture {capture!r}; use 'output' or 'input'")
    if layer is None:
        layers = getattr(cnn, "conv_layers", None)
        if not layers:
            raise ValueError("give layer= (the CNN has no conv_layers attribute)")
        layer = layers[-1]
    names = [layer] if isinstance(layer, str) else list(layer)
    if not names:
        raise ValueError("layer must name at least one module")
    if grid < 0:
        raise ValueError(f"grid must be >= 0; got {grid}")
    gridded = set(names if grid_layers is None else grid_layers) if grid else set()
    if not gridded <= set(names):
        raise ValueError(f"grid_layers {sorted(gridded - set(names))} are not among the layers {names}")
    dev = resolve_device(device) if device is not None else next(cnn.parameters()).device
    N, T = frames.shape[:2]
    flat = frames.reshape(N * T, *frames.shape[2:])
    out: list[torch.Tensor] = []

    def pooled(name: str, a: torch.Tensor) -> torch.Tensor:
        if a.dim() != 4:
            return a.flatten(1)
        if grid and min(a.shape[2:]) < grid:
            raise ValueError(f"layer {name!r} maps are {tuple(a.shape[2:])}, smaller than grid={grid}")
        flat = a.flatten(2)
        parts = [flat.mean(2), flat.amax(2)] if pool == "meanmax" else [flat.mean(2)]
        if name in gridded:
            parts.append(nn.functional.adaptive_avg_pool2d(a, grid).flatten(1))
        return torch.cat(parts, 1)

    with contextlib.ExitStack() as stack:
        stack.enter_context(frozen(cnn))
        if capture == "output":
            acts = stack.enter_context(capture_activations(cnn, names, transform=pooled))
        else:
            acts, hooks = {}, stack.enter_context(HookHandles())
            for n in names:
                hooks.add(get_module(cnn, n).register_forward_pre_hook(
                    lambda _m, inp, n=n: acts.__setitem__(n, pooled(n, inp[0]))))
        starts = range(0, N * T, batch_size)
        for s in progress(starts, total=len(starts), desc="frame features", enabled=show_progress):
            x = flat[s: s + batch_size].to(dev)
            x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            cnn(x)
            out.append(torch.cat([acts[n].float().cpu() for n in names], 1))
    return torch.cat(out).reshape(N, T, -1)
