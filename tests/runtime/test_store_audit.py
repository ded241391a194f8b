"""The Store's audit log is a hash chain; a Federation's trail is that same chain."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.core import Federation
from shoal.runtime import LocalEngine, NodeApp, Store, TaskContext
from shoal.runtime.audit import GENESIS


def filled(path: Path) -> Store:
    store = Store(path)
    run_id = store.create_run(name="r", config={})
    store.audit(actor="operator", action="node.added", detail={"node": "n0"})
    for i in range(3):
        store.audit(actor="coordinator", action="round", detail={"round": i}, run_id=run_id)
    return store


def tamper(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("DROP TRIGGER audit_no_delete")
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()


def test_entries_link_to_the_one_before(tmp_path: Path) -> None:
    with filled(tmp_path / "fl.db") as store:
        entries = store.audit_log(limit=10)
        assert entries[0].prev == GENESIS
        assert [e.prev for e in entries[1:]] == [e.hash for e in entries[:-1]]
        report = store.verify_audit()
        assert report.ok and report.entries == 4 and report.head == entries[-1].hash


@pytest.mark.parametrize(
    ("statements", "found"),
    [
        (["UPDATE audit SET detail='{\"round\": 7}' WHERE seq=3"], "does not match its hash"),
        (["UPDATE audit SET actor='someone' WHERE seq=1"], "does not match its hash"),
        (["DELETE FROM audit WHERE seq=2"], "removed"),
        (["DELETE FROM audit WHERE seq=4"], "removed from the end"),
        (
            [
                "UPDATE audit SET seq=-1 WHERE seq=2",
                "UPDATE audit SET seq=2 WHERE seq=3",
                "UPDATE audit SET seq=3 WHERE seq=-1",
            ],
            "does not link",
        ),
    ],
    ids=["edited-detail", "edited-actor", "removed", "truncated", "reordered"],
)
def test_every_kind_of_tampering_is_found(
    tmp_path: Path, statements: list[str], found: str
) -> None:
    path = tmp_path / "fl.db"
    filled(path).close()
    tamper(path, *statements)
    with Store(path) as store:
        report = store.verify_audit()
    assert not report.ok
    assert any(found in p for p in report.problems), report.problems


def test_a_version_1_store_is_migrated_to_a_chain(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    filled(path).close()
    # Make it look like a version-1 store: no chain columns, version 1.
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        DROP TRIGGER audit_no_update; DROP TRIGGER audit_no_delete;
        ALTER TABLE audit DROP COLUMN prev; ALTER TABLE audit DROP COLUMN hash;
        UPDATE meta SET value='1' WHERE key='schema_version'; DROP TABLE audit_seal;
        CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit
            BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
        CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit
            BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
        """
    )
    conn.commit()
    conn.close()
    with Store(path) as store:
        assert store.verify_audit().ok and store.verify_audit().entries == 4
        store.audit(actor="x", action="after")
        assert store.verify_audit().entries == 5 and store.verify_audit().ok
    conn = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):  # still append-only
        conn.execute("UPDATE audit SET actor='m'")
    conn.close()


def app() -> NodeApp:
    node = NodeApp()

    @node.task("train", release={"delta": "secure", "n": "clear"})
    def train(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        return {"delta": np.ones(2), "n": 1}

    return node


def test_a_federation_records_requests_reveals_and_refusals_in_the_store(tmp_path: Path) -> None:
    with Store(tmp_path / "fl.db") as store:
        run_id = store.create_run(name="r", config={})
        fed = Federation(LocalEngine(app(), nodes=2), audit=store.audit_trail(run_id))
        replies, failures = fed.request(["n0"], "train")  # a direct reply of a secure field
        assert not replies and "secure" in failures["n0"].detail
        out = fed.all().map("train")
        assert out["n"].reveal() == {"n0": 1, "n1": 1}
        delta = out["delta"]
        assert delta.reveal() == {}  # each node refused: nothing revealed
        assert {f.kind.value for f in delta.failures.values()} == {"rejected"}
        actions = [e.action for e in fed.audit_log]
        assert actions == [
            "request",
            "node.rejected",
            "reveal",
            "reveal",
            "node.rejected",
            "node.rejected",
        ]
        assert [r.action for r in store.audit_log(run_id)] == actions  # one trail
        refusal = fed.audit_log[1].detail
        assert refusal["node"] == "n0" and "'delta' as secure" in refusal["reason"]
        assert store.verify_audit().ok
        assert json.dumps(fed.audit_log[0].detail, sort_keys=True) == (
            '{"keep_as": null, "nodes": 1, "task": "train"}'
        )
