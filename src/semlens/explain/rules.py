"""LRP rules for linear and convolutional layers.

Every rule keeps one invariant of semlens' LRP engine: after the backward pass, the autograd gradient at any
activation ``a`` equals ``R(a) / a`` (relevance per unit of activation). Then LRP-0 through every piecewise-linear,
parameter-free operation (ReLU, sums incl. residual ``out + identity``, pooling, reshapes, concatenation) is exactly the
ordinary gradient, and the relevance of a tensor is ``a * grad``. A rule only replaces the backward of the layer it is
assigned to: given ``g = R(z) / z`` at the layer output ``z``, it returns ``R(a) / a`` at the layer input.

Definitions (``z_j = sum_i a_i w_ij + b_j`` is the layer's true output, ``stab(d) = d + eps * sign(d)`` with
``sign(0) = +1``, defaults follow Zennit):

* :class:`Epsilon` (LRP-ε, ``epsilon=1e-6``; ``Epsilon(0)`` is LRP-0): ``R_i = a_i sum_j w_ij R_j / stab(z_j)``.
* :class:`Gamma` (``gamma=0.25``): weights ``w + γ w⁺`` (biases ``b + γ b⁺``) for positive outputs and ``w + γ w⁻``
  for negative ones; negative inputs use the opposite sign choice and no bias (Zennit's generalised Gamma).
* :class:`AlphaBeta` (``alpha=2, beta=1``, α − β = 1): ``α z⁺``-part minus ``β z⁻``-part, with
  ``z⁺ = a⁺ w⁺ + b⁺ + a⁻ w⁻`` and ``z⁻ = a⁺ w⁻ + b⁻ + a⁻ w⁺``. :class:`ZPlus` is ``AlphaBeta(1, 0)``.
* Input-domain rules (only on layers that read the model input): :class:`ZBox` (``z^B``, bounds ``low``/``high``),
  :class:`Flat` (all weights one, no bias), :class:`WSquare` (squared weights and bias).

``zero_params=["bias"]`` drops the bias from a rule's modified forward (as in Zennit). Relevance is linear in the output
relevance, so these rules give Zennit's heatmaps times the explained output value (see docs/explain.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Rule",
    "Epsilon",
    "Gamma",
    "AlphaBeta",
    "ZPlus",
    "ExcitationBackprop",
    "ZBox",
    "Flat",
    "WSquare",
    "LayerOp",
    "ModifiedRule",
    "stabilize",
]

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


def _nonnegative(a: torch.Tensor) -> bool:
    """True when every entry of ``a`` is >= 0 (one reduction pass)."""
    return a.numel() == 0 or bool(a.amin() >= 0)


def _safe_ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den == 0`` (used only when the stabilizer is 0)."""
    return torch.where(den == 0, torch.zeros_like(num), num / torch.where(den == 0, torch.ones_like(den), den))


class LayerOp:
    """The affine map of a ``Linear`` or ``ConvNd`` module as two functions of explicit parameters.

    ``forward(x, w, b)`` computes the layer with weights ``w`` (same shape as the module's) and bias ``b``;
    ``input_grad(g, w, shape)`` is its transpose (vector-Jacobian product w.r.t. the input, shape ``shape``).
    ``channel_dim`` is the output dimension that indexes output units (1 for convolutions, -1 for Linear).
    ``relu_follows``: every use of the layer's output (after its folded BatchNorm) is a ReLU, so outputs ``z <= 0``
    receive zero relevance and a rule may skip their part (set by the attributor from the model probe).
    """

    def __init__(self, module: nn.Module, name: str, relu_follows: bool = False) -> None:
        self.module = module
        self.name = name
        self.relu_follows = relu_follows
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


