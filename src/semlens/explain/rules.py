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

Rules are data: each layer rule returns its :class:`~semlens.explain.declare.Declaration` (terms of parts with
weight/bias modifiers, served outputs, coefficients, stabilizer) from :meth:`Rule.declaration`, and the one compiler
(:func:`semlens.explain.plans.compile_rule`) picks the execution from it and from what the model probe found. A new
rule is a :class:`DeclaredRule` (or a subclass of :class:`Rule` implementing ``declaration``); input-domain rules,
whose relevance is not ``a * c``, implement :meth:`Rule.compile` themselves with the same plan signature.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import torch

from semlens.explain.declare import KEEP, Declaration, Mix, Modifier, Part, Term, as_terms
from semlens.explain.layerop import LayerOp, conv_padding, stabilize
from semlens.explain.plans import CallContext, Plan, compile_rule, sign_matters

__all__ = [
    "Rule",
    "DeclaredRule",
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
    "conv_padding",
    "Declaration",
    "Term",
    "Part",
    "Mix",
    "KEEP",
]

ZeroParams = str | Sequence[str] | None


def _zero_params(zero_params: ZeroParams) -> tuple[str, ...]:
    if zero_params is None:
        return ()
    if isinstance(zero_params, str):
        zero_params = (zero_params,)
    unknown = set(zero_params) - {"weight", "bias"}
    if unknown:
        raise ValueError(f"zero_params may contain 'weight' and 'bias', got {sorted(unknown)}")
    return tuple(zero_params)


class Rule:
    """Base class: how one linear/conv layer passes relevance to its input.

    A layer rule implements :meth:`declaration` (the rule as data); the attributor compiles it per layer with
    :meth:`compile`. ``input_rule`` classes (relevance not of the form ``a * c``; only on layers reading the model
    input) implement :meth:`compile` themselves, returning a :class:`~semlens.explain.plans.Plan` whose backward
    gives relevance. Every plan has the same signature: ``forward(a, ctx) -> (z, state)``, ``backward(state, g)``.
    """

    #: relevance is not ``a * c``: only for layers reading the model input; the plan's backward returns ``R(a)``
    input_rule: ClassVar[bool] = False
    #: the plan reads the z^B bounds from its :class:`~semlens.explain.plans.CallContext`
    needs_bounds: ClassVar[bool] = False

    def __init__(self, zero_params: ZeroParams = None) -> None:
        #: parameter names whose value is replaced by zero before the modifiers see them
        self.zero_params: tuple[str, ...] = _zero_params(zero_params)

    @property
    def is_plain_gradient(self) -> bool:
        """True when the rule's backward is the layer's ordinary gradient (no binding needed)."""
        return False

    def declaration(self) -> Declaration:
        """The rule as data: its terms (parts reading ``a``/``a⁺``/``a⁻`` through modified weights and biases, the
        outputs each term serves, its coefficient), the stabilizer and ``zero_params``."""
        raise NotImplementedError(f"{type(self).__name__} declares no terms; implement declaration() or compile()")

    def compile(self, op: LayerOp, nonnegative: bool) -> Plan:
        """The execution plan on layer ``op`` for inputs known to be ``>= 0`` (``nonnegative``) or of any sign; built
        once per weight version. Layer rules use the shared compiler."""
        return compile_rule(self.declaration(), op, nonnegative)

    def sign_matters(self, op: LayerOp) -> bool:
        """Whether :meth:`compile` differs for non-negative inputs (then the attributor checks the input's sign at run
        time wherever the model probe could not prove it)."""
        return sign_matters(self.declaration(), op)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class DeclaredRule(Rule):
    """A rule given directly as data: ``DeclaredRule(terms, stabilizer=1e-6, zero_params=None)``.

    Example (LRP-γ with its own γ for the biases, positive outputs only, for layers before a ReLU)::

        DeclaredRule([Term([Part("positive", Mix(1, 0.25), Mix(1, 0.1)), Part("negative", Mix(1, 0, 0.25), None)],
                           outputs="positive")])
    """

    def __init__(self, terms: Sequence[Term] | Term, stabilizer: float = 1e-6, zero_params: ZeroParams = None) -> None:
        super().__init__(zero_params)
        self.terms = as_terms(terms)
        self.stabilizer = float(stabilizer)
        self._declaration = Declaration(self.terms, self.stabilizer, self.zero_params)

    def declaration(self) -> Declaration:
        return self._declaration


