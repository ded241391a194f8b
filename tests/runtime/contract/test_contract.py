"""The Engine contract (see shoal.runtime.engine), run against every engine in ENGINES.

Each test states one clause of the contract. The engines serve the same nodes with the same
apps (apps.py): n0 the guest, n1..n3 hosts; n3 has no bulk lane on gRPC.
"""

from __future__ import annotations

import importlib
import itertools
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.core import Federation
from shoal.errors import ConfigError, NotEnoughNodes
from shoal.runtime import (
    DECLINED_DETAIL,
    FETCH_TASK,
    Buffer,
    DispatchResult,
    Engine,
    FailureKind,
    Task,
)
from shoal.wire import decode, encode

pytestmark = [pytest.mark.integration, pytest.mark.serial]

apps = importlib.import_module("shoal_contract_apps")  # loaded by this folder's conftest.py

NODES = apps.NODES
DEADLINE_S = 60.0  # generous: only the deadline tests expect anyone to be late
_ids = itertools.count()


def task(node: str, name: str, payload: Buffer | None = None, **kw: Any) -> Task:
    """A task with an id no other test uses (the engines are shared by the module)."""
    return Task(
        node_id=node,
        name=name,
        payload=encode({}) if payload is None else payload,
        task_id=f"{name}.{next(_ids)}/{node}",
        **kw,
    )


def run(engine: Engine, tasks: Sequence[Task], deadline_s: float = DEADLINE_S) -> DispatchResult:
    """Dispatch, and check what every dispatch owes its caller, whatever happened."""
    result = engine.dispatch(tasks, deadline_s=deadline_s)
    wanted = [t.node_id for t in tasks]
    by_node = {t.node_id: t for t in tasks}
    # Exactly one outcome per task: a reply or a failure, never both, never none.
    assert set(result.replies).isdisjoint(result.failures)
    assert sorted([*result.replies, *result.failures]) == sorted(wanted)
    # In task order whatever the arrival order, so sums over replies are reproducible.
    assert list(result.replies) == [n for n in wanted if n in result.replies]
    assert list(result.failures) == [n for n in wanted if n in result.failures]
    for node, reply in result.replies.items():
        assert reply.node_id == node and reply.task_id == by_node[node].task_id
        assert reply.elapsed_s >= 0
    for node, failure in result.failures.items():
        assert failure.node_id == node and failure.task_id == by_node[node].task_id
        assert isinstance(failure.kind, FailureKind) and failure.detail
    return result


def replies(result: DispatchResult) -> dict[str, dict[str, Any]]:
    assert not result.failures, {n: (f.kind, f.detail) for n, f in result.failures.items()}
    return {n: decode(r.payload) for n, r in result.replies.items()}


def count(engine: Engine, nodes: Sequence[str], key: str) -> dict[str, int]:
    got = replies(run(engine, [task(n, "count", encode({"key": key})) for n in nodes]))
    return {n: got[n]["count"] for n in nodes}


# -- dispatch and replies ---------------------------------------------------------------------


def test_node_ids_are_the_nodes_in_a_stable_order(kit: Any) -> None:
    assert tuple(kit.engine.node_ids()) == NODES
    assert tuple(kit.engine.node_ids()) == NODES


def test_each_node_runs_its_task_and_replies(kit: Any) -> None:
    x = np.arange(6.0).reshape(2, 3)
    payload = encode({"x": x})  # one buffer for every node, as a broadcast is
    tasks = [task(n, "echo", payload) for n in reversed(NODES)]
    got = replies(run(kit.engine, tasks))
    assert list(got) == list(reversed(NODES))
    for t in tasks:
        reply = got[t.node_id]
        assert reply["node"] == t.node_id
        assert reply["task_id"] == t.task_id  # the task sees the caller's id
        np.testing.assert_array_equal(reply["x"], x * 2)


def test_a_subset_and_an_empty_dispatch(kit: Any) -> None:
    assert list(replies(run(kit.engine, [task("n2", "echo")]))) == ["n2"]
    empty = run(kit.engine, [])
    assert not empty.replies and not empty.failures


def test_nodes_sharing_a_payload_get_private_copies(kit: Any) -> None:
    # A task that changes its decoded payload must not change another node's.
    payload = encode({"x": np.ones(3), "log": ["start"]})
    tasks = [task(n, "append", payload) for n in NODES]
    got = replies(run(kit.engine, tasks))
    for n in NODES:
        assert got[n]["log"] == ["start", n]


