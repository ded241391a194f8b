"""SecureSum through the Core API: exact sums of survivors, dropouts, and nothing in the clear."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.aggregate import Clip, Mean, Sum
from shoal.cli.job import parse_job, simulate_job
from shoal.core import Federation
from shoal.crypto import SecureSum
from shoal.crypto.secagg import MASKED_INPUT_TASK, SHARE_TASK, UNMASK_TASK
from shoal.errors import ConfigError, NotEnoughNodes, ProtocolError
from shoal.runtime import FETCH_TASK, Faults, LocalEngine, NodeApp
from shoal.wire import decode


def make_app(vectors: dict[str, np.ndarray], chain) -> NodeApp:
    app = NodeApp()

    @app.task("train")
    def train(ctx, payload):
        return {"delta": vectors[ctx.node_id], "n": 1}

    app.install(chain.node_tasks())
    return app


class SpyEngine(LocalEngine):
    """Records every task name dispatched, to show which ones the server ran."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[str] = []

    def dispatch(self, tasks, *, deadline_s):
        self.seen.extend(t.name for t in tasks)
        return super().dispatch(tasks, deadline_s=deadline_s)


def vectors(n: int, d: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"n{i}": rng.uniform(-1, 1, size=d) for i in range(n)}


def test_secure_sum_matches_the_plain_sum_without_fetching_values() -> None:
    data = vectors(12, 50)
    chain = Clip(100.0) | SecureSum()
    engine = SpyEngine(make_app(data, chain), nodes=list(data))
    fed = Federation(engine)
    out = fed.all().map("train")
    secure = out["delta"].aggregate(chain)
    assert FETCH_TASK not in engine.seen  # the server never asked for a value in the clear
    plain = sum(data.values())
    step = 2 * 100.0 / (2**32 // 12 - 1)
    np.testing.assert_allclose(secure, plain, atol=12 * step)


@pytest.mark.parametrize("phase", [SHARE_TASK, MASKED_INPUT_TASK, UNMASK_TASK])
def test_dropouts_in_each_phase_give_the_sum_of_survivors(phase: str) -> None:
    data = vectors(20, 30, seed=1)
    chain = Clip(50.0) | SecureSum(dropout_fraction=0.15)
    faults = Faults(always_drop=frozenset({"n3", "n11"}), tasks=frozenset({phase}))
    fed = Federation(LocalEngine(make_app(data, chain), nodes=list(data), faults=faults))
    out = fed.all().map("train")
    reduced = chain.reduce(out["delta"])
    # a node that drops after sending its masked input still counts: its input is in the sum
    expected = set(data) if phase == UNMASK_TASK else set(data) - {"n3", "n11"}
    assert set(reduced.node_ids) == expected
    # excluded means left out of the sum: an unmasking dropout is not
    assert set(reduced.excluded) == set(out.exclusions) == set(data) - expected
    np.testing.assert_allclose(
        reduced.vector, sum(data[v] for v in expected), atol=len(data) * 2 * 50 / 2**27
    )


def test_fixed_sparse_degree_still_gives_the_exact_sum() -> None:
    data = vectors(30, 20, seed=5)
    chain = Clip(20.0) | SecureSum(degree=8, max_failure_probability=0.01, dropout_fraction=0.1)
    recipients: list[int] = []

    class ShareSpy(LocalEngine):
        def dispatch(self, tasks, *, deadline_s):
            result = super().dispatch(tasks, deadline_s=deadline_s)
            if tasks and tasks[0].name == SHARE_TASK:
                for reply in result.replies.values():
                    recipients.append(len(decode(reply.payload)["recipients"]))
            return result

    engine = ShareSpy(make_app(data, chain), nodes=list(data))
    out = Federation(engine).all().map("train")
    reduced = chain.reduce(out["delta"])
    assert set(reduced.node_ids) == set(data)
    assert recipients == [8] * 30  # each node shared with its 8 neighbours, not all 29
    np.testing.assert_allclose(reduced.vector, sum(data.values()), atol=len(data) * 2 * 20 / 2**27)
    with pytest.raises(ConfigError, match="use degree >= 7"):
        Clip(20.0).__or__(SecureSum(degree=6, dropout_fraction=0.1)).reduce(out["delta"])


def test_too_many_dropouts_raise_instead_of_a_wrong_sum() -> None:
    data = vectors(12, 10, seed=2)
    chain = Clip(10.0) | SecureSum(dropout_fraction=0.1)
    faults = Faults(drop=0.6, tasks=frozenset({MASKED_INPUT_TASK}), seed=4)
    fed = Federation(LocalEngine(make_app(data, chain), nodes=list(data), faults=faults))
    out = fed.all().map("train")
    with pytest.raises((ProtocolError, NotEnoughNodes)):
        out["delta"].aggregate(chain)


def test_mean_after_secure_sum_and_configuration_errors() -> None:
    data = vectors(8, 5, seed=3)
    chain = Clip(10.0) | SecureSum() | Mean()
    fed = Federation(LocalEngine(make_app(data, chain), nodes=list(data)))
    out = fed.all().map("train")
    np.testing.assert_allclose(out["delta"].aggregate(chain), sum(data.values()) / 8, atol=1e-6)
    with pytest.raises(ConfigError, match="value range"):
        out["delta"].aggregate(SecureSum())
    with pytest.raises(ConfigError, match="one reducer"):
        out["delta"].aggregate(Clip(1.0) | SecureSum() | Sum())


def test_secure_job_learns_and_insists_on_a_clip() -> None:
    raw = {
        "data": {"dataset": "digits", "partition": {"scheme": "iid", "nodes": 10}},
        "algorithm": {"name": "fedavg", "rounds": 5, "nodes_per_round": 10, "lr": 0.3},
        "aggregate": {"secure": True, "clip": 5.0},
    }
    result = simulate_job(parse_job(raw))
    assert result.metrics["accuracy"] > 0.85
    with pytest.raises(ConfigError, match="clip"):
        parse_job({**raw, "aggregate": {"secure": True}})
    with pytest.raises(ConfigError, match="rule"):
        parse_job({**raw, "aggregate": {"secure": True, "clip": 1.0, "rule": "median"}})
