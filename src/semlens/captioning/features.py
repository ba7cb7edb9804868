"""Frame encoders for clips: run a trained CNN over every frame and keep its penultimate features."""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from semlens.layers import HookHandles, frozen, get_module
from semlens.runtime import progress

__all__ = ["load_trained", "encode_frames"]


def load_trained(path: str | os.PathLike) -> nn.Module:
    """Rebuild a model saved by ``semlens train`` / :meth:`Trainer.save` from its JSON config (eval mode)."""
    from semlens.models import load

    return load(None, path, device="cpu")


def _last_linear(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ValueError(f"{type(model).__name__} has no Linear layer; pass layer= explicitly")
    return names[-1]


@torch.no_grad()
def encode_frames(model: nn.Module, frames: Tensor, device: str | torch.device = "cpu", layer: str | None = None,
                  batch_size: int = 256, show_progress: bool | None = None) -> Tensor:
    """Per-frame features: the input of ``layer`` (default: the model's last Linear layer).

    frames: (N, T, 3, S, S) uint8 or float in [0, 1]. Returns (N, T, D) float32 on the CPU.
    The model's mode and parameters are restored afterwards; hooks are removed on every exit path.
    """
    if frames.dim() != 5 or frames.shape[2] != 3:
        raise ValueError(f"frames must be (N, T, 3, S, S), got {tuple(frames.shape)}")
    name = layer or _last_linear(model)
    module = get_module(model, name)
    n, t = frames.shape[:2]
    flat = frames.flatten(0, 1)
    store: list[Tensor] = []
    out = []
    with frozen(model), HookHandles() as hooks:
        hooks.add(module.register_forward_pre_hook(lambda _m, inp: store.append(inp[0].flatten(1).cpu())))
        starts = range(0, flat.shape[0], batch_size)
        for s in progress(starts, total=len(starts), desc="encode frames", enabled=show_progress):
            x = flat[s: s + batch_size].to(device)
            x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
            model(x)
            out.append(store.pop())
    return torch.cat(out).reshape(n, t, -1)
