"""Model check for LRP: one probe forward that records every operation on activations.

The probe runs the model on one sample under a :class:`torch.overrides.TorchFunctionMode` while pre/post hooks on
every module track which module is executing. Operations inside supported layers (conv, linear, ReLU, pooling, ...)
are trusted; every other operation that touches an activation (a tensor that depends on the input) must be
piecewise linear with a known relevance split (sums — residual ``out + identity`` included —, scaling by constants,
reshapes, concatenation, ReLU, pooling). Everything else is collected and reported in ONE error listing every culprit
with its dotted module name and type. The probe also records the data flow needed by the canonizer (which BatchNorm
directly consumes which conv/linear output) and which layers read the model input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from semlens.layers import HookHandles

__all__ = ["UnsupportedModelError", "InputShapeError", "ModelGraph", "probe_model", "LINEAR_TYPES"]

LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: leaf modules whose internal operations are trusted (their relevance rule is the gradient or a bound rule)
_TRUSTED = LINEAR_TYPES + _BN_TYPES + (
    nn.ReLU, nn.LeakyReLU, nn.Flatten, nn.Unflatten, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
#: operations on activations that carry relevance correctly as plain gradient (sum rule / winner-take-all / reshape)
_PASS_OPS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "t", "contiguous",
    "squeeze", "unsqueeze", "__getitem__", "cat", "concat", "concatenate", "stack", "hstack", "vstack", "split",
    "chunk", "narrow", "unbind", "expand", "expand_as", "repeat", "clone", "flip", "roll", "movedim", "moveaxis",
    "to", "float", "double", "half", "type_as", "relu", "relu_", "leaky_relu", "leaky_relu_", "dropout",
    "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "mean", "sum", "add", "__add__", "__radd__", "__iadd__", "add_", "sub", "__sub__", "__rsub__", "__isub__", "sub_",
    "neg", "__neg__", "pad", "interpolate", "upsample", "max", "amax", "flatten_",
}
#: harmless queries (no new activation)
_QUERY_OPS = {"__get__", "size", "dim", "numel", "__len__", "is_contiguous", "requires_grad_", "__format__", "stride",
              "data_ptr", "is_floating_point", "__repr__", "__hash__", "__eq__", "__bool__", "detach", "element_size"}
#: operations whose output is >= 0 when every activation they read is (sums also need non-negative other operands)
_SIGN_KEEPING_OPS = {
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "permute", "transpose", "t", "contiguous",
    "squeeze", "unsqueeze", "__getitem__", "cat", "concat", "concatenate", "stack", "hstack", "vstack", "split",
    "chunk", "narrow", "unbind", "expand", "expand_as", "repeat", "clone", "flip", "roll", "movedim", "moveaxis",
    "to", "float", "double", "half", "type_as", "dropout", "dropout1d", "dropout2d", "dropout3d",
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices",
    "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
    "mean", "sum", "max", "amax", "pad", "flatten_",
}
_SUM_OPS = {"add", "__add__", "__radd__", "__iadd__", "add_"}
#: trusted modules whose output is >= 0 when their input is
_SIGN_KEEPING_MODULES = (
    nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_SCALE_OPS = {"mul", "__mul__", "__rmul__", "__imul__", "mul_", "div", "__truediv__", "__itruediv__", "div_"}


class UnsupportedModelError(ValueError):
    """The model contains modules or operations whose relevance semlens cannot propagate correctly."""

    def __init__(self, culprits: list[str]) -> None:
        self.culprits = culprits
        super().__init__(
            "LRP cannot explain this model; unsupported modules/operations (dotted name, type, reason):\n  - "
            + "\n  - ".join(culprits)
            + "\nUse method='gradient' or 'gradient-x-input', or replace these layers (see docs/explain.md)."
        )


class InputShapeError(ValueError):
    """The input does not fit the model (rank, channel count or feature size)."""


@dataclass
class ModelGraph:
    """What the probe forward found (names are dotted module names).

    ``calls``: module name -> number of calls in one forward; ``first_layers``: conv/linear layers reading the model
    input; ``bn_pairs``: (linear name, batchnorm name) pairs where the BN consumes only that layer's output;
    ``bn_unfoldable``: BN name -> reason; ``culprits``: unsupported modules/ops; ``output_shape``: model output shape;
    ``relu_only``: conv/linear layers every output of which (after its folded BatchNorm, if any) is used by ReLUs only,
    so that output units with ``z <= 0`` never receive relevance (rules skip the work for them);
    ``nonnegative_input``: conv/linear layers every input of which is provably ``>= 0`` (the output of a ReLU, or of
    pooling, reshaping, slicing, concatenation or sums of such tensors), so rules skip their negative-input parts
    without checking the input at run time.
    """

    calls: dict[str, int] = field(default_factory=dict)
    first_layers: list[str] = field(default_factory=list)
    bn_pairs: list[tuple[str, str]] = field(default_factory=list)
    bn_unfoldable: dict[str, str] = field(default_factory=dict)
    culprits: list[str] = field(default_factory=list)
    output_shape: tuple[int, ...] = ()
    relu_only: list[str] = field(default_factory=list)
    nonnegative_input: list[str] = field(default_factory=list)


_TRUSTED_FORWARDS = {cls.forward for cls in _TRUSTED}


def _trusted(m: nn.Module) -> bool:
    """A known layer type whose ``forward`` is the library's own (a subclass overriding it is checked op by op)."""
    return isinstance(m, _TRUSTED) and type(m).forward in _TRUSTED_FORWARDS


