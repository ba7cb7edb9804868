"""The rule compiler: a :class:`~semlens.explain.declare.Declaration` plus what is known about a layer becomes an
execution plan (the one place where fast paths are chosen).

Facts used (from the model probe, :class:`~semlens.explain.layerop.LayerOp`, or a run-time check of the input):

* ``relu_follows``: outputs ``z <= 0`` get no relevance, so terms serving only ``z < 0`` are dropped and the
  ``z > 0`` selection of the others is left to the ReLU's own gate.
* non-negative input (``nonnegative_input`` from the probe; otherwise one ``amin`` of the input per call when the
  plan depends on it): parts reading ``a⁻`` vanish and parts reading ``a⁺`` read ``a``.

Plans (each a small class with ``forward(a, ctx) -> (z, state)`` and ``backward(state, g) -> R(a)/a``):

* :class:`SameLayerPlan` — one term that is the layer itself (LRP-ε): ``z / stab(z) = |z| / (|z| + ε)``.
* :class:`FoldedPlan` — non-negative input and every term's sign known from its :class:`Mix` data: sign-definite
  (``w⁺``, ``w⁻``: ``z_t >= 0`` or ``<= 0``) or dominating the true output on the outputs it serves (``w + γw⁺``:
  ``z_t >= z``). The stabilizer is folded into the bias, the terms of a ``groups == 1`` layer run as one wider layer
  (weights concatenated), and when the terms' weights add up to ``s·w`` the true output is ``Σ z_t / s`` (no extra
  evaluation). Served-output selection is a clamp of the ratio (``z / z_t >= 0`` exactly on the served outputs).
* :class:`GeneralPlan` — anything else: the true output plus each term from its parts, ``stab`` with the sign of
  ``z_t``, the served outputs selected by ``where``, and the backward of signed parts gated by ``a > 0``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from semlens.explain.declare import KEEP, Declaration, Mix, Part, Term
from semlens.explain.layerop import LayerOp, safe_ratio, stabilize

__all__ = ["CallContext", "Plan", "compile_rule", "sign_matters", "SameLayerPlan", "FoldedPlan", "GeneralPlan"]


@dataclass
class CallContext:
    """What a plan may read besides the layer input: the z^B bounds, shaped like the input (input-domain rules)."""

    low: torch.Tensor | None = None
    high: torch.Tensor | None = None


NO_CONTEXT = CallContext()


class Plan:
    """How one layer runs during an attribution: ``forward`` returns the layer's output (equal to the model's up to
    float rounding) and a state; ``backward`` maps ``g = R(z)/z`` to ``R(a)/a`` (or, when ``gives_relevance``, to
    ``R(a)`` itself: the input-domain rules). States are never modified by ``backward`` (it may run several times)."""

    gives_relevance: bool = False

    def forward(self, a: torch.Tensor, ctx: CallContext) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def backward(self, state: Any, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _params(decl: Declaration, op: LayerOp) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = op.weight.detach()
    b = None if op.bias is None or "bias" in decl.zero_params else op.bias.detach()
    return (torch.zeros_like(w) if "weight" in decl.zero_params else w), b


def _bias(op: LayerOp) -> torch.Tensor | None:
    return None if op.bias is None else op.bias.detach()


def _modified(modifier: Any, p: torch.Tensor | None, op: LayerOp, what: str) -> torch.Tensor | None:
    if p is None or modifier is None:
        return None
    out = modifier(p)
    if not isinstance(out, torch.Tensor) or out.shape != p.shape:
        raise ValueError(f"rule on layer {op.name!r}: the modified parameters must keep their shapes (the {what} "
                         f"has shape {tuple(p.shape)})")
    return out


def _simplify(decl: Declaration, op: LayerOp, nonnegative: bool) -> list[Term]:
    """The declaration's terms after the facts: drop ``z < 0`` terms before a ReLU, ``a⁻`` parts on non-negative
    inputs (``a⁺`` parts then read ``a``), and terms with coefficient 0."""
    terms = []
    for t in decl.terms:
        if t.coefficient == 0 or (op.relu_follows and t.outputs == "negative"):
            continue
        parts = t.parts
        if nonnegative:
            parts = tuple(Part("all", p.weight, p.bias) for p in parts if p.inputs != "negative")
        if parts:
            terms.append(Term(parts, t.outputs, t.coefficient))
    return terms


def _direction(t: Term, op: LayerOp, decl: Declaration) -> tuple[int, bool]:
    """For a one-part term on non-negative inputs: (+1 / -1 / 0: known sign of ``stab``, whether ``z_t`` must be
    clamped to it because only dominance, not the sign itself, is known)."""
    if len(t.parts) != 1 or not isinstance(t.parts[0].weight, Mix):
        return 0, False
    wmod, bmod = t.parts[0].weight, t.parts[0].bias
    has_bias = op.bias is not None and "bias" not in decl.zero_params and bmod is not None
    if has_bias and not isinstance(bmod, Mix):
        return 0, False
    sign = wmod.sign
    if sign and (not has_bias or bmod.sign == sign) and t.outputs in ("all", "positive" if sign > 0 else "negative"):
        return sign, False
    want = {"positive": 1, "negative": -1}.get(t.outputs, 0)
    # z_t - z = (modified - true) parameters applied to a >= 0: signed when every modifier only adds pieces of one sign
    exact_bias = op.bias is None or (has_bias and bmod.dominates(want))
    if want and "weight" not in decl.zero_params and wmod.dominates(want) and exact_bias:
        return want, True
    return 0, False


def _sum_factor(terms: list[Term], op: LayerOp, decl: Declaration) -> tuple[float | None, bool]:
    """``(s, add_bias)`` when the terms' outputs add up to ``s`` times the true output (``add_bias``: the terms carry
    no bias and the layer's must be added); ``(None, False)`` when they do not."""
    mixes = [t.parts[0].weight for t in terms]
    if "weight" in decl.zero_params or not all(isinstance(m, Mix) for m in mixes):
        return None, False
    plus, minus = sum(m.plus for m in mixes), sum(m.minus for m in mixes)
    s = sum(m.same for m in mixes) + plus
    if plus != minus or s == 0:
        return None, False
    if op.bias is None:
        return s, False
    biases = [t.parts[0].bias for t in terms]
    if "bias" in decl.zero_params or all(b is None for b in biases):
        return s, True
    if not all(isinstance(b, Mix) for b in biases):
        return None, False
    bplus, bminus = sum(b.plus for b in biases), sum(b.minus for b in biases)
    if bplus != bminus or sum(b.same for b in biases) + bplus != s:
        return None, False
    return s, False


