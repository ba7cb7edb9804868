"""Canonizers: reversible model edits that make LRP rules see the network's true affine layers.

:class:`MergeBatchNorm` folds every eval-mode BatchNorm that directly consumes the output of a Linear/Conv layer —
found from the recorded data flow of a probe forward, not from module order — into that layer:
``w' = w * s``, ``b' = (b - mu) * s + beta`` with ``s = gamma / sqrt(var + eps)`` per output channel, and makes the
BatchNorm the identity. The edit swaps parameter *objects* (the originals are never written to) and overrides the BN's
``forward`` on the instance, so :meth:`MergeBatchNorm.restore` puts back the bit-identical original model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from semlens.layers import get_module

__all__ = ["MergeBatchNorm", "fold_batchnorm"]


def fold_batchnorm(layer: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights and bias of ``bn(layer(x))`` as one affine layer (float computation in the layer's dtype)."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(f"{type(bn).__name__} without running statistics cannot be folded")
    w = layer.weight.detach()
    scale = (bn.weight.detach() if bn.weight is not None else torch.ones_like(bn.running_var)) / torch.sqrt(
        bn.running_var + bn.eps)
    shift = bn.bias.detach() if bn.bias is not None else torch.zeros_like(bn.running_mean)
    b = layer.bias.detach() if layer.bias is not None else torch.zeros_like(bn.running_mean)
    new_w = w * scale.to(w).view(-1, *([1] * (w.ndim - 1)))
    new_b = (b - bn.running_mean.to(w)) * scale.to(w) + shift.to(w)
    return new_w, new_b


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


class MergeBatchNorm:
    """Fold (layer, batchnorm) pairs in place; :meth:`restore` undoes it exactly (also after errors)."""

    def __init__(self) -> None:
        self._saved: list[tuple[nn.Module, dict[str, Any]]] = []

    def apply(self, model: nn.Module, pairs: list[tuple[str, str]]) -> MergeBatchNorm:
        try:
            for layer_name, bn_name in pairs:
                layer, bn = get_module(model, layer_name), get_module(model, bn_name)
                new_w, new_b = fold_batchnorm(layer, bn)
                self._saved.append((layer, {"weight": layer.weight, "bias": layer.bias}))
                self._saved.append((bn, {"forward": bn.__dict__.get("forward")}))
                layer.weight = nn.Parameter(new_w, requires_grad=False)
                layer.bias = nn.Parameter(new_b, requires_grad=False)
                bn.forward = _identity
        except BaseException:
            self.restore()
            raise
        return self

    def restore(self) -> None:
        while self._saved:
            module, saved = self._saved.pop()
            if "forward" in saved:
                if saved["forward"] is None:
                    module.__dict__.pop("forward", None)
                else:
                    module.forward = saved["forward"]
            else:
                module.weight = saved["weight"]
                if saved["bias"] is None:
                    module.bias = None
                else:
                    module.bias = saved["bias"]
