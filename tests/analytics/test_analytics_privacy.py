"""DP answers: distributed noise shares add up to Laplace, owners' ledgers are charged and
enforced, error bars match the noise, and owners can refuse what they do not allow."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from shoal.analytics import NodePolicy, Privacy, parse, query
from shoal.analytics.simulate import federation
from shoal.analytics.stats import blocks_for, laplace_scales
from shoal.analytics.tasks import _noise_share
from shoal.errors import NotEnoughNodes

from .conftest import Federated


@pytest.mark.parametrize("parties", [1, 3, 10])
def test_noise_shares_sum_to_laplace(parties: int) -> None:
    scale = 2.5
    draws = 20_000
    total = np.zeros(draws)
    for _ in range(parties):
        share = _noise_share(
            np.full(draws, scale), {"mode": "distributed", "shares": parties}, NodePolicy()
        )
        assert share is not None
        total += share
    # Kolmogorov-Smirnov against Laplace(0, scale); p < 1e-4 would be a real mismatch.
    assert sps.kstest(total, "laplace", args=(0.0, scale)).pvalue > 1e-4
    assert sps.kstest(total, "norm", args=(0.0, scale * math.sqrt(2))).pvalue < 1e-4


def test_one_share_alone_is_far_below_the_full_noise() -> None:
    share = _noise_share(np.full(20_000, 1.0), {"mode": "distributed", "shares": 10}, NodePolicy())
    assert share is not None
    # Gamma(1/10) differences: std sqrt(2/10), a tenth of Laplace's variance
    assert 0.35 < share.std() < 0.55


def test_owner_caps_the_shares_it_trusts() -> None:
    share = _noise_share(
        np.full(20_000, 1.0),
        {"mode": "distributed", "shares": 1000},
        NodePolicy(max_noise_shares=1),
    )
    assert share is not None
    assert sps.kstest(share, "laplace", args=(0.0, 1.0)).pvalue > 1e-4


def test_distributed_count_error_matches_its_error_bar(three: Federated) -> None:
    config = three.config(privacy_unit="patient_id", max_contributions=2)
    fed = federation(config)
    truth = three.duck("SELECT COUNT(*) FROM (SELECT patient_id FROM visits)")[0][0]
    plan = parse("SELECT COUNT(*) FROM visits", config)
    (block,) = blocks_for(plan, config, dp=True)
    scale = laplace_scales([block], config, 2.0)[block.name]
    assert scale == 2 / 2.0  # m * sensitivity / epsilon
    errors = []
    for _ in range(12):
        result = query(
            fed, "SELECT COUNT(*) AS n FROM visits", config=config, privacy=Privacy(epsilon=2.0)
        )
        assert result.mode == "distributed" and result.epsilon == 2.0
        errors.append(result.rows[0][0])
        assert result.errors is not None
        assert result.errors[0][0] == pytest.approx(math.sqrt(2) * scale, rel=0.35)
    capped = three.duck(
        "SELECT SUM(LEAST(c, 2)) FROM (SELECT COUNT(*) c FROM visits GROUP BY patient_id)"
    )[0][0]
    assert truth >= capped
    diffs = np.array(errors) - capped
    assert np.all(diffs != 0.0)  # noise is there
    assert abs(diffs.mean()) < 4 * math.sqrt(2) * scale / math.sqrt(len(diffs))
    assert np.abs(diffs).max() < 30 * scale


def test_central_mode_and_error_bars_for_derived_outputs(three: Federated) -> None:
    config = three.config()
    result = query(
        federation(config),
        "SELECT ward, AVG(age) AS a, STDDEV(age) AS s, MEDIAN(stay_days) AS m, "
        "SUM(cost) / COUNT(*) AS r FROM visits GROUP BY ward",
        config=config,
        privacy=Privacy(epsilon=1.0, mode="central"),
    )
    assert result.mode == "central"
    assert [r[0] for r in result.rows] == ["A", "B", "C", "D"]  # every public group
    assert result.errors is not None
    for row, err in zip(result.rows, result.errors):
        # (a noisy variance clipped to its range in every draw has a zero spread; so has an
        # average whose released count came out near zero, about 1 query in 100 here: its
        # draws all clip to the age range's end, where the released value sits too)
        assert err[0] is None and all(e is not None and e >= 0 for e in err[1:])
        assert err[1] > 0 or row[1] in (0.0, 120.0)
        assert 0 <= row[1] <= 120 and 0 <= row[2] <= 60
    cols = result.disclosed["columns"]
    assert "null_rows_ignored" in cols["cost"]
    # Clamping is disclosed under central noise too: a noisy count with its error bar.
    assert isinstance(cols["age"]["values_clamped"], float)
    assert cols["age"]["values_clamped_error"] > 0


def test_nulls_ignored_are_disclosed_noisy_with_their_error(three: Federated) -> None:
    config = three.config(privacy_unit="patient_id", max_contributions=1)
    sql = "SELECT COUNT(cost) AS n, AVG(cost) AS a FROM visits"
    truth = three.duck(
        "SELECT COUNT(*) FROM (SELECT DISTINCT ON (patient_id) cost FROM visits) WHERE cost IS NULL"
    )[0][0]
    misses = []
    for _ in range(8):
        result = query(federation(config), sql, config=config, privacy=Privacy(epsilon=1.0))
        cost = result.disclosed["columns"]["cost"]
        # The NULL count gets 5% of the epsilon: noisier than the answer, and said so.
        error = cost["null_rows_ignored_error"]
        assert error > result.errors[0][0] > 0
        misses.append(abs(cost["null_rows_ignored"] - truth) / error)
    # Truth: the units' NULL rows (one row kept per unit; a unit's rows differ, so the
    # DISTINCT ON pick is only one draw of it: within a few rows of the party's draw).
    assert np.median(misses) < 2.5


def test_clamped_values_are_disclosed_noisy_within_the_query_epsilon(three: Federated) -> None:
    # Every row its own unit, one row each: the truth is the count of ages above the bound.
    config = three.config(bounds={"age": [0, 50]}, privacy_unit=None, max_contributions=1)
    sql = "SELECT ward, AVG(age) AS a FROM visits GROUP BY ward"
    truth = three.duck("SELECT COUNT(*) FROM visits WHERE age > 50")[0][0]
    assert truth > 100
    # The clamped count is one block of the query's statistics: its Laplace scale is the
    # block's share of the query's epsilon, and the shares compose to exactly that epsilon
    # (what each party charges its ledger), so disclosing it spends nothing beyond it.
    blocks = blocks_for(parse(sql, config), config, dp=True)
    assert [b.kind for b in blocks] == ["n", "s1", "nulls", "clamped"]
    lap = laplace_scales(blocks, config, 1.0)
    assert sum(b.sensitivity / lap[b.name] for b in blocks) == pytest.approx(1.0)
    scale = lap["clamped:c0"]
    misses = []
    for _ in range(10):
        result = query(federation(config), sql, config=config, privacy=Privacy(epsilon=1.0))
        age = result.disclosed["columns"]["age"]
        assert age["bounds"] == [0.0, 50.0]
        assert age["values_clamped_error"] == pytest.approx(math.sqrt(2) * scale, rel=0.35)
        assert age["values_clamped"] != truth  # noised, not the exact count
        misses.append(abs(age["values_clamped"] - truth) / age["values_clamped_error"])
    assert np.median(misses) < 2.5
    assert max(misses) < 15


def test_dp_quantiles_are_centred_on_the_truth_with_honest_error_bars(
    three: Federated,
) -> None:
    # stay_days ~ Exponential(6) inside bounds [0, 100], 1,000 bins: most bins are empty.
    # Clipping each noisy bin to >= 0 put the median near 50 with an error bar of ~1.
    config = three.config(privacy_unit="patient_id", max_contributions=1)
    truth = three.duck("SELECT MEDIAN(stay_days) FROM visits")[0][0]
    answers, errors = [], []
    for _ in range(10):
        result = query(
            federation(config),
            "SELECT MEDIAN(stay_days) AS m FROM visits",
            config=config,
            privacy=Privacy(epsilon=1.0),
        )
        answers.append(result.rows[0][0])
        errors.append(result.errors[0][0])
    assert abs(np.median(answers) - truth) < 2.0
    assert np.median(np.abs(np.array(answers) - truth)) < 3 * np.median(errors)


def test_each_owner_charges_its_ledger_and_declines_past_its_budget(three: Federated) -> None:
    config = three.config()
    policies = {
        "party0": NodePolicy(max_epsilon=1.5),
        "party1": NodePolicy(max_epsilon=10.0),
        "party2": NodePolicy(max_epsilon=10.0),
    }
    fed = federation(config, policies=policies, min_nodes=3)
    sql = "SELECT COUNT(*) AS n FROM visits"
    first = query(fed, sql, config=config, privacy=Privacy(epsilon=1.0), min_nodes=3)
    assert first.failures == {}
    with pytest.raises(NotEnoughNodes, match="declined"):
        query(fed, sql, config=config, privacy=Privacy(epsilon=1.0), min_nodes=3)


def test_declining_party_is_reported_when_enough_remain(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from .conftest import make_rows

    rng = np.random.default_rng(3)
    root = tmp_path_factory.mktemp("four")
    fs = Federated(root, [make_rows(rng, 50, 1000 * i) for i in range(4)], ["duckdb"] * 4)
    config = fs.config()
    fed = federation(config, policies={"party3": NodePolicy(max_epsilon=0.5)})
    result = query(
        fed, "SELECT COUNT(*) AS n FROM visits", config=config, privacy=Privacy(epsilon=1.0)
    )
    assert set(result.parties) == {"party0", "party1", "party2"}
    assert "declined" in result.failures["party3"]
    # It declined when asked whether it could answer, before the noise was split: the three
    # others split all of it, and the coordinator added none.
    assert not any("dropped out" in n for n in result.notes)


def test_owner_requiring_dp_declines_exact_and_central(three: Federated) -> None:
    config = three.config()
    fed = federation(config, policy=NodePolicy(require_dp=True))
    with pytest.raises(NotEnoughNodes, match="declined"):
        query(fed, "SELECT COUNT(*) FROM visits", config=config)
    with pytest.raises(NotEnoughNodes, match="declined"):
        query(
            fed,
            "SELECT COUNT(*) FROM visits",
            config=config,
            privacy=Privacy(epsilon=1.0, mode="central"),
        )
    ok = query(fed, "SELECT COUNT(*) FROM visits", config=config, privacy=Privacy(epsilon=1.0))
    assert len(ok.rows) == 1


def test_owner_privacy_unit_overrides_the_request(three: Federated) -> None:
    config = three.config(privacy_unit=None, max_contributions=1)
    fed = federation(config, policy=NodePolicy(privacy_unit="patient_id"))
    result = query(fed, "SELECT COUNT(*) AS n FROM visits", config=config)
    assert result.rows[0][0] == three.duck("SELECT COUNT(DISTINCT patient_id) FROM visits")[0][0]


def test_dp_key_selection_releases_frequent_keys_only(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    from .conftest import write_party

    root = tmp_path_factory.mktemp("keys")
    rng = np.random.default_rng(5)
    parties = []
    words = ["apple"] * 300 + ["kiwi"] * 200 + [f"rare{i}" for i in range(40)]
    from shoal.analytics import AnalyticsConfig, Party

    for p in range(3):
        rows = [
            (i + 10_000 * p, str(w), 1.0, 1.0, 1.0) for i, w in enumerate(rng.permutation(words))
        ]
        path = root / f"p{p}.duckdb"
        write_party(path, rows, None)
        parties.append(Party(name=f"p{p}", path=str(path)))
    config = AnalyticsConfig(
        table="visits",
        privacy_unit="patient_id",
        max_contributions=1,
        parties=tuple(parties),
        max_key_bytes=6,
    )
    result = query(
        federation(config),
        "SELECT ward, COUNT(*) AS n FROM visits GROUP BY ward ORDER BY n DESC",
        config=config,
        privacy=Privacy(epsilon=8.0),
    )
    keys = [r[0] for r in result.rows]
    assert keys[:2] == ["apple", "kiwi"]
    assert not any(k.startswith("rare") for k in keys)
    assert abs(result.rows[0][1] - 900) < 60
    assert any("key selection" in n for n in result.notes)


def test_laplace_charges_compose_in_the_owner_ledger_and_survive_a_round_trip() -> None:
    from shoal.privacy import NodeBudget

    budget = NodeBudget(max_epsilon=4.0, max_delta=1e-6)
    first = budget.charge(sample_rate=1.0, noise_multiplier=1.0, steps=1, mechanism="laplace")
    assert 1.0 <= first.total_epsilon < 1.1  # pure eps = 1, as RDP converts it at delta
    budget.charge(sample_rate=1.0, noise_multiplier=5.0, steps=1)  # a Gaussian task too
    again = NodeBudget.from_dict(budget.to_dict())
    assert again.spent() == pytest.approx(budget.spent())
    assert [e.mechanism for e in again.ledger.entries] == ["laplace", "gaussian"]
    with pytest.raises(Exception, match="laplace request"):
        again.charge(sample_rate=1.0, noise_multiplier=0.3, steps=1, mechanism="laplace")


def test_key_selection_releasing_nothing_answers_no_rows(three: Federated) -> None:
    config = three.config(
        categories={}, privacy_unit="patient_id", max_contributions=50, max_key_bytes=2
    )
    result = query(
        federation(config),
        "SELECT ward, COUNT(*) AS n FROM visits GROUP BY ward",
        config=config,
        privacy=Privacy(epsilon=0.01),
    )
    assert result.rows == () and result.errors == ()
    assert 0 < result.epsilon <= 0.01 * 0.5  # only the key selection's levels were spent


def test_a_party_at_max_rows_still_answers_under_dp(three: Federated) -> None:
    # Its row count is exactly the public bound; the noise share carries it past 1.
    rows = max(
        three.duck(f"SELECT COUNT(*) FROM visits WHERE patient_id < {k}")[0][0]
        for k in (100_000, 200_000)
    )
    config = three.config(max_rows=rows)
    for _ in range(6):
        result = query(
            federation(config),
            "SELECT COUNT(*) AS n FROM visits",
            config=config,
            privacy=Privacy(epsilon=1.0),
        )
        assert result.failures == {} and len(result.parties) == 3


def test_party_statistics_leave_only_into_the_secure_sum(
    three: Federated,
) -> None:
    from shoal.analytics import STATS_TASK, release_policy
    from shoal.analytics.simulate import node_app

    policy = NodePolicy(require_dp=True)
    assert release_policy(policy) == {"stats": "secure"}
    assert str(node_app(policy).policy(STATS_TASK).kind_of("stats")) == "secure"
    config = three.config()
    fed = federation(config, policy=policy)
    payload = {
        "sql": "SELECT COUNT(*) FROM visits",
        "config": config.to_json(),
        "keys": None,
        "privacy": {"epsilon": 1.0, "mode": "distributed", "shares": 3},
    }
    values = fed.all().map(STATS_TASK, **payload)
    # A curious coordinator asking for a party's statistics in the clear gets nothing: each
    # node refuses the fetch, and says why.
    assert values.reveal() == {}
    assert all("refuses" in values.failures[n].detail for n in values.node_ids)
