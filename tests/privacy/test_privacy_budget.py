"""Tests of the data owner's privacy budget: refusal of overspend, atomicity, persistence."""

from __future__ import annotations

import json
import threading

import pytest

from shoal.errors import ConfigError, PrivacyBudgetExceeded, ShoalError
from shoal.privacy import NodeBudget, OwnerLedger, epsilon

REQ = {"sample_rate": 0.01, "noise_multiplier": 1.0, "steps": 100}


def test_charges_within_the_budget_are_recorded() -> None:
    budget = NodeBudget(max_epsilon=3.0, max_delta=1e-5)
    first = budget.charge(**REQ)
    assert first.request_epsilon == pytest.approx(epsilon(**REQ, delta=1e-5))
    assert first.total_epsilon == pytest.approx(first.request_epsilon)
    second = budget.charge(**REQ)
    # Composition: the total is accounted jointly, not as a sum of separate epsilons.
    assert second.total_epsilon == pytest.approx(epsilon(**{**REQ, "steps": 200}, delta=1e-5))
    assert second.total_epsilon < 2 * first.request_epsilon
    assert budget.spent() == pytest.approx(second.total_epsilon)
    assert budget.remaining() == pytest.approx(3.0 - second.total_epsilon)
    assert second.remaining_epsilon == pytest.approx(budget.remaining())


def test_overspend_is_refused_with_spent_requested_and_limit() -> None:
    budget = NodeBudget(max_epsilon=2.0, max_delta=1e-5)
    budget.charge(**REQ)
    spent = budget.spent()
    big = {"sample_rate": 0.05, "noise_multiplier": 0.8, "steps": 1000}
    with pytest.raises(PrivacyBudgetExceeded) as info:
        budget.charge(**big)
    message = str(info.value)
    assert f"spent epsilon={spent:.4g}" in message
    assert f"epsilon={epsilon(**big, delta=1e-5):.4g} on its own" in message
    assert "limit epsilon=2" in message and "delta=1e-05" in message
    # A refused request leaves the ledger untouched.
    assert budget.spent() == spent
    assert budget.ledger.steps == 100
    assert isinstance(info.value, ShoalError) and isinstance(info.value, RuntimeError)


def test_check_does_not_record() -> None:
    budget = NodeBudget(max_epsilon=2.0, max_delta=1e-5)
    charge = budget.check(**REQ)
    assert charge.total_epsilon > 0
    assert budget.spent() == 0.0
    with pytest.raises(PrivacyBudgetExceeded):
        budget.check(sample_rate=0.5, noise_multiplier=0.0, steps=1)  # no noise: infinite


def test_the_budget_is_exhausted_after_enough_requests() -> None:
    budget = NodeBudget(max_epsilon=1.5, max_delta=1e-5)
    accepted = 0
    with pytest.raises(PrivacyBudgetExceeded):
        for _ in range(100):
            budget.charge(**REQ)
            accepted += 1
    assert accepted >= 1
    assert budget.spent() <= 1.5
    assert epsilon(**{**REQ, "steps": 100 * (accepted + 1)}, delta=1e-5) > 1.5


def test_concurrent_charges_cannot_overspend() -> None:
    budget = NodeBudget(max_epsilon=1.2, max_delta=1e-5)
    refused: list[Exception] = []

    def worker() -> None:
        try:
            budget.charge(**REQ)
        except PrivacyBudgetExceeded as exc:
            refused.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    accepted = budget.ledger.steps // 100
    assert accepted + len(refused) == 8
    assert budget.spent() <= 1.2


def test_budget_round_trips_through_json() -> None:
    budget = OwnerLedger(max_epsilon=5.0, max_delta=1e-6, accountant="pld")
    budget.charge(**REQ)
    budget.charge(sample_rate=0.02, noise_multiplier=2.0, steps=10)
    again = NodeBudget.from_dict(json.loads(json.dumps(budget.to_dict())))
    assert again.max_epsilon == 5.0 and again.max_delta == 1e-6
    assert again.ledger.accountant == "pld"
    assert again.ledger.entries == budget.ledger.entries
    assert again.spent() == pytest.approx(budget.spent())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_epsilon": 0.0, "max_delta": 1e-5},
        {"max_epsilon": 1.0, "max_delta": 0.0},
        {"max_epsilon": 1.0, "max_delta": 1e-5, "accountant": "x"},
    ],
)
def test_invalid_budgets_are_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        NodeBudget(**kwargs)  # type: ignore[arg-type]


def test_invalid_requests_and_data_are_rejected() -> None:
    budget = NodeBudget(max_epsilon=1.0, max_delta=1e-5)
    with pytest.raises(ConfigError):
        budget.charge(sample_rate=0.0, noise_multiplier=1.0, steps=1)
    with pytest.raises(ConfigError):
        NodeBudget.from_dict({"format": "nope"})
