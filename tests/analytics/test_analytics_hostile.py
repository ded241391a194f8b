"""A hostile coordinator against deployed `shoal node --db --require-dp` parties.

The owner of each party requires differential privacy with noise the party adds itself.
Under distributed DP each party adds only its share of the noise, sized by how many parties
share it. A modified coordinator that claims a million parties would make each share
negligible and read a near-exact sum of three; the parties check their share against the
SecAgg+ group they validated themselves, and refuse.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.aggregate import Chain
from shoal.analytics import STATS_TASK
from shoal.analytics.tasks import secure_range
from shoal.core import Federation
from shoal.crypto import SecureSum
from shoal.errors import ProtocolError
from shoal.runtime import NodeStateFile, Store
from shoal.runtime.grpc import GrpcEngine, public_key_bytes, write_key_pair

from .conftest import Federated, make_rows

pytestmark = pytest.mark.integration

EPSILON = 0.1  # Laplace scale 1 / 0.1 = 10 rows on a count: an exact count is no DP answer


@pytest.fixture
def parties(tmp_path: Path) -> Iterator[tuple[Federated, Federation, list[subprocess.Popen[Any]]]]:
    rng = np.random.default_rng(3)
    fs = Federated(
        tmp_path, [make_rows(rng, n, 1000 * i) for i, n in enumerate((40, 50, 60))], ["sqlite"] * 3
    )
    store = Store(tmp_path / "fl.db")
    for p in fs.parties:
        _, _, key = write_key_pair(tmp_path / f"{p.name}.key")
        store.add_node(node_id=p.name, public_key=public_key_bytes(key))
    engine = GrpcEngine(registry=store, listen="127.0.0.1:0", insecure=True).start()
    env = {**os.environ, "GRPC_VERBOSITY": "ERROR"}
    procs = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "shoal.cli.main", "node", "--db", p.path),
                *("--coordinator", f"127.0.0.1:{engine.port}", "--insecure", "--require-dp"),
                *("--key", str(tmp_path / f"{p.name}.key"), "--max-idle", "120"),
                *("--state", str(tmp_path / f"{p.name}-state.db")),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=env,
        )
        for p in fs.parties
    ]
    try:
        assert engine.wait_for_nodes(3, timeout_s=120) == 3
        yield fs, Federation(engine, min_nodes=1, deadline_s=60), procs
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(timeout=10)
        engine.close()
        store.close()


def _noised_count(fs: Federated, fed: Federation, shares: int) -> float:
    config = fs.config(max_contributions=1)
    payload = {
        "sql": "SELECT COUNT(*) FROM visits",
        "config": config.to_json(),
        "keys": None,
        "privacy": {"epsilon": EPSILON, "mode": "distributed", "shares": shares},
    }
    values = fed.all().map(STATS_TASK, **payload)
    assert len(values.node_ids) == 3, values.failures
    scale = np.full(1, 1.0 / EPSILON / config.max_rows)
    secure = SecureSum(value_range=secure_range(scale), bits=64, dropout_fraction=0.0)
    reduced = Chain.of(secure).reduce(values["stats"])
    return float(reduced.vector[0]) * config.max_rows


def test_a_claimed_group_larger_than_the_secure_sum_is_refused(parties: Any) -> None:
    fs, fed, procs = parties
    truth = fs.duck("SELECT COUNT(*) FROM visits")[0][0]
    # Hostile: a million parties share the noise, so each adds a millionth of its variance;
    # three of them sum it and would read the exact count, which the owners charged as DP.
    with pytest.raises(ProtocolError):
        _noised_count(fs, fed, shares=1_000_000)
    # Honest: the three parties that really take part, with noise.
    answers = [_noised_count(fs, fed, shares=3) for _ in range(3)]
    assert all(abs(a - truth) < 400 for a in answers)
    assert any(abs(a - truth) > 0.01 for a in answers)
    assert all(proc.poll() is None for proc in procs)  # every party still serves
    for p in fs.parties:  # and each recorded the refusal in its own audit log
        with NodeStateFile(Path(p.path).with_name(f"{p.name}-state.db"), owner=None) as file:
            assert file.verify().ok
            refused = [e.detail for e in file.read("") if e.action == "refused"]
        assert any("participant(s) this node sees" in d["reason"] for d in refused), refused


def test_the_clamped_count_leaves_a_party_only_noised_inside_the_secure_sum(
    parties: Any,
) -> None:
    """How many of a party's values lie outside the declared bounds is disclosed under DP
    as a noisy count (a block of the query's statistics, charged with it). A coordinator
    that wants one party's exact count gets nothing: the statistics cannot be fetched in
    the clear, and exact or coordinator-noised requests are declined."""
    from shoal.analytics import Privacy, query

    fs, fed, procs = parties
    config = fs.config(bounds={"age": [0, 30]}, max_contributions=1)
    sql = "SELECT AVG(age) AS a FROM visits"
    base = {"sql": sql, "config": config.to_json(), "keys": None}
    distributed = {"epsilon": EPSILON, "mode": "distributed", "shares": 3}
    values = fed.all().map(STATS_TASK, **base, privacy=distributed)
    assert len(values.node_ids) == 3, values.failures
    assert values.reveal() == {}  # each party's vector (its clamped count in it): refused
    assert all("refuses" in values.failures[n].detail for n in values.node_ids)
    for privacy in (None, {**distributed, "mode": "central"}):
        asked = fed.all().map(STATS_TASK, min_nodes=0, **base, privacy=privacy)
        assert not asked.node_ids and len(asked.failures) == 3
        assert all(f.kind.value == "declined" for f in asked.failures.values())
    # The honest way: the three parties' noised counts summed by SecAgg+.
    truth = fs.duck("SELECT COUNT(*) FROM visits WHERE age > 30")[0][0]
    result = query(fed, sql, config=config, privacy=Privacy(epsilon=1.0))
    age = result.disclosed["columns"]["age"]
    assert result.failures == {} and len(result.parties) == 3
    assert age["values_clamped"] != truth
    assert abs(age["values_clamped"] - truth) < 20 * age["values_clamped_error"]
    assert all(proc.poll() is None for proc in procs)  # every party still serves
    for p in fs.parties:  # and each recorded the refused fetch in its own audit log
        with NodeStateFile(Path(p.path).with_name(f"{p.name}-state.db"), owner=None) as file:
            assert file.verify().ok
            refused = [e.detail for e in file.read("") if e.action == "refused"]
        assert any(
            d["task"] == "shoal.fetch" and "refuses to send ['stats'] in the clear" in d["reason"]
            for d in refused
        ), refused
