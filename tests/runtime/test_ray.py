"""RayEngine on a real multi-node Ray cluster on 127.0.0.1 (one head, two worker nodes).

One cluster serves the whole module (Ray starts slowly). The tests before the cluster
fixture's first use need no cluster; the last test kills a worker node mid-round.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.cli.job import parse_job, simulate_job
from shoal.core import Federation
from shoal.data import DataSpec
from shoal.errors import ConfigError, TransportError
from shoal.runtime import FailureKind, Faults, LocalEngine, Recipe, Task
from shoal.wire import decode, encode

ray = pytest.importorskip("ray")

from shoal.runtime.ray import RayEngine  # noqa: E402

pytestmark = pytest.mark.integration

SUPPORT = Path(__file__).parent / "ray_support"
APP = Recipe(target="shoal_ray_apps:app")
NODES = 6


def tasks(name: str, payload: bytes, nodes: list[str] | tuple[str, ...]) -> list[Task]:
    return [Task(node_id=n, name=name, payload=payload, task_id=f"{name}/{n}") for n in nodes]


def job(**engine: Any) -> dict[str, Any]:
    return {
        "job": {"seed": 3},
        "data": {"dataset": "digits", "partition": {"scheme": "dirichlet", "nodes": 8}},
        "algorithm": {"rounds": 2, "nodes_per_round": 6, "lr": 0.1},
        "faults": {"drop": 0.2, "straggle": 0.3, "straggle_s": 5.0},
        "engine": {"deadline_s": 4.0, **engine},
    }


# -- without a cluster ----------------------------------------------------------------


def test_without_ray_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    with pytest.raises(ConfigError, match=r"pip install 'shoal\[ray\]'"):
        RayEngine(app=APP, nodes=2)


def test_an_unreachable_address_is_a_clear_error_not_a_hang() -> None:
    assert not ray.is_initialized()
    refused = pytest.raises(TransportError, match=r"not reachable at '127\.0\.0\.1:\d+'")
    with socket_bound() as port, refused:  # bound, not listening: connections are refused
        RayEngine(app=APP, nodes=2, address=f"127.0.0.1:{port}", connect_timeout_s=2)
    assert not ray.is_initialized()


def test_objects_and_arrays_are_refused_only_descriptions_cross() -> None:
    with pytest.raises(ConfigError, match="Recipe"):
        RayEngine(app=object(), nodes=2)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="never the data itself"):
        RayEngine(app=APP, data=[np.zeros(3)] * 2, nodes=2)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="plain JSON"):
        Recipe(target="shoal_ray_apps:data", options={"broken": np.zeros(2)})
    with pytest.raises(ConfigError, match="module:function"):
        Recipe(target="os.system('x')")


@pytest.mark.parametrize(
    ("engine", "message"),
    [
        ({"kind": "spark"}, "kind 'spark' is not known"),
        ({"address": "auto"}, "needs kind = 'ray'"),
        ({"kind": "ray", "address": "head:99999"}, "address must be"),
        ({"kind": "ray", "address": "user@head"}, "address must be"),
        ({"kind": "ray", "actors": 0}, "actors must be at least 1"),
    ],
)
def test_job_files_check_the_ray_engine_table(engine: dict[str, Any], message: str) -> None:
    raw = job()
    raw["engine"] = engine
    with pytest.raises(ConfigError, match=message):
        parse_job(raw)


class socket_bound:
    """A port on 127.0.0.1 that nothing listens on, held for the block."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        port: int = self.sock.getsockname()[1]
        return port

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


# -- on the cluster -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Any, list[Any]]]:
    from ray.cluster_utils import Cluster

    # Workers import the recipes' module by name: put it on their path (they inherit it).
    old_path = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(SUPPORT), old_path) if p)
    temp = tempfile.mkdtemp(prefix="shoalray")  # short: Ray's socket paths must fit
    head = {"num_cpus": 0, "include_dashboard": False, "temp_dir": temp}
    made = Cluster(initialize_head=True, head_node_args=head)
    try:
        workers = [made.add_node(num_cpus=1) for _ in range(2)]
        made.wait_for_nodes()
        ray.init(address=made.address, log_to_driver=False, logging_level="ERROR")
        yield made, workers
    finally:
        ray.shutdown()
        made.shutdown()
        shutil.rmtree(temp, ignore_errors=True)
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


def test_a_job_gives_the_same_model_on_ray_and_locally(cluster: Any) -> None:
    local = simulate_job(parse_job(job()))
    on_ray = simulate_job(parse_job(job(kind="ray", actors=2)))
    for name, value in local.weights.items():
        np.testing.assert_array_equal(on_ray.weights[name], value)  # bit for bit
    assert on_ray.metrics["failed"] == local.metrics["failed"] > 0


def test_a_data_description_that_cannot_be_built_fails_each_node(cluster: Any) -> None:
    missing = DataSpec(path="/no/such/dir/data.csv", partition={"nodes": 3})
    with RayEngineClosing(app=APP, data=missing, actors=1) as eng:
        out = eng.dispatch(tasks("echo", encode({"x": 1}), eng.node_ids()), deadline_s=30)
    assert not out.replies
    assert {f.kind for f in out.failures.values()} == {FailureKind.ERROR}
    assert "does not exist" in out.failures["n0"].detail