def compile_rule(decl: Declaration, op: LayerOp, nonnegative: bool) -> Plan:
    """The execution plan of ``decl`` on the layer ``op`` (non-negative inputs when ``nonnegative``): builds the
    modified parameters once (call again when the weights change)."""
    terms = _simplify(decl, op, nonnegative)
    if not terms:
        return GeneralPlan(decl, op, [])
    one = terms[0].parts[0] if len(terms) == 1 and len(terms[0].parts) == 1 else None
    if (one is not None and one.inputs == "all" and one.weight == KEEP and one.bias == KEEP and not decl.zero_params
            and terms[0].coefficient == 1 and terms[0].outputs == "all" and decl.stabilizer > 0):
        return SameLayerPlan(op, decl.stabilizer)
    if nonnegative and decl.stabilizer > 0:
        dirs = [_direction(t, op, decl) for t in terms]
        if all(d for d, _ in dirs):
            return FoldedPlan(decl, op, terms, dirs)
    return GeneralPlan(decl, op, terms)


def sign_matters(decl: Declaration, op: LayerOp) -> bool:
    """Whether the plan for non-negative inputs differs from the general one (then the input's sign is checked at
    run time unless the probe proved it)."""
    if decl.reads_sign:
        return True
    terms = _simplify(decl, op, True)
    return bool(terms) and decl.stabilizer > 0 and all(_direction(t, op, decl)[0] for t in terms)


class SameLayerState(NamedTuple):
    a: torch.Tensor  #: the layer input (its shape for the transposed evaluation)
    ratio: torch.Tensor  #: z / stab(z)


class SameLayerPlan(Plan):
    """One term equal to the layer (LRP-ε): ``z / stab(z) = |z| / (|z| + ε)``, one layer evaluation."""

    def __init__(self, op: LayerOp, epsilon: float) -> None:
        self.op, self.epsilon = op, epsilon
        self.w, self.b = op.weight.detach(), _bias(op)

    def forward(self, a: torch.Tensor, ctx: CallContext) -> tuple[torch.Tensor, SameLayerState]:
        z = self.op.forward(a, self.w, self.b)
        t = z.abs()
        return z, SameLayerState(a, t.div_(t + self.epsilon))

    def backward(self, state: SameLayerState, g: torch.Tensor) -> torch.Tensor:
        return self.op.input_grad(g * state.ratio, self.w, state.a)


