"""Composable aggregators: ``Clip(1.0) | Sum() | Mean()``, robust means, and their math."""

from __future__ import annotations

from shoal.aggregate import rules
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
    is_private,
)

__all__ = [
    "Chain",
    "Clip",
    "GeometricMedian",
    "Krum",
    "Mean",
    "Median",
    "MultiKrum",
    "NodeTransform",
    "NormBound",
    "Reduced",
    "Reducer",
    "ServerTransform",
    "Stage",
    "Sum",
    "TrimmedMean",
    "WeightedMean",
    "accepts_weights",
    "is_private",
    "rules",
]
