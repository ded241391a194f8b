"""A node's state: ledger and audit log in one hash chain, durable in SQLite, tamper-evident."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from shoal.errors import NodeStateError, ReleaseRefused
from shoal.runtime import NodeState, NodeStateFile, open_node_state


def fill(state: NodeState) -> None:
    state.charge(task_id="r1", charge={"noise_multiplier": 1.1, "steps": 1}, task="train")
    state.audit("refused", task="shoal.fetch", reason="'delta' as secure")
    state.charge(task_id="r2", charge={"noise_multiplier": 1.1, "steps": 1}, task="train")


def test_memory_state_chains_entries_and_refuses_a_second_charge() -> None:
    state = NodeState(node_id="n0")
    fill(state)
    with pytest.raises(ReleaseRefused, match="already"):
        state.charge(task_id="r1", charge={"steps": 1})
    assert [c["steps"] for c in state.charges()] == [1, 1]
    assert state.charged("r2") and not state.charged("r3")
    report = state.verify()
    assert report.ok and report.entries == 3 and report.head == state.entries[-1].hash
    assert [e.prev for e in state.entries[1:]] == [e.hash for e in state.entries[:-1]]


def test_a_state_file_survives_reopening_with_every_entry(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    state = open_node_state(path, owner="key:abc")
    fill(state)
    entries = state.entries
    state.close()
    again = open_node_state(path, owner="key:abc")
    assert again.entries == entries
    assert len(again.charges()) == 2
    with pytest.raises(ReleaseRefused, match="already"):  # the replay guard survives restarts
        again.charge(task_id="r2", charge={"steps": 1})
    again.audit("after-restart")
    assert again.verify().ok and len(again.entries) == 4
    again.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_a_state_file_of_another_node_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    open_node_state(path, owner="key:abc").close()
    with pytest.raises(NodeStateError, match=r"belongs to .key:abc.*restore"):
        open_node_state(path, owner="key:xyz")


def test_a_corrupted_or_foreign_file_is_refused_never_reset(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(NodeStateError, match="corrupted or not a node state file"):
        open_node_state(garbage, owner="k")
    assert garbage.read_bytes() == b"this is not sqlite" * 100  # left as it was
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(NodeStateError, match="not a shoal node state file"):
        open_node_state(other, owner="k")


def tamper(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("DROP TRIGGER audit_no_delete")
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    ("statements", "found"),
    [
        # Lower a charge: the ledger would forget budget spent.
        (
            ["UPDATE audit SET detail=replace(detail, '1.1', '9.9') WHERE seq=1"],
            "does not match its hash",
        ),
        (["DELETE FROM audit WHERE seq=2"], "removed"),
        (["DELETE FROM audit WHERE seq=3"], "removed from the end"),
        (
            [
                "UPDATE audit SET seq=-1 WHERE seq=1",
                "UPDATE audit SET seq=1 WHERE seq=2",
                "UPDATE audit SET seq=2 WHERE seq=-1",
            ],
            "does not link",
        ),
    ],
    ids=["edited", "removed", "truncated", "reordered"],
)
def test_tampered_state_is_refused_when_opened(
    tmp_path: Path, statements: list[str], found: str
) -> None:
    path = tmp_path / "node.db"
    state = open_node_state(path, owner="k")
    fill(state)
    state.close()
    tamper(path, *statements)
    with pytest.raises(NodeStateError, match="broken audit chain") as caught:
        open_node_state(path, owner="k")
    assert found in str(caught.value)


def test_the_log_is_append_only_inside_sqlite(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    state = open_node_state(path, owner="k")
    fill(state)
    state.close()
    conn = sqlite3.connect(path)
    for statement in ("DELETE FROM audit", "UPDATE audit SET action='x'"):
        with pytest.raises(sqlite3.DatabaseError, match="append-only"):
            conn.execute(statement)
    conn.close()


def test_one_file_holds_every_simulated_node_separately(tmp_path: Path) -> None:
    path = tmp_path / "sim.db"
    with NodeStateFile(path, owner="simulation") as file:
        for node in ("n0", "n1"):
            fill(file.state(node))
        file.state("n0").audit("extra")
    with NodeStateFile(path, owner="simulation") as file:
        assert file.nodes() == ["n0", "n1"]
        assert len(file.state("n0").entries) == 4 and len(file.state("n1").entries) == 3
        assert file.verify().ok and file.verify().entries == 7


def test_a_simulation_can_keep_every_nodes_state_in_one_file(tmp_path: Path) -> None:
    from shoal.core import Federation
    from shoal.privacy.guard import DPRequest, budget_guard
    from shoal.runtime import LocalEngine, NodeApp

    def build() -> NodeApp:
        app = NodeApp()
        app.register("train", lambda ctx, p: {"n": 1}, release={"n": "clear"})
        app.add_guard(budget_guard(max_epsilon=100.0, max_delta=1e-5, tasks={"train"}))
        return app

    dp = DPRequest(clip=1.0, noise_multiplier=2.0, sample_rate=1.0, steps=1).to_json()
    path = tmp_path / "sim.db"
    with NodeStateFile(path, owner="simulation") as file:
        fed = Federation(LocalEngine(build(), nodes=3, node_states=file))
        for _ in range(2):
            assert fed.all().map("train", dp=dp)["n"].sum() == 3
    with NodeStateFile(path, owner="simulation") as file:  # a later simulation, same file
        assert file.nodes() == ["n0", "n1", "n2"]
        assert all(len(file.state(n).charges()) == 2 for n in file.nodes())
        fed = Federation(LocalEngine(build(), nodes=3, node_states=file))
        fed.all().map("train", dp=dp)
        assert all(len(file.state(n).charges()) == 3 for n in file.nodes())
        assert file.verify().ok
