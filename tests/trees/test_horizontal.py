"""Horizontal boosting: exactly the centralized trees, with the server seeing only sums."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer, load_wine

from shoal.core import Federation
from shoal.crypto import SecureSum
from shoal.crypto.secagg.tasks import MASKED_INPUT_TASK, UNMASK_TASK
from shoal.errors import DataError, NotEnoughNodes
from shoal.runtime import DispatchResult, Faults, LocalEngine, NodeApp, Task
from shoal.trees import Booster, GBDTParams, train
from shoal.trees.horizontal import HIST_TASK, horizontal_tasks, train_horizontal
from shoal.wire import decode


@dataclass(frozen=True)
class Rows:
    x: np.ndarray
    y: np.ndarray


def _app(*, secure: bool = True) -> NodeApp:
    app = NodeApp()
    app.install(horizontal_tasks(secure=secure))
    app.install(SecureSum().node_tasks())
    return app


@dataclass(frozen=True)
class Named:
    """A node's rows with column names (as a CSV with a header gives them)."""

    x: np.ndarray
    y: np.ndarray
    feature_names: tuple[str, ...]


def _split(x: np.ndarray, y: np.ndarray, nodes: int, seed: int = 1) -> list[Rows]:
    parts = np.array_split(np.random.default_rng(seed).permutation(len(x)), nodes)
    return [Rows(x[p], y[p]) for p in parts]


