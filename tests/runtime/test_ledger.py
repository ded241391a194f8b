"""The owner's privacy ledger lives in the node's state: durable, replay-proof, noise-bound."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.errors import PrivacyBudgetExceeded, ReleaseRefused
from shoal.privacy import NodeBudget
from shoal.privacy.guard import DPRequest, budget_guard
from shoal.runtime import FETCH_TASK, NodeApp, TaskContext, open_node_state, read_held
from shoal.runtime.nodestate import NODE_STATE_KEY
from shoal.runtime.request import request_digest
from shoal.wire import decode, encode

REQUEST = DPRequest(clip=1.0, noise_multiplier=1.0, sample_rate=1.0, steps=1, level="node")
# Room for exactly three of these requests (each costs the same; composition is not linear).
ONE = NodeBudget(max_epsilon=1e9, max_delta=1e-5)
for _ in range(3):
    ONE.charge(sample_rate=1.0, noise_multiplier=1.0, steps=1)
THREE = ONE.spent()


def make_app() -> NodeApp:
    app = NodeApp()

    @app.task("train", release={"delta": "noised", "n": "clear"})
    def train(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"delta": np.full(4, 3.0), "n": 5}

    app.add_guard(budget_guard(max_epsilon=THREE * 1.0001, max_delta=1e-5, tasks={"train"}))
    return app


def train(app: NodeApp, state: dict[str, Any], task_id: str, **dp: Any) -> Any:
    ctx = TaskContext(node_id="n0", state=state, task_id=task_id)
    request = {**REQUEST.to_json(), **dp}
    return decode(app.handle(ctx, "train", encode({"dp": request}), keep_as=task_id)), ctx


def test_spending_survives_a_restart_exactly(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    state = {NODE_STATE_KEY: open_node_state(path, owner="k")}
    train(make_app(), state, "r1")
    train(make_app(), state, "r2")
    state[NODE_STATE_KEY].close()
    # A new process: a new app, an empty task state, the same file.
    again = {NODE_STATE_KEY: open_node_state(path, owner="k")}
    app = make_app()
    assert len(again[NODE_STATE_KEY].charges()) == 2
    train(app, again, "r3")  # the third fits
    with pytest.raises(PrivacyBudgetExceeded):  # the fourth would not: nothing was forgotten
        train(app, again, "r4")
    entries = again[NODE_STATE_KEY].entries
    assert [e.action for e in entries] == ["privacy.charge"] * 3 + ["declined"]


def test_a_replayed_request_spends_nothing_and_yields_nothing(tmp_path: Path) -> None:
    app, state = make_app(), {NODE_STATE_KEY: open_node_state(tmp_path / "n.db", owner="k")}
    train(app, state, "r1")
    with pytest.raises(ReleaseRefused, match="charged to this node's privacy ledger already"):
        train(app, state, "r1")
    node = state[NODE_STATE_KEY]
    assert len(node.charges()) == 1
    assert node.cache["shoal.privacy.budget"].spent() == pytest.approx(ONE_SPENT)
    assert [e.action for e in node.entries] == ["privacy.charge", "refused"]


ONE_SPENT = (
    NodeBudget(max_epsilon=1e9, max_delta=1e-5)
    .charge(sample_rate=1.0, noise_multiplier=1.0, steps=1)
    .total_epsilon
)


def test_the_release_must_carry_the_noise_the_charge_assumed() -> None:
    app, state = make_app(), {}
    _, ctx = train(app, state, "r1", node_noise_multiplier=0.5)  # its share: std 0.5 * clip 1
    # The secure sum states the producing request's digest (checked before the noise).
    made_by = request_digest(
        "train", encode({"dp": {**REQUEST.to_json(), "node_noise_multiplier": 0.5}})
    )
    # Into a secure sum the share is checked against the group the node itself sees: 0.5 is
    # enough for 4 participants (1 / sqrt(4)), not for 2, however many the request claimed.
    with pytest.raises(ReleaseRefused, match="less noise than it charged"):
        read_held(
            ctx, "r1", ["delta"], use="secure", request=made_by, clip=1.0, noise_std=0.5, group=2
        )
    with pytest.raises(ReleaseRefused, match="less noise than it charged"):
        read_held(
            ctx, "r1", ["delta"], use="secure", request=made_by, clip=1.0, noise_std=0.1, group=4
        )
    with pytest.raises(ReleaseRefused, match="less noise than it charged"):
        read_held(
            ctx, "r1", ["delta"], use="secure", request=made_by, clip=2.0, noise_std=0.5, group=4
        )
    with pytest.raises(ReleaseRefused, match="with the clip and noise"):  # never plain
        app.handle(ctx, FETCH_TASK, encode({"handle": "r1", "fields": ["delta", "n"]}))
    got = read_held(
        ctx, "r1", ["delta"], use="secure", request=made_by, clip=1.0, noise_std=0.5, group=4
    )
    assert got["delta"].shape == (4,)
    with pytest.raises(ReleaseRefused, match="second noisy sample"):
        read_held(
            ctx, "r1", ["delta"], use="secure", request=made_by, clip=1.0, noise_std=0.5, group=4
        )


def _race(app: NodeApp, state: dict[str, Any], prefix: str, count: int) -> list[str]:
    """``count`` charged requests started at once; what became of each."""
    import threading

    start = threading.Barrier(count)
    outcomes: list[str] = []

    def run(i: int) -> None:
        start.wait()
        try:
            train(app, state, f"{prefix}/{i}")
            outcomes.append("charged")
        except PrivacyBudgetExceeded:
            outcomes.append("declined")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    return sorted(outcomes)


def test_requests_at_once_cannot_both_fit_a_budget_with_room_for_one(tmp_path: Path) -> None:
    # A deployed node runs one task at a time per session, but a task still running from a
    # dropped session overlaps the next session's: the budget check and the charge must be
    # one step, or both requests pass the check before either is recorded (the state file's
    # fsync makes that window wide).
    app = make_app()
    for trial in range(8):
        node = open_node_state(tmp_path / f"n{trial}.db", owner="n0")
        state: dict[str, Any] = {NODE_STATE_KEY: node}
        for i in range(2):  # room for one more of the three
            train(app, state, f"warm{i}")
        assert _race(app, state, f"t{trial}", 4) == ["charged", *["declined"] * 3]
        assert len(node.charges()) == 3
        node.close()
