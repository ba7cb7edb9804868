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

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from semlens.explain.rules import AlphaBeta, Epsilon, ExcitationBackprop, Flat, Gamma, Rule, ZBox, ZPlus

__all__ = ["Composite", "PRESETS", "GRADIENT_METHODS", "list_methods", "preset"]

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


def _epsilon_plus(epsilon: float = 1e-6, zero_params: Any = None, **_: Any) -> Composite:
    return Composite([(CONV_TYPES, ZPlus(zero_params)), (DENSE_TYPES, Epsilon(epsilon, zero_params))],
                     name="epsilon-plus")


def _epsilon_plus_flat(epsilon: float = 1e-6, zero_params: Any = None, **_: Any) -> Composite:
    c = _epsilon_plus(epsilon, zero_params)
    return Composite(c.layer_map, [(LINEAR_TYPES, Flat(zero_params))], name="epsilon-plus-flat")


def _epsilon_alpha2_beta1(epsilon: float = 1e-6, zero_params: Any = None, **_: Any) -> Composite:
    return Composite([(CONV_TYPES, AlphaBeta(2.0, 1.0, zero_params)), (DENSE_TYPES, Epsilon(epsilon, zero_params))],
                     name="epsilon-alpha2-beta1")


def _epsilon_alpha2_beta1_flat(epsilon: float = 1e-6, zero_params: Any = None, **_: Any) -> Composite:
    c = _epsilon_alpha2_beta1(epsilon, zero_params)
    return Composite(c.layer_map, [(LINEAR_TYPES, Flat(zero_params))], name="epsilon-alpha2-beta1-flat")


def _epsilon_gamma_box(epsilon: float = 1e-6, gamma: float = 0.25, low: Any = None, high: Any = None,
                       zero_params: Any = None, **_: Any) -> Composite:
    return Composite([(CONV_TYPES, Gamma(gamma, zero_params)), (DENSE_TYPES, Epsilon(epsilon, zero_params))],
                     [(CONV_TYPES, ZBox(low, high, zero_params))], name="epsilon-gamma-box")


def _uniform(rule_factory: Callable[..., Rule], name: str) -> Callable[..., Composite]:
    def build(**kw: Any) -> Composite:
        return Composite([(LINEAR_TYPES, rule_factory(**kw))], name=name)

    return build


def _only(keys: Sequence[str], fn: Callable[..., Rule]) -> Callable[..., Rule]:
    def call(**kw: Any) -> Rule:
        return fn(**{k: v for k, v in kw.items() if k in keys and v is not None})

    return call


#: method name -> (factory(**params) -> Composite, one-line description)
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
    "lrp-0": (_uniform(lambda **kw: Epsilon(0.0), "lrp-0"), "LRP-0 on every layer (= gradient x input on ReLU nets)"),
    "lrp-epsilon": (_uniform(_only(("epsilon", "zero_params"), Epsilon), "lrp-epsilon"),
                    "LRP-epsilon (default 1e-6; pass epsilon=...) on every linear/conv layer"),
    "lrp-gamma": (_uniform(_only(("gamma", "zero_params"), Gamma), "lrp-gamma"),
                  "LRP-gamma (default 0.25) on every linear/conv layer"),
    "lrp-zplus": (_uniform(_only(("zero_params",), ZPlus), "lrp-zplus"), "LRP-z+ (alpha1-beta0) on every layer"),
    "lrp-alpha1-beta0": (_uniform(lambda **kw: AlphaBeta(1.0, 0.0), "lrp-alpha1-beta0"),
                         "LRP-alpha1-beta0 on every linear/conv layer"),
    "lrp-alpha2-beta1": (_uniform(lambda **kw: AlphaBeta(2.0, 1.0), "lrp-alpha2-beta1"),
                         "LRP-alpha2-beta1 on every linear/conv layer"),
    "excitation-backprop": (_uniform(lambda **kw: ExcitationBackprop(), "excitation-backprop"),
                            "Excitation Backprop (z+ without bias, Zhang et al. 2016) on every linear/conv layer"),
}

GRADIENT_METHODS: dict[str, str] = {
    "gradient": "d output / d input (sensitivity with sign)",
    "sensitivity": "squared gradient (d output / d input)^2, Montavon et al. sensitivity analysis",
    "gradient-x-input": "input * gradient (= LRP-0 on bias-free ReLU nets)",
}


def list_methods() -> dict[str, str]:
    """All method names accepted by :func:`semlens.explain.attribute`, with a one-line description."""
    return {**GRADIENT_METHODS, **{k: v[1] for k, v in PRESETS.items()}}


def preset(name: str, **params: Any) -> Composite:
    """The composite of a named LRP method; ``params`` (``epsilon``, ``gamma``, ``low``, ``high``, ``zero_params``)
    override the defaults."""
    if name not in PRESETS:
        raise ValueError(f"unknown LRP method {name!r}; available: {', '.join(list_methods())}")
    low, high = params.get("low"), params.get("high")
    for key, val in (("low", low), ("high", high)):
        if isinstance(val, torch.Tensor) and not torch.isfinite(val).all():
            raise ValueError(f"{key} bound contains NaN/Inf")
    return PRESETS[name][0](**params)
