"""Simulated malicious nodes: poisoned updates and poisoned data, for robustness studies.

Only simulations use this: an attacked NodeApp runs the honest tasks everywhere except at
the chosen nodes, whose updates (or labels) are corrupted before the server sees them.
"""

from __future__ import annotations

from shoal.attacks.nodes import (
    ATTACKS,
    Attack,
    GaussianNoiseAttack,
    LabelFlip,
    Scaling,
    SignFlip,
    attacked_app,
    build_attack,
    choose_malicious,
)

__all__ = [
    "ATTACKS",
    "Attack",
    "GaussianNoiseAttack",
    "LabelFlip",
    "Scaling",
    "SignFlip",
    "attacked_app",
    "build_attack",
    "choose_malicious",
]
