"""A node's own durable state: its owner's privacy ledger and its audit log, in one chain.

Every charge to the ledger is an audit entry (``privacy.charge``, with the task id), written
before the task's result can leave; refusals, declines and forwards are entries too. The
chain is hash-linked, so an edited, removed or reordered entry is found when the state is
opened. In deployment it lives in SQLite (``shoal node --state node.db``: WAL,
``synchronous=FULL``); in simulation in memory, or one SQLite file for all virtual nodes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from shoal.errors import NodeStateError, ReleaseRefused
from shoal.runtime.audit import (
    GENESIS,
    AuditEntry,
    ChainReport,
    canonical,
    entry_hash,
    verify_chain,
)

__all__ = [
    "CHARGE",
    "NODE_STATE_KEY",
    "MemoryNodeState",
    "NodeState",
    "NodeStateFile",
    "open_node_state",
]

NODE_STATE_KEY = "shoal.node_state"  # where a node's state object sits in its task state
CHARGE = "privacy.charge"
FORMAT = "shoal.node-state/1"
# PRAGMA application_id of a node state file: the bytes spell "SHNS" (the Store's is "SHOL").
NODE_APPLICATION_ID = 0x53484E53


class NodeState:
    """The ledger and audit log of one node (in memory; :class:`NodeStateFile` persists).

    ``charge`` records a privacy charge under the request's task id and refuses a second
    charge under the same id (a replay). ``cache`` holds objects rebuilt from the entries
    (the owner's budget), never persisted.
    """

    def __init__(self, *, node_id: str = "") -> None:
        self.node_id = node_id
        self.cache: dict[str, Any] = {}
        self._lock = threading.RLock()
        self._entries: list[AuditEntry] = []
        self._charged: set[str] = set()

    # -- reading -----------------------------------------------------------------------------

    @property
    def entries(self) -> tuple[AuditEntry, ...]:
        with self._lock:
            return tuple(self._entries)

    def charges(self) -> list[Mapping[str, Any]]:
        """The ledger: each charge's entry, oldest first."""
        with self._lock:
            return [e.detail["charge"] for e in self._entries if e.action == CHARGE]

    def charged(self, task_id: str) -> bool:
        with self._lock:
            return task_id in self._charged

    def verify(self) -> ChainReport:
        with self._lock:
            return verify_chain(self._entries, expected_last_seq=len(self._entries))

    # -- writing -----------------------------------------------------------------------------

    def audit(self, action: str, **detail: Any) -> AuditEntry:
        """Append an entry (durably, for a state file) and return it."""
        with self._lock:
            return self._append(action, detail)

    def charge(self, *, task_id: str, charge: Mapping[str, Any], task: str = "") -> AuditEntry:
        """Record a privacy charge for request ``task_id``, durably, before any release.

        Raises ReleaseRefused if that request was charged already: a replay would spend the
        budget twice or draw a second noisy sample of the same value.
        """
        with self._lock:
            if task_id in self._charged:
                raise ReleaseRefused(
                    f"request {task_id!r} was charged to this node's privacy ledger already; "
                    "the node does not run a charged request twice (a replay would spend the "
                    "budget again or give a second noisy sample)"
                )
            entry = self._append(CHARGE, {"task_id": task_id, "task": task, "charge": charge})
            self._charged.add(task_id)
            return entry

    def _next(self, action: str, detail: Mapping[str, Any]) -> AuditEntry:
        prev = self._entries[-1].hash if self._entries else GENESIS
        seq = (self._entries[-1].seq if self._entries else 0) + 1
        ts = time.time()
        text = canonical(detail)
        actor = self.node_id or "node"
        return AuditEntry(
            seq=seq,
            ts=ts,
            actor=actor,
            action=action,
            detail=json.loads(text),
            prev=prev,
            hash=entry_hash(prev, seq, ts, actor, action, text),
            detail_text=text,
        )

    def _append(self, action: str, detail: Mapping[str, Any]) -> AuditEntry:
        entry = self._next(action, detail)
        self._entries.append(entry)
        return entry

    def close(self) -> None:
        """Release the file (nothing to do in memory)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.node_id!r}: {len(self._entries)} entries>"


MemoryNodeState = NodeState

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS audit (
        node    TEXT NOT NULL,
        seq     INTEGER NOT NULL,
        ts      REAL NOT NULL,
        actor   TEXT NOT NULL,
        action  TEXT NOT NULL,
        detail  TEXT NOT NULL,
        task_id TEXT,
        prev    TEXT NOT NULL,
        hash    TEXT NOT NULL,
        PRIMARY KEY (node, seq)
    )""",
    # One charge per request id and node: a replay cannot even be written twice.
    "CREATE UNIQUE INDEX IF NOT EXISTS audit_charge ON audit (node, task_id) "
    "WHERE task_id IS NOT NULL",
    """CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the node audit log is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the node audit log is append-only'); END""",
    # The highest sequence ever written per node: removing the newest entries shows.
    "CREATE TABLE IF NOT EXISTS heads (node TEXT PRIMARY KEY, seq INTEGER NOT NULL)",
)


