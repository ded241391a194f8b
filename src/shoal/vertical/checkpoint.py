"""Each party's own coefficients per completed epoch, so that a run which loses a party
resumes from the last epoch every party completed.

In memory by default (a simulated party, or a deployed one without ``--state``); a deployed
party given ``shoal node --state FILE`` keeps them in that SQLite file (WAL,
``synchronous=FULL``), on disk before the party acknowledges the epoch. Coefficients never
leave the party: the coordinator only learns which epochs each party holds.
"""

from __future__ import annotations

import os
import re
import threading
from pathlib import Path
from typing import Protocol

import numpy as np

from shoal.errors import NodeStateError, ProtocolError
from shoal.runtime.nodestate import durable_table

__all__ = ["Checkpoints", "FileCheckpoints", "MemoryCheckpoints", "check_run"]

_RUN = re.compile(r"[0-9A-Za-z_-]{1,64}")


def check_run(run: object) -> str:
    """A run id as the coordinator sends it: 1-64 letters, digits, '-' or '_'."""
    if not isinstance(run, str) or not _RUN.fullmatch(run):
        raise ProtocolError("a run id is 1-64 letters, digits, '-' or '_'")
    return run


class Checkpoints(Protocol):
    """Where a party keeps its coefficients of each completed epoch of a run."""

    def save(self, run: str, epoch: int, weights: np.ndarray) -> None: ...

    def epochs(self, run: str) -> list[int]: ...

    def load(self, run: str, epoch: int) -> np.ndarray: ...


def _decode(blob: bytes, run: str, epoch: int) -> np.ndarray:
    if len(blob) % 8:
        raise NodeStateError(f"the coefficients of run {run!r} epoch {epoch} are damaged")
    return np.frombuffer(blob, dtype="<f8").copy()


class MemoryCheckpoints:
    """Checkpoints in this process: they survive a failed epoch, not a lost process."""

    def __init__(self) -> None:
        self._saved: dict[tuple[str, int], bytes] = {}
        self._lock = threading.Lock()

    def save(self, run: str, epoch: int, weights: np.ndarray) -> None:
        blob = np.ascontiguousarray(weights, dtype="<f8").tobytes()
        with self._lock:
            self._saved[(check_run(run), int(epoch))] = blob

    def epochs(self, run: str) -> list[int]:
        with self._lock:
            return sorted(e for r, e in self._saved if r == run)

    def load(self, run: str, epoch: int) -> np.ndarray:
        with self._lock:
            blob = self._saved.get((run, int(epoch)))
        if blob is None:
            raise ProtocolError(f"no coefficients of run {run!r} epoch {epoch} at this party")
        return _decode(blob, run, epoch)


class FileCheckpoints:
    """Checkpoints in a SQLite file (a deployed party's ``--state`` file): each epoch's
    coefficients are on disk (WAL, ``synchronous=FULL``) before :meth:`save` returns."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = durable_table(
            self.path,
            "CREATE TABLE IF NOT EXISTS vertical_epochs (run TEXT NOT NULL, "
            "epoch INTEGER NOT NULL, weights BLOB NOT NULL, PRIMARY KEY (run, epoch))",
            what="coefficients",
        )

    def save(self, run: str, epoch: int, weights: np.ndarray) -> None:
        blob = np.ascontiguousarray(weights, dtype="<f8").tobytes()
        with self._lock:
            # one statement, one transaction: a kill leaves the epoch saved or absent
            self._conn.execute(
                "INSERT OR REPLACE INTO vertical_epochs (run, epoch, weights) VALUES (?, ?, ?)",
                (check_run(run), int(epoch), blob),
            )

    def epochs(self, run: str) -> list[int]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT epoch FROM vertical_epochs WHERE run=? ORDER BY epoch", (run,)
            ).fetchall()
        return [int(r[0]) for r in rows]

    def load(self, run: str, epoch: int) -> np.ndarray:
        with self._lock:
            row = self._conn.execute(
                "SELECT weights FROM vertical_epochs WHERE run=? AND epoch=?", (run, int(epoch))
            ).fetchone()
        if row is None:
            raise ProtocolError(f"no coefficients of run {run!r} epoch {epoch} at this party")
        return _decode(bytes(row[0]), run, epoch)

    def close(self) -> None:
        with self._lock:
            self._conn.close()
