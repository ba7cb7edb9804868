"""Naming units: Network Dissection (:mod:`semlens.units.dissect`), topics and prediction-difference
maximization (:mod:`semlens.units.topics`, :mod:`semlens.units.pdm`)."""

from semlens.units.dissect import (
    DissectionError,
    DissectionResult,
    Dissector,
    LayerDissection,
    TensorSegmentationDataset,
    dissect,
)

__all__ = [
    "DissectionError",
    "DissectionResult",
    "Dissector",
    "LayerDissection",
    "TensorSegmentationDataset",
    "dissect",
]