class Epsilon(Rule):
    """LRP-ε: ``R_i = a_i Σ_j w_ij R_j / stab(z_j, ε)`` (bias included in ``z``). ``epsilon=0`` gives LRP-0.

    Args:
        epsilon: stabilizer added with the sign of ``z`` (default 1e-6, as Zennit's ``Epsilon``).
        zero_params: parameters set to zero in the denominator's forward (``["bias"]``: bias not in ``z``).
    """

    def __init__(self, epsilon: float = 1e-6, zero_params: ZeroParams = None) -> None:
        super().__init__(zero_params)
        if not epsilon >= 0:
            raise ValueError(f"epsilon must be >= 0, got {epsilon}")
        self.epsilon = float(epsilon)

    @property
    def is_plain_gradient(self) -> bool:
        return self.epsilon == 0 and not self.zero_params

    def declaration(self) -> Declaration:
        return Declaration((Term((Part(),)),), self.epsilon, self.zero_params)


def _signed_term(pos_w: Mix, neg_w: Mix, bias: Mix, outputs: str = "all", coefficient: float = 1.0) -> Term:
    """``a⁺ pos_w(w) + bias(b) + a⁻ neg_w(w)``."""
    return Term((Part("positive", pos_w, bias), Part("negative", neg_w, None)), outputs, coefficient)


class Gamma(Rule):
    """LRP-γ (Zennit's generalised form): favour positive contributions by ``γ``.

    Positive outputs ``z_j > 0`` use ``z⁺_j = a⁺(w + γw⁺) + (b + γb⁺) + a⁻(w + γw⁻)``, negative outputs use
    ``z⁻_j = a⁺(w + γw⁻) + (b + γb⁻) + a⁻(w + γw⁺)``; ``R_i = a_i Σ_j ∂z^±_j/∂a_i · R_j / stab(z^±_j)``.
    For non-negative inputs (after a ReLU) the ``a⁻`` terms vanish and the negative-output term is dropped where a
    ReLU follows the layer.

    Args:
        gamma: weight of the added positive (or negative) parts (default 0.25).
        stabilizer: ε of the denominators (default 1e-6).
    """

    def __init__(self, gamma: float = 0.25, zero_params: ZeroParams = None, stabilizer: float = 1e-6) -> None:
        super().__init__(zero_params)
        if not gamma >= 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.stabilizer = float(stabilizer)

    def declaration(self) -> Declaration:
        up, down = Mix(1.0, self.gamma, 0.0), Mix(1.0, 0.0, self.gamma)
        return Declaration((_signed_term(up, down, up, "positive"), _signed_term(down, up, down, "negative")),
                           self.stabilizer, self.zero_params)


