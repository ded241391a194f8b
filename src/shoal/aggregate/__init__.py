"""Composable aggregators: ``Clip(1.0) | Sum() | Mean()``, robust means, and their math."""

from __future__ import annotations

from shoal.aggregate import rules
from shoal.aggregate.compress import (  # after stages: it builds on them
    Compressor,
    Quantize,
    RandomRotation,
    RandomSubset,
    TopK,
    compresses,
)
from shoal.aggregate.stages import (
    Chain,
    Clip,
    GeometricMedian,
    Krum,
    Mean,
    Median,
    MultiKrum,
    NodeTransform,
    NormBound,
    Reduced,
    Reducer,
    ServerTransform,
    Stage,
    Sum,
    TrimmedMean,
    WeightedMean,
    accepts_weights,
    held_layout,
    is_private,
)

__all__ = [
    "Chain",
    "Clip",
    "Compressor",
    "GeometricMedian",
    "Krum",
    "Mean",
    "Median",
    "MultiKrum",
    "NodeTransform",
    "NormBound",
    "Quantize",
    "RandomRotation",
    "RandomSubset",
    "Reduced",
    "Reducer",
    "ServerTransform",
    "Stage",
    "Sum",
    "TopK",
    "TrimmedMean",
    "WeightedMean",
    "accepts_weights",
    "compresses",
    "held_layout",
    "is_private",
    "rules",
]