def _cancer(missing: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    x, y = load_breast_cancer(return_X_y=True)
    x = x.copy()
    x[np.random.default_rng(0).random(x.shape) < missing] = np.nan
    return x, y


def assert_identical(a: Booster, b: Booster) -> None:
    assert len(a.trees) == len(b.trees)
    for ra, rb in zip(a.trees, b.trees):
        for ta, tb in zip(ra, rb, strict=True):
            for name, value in ta.to_dict().items():
                np.testing.assert_array_equal(value, getattr(tb, name), err_msg=name)


@pytest.mark.parametrize("secure", [True, False])
def test_same_trees_as_centralized_on_pooled_rows(secure: bool) -> None:
    x, y = _cancer()
    nodes = _split(x, y, 5)
    params = GBDTParams(n_trees=4, max_depth=4, colsample=0.8)
    fed = Federation(LocalEngine(_app(secure=secure), data=nodes))
    federated = train_horizontal(fed, params, secure=secure)
    pooled = train(x, y, federated.params, bins=federated.bins)
    assert_identical(federated, pooled)
    assert federated.params.fixed_point_bits == 24
    assert sum(t.n_nodes for (t,) in federated.trees) > 4 * 7


def test_softmax_same_trees_as_centralized() -> None:
    x, y = load_wine(return_X_y=True)
    params = GBDTParams(objective="multi:softprob", num_class=3, n_trees=3, max_depth=3)
    fed = Federation(LocalEngine(_app(), data=_split(x, y, 5)))
    federated = train_horizontal(fed, params, secure=True)
    assert_identical(federated, train(x, y, federated.params, bins=federated.bins))


def test_federated_cuts_are_quantiles_of_the_pooled_data() -> None:
    x, y = _cancer(missing=0.0)
    fed = Federation(LocalEngine(_app(), data=_split(x, y, 4)))
    model = train_horizontal(fed, GBDTParams(n_trees=1, max_depth=2, max_bins=8))
    for j, cuts in enumerate(model.bins.cuts):
        share = np.mean(x[:, j][:, None] < cuts[None, :], axis=0)
        # 4096 grid cells: each cut lands within a cell of its quantile's target rank
        target = np.arange(1, len(cuts) + 1) / 8
        assert len(cuts) >= 4
        assert np.all(share <= target + 0.08), j


class Recording:
    """An engine wrapper keeping every reply the coordinator receives."""

    def __init__(self, inner: LocalEngine) -> None:
        self.inner = inner
        self.replies: list[dict[str, Any]] = []

    def node_ids(self) -> Any:
        return self.inner.node_ids()

    def dispatch(self, tasks: list[Task], *, deadline_s: float) -> DispatchResult:
        result = self.inner.dispatch(tasks, deadline_s=deadline_s)
        self.replies += [decode(r.payload) for r in result.replies.values()]
        return result


def test_a_curious_server_never_receives_one_nodes_histogram() -> None:
    x, y = _cancer()
    nodes = _split(x, y, 4)
    engine = Recording(LocalEngine(_app(), data=nodes))
    fed = Federation(engine)
    params = GBDTParams(n_trees=1, max_depth=2)
    model = train_horizontal(fed, params, secure=True)
    # each node's own root histogram of feature 0, as the server would like to see it
    codes = [model.bins.transform(n.x) for n in nodes]
    p = np.full(len(nodes[0].y), 0.5, np.float32)
    own = [np.bincount(c[:, 0], weights=n.y - 0.5, minlength=257) for c, n in zip(codes, nodes)]
    seen = [v for reply in engine.replies for v in reply.values() if isinstance(v, np.ndarray)]
    assert seen  # masked vectors and protocol messages did arrive
    for hist in own:
        target = np.round(hist[hist != 0] * 2**24)
        for array in seen:
            flat = np.asarray(array, dtype=np.float64).ravel()
            assert not np.isin(target, flat).all()
    assert p.size and not any(e.action == "reveal" for e in fed.audit_log)


def test_a_node_dropping_out_restarts_the_tree_without_it() -> None:
    x, y = _cancer()
    nodes = _split(x, y, 5)
    faults = Faults(drop=1.0, tasks=frozenset({MASKED_INPUT_TASK}), nodes=frozenset({"n2"}))
    fed = Federation(LocalEngine(_app(), data=nodes, faults=faults), min_nodes=3)
    params = GBDTParams(n_trees=3, max_depth=3)
    bins = train_horizontal(
        Federation(LocalEngine(_app(), data=nodes)), GBDTParams(n_trees=1, max_depth=1)
    ).bins
    model = train_horizontal(fed, params, bins=bins)
    rest = [n for i, n in enumerate(nodes) if i != 2]
    pooled = train(
        np.concatenate([n.x for n in rest]),
        np.concatenate([n.y for n in rest]),
        model.params,
        bins=bins,
    )
    assert_identical(model, pooled)
    assert any(e.action == "gbdt.restart_tree" for e in fed.audit_log)


def test_a_node_dropping_out_after_its_masked_input_stays_in_the_tree() -> None:
    """SecAgg+'s rule: a node that drops out at unmasking, after sending its masked input,
    is in the sum (the others reveal its mask). Its histogram counted, so the tree is the
    pooled rows' of all five nodes, grown without a restart."""
    x, y = _cancer()
    nodes = _split(x, y, 5)
    faults = Faults(drop=1.0, tasks=frozenset({UNMASK_TASK}), nodes=frozenset({"n2"}))
    fed = Federation(LocalEngine(_app(), data=nodes, faults=faults), min_nodes=3)
    model = train_horizontal(fed, GBDTParams(n_trees=2, max_depth=3))
    assert_identical(model, train(x, y, model.params, bins=model.bins))
    assert not any(e.action == "gbdt.restart_tree" for e in fed.audit_log)


def test_too_many_dropouts_stop_training() -> None:
    x, y = _cancer()
    faults = Faults(drop=1.0, tasks=frozenset({HIST_TASK}), nodes=frozenset({"n0", "n1", "n2"}))
    fed = Federation(LocalEngine(_app(), data=_split(x, y, 5), faults=faults), min_nodes=3)
    with pytest.raises(NotEnoughNodes):
        train_horizontal(fed, GBDTParams(n_trees=2, max_depth=2))


def test_bad_node_data_is_a_clear_error() -> None:
    x, y = _cancer()
    nodes = _split(x, y, 4)
    nan_first = np.where(np.arange(len(nodes[3].y)) == 0, np.nan, nodes[3].y)
    bad_labels = [*nodes[:3], Rows(nodes[3].x, nan_first)]
    fed = Federation(LocalEngine(_app(), data=bad_labels))
    with pytest.raises(DataError, match="NaN"):
        train_horizontal(fed, GBDTParams(n_trees=1))
    narrow = [*nodes[:3], Rows(nodes[3].x[:, :10], nodes[3].y)]
    with pytest.raises(DataError, match="same columns"):
        train_horizontal(Federation(LocalEngine(_app(), data=narrow)), GBDTParams(n_trees=1))
    # one node one-hot encodes a categorical column in another order: same width, other names
    names = tuple(f"f{j}" for j in range(30))
    swapped = (*names[:28], names[29], names[28])
    encoded = [Named(n.x, n.y, swapped if i == 3 else names) for i, n in enumerate(nodes)]
    with pytest.raises(DataError, match="different names or order"):
        train_horizontal(Federation(LocalEngine(_app(), data=encoded)), GBDTParams(n_trees=1))
    same = [Named(n.x, n.y, names) for n in nodes]
    train_horizontal(Federation(LocalEngine(_app(), data=same)), GBDTParams(n_trees=1, max_depth=1))
    constant = [Rows(np.c_[n.x, np.ones(len(n.x))], n.y) for n in nodes]
    with pytest.raises(DataError, match="feature 30 is constant"):
        train_horizontal(Federation(LocalEngine(_app(), data=constant)), GBDTParams(n_trees=1))
    empty = [*nodes[:3], Rows(nodes[3].x[:0], nodes[3].y[:0])]
    with pytest.raises((DataError, NotEnoughNodes), match="no rows"):
        train_horizontal(
            Federation(LocalEngine(_app(), data=empty), min_nodes=4), GBDTParams(n_trees=1)
        )


def test_a_hostile_coordinator_cannot_make_a_node_loop_or_read_out_of_range() -> None:
    x, y = _cancer()
    fed = Federation(LocalEngine(_app(secure=False), data=_split(x, y, 2)))
    model = train_horizontal(fed, GBDTParams(n_trees=1, max_depth=2), secure=False)
    assert model.trees

    def ask(features: list[int], **tree: Any) -> str:
        payload = {**_root_tree(), **{f"tree/{k}": np.asarray(v) for k, v in tree.items()}}
        common = {"round": 0, "output": 0, "nodes": np.array([0]), **payload}
        replies, failures = fed.request(
            ["n0"], HIST_TASK, common={**common, "features": np.asarray(features)}
        )
        assert not replies
        return failures["n0"].detail

    assert "point forward" in ask([0], left=[0], right=[0])  # a node that is its own child
    assert "feature list" in ask([99])
    assert "wrong length" in ask([0], value=[0.0, 1.0])


def test_a_coordinator_asking_for_histograms_in_the_clear_is_refused() -> None:
    x, y = _cancer()
    fed = Federation(LocalEngine(_app(secure=True), data=_split(x, y, 4)))
    model = train_horizontal(fed, GBDTParams(n_trees=1, max_depth=2), secure=True)
    assert model.trees
    # the same coordinator code with a plain sum: the nodes' policy keeps counts secure-only
    with pytest.raises(NotEnoughNodes, match="releases 'counts' as secure, not in the clear"):
        train_horizontal(fed, GBDTParams(n_trees=1, max_depth=2), secure=False)
    # and a direct fetch of a node's kept histogram is refused the same way
    values = fed.all().map(
        HIST_TASK, round=0, output=0, nodes=np.array([0]), features=np.array([0, 1]),
        offset=None, **_root_tree(),
    )  # fmt: skip
    replies, failures = fed.request(
        [values.node_ids[0]], "shoal.fetch", common={"handle": values.handle, "fields": ["hist"]}
    )
    assert not replies and "secure" in failures[values.node_ids[0]].detail


def _root_tree() -> dict[str, np.ndarray]:
    arrays = {
        "left": [-1], "right": [-1], "feature": [0], "left_bins": [0], "default_left": [0],
        "value": [0.0], "sum_g": [0.0], "sum_h": [0.0], "sizes": [1],
    }  # fmt: skip
    return {f"tree/{k}": np.asarray(v) for k, v in arrays.items()}


def _tampered_app(change: Any) -> NodeApp:
    """A node that builds its histograms honestly, then changes them before the sum."""
    from shoal.runtime import TaskSpec
    from shoal.trees import exact
    from shoal.trees.horizontal import _hist

    def hist(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
        offset = payload.get("offset")
        encoded = _hist(ctx, payload)["hist"]
        own, _ = exact.decode(encoded, offset=None if offset is None else float(offset))
        return {"hist": exact.encode(change(own, payload), offset=offset)}

    app = NodeApp()
    app.install({**horizontal_tasks(secure=True), HIST_TASK: TaskSpec(hist, {"hist": "secure"})})
    app.install(SecureSum().node_tasks())
    return app


def _one_slot_off(own: np.ndarray, payload: dict[str, Any]) -> np.ndarray:
    own = own.copy()
    own[0] += 1  # the first node's first slot of g, one fixed-point step off
    return own


def _negative_hessians(own: np.ndarray, payload: dict[str, Any]) -> np.ndarray:
    g, h = np.split(own, 2)
    return np.concatenate([g, -4 * h])


def _doubled_below_the_root(own: np.ndarray, payload: dict[str, Any]) -> np.ndarray:
    # consistent across features, but not the rows the server split off the parent
    return own if len(payload["tree/left"]) == 1 else 2 * own


@pytest.mark.parametrize(
    ("change", "words"),
    [
        (_one_slot_off, "features disagree"),
        (_negative_hessians, "negative hessian"),
        (_doubled_below_the_root, "split off"),
    ],
)
def test_a_node_sending_a_bad_histogram_stops_training_with_a_clear_error(
    change: Any, words: str
) -> None:
    """Inside a secure sum nobody sees one node's histogram, but the sum must still be a
    histogram of rows: every sampled feature adds up to the same node totals, which are the
    sums the server split off the parent, and no hessian sum is negative. A node whose
    histogram breaks that (faulty or hostile) stops training with a ProtocolError."""
    from shoal.errors import ProtocolError
    from shoal.runtime.roles import NodeApps

    x, y = _cancer()
    nodes = _split(x, y, 4)
    apps = {f"n{i}": _tampered_app(change) if i == 2 else _app() for i in range(4)}
    engine = LocalEngine(NodeApps(apps), nodes=list(apps), data=nodes)
    with pytest.raises(ProtocolError, match=words):
        train_horizontal(Federation(engine), GBDTParams(n_trees=2, max_depth=3))


def test_a_node_sending_negative_sketch_counts_stops_training() -> None:
    """Summed grid counts below zero are no counts of values: the cuts would fall at ranks
    of a made-up distribution. Training stops before any tree."""
    from shoal.errors import ProtocolError
    from shoal.runtime import TaskSpec
    from shoal.runtime.roles import NodeApps
    from shoal.trees import exact
    from shoal.trees.horizontal import SKETCH_TASK, _sketch

    def sketch(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
        offset = float(payload["offset"])
        own, _ = exact.decode(_sketch(ctx, payload)["counts"], offset=offset)
        return {"counts": exact.encode(-50 * own, offset=offset)}

    hostile = NodeApp()
    hostile.install({**horizontal_tasks(), SKETCH_TASK: TaskSpec(sketch, {"counts": "secure"})})
    hostile.install(SecureSum().node_tasks())
    x, y = _cancer()
    apps = {f"n{i}": hostile if i == 1 else _app() for i in range(4)}
    engine = LocalEngine(NodeApps(apps), nodes=list(apps), data=_split(x, y, 4))
    with pytest.raises(ProtocolError, match="negative"):
        train_horizontal(Federation(engine), GBDTParams(n_trees=1, max_depth=2))
