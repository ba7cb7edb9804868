"""Composites: which LRP rule each layer gets, and the named methods of :func:`semlens.explain.attribute`.

A :class:`Composite` is a pure mapping ``(name, module) -> Rule | None``, resolved in this order:

1. ``name_map`` — user assignment by dotted layer name;
2. ``first_map`` — by type, for the layers that read the model input (found from the data flow of a probe forward;
   Zennit uses the first such module in registration order, which coincides for sequential models);
3. ``layer_map`` — by type (first matching entry wins).

Linear/conv layers that no entry matches get LRP-0 (plain gradient). Parameter-free layers never need a rule: ReLU
and LeakyReLU pass relevance unchanged (Zennit's ``Pass``), sum/average pooling and residual additions split it by
contribution (Zennit's ``Norm``, without its 1e-6 stabilizer), max-pooling sends it to the winner (Zennit's default,
plain gradient), dropout and flatten are identities, BatchNorm is folded by the canonizer.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from semlens.explain.rules import AlphaBeta, Epsilon, ExcitationBackprop, Flat, Gamma, Rule, ZBox, ZPlus

__all__ = ["Composite", "PRESETS", "GRADIENT_METHODS", "DEFAULT_METHOD", "list_methods", "preset", "method_parameters",
           "check_parameters"]

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
DENSE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear,)
LINEAR_TYPES = CONV_TYPES + DENSE_TYPES

TypeMap = Sequence[tuple[type[nn.Module] | tuple[type[nn.Module], ...], Rule]]


@dataclass
class Composite:
    """Assign rules to layers by name, by position (layers reading the input) and by type.

    Example::

        Composite(layer_map=[(nn.Conv2d, Gamma(0.25)), (nn.Linear, Epsilon(0.1))],
                  first_map=[(nn.Conv2d, ZBox(0.0, 1.0))], name_map={"classifier.2": Epsilon(0)})
    """

    layer_map: TypeMap = field(default_factory=list)
    first_map: TypeMap = field(default_factory=list)
    name_map: Mapping[str, Rule] = field(default_factory=dict)
    name: str = "custom"

    def rule_for(self, name: str, module: nn.Module, first_layers: Sequence[str]) -> Rule | None:
        if name in self.name_map:
            return self.name_map[name]
        if name in first_layers:
            for types, rule in self.first_map:
                if isinstance(module, types):
                    return rule
        for types, rule in self.layer_map:
            if isinstance(module, types):
                return rule
        return None

    def assign(self, model: nn.Module, first_layers: Sequence[str]) -> dict[str, Rule]:
        """``{dotted name: rule}`` for every Linear/Conv layer whose rule is not the plain gradient."""
        modules = dict(model.named_modules())
        unknown = [n for n in self.name_map if n not in modules]
        if unknown:
            from semlens.layers import get_module

            get_module(model, unknown[0])  # raises UnknownLayerError with suggestions
        wrong = [f"{n} ({type(modules[n]).__name__})" for n in self.name_map
                 if not isinstance(modules[n], LINEAR_TYPES)]
        if wrong:
            raise ValueError(f"rules can only be assigned to Linear/Conv layers, not to: {', '.join(wrong)}")
        out = {}
        for name, module in modules.items():
            if not isinstance(module, LINEAR_TYPES):
                continue
            rule = self.rule_for(name, module, first_layers)
            if rule is not None and not rule.is_plain_gradient:
                out[name] = rule
        return out

    def with_rules(self, name_map: Mapping[str, Rule]) -> Composite:
        """A copy with extra per-name assignments (they take precedence)."""
        return Composite(self.layer_map, self.first_map, {**self.name_map, **name_map}, self.name)


ZeroParams = str | Sequence[str] | None


def _epsilon_plus(epsilon: float = 1e-6, zero_params: ZeroParams = None) -> Composite:
    return Composite([(CONV_TYPES, ZPlus(zero_params)), (DENSE_TYPES, Epsilon(epsilon, zero_params))],
                     name="epsilon-plus")


def _epsilon_plus_flat(epsilon: float = 1e-6, zero_params: ZeroParams = None) -> Composite:
    c = _epsilon_plus(epsilon, zero_params)
    return Composite(c.layer_map, [(LINEAR_TYPES, Flat(zero_params))], name="epsilon-plus-flat")


def _epsilon_alpha2_beta1(epsilon: float = 1e-6, zero_params: ZeroParams = None) -> Composite:
    return Composite([(CONV_TYPES, AlphaBeta(2.0, 1.0, zero_params)), (DENSE_TYPES, Epsilon(epsilon, zero_params))],
                     name="epsilon-alpha2-beta1")


def _epsilon_alpha2_beta1_flat(epsilon: float = 1e-6, zero_params: ZeroParams = None) -> Composite:
    c = _epsilon_alpha2_beta1(epsilon, zero_params)
    return Composite(c.layer_map, [(LINEAR_TYPES, Flat(zero_params))], name="epsilon-alpha2-beta1-flat")


def _epsilon_gamma_box(epsilon: float = 1e-6, gamma: float = 0.25, low: Any = None, high: Any = None,
                       zero_params: ZeroParams = None) -> Composite:
    return Composite([(CONV_TYPES, Gamma(gamma, zero_params)), (DENSE_TYPES, Epsilon(epsilon, zero_params))],
                     [(CONV_TYPES, ZBox(low, high, zero_params))], name="epsilon-gamma-box")


def _lrp_0() -> Composite:
    return Composite([(LINEAR_TYPES, Epsilon(0.0))], name="lrp-0")


def _lrp_epsilon(epsilon: float = 1e-6, zero_params: ZeroParams = None) -> Composite:
    return Composite([(LINEAR_TYPES, Epsilon(epsilon, zero_params))], name="lrp-epsilon")


def _lrp_gamma(gamma: float = 0.25, zero_params: ZeroParams = None) -> Composite:
    return Composite([(LINEAR_TYPES, Gamma(gamma, zero_params))], name="lrp-gamma")


def _lrp_zplus(zero_params: ZeroParams = None) -> Composite:
    return Composite([(LINEAR_TYPES, ZPlus(zero_params))], name="lrp-zplus")


def _lrp_alpha1_beta0() -> Composite:
    return Composite([(LINEAR_TYPES, AlphaBeta(1.0, 0.0))], name="lrp-alpha1-beta0")


def _lrp_alpha2_beta1() -> Composite:
    return Composite([(LINEAR_TYPES, AlphaBeta(2.0, 1.0))], name="lrp-alpha2-beta1")


def _excitation_backprop() -> Composite:
    return Composite([(LINEAR_TYPES, ExcitationBackprop())], name="excitation-backprop")


#: method name -> (factory(**params) -> Composite, one-line description); a factory's keyword parameters are the
#: method's parameters (an unknown keyword is an error, see :func:`preset`)
PRESETS: dict[str, tuple[Callable[..., Composite], str]] = {
    "epsilon-plus-flat": (_epsilon_plus_flat, "flat on the layer(s) reading the input, z+ on convs, epsilon (1e-6) "
                                              "on dense layers (Zennit EpsilonPlusFlat)"),
    "epsilon-plus": (_epsilon_plus, "z+ on convs, epsilon (1e-6) on dense layers (Zennit EpsilonPlus)"),
    "epsilon-gamma-box": (_epsilon_gamma_box, "z^B on the conv reading the input, gamma (0.25) on other convs, "
                                              "epsilon (1e-6) on dense layers (Zennit EpsilonGammaBox)"),
    "epsilon-alpha2-beta1": (_epsilon_alpha2_beta1, "alpha2-beta1 on convs, epsilon (1e-6) on dense layers "
                                                    "(Zennit EpsilonAlpha2Beta1)"),
    "epsilon-alpha2-beta1-flat": (_epsilon_alpha2_beta1_flat, "flat on the layer(s) reading the input, alpha2-beta1 "
                                                              "on convs, epsilon on dense (Zennit "
                                                              "EpsilonAlpha2Beta1Flat)"),
    "lrp-0": (_lrp_0, "LRP-0 on every layer (= gradient x input on ReLU nets)"),
    "lrp-epsilon": (_lrp_epsilon, "LRP-epsilon (default 1e-6; pass epsilon=...) on every linear/conv layer"),
    "lrp-gamma": (_lrp_gamma, "LRP-gamma (default 0.25) on every linear/conv layer"),
    "lrp-zplus": (_lrp_zplus, "LRP-z+ (alpha1-beta0) on every layer"),
    "lrp-alpha1-beta0": (_lrp_alpha1_beta0, "LRP-alpha1-beta0 on every linear/conv layer"),
    "lrp-alpha2-beta1": (_lrp_alpha2_beta1, "LRP-alpha2-beta1 on every linear/conv layer"),
    "excitation-backprop": (_excitation_backprop,
                            "Excitation Backprop (z+ without bias, Zhang et al. 2016) on every linear/conv layer"),
}

#: the method used when none is named (``attribute``, ``Attributor``, ``semlens explain``)
DEFAULT_METHOD = "epsilon-plus-flat"

GRADIENT_METHODS: dict[str, str] = {
    "gradient": "d output / d input (sensitivity with sign)",
    "sensitivity": "squared gradient (d output / d input)^2, Montavon et al. sensitivity analysis",
    "gradient-x-input": "input * gradient (= LRP-0 on bias-free ReLU nets)",
}


def list_methods() -> dict[str, str]:
    """All method names accepted by :func:`semlens.explain.attribute`, with a one-line description."""
    return {**GRADIENT_METHODS, **{k: v[1] for k, v in PRESETS.items()}}


def method_parameters(name: str) -> list[str]:
    """The keyword parameters a method accepts (none for the gradient methods)."""
    if name in GRADIENT_METHODS:
        return []
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(list_methods())}")
    return list(inspect.signature(PRESETS[name][0]).parameters)


def check_parameters(name: str, params: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming every keyword of ``params`` that method ``name`` does not take (and the valid
    ones)."""
    valid = method_parameters(name)
    unknown = [k for k in params if k not in valid]
    if unknown:
        raise ValueError(f"method {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(valid) or 'none'}")


def preset(name: str, **params: Any) -> Composite:
    """The composite of a named LRP method; ``params`` override its defaults (``None`` = the default). The valid
    parameters are the factory's keywords (:func:`method_parameters`); any other keyword raises ``ValueError``."""
    if name not in PRESETS:
        raise ValueError(f"unknown LRP method {name!r}; available: {', '.join(list_methods())}")
    check_parameters(name, params)
    low, high = params.get("low"), params.get("high")
    for key, val in (("low", low), ("high", high)):
        if isinstance(val, torch.Tensor) and not torch.isfinite(val).all():
            raise ValueError(f"{key} bound contains NaN/Inf")
    return PRESETS[name][0](**{k: v for k, v in params.items() if v is not None})