class Rule:
    """Base class: how one linear/conv layer passes relevance to its input.

    Subclasses implement ``forward(op, a, params) -> (z, state)`` (no autograd; ``z`` must equal the layer's output up
    to float rounding) and ``backward(op, state, g) -> grad_a`` (``g = R(z)/z``; returns ``R(a)/a``), or, for
    ``input_rule`` classes, ``relevance(op, state, g) -> R(a)`` (relevance itself, for the layer reading the input).
    ``params(op)`` builds the modified weights once per weight version.
    """

    input_rule: bool = False
    #: parameter names whose value is replaced by zero in the modified forwards
    zero_params: tuple[str, ...] = ()

    def __init__(self, zero_params: str | Sequence[str] | None = None) -> None:
        if zero_params is None:
            zero_params = ()
        elif isinstance(zero_params, str):
            zero_params = (zero_params,)
        unknown = set(zero_params) - {"weight", "bias"}
        if unknown:
            raise ValueError(f"zero_params may contain 'weight' and 'bias', got {sorted(unknown)}")
        self.zero_params = tuple(zero_params)

    @property
    def is_plain_gradient(self) -> bool:
        """True when the rule's backward is the layer's ordinary gradient (no hook needed)."""
        return False

    def _w(self, op: LayerOp) -> torch.Tensor:
        w = op.weight.detach()
        return torch.zeros_like(w) if "weight" in self.zero_params else w

    def _b(self, op: LayerOp, keep: bool = True) -> torch.Tensor | None:
        b = op.bias
        if b is None or not keep or "bias" in self.zero_params:
            return None
        return b.detach()

    def params(self, op: LayerOp) -> dict[str, Any]:
        return {}

    def forward(self, op: LayerOp, a: torch.Tensor, p: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def backward(self, op: LayerOp, state: Any, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


def _pos(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clamp(min=0)


def _neg(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clamp(max=0)


class Epsilon(Rule):
    """LRP-ε: ``R_i = a_i Σ_j w_ij R_j / stab(z_j, ε)`` (bias included in ``z``). ``epsilon=0`` gives LRP-0.

    Args:
        epsilon: stabilizer added with the sign of ``z`` (default 1e-6, as Zennit's ``Epsilon``).
        zero_params: parameters set to zero in the denominator's forward (``["bias"]``: bias not in ``z``).
    """

    def __init__(self, epsilon: float = 1e-6, zero_params: str | Sequence[str] | None = None) -> None:
        super().__init__(zero_params)
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        self.epsilon = float(epsilon)

    @property
    def is_plain_gradient(self) -> bool:
        return self.epsilon == 0 and not self.zero_params

    def forward(self, op: LayerOp, a: torch.Tensor, p: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        w = op.weight.detach()
        b = op.bias.detach() if op.bias is not None else None
        z = op.forward(a, w, b)
        if not self.zero_params:  # z / (z + eps sign z) = |z| / (|z| + eps)
            t = z.abs()
            k = t.div_(t + self.epsilon)
        else:
            den = op.forward(a, self._w(op), self._b(op))
            k = _safe_ratio(z, den) if self.epsilon == 0 else z / stabilize(den, self.epsilon)
        return z, (k, a, w)

    def backward(self, op: LayerOp, state: Any, g: torch.Tensor) -> torch.Tensor:
        k, shape, w = state
        return op.input_grad(g * k, w, shape)


class Gamma(Rule):
    """LRP-γ (Zennit's generalised form): favour positive contributions by ``γ``.

    Positive outputs ``z_j > 0`` use ``z⁺_j = a⁺(w + γw⁺) + (b + γb⁺) + a⁻(w + γw⁻)``, negative outputs use
    ``z⁻_j = a⁺(w + γw⁻) + (b + γb⁻) + a⁻(w + γw⁺)``; ``R_i = a_i Σ_j ∂z^±_j/∂a_i · R_j / stab(z^±_j)``.
    For non-negative inputs (after a ReLU) the ``a⁻`` terms vanish and the negative-output branch is computed only when
    relevance actually reaches a negative output.

    Args:
        gamma: weight of the added positive (or negative) parts (default 0.25).
        stabilizer: ε of the denominators (default 1e-6).
    """

    def __init__(self, gamma: float = 0.25, zero_params: str | Sequence[str] | None = None,
                 stabilizer: float = 1e-6) -> None:
        super().__init__(zero_params)
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.stabilizer = float(stabilizer)

    def params(self, op: LayerOp) -> dict[str, Any]:
        w, b, g = self._w(op), self._b(op), self.gamma
        p = {
            "w": op.weight.detach(), "b": None if op.bias is None else op.bias.detach(),
            "wp": w + g * w.clamp(min=0), "wn": w + g * w.clamp(max=0),
            "bp": None if b is None else b + g * b.clamp(min=0), "bn": None if b is None else b + g * b.clamp(max=0),
        }
        p["cat"] = op.groups == 1
        if p["cat"]:  # [w + g w+ ; w + g w-] with the stabilizers folded into the biases (non-negative inputs)
            zeros = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
            bp, bn = (zeros, zeros) if b is None else (p["bp"], p["bn"])
            p["wcat"] = op.cat_out([p["wp"], p["wn"]])
            p["bcat_stab"] = op.cat_out([bp + self.stabilizer, bn - self.stabilizer])
            eps = self.stabilizer
            p["lo"] = torch.tensor([eps, -torch.inf], dtype=w.dtype, device=w.device)
            p["hi"] = torch.tensor([torch.inf, -eps], dtype=w.dtype, device=w.device)
        zeros = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        p["bp_stab"] = (zeros if p["bp"] is None else p["bp"]) + self.stabilizer
        p["brest"] = None if op.bias is None or b is not None else op.bias.detach()
        return p

    def forward(self, op: LayerOp, a: torch.Tensor, p: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        eps = self.stabilizer
        nonneg = _nonnegative(a)
        if nonneg and op.relu_follows:
            # only outputs z > 0 receive relevance (a ReLU follows): they use z+ = a(w + g w+) + b + g b+ >= z > 0, so
            # the true output and one modified evaluation suffice. The clamp keeps the ratio finite where z <= 0 (its
            # value there is multiplied by a zero gradient).
            z = op.forward(a, p["w"], p["b"])
            zp = op.forward(a, p["wp"], p["bp_stab"]).clamp_(min=eps)
            return z, ("plus", a, torch.div(z, zp, out=zp), p)
        if p["cat"] and nonneg:
            # one wider layer gives z+ + eps and z- - eps; (w + g w+) + (w + g w-) = (2 + g) w, so
            # z = (z+ + z-) / (2 + g) (the stabilizers cancel). Where z > 0: z+ >= z > 0; where z < 0: z- <= z < 0;
            # so after clamping z+ >= eps and z- <= -eps, the ratios z / z± are >= 0 exactly on the branch that
            # applies and clamping them at 0 selects it (the clamps only matter where a numerator vanishes anyway).
            zz = op.forward(a, p["wcat"], p["bcat_stab"])
            dim = op.channel_dim % zz.ndim
            zz = zz.unflatten(dim, (2, zz.shape[dim] // 2))
            z = zz.sum(dim).div_(2.0 + self.gamma)
            if p["brest"] is not None:
                z = z + op.bias_view(p["brest"], z.ndim)
            trail = [1] * (zz.ndim - dim - 1)
            zz.clamp_(min=p["lo"].view(2, *trail), max=p["hi"].view(2, *trail))
            return z, ("cat", a, torch.div(z.unsqueeze(dim), zz, out=zz).clamp_(min=0), dim, p)
        z = op.forward(a, p["w"], p["b"])
        pos, neg = a.clamp(min=0), a.clamp(max=0)
        zp = op.forward(pos, p["wp"], p["bp"]) + op.forward(neg, p["wn"])
        zn = op.forward(pos, p["wn"], p["bn"]) + op.forward(neg, p["wp"])
        kp = torch.where(z > 0, z / stabilize(zp, eps), torch.zeros_like(z))
        kn = torch.where(z < 0, z / stabilize(zn, eps), torch.zeros_like(z))
        return z, ("signed", a > 0, a, kp, kn, p)

    def backward(self, op: LayerOp, state: Any, g: torch.Tensor) -> torch.Tensor:
        if state[0] == "plus":
            _, a, k, p = state
            return op.input_grad((k * g), p["wp"], a)
        if state[0] == "cat":
            _, a, kk, dim, p = state
            return op.input_grad((kk * g.unsqueeze(dim)).flatten(dim, dim + 1), p["wcat"], a)
        _, positive, shape, kp, kn, p = state
        hp, hn = g * kp, g * kn
        gpos = op.input_grad(hp, p["wp"], shape) + op.input_grad(hn, p["wn"], shape)
        gneg = op.input_grad(hp, p["wn"], shape) + op.input_grad(hn, p["wp"], shape)
        return torch.where(positive, gpos, gneg)


class AlphaBeta(Rule):
    """LRP-αβ: ``R_i = Σ_j (α (∂z⁺_j/∂a_i) a_i / stab(z⁺_j) − β (∂z⁻_j/∂a_i) a_i / stab(z⁻_j)) R_j`` with
    ``z⁺ = a⁺w⁺ + b⁺ + a⁻w⁻`` and ``z⁻ = a⁺w⁻ + b⁻ + a⁻w⁺`` (Zennit's ``AlphaBeta``).

    Requires ``alpha - beta == 1`` and both ``>= 0``. For non-negative inputs (the usual case after a ReLU), both
    parts come from one layer evaluation with concatenated weights ``[w⁺; w⁻]`` and ``z = z⁺ + z⁻``.

    Args:
        alpha: weight of the positive part (default 2). beta: weight of the negative part (default 1).
        stabilizer: ε of the denominators (default 1e-6).
    """

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, zero_params: str | Sequence[str] | None = None,
                 stabilizer: float = 1e-6) -> None:
        super().__init__(zero_params)
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        if abs(alpha - beta - 1.0) > 1e-12:
            raise ValueError(f"alpha - beta must equal 1, got alpha={alpha}, beta={beta}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.stabilizer = float(stabilizer)

    def params(self, op: LayerOp) -> dict[str, Any]:
        w, b = self._w(op), self._b(op)
        p: dict[str, Any] = {"w": op.weight.detach(), "b": None if op.bias is None else op.bias.detach(),
                             "wp": w.clamp(min=0), "wn": w.clamp(max=0), "bp": _pos(b), "bn": _neg(b)}
        p["cat"] = op.groups == 1
        zeros = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        bp, bn = (zeros, zeros) if b is None else (p["bp"], p["bn"])
        eps = self.stabilizer
        # non-negative inputs give z+ >= 0 and z- <= 0: the stabilizers are folded into the biases and the
        # alpha/beta factors into the weights of the backward
        p["bp_stab"] = bp + eps
        p["wp_bwd"] = self.alpha * p["wp"]
        if p["cat"]:
            p["wcat"] = op.cat_out([p["wp"], p["wn"]])
            p["bcat_stab"] = op.cat_out([bp + eps, bn - eps])
            p["wcat_bwd"] = op.cat_out([self.alpha * p["wp"], -self.beta * p["wn"]])
        # what z⁺ + z⁻ misses of the true bias (non-zero only when the bias is zeroed in the rule)
        p["brest"] = None if op.bias is None or b is not None else op.bias.detach()
        return p

    def forward(self, op: LayerOp, a: torch.Tensor, p: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        eps = self.stabilizer
        if _nonnegative(a):
            # non-negative inputs: z+ >= 0 and z- <= 0, so stab(z+) = z+ + eps and stab(z-) = z- - eps (where z- = 0
            # every contribution to it is 0, so the sign chosen there does not change the relevance)
            if not self.beta:  # z+ only: true output plus one modified evaluation (z+ + eps >= eps > 0)
                z = op.forward(a, p["w"], p["b"])
                zp = op.forward(a, p["wp"], p["bp_stab"])
                return z, ("plus", a, torch.div(z, zp, out=zp), None, p)
            if p["cat"]:  # one wider layer: stabilized channels [z+ + eps ; z- - eps], viewed as (..., 2, C, ...)
                zz = op.forward(a, p["wcat"], p["bcat_stab"])
                dim = op.channel_dim % zz.ndim
                zz = zz.unflatten(dim, (2, zz.shape[dim] // 2))
                z = zz.sum(dim)  # the stabilizers cancel
                if p["brest"] is not None:
                    z = z + op.bias_view(p["brest"], z.ndim)
                return z, ("cat", a, torch.div(z.unsqueeze(dim), zz, out=zz), dim, p)
            else:
                zp, zn = op.forward(a, p["wp"], p["bp"]), op.forward(a, p["wn"], p["bn"])
            z = zp + zn
            if p["brest"] is not None:
                z = z + op.bias_view(p["brest"], z.ndim)
            kp = self.alpha * z / zp.add_(eps)
            kn = -self.beta * z / zn.sub_(eps)
            return z, ("nonneg", a, kp, kn, p)
        pos, neg = a.clamp(min=0), a.clamp(max=0)
        z = op.forward(a, p["w"], p["b"])
        zp = op.forward(pos, p["wp"], p["bp"]) + op.forward(neg, p["wn"])
        zn = op.forward(pos, p["wn"], p["bn"]) + op.forward(neg, p["wp"])
        kp = self.alpha * z / stabilize(zp, eps)
        kn = -self.beta * z / stabilize(zn, eps)
        return z, ("signed", a > 0, a, kp, kn, p)

    def backward(self, op: LayerOp, state: Any, g: torch.Tensor) -> torch.Tensor:
        kind, *rest = state
        if kind == "cat":
            shape, kk, dim, p = rest
            return op.input_grad((kk * g.unsqueeze(dim)).flatten(dim, dim + 1), p["wcat_bwd"], shape)
        if kind == "plus":
            shape, kp, _, p = rest
            return op.input_grad((kp * g), p["wp_bwd"], shape)
        if kind == "nonneg":
            shape, kp, kn, p = rest
            if kn is None:
                return op.input_grad(g * kp, p["wp"], shape)
            if p["cat"]:
                return op.input_grad(torch.cat([g * kp, g * kn], dim=op.channel_dim), p["wcat"], shape)
            return op.input_grad(g * kp, p["wp"], shape) + op.input_grad(g * kn, p["wn"], shape)
        positive, shape, kp, kn, p = rest
        hp, hn = g * kp, g * kn
        gpos = op.input_grad(hp, p["wp"], shape) + op.input_grad(hn, p["wn"], shape)
        gneg = op.input_grad(hp, p["wn"], shape) + op.input_grad(hn, p["wp"], shape)
        return torch.where(positive, gpos, gneg)


class ModifiedRule(Rule):
    """A rule declared as data: how it modifies the weights, the bias and the stabiliser of the denominator.

    ``R_i = a_i Σ_j w'_ij R_j / stab(z'_j, ε)`` with ``w' = weight(w)``, ``b' = bias(b)`` and
    ``z' = layer(a; w', b')`` (the generic form of Zennit's ``BasicHook`` with an identity input modifier):
    ``ModifiedRule()`` is LRP-ε, ``ModifiedRule(weight=lambda w: w + 0.25 * w.clamp(min=0), bias=...)`` is the
    positive-output part of LRP-γ. The modified parameters are built once per weight version; the layer runs twice
    per forward (true and modified output), so the hand-tuned built-in rules stay the faster choice for their cases.

    Args:
        weight, bias: functions of the layer's (detached) weight / bias returning tensors of the same shapes
            (``None``: unchanged). ``zero_params`` drops the bias before ``bias`` sees it.
        stabilizer: ε added with the sign of ``z'`` (``sign(0) = +1``).
    """

    def __init__(self, weight: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 bias: Callable[[torch.Tensor], torch.Tensor] | None = None, stabilizer: float = 1e-6,
                 zero_params: str | Sequence[str] | None = None) -> None:
        super().__init__(zero_params)
        if not stabilizer >= 0:
            raise ValueError(f"stabilizer must be >= 0, got {stabilizer}")
        self.weight, self.bias, self.stabilizer = weight, bias, float(stabilizer)

    def params(self, op: LayerOp) -> dict[str, Any]:
        w, b = self._w(op), self._b(op)
        wm = w if self.weight is None else self.weight(w)
        bm = b if (b is None or self.bias is None) else self.bias(b)
        if wm.shape != w.shape or (bm is not None and b is not None and bm.shape != b.shape):
            raise ValueError(f"{self!r} on layer {op.name!r}: the modified parameters must keep their shapes")
        return {"w": op.weight.detach(), "b": None if op.bias is None else op.bias.detach(), "wm": wm, "bm": bm}

    def forward(self, op: LayerOp, a: torch.Tensor, p: dict[str, Any]) -> tuple[torch.Tensor, Any]:
        z = op.forward(a, p["w"], p["b"])
        den = op.forward(a, p["wm"], p["bm"])
        k = _safe_ratio(z, den) if self.stabilizer == 0 else z / stabilize(den, self.stabilizer)
        return z, (a, k, p["wm"])

    def backward(self, op: LayerOp, state: Any, g: torch.Tensor) -> torch.Tensor:
        a, k, wm = state
        return op.input_grad(g * k, wm, a)


class ZPlus(AlphaBeta):
    """LRP-z⁺ (deep Taylor, ReLU inputs): ``AlphaBeta(alpha=1, beta=0)`` — only positive contributions."""

    def __init__(self, zero_params: str | Sequence[str] | None = None, stabilizer: float = 1e-6) -> None:
        super().__init__(alpha=1.0, beta=0.0, zero_params=zero_params, stabilizer=stabilizer)

    def __repr__(self) -> str:
        return f"ZPlus(zero_params={self.zero_params!r})"


class ExcitationBackprop(ZPlus):
    """Excitation Backprop (Zhang et al., ECCV 2016): top-down winning probabilities through excitatory weights only,
    ``P(a_i) = Σ_j a_i w⁺_ij / (Σ_i' a_i' w⁺_i'j) · P(a_j)``.

    For non-negative inputs this is LRP-z⁺ without the bias in the denominator (``zero_params=["bias"]``), so the
    relevance of a layer's input sums to that of its output (exact conservation up to the stabilizer).
    """

    def __init__(self, stabilizer: float = 1e-6) -> None:
        super().__init__(zero_params=("bias",), stabilizer=stabilizer)

    def __repr__(self) -> str:
        return "ExcitationBackprop()"


class _InputRule(Rule):
    """A rule whose relevance is not ``a * c``; applied only to a layer that reads the model input."""

    input_rule = True

    def relevance(self, op: LayerOp, state: Any, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class ZBox(_InputRule):
    """LRP-z^B for inputs bounded by ``low <= x <= high`` (deep Taylor, box domain):

    ``R_i = Σ_j (x_i w_ij − l_i w⁺_ij − h_i w⁻_ij) R_j / stab(Σ_i' x_i' w_i'j − l_i' w⁺_i'j − h_i' w⁻_i'j)``.
    The biases cancel (``b − b⁺ − b⁻ = 0``), as in Zennit. ``low``/``high``: floats or tensors broadcastable to the
    input; ``None`` means the batch's minimum / maximum (set per call by the attributor).
    """

    def __init__(self, low: float | torch.Tensor | None = 0.0, high: float | torch.Tensor | None = 1.0,
                 zero_params: str | Sequence[str] | None = None, stabilizer: float = 1e-6) -> None:
        super().__init__(zero_params)
        self.low = low
        self.high = high
        self.stabilizer = float(stabilizer)

    def params(self, op: LayerOp) -> dict[str, Any]:
        w, b = self._w(op), self._b(op)
        return {"w": op.weight.detach(), "b": None if op.bias is None else op.bias.detach(), "wm": w,
                "wp": w.clamp(min=0), "wn": w.clamp(max=0), "bm": b, "bp": _pos(b), "bn": _neg(b)}

    def forward(self, op: LayerOp, a: torch.Tensor, p: dict[str, Any], low: torch.Tensor | None = None,
                high: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        z = op.forward(a, p["w"], p["b"])
        low = a.new_tensor(self.low) if low is None else low
        high = a.new_tensor(self.high) if high is None else high
        if low.shape != a.shape and (low.ndim != a.ndim or low.shape[1:] != a.shape[1:]):
            low, high = torch.broadcast_to(low.to(a), a.shape), torch.broadcast_to(high.to(a), a.shape)
        # with no zero_params the unmodified term is z itself (same weights and bias)
        first = z if not self.zero_params else op.forward(a, p["wm"], p["bm"])
        den = first - op.forward(low, p["wp"], p["bp"]) - op.forward(high, p["wn"], p["bn"])
        return z, (a, low, high, z / stabilize(den, self.stabilizer), p)

    def relevance(self, op: LayerOp, state: Any, g: torch.Tensor) -> torch.Tensor:
        a, low, high, k, p = state
        s = g * k
        return (a * op.input_grad(s, p["wm"], a) - low * op.input_grad(s, p["wp"], a)
                - high * op.input_grad(s, p["wn"], a))


class WSquare(_InputRule):
    """LRP-w² (deep Taylor, unbounded inputs): ``R_i = Σ_j w_ij² R_j / stab(Σ_i' w_i'j² + b_j²)``.

    As in Zennit the squared bias joins the denominator unless ``zero_params=["bias"]``.
    """

    def __init__(self, zero_params: str | Sequence[str] | None = None, stabilizer: float = 1e-6) -> None:
        super().__init__(zero_params)
        self.stabilizer = float(stabilizer)

    def _modified(self, op: LayerOp) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = self._w(op) ** 2
        b = self._b(op)
        return w, None if b is None else b ** 2

    def params(self, op: LayerOp) -> dict[str, Any]:
        w, b = self._modified(op)
        return {"w": op.weight.detach(), "b": None if op.bias is None else op.bias.detach(), "wm": w, "bm": b}

    def forward(self, op: LayerOp, a: torch.Tensor, p: dict[str, Any], low: torch.Tensor | None = None,
                high: torch.Tensor | None = None) -> tuple[torch.Tensor, Any]:
        z = op.forward(a, p["w"], p["b"])
        key = ("den", tuple(a.shape[1:]))
        if key not in p:  # input-independent: one sample, cached with the modified weights
            p[key] = stabilize(op.forward(torch.ones_like(a[:1]), p["wm"], p["bm"]), self.stabilizer)
        return z, (a, z / p[key], p)

    def relevance(self, op: LayerOp, state: Any, g: torch.Tensor) -> torch.Tensor:
        shape, k, p = state
        return op.input_grad(g * k, p["wm"], shape)


class Flat(WSquare):
    """LRP-flat: relevance spread uniformly over each output's receptive field (all weights one, bias zero):

    ``R_i = Σ_j 1[i ∈ RF(j)] R_j / stab(|RF(j)|)`` (zero padding does not count).
    """

    def _modified(self, op: LayerOp) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.ones_like(op.weight.detach()), None
