"""Naming units: Network Dissection (:mod:`semlens.units.dissect`). The captioner's neuron naming (topics,
prediction-difference maximization) lives in :mod:`semlens.captioning.naming`."""

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
