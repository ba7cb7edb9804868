"""Explaining single predictions: sensitivity analysis, gradient×input and layer-wise relevance propagation.

``attribute(model, x, target, method=...)`` is the one-call entry; :class:`Attributor` keeps a model prepared for
repeated calls; :class:`Composite` and the rule classes build custom rule assignments. See docs/explain.md.
"""

from semlens.explain.attributor import Attributor, attribute, output_weighting
from semlens.explain.canonizers import MergeBatchNorm, fold_batchnorm
from semlens.explain.composites import DEFAULT_METHOD, PRESETS, Composite, list_methods, method_parameters, preset
from semlens.explain.graph_check import InputShapeError, ModelGraph, UnsupportedModelError, probe_model
from semlens.explain.heatmap import heatmap_rgb, save_heatmap
from semlens.explain.rules import (
    KEEP,
    AlphaBeta,
    Declaration,
    DeclaredRule,
    Epsilon,
    ExcitationBackprop,
    Flat,
    Gamma,
    LayerOp,
    Mix,
    ModifiedRule,
    Part,
    Rule,
    Term,
    WSquare,
    ZBox,
    ZPlus,
    stabilize,
)

__all__ = [
    "attribute", "Attributor", "list_methods", "output_weighting", "Composite", "preset", "PRESETS", "DEFAULT_METHOD",
    "method_parameters", "Rule", "DeclaredRule", "Declaration", "Term", "Part", "Mix", "KEEP",
    "ModifiedRule", "Epsilon", "Gamma", "AlphaBeta", "ZPlus", "ExcitationBackprop", "ZBox",
    "Flat", "WSquare", "LayerOp", "stabilize",
    "MergeBatchNorm", "fold_batchnorm", "UnsupportedModelError", "InputShapeError", "ModelGraph", "probe_model",
    "heatmap_rgb", "save_heatmap",
]