class NodeStateFile:
    """A SQLite file holding the state of one deployed node, or of every simulated node.

    ``owner`` names whose state it is (a node's key fingerprint, or ``"simulation"``); a
    file written for another owner, a corrupted file, or one whose chain is broken is
    refused with NodeStateError, never reset.
    """

    def __init__(self, path: str | os.PathLike[str], *, owner: str | None) -> None:
        self.path = Path(path)
        self.owner = owner  # None: inspect the file (`shoal audit`), whoever's it is
        if owner is None and not self.path.is_file():
            raise NodeStateError(f"there is no node state file {str(self.path)!r}")
        self._lock = threading.RLock()
        self._states: dict[str, _FileNodeState] = {}
        try:
            self._conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False, timeout=30.0
            )
        except sqlite3.Error as exc:
            raise self._refuse(f"cannot be opened: {exc}") from None
        try:
            self._open()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise self._refuse(f"is corrupted or not a node state file ({exc})") from None
        except NodeStateError:
            self._conn.close()
            raise

    def _refuse(self, why: str) -> NodeStateError:
        return NodeStateError(
            f"node state {str(self.path)!r} {why}; it is refused rather than reset (that would "
            "forget the privacy budget already spent): restore the node's own state file"
        )

    def _open(self) -> None:
        conn = self._conn
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if app_id == 0 and not tables:  # a new file
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA application_id={NODE_APPLICATION_ID}")
            conn.execute("BEGIN IMMEDIATE")
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("format", FORMAT), ("owner", self.owner or "")],
            )
            conn.execute("COMMIT")
        elif app_id != NODE_APPLICATION_ID:
            raise self._refuse("is not a shoal node state file (a Store, or another database)")
        conn.execute("PRAGMA synchronous=FULL")  # a charge is on disk before the result leaves
        check = conn.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise self._refuse(f"fails SQLite's integrity check: {check}")
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("format") != FORMAT:
            raise self._refuse(f"has format {meta.get('format')!r}, this shoal reads {FORMAT!r}")
        if self.owner is None:
            self.owner = meta.get("owner", "")
            return  # inspecting: the caller verifies and reports
        if meta.get("owner") != self.owner:
            raise self._refuse(
                f"belongs to {meta.get('owner')!r}, not to this node ({self.owner!r})"
            )
        report = self.verify()
        if not report.ok:
            raise self._refuse("has a broken audit chain: " + "; ".join(report.problems[:3]))

    def nodes(self) -> list[str]:
        with self._lock:
            return [r[0] for r in self._conn.execute("SELECT node FROM heads ORDER BY node")]

    def read(self, node: str = "") -> list[AuditEntry]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, ts, actor, action, detail, prev, hash FROM audit WHERE node=? "
                "ORDER BY seq",
                (node,),
            ).fetchall()
        return [_entry(row) for row in rows]

    def verify(self) -> ChainReport:
        """Check every node's chain in the file; one report for all of them."""
        with self._lock:
            heads = dict(self._conn.execute("SELECT node, seq FROM heads").fetchall())
            nodes = set(heads) | {
                r[0] for r in self._conn.execute("SELECT DISTINCT node FROM audit")
            }
        problems: list[str] = []
        total, head = 0, GENESIS
        for node in sorted(nodes):
            report = verify_chain(self.read(node), expected_last_seq=heads.get(node, 0))
            total += report.entries
            head = report.head
            label = f"node {node!r}: " if node else ""
            problems.extend(label + p for p in report.problems)
        return ChainReport(entries=total, head=head, problems=tuple(problems))

    def state(self, node_id: str = "") -> NodeState:
        """The state of ``node_id`` ("" for the file of a deployed node), loaded once."""
        with self._lock:
            found = self._states.get(node_id)
            if found is None:
                found = _FileNodeState(file=self, node_id=node_id)
                self._states[node_id] = found
            return found

    def _insert(self, node: str, entry: AuditEntry, task_id: str | None) -> None:
        with self._lock:
            conn = self._conn
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "INSERT INTO audit (node, seq, ts, actor, action, detail, task_id, prev, hash)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        node,
                        entry.seq,
                        entry.ts,
                        entry.actor,
                        entry.action,
                        entry.detail_text,
                        task_id,
                        entry.prev,
                        entry.hash,
                    ),
                )
                conn.execute(
                    "INSERT INTO heads (node, seq) VALUES (?, ?) "
                    "ON CONFLICT (node) DO UPDATE SET seq=excluded.seq",
                    (node, entry.seq),
                )
                conn.execute("COMMIT")
            except sqlite3.IntegrityError as exc:
                conn.execute("ROLLBACK")
                if task_id is not None and "task_id" in str(exc):
                    raise ReleaseRefused(
                        f"request {task_id!r} was charged to this node's ledger already"
                    ) from None
                raise NodeStateError(f"cannot write node state {str(self.path)!r}: {exc}") from None
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise NodeStateError(f"cannot write node state {str(self.path)!r}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> NodeStateFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class _FileNodeState(NodeState):
    """One node's chain in a :class:`NodeStateFile`: entries reach the disk before return."""

    def __init__(self, *, file: NodeStateFile, node_id: str) -> None:
        super().__init__(node_id=node_id)
        self._file = file
        self._entries = file.read(node_id)
        self._charged = {e.task_id for e in self._entries if e.action == CHARGE and e.task_id}

    def _append(self, action: str, detail: Mapping[str, Any]) -> AuditEntry:
        entry = self._next(action, detail)
        task_id = detail.get("task_id") if action == CHARGE else None
        self._file._insert(self.node_id, entry, task_id if isinstance(task_id, str) else None)
        self._entries.append(entry)  # only once it is on disk
        return entry

    def close(self) -> None:
        self._file.close()


def open_node_state(path: str | os.PathLike[str], *, owner: str) -> NodeState:
    """The durable state of a deployed node: ``shoal node --state PATH``."""
    return NodeStateFile(path, owner=owner).state("")


def _entry(row: Any) -> AuditEntry:
    seq, ts, actor, action, detail, prev, digest = row
    try:
        parsed = json.loads(detail)
    except (TypeError, ValueError):
        parsed = {"unreadable": str(detail)[:200]}
    if not isinstance(parsed, dict):
        parsed = {"unreadable": str(detail)[:200]}
    return AuditEntry(
        seq=int(seq),
        ts=float(ts),
        actor=str(actor),
        action=str(action),
        detail=parsed,
        prev=str(prev),
        hash=str(digest),
        detail_text=str(detail),
    )
