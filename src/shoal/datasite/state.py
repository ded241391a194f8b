"""A datasite's durable state: one SQLite file (WAL) with users, datasets, requests, jobs,
results, per-scientist privacy ledgers and a hash-chained audit trail.

Tokens are stored only as SHA-256 digests (they are 256-bit random, so a fast hash is the
right one). The audit chain is the coordinator's (``shoal.runtime.audit``); triggers forbid
editing or deleting its rows. ``verify`` finds an edit made around them that did not also
recompute the hashes after it; a rewrite that did (anyone with the file can: the chain has no
key) is found only against an *anchor*, a head (seq, hash) exported earlier and kept where
the file's writers cannot reach (``shoal datasite audit head``).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from shoal.errors import AuthenticationError, ConfigError, StoreError
from shoal.runtime.audit import (
    GENESIS,
    Anchor,
    AuditEntry,
    ChainReport,
    canonical,
    entry_hash,
    one_head,
    verify_chain,
)

__all__ = [
    "ROLES",
    "STATES",
    "DatasiteState",
    "hash_token",
    "new_token",
    "request_hash",
]

ROLES = ("owner", "scientist", "guest")
# a request's lifecycle (docs/datasite.md draws it)
STATES = (
    "submitted",
    "mock-run",
    "approved",
    "denied",
    "queued",
    "running",
    "succeeded",
    "failed",
    "timeout",
    "out-of-memory",
    "released",
    "withheld",
)
DB_NAME = "datasite.db"
TRIGGERS = ("audit_no_update", "audit_no_delete")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS users (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS datasets (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL,
    path TEXT NOT NULL,
    format TEXT NOT NULL,
    source_table TEXT,
    schema TEXT NOT NULL,
    dp TEXT NOT NULL,
    mock BLOB NOT NULL,
    mock_origin TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user_id INTEGER NOT NULL REFERENCES users(id),
    name TEXT NOT NULL,
    source TEXT NOT NULL,
    entrypoint TEXT NOT NULL,
    assets TEXT NOT NULL,
    params TEXT NOT NULL,
    policy TEXT NOT NULL,
    code_hash TEXT NOT NULL,
    approved_hash TEXT,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    plan TEXT,
    federation TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id INTEGER NOT NULL REFERENCES requests(id),
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    logs TEXT NOT NULL DEFAULT '',
    pid INTEGER,
    isolated INTEGER,
    seconds REAL,
    created REAL NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS results (
    request_id INTEGER NOT NULL REFERENCES requests(id),
    kind TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL,
    PRIMARY KEY (request_id, kind)
);
CREATE TABLE IF NOT EXISTS ledgers (
    user_id INTEGER NOT NULL REFERENCES users(id),
    dataset TEXT NOT NULL REFERENCES datasets(name),
    budget TEXT NOT NULL,
    PRIMARY KEY (user_id, dataset)
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    prev TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""


def new_token() -> str:
    """A fresh bearer token: 256 bits from the OS."""
    return "sds_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def request_hash(
    *,
    source: str,
    entrypoint: str,
    assets: list[str],
    params: Mapping[str, Any],
    policy: Mapping[str, Any],
) -> str:
    """The SHA-256 that binds an approval to exactly this code, these assets and parameters."""
    text = canonical(
        {
            "source": source,
            "entrypoint": entrypoint,
            "assets": sorted(assets),
            "params": dict(params),
            "policy": dict(policy),
        }
    )
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _detail(text: str) -> Any:
    # an entry edited into bad JSON is still listed (and fails its hash), not a crash
    try:
        return json.loads(text)
    except ValueError:
        return {"unreadable": text[:200]}


class DatasiteState:
    """The state file of one datasite. Thread-safe: one connection, one lock."""

    def __init__(self, directory: str | os.PathLike[str], *, create: bool = False) -> None:
        self.directory = Path(directory)
        path = self.directory / DB_NAME
        if not path.exists() and not create:
            raise ConfigError(
                f"{str(self.directory)!r} is not a datasite directory (no {DB_NAME}); "
                "create one with `shoal datasite init DIR`"
            )
        if create:
            self.directory.mkdir(parents=True, exist_ok=True)
            os.chmod(self.directory, 0o700)
        self.path = path
        self._lock = threading.RLock()
        try:
            self._conn = sqlite3.connect(
                str(path), check_same_thread=False, isolation_level=None, timeout=30
            )
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            # opening puts dropped triggers back (the schema script): note first that they
            # were gone, for verify to report
            self._dropped = self._missing_triggers() if self._has_audit() else []
            self._conn.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open the datasite state {str(path)!r}: {exc}") from None
        os.chmod(path, 0o600)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @property
    def name(self) -> str:
        """The site's name in federations (``init --name``; the directory's name by default)."""
        row = self.one("SELECT value FROM meta WHERE key='name'")
        return str(row["value"]) if row else self.directory.resolve().name

    def set_name(self, name: str) -> None:
        with self.tx() as conn:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('name', ?)", (name,))

    def __enter__(self) -> DatasiteState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (BEGIN IMMEDIATE): everything in it lands, or nothing."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            cursor = self._conn.execute(sql, args)
            cursor.row_factory = sqlite3.Row
            return list(cursor.fetchall())

    def one(self, sql: str, args: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        rows = self.query(sql, args)
        return rows[0] if rows else None

    # -- users ------------------------------------------------------------------------------

    def add_user(self, name: str, role: str, *, actor: str) -> str:
        """Add a user; returns their token, which is stored only hashed (shown once)."""
        if role not in ROLES:
            raise ConfigError(f"role must be one of {list(ROLES)}, got {role!r}")
        if not isinstance(name, str) or not name.strip() or len(name) > 64:
            raise ConfigError("a user name is 1 to 64 characters")
        token = new_token()
        with self.tx() as conn:
            if conn.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone():
                raise ConfigError(f"a user named {name!r} exists already")
            conn.execute(
                "INSERT INTO users (name, role, token_hash, created) VALUES (?, ?, ?, ?)",
                (name, role, hash_token(token), time.time()),
            )
            self._audit(conn, actor, "user.add", {"name": name, "role": role})
        return token

    def user_for(self, token: str) -> sqlite3.Row:
        row = self.one("SELECT id, name, role FROM users WHERE token_hash=?", (hash_token(token),))
        if row is None:
            raise AuthenticationError("unknown token; ask the datasite's owner for one")
        return row

    # -- audit -------------------------------------------------------------------------------

    def _audit(
        self, conn: sqlite3.Connection, actor: str, action: str, detail: Mapping[str, Any]
    ) -> None:
        text = canonical(detail)
        last = conn.execute("SELECT seq FROM sqlite_sequence WHERE name='audit'").fetchone()
        seq = (int(last[0]) if last else 0) + 1
        head = conn.execute("SELECT hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        prev = head[0] if head else GENESIS
        now = time.time()
        conn.execute(
            "INSERT INTO audit (seq, ts, actor, action, detail, prev, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (seq, now, actor, action, text, prev, entry_hash(prev, seq, now, actor, action, text)),
        )

    def audit(self, actor: str, action: str, detail: Mapping[str, Any]) -> None:
        with self.tx() as conn:
            self._audit(conn, actor, action, detail)

    def audit_entries(self, limit: int | None = None) -> list[AuditEntry]:
        sql = "SELECT seq, ts, actor, action, detail, prev, hash FROM audit ORDER BY seq"
        rows = self.query(sql)
        if limit is not None:
            rows = rows[-limit:]
        return [
            AuditEntry(
                seq=int(r["seq"]),
                ts=float(r["ts"]),
                actor=str(r["actor"]),
                action=str(r["action"]),
                detail=_detail(str(r["detail"])),
                prev=str(r["prev"]),
                hash=str(r["hash"]),
                detail_text=str(r["detail"]),
            )
            for r in rows
        ]

    def _has_audit(self) -> bool:
        sql = "SELECT 1 FROM sqlite_master WHERE type='table' AND name='audit'"
        return self._conn.execute(sql).fetchone() is not None

    def _missing_triggers(self) -> list[str]:
        sql = "SELECT name FROM sqlite_master WHERE type='trigger'"
        present = {r[0] for r in self._conn.execute(sql)}
        return [t for t in TRIGGERS if t not in present]

    def verify(self, *, anchor: Anchor | None = None) -> ChainReport:
        """Check every link of the chain, that no entry was cut from its end (as far as the
        file's own sequence counter says), that the append-only triggers are in place (or
        were, when this file was opened), and (given) that it still holds ``anchor``'s head
        unchanged: the one check a rewrite with recomputed hashes cannot pass."""
        with self._lock:
            last = self.one("SELECT seq FROM sqlite_sequence WHERE name='audit'")
            entries = self.audit_entries()
            missing = sorted(set(self._dropped) | set(self._missing_triggers()))
        report = verify_chain(
            entries,
            expected_last_seq=int(last[0]) if last else 0,
            anchor=one_head(anchor, of="a datasite"),
        )
        if not missing:
            return report
        dropped = f"the append-only trigger(s) {missing} were dropped"
        return ChainReport(
            entries=report.entries,
            head=report.head,
            problems=(*report.problems, dropped),
            last_seq=report.last_seq,
        )

    def anchor(self) -> Anchor:
        """The chain's head, to keep elsewhere for a later ``verify(anchor=...)``; only of a
        chain that verifies."""
        report = self.verify()
        if not report.ok:
            raise StoreError(
                f"the audit chain of {str(self.path)!r} fails verification, so it is not "
                "anchored: " + "; ".join(report.problems[:3])
            )
        return Anchor(source=f"datasite:{self.name}", heads={"": (report.last_seq, report.head)})
