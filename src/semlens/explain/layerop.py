"""The affine map of a ``Linear``/``ConvNd`` layer as functions of explicit parameters (:class:`LayerOp`), and the
stabilizer shared by the LRP rules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LayerOp", "conv_padding", "stabilize", "safe_ratio", "nonnegative"]

_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_INPUT = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input, 3: torch.nn.grad.conv3d_input}


#: on CPU, the transposed convolution back to an input of at most this many channels (a layer reading RGB images) runs
#: on PyTorch's native kernel: oneDNN's is 2-3x slower there (alexnet-like conv1 3->32, 5x5, stride 2, batch 16 at
#: 64 px: 3.7 vs 2.0 ms; 11x11 stride 4 at 224 px: 101 vs 35 ms), while for wider inputs oneDNN is ~2x faster
_NATIVE_MAX_CHANNELS = 4


@contextlib.contextmanager
def _native_conv(on: bool) -> Iterator[None]:
    """Disable oneDNN (mkldnn) convolutions inside the block when ``on`` (restored afterwards)."""
    if not on or not torch._C._get_mkldnn_enabled():
        yield
        return
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(True)


def stabilize(d: torch.Tensor, epsilon: float = 1e-6) -> torch.Tensor:
    """``d + epsilon * sign(d)`` with ``sign(0) = +1`` (Zennit's stabilizer): never zero for ``epsilon > 0``."""
    if epsilon == 0:
        return d
    # copysign gives -epsilon for -0.0 only, which occurs solely for exactly-zero outputs (relevance 0 anyway)
    return d + torch.copysign(d.new_tensor(epsilon), d)


def nonnegative(a: torch.Tensor) -> bool:
    """True when every entry of ``a`` is >= 0 (one reduction pass)."""
    return a.numel() == 0 or bool(a.amin() >= 0)


def safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den == 0`` (used only when the stabilizer is 0)."""
    return torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, torch.ones_like(den), den))


class LayerOp:
    """The affine map of a ``Linear`` or ``ConvNd`` module as two functions of explicit parameters.

    ``forward(x, w, b)`` computes the layer with weights ``w`` (same shape as the module's) and bias ``b``;
    ``input_grad(g, w, shape)`` is its transpose (vector-Jacobian product w.r.t. the input, shape ``shape``).
    ``channel_dim`` is the output dimension that indexes output units (1 for convolutions, -1 for Linear).
    What the model probe proved about the layer (set by the attributor; both default to "not known"):
    ``relu_follows``: every use of the layer's output (after its folded BatchNorm) is a ReLU, so outputs ``z <= 0``
    receive zero relevance; ``nonnegative_input``: every input the layer receives is ``>= 0`` (a ReLU, or pooling,
    reshaping, concatenation or sums of ReLU outputs, precedes it).
    """

    def __init__(self, module: nn.Module, name: str, relu_follows: bool = False,
                 nonnegative_input: bool = False) -> None:
        self.module = module
        self.name = name
        self.relu_follows = relu_follows
        self.nonnegative_input = nonnegative_input
        if isinstance(module, nn.Linear):
            self.kind = "linear"
            self.channel_dim = -1
            self.groups = 1
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            self.kind = "conv"
            self.nd = len(module.kernel_size)
            self.channel_dim = 1
            self.groups = module.groups
            self.stride = module.stride
            self.dilation = module.dilation
            self.padding = conv_padding(module, name)
        else:
            raise TypeError(f"layer {name!r} ({type(module).__name__}) is not a Linear or ConvNd layer")

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.module.bias

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "linear":
            return F.linear(x, w, b)
        return _CONV_FN[self.nd](x, w, b, self.stride, self.padding, self.dilation, self.groups)

    def input_grad(self, g: torch.Tensor, w: torch.Tensor, like: torch.Tensor | torch.Size) -> torch.Tensor:
        """``(d layer / d input)^T g`` for weights ``w``; ``like`` is the layer input (only its shape is used) or a
        shape."""
        if self.kind == "linear":
            return g @ w
        with _native_conv(g.device.type == "cpu" and w.shape[1] * self.groups <= _NATIVE_MAX_CHANNELS):
            if isinstance(like, torch.Tensor):
                return torch.ops.aten.convolution_backward(
                    g, like, w, None, self.stride, self.padding, self.dilation, False, [0] * self.nd, self.groups,
                    [True, False, False])[0]
            return _CONV_INPUT[self.nd](like, w, g, self.stride, self.padding, self.dilation, self.groups)

    def bias_view(self, b: torch.Tensor, ndim: int) -> torch.Tensor:
        """``b`` shaped to broadcast against an output with ``ndim`` dimensions."""
        if self.kind == "linear":
            return b
        return b.view(1, -1, *([1] * (ndim - 2)))

    def cat_out(self, ws: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate weights (or biases) along the output-unit dimension (one wider layer)."""
        return torch.cat(list(ws), dim=0)

    def split_out(self, z: torch.Tensor, parts: int) -> tuple[torch.Tensor, ...]:
        return z.chunk(parts, dim=self.channel_dim)


def conv_padding(module: nn.Module, name: str) -> tuple[int, ...]:
    """Integer padding of a conv module (``'valid'``/symmetric ``'same'`` converted); others raise ``ValueError``."""
    pad = module.padding
    if isinstance(pad, str):
        if pad == "valid":
            return (0,) * len(module.kernel_size)
        total = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
        if any(t % 2 for t in total):
            raise ValueError(f"layer {name!r}: padding='same' with an even kernel pads asymmetrically; unsupported")
        return tuple(t // 2 for t in total)
    return tuple(pad)