def _op_name(func: Any) -> str:
    return getattr(func, "__name__", None) or repr(func)


def _shares_storage(a: torch.Tensor, x: torch.Tensor) -> bool:
    """``a`` is ``x`` or a reshaped view of all of ``x`` (e.g. ``x.flatten(1)`` before a Linear)."""
    if a is x:
        return True
    return (a.numel() == x.numel() and a.data_ptr() == x.data_ptr() and a.is_contiguous() and x.is_contiguous()
            and a.dtype == x.dtype)


def reads_input(a: torch.Tensor, x: torch.Tensor) -> bool:
    """Public alias of the storage test used to find layers reading the model input."""
    return _shares_storage(a, x)


def check_input_fits(name: str, module: nn.Module, a: torch.Tensor) -> None:
    """Raise :class:`InputShapeError` when the model input ``a`` does not fit the layer ``module`` that reads it."""
    if isinstance(module, nn.Linear):
        if a.shape[-1] != module.in_features:
            raise InputShapeError(f"input of shape {tuple(a.shape)} does not fit layer {name!r} (Linear expects "
                                  f"{module.in_features} features in the last dimension)")
        return
    nd = len(module.kernel_size)
    if a.ndim != nd + 2:
        raise InputShapeError(f"input of shape {tuple(a.shape)} has rank {a.ndim}; layer {name!r} "
                              f"({type(module).__name__}) expects (N, {module.in_channels}, ...) of rank {nd + 2}")
    if a.shape[1] != module.in_channels:
        raise InputShapeError(f"input has {a.shape[1]} channels (shape {tuple(a.shape)}); layer {name!r} "
                              f"({type(module).__name__}) expects {module.in_channels}")


class _Recorder(TorchFunctionMode):
    def __init__(self, probe: _Probe) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.probe.on_op(func, args, kwargs, out)
        return out


