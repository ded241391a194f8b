"""Vertical (feature-partitioned) learning: PSI record alignment, hetero logistic and
linear regression with Paillier (with an arbiter or two-party), private prediction.

See docs/vertical.md for the protocols and what each party learns.
"""

from __future__ import annotations

from shoal.vertical.model import MODELS, LinearModelSpec, train_centralized
from shoal.vertical.party import PartyData
from shoal.vertical.prediction import PredictionClient, ServedModel, serving_tasks
from shoal.vertical.protocol import HeteroConfig, HeteroResult, align, evaluate, train
from shoal.vertical.tasks import vertical_tasks

__all__ = [
    "MODELS",
    "HeteroConfig",
    "HeteroResult",
    "LinearModelSpec",
    "PartyData",
    "PredictionClient",
    "ServedModel",
    "align",
    "evaluate",
    "serving_tasks",
    "train",
    "train_centralized",
    "vertical_tasks",
]
