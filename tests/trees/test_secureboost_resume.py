"""SecureBoost survives a party that loses its process: every party sets up again and
restores the run's complete rounds from its checkpoints; the model is an uninterrupted run's."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shoal.core import Federation
from shoal.errors import NotEnoughNodes
from shoal.runtime import DispatchResult, Failure, FailureKind, LocalEngine, NodeApp, Task
from shoal.runtime.roles import NodeApps
from shoal.vertical.checkpoint import Checkpoints, FileCheckpoints, MemoryCheckpoints
from shoal.vertical.party import PartyData

pytest.importorskip("shoal.crypto.paillier")

from shoal.trees.secureboost import SecureBoostConfig, secureboost_tasks, train_routed

from .test_secureboost import _cfg, _tables


class LoseProcess:
    """An engine where ``node`` loses its process at the ``nth`` dispatch of ``task``: its
    memory is wiped (a restarted process) and the task fails; with ``after`` the task has
    run first (the process died after doing the work, before its reply left)."""

    def __init__(
        self,
        inner: LocalEngine,
        *,
        node: str,
        task: str,
        nth: int,
        after: bool = False,
        on_loss: Callable[[], None] | None = None,
    ) -> None:
        self.inner, self.node, self.task, self.nth, self.after = inner, node, task, nth, after
        self.on_loss = on_loss
        self.seen = 0

    def node_ids(self) -> Any:
        return self.inner.node_ids()

    def dispatch(self, tasks: list[Task], *, deadline_s: float) -> DispatchResult:
        hit = any(t.name == self.task and t.node_id == self.node for t in tasks)
        if hit:
            self.seen += 1
        if not hit or self.seen != self.nth:
            return self.inner.dispatch(tasks, deadline_s=deadline_s)
        mine = [t for t in tasks if t.node_id == self.node]
        others = [t for t in tasks if t.node_id != self.node]
        result = self.inner.dispatch(others, deadline_s=deadline_s) if others else None
        if self.after:
            self.inner.dispatch(mine, deadline_s=deadline_s)
        self.inner.node_state(self.node).clear()
        if self.on_loss is not None:
            self.on_loss()
        lost = {
            self.node: Failure(
                node_id=self.node, task_id=mine[0].task_id, kind=FailureKind.DROPPED,
                detail="process lost",
            )
        }  # fmt: skip
        replies = dict(result.replies) if result is not None else {}
        failures = {**(result.failures if result is not None else {}), **lost}
        return DispatchResult(replies=replies, failures=failures)


def _federation(
    tables: dict[str, PartyData],
    state: Path | None,
    stores: dict[str, Checkpoints] | None = None,
    **wrap: Any,
) -> tuple[Federation, LocalEngine]:
    roles = {name: "guest" if name == "bank" else "host" for name in tables}
    apps = {}
    stores = {} if stores is None else stores
    for node, role in roles.items():
        app = NodeApp(max_kept=8)
        if state is not None:
            stores[node] = FileCheckpoints(state / f"{node}.db")
        app.install(secureboost_tasks(role, checkpoints=stores.get(node)))
        apps[node] = app
    nodes = list(roles)
    engine = LocalEngine(NodeApps(apps), nodes=nodes, data=[tables[n] for n in nodes])
    by_role: dict[str, list[str]] = {}
    for node, role in roles.items():
        by_role.setdefault(role, []).append(node)
    outer: Any = LoseProcess(engine, **wrap) if wrap else engine
    return Federation(outer, roles=by_role), engine


def _config() -> SecureBoostConfig:
    cfg = _cfg(n_trees=4, subsample=0.8, colsample=0.8)
    return SecureBoostConfig(**{**cfg.__dict__, "retry_wait_s": 0.0, "test_fraction": 0.25})


@pytest.fixture(scope="module")
def uninterrupted() -> dict[str, Any]:
    fed, _ = _federation(_tables(hosts=2), None)
    return train_routed(fed, _config()).test


@pytest.mark.parametrize(
    ("node", "task", "nth", "after"),
    [
        ("ins1", "secureboost.host.commit", 5, False),  # a host, mid tree 2
        ("bank", "secureboost.guest.choose", 7, False),  # the guest, mid tree 3
        # the guest completed round 2, saved it, and died before its reply left: the
        # coordinator counts 1 round and the guest resumes from its margins after round 1
        ("bank", "secureboost.guest.apply", 6, True),
    ],
)
def test_a_party_losing_its_process_resumes_to_the_uninterrupted_model(
    tmp_path: Path, uninterrupted: dict[str, Any], node: str, task: str, nth: int, after: bool
) -> None:
    fed, _ = _federation(_tables(hosts=2), tmp_path, node=node, task=task, nth=nth,
                              after=after)  # fmt: skip
    result = train_routed(fed, _config())
    assert result.resumed_from and result.retries >= 1
    resumed = [e for e in fed.audit_log if e.action == "secureboost.resumed"]
    assert [e.detail["parties"] for e in resumed] == [[node]]
    # the guest's digest of its held-out predictions: the same model
    assert result.test["digest"] == uninterrupted["digest"]
    assert result.test["auc"] == uninterrupted["auc"]


def test_a_party_that_loses_its_checkpoints_too_stops_the_job_cleanly() -> None:
    """Without a state file the restarted host has no split table: refused (new records
    would reuse the ids of the lost ones), and the job stops with the reason."""
    store = MemoryCheckpoints()
    fed, _ = _federation(
        _tables(hosts=2), None, {"ins0": store}, node="ins0", task="secureboost.host.commit",
        nth=5, on_loss=store._saved.clear,  # the process's memory held the checkpoints
    )  # fmt: skip
    with pytest.raises(NotEnoughNodes, match="retries are used up") as caught:
        train_routed(fed, _config())
    causes = []
    exc: BaseException | None = caught.value
    while exc is not None:
        causes.append(str(exc))
        exc = exc.__cause__
    assert any("no saved split table" in c for c in causes), causes