class AlphaBeta(Rule):
    """LRP-αβ: ``R_i = Σ_j (α (∂z⁺_j/∂a_i) a_i / stab(z⁺_j) − β (∂z⁻_j/∂a_i) a_i / stab(z⁻_j)) R_j`` with
    ``z⁺ = a⁺w⁺ + b⁺ + a⁻w⁻`` and ``z⁻ = a⁺w⁻ + b⁻ + a⁻w⁺`` (Zennit's ``AlphaBeta``).

    Requires ``alpha - beta == 1`` and both ``>= 0``. For non-negative inputs (the usual case after a ReLU), both
    parts come from one layer evaluation with concatenated weights ``[w⁺; w⁻]`` and ``z = z⁺ + z⁻``.

    Args:
        alpha: weight of the positive part (default 2). beta: weight of the negative part (default 1).
        stabilizer: ε of the denominators (default 1e-6).
    """

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, zero_params: ZeroParams = None,
                 stabilizer: float = 1e-6) -> None:
        super().__init__(zero_params)
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        if abs(alpha - beta - 1.0) > 1e-12:
            raise ValueError(f"alpha - beta must equal 1, got alpha={alpha}, beta={beta}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.stabilizer = float(stabilizer)

    def declaration(self) -> Declaration:
        plus, minus = Mix(0.0, 1.0, 0.0), Mix(0.0, 0.0, 1.0)
        return Declaration((_signed_term(plus, minus, plus, coefficient=self.alpha),
                            _signed_term(minus, plus, minus, coefficient=-self.beta)),
                           self.stabilizer, self.zero_params)


class ModifiedRule(Rule):
    """A one-term rule declared by its modifiers of the weight, the bias and the stabiliser.

    ``R_i = a_i Σ_j w'_ij R_j / stab(z'_j, ε)`` with ``w' = weight(w)``, ``b' = bias(b)`` and
    ``z' = layer(a; w', b')`` (the generic form of Zennit's ``BasicHook`` with an identity input modifier):
    ``ModifiedRule()`` is LRP-ε, ``ModifiedRule(weight=lambda w: w + 0.25 * w.clamp(min=0), bias=...)`` is the
    positive-output part of LRP-γ. Functions are opaque to the compiler (general plan: true output plus one modified
    evaluation); :class:`Mix` modifiers (e.g. ``Mix(1, 0.25)`` for ``w + 0.25 w⁺``) let it fold the stabilizer where
    their sign is known. For several terms or signed inputs use :class:`DeclaredRule`.

    Args:
        weight, bias: :class:`Mix` or functions of the layer's (detached) weight / bias returning tensors of the same
            shapes (``None``: unchanged). ``zero_params`` drops the bias before ``bias`` sees it.
        stabilizer: ε added with the sign of ``z'`` (``sign(0) = +1``).
    """

    def __init__(self, weight: Modifier | None = None, bias: Modifier | None = None, stabilizer: float = 1e-6,
                 zero_params: ZeroParams = None) -> None:
        super().__init__(zero_params)
        if not stabilizer >= 0:
            raise ValueError(f"stabilizer must be >= 0, got {stabilizer}")
        self.weight, self.bias, self.stabilizer = weight, bias, float(stabilizer)

    def declaration(self) -> Declaration:
        part = Part("all", KEEP if self.weight is None else self.weight, KEEP if self.bias is None else self.bias)
        return Declaration((Term((part,)),), self.stabilizer, self.zero_params)


class ZPlus(AlphaBeta):
    """LRP-z⁺ (deep Taylor, ReLU inputs): ``AlphaBeta(alpha=1, beta=0)`` — only positive contributions."""

    def __init__(self, zero_params: ZeroParams = None, stabilizer: float = 1e-6) -> None:
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
    """A rule whose relevance is not ``a * c``; applied only to a layer that reads the model input. Its plan's backward
    returns the relevance ``R(a)`` itself."""

    input_rule = True

    def __init__(self, zero_params: ZeroParams = None, stabilizer: float = 1e-6) -> None:
        super().__init__(zero_params)
        self.stabilizer = float(stabilizer)

    def sign_matters(self, op: LayerOp) -> bool:
        return False

    def _params(self, op: LayerOp) -> tuple[torch.Tensor, torch.Tensor | None]:
        w = op.weight.detach()
        b = None if op.bias is None or "bias" in self.zero_params else op.bias.detach()
        return (torch.zeros_like(w) if "weight" in self.zero_params else w), b


class _ZBoxState(NamedTuple):
    a: torch.Tensor  #: the layer input
    low: torch.Tensor  #: the bounds, shaped like ``a`` (or with a batch dimension of 1)
    high: torch.Tensor
    ratio: torch.Tensor  #: z / stab(z^B)


class _ZBoxPlan(Plan):
    gives_relevance = True

    def __init__(self, rule: ZBox, op: LayerOp) -> None:
        self.rule, self.op = rule, op
        self.w, self.b = op.weight.detach(), None if op.bias is None else op.bias.detach()
        self.wm, self.bm = rule._params(op)
        self.wp, self.wn = self.wm.clamp(min=0), self.wm.clamp(max=0)
        b = self.bm
        self.bp, self.bn = (None, None) if b is None else (b.clamp(min=0), b.clamp(max=0))

    def forward(self, a: torch.Tensor, ctx: CallContext) -> tuple[torch.Tensor, _ZBoxState]:
        op, rule = self.op, self.rule
        z = op.forward(a, self.w, self.b)
        low = a.new_tensor(rule.low) if ctx.low is None else ctx.low
        high = a.new_tensor(rule.high) if ctx.high is None else ctx.high
        if low.shape != a.shape and (low.ndim != a.ndim or low.shape[1:] != a.shape[1:]):
            low, high = torch.broadcast_to(low.to(a), a.shape), torch.broadcast_to(high.to(a), a.shape)
        # with no zero_params the unmodified term is z itself (same weights and bias)
        first = z if not rule.zero_params else op.forward(a, self.wm, self.bm)
        den = first - op.forward(low, self.wp, self.bp) - op.forward(high, self.wn, self.bn)
        return z, _ZBoxState(a, low, high, z / stabilize(den, rule.stabilizer))

    def backward(self, state: _ZBoxState, g: torch.Tensor) -> torch.Tensor:
        op, a = self.op, state.a
        s = g * state.ratio
        return (a * op.input_grad(s, self.wm, a) - state.low * op.input_grad(s, self.wp, a)
                - state.high * op.input_grad(s, self.wn, a))


class ZBox(_InputRule):
    """LRP-z^B for inputs bounded by ``low <= x <= high`` (deep Taylor, box domain):

    ``R_i = Σ_j (x_i w_ij − l_i w⁺_ij − h_i w⁻_ij) R_j / stab(Σ_i' x_i' w_i'j − l_i' w⁺_i'j − h_i' w⁻_i'j)``.
    The biases cancel (``b − b⁺ − b⁻ = 0``), as in Zennit. ``low``/``high``: floats or tensors broadcastable to the
    input; ``None`` means the batch's minimum / maximum (set per call by the attributor, in the plan's context).
    """

    needs_bounds = True

    def __init__(self, low: float | torch.Tensor | None = 0.0, high: float | torch.Tensor | None = 1.0,
                 zero_params: ZeroParams = None, stabilizer: float = 1e-6) -> None:
        super().__init__(zero_params, stabilizer)
        self.low = low
        self.high = high

    def compile(self, op: LayerOp, nonnegative: bool) -> Plan:
        return _ZBoxPlan(self, op)


class _ReceptiveState(NamedTuple):
    a: torch.Tensor  #: the layer input (its shape)
    ratio: torch.Tensor  #: z / stab(layer(1; w', b'))


class _ReceptivePlan(Plan):
    """``R_i = Σ_j w'_ij R_j / stab(Σ_i' w'_i'j + b'_j)``: the denominator does not depend on the input (computed on
    one sample per input shape and cached with the modified weights)."""

    gives_relevance = True

    def __init__(self, op: LayerOp, wm: torch.Tensor, bm: torch.Tensor | None, stabilizer: float) -> None:
        self.op, self.wm, self.bm, self.stabilizer = op, wm, bm, stabilizer
        self.w, self.b = op.weight.detach(), None if op.bias is None else op.bias.detach()
        self.dens: dict[tuple[int, ...], torch.Tensor] = {}

    def forward(self, a: torch.Tensor, ctx: CallContext) -> tuple[torch.Tensor, _ReceptiveState]:
        z = self.op.forward(a, self.w, self.b)
        key = tuple(a.shape[1:])
        if key not in self.dens:
            self.dens[key] = stabilize(self.op.forward(torch.ones_like(a[:1]), self.wm, self.bm), self.stabilizer)
        return z, _ReceptiveState(a, z / self.dens[key])

    def backward(self, state: _ReceptiveState, g: torch.Tensor) -> torch.Tensor:
        return self.op.input_grad(g * state.ratio, self.wm, state.a)


class WSquare(_InputRule):
    """LRP-w² (deep Taylor, unbounded inputs): ``R_i = Σ_j w_ij² R_j / stab(Σ_i' w_i'j² + b_j²)``.

    As in Zennit the squared bias joins the denominator unless ``zero_params=["bias"]``.
    """

    def __init__(self, zero_params: ZeroParams = None, stabilizer: float = 1e-6) -> None:
        super().__init__(zero_params, stabilizer)

    def _modified(self, op: LayerOp) -> tuple[torch.Tensor, torch.Tensor | None]:
        w, b = self._params(op)
        return w ** 2, None if b is None else b ** 2

    def compile(self, op: LayerOp, nonnegative: bool) -> Plan:
        return _ReceptivePlan(op, *self._modified(op), self.stabilizer)


class Flat(WSquare):
    """LRP-flat: relevance spread uniformly over each output's receptive field (all weights one, bias zero):

    ``R_i = Σ_j 1[i ∈ RF(j)] R_j / stab(|RF(j)|)`` (zero padding does not count).
    """

    def _modified(self, op: LayerOp) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.ones_like(op.weight.detach()), None
