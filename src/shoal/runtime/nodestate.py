"""A node's own durable state: its owner's privacy ledger and its audit log, in one chain.

Every charge to the ledger is an audit entry (``privacy.charge``, with the task id), written
before the task's result can leave; refusals, declines and forwards are entries too. The
chain is hash-linked and its head sealed with a key kept outside the file (see
:mod:`shoal.runtime.audit`), so an edited, removed or reordered entry is found when the
state is opened. In deployment it lives in SQLite (``shoal node --state node.db``: WAL,
``synchronous=FULL``); in simulation in memory, or one SQLite file for all virtual nodes.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from _thread import RLock as _RLock  # what threading.RLock() returns, without its wrapper
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring_ascii as _json_str  # canonical() of a str
from pathlib import Path
from types import MappingProxyType
from typing import Any

from shoal.errors import ConfigError, NodeStateError, ReleaseRefused
from shoal.runtime.audit import (
    GENESIS,
    Anchor,
    AuditEntry,
    ChainReport,
    canonical,
    entry_hash,
    key_path_for,
    load_key,
    seal,
    seal_problems,
    verify_chain,
)

__all__ = [
    "CHARGE",
    "NODE_STATE_KEY",
    "Charge",
    "ChargeEntry",
    "MemoryNodeState",
    "NodeState",
    "NodeStateFile",
    "durable_table",
    "open_node_state",
]

NODE_STATE_KEY = "shoal.node_state"  # where a node's state object sits in its task state
CHARGE = "privacy.charge"
FORMAT = "shoal.node-state/1"
# PRAGMA application_id of a node state file: the bytes spell "SHNS" (the Store's is "SHOL").
NODE_APPLICATION_ID = 0x53484E53


@dataclass(frozen=True, eq=False)
class Charge:
    """A privacy charge's terms, frozen, with their canonical JSON text made once.

    Every node of a round is charged the same terms: a guard builds them once per request
    (:meth:`of`) and each node's :meth:`NodeState.charge` writes the same text, not a JSON
    encoding of its own.
    """

    terms: Mapping[str, Any]
    text: str
    _heads: dict[str, str] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, terms: Mapping[str, Any]) -> Charge:
        own = dict(terms)  # a copy nobody else holds: the text stays the terms' own
        return cls(terms=MappingProxyType(own), text=canonical(own))

    def head(self, task: str) -> str:
        """The ledger entry's text up to its task id (see :meth:`entry_text`)."""
        head = self._heads.get(task)
        if head is None:  # keys in canonical (sorted) order: charge, task, task_id
            head = f'{{"charge":{self.text},"task":{canonical(task)},"task_id":'
            if len(self._heads) < 16:
                self._heads[task] = head
        return head

    def entry_text(self, *, task: str, task_id: str) -> str:
        """``canonical({"task_id": task_id, "task": task, "charge": terms})``, the ledger
        entry's text, of which only the task id is encoded per call."""
        return f"{self.head(task)}{_json_str(task_id)}}}"

    def entry(self, task: str) -> ChargeEntry:
        """These terms charged for ``task``, ready for :meth:`NodeState.charge_entry`."""
        return ChargeEntry(charge=self, task=task, head=self.head(task))


@dataclass(frozen=True, eq=False)
class ChargeEntry:
    """A charge's ledger entry for one task, less its task id: what a guard prepares once
    for every node a request reaches (:meth:`Charge.entry`)."""

    charge: Charge
    task: str
    head: str  # the entry's canonical text up to the task id