def test_an_app_recipe_that_cannot_be_built_stops_the_engine_at_start(cluster: Any) -> None:
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        RayEngine(app=Recipe(target="no_such_module:app"), nodes=2, actors=1)


class RayEngineClosing:
    def __init__(self, **kw: Any) -> None:
        self.engine = RayEngine(**kw)

    def __enter__(self) -> RayEngine:
        return self.engine

    def __exit__(self, *exc: object) -> None:
        self.engine.close()


@pytest.fixture(scope="module")
def engine(cluster: tuple[Any, list[Any]]) -> Iterator[RayEngine]:
    data = Recipe(target="shoal_ray_apps:data", options={"broken": ["n4"]})
    made = RayEngine(app=APP, data=data, nodes=NODES, actors=2, seed=7)
    yield made
    made.close()


def local_twin(**kw: Any) -> LocalEngine:
    sys.path.insert(0, str(SUPPORT))
    try:
        import shoal_ray_apps

        return LocalEngine(shoal_ray_apps.app(), data=shoal_ray_apps.data(broken=["n4"]), **kw)
    finally:
        sys.path.remove(str(SUPPORT))


def test_nodes_spread_over_actors_and_keep_their_state(engine: RayEngine) -> None:
    nodes = engine.node_ids()
    first = engine.dispatch(tasks("count", encode({}), nodes), deadline_s=30)
    second = engine.dispatch(tasks("count", encode({}), nodes[:3]), deadline_s=30)
    assert sorted(first.replies) == list(nodes) and not first.failures
    counts = {n: decode(r.payload)["n"] for n, r in second.replies.items()}
    assert counts == {"n0": 2, "n1": 2, "n2": 2}  # the same node, the same state
    pids = {decode(r.payload)["pid"] for r in first.replies.values()}
    assert len(pids) == 2  # two actors, one batch each, not one Ray task per node


def test_a_broadcast_and_lazily_built_data_give_what_local_gives(engine: RayEngine) -> None:
    nodes = engine.node_ids()
    shared = encode({"x": np.arange(4.0)})
    on_ray = engine.dispatch(tasks("echo", shared, nodes), deadline_s=30)
    local = local_twin(nodes=NODES, seed=7).dispatch(tasks("echo", shared, nodes), deadline_s=30)
    assert list(on_ray.replies) == list(local.replies)  # same order too
    for n in on_ray.replies:
        assert bytes(on_ray.replies[n].payload) == bytes(local.replies[n].payload)
    # The node whose data cannot be built fails with the reason; the others answer.
    bad = on_ray.failures["n4"]
    assert bad.kind is FailureKind.ERROR and "no such file: /data/n4.csv" in bad.detail
    assert set(on_ray.replies) == set(nodes) - {"n4"}


def test_seeds_and_faults_match_local_engine_dispatch_by_dispatch(engine: RayEngine) -> None:
    faults = Faults(drop=0.3, straggle=0.4, straggle_s=5.0, seed=11)
    twin = local_twin(nodes=NODES, seed=7, faults=faults)
    engine.faults = faults
    try:
        # Bring the twin to the engine's dispatch count: seeds include it.
        while twin._dispatches < engine._dispatches:
            twin.dispatch([], deadline_s=1)
        for _ in range(3):
            work = tasks("draw", encode({}), [n for n in engine.node_ids() if n != "n4"])
            on_ray, local = engine.dispatch(work, deadline_s=2), twin.dispatch(work, deadline_s=2)
            assert {n: f.kind for n, f in on_ray.failures.items()} == {
                n: f.kind for n, f in local.failures.items()
            }
            assert on_ray.failures  # the faults did fire
            for n, reply in local.replies.items():
                assert bytes(on_ray.replies[n].payload) == bytes(reply.payload)
    finally:
        engine.faults = None


def test_a_worker_machine_lost_mid_round(cluster: tuple[Any, list[Any]], engine: RayEngine) -> None:
    """Kill one worker node while a round runs: its nodes fail as dropped, the round ends
    with the others (min_nodes allowing), and the next round runs every node on the survivor."""
    made, workers = cluster
    fed = Federation(engine, min_nodes=1, deadline_s=60)
    group = fed.group([n for n in engine.node_ids() if n != "n4"])
    before = engine.dispatch(tasks("count", encode({}), group.node_ids), deadline_s=30)
    assert not before.failures
    killer = threading.Timer(1.0, made.remove_node, args=(workers[1],))
    killer.start()
    try:
        values = group.map("slow", s=0.8)  # ~2 s per actor's batch of 2-3 nodes
    finally:
        killer.join()
    lost = {n for n, f in values.failures.items() if f.kind is FailureKind.DROPPED}
    assert lost and set(values.node_ids) == set(group.node_ids) - lost
    assert all("Ray actor lost" in values.failures[n].detail for n in lost)
    assert engine.live_actors == 1
    # The next round: every node answers, the lost ones rebuilt on the surviving actor.
    after = engine.dispatch(tasks("count", encode({}), group.node_ids), deadline_s=30)
    assert set(after.replies) == set(group.node_ids)
    counts = {n: decode(r.payload)["n"] for n, r in after.replies.items()}
    assert all(counts[n] == 1 for n in lost)  # fresh state: the node started again
    assert all(counts[n] > 1 for n in set(counts) - lost)  # kept state where it lived
