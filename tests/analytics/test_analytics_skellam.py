"""Discrete distributed noise: parties' Skellam shares inside the secure sum add up to the
calibrated Skellam noise, answers stay right, and owners' ledgers are charged by RDP."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from shoal.analytics import NodePolicy, Privacy, parse, query
from shoal.analytics.simulate import federation
from shoal.analytics.stats import blocks_for, skellam_steps
from shoal.analytics.tasks import skellam_layout
from shoal.errors import ConfigError, NotEnoughNodes
from shoal.privacy import PrivacyLedger, skellam_noise, skellam_noise_multiplier

from .conftest import Federated


@pytest.mark.parametrize("parties", [3, 10])
def test_skellam_shares_sum_to_the_calibrated_skellam(parties: int) -> None:
    rng = np.random.default_rng(2026)
    mu, draws = 40.0, 40_000
    total = sum(skellam_noise(rng, mu=mu / parties, size=draws) for _ in range(parties))
    assert total.dtype == np.int64
    # Var of Poisson(mu) - Poisson(mu) is 2 mu; the sample variance's std is ~0.7% here.
    assert total.var() == pytest.approx(2 * mu, rel=0.04)
    assert abs(total.mean()) < 4 * math.sqrt(2 * mu / draws)
    grid = np.arange(-30, 31)
    ecdf = np.searchsorted(np.sort(total), grid, side="right") / draws
    assert np.max(np.abs(ecdf - sps.skellam.cdf(grid, mu, mu))) < 0.015
    # and not a Gaussian of the same variance rounded: its cdf differs by more at mu = 40/k
    one = skellam_noise(rng, mu=mu / parties, size=draws)
    assert one.var() == pytest.approx(2 * mu / parties, rel=0.05)


def test_skellam_accounting_reads_at_most_the_epsilon_it_was_calibrated_for() -> None:
    for eps in (0.3, 1.0, 4.0):
        z = skellam_noise_multiplier(epsilon=eps, delta=1e-6)
        ledger = PrivacyLedger(accountant="pld")  # Skellam entries compose by RDP anyway
        ledger.record(sample_rate=1.0, noise_multiplier=z, mechanism="skellam")
        assert 0.6 * eps < ledger.epsilon(1e-6) <= eps
    with pytest.raises(ConfigError, match="delta"):
        skellam_noise_multiplier(epsilon=1.0, delta=0.0)


def test_summed_noise_of_deployed_parties_matches_its_variance(three: Federated) -> None:
    """Through the whole path (party integers + shares, SecAgg+, rounding back): the count's
    error over repeated queries has the layout's variance, and the error bar says so."""
    config = three.config(privacy_unit="patient_id", max_contributions=1)
    fed = federation(config)
    privacy = Privacy(epsilon=1.0, delta=1e-6, noise="skellam")
    sql = "SELECT COUNT(*) AS n FROM visits"
    plan = parse(sql, config)
    blocks = blocks_for(plan, config, dp=True)
    layout = skellam_layout(blocks, plan, config, n_groups=1, epsilon=1.0, delta=1e-6)
    std = layout.std / float(layout.step[0])  # in counts
    _, d2 = skellam_steps(blocks, config)
    assert std == pytest.approx(
        skellam_noise_multiplier(epsilon=1.0, delta=1e-6) * d2 / 4096, rel=1e-9
    )
    truth = three.duck("SELECT COUNT(DISTINCT patient_id) FROM visits")[0][0]
    errors = []
    for _ in range(60):
        result = query(fed, sql, config=config, privacy=privacy)
        assert result.mode == "distributed" and result.failures == {}
        errors.append(result.rows[0][0] - truth)
        assert result.errors is not None
        assert result.errors[0][0] == pytest.approx(std, rel=0.3)
    diffs = np.array(errors)
    # integers / step: every released count sits on the 1/step grid
    assert np.allclose(np.round(diffs * layout.step[0]), diffs * layout.step[0], atol=1e-6)
    assert np.all(diffs != 0.0)
    # 60 draws: a near-Gaussian's sample variance leaves [0.4, 1.9] x with p < 1e-4
    assert 0.4 * std**2 < diffs.var() < 1.9 * std**2
    assert abs(diffs.mean()) < 4 * std / math.sqrt(len(diffs))


def test_skellam_answers_match_duckdb_at_a_large_epsilon(three: Federated) -> None:
    config = three.config(max_contributions=1)  # each row its own unit: nothing capped
    sql = (
        "SELECT ward, COUNT(*) AS n, AVG(age) AS a, SUM(cost) AS s FROM visits "
        "GROUP BY ward ORDER BY ward"
    )
    result = query(
        federation(config),
        sql,
        config=config,
        privacy=Privacy(epsilon=1e5, delta=1e-6, noise="skellam"),
    )
    want = three.duck(sql)
    assert [r[0] for r in result.rows] == [w[0] for w in want]
    assert result.errors is not None
    for got, err, exp in zip(result.rows, result.errors, want):
        # within 5 error bars, plus each of 3 parties' rounding to integers (1/2 a step,
        # i.e. at most 1/2 row for counts, 1/2 x 20000 / (4096 x sqrt(share)) for sums)
        assert got[1] == pytest.approx(exp[1], abs=5 * err[1] + 1.5)
        assert got[2] == pytest.approx(exp[2], abs=5 * err[2] + 0.05)
        assert got[3] == pytest.approx(exp[3], abs=5 * err[3] + 15)
        assert err[3] < 0.002 * exp[3]  # and the noise is small at this epsilon


def test_owners_ledgers_are_charged_for_skellam_and_enforced(three: Federated) -> None:
    config = three.config()
    policies = {
        "party0": NodePolicy(max_epsilon=1.0, max_delta=1e-5, require_dp=True),
        "party1": NodePolicy(max_epsilon=10.0, max_delta=1e-5),
        "party2": NodePolicy(max_epsilon=10.0, max_delta=1e-5),
    }
    fed = federation(config, policies=policies, min_nodes=3)
    sql = "SELECT COUNT(*) AS n FROM visits"
    privacy = Privacy(epsilon=1.0, delta=1e-6, noise="skellam")
    first = query(fed, sql, config=config, privacy=privacy, min_nodes=3)
    assert first.failures == {}
    with pytest.raises(NotEnoughNodes, match="declined"):
        query(fed, sql, config=config, privacy=privacy, min_nodes=3)


def test_bad_skellam_requests_are_refused(three: Federated) -> None:
    with pytest.raises(ConfigError, match="delta"):
        Privacy(epsilon=1.0, noise="skellam")
    with pytest.raises(ConfigError, match="distributed"):
        Privacy(epsilon=1.0, delta=1e-6, noise="skellam", mode="central")
    with pytest.raises(ConfigError, match="noise"):
        Privacy(epsilon=1.0, noise="gaussian")
    # a hostile coordinator asking key selection for Skellam (which it does not add) or
    # leaving out delta: the party refuses rather than charge one mechanism and add another
    for task, extra, reason in (
        ("shoal.analytics.keys", {"noise": "skellam", "delta": 1e-6}, "Laplace noise only"),
        ("shoal.analytics.stats", {"noise": "skellam"}, "needs delta"),
    ):
        config = three.config(categories={}) if task.endswith("keys") else three.config()
        fed = federation(config)
        with pytest.raises(NotEnoughNodes, match=reason):
            fed.all().map(
                task,
                sql="SELECT ward, COUNT(*) FROM visits GROUP BY ward",
                config=config.to_json(),
                seed=1,
                keys=None,
                privacy={"epsilon": 1.0, "mode": "distributed", "shares": 3, **extra},
                min_nodes=1,
            )