class GeneralState(NamedTuple):
    a: torch.Tensor  #: the layer input
    positive: torch.Tensor | None  #: ``a > 0`` where parts read signed inputs
    ratios: tuple[torch.Tensor, ...]  #: per term: ``c_t z / stab(z_t)`` on its served outputs, 0 elsewhere


class GeneralPlan(Plan):
    """Every term evaluated from its parts; exact for any input sign and any modifier."""

    def __init__(self, decl: Declaration, op: LayerOp, terms: list[Term]) -> None:
        self.op, self.terms, self.epsilon = op, terms, decl.stabilizer
        self.w, self.b = op.weight.detach(), _bias(op)
        w, b = _params(decl, op)
        self.parts = [[(p.inputs, _modified(p.weight, w, op, "weight"), _modified(p.bias, b, op, "bias"))
                       for p in t.parts] for t in terms]
        self.signed = any(src != "all" for parts in self.parts for src, _, _ in parts)

    def forward(self, a: torch.Tensor, ctx: CallContext) -> tuple[torch.Tensor, GeneralState]:
        op, eps = self.op, self.epsilon
        z = op.forward(a, self.w, self.b)
        src = {"all": a}
        if self.signed:
            src["positive"], src["negative"] = a.clamp(min=0), a.clamp(max=0)
        ratios = []
        for t, parts in zip(self.terms, self.parts, strict=True):
            zt = None
            for inputs, w, b in parts:
                y = op.forward(src[inputs], w, b)
                zt = y if zt is None else zt + y
            num = z if t.coefficient == 1 else t.coefficient * z
            k = safe_ratio(num, zt) if eps == 0 else num / stabilize(zt, eps)
            if t.outputs != "all":
                k = torch.where(z > 0 if t.outputs == "positive" else z < 0, k, torch.zeros_like(z))
            ratios.append(k)
        return z, GeneralState(a, a > 0 if self.signed else None, tuple(ratios))

    def backward(self, state: GeneralState, g: torch.Tensor) -> torch.Tensor:
        op, a = self.op, state.a
        sums: dict[str, torch.Tensor | None] = {"all": None, "positive": None, "negative": None}
        for k, parts in zip(state.ratios, self.parts, strict=True):
            h = g * k
            for inputs, w, _ in parts:
                d = op.input_grad(h, w, a)
                sums[inputs] = d if sums[inputs] is None else sums[inputs] + d
        grad = sums["all"]
        if self.signed:
            zero = torch.zeros_like(a)
            pos, neg = sums["positive"], sums["negative"]
            gated = torch.where(state.positive, zero if pos is None else pos, zero if neg is None else neg)
            grad = gated if grad is None else grad + gated
        return torch.zeros_like(a) if grad is None else grad


class FoldedState(NamedTuple):
    a: torch.Tensor  #: the layer input
    ratios: tuple[torch.Tensor, ...] | torch.Tensor  #: ``z / stab(z_t)`` per term, or stacked along ``dim`` (cat)
    dim: int  #: the output-unit dimension of the stacked ratios (cat), else -1


