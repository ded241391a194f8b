"""Differential privacy: plans, mechanisms, accountants (RDP, PLD), calibration, owner budgets.

DP-SGD for PyTorch models lives in ``shoal.privacy.dpsgd`` (needs the ``torch`` extra), so that
importing this package never imports torch.
"""

from __future__ import annotations

from shoal.privacy.accounting import (
    ACCOUNTANTS,
    PLD_DISCRETIZATION,
    Accountant,
    LedgerEntry,
    PrivacyLedger,
    calibrate,
    dp_sgd_event,
    epsilon,
    skellam_noise_multiplier,
)
from shoal.privacy.budget import BudgetCharge, NodeBudget, OwnerLedger
from shoal.privacy.mechanisms import (
    RngLike,
    adaptive_update_noise_multiplier,
    distributed_noise_std,
    make_rng,
    next_clip_norm,
    skellam_noise,
)
from shoal.privacy.plans import (
    EvaluationPlan,
    ExampleDP,
    NodeDP,
    NoPrivacy,
    PrivacyPlan,
    RoundPlan,
)

__all__ = [
    "ACCOUNTANTS",
    "PLD_DISCRETIZATION",
    "Accountant",
    "BudgetCharge",
    "EvaluationPlan",
    "ExampleDP",
    "LedgerEntry",
    "NoPrivacy",
    "NodeBudget",
    "NodeDP",
    "OwnerLedger",
    "PrivacyLedger",
    "PrivacyPlan",
    "RngLike",
    "RoundPlan",
    "adaptive_update_noise_multiplier",
    "calibrate",
    "distributed_noise_std",
    "dp_sgd_event",
    "epsilon",
    "make_rng",
    "next_clip_norm",
    "skellam_noise",
    "skellam_noise_multiplier",
]
