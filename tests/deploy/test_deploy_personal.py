"""Personal layers over real gRPC: FedPer trains, and a coordinator cannot read or overwrite
any node's own head.

Nodes are NodeClients on loopback in this process (the deployment's code path: wire bytes,
receipts, fetches). The coordinator holds valid credentials and asks for the head by every
name it could guess, in a fetch and with the receipts, and broadcasts a head of its own.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from shoal.core import Federation  # noqa: E402
from shoal.data import load_digits, partition  # noqa: E402
from shoal.errors import NotEnoughNodes  # noqa: E402
from shoal.learn import TRAIN, FedAvg, LocalData, learning_app  # noqa: E402
from shoal.learn.tasks import prefixed  # noqa: E402
from shoal.learn.torch import TorchModel, mlp_module  # noqa: E402
from shoal.learn.transfer import PartialModel  # noqa: E402
from shoal.runtime import FETCH_TASK, FailureKind  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.torch]

NAMES = ("n0", "n1", "n2")


def model() -> PartialModel:
    return PartialModel(TorchModel(functools.partial(mlp_module, 64, 10, 8)), personal=("3.*",))


def test_personal_heads_never_reach_a_hostile_coordinator(federation) -> None:
    torch.set_num_threads(1)
    train, test = load_digits(test_fraction=0.2, seed=0)
    parts = partition(train, nodes=len(NAMES), scheme="dirichlet", alpha=0.3, seed=0)
    engine = federation.engine(seed=1)
    for i, name in enumerate(NAMES):
        data = LocalData(train=parts[i], test=test)
        federation.client(name, learning_app(model()), engine.port, data=data)
    assert engine.wait_for_nodes(len(NAMES), timeout_s=30) == len(NAMES)
    fed = Federation(engine, min_nodes=1, seed=0)
    algorithm = FedAvg(rounds=2, nodes_per_round=len(NAMES), max_steps=5)
    state = algorithm.init(model().get_weights())
    for r in range(2):  # the honest rounds run
        state = algorithm.round(fed, state, seed=r).state
    assert sorted(state.weights) == ["1.bias", "1.weight"]

    group = fed.all()
    broadcast = prefixed("w", state.weights)
    out = group.map(TRAIN, group.broadcast(**broadcast, max_steps=1))
    # The receipts list what each node holds: the shared deltas and counts, no head.
    assert sorted(out.field_names) == ["d/1.bias", "d/1.weight", "n", "steps"]
    for fields in (["3.weight"], ["w/3.weight"], ["p/3.weight"], ["d/3.weight"]):
        replies, failures = fed.request(
            list(out.node_ids), FETCH_TASK, common={"handle": out.handle, "fields": fields}
        )
        assert not replies, fields  # no node has such a field to give
        assert failures and all(f.kind != FailureKind.TIMEOUT for f in failures.values())
    # A coordinator that sends a head of its own (to overwrite, or to probe) is refused.
    hostile = {**broadcast, "w/3.weight": np.zeros((10, 8)), "w/3.bias": np.zeros(10)}
    with pytest.raises(NotEnoughNodes, match="unexpected"):
        group.map(TRAIN, group.broadcast(**hostile, max_steps=1))
