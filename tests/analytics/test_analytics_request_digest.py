"""A coordinator that asks the parties different queries before a secure sum.

Every party but the victim is asked a query that selects no row, the victim the real one:
without DP the secure "sum" would be the victim's answer alone. Each party keeps the digest
of the query that produced its value, the round states the one digest every value must
carry, and the parties whose query differs refuse to mask (in process; the deployed nodes run
the same NodeApp, see tests/deploy/test_hostile_coordinator.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from shoal.aggregate import Chain
from shoal.analytics import STATS_TASK
from shoal.analytics.simulate import federation
from shoal.analytics.tasks import join_exact, secure_range
from shoal.core import NodeValues
from shoal.core.federation import _parse_receipt
from shoal.crypto import SecureSum
from shoal.errors import ProtocolError
from shoal.runtime.request import request_digest
from shoal.wire import encode

from .conftest import Federated

ALL = "SELECT COUNT(*) FROM visits"
NONE = "SELECT COUNT(*) FROM visits WHERE age < 0"  # ages are in [0, 100): no row


def _sum(values: NodeValues) -> float:
    secure = SecureSum(value_range=secure_range(None), bits=64, dropout_fraction=0.0)
    reduced = Chain.of(secure).reduce(values["stats"])
    return float(join_exact(np.asarray(reduced.vector))[0])


def test_parties_asked_different_queries_cannot_complete_a_secure_sum(three: Federated) -> None:
    config = three.config()
    fed = federation(config)
    parties = list(fed.node_ids)
    victim = parties[0]

    def payload(sql: str) -> dict[str, Any]:
        return {"sql": sql, "config": config.to_json(), "keys": None, "privacy": None}

    # Hostile: the victim counts its rows, every other party counts none.
    per_node = {p: payload(ALL if p == victim else NONE) for p in parties}
    replies, failures = fed._dispatch(parties, STATS_TASK, per_node=per_node, keep_as="split")
    assert not failures and set(replies) == set(parties)
    held = NodeValues(
        federation=fed,
        handle="split",
        node_ids=parties,
        specs={p: _parse_receipt(r, "split") for p, r in replies.items()},
        failures={},
        request=request_digest(STATS_TASK, encode(payload(ALL))),
    )
    with pytest.raises(ProtocolError):
        _sum(held)
    for party in parties:
        state = fed.engine.node_state(party).get("shoal.node_state")
        entries = state.entries if state is not None else ()
        reasons = [e.detail["reason"] for e in entries if e.action == "refused"]
        mismatch = [r for r in reasons if "request digest mismatch" in r]
        assert (party == victim) == (not mismatch), (party, reasons)
    # Honest: one query at every party (one map) sums every party's count.
    truth = three.duck(ALL)[0][0]
    total = _sum(fed.all().map(STATS_TASK, **payload(ALL))) * config.max_rows
    assert total == pytest.approx(truth)
