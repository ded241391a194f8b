"""The coordinator's durable state in one SQLite file: runs, rounds, metrics, participation,
checkpoints (NumPy ``.npz`` blobs, never pickle), the node registry and an append-only audit log.

A round is recorded in a single transaction with its checkpoint, so after a crash a run
resumes from ``load_checkpoint(run_id)``: the round it names is complete, and no later round
is half there.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import sqlite3
import threading
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from dataclasses import replace as replace_fields
from pathlib import Path
from typing import Any

import numpy as np

from shoal.errors import ConfigError, StoreError
from shoal.runtime.audit import (
    GENESIS,
    Anchor,
    AuditEntry,
    ChainReport,
    entry_hash,
    key_path_for,
    load_key,
    one_head,
    seal,
    seal_problems,
    verify_chain,
)
from shoal.runtime.store_schema import (
    APPLICATION_ID,
    MIGRATIONS,
    SCHEMA_STATEMENTS,
    SCHEMA_VERSION,
)

__all__ = [
    "PARTICIPANT_STATUSES",
    "ROUND_STATUSES",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "AuditRecord",
    "Checkpoint",
    "NodeRecord",
    "Participant",
    "RoundRecord",
    "RunRecord",
    "Store",
    "StoreTrail",
]

RUN_STATUSES = ("running", "finished", "failed", "interrupted")
ROUND_STATUSES = ("completed", "failed")
PARTICIPANT_STATUSES = ("ok", "dropped", "timeout", "error", "declined", "excluded")

_MAX_NAME = 256
_MAX_JSON_DEPTH = 64
# Participant details often carry a remote node's error message: untrusted and unbounded, so
# they are cut rather than allowed to fail (or bloat) the round they describe.
_MAX_DETAIL = 4000
_MEMORY = ":memory:"


@dataclass(frozen=True, kw_only=True)
class RunRecord:
    """One training or analytics run; ``summary`` is None until the run ends."""

    id: str
    name: str
    status: str
    created_at: float
    ended_at: float | None
    config: dict[str, Any]
    summary: dict[str, Any] | None


@dataclass(frozen=True, kw_only=True)
class RoundRecord:
    """One recorded round: its metrics and how many nodes ended in each participation status."""

    run_id: str
    round: int
    status: str
    started_at: float
    finished_at: float
    metrics: dict[str, Any]
    participants: dict[str, int]
    has_checkpoint: bool


@dataclass(frozen=True, kw_only=True)
class Participant:
    """What became of one node in one round."""

    node_id: str
    status: str
    detail: str = ""


@dataclass(frozen=True, kw_only=True)
class Checkpoint:
    """Server state saved after a round: named arrays plus a JSON dict of everything else."""

    run_id: str
    round: int
    arrays: dict[str, np.ndarray] = field(repr=False)
    state: dict[str, Any]
    created_at: float


@dataclass(frozen=True, kw_only=True)
class NodeRecord:
    """A node admitted to the federation, identified by its public key."""

    node_id: str
    public_key: bytes = field(repr=False)
    label: str
    added_at: float
    revoked: bool
    revoked_at: float | None


@dataclass(frozen=True, kw_only=True)
class AuditRecord:
    """One entry of the append-only audit log; ``seq`` increases with every entry."""

    seq: int
    ts: float
    run_id: str | None
    actor: str
    action: str
    detail: dict[str, Any]
    prev: str = field(default="", repr=False)
    hash: str = field(default="", repr=False)


class Store:
    """Durable coordinator state on SQLite (WAL journal, ``synchronous=FULL``).

    Safe to share between threads: one connection, serialized by a lock. Several processes may
    open the same file; writers wait up to ``timeout`` seconds for each other.

    JSON columns (config, summary, metrics, state, audit detail) take None, bool, int, float,
    str, lists/tuples and dicts with string keys; NumPy scalars are converted to Python ones.
    Non-finite floats (a diverged loss, an unbounded epsilon) are kept and read back exactly as
    NaN/inf, written with the ``NaN``/``Infinity`` tokens of Python's json module.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        timeout: float = 30.0,
        audit_key: str | os.PathLike[str] | None = None,
    ) -> None:
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = None
        self.path = path if path == _MEMORY else os.fspath(path)
        if not isinstance(self.path, str):
            raise StoreError(f"store path must be a str or os.PathLike, got {type(path).__name__}")
        # The key sealing the audit chain's head lives outside the database: a file beside
        # it unless ``audit_key`` names another (created with the first audit entry).
        self.audit_key_path: Path | None = (
            Path(audit_key)
            if audit_key is not None
            else None
            if self.path == _MEMORY
            else key_path_for(self.path)
        )
        self._key: bytes | None = os.urandom(32) if self.audit_key_path is None else None
        if self.path != _MEMORY:
            target = Path(self.path)
            if target.is_dir():
                raise StoreError(f"store path {self.path!r} is a directory; give a file path")
            if not target.parent.is_dir():
                raise StoreError(
                    f"cannot create store {self.path!r}: directory {str(target.parent)!r} "
                    "does not exist; create it first"
                )
        try:
            conn = sqlite3.connect(
                self.path, timeout=timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        try:
            self._open(conn)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    # -- lifecycle ---------------------------------------------------------------------------

    def _open(self, conn: sqlite3.Connection) -> None:
        try:
            # Read before writing anything: a file that is not SQLite fails here, untouched.
            tables = {
                row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")
            }
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            if (app_id not in (0, APPLICATION_ID)) or (tables and "meta" not in tables):
                raise StoreError(
                    f"{self.path!r} is an SQLite database but not a shoal store; "
                    "point shoal at a new file or an existing shoal store"
                )
            if "meta" in tables:
                self._check_version(conn)
            conn.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit is on disk when record_round returns, so a checkpoint survives a
            # crash of the process and of the machine; it costs one fsync per round.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            if "meta" not in tables:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    for statement in SCHEMA_STATEMENTS:
                        conn.execute(statement)
                    # Another process may have initialized the file since we looked.
                    conn.execute(
                        "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)",
                        (str(SCHEMA_VERSION),),
                    )
                    conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                self._check_version(conn)
        except sqlite3.Error as exc:
            raise self._error(exc) from exc

    def _check_version(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        try:
            version = int(row[0]) if row is not None else None
        except ValueError:
            version = None
        if version is None:
            raise StoreError(
                f"store {self.path!r} has no valid schema version; it is damaged or was not "
                "written by shoal; restore it from a backup or use a new file"
            )
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"store {self.path!r} has schema version {version}, newer than the "
                f"{SCHEMA_VERSION} this shoal understands; upgrade shoal to open it"
            )
        while version < SCHEMA_VERSION:
            self._migrate(conn, version)
            version += 1

    def _migrate(self, conn: sqlite3.Connection, version: int) -> None:
        """Bring a store of ``version`` to the next version, in one transaction."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            if version == 2:  # seal the head of the chain already there
                last = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1")
                head = last.fetchone()
                if head is not None:
                    key = self._audit_key(create=True)
                    assert key is not None
                    conn.execute(
                        "INSERT OR REPLACE INTO audit_seal (id, seq, hash, mac) "
                        "VALUES (1, ?, ?, ?)",
                        (head[0], head[1], seal(key, "", head[0], head[1])),
                    )
            if version == 1:  # link the entries already there into a chain
                conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
                prev = GENESIS
                rows = conn.execute(
                    "SELECT seq, ts, run_id, actor, action, detail FROM audit ORDER BY seq"
                ).fetchall()
                for seq, ts, run_id, actor, action, detail in rows:
                    digest = entry_hash(prev, seq, ts, actor, action, detail, run_id)
                    conn.execute("UPDATE audit SET prev=?, hash=? WHERE seq=?", (prev, digest, seq))
                    prev = digest
                for statement in SCHEMA_STATEMENTS:  # the trigger again
                    if "audit_no_update" in statement:
                        conn.execute(statement)
            conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version + 1),))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the database; further calls raise StoreError. Closing twice is harmless."""
        with self._lock:
            if self._conn is not None:
                conn, self._conn = self._conn, None
                try:
                    conn.close()
                except sqlite3.Error as exc:
                    raise self._error(exc) from exc

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Store({self.path!r})"

    def _error(self, exc: sqlite3.Error) -> StoreError:
        text = str(exc)
        low = text.lower()
        if "not a database" in low or "malformed" in low or "corrupt" in low:
            return StoreError(
                f"store {self.path!r} is corrupt or not an SQLite file ({text}); "
                "restore it from a backup or point shoal at a new file"
            )
        if "locked" in low or "busy" in low:
            return StoreError(
                f"store {self.path!r} is locked by another process ({text}); "
                "stop the other coordinator or retry later"
            )
        if "unable to open" in low or "readonly" in low or "read-only" in low:
            return StoreError(
                f"cannot write store {self.path!r} ({text}); check that the file and its "
                "directory exist and are writable"
            )
        return StoreError(f"store {self.path!r}: database error: {text}")

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction under the lock; rolled back on any exception, sqlite errors wrapped."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StoreError(f"store {self.path!r} is closed; open a new Store")
            try:
                if conn.in_transaction:
                    # left open by an interrupt (Ctrl-C) that came before its handler below:
                    # whatever it held is unfinished, so it never counts
                    conn.execute("ROLLBACK")
                try:
                    # IMMEDIATE takes the write lock up front, so two writers queue on
                    # busy_timeout instead of deadlocking when both try to upgrade a read lock.
                    # BEGIN inside the try: an interrupt just after it still rolls back.
                    conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise self._error(exc) from exc

    def verify(self) -> None:
        """Check every page of the database (slow on big stores); StoreError if any is bad."""
        with self._tx(write=False) as conn:
            rows = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if rows != ["ok"]:
            problems = "; ".join(str(r) for r in rows[:5])
            raise StoreError(
                f"store {self.path!r} failed its integrity check ({problems}); "
                "restore it from a backup"
            )

    # -- runs --------------------------------------------------------------------------------

    def create_run(self, *, name: str, config: Mapping[str, Any]) -> str:
        """Start a run in status 'running' and return its id (time-sortable, unique)."""
        name = _text(name, "run name")
        config_json = _dumps_dict(config, "config")
        now = time.time()
        with self._tx(write=True) as conn:
            for _ in range(8):
                run_id = _new_run_id(now)
                if conn.execute("SELECT 1 FROM runs WHERE id=?", (run_id,)).fetchone() is None:
                    break
            else:  # pragma: no cover - 8 collisions of 24 random bits within one millisecond
                raise StoreError("could not pick an unused run id; retry")
            conn.execute(
                "INSERT INTO runs (id, name, status, created_at, config) "
                "VALUES (?, ?, 'running', ?, ?)",
                (run_id, name, now, config_json),
            )
        return run_id

    def get_run(self, run_id: str) -> RunRecord:
        with self._tx(write=False) as conn:
            return self._run(conn, run_id)

    def list_runs(self, limit: int = 50, *, status: str | None = None) -> list[RunRecord]:
        """The newest ``limit`` runs, newest first, optionally only those in ``status``."""
        limit = _positive(limit, "limit")
        if status is not None:
            _choice(status, RUN_STATUSES, "run status")
        sql = "SELECT * FROM runs"
        args: list[Any] = []
        if status is not None:
            sql += " WHERE status=?"
            args.append(status)
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        args.append(limit)
        with self._tx(write=False) as conn:
            return [_run_record(row) for row in conn.execute(sql, args)]

    def finish_run(
        self, run_id: str, *, status: str = "finished", summary: Mapping[str, Any] | None = None
    ) -> RunRecord:
        """End a running (or interrupted) run as 'finished', 'failed' or 'interrupted'."""
        _choice(status, ("finished", "failed", "interrupted"), "final run status")
        summary_json = _dumps_dict(summary if summary is not None else {}, "summary")
        with self._tx(write=True) as conn:
            run = self._run(conn, run_id)
            if run.status in ("finished", "failed"):
                raise StoreError(f"run {run_id!r} already ended as {run.status!r}")
            if status == "interrupted" and run.status != "running":
                raise StoreError(f"run {run_id!r} is {run.status!r}, not running")
            conn.execute(
                "UPDATE runs SET status=?, ended_at=?, summary=? WHERE id=?",
                (status, time.time(), summary_json, run_id),
            )
            return self._run(conn, run_id)

    def mark_interrupted(self, run_id: str | None = None) -> list[str]:
        """Mark runs left 'running' by a dead coordinator as 'interrupted'; return their ids.

        Call it when a coordinator starts, before resuming anything. With ``run_id``, only
        that run is marked (if it is running).
        """
        with self._tx(write=True) as conn:
            if run_id is None:
                ids = [r[0] for r in conn.execute("SELECT id FROM runs WHERE status='running'")]
            else:
                ids = [run_id] if self._run(conn, run_id).status == "running" else []
            now = time.time()
            conn.executemany(
                "UPDATE runs SET status='interrupted', ended_at=? WHERE id=?",
                [(now, i) for i in ids],
            )
        return ids

    def resume_run(self, run_id: str) -> RunRecord:
        """Set an interrupted or failed run back to 'running' so rounds can be recorded again."""
        with self._tx(write=True) as conn:
            run = self._run(conn, run_id)
            if run.status == "running":
                raise StoreError(
                    f"run {run_id!r} is already running (is another coordinator driving it?); "
                    "call mark_interrupted() first if its coordinator is gone"
                )
            if run.status == "finished":
                raise StoreError(f"run {run_id!r} has finished; start a new run instead")
            conn.execute(
                "UPDATE runs SET status='running', ended_at=NULL, summary=NULL WHERE id=?",
                (run_id,),
            )
            return self._run(conn, run_id)

    def _run(self, conn: sqlite3.Connection, run_id: str) -> RunRecord:
        row = conn.execute("SELECT * FROM runs WHERE id=?", (_text(run_id, "run id"),)).fetchone()
        if row is None:
            raise StoreError(f"no run {run_id!r} in store {self.path!r}; see list_runs()")
        return _run_record(row)

    # -- rounds ------------------------------------------------------------------------------

    def record_round(
        self,
        run_id: str,
        round_num: int,
        *,
        metrics: Mapping[str, Any],
        participants: Mapping[str, str] | Sequence[str],
        details: Mapping[str, str] | None = None,
        node_metrics: Mapping[str, Mapping[str, Any]] | None = None,
        checkpoint: Mapping[str, Any] | None = None,
        state: Mapping[str, Any] | None = None,
        status: str = "completed",
        started_at: float | None = None,
        replace: bool = False,
    ) -> RoundRecord:
        """Record a round and (optionally) its checkpoint, all in one transaction.

        ``participants`` maps node ids to a status in PARTICIPANT_STATUSES; a plain sequence
        of node ids means they all took part ('ok'). ``details`` and ``node_metrics`` are keyed
        by participating node id. A checkpoint (arrays and/or ``state``) is only allowed on a
        completed round. Recording a round number twice raises StoreError unless ``replace``.
        """
        round_num = _round(round_num)
        _choice(status, ROUND_STATUSES, "round status")
        people = _participants(participants)
        notes = {}
        for node_id, text in (details or {}).items():
            if node_id not in people:
                raise StoreError(
                    f"details[{node_id!r}]: node {node_id!r} is not among the round's participants"
                )
            if not isinstance(text, str):
                raise StoreError(
                    f"details[{node_id!r}] must be a string, got {type(text).__name__}"
                )
            notes[node_id] = text if len(text) <= _MAX_DETAIL else text[: _MAX_DETAIL - 1] + "…"
        metric_rows = _metric_rows(metrics, "metrics")
        node_rows: list[tuple[str, str, str]] = []
        for node_id, values in (node_metrics or {}).items():
            if node_id not in people:
                raise StoreError(
                    f"node_metrics[{node_id!r}]: node {node_id!r} is not among the participants"
                )
            node_rows.extend(
                (node_id, n, v) for n, v in _metric_rows(values, f"node_metrics[{node_id!r}]")
            )
        blob: bytes | None = None
        digest = state_json = ""
        if checkpoint is not None or state is not None:
            if status != "completed":
                raise StoreError("only a completed round can carry a checkpoint or state")
            blob = _encode_arrays(checkpoint if checkpoint is not None else {})
            digest = hashlib.sha256(blob).hexdigest()
            state_json = _dumps_dict(state if state is not None else {}, "state")
        finished_at = time.time()
        started = finished_at if started_at is None else float(started_at)

        # Everything above can fail on bad input without touching the database.
        with self._tx(write=True) as conn:
            run = self._run(conn, run_id)
            if run.status != "running":
                hint = (
                    "start a new run"
                    if run.status == "finished"
                    else f"call resume_run({run_id!r}) first"
                )
                raise StoreError(
                    f"run {run_id!r} is {run.status!r}; rounds can only be recorded on a "
                    f"running run ({hint})"
                )
            exists = conn.execute(
                "SELECT 1 FROM rounds WHERE run_id=? AND round=?", (run_id, round_num)
            ).fetchone()
            if exists is not None:
                if not replace:
                    raise StoreError(
                        f"round {round_num} of run {run_id!r} is already recorded; "
                        "pass replace=True to overwrite it"
                    )
                conn.execute("DELETE FROM rounds WHERE run_id=? AND round=?", (run_id, round_num))
            conn.execute(
                "INSERT INTO rounds (run_id, round, status, started_at, finished_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (run_id, round_num, status, started, finished_at),
            )
            conn.executemany(
                "INSERT INTO metrics (run_id, round, name, value) VALUES (?, ?, ?, ?)",
                [(run_id, round_num, n, v) for n, v in metric_rows],
            )
            conn.executemany(
                "INSERT INTO participants (run_id, round, node_id, status, detail) "
                "VALUES (?, ?, ?, ?, ?)",
                [(run_id, round_num, n, s, notes.get(n, "")) for n, s in people.items()],
            )
            conn.executemany(
                "INSERT INTO node_metrics (run_id, round, node_id, name, value) "
                "VALUES (?, ?, ?, ?, ?)",
                [(run_id, round_num, n, k, v) for n, k, v in node_rows],
            )
            if blob is not None:
                self._write_checkpoint(
                    conn, run_id, round_num, blob, digest, state_json, finished_at
                )
        counts: dict[str, int] = {}
        for s in people.values():
            counts[s] = counts.get(s, 0) + 1
        return RoundRecord(
            run_id=run_id,
            round=round_num,
            status=status,
            started_at=started,
            finished_at=finished_at,
            metrics={n: json.loads(v) for n, v in metric_rows},
            participants=counts,
            has_checkpoint=blob is not None,
        )

    def _write_checkpoint(
        self,
        conn: sqlite3.Connection,
        run_id: str,
        round_num: int,
        blob: bytes,
        digest: str,
        state_json: str,
        now: float,
    ) -> None:
        conn.execute(
            "INSERT INTO checkpoints (run_id, round, arrays, sha256, state, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (run_id, round_num, blob, digest, state_json, now),
        )

    def last_completed_round(self, run_id: str) -> int | None:
        """The highest round recorded as completed, or None if there is none yet."""
        with self._tx(write=False) as conn:
            self._run(conn, run_id)
            row = conn.execute(
                "SELECT MAX(round) FROM rounds WHERE run_id=? AND status='completed'", (run_id,)
            ).fetchone()
        return None if row[0] is None else int(row[0])

    def load_checkpoint(self, run_id: str, round_num: int | None = None) -> Checkpoint:
        """The checkpoint of ``round_num``, or the latest one when it is None."""
        with self._tx(write=False) as conn:
            self._run(conn, run_id)
            if round_num is None:
                row = conn.execute(
                    "SELECT round, arrays, sha256, state, created_at FROM checkpoints "
                    "WHERE run_id=? ORDER BY round DESC LIMIT 1",
                    (run_id,),
                ).fetchone()
                if row is None:
                    raise StoreError(
                        f"run {run_id!r} has no checkpoint yet; start it from its initial state"
                    )
            else:
                round_num = _round(round_num)
                row = conn.execute(
                    "SELECT round, arrays, sha256, state, created_at FROM checkpoints "
                    "WHERE run_id=? AND round=?",
                    (run_id, round_num),
                ).fetchone()
                if row is None:
                    raise StoreError(
                        f"run {run_id!r} has no checkpoint for round {round_num} (never saved "
                        "or pruned); load_checkpoint(run_id) gives the latest"
                    )
        found, blob, digest, state_json, created_at = row
        where = f"checkpoint of run {run_id!r} round {found}"
        blob = bytes(blob)
        if hashlib.sha256(blob).hexdigest() != digest:
            raise StoreError(f"{where} does not match its checksum; the store is damaged")
        return Checkpoint(
            run_id=run_id,
            round=int(found),
            arrays=_decode_arrays(blob, where),
            state=json.loads(state_json),
            created_at=float(created_at),
        )

    def prune_checkpoints(self, run_id: str, *, keep: int) -> int:
        """Delete all but the newest ``keep`` checkpoints of a run; return how many went.

        Rounds, metrics and participation are kept. SQLite reuses the freed pages.
        """
        keep = _positive(keep, "keep")
        with self._tx(write=True) as conn:
            self._run(conn, run_id)
            cur = conn.execute(
                "DELETE FROM checkpoints WHERE run_id=? AND round NOT IN ("
                "SELECT round FROM checkpoints WHERE run_id=? ORDER BY round DESC LIMIT ?)",
                (run_id, run_id, keep),
            )
            return cur.rowcount

    def round_metrics(self, run_id: str) -> list[RoundRecord]:
        """Every recorded round of a run, in round order."""
        with self._tx(write=False) as conn:
            self._run(conn, run_id)
            rounds = conn.execute(
                "SELECT r.round, r.status, r.started_at, r.finished_at, c.round IS NOT NULL "
                "FROM rounds r LEFT JOIN checkpoints c ON c.run_id=r.run_id AND c.round=r.round "
                "WHERE r.run_id=? ORDER BY r.round",
                (run_id,),
            ).fetchall()
            metrics: dict[int, dict[str, Any]] = {r[0]: {} for r in rounds}
            for rnd, name, value in conn.execute(
                "SELECT round, name, value FROM metrics WHERE run_id=? ORDER BY rowid", (run_id,)
            ):
                metrics[rnd][name] = json.loads(value)
            counts: dict[int, dict[str, int]] = {r[0]: {} for r in rounds}
            for rnd, status, n in conn.execute(
                "SELECT round, status, COUNT(*) FROM participants WHERE run_id=? "
                "GROUP BY round, status",
                (run_id,),
            ):
                counts[rnd][status] = int(n)
        return [
            RoundRecord(
                run_id=run_id,
                round=int(rnd),
                status=status,
                started_at=float(started),
                finished_at=float(finished),
                metrics=metrics[rnd],
                participants=counts[rnd],
                has_checkpoint=bool(has_ckpt),
            )
            for rnd, status, started, finished, has_ckpt in rounds
        ]

    def metric_series(self, run_id: str, name: str) -> list[tuple[int, Any]]:
        """``(round, value)`` of one metric over the rounds that recorded it, in round order."""
        name = _text(name, "metric name")
        with self._tx(write=False) as conn:
            self._run(conn, run_id)
            rows = conn.execute(
                "SELECT round, value FROM metrics WHERE run_id=? AND name=? ORDER BY round",
                (run_id, name),
            ).fetchall()
        return [(int(r), json.loads(v)) for r, v in rows]

    def participation(self, run_id: str, round_num: int) -> list[Participant]:
        """Each node of a recorded round with its status and detail, sorted by node id."""
        with self._tx(write=False) as conn:
            self._round_exists(conn, run_id, round_num)
            rows = conn.execute(
                "SELECT node_id, status, detail FROM participants WHERE run_id=? AND round=? "
                "ORDER BY node_id",
                (run_id, round_num),
            ).fetchall()
        return [Participant(node_id=n, status=s, detail=d) for n, s, d in rows]

    def node_metrics(self, run_id: str, round_num: int) -> dict[str, dict[str, Any]]:
        """Per-node metrics of a recorded round: node id -> metric name -> value."""
        out: dict[str, dict[str, Any]] = {}
        with self._tx(write=False) as conn:
            self._round_exists(conn, run_id, round_num)
            for node_id, name, value in conn.execute(
                "SELECT node_id, name, value FROM node_metrics WHERE run_id=? AND round=? "
                "ORDER BY node_id, rowid",
                (run_id, round_num),
            ):
                out.setdefault(node_id, {})[name] = json.loads(value)
        return out

    def _round_exists(self, conn: sqlite3.Connection, run_id: str, round_num: int) -> None:
        self._run(conn, run_id)
        round_num = _round(round_num)
        row = conn.execute(
            "SELECT 1 FROM rounds WHERE run_id=? AND round=?", (run_id, round_num)
        ).fetchone()
        if row is None:
            raise StoreError(f"run {run_id!r} has no recorded round {round_num}")

    # -- node registry -----------------------------------------------------------------------

    def add_node(
        self, *, node_id: str, public_key: bytes | bytearray | memoryview, label: str = ""
    ) -> NodeRecord:
        """Admit a node; its id and its public key must both be new to the registry."""
        node_id = _text(node_id, "node id")
        if not isinstance(public_key, (bytes, bytearray, memoryview)):
            raise StoreError(f"public_key must be bytes, got {type(public_key).__name__}")
        key = bytes(public_key)
        if not key:
            raise StoreError("public_key must not be empty")
        label = _text(label, "label", allow_empty=True)
        with self._tx(write=True) as conn:
            row = conn.execute("SELECT revoked FROM nodes WHERE node_id=?", (node_id,)).fetchone()
            if row is not None:
                extra = " (revoked; ids are never reused)" if row[0] else ""
                raise StoreError(f"node {node_id!r} is already registered{extra}; pick another id")
            row = conn.execute("SELECT node_id FROM nodes WHERE public_key=?", (key,)).fetchone()
            if row is not None:
                # One key, one identity: otherwise a party could count twice in a round.
                raise StoreError(
                    f"this public key is already registered to node {row[0]!r}; "
                    "each node needs its own key pair"
                )
            conn.execute(
                "INSERT INTO nodes (node_id, public_key, label, added_at) VALUES (?, ?, ?, ?)",
                (node_id, key, label, time.time()),
            )
            return self._node(conn, node_id)

    def revoke_node(self, node_id: str) -> NodeRecord:
        """Revoke a node for good; revoking it again changes nothing."""
        with self._tx(write=True) as conn:
            self._node(conn, node_id)
            conn.execute(
                "UPDATE nodes SET revoked=1, revoked_at=? WHERE node_id=? AND revoked=0",
                (time.time(), node_id),
            )
            return self._node(conn, node_id)

    def get_node(self, node_id: str) -> NodeRecord:
        with self._tx(write=False) as conn:
            return self._node(conn, node_id)

    def list_nodes(self, *, include_revoked: bool = True) -> list[NodeRecord]:
        """Registered nodes sorted by id."""
        sql = "SELECT * FROM nodes"
        if not include_revoked:
            sql += " WHERE revoked=0"
        with self._tx(write=False) as conn:
            return [_node_record(row) for row in conn.execute(sql + " ORDER BY node_id")]

    def _node(self, conn: sqlite3.Connection, node_id: str) -> NodeRecord:
        node_id = _text(node_id, "node id")
        row = conn.execute("SELECT * FROM nodes WHERE node_id=?", (node_id,)).fetchone()
        if row is None:
            raise StoreError(f"no node {node_id!r} is registered; add it with add_node()")
        return _node_record(row)

    # -- audit log ---------------------------------------------------------------------------

    def audit(
        self,
        *,
        actor: str,
        action: str,
        detail: Mapping[str, Any] | None = None,
        run_id: str | None = None,
    ) -> AuditRecord:
        """Append an entry to the audit log (never changed or removed; each entry holds the
        hash of the one before, so `shoal audit verify --store` finds any tampering)."""
        actor = _text(actor, "actor")
        action = _text(action, "action")
        detail_json = _dumps_dict(detail if detail is not None else {}, "detail")
        now = time.time()
        with self._tx(write=True) as conn:
            if run_id is not None:
                self._run(conn, run_id)
            # Inside the write transaction: another process appending waits, so the chain
            # never forks.
            last = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='audit'").fetchone()
            seq = (int(last[0]) if last else 0) + 1
            head = conn.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            prev = head[0] if head else GENESIS
            sealed = conn.execute("SELECT seq, hash FROM audit_seal WHERE id=1").fetchone()
            if sealed is None and head is not None:
                raise StoreError(
                    f"the audit chain of store {self.path!r} has lost its sealed head; it was "
                    "tampered with: run `shoal audit verify --store` and restore a backup"
                )
            if sealed is not None and (sealed[0], sealed[1]) != (seq - 1, prev):
                raise StoreError(
                    f"the audit chain of store {self.path!r} does not end at its sealed head "
                    "(entries removed or added behind its back): run `shoal audit verify "
                    "--store` and restore a backup"
                )
            key = self._audit_key(create=sealed is None)
            if key is None:
                raise StoreError(
                    f"the audit key of store {self.path!r} is missing "
                    f"({str(self.audit_key_path)!r}); restore it: without it the chain can "
                    "be neither extended nor checked"
                )
            digest = entry_hash(prev, seq, now, actor, action, detail_json, run_id)
            conn.execute(
                "INSERT INTO audit (seq, ts, run_id, actor, action, detail, prev, hash) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, now, run_id, actor, action, detail_json, prev, digest),
            )
            conn.execute(
                "INSERT INTO audit_seal (id, seq, hash, mac) VALUES (1, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET seq=excluded.seq, hash=excluded.hash, "
                "mac=excluded.mac",
                (seq, digest, seal(key, "", seq, digest)),
            )
        return AuditRecord(
            seq=seq,
            ts=now,
            run_id=run_id,
            actor=actor,
            action=action,
            detail=json.loads(detail_json),
            prev=prev,
            hash=digest,
        )

    def audit_log(self, run_id: str | None = None, *, limit: int = 100) -> list[AuditRecord]:
        """The newest ``limit`` entries (of one run, or all), returned oldest first."""
        limit = _positive(limit, "limit")
        columns = "seq, ts, run_id, actor, action, detail, prev, hash"
        with self._tx(write=False) as conn:
            if run_id is None:
                rows = conn.execute(
                    f"SELECT {columns} FROM audit ORDER BY seq DESC LIMIT ?", (limit,)
                ).fetchall()
            else:
                self._run(conn, run_id)
                rows = conn.execute(
                    f"SELECT {columns} FROM audit WHERE run_id=? ORDER BY seq DESC LIMIT ?",
                    (run_id, limit),
                ).fetchall()
        return [
            AuditRecord(
                seq=int(seq),
                ts=float(ts),
                run_id=rid,
                actor=actor,
                action=action,
                detail=json.loads(detail),
                prev=prev,
                hash=digest,
            )
            for seq, ts, rid, actor, action, detail, prev, digest in reversed(rows)
        ]

    def audit_trail(self, run_id: str | None = None, *, actor: str = "coordinator") -> StoreTrail:
        """This store's audit chain as a Federation's trail (``Federation(audit=...)``)."""
        return StoreTrail(store=self, run_id=run_id, actor=actor)

    def _audit_key(self, *, create: bool) -> bytes | None:
        if self._key is None and self.audit_key_path is not None:
            try:
                self._key = load_key(self.audit_key_path, create=create)
            except (ConfigError, OSError) as exc:
                raise StoreError(
                    f"cannot use the audit key of store {self.path!r}: {exc}"
                ) from None
        return self._key

    def verify_audit(self, *, anchor: Anchor | None = None) -> ChainReport:
        """Check the whole audit chain: edited, removed or reordered entries, a sealed head
        that does not match it (or a missing key), dropped triggers, and (given) an
        ``anchor`` exported earlier that the chain no longer holds, are all reported."""
        with self._tx(write=False) as conn:
            rows = conn.execute(
                "SELECT seq, ts, run_id, actor, action, detail, prev, hash FROM audit ORDER BY seq"
            ).fetchall()
            last = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='audit'").fetchone()
            sealed = conn.execute("SELECT seq, hash, mac FROM audit_seal WHERE id=1").fetchone()
            triggers = {
                r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='trigger'")
            }
        entries = (
            AuditEntry(
                seq=int(seq),
                ts=float(ts),
                run_id=rid,
                actor=str(actor),
                action=str(action),
                detail={},
                prev=str(prev),
                hash=str(digest),
                detail_text=str(detail),
            )
            for seq, ts, rid, actor, action, detail, prev, digest in rows
        )
        report = verify_chain(
            entries,
            expected_last_seq=int(last[0]) if last else 0,
            anchor=one_head(anchor, of="a store"),
        )
        problems = list(report.problems)
        missing = [t for t in ("audit_no_update", "audit_no_delete") if t not in triggers]
        if missing:
            problems.append(f"the append-only trigger(s) {missing} were dropped")
        problems += seal_problems(
            self._audit_key(create=False),
            scope="",
            report=report,
            sealed=None if sealed is None else (int(sealed[0]), str(sealed[1]), str(sealed[2])),
            key_path=self.audit_key_path or ":memory:",
        )
        return replace_fields(report, problems=tuple(problems))

    def audit_anchor(self) -> Anchor:
        """The chain's head, to export (``shoal audit anchor``); only of an intact chain."""
        report = self.verify_audit()
        if not report.ok:
            raise StoreError(
                f"the audit chain of store {self.path!r} fails verification, so it is not "
                "anchored: " + "; ".join(report.problems[:3])
            )
        return Anchor(source="store", heads={"": (report.last_seq, report.head)})


class StoreTrail:
    """A Federation's audit trail written to the Store: one chain with everything else."""

    def __init__(self, *, store: Store, run_id: str | None, actor: str) -> None:
        self.store = store
        self.run_id = run_id
        self.actor = actor

    def record(self, action: str, detail: Mapping[str, Any]) -> AuditEntry:
        record = self.store.audit(
            actor=self.actor, action=action, detail=detail, run_id=self.run_id
        )
        return _entry_of(record)

    @property
    def entries(self) -> Sequence[AuditEntry]:
        records = self.store.audit_log(self.run_id, limit=1_000_000)
        return tuple(_entry_of(r) for r in records)


def _entry_of(record: AuditRecord) -> AuditEntry:
    return AuditEntry(
        seq=record.seq,
        ts=record.ts,
        actor=record.actor,
        action=record.action,
        detail=record.detail,
        prev=record.prev,
        hash=record.hash,
        run_id=record.run_id,
    )


# -- rows to records ---------------------------------------------------------------------------


def _run_record(row: Sequence[Any]) -> RunRecord:
    run_id, name, status, created_at, ended_at, config, summary = row
    return RunRecord(
        id=run_id,
        name=name,
        status=status,
        created_at=float(created_at),
        ended_at=None if ended_at is None else float(ended_at),
        config=json.loads(config),
        summary=None if summary is None else json.loads(summary),
    )


def _node_record(row: Sequence[Any]) -> NodeRecord:
    node_id, key, label, added_at, revoked, revoked_at = row
    return NodeRecord(
        node_id=node_id,
        public_key=bytes(key),
        label=label,
        added_at=float(added_at),
        revoked=bool(revoked),
        revoked_at=None if revoked_at is None else float(revoked_at),
    )


# -- validation and encoding -------------------------------------------------------------------


def _new_run_id(now: float) -> str:
    """``YYYYmmdd-HHMMSSmmm-xxxxxx`` (UTC): sorts by creation time, random suffix for uniqueness."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return f"{stamp}{int(now * 1000) % 1000:03d}-{secrets.token_hex(3)}"


def _text(value: object, what: str, *, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise StoreError(f"{what} must be a string, got {type(value).__name__}")
    if not value and not allow_empty:
        raise StoreError(f"{what} must not be empty")
    if len(value) > _MAX_NAME:
        raise StoreError(f"{what} is {len(value)} characters long; the limit is {_MAX_NAME}")
    if "\x00" in value:
        raise StoreError(f"{what} {value!r} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise StoreError(f"{what} {value!r} is not valid Unicode text ({exc.reason})") from exc
    return str(value)


def _choice(value: object, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise StoreError(f"{what} {value!r} is not one of {', '.join(allowed)}")
    return str(value)


def _positive(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise StoreError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _round(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise StoreError(f"round number must be an integer >= 0, got {value!r}")
    return int(value)


def _participants(value: Mapping[str, str] | Sequence[str]) -> dict[str, str]:
    if isinstance(value, Mapping):
        out = {}
        for node_id, status in value.items():
            out[_text(node_id, "participant node id")] = _choice(
                status, PARTICIPANT_STATUSES, f"status of node {node_id!r}"
            )
        return out
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise StoreError(
            "participants must map node ids to statuses, or be a list of node ids, "
            f"got {type(value).__name__}"
        )
    out = {}
    for node_id in value:
        node_id = _text(node_id, "participant node id")
        if node_id in out:
            raise StoreError(f"node {node_id!r} is listed twice among the participants")
        out[node_id] = "ok"
    return out


def _metric_rows(metrics: Mapping[str, Any], where: str) -> list[tuple[str, str]]:
    if not isinstance(metrics, Mapping):
        raise StoreError(f"{where} must be a dict of name -> value, got {type(metrics).__name__}")
    return [
        (_text(name, f"{where} name"), _dumps(value, f"{where}[{name!r}]"))
        for name, value in metrics.items()
    ]


def _dumps_dict(value: Mapping[str, Any], where: str) -> str:
    if not isinstance(value, Mapping):
        raise StoreError(f"{where} must be a dict, got {type(value).__name__}")
    return _dumps(value, where)


def _dumps(value: Any, where: str) -> str:
    # ensure_ascii keeps any str Python accepts storable, whatever SQLite's text encoding.
    return json.dumps(_plain(value, where, 0), allow_nan=True, separators=(",", ":"))


def _plain(value: Any, where: str, depth: int) -> Any:
    """``value`` as plain JSON-able Python, or StoreError naming where the bad part sits."""
    if depth > _MAX_JSON_DEPTH:
        raise StoreError(f"{where} is nested more than {_MAX_JSON_DEPTH} levels deep (a cycle?)")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise StoreError(f"{where} is not valid Unicode text ({exc.reason})") from exc
        return str(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.ndarray) and value.ndim == 0:
        return _plain(value[()], where, depth + 1)
    if isinstance(value, np.ndarray):
        raise StoreError(
            f"{where} is an array of shape {value.shape}; convert it with .tolist() or store it "
            "as a checkpoint array"
        )
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise StoreError(
                    f"{where} has a key {key!r} of type {type(key).__name__}; JSON keys are strings"
                )
            out[_plain(key, f"{where} key {key!r}", depth + 1)] = _plain(
                item, f"{where}[{key!r}]", depth + 1
            )
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    raise StoreError(
        f"{where} has type {type(value).__name__}, which cannot be stored as JSON; use None, "
        "bool, int, float, str, lists and dicts with string keys"
    )


def _encode_arrays(arrays: Mapping[str, Any]) -> bytes:
    """Named arrays as ``.npz`` bytes; object arrays are refused (they would need pickle)."""
    if not isinstance(arrays, Mapping):
        raise StoreError(f"checkpoint must be a dict of name -> array, got {type(arrays).__name__}")
    if not arrays:
        # np.load does not recognize an empty zip archive, so no arrays is stored as no bytes.
        return b""
    buf = io.BytesIO()
    # Written member by member (the .npz layout np.savez produces) rather than through
    # np.savez(**arrays), whose own keyword arguments would clash with arrays named 'file'
    # or 'allow_pickle'. Stored, not deflated: model weights barely compress.
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for name, value in arrays.items():
            name = _text(name, "checkpoint array name")
            where = f"checkpoint[{name!r}]"
            if isinstance(value, (str, bytes)) or value is None:
                raise StoreError(f"{where} must be a NumPy array, got {type(value).__name__}")
            try:
                array = np.asarray(value)
            except (ValueError, TypeError) as exc:
                raise StoreError(f"{where} cannot be made a NumPy array: {exc}") from exc
            if array.dtype.hasobject:
                raise StoreError(
                    f"{where} has dtype {array.dtype}, which holds Python objects and would need "
                    "pickle; store numeric arrays and put other values in state"
                )
            with archive.open(name + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)
    return buf.getvalue()


def _decode_arrays(blob: bytes, where: str) -> dict[str, np.ndarray]:
    if not blob:
        return {}
    try:
        loaded = np.load(io.BytesIO(blob), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise StoreError(f"{where} cannot be decoded ({exc}); the store is damaged") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise StoreError(f"{where} is not an .npz archive; the store is damaged")
    out: dict[str, np.ndarray] = {}
    try:
        with loaded:
            for name in loaded.files:
                value = loaded[name]
                # NpzFile hands back raw bytes for members that are not .npy files.
                if not isinstance(value, np.ndarray):
                    raise StoreError(f"{where}: member {name!r} is not a NumPy array")
                out[name] = value
    except StoreError:
        raise
    except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile) as exc:
        # Object arrays end up here: np.load refuses them without allow_pickle.
        raise StoreError(f"{where} cannot be decoded safely ({exc})") from exc
    return out