def test_a_malformed_dispatch_is_refused_before_anything_runs(kit: Any) -> None:
    key = f"malformed{next(_ids)}"
    for deadline in (0.0, -1.0):
        with pytest.raises(ConfigError, match="deadline"):
            kit.engine.dispatch([task("n0", "count", encode({"key": key}))], deadline_s=deadline)
    with pytest.raises(ConfigError, match="two tasks"):
        kit.engine.dispatch(
            [task("n1", "count", encode({"key": key})), task("n1", "echo")], deadline_s=10
        )
    with pytest.raises(ConfigError, match="no node"):
        kit.engine.dispatch(
            [task("n1", "count", encode({"key": key})), task("nx", "echo")], deadline_s=10
        )
    assert count(kit.engine, ["n0", "n1"], key) == {"n0": 1, "n1": 1}  # none of them ran


# -- deadlines --------------------------------------------------------------------------------


def test_a_late_node_times_out_and_the_others_reply(kit: Any) -> None:
    key = f"late{next(_ids)}"
    tasks = [
        task("n0", "echo"),
        task("n1", "sleep", encode({"s": 1.5})),
        task("n2", "count", encode({"key": key})),
    ]
    result = run(kit.engine, tasks, deadline_s=0.5)
    assert list(result.replies) == ["n0", "n2"]
    assert result.failures["n1"].kind is FailureKind.TIMEOUT
    # The late node serves the next dispatch, and its late answer is not mistaken for it.
    got = replies(run(kit.engine, [task("n1", "echo"), task("n2", "count", encode({"key": key}))]))
    assert got["n1"]["node"] == "n1" and "slept" not in got["n1"]
    assert got["n2"]["count"] == 2


# -- every FailureKind ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "payload", "kind", "words"),
    [
        ("boom", encode({}), FailureKind.ERROR, "task exploded"),
        ("echo", encode({"private": True}), FailureKind.DECLINED, DECLINED_DETAIL),
        ("no_such_task", encode({}), FailureKind.REJECTED, "no task named 'no_such_task'"),
        ("echo", b"\x00garbage, not a wire message", FailureKind.REJECTED, "wire"),
    ],
    ids=["error", "declined", "rejected-unknown-task", "rejected-bad-payload"],
)
def test_a_failing_node_is_reported_and_the_others_reply(
    kit: Any, name: str, payload: bytes, kind: FailureKind, words: str
) -> None:
    result = run(kit.engine, [task("n0", "echo"), task("n1", name, payload), task("n2", "echo")])
    assert list(result.replies) == ["n0", "n2"]
    failure = result.failures["n1"]
    assert failure.kind is kind
    assert words.lower() in failure.detail.lower()
    if kind in (FailureKind.REJECTED, FailureKind.DECLINED):  # on the node's own record
        action = "refused" if kind is FailureKind.REJECTED else "declined"
        assert any(a == action and d["task"] == name for a, d in kit.audit("n1"))
    assert replies(run(kit.engine, [task("n1", "echo")]))["n1"]["node"] == "n1"


def test_a_disconnected_node_is_dropped_and_can_come_back(kit: Any) -> None:
    kit.disconnect("n3")
    try:
        assert "n3" not in kit.engine.node_ids()
        result = run(kit.engine, [task("n0", "echo"), task("n3", "echo")])
        assert list(result.replies) == ["n0"]
        assert result.failures["n3"].kind is FailureKind.DROPPED
    finally:
        kit.reconnect("n3")
    assert tuple(kit.engine.node_ids()) == NODES
    assert replies(run(kit.engine, [task("n3", "echo")]))["n3"]["node"] == "n3"


def test_an_undecodable_reply_is_invalid(kit: Any) -> None:
    # The engine hands the node's bytes over as they are; the Federation, which decodes
    # them, reports the node as INVALID and the round goes on without it.
    raw = run(kit.engine, [task("n1", "garble")])
    assert bytes(raw.replies["n1"].payload) == apps.GARBAGE
    fed = Federation(kit.engine, deadline_s=DEADLINE_S)
    got, failures = fed.request(["n0", "n1"], "garble")
    assert not got
    assert {n: f.kind for n, f in failures.items()} == {
        "n0": FailureKind.INVALID,
        "n1": FailureKind.INVALID,
    }
    assert "undecodable" in failures["n1"].detail


# -- per-node state and held values -----------------------------------------------------------


def test_per_node_state_persists_across_dispatches(kit: Any) -> None:
    key = f"state{next(_ids)}"
    assert count(kit.engine, ["n1", "n2"], key) == {"n1": 1, "n2": 1}
    assert count(kit.engine, ["n1"], key) == {"n1": 2}
    run(kit.engine, [task(n, "echo") for n in NODES])  # other work in between
    assert count(kit.engine, ["n2", "n1", "n3"], key) == {"n2": 2, "n1": 3, "n3": 1}
    other = f"{key}-other"
    assert count(kit.engine, ["n1"], other) == {"n1": 1}  # state is per key, per node
    assert count(kit.engine, ["n1"], key) == {"n1": 4}