class NodeState:
    """The ledger and audit log of one node (in memory; :class:`NodeStateFile` persists).

    ``charge`` records a privacy charge under the request's task id and refuses a second
    charge under the same id (a replay). ``cache`` holds objects rebuilt from the entries
    (the owner's budget), never persisted.
    """

    # A simulation holds one of these per virtual node: slots, and containers made when
    # first written (most nodes never read their log, many never write it), keep a node's
    # state to one small object and its lock until it has something to hold.
    __slots__ = ("__weakref__", "_cache", "_charged", "_entries", "_lock", "_unlinked", "node_id")
    _plain_append = True  # entries go through NodeState._append (set per subclass below)
    _lazy = True  # entries wait in _unlinked until read (NodeState._write; per subclass)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls._plain_append = cls._append is NodeState._append
        cls._lazy = cls._plain_append and cls._write is NodeState._write

    def __init__(self, *, node_id: str = "") -> None:
        self.node_id = node_id
        self._lock = _RLock()
        self._cache: dict[str, Any] | None = None
        self._entries: Sequence[AuditEntry] = ()
        # In memory, entries are linked into the chain when first read: the same hashes, but
        # a simulated node charging every task pays for a list slot or two, not a SHA-256,
        # a JSON text and an entry object each time (a state file links and writes each
        # entry at once). Kept flat, four slots an entry: (ts, action, text, None), or for
        # a charge (ts, action, the entry's text up to its task id, task id), the text then
        # finished when read. No tuple per entry for the collector to track.
        self._unlinked: Sequence[Any] = ()
        self._charged: set[str] | frozenset[str] = frozenset()

    @property
    def cache(self) -> dict[str, Any]:
        cache = self._cache
        if cache is None:
            cache = self._cache = {}
        return cache

    def cached(self, key: str) -> Any:
        """``cache.get(key)``, without making a cache for a node that has none."""
        cache = self._cache
        return None if cache is None else cache.get(key)

    # -- reading -----------------------------------------------------------------------------

    def _linked(self) -> list[AuditEntry]:
        entries = self._entries
        if not isinstance(entries, list):
            entries = self._entries = []
        unlinked = self._unlinked
        if unlinked:
            for i in range(0, len(unlinked), 4):
                ts, action, text, task_id = unlinked[i : i + 4]
                if task_id is not None:  # a charge's head: its task id finishes the text
                    text = f"{text}{_json_str(task_id)}}}"
                entries.append(self._link(action, text, ts))
            self._unlinked = ()
        return entries

    @property
    def entries(self) -> tuple[AuditEntry, ...]:
        with self._lock:
            return tuple(self._linked())

    def charges(self) -> list[Mapping[str, Any]]:
        """The ledger: each charge's entry, oldest first."""
        with self._lock:
            return [e.detail["charge"] for e in self._linked() if e.action == CHARGE]

    def charged(self, task_id: str) -> bool:
        with self._lock:
            return task_id in self._charged

    def verify(self) -> ChainReport:
        with self._lock:
            entries = self._linked()
            return verify_chain(entries, expected_last_seq=len(entries))

    @property
    def lock(self) -> threading.RLock:
        """Held by whoever checks the ledger and then charges it, so that two requests
        running at once cannot both pass a budget check that only one of them fits."""
        return self._lock

    # -- writing -----------------------------------------------------------------------------

    def audit(self, action: str, **detail: Any) -> None:
        """Append an entry (durably, before returning, for a state file)."""
        with self._lock:
            self._append(action, detail)

    def charge(self, *, task_id: str, charge: Mapping[str, Any] | Charge, task: str = "") -> None:
        """Record a privacy charge for request ``task_id``, durably, before any release.

        Raises ReleaseRefused if that request was charged already: a replay would spend the
        budget twice or draw a second noisy sample of the same value. The check and the
        record are one step under the node's lock.
        """
        with self._lock:
            charged = self._charged
            if task_id in charged:
                raise _replayed(task_id)
            terms = charge if type(charge) is Charge else _as_charge(charge)
            if self._lazy and type(task_id) is str:  # the text is finished when read
                unlinked = self._unlinked
                if not isinstance(unlinked, list):
                    unlinked = self._unlinked = []
                unlinked += (time.time(), CHARGE, terms.head(task), task_id)
            elif self._plain_append:
                self._write(CHARGE, terms.entry_text(task=task, task_id=task_id), task_id)
            else:  # a subclass keeps its entries its own way (the datasite's audit chain)
                self._append(
                    CHARGE, {"task_id": task_id, "task": task, "charge": dict(terms.terms)}
                )
            if isinstance(charged, frozenset):  # the node's first charge
                charged = self._charged = set()
            charged.add(task_id)

    def charge_entry(
        self, task_id: str, entry: ChargeEntry, then: Callable[[dict[str, Any]], None] | None
    ) -> None:
        """:meth:`charge` with an entry prepared once for many nodes (:meth:`Charge.entry`):
        the same replay refusal and the same chain, in one step under the node's lock. If
        the node has a cache, ``then(cache)`` runs under the same lock once the charge is
        recorded (a budget built from the ledger counts it too, before anyone checks it)."""
        with self._lock:
            if not (self._lazy and type(task_id) is str):
                self.charge(task_id=task_id, task=entry.task, charge=entry.charge)
            else:  # charge(), inline: the entry's text is finished when read
                charged = self._charged
                if task_id in charged:
                    raise _replayed(task_id)
                unlinked = self._unlinked
                if not isinstance(unlinked, list):
                    unlinked = self._unlinked = []
                unlinked += (time.time(), CHARGE, entry.head, task_id)
                if isinstance(charged, frozenset):  # the node's first charge
                    charged = self._charged = set()
                charged.add(task_id)
            cache = self._cache
            if then is not None and cache is not None:
                then(cache)

    def _link(self, action: str, text: str, ts: float) -> AuditEntry:
        prev = self._entries[-1].hash if self._entries else GENESIS
        seq = (self._entries[-1].seq if self._entries else 0) + 1
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

    def _append(self, action: str, detail: Mapping[str, Any]) -> None:
        """Where every entry goes (a subclass may keep them elsewhere)."""
        task_id = detail.get("task_id") if action == CHARGE else None
        self._write(action, canonical(detail), task_id if isinstance(task_id, str) else None)

    def _write(self, action: str, text: str, task_id: str | None) -> None:
        # ``text`` is the entry's JSON, made by the caller: a detail that cannot be stored
        # fails the call, not a later read. ``task_id``: a charge's, unique in a state file.
        unlinked = self._unlinked
        if not isinstance(unlinked, list):
            unlinked = self._unlinked = []
        unlinked += (time.time(), action, text, None)

    def close(self) -> None:
        """Release the file (nothing to do in memory)."""

    def __repr__(self) -> str:
        count = len(self._entries) + len(self._unlinked) // 4
        return f"<{type(self).__name__} {self.node_id!r}: {count} entries>"


