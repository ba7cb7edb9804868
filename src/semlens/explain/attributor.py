"""Attribution: gradient, sensitivity, gradient×input and LRP composites on any ``nn.Module`` of standard layers.

Mechanics (one forward, one backward, no graph rewriting): the model runs normally, except that each Linear/Conv layer
with a non-trivial rule runs through a small autograd function (instance-level ``forward`` override, always removed)
whose output equals the layer's output and whose backward applies the rule. Everything else is the ordinary gradient,
which — with the invariant ``grad(a) = R(a) / a`` — is exactly LRP's sum rule for residual additions, pooling,
concatenation and ReLU. Relevance of any tensor is ``a * grad(a)``; the output relevance is ``weighting * output``.

Because every rule's backward is linear in the incoming relevance (the rule's ratios, the ReLU gates and the max-pool
winners are fixed by the forward), one forward serves ``m`` output weightings: an ``(m, N, n_out)`` target runs the
forward once and ``m`` backward passes through the retained graph (the rules' states are kept and never modified in
place), returning ``(m, N, ...)`` relevance. PyTorch's ``is_grads_batched`` (legacy vmap) gives the same numbers but was
slower here (70 vs 60 ms, alexnet-like, batch 16, k = 5, CPU): ``convolution_backward``, ``max_pool2d`` backward and
``matmul`` have no batching rule, so it loops per replica anyway and then stacks.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from semlens.explain.canonizers import MergeBatchNorm
from semlens.explain.composites import DEFAULT_METHOD, PRESETS, Composite, check_parameters, preset
from semlens.explain.graph_check import ModelGraph, UnsupportedModelError, probe_model, reads_input
from semlens.explain.layerop import LayerOp, nonnegative
from semlens.explain.plans import NO_CONTEXT, CallContext, Plan
from semlens.explain.rules import Rule
from semlens.layers import HookHandles, frozen, get_module
from semlens.runtime import progress

__all__ = ["Attributor", "attribute", "Target", "Units"]

Target = int | Sequence[int] | torch.Tensor
Units = Mapping[str, Sequence[int] | torch.Tensor]


class _Call:
    """State of one attribution call, read by the bound layers during forward and backward."""

    def __init__(self, x: torch.Tensor, low: Any, high: Any) -> None:
        self.x = x
        self.low = low
        self.high = high
        # relevance of input-domain rules arrives as the gradient of this zero tensor (shape of ``x``), so it is
        # separate for each backward pass through one forward; created by the first input rule of the forward
        self.sink: torch.Tensor | None = None
        # keep the rules' states after a backward pass (more passes through the same forward follow)
        self.retain = False

    def input_sink(self) -> torch.Tensor:
        if self.sink is None:
            self.sink = torch.zeros_like(self.x, requires_grad=True)
        return self.sink

    def bound(self, value: Any, fallback: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """A z^B bound broadcast to the model input, then reshaped like the layer input ``a``.

        A bound that is the same for every sample keeps a leading batch dimension of 1 (computed once per batch).
        """
        t = fallback if value is None else torch.as_tensor(value, dtype=self.x.dtype, device=self.x.device)
        t = t.to(self.x)
        if t.ndim > self.x.ndim:
            raise ValueError(f"z^B bound of shape {tuple(t.shape)} does not broadcast to the input "
                             f"{tuple(self.x.shape)}")
        shared = t.ndim < self.x.ndim or t.shape[0] == 1
        shape = (1, *self.x.shape[1:]) if shared else self.x.shape
        try:
            t = torch.broadcast_to(t, shape)
        except RuntimeError as err:
            raise ValueError(f"z^B bound of shape {tuple(t.shape)} does not broadcast to the input "
                             f"{tuple(self.x.shape)}") from err
        return t.reshape(shape[0], *a.shape[1:])


class _RuleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, binding):  # noqa: D102
        plan = binding.plan(a)
        z, state = plan.forward(a, NO_CONTEXT)
        ctx.plan, ctx.state, ctx.call = plan, state, binding.attributor._call
        return z

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        grad = ctx.plan.backward(ctx.state, g)
        if not ctx.call.retain:
            ctx.state = None  # free early: no further pass reads it
        return grad, None


class _InputRuleFn(torch.autograd.Function):
    """A rule on a layer reading the model input: its relevance (not ``R / a``) is returned as the gradient of the
    call's zero ``sink`` (shape of the model input), so the attributor reads it as ``grad(sink)``."""

    @staticmethod
    def forward(ctx, a, sink, binding, context):  # noqa: D102
        plan = binding.plan(a)
        z, state = plan.forward(a, context)
        ctx.plan, ctx.state, ctx.shape, ctx.call = plan, state, sink.shape, binding.attributor._call
        return z

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        rel = ctx.plan.backward(ctx.state, g)
        if not ctx.call.retain:
            ctx.state = None
        return None, rel.reshape(ctx.shape), None, None


