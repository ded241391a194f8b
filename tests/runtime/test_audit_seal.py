"""The audit chains' sealed heads and anchors, attacked with SQL and with old copies.

Someone who can write a Store or a node's state file (but not read its audit key) drops the
append-only triggers, cuts the newest entries, lowers the recorded head, or rewrites an
entry and recomputes every hash after it. Each attempt must fail ``verify``; before the
heads were sealed the second and third passed. Whoever restores an older copy of both the
database and its key is caught only by an anchor exported in between.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest

from shoal.runtime import NodeStateFile, Store
from shoal.runtime.audit import Anchor, ChainReport, entry_hash, read_anchor, write_anchor

BACKENDS = ("store", "state")


def fill(path: Path, backend: str, count: int = 5) -> None:
    if backend == "store":
        with Store(path) as store:
            for i in range(count):
                store.audit(actor="coordinator", action=f"step{i}", detail={"i": i})
    else:
        with NodeStateFile(path, owner="k") as file:
            for i in range(count):
                file.state("").audit(f"step{i}", i=i)


def verify(path: Path, backend: str, anchor: Anchor | None = None) -> ChainReport:
    if backend == "store":
        with Store(path) as store:
            return store.verify_audit(anchor=anchor)
    with NodeStateFile(path, owner=None) as file:
        return file.verify(anchor=anchor)


def anchor_of(path: Path, backend: str) -> Anchor:
    if backend == "store":
        with Store(path) as store:
            return store.audit_anchor()
    with NodeStateFile(path, owner=None) as file:
        return file.anchor()


def sql(path: Path, *statements: str) -> None:
    conn = sqlite3.connect(path)
    for statement in statements:
        conn.execute(statement)
    conn.commit()
    conn.close()


DROP = ("DROP TRIGGER audit_no_update", "DROP TRIGGER audit_no_delete")


def cut_tail(backend: str) -> tuple[str, ...]:
    where = "seq > 3" if backend == "store" else "node = '' AND seq > 3"
    return (*DROP, f"DELETE FROM audit WHERE {where}")


def lower_head(backend: str) -> tuple[str, ...]:
    if backend == "store":
        return ("UPDATE sqlite_sequence SET seq = 3 WHERE name = 'audit'",)
    return ("UPDATE heads SET seq = 3 WHERE node = ''",)


def rewrite_chain(path: Path, backend: str) -> None:
    """Edit entry 1 and recompute every hash after it, and the recorded head: a consistent
    unkeyed chain, exactly what an attacker with SQL alone can produce."""
    conn = sqlite3.connect(path)
    for statement in DROP:
        conn.execute(statement)
    if backend == "store":
        rows = conn.execute(
            "SELECT seq, ts, run_id, actor, action, detail FROM audit ORDER BY seq"
        ).fetchall()
    else:
        rows = [
            (seq, ts, None, actor, action, detail)
            for seq, ts, actor, action, detail in conn.execute(
                "SELECT seq, ts, actor, action, detail FROM audit WHERE node='' ORDER BY seq"
            )
        ]
    prev = "0" * 64
    for seq, ts, run_id, actor, action, detail in rows:
        if seq == 1:
            detail = detail.replace('"i":0', '"i":99')
        digest = entry_hash(prev, seq, ts, actor, action, detail, run_id)
        where = "seq=?" if backend == "store" else "node='' AND seq=?"
        conn.execute(
            f"UPDATE audit SET detail=?, prev=?, hash=? WHERE {where}", (detail, prev, digest, seq)
        )
        prev = digest
    if backend == "store":
        conn.execute("UPDATE audit_seal SET hash=? WHERE id=1", (prev,))
    else:
        conn.execute("UPDATE heads SET hash=? WHERE node=''", (prev,))
    conn.commit()
    conn.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_untouched_chain_verifies_and_anchors(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "db"
    fill(path, backend)
    assert (tmp_path / "db.audit-key").stat().st_mode & 0o077 == 0  # the key is private
    report = verify(path, backend)
    assert report.ok and report.entries == 5 and report.last_seq == 5
    anchor = anchor_of(path, backend)
    write_anchor(tmp_path / "anchor.json", anchor)
    assert read_anchor(tmp_path / "anchor.json") == anchor
    assert verify(path, backend, anchor).ok


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("attack", "found"),
    [
        (lambda path, b: sql(path, *DROP), "trigger"),
        (lambda path, b: sql(path, *cut_tail(b)), "removed from the end"),
        (lambda path, b: sql(path, *cut_tail(b), *lower_head(b)), "sealed head"),
        (rewrite_chain, "MAC does not match"),
        (
            lambda path, b: (
                rewrite_chain(path, b),
                sql(path, "DELETE FROM audit_seal" if b == "store" else "DELETE FROM heads"),
            ),
            "no sealed head",
        ),
    ],
    ids=["drop-triggers", "cut-tail", "cut-tail-and-lower-head", "rewrite-chain", "drop-seal"],
)
def test_sql_tampering_fails_verify(
    tmp_path: Path, backend: str, attack: Callable[[Path, str], object], found: str
) -> None:
    path = tmp_path / "db"
    fill(path, backend)
    attack(path, backend)
    report = verify(path, backend)
    assert not report.ok
    assert any(found in p for p in report.problems), report.problems


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_tampered_chain_is_neither_anchored_nor_extended(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "db"
    fill(path, backend)
    sql(path, *cut_tail(backend), *lower_head(backend))
    with pytest.raises(Exception, match="fails verification"):
        anchor_of(path, backend)
    if backend == "store":
        with Store(path) as store, pytest.raises(Exception, match="sealed head"):
            store.audit(actor="c", action="more")
    else:
        with pytest.raises(Exception, match="refused rather than reset"):
            NodeStateFile(path, owner="k")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_missing_key_is_reported_not_ignored(tmp_path: Path, backend: str) -> None:
    path = tmp_path / "db"
    fill(path, backend)
    (tmp_path / "db.audit-key").unlink()
    report = verify(path, backend)
    assert any("no audit key" in p for p in report.problems)
    if backend == "state":  # the node refuses to start rather than re-key its ledger
        with pytest.raises(Exception, match="audit key that is missing"):
            NodeStateFile(path, owner="k")
    else:
        with Store(path) as store, pytest.raises(Exception, match="audit key"):
            store.audit(actor="c", action="more")


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_older_copy_restored_with_its_key_is_caught_by_the_anchor(
    tmp_path: Path, backend: str
) -> None:
    path = tmp_path / "db"
    fill(path, backend, count=3)
    old = tmp_path / "old"
    old.mkdir()
    for name in ("db", "db.audit-key"):
        shutil.copy(tmp_path / name, old / name)
    fill(path, backend, count=2)  # two more entries, then the head is exported
    anchor = anchor_of(path, backend)
    assert anchor.heads[""][0] == 5
    # The attacker holds the key: the older copy is a perfectly sealed chain...
    shutil.copy(old / "db", path)
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"db{suffix}").unlink(missing_ok=True)
    assert verify(path, backend).ok
    # ...that no longer holds the anchored head.
    report = verify(path, backend, anchor)
    assert any("anchor" in p and "entry 5" in p for p in report.problems), report.problems
