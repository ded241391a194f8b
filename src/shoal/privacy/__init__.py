"""Differential privacy: mechanisms, accountants (RDP, PLD), noise calibration, owner budgets.

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
)
from shoal.privacy.budget import BudgetCharge, NodeBudget, OwnerLedger
from shoal.privacy.mechanisms import (
    RngLike,
    adaptive_update_noise_multiplier,
    add_gaussian_noise,
    clip_by_l2_norm,
    distributed_noise_std,
    distributed_total_std,
    dp_fedavg_mean,
    dp_fedavg_mean_std,
    dp_fedavg_sum_std,
    gaussian_count,
    gaussian_sigma,
    gaussian_sum,
    l2_norm,
    laplace_count,
    laplace_mechanism,
    laplace_sum,
    make_rng,
    next_clip_norm,
    noised_unclipped_fraction,
)

__all__ = [
    "ACCOUNTANTS",
    "PLD_DISCRETIZATION",
    "Accountant",
    "BudgetCharge",
    "LedgerEntry",
    "NodeBudget",
    "OwnerLedger",
    "PrivacyLedger",
    "RngLike",
    "adaptive_update_noise_multiplier",
    "add_gaussian_noise",
    "calibrate",
    "clip_by_l2_norm",
    "distributed_noise_std",
    "distributed_total_std",
    "dp_fedavg_mean",
    "dp_fedavg_mean_std",
    "dp_fedavg_sum_std",
    "dp_sgd_event",
    "epsilon",
    "gaussian_count",
    "gaussian_sigma",
    "gaussian_sum",
    "l2_norm",
    "laplace_count",
    "laplace_mechanism",
    "laplace_sum",
    "make_rng",
    "next_clip_norm",
    "noised_unclipped_fraction",
]
