"""Privacy budgets that a data owner enforces at their node.

The owner sets a maximum (epsilon, delta); every DP task states what it will spend
(sample_rate, noise_multiplier, steps) and is refused with ``PrivacyBudgetExceeded`` if the
accounted total would pass the maximum. Pure bookkeeping, no I/O; the node persists ``to_dict``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shoal.errors import ConfigError, PrivacyBudgetExceeded
from shoal.privacy.accounting import (
    PLD_DISCRETIZATION,
    Accountant,
    LedgerEntry,
    Mechanism,
    PrivacyLedger,
    _check_accountant,
    _check_delta,
    _check_discretization,
    _check_epsilon,
    _epsilon_of,
)

__all__ = ["BudgetCharge", "NodeBudget", "OwnerLedger"]


@dataclass(frozen=True)
class BudgetCharge:
    """What ``NodeBudget.charge`` or ``check`` found: the request alone and the total after it."""

    request_epsilon: float
    total_epsilon: float
    max_epsilon: float
    delta: float

    @property
    def remaining_epsilon(self) -> float:
        return max(self.max_epsilon - self.total_epsilon, 0.0)


class NodeBudget:
    """A data owner's (max_epsilon, max_delta) budget and the DP work already charged to it.

    ``charge`` is atomic: two tasks racing for the last of the budget cannot both pass.
    Spending is accounted jointly over all charges (composition), at ``max_delta``.
    """

    FORMAT = "shoal.privacy.budget/1"

    def __init__(
        self,
        *,
        max_epsilon: float,
        max_delta: float,
        accountant: Accountant = "rdp",
        pld_discretization: float | None = PLD_DISCRETIZATION,
    ) -> None:
        self._max_epsilon = _check_epsilon(max_epsilon)
        self._max_delta = _check_delta(max_delta)
        self._ledger = PrivacyLedger(
            accountant=_check_accountant(accountant),
            pld_discretization=_check_discretization(pld_discretization),
        )
        self._lock = threading.Lock()

    @property
    def max_epsilon(self) -> float:
        return self._max_epsilon

    @property
    def max_delta(self) -> float:
        return self._max_delta

    @property
    def ledger(self) -> PrivacyLedger:
        return self._ledger

    def spent(self) -> float:
        """Epsilon already spent, at ``max_delta``."""
        return self._ledger.epsilon(self._max_delta)

    def remaining(self) -> float:
        """How much epsilon is left (never negative)."""
        return max(self._max_epsilon - self.spent(), 0.0)

    def _evaluate(self, request: LedgerEntry) -> BudgetCharge:
        acc = self._ledger.accountant
        width = self._ledger.pld_discretization
        past = [e.key for e in self._ledger.entries]
        req = request.key
        total = _epsilon_of([*past, req], self._max_delta, acc, width)
        alone = _epsilon_of([req], self._max_delta, acc, width)
        return BudgetCharge(
            request_epsilon=alone,
            total_epsilon=total,
            max_epsilon=self._max_epsilon,
            delta=self._max_delta,
        )

    def _refuse(self, charge: BudgetCharge, request: LedgerEntry) -> PrivacyBudgetExceeded:
        spent = self.spent()
        total = "infinite" if math.isinf(charge.total_epsilon) else f"{charge.total_epsilon:.4g}"
        return PrivacyBudgetExceeded(
            f"privacy budget exceeded: spent epsilon={spent:.4g}, this {request.mechanism} "
            f"request (sample_rate={request.sample_rate:g}, noise_multiplier="
            f"{request.noise_multiplier:g}, steps={request.steps}) costs epsilon="
            f"{charge.request_epsilon:.4g} on its own and would bring the total to {total}, "
            f"over the owner's limit epsilon={self._max_epsilon:g} at delta={self._max_delta:g}; "
            f"use more noise or fewer steps, or ask the data owner to raise the budget"
        )

    def check(
        self,
        *,
        sample_rate: float,
        noise_multiplier: float,
        steps: int,
        mechanism: Mechanism = "gaussian",
    ) -> BudgetCharge:
        """What charging this request would give, recording nothing.

        Raises ``PrivacyBudgetExceeded`` if it would pass the limit.
        """
        request = LedgerEntry(
            sample_rate=sample_rate,
            noise_multiplier=noise_multiplier,
            steps=steps,
            mechanism=mechanism,
        )
        with self._lock:
            charge = self._evaluate(request)
            if charge.total_epsilon > self._max_epsilon:
                raise self._refuse(charge, request)
            return charge

    def charge(
        self,
        *,
        sample_rate: float,
        noise_multiplier: float,
        steps: int,
        mechanism: Mechanism = "gaussian",
    ) -> BudgetCharge:
        """Check the request against the budget and, if it fits, record it as spent.

        ``mechanism="laplace"``: ``steps`` pure-DP Laplace releases, each at epsilon
        ``1 / noise_multiplier`` (sample_rate 1), composed with everything else charged.
        """
        request = LedgerEntry(
            sample_rate=sample_rate,
            noise_multiplier=noise_multiplier,
            steps=steps,
            mechanism=mechanism,
        )
        with self._lock:
            charge = self._evaluate(request)
            if charge.total_epsilon > self._max_epsilon:
                raise self._refuse(charge, request)
            self._ledger.record(
                sample_rate=request.sample_rate,
                noise_multiplier=request.noise_multiplier,
                steps=request.steps,
                mechanism=request.mechanism,
            )
            return charge

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            ledger = self._ledger.to_dict()
        return {
            "format": self.FORMAT,
            "max_epsilon": self._max_epsilon,
            "max_delta": self._max_delta,
            "ledger": ledger,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NodeBudget:
        if not isinstance(data, Mapping) or data.get("format") != cls.FORMAT:
            raise ConfigError(
                f"not a privacy budget: expected a dict with format {cls.FORMAT!r}, "
                f"got {data!r:.200}"
            )
        ledger = PrivacyLedger.from_dict(data.get("ledger", {}))
        budget = cls(
            max_epsilon=data.get("max_epsilon"),  # type: ignore[arg-type]
            max_delta=data.get("max_delta"),  # type: ignore[arg-type]
            accountant=ledger.accountant,
            pld_discretization=ledger.pld_discretization,
        )
        budget._ledger = ledger
        return budget

    def __repr__(self) -> str:
        return (
            f"NodeBudget(max_epsilon={self._max_epsilon!r}, max_delta={self._max_delta!r}, "
            f"steps={self._ledger.steps})"
        )


# The name the design notes use for the same thing: the data owner's ledger of DP spend.
OwnerLedger = NodeBudget