class _Mask(torch.autograd.Function):
    """Identity forward (a copy, safe against later in-place ops); backward multiplies the gradient by ``mask``."""

    @staticmethod
    def forward(ctx, t, mask):  # noqa: D102
        ctx.mask = mask
        return t.clone()

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        return g if ctx.mask is None else g * ctx.mask, None


class _Binding:
    """A rule bound to one layer: replaces the layer's ``forward`` on the instance while the attributor is active.

    The rule's plans (one for inputs known to be non-negative, one for any sign) are compiled on first use and again
    whenever the layer's weights change; the input's sign is checked at run time only where the rule's plan depends on
    it and the model probe did not prove it."""

    def __init__(self, attributor: Attributor, name: str, module: nn.Module, rule: Rule,
                 relu_follows: bool = False, nonnegative_input: bool = False) -> None:
        self.attributor = attributor
        self.name = name
        self.module = module
        self.rule = rule
        self.op = LayerOp(module, name, relu_follows, nonnegative_input)
        self._key: tuple | None = None
        self._plans: dict[bool, Plan] = {}
        self._check_sign = not nonnegative_input and rule.sign_matters(self.op)
        self._saved_forward = module.__dict__.get("forward")
        module.forward = self.forward

    def remove(self) -> None:
        if self._saved_forward is None:
            self.module.__dict__.pop("forward", None)
        else:
            self.module.forward = self._saved_forward

    def plan(self, a: torch.Tensor) -> Plan:
        """The compiled plan for the input ``a`` (cached per weight version and input-sign knowledge)."""
        w, b = self.op.weight, self.op.bias
        key = (id(w), w._version, id(b), None if b is None else b._version, w.device, w.dtype)
        if key != self._key:
            self._plans, self._key = {}, key
        known = self.op.nonnegative_input or (self._check_sign and nonnegative(a))
        plan = self._plans.get(known)
        if plan is None:
            plan = self._plans[known] = self.rule.compile(self.op, known)
        return plan

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        call = self.attributor._call
        if call is None:  # the model is used outside an attribution call: behave like the layer itself
            return self.op.forward(a, self.op.weight, self.op.bias)
        if self.rule.input_rule:
            if not reads_input(a, call.x):
                raise ValueError(f"rule {self.rule!r} on layer {self.name!r} applies only to a layer that reads the "
                                 "model input directly, but this layer's input is computed inside the model")
            context = NO_CONTEXT
            if self.rule.needs_bounds:
                low = call.bound(call.low if call.low is not None else self.rule.low, call.x.detach().min(), a)
                high = call.bound(call.high if call.high is not None else self.rule.high, call.x.detach().max(), a)
                if bool((low > a.detach()).any()) or bool((high < a.detach()).any()):
                    raise ValueError(f"z^B bounds do not contain the input at layer {self.name!r}: need "
                                     "low <= x <= high (pass low=/high= or leave them unset for the batch min/max)")
                context = CallContext(low, high)
            return _InputRuleFn.apply(a, call.input_sink(), self, context)
        return _RuleFn.apply(a, self)