def test_held_values_persist_and_leave_only_as_their_policy_allows(kit: Any) -> None:
    handle = f"h{next(_ids)}"
    hosts = ["n1", "n2"]
    receipts = replies(run(kit.engine, [task(n, "secret", keep_as=handle) for n in hosts]))
    for n in hosts:  # a receipt describes the held value and reveals none of it
        assert receipts[n]["kept"] == handle
        assert set(receipts[n]["fields"]) == {"delta", "n", "hidden"}
        assert all(isinstance(v, str) for v in receipts[n]["fields"].values())
    run(kit.engine, [task(n, "echo") for n in NODES])  # other work in between

    def fetch(fields: list[str], nodes: Sequence[str] = hosts) -> DispatchResult:
        request = encode({"handle": handle, "fields": fields})
        return run(kit.engine, [task(n, FETCH_TASK, request) for n in nodes])

    assert {n: r["n"] for n, r in replies(fetch(["n"])).items()} == {"n1": 1, "n2": 1}
    for field in ("delta", "hidden"):  # secure and never: not in the clear
        refused = fetch([field])
        assert {f.kind for f in refused.failures.values()} == {FailureKind.REJECTED}
        assert field in refused.failures["n1"].detail
    assert any(a == "refused" and d["task"] == FETCH_TASK for a, d in kit.audit("n2"))
    # Held per node: a node that never ran the task holds nothing under that handle.
    missing = fetch(["n"], ["n3"]).failures["n3"]
    assert missing.kind is FailureKind.ERROR and "no longer holds" in missing.detail


def test_forget_drops_only_the_values_named(kit: Any) -> None:
    # Optional (see Engine's docstring): a simulation engine hosting its nodes' state offers
    # forget(); an engine whose nodes keep their own values (they drop the oldest past
    # max_kept) need not, and Federation.discard then does nothing.
    forget = getattr(kit.engine, "forget", None)
    assert callable(forget) == kit.forgets
    if not kit.forgets:
        pytest.skip(f"{kit.name}: no forget() (optional; its nodes keep their own values)")
    first, second = f"h{next(_ids)}", f"h{next(_ids)}"
    hosts = ["n1", "n2"]
    for handle in (first, second):
        replies(run(kit.engine, [task(n, "secret", keep_as=handle) for n in hosts]))

    def fetch(handle: str) -> DispatchResult:
        request = encode({"handle": handle, "fields": ["n"]})
        return run(kit.engine, [task(n, FETCH_TASK, request) for n in hosts])

    # n1 forgets the first value; n2 is told about a handle it never held; unknown nodes
    # and empty lists are no one's business.
    forget({"n1": [first], "n2": ["never-kept"], "nx": [first], "n3": []})
    gone = fetch(first)
    assert list(gone.replies) == ["n2"] and decode(gone.replies["n2"].payload)["n"] == 1
    assert gone.failures["n1"].kind is FailureKind.ERROR
    assert "no longer holds" in gone.failures["n1"].detail
    assert {n: r["n"] for n, r in replies(fetch(second)).items()} == {"n1": 1, "n2": 1}
    forget({n: [first, second] for n in hosts})
    for handle in (first, second):
        assert set(fetch(handle).failures) == set(hosts)
    # Through the Federation: a discarded map's values are gone from every node that held them.
    fed = Federation(kit.engine, deadline_s=DEADLINE_S)
    kept = fed.group(hosts).map("secret")
    assert {n: r["n"] for n, r in replies(fetch(kept.handle)).items()} == {"n1": 1, "n2": 1}
    kept.discard()
    assert {f.kind for f in fetch(kept.handle).failures.values()} == {FailureKind.ERROR}


# -- release-policy refusals ------------------------------------------------------------------


def test_a_result_the_policy_keeps_in_is_never_replied(kit: Any) -> None:
    # Asked for a direct reply, a task whose fields may not leave in the clear is refused.
    result = run(kit.engine, [task("n1", "secret"), task("n2", "echo")])
    assert result.failures["n1"].kind is FailureKind.REJECTED
    assert "delta" in result.failures["n1"].detail
    assert any(a == "refused" and d["task"] == "secret" for a, d in kit.audit("n1"))
    # A noised field leaves only through a DP request its ledger charged: none was.
    handle = f"h{next(_ids)}"
    replies(run(kit.engine, [task("n1", "noisy", keep_as=handle)]))
    request = encode({"handle": handle, "fields": ["delta"], "noise": {"clip": 1.0, "std": 1.0}})
    refused = run(kit.engine, [task("n1", FETCH_TASK, request)]).failures["n1"]
    assert refused.kind is FailureKind.REJECTED and "no privacy charge" in refused.detail


