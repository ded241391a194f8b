"""Federated Learning API: algorithms, model adapters, the node tasks, and ``simulate``."""

from __future__ import annotations

from shoal.learn.algorithms import (
    ALGORITHMS,
    Algorithm,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedOpt,
    FedProx,
    FedYogi,
    RoundResult,
    Scaffold,
    ServerState,
)
from shoal.learn.centralized import train_centralized
from shoal.learn.fedbuff import FedBuff, staleness_weight
from shoal.learn.model import FitConfig, FitResult, Model, Weights
from shoal.learn.runner import RoundReport, Trainer, TrainingResult
from shoal.learn.simulate import simulate
from shoal.learn.softmax import SoftmaxRegression
from shoal.learn.tasks import EVALUATE, TRAIN, LocalData, learning_app, learning_tasks
from shoal.privacy.plans import ExampleDP, NodeDP, NoPrivacy, PrivacyPlan

__all__ = [
    "ALGORITHMS",
    "EVALUATE",
    "TRAIN",
    "Algorithm",
    "ExampleDP",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedBuff",
    "FedOpt",
    "FedProx",
    "FedYogi",
    "FitConfig",
    "FitResult",
    "LocalData",
    "Model",
    "NoPrivacy",
    "NodeDP",
    "PrivacyPlan",
    "RoundReport",
    "RoundResult",
    "Scaffold",
    "ServerState",
    "SoftmaxRegression",
    "Trainer",
    "TrainingResult",
    "Weights",
    "learning_app",
    "learning_tasks",
    "simulate",
    "staleness_weight",
    "train_centralized",
]
