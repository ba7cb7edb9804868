"""Rules as data: the declaration of an LRP rule for a linear/conv layer.

A rule is a tuple of :class:`Term` s plus a stabilizer. With ``a`` the layer input, ``z`` its true output and
``g = R(z) / z`` the relevance per unit of output, each term ``t`` has a modified output

    ``z_t = Σ_parts layer(a_part; w_part, b_part)``   (``a_part`` = ``a``, ``a⁺`` or ``a⁻``; modified weights/bias)

and passes ``c_t · a_i ∂z_t/∂a_i · R_j / stab(z_t)`` from output ``j`` to input ``i``, for the outputs it serves
(all, ``z > 0`` or ``z < 0``); a rule's relevance is the sum over its terms. Examples (:mod:`semlens.explain.rules`):

* LRP-ε: one term, one part, weights and bias unchanged.
* LRP-αβ: ``α · (a⁺w⁺ + b⁺ + a⁻w⁻)`` and ``−β · (a⁺w⁻ + b⁻ + a⁻w⁺)``, both for all outputs.
* LRP-γ (generalised): ``a⁺(w + γw⁺) + b + γb⁺ + a⁻(w + γw⁻)`` for ``z > 0``, the opposite choice for ``z < 0``.

A parameter modifier is either a :class:`Mix` — ``p ↦ same·p + plus·p⁺ + minus·p⁻``, which the compiler can reason
about (sign of ``z_t``, whether the terms add up to the true output) — or any function of the parameter tensor
(evaluated once per weight version; the compiler then uses the general path). How a declaration is executed is
decided by :func:`semlens.explain.plans.compile_rule`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Union

import torch

__all__ = ["Sign", "Mix", "Modifier", "KEEP", "Part", "Term", "Declaration", "modify"]

#: which inputs a part reads (``a``, ``a⁺ = max(a, 0)``, ``a⁻ = min(a, 0)``) or which outputs a term serves
Sign = Literal["all", "positive", "negative"]


@dataclass(frozen=True)
class Mix:
    """The parameter modifier ``p ↦ same·p + plus·p⁺ + minus·p⁻`` (``p⁺ = max(p, 0)``, ``p⁻ = min(p, 0)``).

    ``Mix()`` keeps the parameter, ``Mix(0, 1)`` is ``w⁺``, ``Mix(0, 0, 1)`` is ``w⁻``, ``Mix(1, γ)`` is ``w + γw⁺``.
    """

    same: float = 1.0
    plus: float = 0.0
    minus: float = 0.0

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        out = None
        if self.same:
            out = p if self.same == 1 else self.same * p
        for coef, clamp in ((self.plus, {"min": 0}), (self.minus, {"max": 0})):
            if coef:
                t = p.clamp(**clamp)
                t = t if coef == 1 else coef * t
                out = t if out is None else out + t
        return torch.zeros_like(p) if out is None else out

    @property
    def sign(self) -> int:
        """+1 / -1 when every modified entry is ``>= 0`` / ``<= 0`` whatever ``p`` is, else 0."""
        if self.same == 0 and self.plus >= 0 and self.minus <= 0:
            return 1
        if self.same == 0 and self.plus <= 0 and self.minus >= 0:
            return -1
        return 0

    def dominates(self, direction: int) -> bool:
        """``direction * (modified - p) >= 0`` for every ``p`` (the part only adds same-signed pieces)."""
        return self.same == 1 and direction * self.plus >= 0 and direction * self.minus <= 0


#: a parameter modifier: data (:class:`Mix`) or any function of the (detached) parameter returning its shape
Modifier = Union[Mix, Callable[[torch.Tensor], torch.Tensor]]
#: the identity modifier
KEEP = Mix()


@dataclass(frozen=True)
class Part:
    """One summand of a term's modified output: ``layer(a_inputs; weight(w), bias(b))``.

    Args:
        inputs: which inputs the part reads: ``"all"`` (``a``), ``"positive"`` (``a⁺``) or ``"negative"`` (``a⁻``).
        weight: modifier of the layer's weight.
        bias: modifier of the layer's bias, or ``None`` for no bias in this part.
    """

    inputs: Sign = "all"
    weight: Modifier = KEEP
    bias: Modifier | None = KEEP

    def __post_init__(self) -> None:
        if self.inputs not in ("all", "positive", "negative"):
            raise ValueError(f"Part.inputs must be 'all', 'positive' or 'negative', got {self.inputs!r}")


@dataclass(frozen=True)
class Term:
    """A modified output ``z_t`` (the sum of its parts), the outputs it serves and its coefficient in the relevance.

    Args:
        parts: the summands of ``z_t``.
        outputs: ``"all"``, or only the outputs with ``z > 0`` (``"positive"``) or ``z < 0`` (``"negative"``).
        coefficient: factor of the term's relevance (``α``, ``−β``; 1 otherwise).
    """

    parts: tuple[Part, ...]
    outputs: Sign = "all"
    coefficient: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "parts", tuple(self.parts))
        if not self.parts:
            raise ValueError("a term needs at least one part")
        if self.outputs not in ("all", "positive", "negative"):
            raise ValueError(f"Term.outputs must be 'all', 'positive' or 'negative', got {self.outputs!r}")


@dataclass(frozen=True)
class Declaration:
    """A whole rule: its terms, the stabilizer ``ε`` of ``stab(d) = d + ε·sign(d)`` and the parameters set to zero
    before the modifiers see them (``zero_params``, ``"weight"`` and/or ``"bias"``)."""

    terms: tuple[Term, ...]
    stabilizer: float = 1e-6
    zero_params: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "terms", tuple(self.terms))
        if not self.terms:
            raise ValueError("a rule needs at least one term")
        if not self.stabilizer >= 0:
            raise ValueError(f"stabilizer must be >= 0, got {self.stabilizer}")

    @property
    def reads_sign(self) -> bool:
        """True when some part reads only the positive or negative inputs (its execution depends on their sign)."""
        return any(p.inputs != "all" for t in self.terms for p in t.parts)


def modify(modifier: Modifier | None, p: torch.Tensor | None) -> torch.Tensor | None:
    """Apply ``modifier`` to ``p`` (``None`` when either is ``None``: no parameter)."""
    if p is None or modifier is None:
        return None
    return modifier(p)


def as_terms(terms: Sequence[Term] | Term) -> tuple[Term, ...]:
    return (terms,) if isinstance(terms, Term) else tuple(terms)