def _replayed(task_id: str) -> ReleaseRefused:
    return ReleaseRefused(
        f"request {task_id!r} was charged to this node's privacy ledger already; the node "
        "does not run a charged request twice (a replay would spend the budget again or give "
        "a second noisy sample)"
    )


def _as_charge(charge: Mapping[str, Any] | Charge) -> Charge:
    return charge if isinstance(charge, Charge) else Charge.of(charge)


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
    # The newest entry per node, sealed: mac = HMAC(key, node, seq, hash) with the key kept
    # outside this file, so neither cutting the tail nor lowering seq passes unseen.
    """CREATE TABLE IF NOT EXISTS heads (
        node TEXT PRIMARY KEY,
        seq  INTEGER NOT NULL,
        hash TEXT NOT NULL DEFAULT '',
        mac  TEXT NOT NULL DEFAULT ''
    )""",
)
_TRIGGERS = ("audit_no_update", "audit_no_delete")


class NodeStateFile:
    """A SQLite file holding the state of one deployed node, or of every simulated node.

    ``owner`` names whose state it is (a node's key fingerprint, or ``"simulation"``); a
    file written for another owner, a corrupted file, or one whose chain or seal is broken
    is refused with NodeStateError, never reset. ``key_path`` is the audit key sealing each
    chain's head (default: ``PATH.audit-key``, created with the file; keep it elsewhere for
    protection against whoever can write the file's directory).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        owner: str | None,
        key_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.owner = owner  # None: inspect the file (`shoal audit`), whoever's it is
        self.key_path = Path(key_path) if key_path is not None else key_path_for(path)
        self._key: bytes | None = None  # None when only inspecting: no writes
        self._inspect_key: bytes | None = None
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
            try:  # inspecting: the caller verifies and reports (a missing key among it)
                self._inspect_key = load_key(self.key_path, create=False)
            except (ConfigError, OSError):
                self._inspect_key = None
            return
        if meta.get("owner") != self.owner:
            raise self._refuse(
                f"belongs to {meta.get('owner')!r}, not to this node ({self.owner!r})"
            )
        columns = {r[1] for r in conn.execute("PRAGMA table_info(heads)")}
        if "mac" not in columns:  # written before heads were sealed: check, then seal
            self._key = self._load_key(create=True)
            report = self.verify()
            if report.problems and any("sealed head" not in p for p in report.problems):
                raise self._refuse("has a broken audit chain: " + "; ".join(report.problems[:3]))
            self._seal_old_heads()
        else:
            sealed = conn.execute("SELECT count(*) FROM heads WHERE mac != ''").fetchone()[0]
            entries = conn.execute("SELECT count(*) FROM audit").fetchone()[0]
            # A new key only for a file that has never been sealed nor written.
            self._key = self._load_key(create=not sealed and not entries)
            if self._key is None:
                raise self._refuse(
                    f"is sealed with an audit key that is missing ({str(self.key_path)!r})"
                )
        report = self.verify()
        if not report.ok:
            raise self._refuse("has a broken audit chain: " + "; ".join(report.problems[:3]))

    def _load_key(self, *, create: bool) -> bytes | None:
        try:
            return load_key(self.key_path, create=create)
        except (ConfigError, OSError) as exc:
            raise self._refuse(f"cannot use its audit key: {exc}") from None

    def _seal_old_heads(self) -> None:
        conn = self._conn
        assert self._key is not None
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute("ALTER TABLE heads ADD COLUMN hash TEXT NOT NULL DEFAULT ''")
            conn.execute("ALTER TABLE heads ADD COLUMN mac TEXT NOT NULL DEFAULT ''")
            for node, seq in conn.execute("SELECT node, seq FROM heads").fetchall():
                row = conn.execute(
                    "SELECT hash FROM audit WHERE node=? AND seq=?", (node, seq)
                ).fetchone()
                head = row[0] if row else GENESIS
                conn.execute(
                    "UPDATE heads SET hash=?, mac=? WHERE node=?",
                    (head, seal(self._key, node, seq, head), node),
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

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

    def _heads(self) -> dict[str, tuple[int, str, str]]:
        columns = {r[1] for r in self._conn.execute("PRAGMA table_info(heads)")}
        if "mac" not in columns:  # an old file, opened only to inspect it
            rows = self._conn.execute("SELECT node, seq FROM heads").fetchall()
            return {node: (seq, "", "") for node, seq in rows}
        rows = self._conn.execute("SELECT node, seq, hash, mac FROM heads").fetchall()
        return {node: (seq, digest, mac) for node, seq, digest, mac in rows}

    def verify(self, *, anchor: Anchor | None = None) -> ChainReport:
        """Check every node's chain in the file, its sealed head, and (given) that it still
        holds every head of ``anchor``; one report for all of them."""
        with self._lock:
            heads = self._heads()
            nodes = set(heads) | {
                r[0] for r in self._conn.execute("SELECT DISTINCT node FROM audit")
            }
            triggers = {
                r[0]
                for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")
            }
        problems: list[str] = []
        missing = [t for t in _TRIGGERS if t not in triggers]
        if missing:
            problems.append(f"the append-only trigger(s) {missing} were dropped")
        anchored = dict(anchor.heads) if anchor is not None else {}
        for node in sorted(set(anchored) - nodes):
            problems.append(f"chain {node!r} of the anchor is gone from the file")
        total, head, last = 0, GENESIS, 0
        for node in sorted(nodes):
            sealed = heads.get(node)
            report = verify_chain(
                self.read(node),
                expected_last_seq=sealed[0] if sealed else 0,
                anchor=anchored.get(node),
            )
            total += report.entries
            head, last = report.head, report.last_seq
            label = f"node {node!r}: " if node else ""
            problems.extend(label + p for p in report.problems)
            found = seal_problems(
                self._key or self._inspect_key,
                scope=node,
                report=report,
                sealed=sealed,
                key_path=self.key_path,
            )
            problems.extend(label + p for p in found)
        return ChainReport(entries=total, head=head, problems=tuple(problems), last_seq=last)

    def anchor(self) -> Anchor:
        """Every chain's head, to export (``shoal audit anchor``); only of an intact file."""
        report = self.verify()
        if not report.ok:
            raise NodeStateError(
                f"node state {str(self.path)!r} fails verification, so it is not anchored: "
                + "; ".join(report.problems[:3])
            )
        with self._lock:
            heads = self._heads()
        return Anchor(
            source=f"node-state:{self.owner or ''}",
            heads={node: (seq, digest) for node, (seq, digest, _) in heads.items()},
        )

    def state(self, node_id: str = "") -> NodeState:
        """The state of ``node_id`` ("" for the file of a deployed node), loaded once."""
        with self._lock:
            found = self._states.get(node_id)
            if found is None:
                found = _FileNodeState(file=self, node_id=node_id)
                self._states[node_id] = found
            return found

    def _insert(self, node: str, entry: AuditEntry, task_id: str | None) -> None:
        if self._key is None:
            raise NodeStateError(
                f"node state {str(self.path)!r} was opened to inspect it; it takes no new entries"
            )
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
                    "INSERT INTO heads (node, seq, hash, mac) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (node) DO UPDATE SET seq=excluded.seq, hash=excluded.hash, "
                    "mac=excluded.mac",
                    (node, entry.seq, entry.hash, seal(self._key, node, entry.seq, entry.hash)),
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

    def _write(self, action: str, text: str, task_id: str | None) -> None:
        entry = self._link(action, text, time.time())
        self._file._insert(self.node_id, entry, task_id)
        self._linked().append(entry)  # only once it is on disk

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


def durable_table(path: Path, create: str, *, what: str) -> sqlite3.Connection:
    """A connection to the SQLite file ``path`` (WAL, ``synchronous=FULL``: a commit is on
    disk when it returns), with the table of the ``create`` statement made if missing.
    Shareable across threads (the caller locks). NodeStateError names ``what`` on failure."""
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30.0)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(create)
    except sqlite3.Error as exc:
        raise NodeStateError(f"cannot keep {what} in {str(path)!r}: {exc}") from None
    return conn
