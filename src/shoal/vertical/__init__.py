"""Vertical (feature-partitioned) learning: PSI record alignment, hetero logistic and
linear regression with Paillier (with an arbiter or two-party), private prediction.

See docs/vertical.md for the protocols and what each party learns.
"""

from __future__ import annotations

from shoal.vertical.checkpoint import Checkpoints, FileCheckpoints, MemoryCheckpoints
from shoal.vertical.model import MODELS, LinearModelSpec, train_centralized
from shoal.vertical.party import PartyData
from shoal.vertical.prediction import PredictionClient, ServedModel, serving_tasks
from shoal.vertical.protocol import HeteroConfig, HeteroResult, align, evaluate, train
from shoal.vertical.tasks import vertical_tasks

__all__ = [
    "MODELS",
    "Checkpoints",
    "FileCheckpoints",
    "HeteroConfig",
    "HeteroResult",
    "LinearModelSpec",
    "MemoryCheckpoints",
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