class FoldedPlan(Plan):
    """Non-negative inputs, every term's stabilizer sign known: stabilizers folded into the biases, the terms of a
    ``groups == 1`` layer as one wider layer, the true output from the terms' sum when their weights add up to it."""

    def __init__(self, decl: Declaration, op: LayerOp, terms: list[Term], dirs: list[tuple[int, bool]]) -> None:
        self.op, self.eps, self.n = op, decl.stabilizer, len(terms)
        self.w, self.b = op.weight.detach(), _bias(op)
        w, b = _params(decl, op)
        parts = [t.parts[0] for t in terms]
        self.ws = [_modified(p.weight, w, op, "weight") for p in parts]
        zeros = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        bs = [_modified(p.bias, b, op, "bias") for p in parts]
        self.bs = [zeros if x is None else x for x in bs]
        self.dirs = [d for d, _ in dirs]
        self.clamp = [c for _, c in dirs]
        # ratio clamp at 0 selects the served outputs (z / z_t >= 0 exactly there), unless a following ReLU gates them
        self.select = [t.outputs != "all" and not (op.relu_follows and t.outputs == "positive") for t in terms]
        self.wbwd = [wt if t.coefficient == 1 else t.coefficient * wt for t, wt in zip(terms, self.ws, strict=True)]
        s, add_bias = _sum_factor(terms, op, decl) if self.n > 1 else (None, False)
        self.s, self.brest = s, (_bias(op) if add_bias else None)
        self.cat = self.n > 1 and op.groups == 1
        if self.cat:
            self.wcat, self.wcat_bwd = op.cat_out(self.ws), op.cat_out(self.wbwd)
            self.bcat = op.cat_out([bt + d * self.eps for bt, d in zip(self.bs, self.dirs, strict=True)])
            bounds = list(zip(self.dirs, self.clamp, strict=True))
            self.lo = torch.tensor([self.eps if c and d > 0 else -torch.inf for d, c in bounds], dtype=w.dtype,
                                   device=w.device)
            self.hi = torch.tensor([-self.eps if c and d < 0 else torch.inf for d, c in bounds], dtype=w.dtype,
                                   device=w.device)
        elif self.n == 1:
            self.b_stab = self.bs[0] + self.dirs[0] * self.eps

    def _true_or_sum(self, a: torch.Tensor, total: torch.Tensor | None) -> torch.Tensor:
        """The true output: from the terms' sum when they add up to it, else one more evaluation."""
        if self.s is None or total is None:
            return self.op.forward(a, self.w, self.b)
        z = total if self.s == 1 else total.div_(self.s)
        return z if self.brest is None else z + self.op.bias_view(self.brest, z.ndim)

    def forward(self, a: torch.Tensor, ctx: CallContext) -> tuple[torch.Tensor, FoldedState]:
        op = self.op
        if self.cat:  # one wider layer: stabilized channels [z_1 ± ε; z_2 ± ε; ...], viewed as (..., T, C, ...)
            zz = op.forward(a, self.wcat, self.bcat)
            dim = op.channel_dim % zz.ndim
            zz = zz.unflatten(dim, (self.n, zz.shape[dim] // self.n))
            z = self._true_or_sum(a, zz.sum(dim) if self.s is not None else None)  # the stabilizers cancel
            if any(self.clamp):
                trail = [1] * (zz.ndim - dim - 1)
                zz.clamp_(min=self.lo.view(self.n, *trail), max=self.hi.view(self.n, *trail))
            kk = torch.div(z.unsqueeze(dim), zz, out=zz)
            if all(self.select):
                kk.clamp_(min=0)
            else:
                for i in (i for i, s in enumerate(self.select) if s):
                    kk.narrow(dim, i, 1).clamp_(min=0)
            return z, FoldedState(a, kk, dim)
        if self.n == 1:
            z = op.forward(a, self.w, self.b)
            zt = op.forward(a, self.ws[0], self.b_stab)
            zts = [zt]
        else:  # grouped layer: one evaluation per term, stabilized after the true output is taken from their sum
            zts = [op.forward(a, wt, bt) for wt, bt in zip(self.ws, self.bs, strict=True)]
            total = None
            if self.s is not None:
                total = zts[0] + zts[1]
                for zt in zts[2:]:
                    total = total + zt
            z = self._true_or_sum(a, total)
            for zt, d in zip(zts, self.dirs, strict=True):
                zt.add_(self.eps) if d > 0 else zt.sub_(self.eps)
        ratios = []
        for zt, d, c, s in zip(zts, self.dirs, self.clamp, self.select, strict=True):
            if c:
                zt.clamp_(min=self.eps) if d > 0 else zt.clamp_(max=-self.eps)
            k = torch.div(z, zt, out=zt)
            ratios.append(k.clamp_(min=0) if s else k)
        return z, FoldedState(a, tuple(ratios), -1)

    def backward(self, state: FoldedState, g: torch.Tensor) -> torch.Tensor:
        op = self.op
        if self.cat:
            kk, dim = state.ratios, state.dim
            return op.input_grad((kk * g.unsqueeze(dim)).flatten(dim, dim + 1), self.wcat_bwd, state.a)
        grad = None
        for k, wt in zip(state.ratios, self.wbwd, strict=True):
            d = op.input_grad(k * g, wt, state.a)
            grad = d if grad is None else grad + d
        return grad