# -- roles ------------------------------------------------------------------------------------


def test_roles_run_their_own_tasks_and_sealed_values_reach_only_their_role(kit: Any) -> None:
    fed = Federation(
        kit.engine, deadline_s=DEADLINE_S, roles={"guest": ["n0"], "host": ["n1", "n2", "n3"]}
    )
    # Each role has its own tasks: a task of the other role is unknown there.
    wrong = run(kit.engine, [task("n0", "seal"), task("n1", "open")])
    assert {n: f.kind for n, f in wrong.failures.items()} == {
        "n0": FailureKind.REJECTED,
        "n1": FailureKind.REJECTED,
    }
    sealed = fed.role("host").map("seal")
    opened = sealed.select("share").to(fed.role("guest"), task="open", send=["total"])
    np.testing.assert_array_equal(opened.select("total").reveal()["n0"], [6.0] * 3)
    # Sealed for the guest: not to the hosts, and not in the clear to the coordinator.
    with pytest.raises(NotEnoughNodes, match="did not release"):
        sealed.select("share").to(fed.role("host"), task="open")
    request = encode({"handle": sealed.handle, "fields": ["share"]})
    clear = run(kit.engine, [task("n1", FETCH_TASK, request)]).failures["n1"]
    assert clear.kind is FailureKind.REJECTED and "sealed" in clear.detail


# -- large payloads ---------------------------------------------------------------------------


def test_large_payloads_arrive_whole_both_ways(kit: Any) -> None:
    # Inline-sized, medium and multi-megabyte payloads (on gRPC: in the header, on the bulk
    # lane, and as stream chunks on n3, which has no lane), each with its own bytes.
    sizes = {"n0": 100, "n1": 50_000, "n2": 700_000, "n3": 700_000}  # float64 elements
    rng = np.random.default_rng(0)
    xs = {n: rng.standard_normal(k) for n, k in sizes.items()}
    got = replies(run(kit.engine, [task(n, "echo", encode({"x": xs[n]})) for n in NODES]))
    for n in NODES:
        np.testing.assert_array_equal(got[n]["x"], xs[n] * 2)
    # Over the node's own limit: refused before it is read, and the node goes on serving.
    big = encode({"x": np.zeros(apps.LIMIT_BYTES // 8 + 1)})
    result = run(kit.engine, [task("n2", "echo", big), task("n3", "echo")])
    assert result.failures["n2"].kind is FailureKind.REJECTED
    assert replies(run(kit.engine, [task("n2", "echo")]))["n2"]["node"] == "n2"


# -- concurrent dispatches --------------------------------------------------------------------


def test_concurrent_dispatches_to_disjoint_nodes(kit: Any) -> None:
    key = f"concurrent{next(_ids)}"
    groups = [("n0", "n1"), ("n2", "n3")]
    seen: dict[tuple[str, ...], list[dict[str, int]]] = {g: [] for g in groups}
    errors: list[BaseException] = []

    def work(group: tuple[str, ...]) -> None:
        try:
            for _ in range(5):
                tasks = [task(n, "count", encode({"key": key})) for n in group]
                seen[group].append(count_of(run(kit.engine, tasks)))
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    def count_of(result: DispatchResult) -> dict[str, int]:
        return {n: r["count"] for n, r in replies(result).items()}

    threads = [threading.Thread(target=work, args=(g,)) for g in groups]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)  # a safety net against a hung engine, not a timing check
    assert not errors, errors
    for group in groups:
        assert seen[group] == [dict.fromkeys(group, i) for i in range(1, 6)]


# -- close and cleanup ------------------------------------------------------------------------


def test_close_releases_everything_and_is_idempotent(
    kit: Any, open_kit: Any, tmp_path: Path
) -> None:
    before = set(threading.enumerate())
    with open_kit(kit.name, tmp_path, nodes=("n0",)) as fresh:
        assert replies(run(fresh.engine, [task("n0", "echo")]))["n0"]["node"] == "n0"
        fresh.engine.close()
        fresh.engine.close()
        deadline = time.monotonic() + 30  # threads wind down; a safety net, not a timing test
        while True:
            left = [t for t in threading.enumerate() if t not in before and t.is_alive()]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert not left, [t.name for t in left]
        assert fresh.leftovers() == []
