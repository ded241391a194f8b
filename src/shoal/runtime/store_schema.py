"""SQLite schema of the coordinator's Store, and its version.

Bump ``SCHEMA_VERSION`` and add a migration in ``store.py`` whenever a statement here changes;
a store written by a newer shoal is refused rather than misread.
"""

from __future__ import annotations

__all__ = ["APPLICATION_ID", "MIGRATIONS", "SCHEMA_STATEMENTS", "SCHEMA_VERSION"]

SCHEMA_VERSION = 3

# Stamped into the SQLite header (PRAGMA application_id) so `file` and shoal can tell a shoal
# store from some other SQLite database: the bytes spell "SHOL".
APPLICATION_ID = 0x53484F4C

# The audit chain's newest (seq, hash), sealed with an HMAC under a key kept outside the
# database (runtime/audit.py): rewriting the chain or cutting its tail with SQL shows.
AUDIT_SEAL = """CREATE TABLE IF NOT EXISTS audit_seal (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT NOT NULL,
    mac  TEXT NOT NULL
)"""

# No STRICT tables: they need SQLite >= 3.37, older than some Pythons still in support ship.
SCHEMA_STATEMENTS: tuple[str, ...] = (
    """CREATE TABLE IF NOT EXISTS meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS runs (
        id         TEXT PRIMARY KEY,
        name       TEXT NOT NULL,
        status     TEXT NOT NULL
                   CHECK (status IN ('running', 'finished', 'failed', 'interrupted')),
        created_at REAL NOT NULL,
        ended_at   REAL,
        config     TEXT NOT NULL,
        summary    TEXT
    )""",
    "CREATE INDEX IF NOT EXISTS runs_created ON runs (created_at)",
    """CREATE TABLE IF NOT EXISTS rounds (
        run_id      TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
        round       INTEGER NOT NULL CHECK (round >= 0),
        status      TEXT NOT NULL CHECK (status IN ('completed', 'failed')),
        started_at  REAL NOT NULL,
        finished_at REAL NOT NULL,
        PRIMARY KEY (run_id, round)
    )""",
    """CREATE TABLE IF NOT EXISTS metrics (
        run_id TEXT NOT NULL,
        round  INTEGER NOT NULL,
        name   TEXT NOT NULL,
        value  TEXT NOT NULL,
        PRIMARY KEY (run_id, round, name),
        FOREIGN KEY (run_id, round) REFERENCES rounds (run_id, round) ON DELETE CASCADE
    )""",
    "CREATE INDEX IF NOT EXISTS metrics_by_name ON metrics (run_id, name, round)",
    """CREATE TABLE IF NOT EXISTS node_metrics (
        run_id  TEXT NOT NULL,
        round   INTEGER NOT NULL,
        node_id TEXT NOT NULL,
        name    TEXT NOT NULL,
        value   TEXT NOT NULL,
        PRIMARY KEY (run_id, round, node_id, name),
        FOREIGN KEY (run_id, round) REFERENCES rounds (run_id, round) ON DELETE CASCADE
    )""",
    """CREATE TABLE IF NOT EXISTS participants (
        run_id  TEXT NOT NULL,
        round   INTEGER NOT NULL,
        node_id TEXT NOT NULL,
        status  TEXT NOT NULL CHECK (
            status IN ('ok', 'dropped', 'timeout', 'error', 'declined', 'excluded')),
        detail  TEXT NOT NULL DEFAULT '',
        PRIMARY KEY (run_id, round, node_id),
        FOREIGN KEY (run_id, round) REFERENCES rounds (run_id, round) ON DELETE CASCADE
    )""",
    """CREATE TABLE IF NOT EXISTS checkpoints (
        run_id     TEXT NOT NULL,
        round      INTEGER NOT NULL,
        arrays     BLOB NOT NULL,
        sha256     TEXT NOT NULL,
        state      TEXT NOT NULL,
        created_at REAL NOT NULL,
        PRIMARY KEY (run_id, round),
        FOREIGN KEY (run_id, round) REFERENCES rounds (run_id, round) ON DELETE CASCADE
    )""",
    """CREATE TABLE IF NOT EXISTS nodes (
        node_id    TEXT PRIMARY KEY,
        public_key BLOB NOT NULL UNIQUE,
        label      TEXT NOT NULL DEFAULT '',
        added_at   REAL NOT NULL,
        revoked    INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1)),
        revoked_at REAL
    )""",
    # AUTOINCREMENT so a sequence number is never reused, even after the newest row is gone.
    # Each entry holds the previous entry's hash and its own (runtime/audit.py): an edited,
    # removed or reordered entry breaks the chain (`shoal audit verify --store`).
    """CREATE TABLE IF NOT EXISTS audit (
        seq    INTEGER PRIMARY KEY AUTOINCREMENT,
        ts     REAL NOT NULL,
        run_id TEXT REFERENCES runs (id),
        actor  TEXT NOT NULL,
        action TEXT NOT NULL,
        detail TEXT NOT NULL,
        prev   TEXT NOT NULL DEFAULT '',
        hash   TEXT NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX IF NOT EXISTS audit_by_run ON audit (run_id, seq)",
    # The audit log is append-only inside the database too, not just in the Python API.
    """CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END""",
    AUDIT_SEAL,
)

# version -> statements that bring a store of that version to the next one.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    # 1 -> 2: the audit log becomes a hash chain; store.py links the existing entries.
    1: (
        "ALTER TABLE audit ADD COLUMN prev TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE audit ADD COLUMN hash TEXT NOT NULL DEFAULT ''",
    ),
    # 2 -> 3: the chain's head is sealed; store.py seals the existing head.
    2: (AUDIT_SEAL,),
}