class _Probe:
    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        self.model = model
        self.x = x
        self.names = {id(m): n for n, m in model.named_modules()}
        self.stack: list[nn.Module] = []
        self.graph = ModelGraph()
        self.keep: list[Any] = []  # keeps tensors alive so that their ids stay unique during the probe
        self.producer: dict[int, str] = {}  # id(tensor) -> name of the conv/linear module call that produced it
        self.consumers: dict[int, int] = {}
        # uses of each tensor value, keyed by (id, generation): an in-place ReLU starts a new generation (new value)
        self.uses: dict[tuple[int, int], list[str]] = {}  # value -> kinds of its uses ("relu", an op or module type)
        self.generation: dict[int, int] = {}
        self.outputs: dict[str, list[tuple[int, int]]] = {}  # conv/linear/BN name -> its output values
        self.bn_inputs: dict[str, torch.Tensor] = {}
        self._culprits: dict[str, None] = {}
        self.nonneg: set[int] = set()  # ids of tensors proven >= 0 (kept alive, so ids are not reused)
        self.linear_nonneg: dict[str, bool] = {}  # conv/linear name -> every input so far was proven >= 0

    def name(self, m: nn.Module) -> str:
        return self.names.get(id(m), "") or "<model>"

    def culprit(self, text: str) -> None:
        self._culprits.setdefault(text, None)

    def in_trusted(self) -> bool:
        return any(_trusted(m) for m in self.stack)

    def value(self, t: torch.Tensor) -> tuple[int, int]:
        return id(t), self.generation.get(id(t), 0)

    def consume(self, tensors: list[Any], kind: str = "other", inplace_relu: bool = False) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.requires_grad:
                self.consumers[id(t)] = self.consumers.get(id(t), 0) + 1
                self.uses.setdefault(self.value(t), []).append(kind)
                self.keep.append(t)
        if inplace_relu and tensors and isinstance(tensors[0], torch.Tensor):
            self.generation[id(tensors[0])] = self.generation.get(id(tensors[0]), 0) + 1

    def mark(self, out: Any, nonneg: bool, inplace: bool = False) -> None:
        """Record whether the tensor(s) ``out`` are proven ``>= 0``. An in-place op that may make its tensor negative
        forgets every proof (views taken earlier share the modified storage)."""
        if inplace and not nonneg:
            self.nonneg.clear()
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                if nonneg:
                    self.nonneg.add(id(t))
                    self.keep.append(t)
                else:
                    self.nonneg.discard(id(t))

    def op_nonneg(self, op: str, flat: list[Any], acts: list[torch.Tensor], kwargs: dict, is_relu: bool) -> bool:
        if is_relu:
            return True
        if op in _SUM_OPS:
            if "alpha" in kwargs:
                return False
            operands = [v for v in flat if isinstance(v, (torch.Tensor, int, float)) and not isinstance(v, bool)]
            return all(id(v) in self.nonneg if isinstance(v, torch.Tensor) else v >= 0 for v in operands)
        return op in _SIGN_KEEPING_OPS and all(id(t) in self.nonneg for t in acts)

    def pre(self, module: nn.Module, args: tuple) -> None:
        name = self.name(module)
        inside_trusted = self.in_trusted()
        self.stack.append(module)
        self.graph.calls[name] = self.graph.calls.get(name, 0) + 1
        if inside_trusted or not _trusted(module):
            if not _trusted(module) and not list(module.children()):
                own = [n for n, _ in module.named_parameters(recurse=False)]
                if own:
                    self.culprit(f"{name} ({type(module).__name__}): layer type with parameters "
                                 f"({', '.join(own)}) has no LRP rule")
            return
        relu = type(module) is nn.ReLU
        self.consume(list(args), "relu" if relu else type(module).__name__, inplace_relu=relu and module.inplace)
        a = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if isinstance(module, LINEAR_TYPES):
            self.linear_nonneg[name] = self.linear_nonneg.get(name, True) and a is not None and id(a) in self.nonneg
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.padding_mode != "zeros":
                self.culprit(f"{name} ({type(module).__name__}): padding_mode={module.padding_mode!r} is unsupported "
                             "(only zero padding)")
            if a is not None and _shares_storage(a, self.x):
                check_input_fits(name, module, a)
                if name not in self.graph.first_layers:
                    self.graph.first_layers.append(name)
        if isinstance(module, _BN_TYPES) and a is not None:
            self.bn_inputs[name] = a
            self.keep.append(a)

    def post(self, module: nn.Module, args: tuple, out: Any) -> None:
        self.stack.pop()
        if self.in_trusted():
            return
        if _trusted(module):
            a = args[0] if args and isinstance(args[0], torch.Tensor) else None
            self.mark(out, type(module) is nn.ReLU or (isinstance(module, _SIGN_KEEPING_MODULES) and a is not None
                                                         and id(a) in self.nonneg))
        if isinstance(module, LINEAR_TYPES + _BN_TYPES) and isinstance(out, torch.Tensor):
            if isinstance(module, LINEAR_TYPES):
                self.producer[id(out)] = self.name(module)
            self.outputs.setdefault(self.name(module), []).append(self.value(out))
            self.keep.append(out)

    def on_op(self, func: Any, args: tuple, kwargs: dict, out: Any) -> None:
        if self.in_trusted():
            return
        flat, _ = tree_flatten((args, kwargs))
        acts = [t for t in flat if isinstance(t, torch.Tensor) and t.requires_grad]
        if not acts:
            return
        op = _op_name(func)
        if op in _QUERY_OPS:
            return
        is_relu = op in ("relu", "relu_") or (op in ("clamp", "clamp_", "clamp_min", "clamp_min_")
                                              and kwargs.get("min", args[1] if len(args) > 1 else None) == 0
                                              and kwargs.get("max", args[2] if len(args) > 2 else None) is None)
        inplace = op.endswith("_") and not op.startswith("__") or kwargs.get("inplace") is True or (
            op == "relu" and len(args) > 1 and args[1] is True)
        self.consume(flat, "relu" if is_relu else op, inplace_relu=is_relu and inplace)
        self.mark(out, self.op_nonneg(op, flat, acts, kwargs, is_relu), inplace or op.startswith("__i"))
        where = self.name(self.stack[-1]) if self.stack else "<model>"
        kind = type(self.stack[-1]).__name__ if self.stack else type(self.model).__name__
        if op in _PASS_OPS:
            if op == "pad" and (kwargs.get("mode", args[2] if len(args) > 2 else "constant") != "constant"
                                or kwargs.get("value", args[3] if len(args) > 3 else 0) not in (0, 0.0, None)):
                self.culprit(f"{where} ({kind}): op 'pad' with a non-zero or non-constant mode")
            return
        if op in ("clamp", "clamp_", "clamp_min", "clamp_min_"):
            lo = kwargs.get("min", args[1] if len(args) > 1 else None)
            hi = kwargs.get("max", args[2] if len(args) > 2 else None)
            if lo == 0 and hi is None:
                return  # a ReLU written as clamp
            self.culprit(f"{where} ({kind}): op '{op}' with bounds other than min=0 (saturation loses relevance)")
            return
        if op in _SCALE_OPS:
            tensor_args = [t for t in flat if isinstance(t, torch.Tensor)]
            if len(acts) >= 2:
                self.culprit(f"{where} ({kind}): op '{op}' multiplies/divides two activations")
            elif op.startswith(("div", "__truediv", "__itruediv")) and tensor_args and tensor_args[0] is not acts[0]:
                self.culprit(f"{where} ({kind}): op '{op}' divides by an activation")
            return
        self.culprit(f"{where} ({kind}): op '{op}' has no LRP rule"
                     + (" (functional layer outside an nn.Module)" if op in ("conv1d", "conv2d", "conv3d", "linear",
                                                                             "matmul", "bmm", "einsum") else ""))

    def finish(self, out: Any) -> ModelGraph:
        g = self.graph
        if not isinstance(out, torch.Tensor):
            self.culprit(f"<model> ({type(self.model).__name__}): returns {type(out).__name__}, not a tensor")
        else:
            g.output_shape = tuple(out.shape)
        for bn_name, a in self.bn_inputs.items():
            src = self.producer.get(id(a))
            if src is None:
                g.bn_unfoldable[bn_name] = "its input is not the output of a Linear/Conv layer"
            elif g.calls.get(src, 0) != 1 or g.calls.get(bn_name, 0) != 1:
                g.bn_unfoldable[bn_name] = f"it or its source layer {src!r} is called more than once per forward"
            elif self.consumers.get(id(a), 0) != 1:
                g.bn_unfoldable[bn_name] = f"the output of {src!r} is also used elsewhere"
            else:
                g.bn_pairs.append((src, bn_name))
        g.culprits = list(self._culprits)
        g.nonnegative_input = [n for n, ok in self.linear_nonneg.items() if ok]
        folded = dict(g.bn_pairs)

        def relu_only(v: tuple[int, int]) -> bool:
            uses = self.uses.get(v, [])
            return bool(uses) and all(u == "relu" for u in uses)

        for name, outs in self.outputs.items():
            if name not in self.producer.values():
                continue  # a BatchNorm
            finals = self.outputs.get(folded[name], []) if name in folded else outs
            if finals and len(finals) == len(outs) and all(relu_only(t) for t in finals):
                g.relu_only.append(name)
        return g


def probe_model(model: nn.Module, x: torch.Tensor) -> ModelGraph:
    """Run ``model`` once on ``x`` (use one sample) with recording; return the :class:`ModelGraph`.

    The model must already be in the state used for attribution (eval mode, parameters frozen); ``x`` is detached and
    made to require grad so that "depends on the input" equals ``requires_grad``. Input-shape problems raise
    :class:`InputShapeError`; other torch errors are re-raised as ``InputShapeError`` naming the input shape.
    """
    x = x.detach().clone().requires_grad_(True)
    probe = _Probe(model, x)
    with HookHandles() as handles:
        for m in model.modules():
            handles.add(m.register_forward_pre_hook(lambda mod, args: probe.pre(mod, args)))
            handles.add(m.register_forward_hook(lambda mod, args, out: probe.post(mod, args, out), always_call=True))
        try:
            with torch.enable_grad(), _Recorder(probe):
                out = model(x)
        except InputShapeError:
            raise
        except RuntimeError as err:
            shape = ", ".join(map(str, x.shape[1:]))
            raise InputShapeError(f"the model's forward failed on an input of shape (N, {shape}): {err}") from err
    return probe.finish(out)
