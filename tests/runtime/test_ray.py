"""RayEngine on a real multi-node Ray cluster on 127.0.0.1 (one head, two worker nodes).

The cluster (tests/runtime/conftest.py) is shared with the Engine contract suite, as Ray
starts slowly; the last test here kills one of its worker nodes mid-round.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.cli.job import parse_job, simulate_job
from shoal.core import Federation
from shoal.errors import ConfigError, TransportError
from shoal.runtime import FailureKind, Faults, LocalEngine, Recipe, Task
from shoal.runtime.availability import RandomAvailability
from shoal.runtime.devices import Devices, VirtualClock
from shoal.wire import decode, encode

ray = pytest.importorskip("ray")

from shoal.runtime.ray import RayEngine  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.serial]

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


def test_an_unreachable_address_is_a_clear_error_not_a_hang(tmp_path: Path) -> None:
    # In a process of its own: this one may already be connected to the tests' cluster.
    script = tmp_path / "connect.py"
    script.write_text(
        "import socket, sys\n"
        "from shoal.errors import TransportError\n"
        "from shoal.runtime import Recipe\n"
        "from shoal.runtime.ray import RayEngine\n"
        "sock = socket.socket(); sock.bind(('127.0.0.1', 0))  # bound, not listening\n"
        "port = sock.getsockname()[1]\n"
        "try:\n"
        "    RayEngine(app=Recipe(target='m:f'), nodes=2, address=f'127.0.0.1:{port}',\n"
        "              connect_timeout_s=2)\n"
        "except TransportError as exc:\n"
        "    print(exc); import ray; print('initialized', ray.is_initialized())\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, check=True
    )
    assert re.search(r"not reachable at '127\.0\.0\.1:\d+'", done.stdout), done.stdout
    assert "initialized False" in done.stdout


def test_objects_and_arrays_are_refused_only_descriptions_cross() -> None:
    with pytest.raises(ConfigError, match="Recipe"):
        RayEngine(app=object(), nodes=2)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="never the data itself"):
        RayEngine(app=APP, data=[np.zeros(3)] * 2, nodes=2)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="plain JSON"):
        Recipe(target="shoal_ray_apps:data", options={"broken": np.zeros(2)})
    with pytest.raises(ConfigError, match="module:function"):
        Recipe(target="os.system('x')")


def test_a_batch_returns_as_one_buffer_that_splits_into_each_nodes_reply_bytes() -> None:
    """An actor's body run in this process: its batch outcome (one buffer for all replies)
    unpacks into exactly the wire bytes a LocalEngine's nodes reply, and failures keep their
    kind; an outcome whose sizes do not add up is refused, never split wrongly."""
    from shoal.runtime.ray.engine import _unpack
    from shoal.runtime.ray.host import NodeHost

    config = {"app": APP.to_json(), "data": None, "nodes": NODES, "seed": 7, "cache_size": 4}
    sys.path.insert(0, str(SUPPORT))
    try:
        host = NodeHost(json.dumps({**config, "workers": 1}))
    finally:
        sys.path.remove(str(SUPPORT))
    assert host.ready() is None
    payload = encode({})
    names = {"n0": "draw", "n1": "nope", "n2": "draw", "n5": "draw"}
    rows = [(n, name, f"t/{n}", None, 0, 0.0) for n, name in names.items()]
    outcome = host.run(rows, [], 30.0, 3, payload)
    answered: dict[str, tuple[bytes, float]] = {}
    failed: dict[str, tuple[str, str]] = {}
    _unpack(outcome, answered, failed)
    twin = local_twin(nodes=NODES, seed=7).run(
        [
            (Task(node_id=n, name=name, payload=payload, task_id=f"t/{n}"), 0.0)
            for n, name in names.items()
        ],
        deadline_s=30.0,
        dispatch=3,
    )
    assert {n: body for n, (body, _) in answered.items()} == {
        n: bytes(r.payload) for n, r in twin.replies.items()
    }
    assert sorted(answered) == ["n0", "n2", "n5"]
    assert failed["n1"][0] == FailureKind.REJECTED.value and "nope" in failed["n1"][1]
    ids, elapsed, sizes, blob, failures = outcome
    with pytest.raises(TransportError, match="malformed"):
        _unpack((ids, elapsed, [s + 1 for s in sizes], blob, failures), {}, {})


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


# -- on the cluster -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(ray_cluster: tuple[Any, list[Any]]) -> tuple[Any, list[Any]]:
    return ray_cluster  # tests/runtime/conftest.py: head and two worker nodes on 127.0.0.1


def test_a_job_gives_the_same_model_on_ray_and_locally(cluster: Any) -> None:
    local = simulate_job(parse_job(job()))
    on_ray = simulate_job(parse_job(job(kind="ray", actors=1)))
    for name, value in local.weights.items():
        np.testing.assert_array_equal(on_ray.weights[name], value)  # bit for bit
    assert on_ray.metrics["failed"] == local.metrics["failed"] > 0


def test_shoal_run_joins_the_cluster_named_in_the_job(
    cluster: tuple[Any, list[Any]], tmp_path: Path
) -> None:
    """`shoal run` with [engine] kind = "ray": address = "auto" (found through RAY_ADDRESS,
    as on a cluster's machine) and the head's host:port both join the running cluster."""
    made, _ = cluster
    local = simulate_job(parse_job(job()))
    for address, env in (("auto", {"RAY_ADDRESS": made.address}), (made.address, {})):
        raw = job(kind="ray", actors=1, address=address)
        lines = [
            f"[{table}]\n" + "".join(f"{k} = {v!r}\n" for k, v in raw[table].items())
            for table in ("job", "algorithm", "faults", "engine")
        ]
        lines.append('[data]\ndataset = "digits"\n')
        lines.append('partition = { scheme = "dirichlet", nodes = 8 }\n')
        path = tmp_path / "job.toml"
        path.write_text("".join(lines).replace("'", '"'))
        out = tmp_path / "out.json"
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "shoal.cli.main",
                "run",
                str(path),
                "--quiet",
                "--json",
                str(out),
                "--store",
                str(tmp_path / f"s{len(env)}.db"),
            ],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, **env},
        )
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads(out.read_text())
        assert summary["accuracy"] == local.metrics["accuracy"]  # the same model as locally


@pytest.mark.parametrize("model", ["gbdt", "secureboost"])
def test_a_tree_job_runs_on_ray_as_it_does_locally(cluster: Any, model: str) -> None:
    from shoal.cli.trees import run_tree_job

    raw: dict[str, Any] = {
        "job": {"seed": 1},
        "data": {"dataset": "breast_cancer", "partition": {"scheme": "iid", "nodes": 5}},
        "model": {"name": model, "n_trees": 2, "max_depth": 2},
    }
    if model == "secureboost":
        raw["model"].update(guest_features=10, hosts=2, key_bits=512, insecure_test_keys=True)
    local = run_tree_job(parse_job(raw))
    raw["engine"] = {"kind": "ray", "actors": 1}
    on_ray = run_tree_job(parse_job(raw))
    assert on_ray["nodes"] == local["nodes"]
    assert on_ray["federated_auc"] == local["federated_auc"]
    assert on_ray["identical_predictions"] and local["identical_predictions"]


def test_a_text_job_runs_on_ray_as_it_does_locally(cluster: Any, tmp_path: Path) -> None:
    pytest.importorskip("torch")
    play = tmp_path / "play.txt"
    play.write_text(
        "HAMLET:\nTo be, or not to be, that is the question:\nWhether tis nobler\n\n"
        "OPHELIA:\nGood my lord,\nHow does your honour for this many a day?\n"
    )
    raw: dict[str, Any] = {
        "data": {"dataset": "shakespeare", "path": play.name, "seq_len": 8},
        "model": {"name": "char_lstm", "embedding": 4, "hidden": 8, "layers": 1},
        "algorithm": {"name": "fedavg", "rounds": 2, "nodes_per_round": 2, "lr": 0.5},
    }
    local = simulate_job(parse_job(raw, base_dir=tmp_path))
    raw["engine"] = {"kind": "ray", "actors": 1}
    on_ray = simulate_job(parse_job(raw, base_dir=tmp_path))
    for name, value in local.weights.items():
        np.testing.assert_array_equal(on_ray.weights[name], value)


def test_an_app_recipe_that_cannot_be_built_stops_the_engine_at_start(cluster: Any) -> None:
    with pytest.raises(ConfigError, match="cannot import 'no_such_module'"):
        RayEngine(app=Recipe(target="no_such_module:app"), nodes=2, actors=1)


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


def test_devices_availability_and_the_clock_match_local_engine(engine: RayEngine) -> None:
    """Cross-device simulation: the virtual clock is the driver's, judged as LocalEngine
    judges it (nominal compute here, so even the elapsed times agree)."""
    nodes = [n for n in engine.node_ids() if n != "n4"]
    setup: dict[str, Any] = {
        "devices": Devices(
            speed=np.array([1.0, 0.5, 0.1, 1.0, 1.0, 0.25]), down_mbps=1.0, compute_s={"draw": 2.0}
        ),
        "availability": RandomAvailability(online_fraction=0.7, slot_s=30.0, seed=1),
    }
    twin = local_twin(nodes=NODES, seed=7, **setup)
    engine.devices, engine.availability, engine.clock = (*setup.values(), VirtualClock())
    try:
        while twin._dispatches < engine._dispatches:
            twin.dispatch([], deadline_s=1)
        kinds: set[FailureKind] = set()
        for _ in range(4):
            assert engine.node_ids() == twin.node_ids()
            work = tasks("draw", encode({"pad": np.zeros(2000)}), nodes)
            on_ray, local = engine.dispatch(work, deadline_s=5), twin.dispatch(work, deadline_s=5)
            assert {n: f.detail for n, f in on_ray.failures.items()} == {
                n: f.detail for n, f in local.failures.items()
            }
            kinds.update(f.kind for f in local.failures.values())
            assert {n: r.elapsed_s for n, r in on_ray.replies.items()} == {
                n: r.elapsed_s for n, r in local.replies.items()
            }
            assert engine.clock.now == twin.clock.now > 0
        assert {FailureKind.DROPPED, FailureKind.TIMEOUT} <= kinds  # offline and too slow
    finally:
        engine.devices, engine.availability, engine.clock = None, None, VirtualClock()


def test_a_worker_machine_lost_mid_round(cluster: tuple[Any, list[Any]], engine: RayEngine) -> None:
    """Kill one worker node while a round runs: its nodes fail as dropped, the round ends
    with the others (min_nodes allowing), and the next round runs every node on the survivor."""
    made, workers = cluster
    fed = Federation(engine, min_nodes=1, deadline_s=60)
    group = fed.group([n for n in engine.node_ids() if n != "n4"])
    before = engine.dispatch(tasks("count", encode({}), group.node_ids), deadline_s=30)
    assert not before.failures
    # The worker machine hosting n0's actor goes.
    where = decode(before.replies["n0"].payload)["ray_node"]
    (victim,) = [w for w in workers if w.node_id == where]
    killer = threading.Timer(1.0, made.remove_node, args=(victim,))
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