def _check_input(x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"input must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"input must be a floating-point tensor, got dtype {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"input must be batched (N, ...), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("input batch is empty")
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        where = bad.reshape(x.shape[0], -1).any(1).nonzero().flatten().tolist()
        raise ValueError(f"input contains NaN/Inf (samples {where[:10]})")
    return x


def output_weighting(target: Target, out: torch.Tensor) -> torch.Tensor:
    """``(N, n_out)`` weighting of the outputs from a class index, one index per sample, or a weighting.

    The explained quantity is ``sum(weighting * out)``; relevance at the output is ``weighting * out``.
    """
    if out.ndim != 2:
        raise ValueError(f"the model output must have shape (N, n_outputs), got {tuple(out.shape)}")
    n, n_out = out.shape
    if isinstance(target, bool):
        raise TypeError("target must be an int, a sequence of ints or a tensor, not bool")
    if isinstance(target, int):
        if not 0 <= target < n_out:
            raise ValueError(f"target class {target} out of range for a model with {n_out} outputs")
        w = torch.zeros_like(out)
        w[:, target] = 1
        return w
    t = torch.as_tensor(target, device=out.device)
    if t.ndim == 1 and not t.is_floating_point():
        if t.shape[0] != n:
            raise ValueError(f"target has {t.shape[0]} class indices for a batch of {n}")
        if bool(((t < 0) | (t >= n_out)).any()):
            raise ValueError(f"target classes {t[(t < 0) | (t >= n_out)].tolist()[:10]} out of range for a model "
                             f"with {n_out} outputs")
        return torch.nn.functional.one_hot(t.long(), n_out).to(out)
    if t.ndim == 2:
        if tuple(t.shape) != (n, n_out):
            raise ValueError(f"target weighting has shape {tuple(t.shape)}, expected {(n, n_out)}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError("target weighting contains NaN/Inf")
        return t.to(out)
    raise ValueError(f"target must be an int, (N,) class indices or an (N, {n_out}) weighting; got shape "
                     f"{tuple(t.shape)}")


def batched_weighting(target: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Check an ``(m, N, n_out)`` stack of ``m`` output weightings against the output ``out`` ``(N, n_out)``."""
    if out.ndim != 2:
        raise ValueError(f"the model output must have shape (N, n_outputs), got {tuple(out.shape)}")
    if tuple(target.shape[1:]) != tuple(out.shape) or target.shape[0] == 0:
        raise ValueError(f"batched target weighting has shape {tuple(target.shape)}, expected (m, "
                         f"{out.shape[0]}, {out.shape[1]}) with m >= 1")
    if not target.is_floating_point() or not bool(torch.isfinite(target).all()):
        raise ValueError("batched target weighting must be a finite floating-point tensor")
    return target.to(out)


class Attributor:
    """Context manager for repeated attributions with one method on one model.

    On entry the model is put in eval mode with frozen parameters; on the first call (and whenever the input's
    per-sample shape changes) one probe forward on a single sample checks the model, BatchNorms are folded and the
    rules are bound. On exit every edit is undone: forwards, parameters (bit-identical), train/eval flags,
    ``requires_grad``. Parameter ``.grad`` is never touched.

    Args:
        model: any ``nn.Module`` mapping ``(N, ...)`` inputs to ``(N, n_outputs)`` logits.
        method: a name from :func:`list_methods` (ignored when ``composite`` is given).
        composite: a :class:`Composite` with explicit rule assignments (LRP).
        canonize: fold BatchNorm into the preceding Linear/Conv (LRP only; default True).
        low, high: default z^B input bounds of every call (a call's own ``low``/``high`` take precedence).
        params: the method's parameters (:func:`~semlens.explain.composites.method_parameters`, e.g. ``epsilon``,
            ``gamma``, ``zero_params``); an unknown keyword raises ``ValueError`` listing the valid ones.

    Every edit of the model (frozen state, folded BatchNorms, rule bindings) is entered on one exit stack, closed on
    exit (exceptions included); nothing is left on the model's modules.
    """

    def __init__(self, model: nn.Module, method: str = DEFAULT_METHOD, *, composite: Composite | None = None,
                 canonize: bool = True, low: Any = None, high: Any = None, **params: Any) -> None:
        if composite is None:
            check_parameters(method, params)  # unknown method or keyword -> ValueError
        elif params:
            raise ValueError(f"parameters {', '.join(map(repr, params))} apply to named methods, not to an explicit "
                             "composite (set them on its rules)")
        self.model = model
        self.method = "composite" if composite is not None else method
        self.lrp = composite is not None or method in PRESETS
        self.composite = composite if composite is not None else (preset(method, **params) if self.lrp else None)
        self.canonize = canonize
        self.low, self.high = low, high
        self.graph: ModelGraph | None = None
        self.rules: dict[str, Rule] = {}
        self._signature: tuple | None = None
        self._stack: contextlib.ExitStack | None = None
        self._edits: contextlib.ExitStack | None = None
        self._call: _Call | None = None

    def __enter__(self) -> Attributor:
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(frozen(self.model))
        return self

    def __exit__(self, *exc: object) -> None:
        stack, self._stack, self._edits, self._signature = self._stack, None, None, None
        if stack is not None:
            stack.close()  # rule bindings, then folded BatchNorms, then the frozen state: last in, first out

    def _teardown(self) -> None:
        """Undo the edits of the current input signature (the frozen state stays until exit)."""
        if self._edits is not None:
            self._edits.close()
        self._edits = None
        self._signature = None

    def _setup(self, x: torch.Tensor) -> None:
        signature = (tuple(x.shape[1:]), x.dtype, x.device)
        if signature == self._signature:
            return
        self._teardown()
        self.graph = graph = probe_model(self.model, x[:1])
        if not self.lrp:
            self._signature = signature
            return
        culprits = list(graph.culprits)
        bn_names = {n for n, m in self.model.named_modules()
                    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) and graph.calls.get(n)}
        if not self.canonize:
            culprits += [f"{n} (BatchNorm): not canonized (canonize=False)" for n in sorted(bn_names)]
        else:
            culprits += [f"{n} (BatchNorm): cannot be folded: {why}" for n, why in graph.bn_unfoldable.items()]
        if culprits:
            raise UnsupportedModelError(culprits)
        assert self._stack is not None
        self._edits = edits = self._stack.enter_context(contextlib.ExitStack())
        try:
            if self.canonize:
                canonizer = MergeBatchNorm()
                edits.callback(canonizer.restore)
                canonizer.apply(self.model, graph.bn_pairs)
            self.rules = self.composite.assign(self.model, graph.first_layers)
            if self.composite.first_map and not graph.first_layers:
                warnings.warn(f"{self.composite.name}: no Linear/Conv layer reads the model input directly (the model "
                              "transforms it first), so the input-layer rule of this composite is not applied",
                              stacklevel=3)
            misplaced = [f"{n}: {r!r}" for n, r in self.rules.items() if r.input_rule and n not in graph.first_layers]
            if misplaced:
                readers = ", ".join(graph.first_layers) or "none found"
                raise ValueError("input-domain rules (z^B, flat, w^2) apply only to layers that read the model input "
                                 f"({readers}); misplaced: {'; '.join(misplaced)}")
            twice = [n for n, r in self.rules.items() if r.input_rule and graph.calls.get(n, 0) > 1]
            if twice:
                raise ValueError(f"input-domain rule on a layer called more than once per forward: {', '.join(twice)}")
            for name, rule in self.rules.items():
                binding = _Binding(self, name, get_module(self.model, name), rule, relu_follows=name in graph.relu_only,
                                   nonnegative_input=name in graph.nonnegative_input)
                edits.callback(binding.remove)
        except BaseException:
            self._teardown()
            raise
        self._signature = signature

    def _model_device(self) -> tuple[torch.device | None, torch.dtype | None]:
        p = next(self.model.parameters(), None)
        return (None, None) if p is None else (p.device, p.dtype)

    def __call__(self, x: torch.Tensor, target: Target, *, layer: str | None = None, units: Units | None = None,
                 low: Any = None, high: Any = None, batch_size: int | None = None) -> torch.Tensor:
        """Relevance of ``x`` (``(N, ...)``) for ``target``; shape of ``x``, or of ``layer``'s output if given.

        ``target`` may also be an ``(m, N, n_out)`` tensor of ``m`` output weightings: one forward and ``m`` backward
        passes through it give the ``m`` relevances, returned as ``(m, N, ...)`` (each equal to the call with that
        weighting alone, at the cost of one forward less per extra weighting).

        ``units`` maps layer names to channel indices (or an ``(N, C)`` 0/1 mask) through which relevance may flow.
        ``low``/``high`` override the z^B bounds (float or tensor broadcastable to ``x``). ``batch_size`` splits the
        batch into chunks (with a progress bar on terminals).
        """
        if self._stack is None:
            raise RuntimeError("use the Attributor as a context manager: `with Attributor(model, ...) as attr:`")
        low = self.low if low is None else low
        high = self.high if high is None else high
        x = _check_input(x)
        device, dtype = self._model_device()
        if device is not None and (x.device != device or x.dtype != dtype):
            x = x.to(device=device, dtype=dtype)
        if layer is not None:
            get_module(self.model, layer)
        for name in units or {}:
            get_module(self.model, name)
        if batch_size is None or batch_size >= x.shape[0]:
            return self._attribute(x, target, layer, units, low, high)
        if isinstance(target, (torch.Tensor, list, tuple)):
            target = torch.as_tensor(target)
        chunks = []
        starts = range(0, x.shape[0], batch_size)
        for s in progress(starts, total=len(starts), desc=f"explain ({self.method})"):
            if isinstance(target, torch.Tensor):
                t = target[:, s:s + batch_size] if target.ndim == 3 else target[s:s + batch_size]
            else:
                t = target
            u = {k: (v[s:s + batch_size] if isinstance(v, torch.Tensor) and v.ndim == 2 else v)
                 for k, v in (units or {}).items()} or None
            chunks.append(self._attribute(x[s:s + batch_size], t, layer, u, low, high))
        return torch.cat(chunks, dim=1 if isinstance(target, torch.Tensor) and target.ndim == 3 else 0)

    def _attribute(self, x: torch.Tensor, target: Target, layer: str | None, units: Units | None,
                   low: Any, high: Any) -> torch.Tensor:
        self._setup(x)
        xr = x.detach().requires_grad_(True)
        call = _Call(xr, low, high)
        tap: dict[str, torch.Tensor] = {}
        with HookHandles() as handles:
            try:
                self._call = call
                if layer is not None:
                    handles.add(get_module(self.model, layer).register_forward_hook(self._tap_hook(layer, tap)))
                for name, sel in (units or {}).items():
                    handles.add(get_module(self.model, name).register_forward_hook(self._mask_hook(name, sel, x)))
                with torch.enable_grad():
                    out = self.model(xr)
                    if not isinstance(out, torch.Tensor):
                        raise ValueError(f"the model returned {type(out).__name__}, not a tensor of logits")
                    if out.ndim == 2 and out.shape[0] != x.shape[0]:
                        raise ValueError(f"the model output has {out.shape[0]} rows for a batch of {x.shape[0]}")
                    batched = isinstance(target, torch.Tensor) and target.ndim == 3
                    weighting = batched_weighting(target, out) if batched else output_weighting(target, out)
                    if layer is not None:
                        if "act" not in tap:
                            raise ValueError(f"layer {layer!r} did not run during the forward pass")
                        act = tap["act"]
                    else:
                        act = xr
                    sink = call.sink if layer is None else None  # input-rule relevance (only when reading the input)
                    wrt = [act] if sink is None else [act, sink]
                    seeds = weighting if batched else weighting.unsqueeze(0)
                    rels = []
                    for i, seed in enumerate(seeds):  # one forward, one backward pass per seed
                        call.retain = i < len(seeds) - 1
                        grads = torch.autograd.grad(out, wrt, seed, allow_unused=True, retain_graph=call.retain)
                        rels.append(self._relevance(act, grads))
                return (torch.stack(rels) if batched else rels[0]).detach()
            finally:
                self._call = None

    def _relevance(self, act: torch.Tensor, grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        """The method's relevance of ``act`` from its gradient (and the input rules' relevance, ``grads[1]``)."""
        grad = torch.zeros_like(act) if grads[0] is None else grads[0]
        if self.method == "gradient":
            return grad
        if self.method == "sensitivity":
            return grad ** 2
        rel = act.detach() * grad
        if len(grads) > 1 and grads[1] is not None:
            rel = rel + grads[1]
        return rel

    @staticmethod
    def _tap_hook(name: str, tap: dict[str, torch.Tensor]):
        def hook(_m: nn.Module, _inp: Any, out: Any) -> torch.Tensor:
            if not isinstance(out, torch.Tensor):
                raise ValueError(f"layer {name!r} returns {type(out).__name__}; relevance needs a tensor output")
            if "act" in tap:
                raise ValueError(f"layer {name!r} runs more than once per forward; its relevance is ambiguous")
            tap["act"] = out
            return out.clone()

        return hook

    @staticmethod
    def _mask_hook(name: str, sel: Sequence[int] | torch.Tensor, x: torch.Tensor):
        def hook(_m: nn.Module, _inp: Any, out: Any) -> torch.Tensor:
            if not isinstance(out, torch.Tensor) or out.ndim < 2:
                raise ValueError(f"units: layer {name!r} must output an (N, C, ...) tensor")
            c = out.shape[1]
            s = torch.as_tensor(sel, device=out.device)
            if s.ndim == 2:
                if tuple(s.shape) != (out.shape[0], c):
                    raise ValueError(f"units mask for {name!r} has shape {tuple(s.shape)}, expected "
                                     f"{(out.shape[0], c)}")
                mask = s.to(out.dtype)
            else:
                idx = s.long().flatten()
                if idx.numel() and bool(((idx < 0) | (idx >= c)).any()):
                    raise ValueError(f"units {idx[(idx < 0) | (idx >= c)].tolist()} out of range for layer {name!r} "
                                     f"with {c} channels")
                mask = torch.zeros(c, dtype=out.dtype, device=out.device)
                mask[idx] = 1
                mask = mask.unsqueeze(0)
            return _Mask.apply(out, mask.view(*mask.shape, *([1] * (out.ndim - 2))))

        return hook


def attribute(model: nn.Module, x: torch.Tensor, target: Target, method: str = DEFAULT_METHOD, *,
              layer: str | None = None, units: Units | None = None, low: Any = None, high: Any = None,
              composite: Composite | None = None, canonize: bool = True, batch_size: int | None = None,
              **params: Any) -> torch.Tensor:
    """Explain ``model``'s output for ``target`` on the batch ``x``.

    Args:
        model: ``nn.Module`` mapping ``x`` ``(N, ...)`` to logits ``(N, n_outputs)`` (explain logits, not softmax).
        x: input batch, float, finite. Images: ``(N, C, H, W)`` in [0, 1].
        target: class index (int), one index per sample (``(N,)``), or an ``(N, n_outputs)`` output weighting; an
            ``(m, N, n_outputs)`` stack of ``m`` weightings returns ``(m, N, ...)`` from one forward (see
            :meth:`Attributor.__call__`).
            The explained quantity is ``sum(weighting * logits)``: for a class index the LRP relevance at the output is
            the logit itself (Zennit starts from 1 instead, so its heatmaps are ours divided by the logit).
        method: see :func:`list_methods` (default ``epsilon-plus-flat``) — ``gradient``, ``sensitivity``,
            ``gradient-x-input``, ``epsilon-plus-flat``,
            ``epsilon-plus``, ``epsilon-gamma-box``, ``epsilon-alpha2-beta1``, ``epsilon-alpha2-beta1-flat``,
            ``lrp-0``, ``lrp-epsilon``, ``lrp-gamma``, ``lrp-zplus``, ``lrp-alpha1-beta0``, ``lrp-alpha2-beta1``.
        layer: read relevance at this layer's output instead of the input.
        units: ``{layer name: channel indices or (N, C) mask}``; relevance flows only through these channels
            (concept-conditional heatmaps).
        low, high: z^B input bounds (default: the batch's minimum and maximum).
        composite: explicit rule assignment (overrides ``method``).
        canonize: fold BatchNorm layers for LRP (default True).
        batch_size: process the batch in chunks of this size.
        params: the method's parameters (``epsilon``, ``gamma``, ``zero_params``, as its preset declares them); an
            unknown keyword raises ``ValueError`` listing the valid ones.

    Returns:
        relevance with ``x``'s shape (or the layer output's shape), same dtype/device as the model, detached.
    """
    with Attributor(model, method, composite=composite, canonize=canonize, **params) as attr:
        return attr(x, target, layer=layer, units=units, low=low, high=high, batch_size=batch_size)
