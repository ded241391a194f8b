"""Private prediction: a model owner serves a linear model on encrypted features.

The client encrypts its feature rows under its own Paillier key and gets back encrypted
scores only it can decrypt; the owner never sees the features, the client never sees the
weights. Each query is charged to a per-client row budget at the owner's node (in memory,
or durably in a SQLite file that survives the serving process), and the owner may add fresh
noise to every score, so extracting the weights by repeated queries (d + 1 exact answers
suffice for a linear model without noise) costs measurably more.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from shoal.crypto import paillier as P
from shoal.errors import ConfigError, PrivacyBudgetExceeded, ProtocolError
from shoal.runtime import TaskContext
from shoal.runtime.nodestate import durable_table
from shoal.vertical.tasks import spec

__all__ = [
    "PREDICT_TASK",
    "FileQueryLedger",
    "MemoryQueryLedger",
    "PredictionClient",
    "QueryLedger",
    "ServedModel",
    "serving_tasks",
]

PREDICT_TASK = "predict.linear"
_F_W = 32  # fractional bits of the served weights


@dataclass(frozen=True, kw_only=True)
class ServedModel:
    """What the owner serves, and on what terms."""

    weights: np.ndarray
    bias: float = 0.0
    budget_rows: int | None = None  # rows one client may score in total (None: unlimited)
    noise_std: float = 0.0  # std of fresh Gaussian noise added to every score
    min_key_bits: int = P.MIN_SECURE_BITS

    def __post_init__(self) -> None:
        w = np.asarray(self.weights, dtype=np.float64)
        if w.ndim != 1 or not np.all(np.isfinite(w)):
            raise ConfigError("served weights are a finite 1-d array")
        # NaN compares false: `noise_std < 0` let it through, and every score came back NaN
        if not 0 <= self.noise_std < math.inf or (
            self.budget_rows is not None and self.budget_rows < 0
        ):
            raise ConfigError("noise_std (finite) and budget_rows must be >= 0")
        object.__setattr__(self, "weights", w)


def _over(client: str, used: int, limit: int, rows: int) -> PrivacyBudgetExceeded:
    return PrivacyBudgetExceeded(
        f"query budget of {client!r}: {used} of {limit} rows used, {rows} more asked"
    )


class QueryLedger(Protocol):
    """Rows each client has had scored. ``charge`` checks the limit and records the rows as
    one step (two queries at once cannot both pass a check that has room for one)."""

    def charge(self, client: str, rows: int, *, limit: int | None) -> int: ...

    def used(self, client: str) -> int: ...


class MemoryQueryLedger:
    """The ledger in the serving process: a restarted owner starts again from zero."""

    def __init__(self) -> None:
        self._used: dict[str, int] = {}
        self._lock = threading.Lock()

    def charge(self, client: str, rows: int, *, limit: int | None) -> int:
        with self._lock:
            used = self._used.get(client, 0)
            if limit is not None and used + rows > limit:
                raise _over(client, used, limit, rows)
            self._used[client] = used + rows
            return used + rows

    def used(self, client: str) -> int:
        with self._lock:
            return self._used.get(client, 0)


class FileQueryLedger:
    """The ledger in a SQLite file (the owner node's ``--state`` file): WAL,
    ``synchronous=FULL``, each charge committed before the scores are computed. The check
    and the charge are one write transaction (``BEGIN IMMEDIATE``), so threads and processes
    sharing the file cannot overspend; a killed process loses no charge it answered for."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = durable_table(
            self.path,
            "CREATE TABLE IF NOT EXISTS predict_budget "
            "(client TEXT PRIMARY KEY, rows INTEGER NOT NULL CHECK (rows >= 0))",
            what="a query budget",
        )

    def charge(self, client: str, rows: int, *, limit: int | None) -> int:
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute(
                    "SELECT rows FROM predict_budget WHERE client=?", (client,)
                ).fetchone()
                used = int(row[0]) if row else 0
                if limit is not None and used + rows > limit:
                    raise _over(client, used, limit, rows)
                conn.execute(
                    "INSERT INTO predict_budget (client, rows) VALUES (?, ?) "
                    "ON CONFLICT (client) DO UPDATE SET rows = excluded.rows",
                    (client, used + rows),
                )
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
            return used + rows

    def used(self, client: str) -> int:
        with self._lock:
            row = self._conn.execute(
                "SELECT rows FROM predict_budget WHERE client=?", (client,)
            ).fetchone()
        return int(row[0]) if row else 0

    def close(self) -> None:
        with self._lock:
            self._conn.close()


def serving_tasks(
    model: ServedModel, *, ledger: QueryLedger | None = None, client: str = "client"
) -> dict[str, Any]:
    """The owner's task: encrypted rows in, encrypted (noised, rerandomized) scores out.

    Every query is charged to ``client``'s row budget in ``ledger`` (default: in memory)
    before any work; the owner names the client (who it serves), the client cannot.
    """
    book = ledger if ledger is not None else MemoryQueryLedger()

    def predict(ctx: TaskContext, payload: dict[str, Any]) -> dict[str, Any]:
        pk = P.PublicKey.from_bytes(
            bytes(np.asarray(payload["pk"], np.uint8)),
            insecure=model.min_key_bits < P.MIN_SECURE_BITS,
        )
        if pk.bits < model.min_key_bits:
            raise ConfigError(f"keys under {model.min_key_bits} bits are refused")
        x = P.EncryptedVector.from_payload(
            pk, {k: payload[f"x.{k}"] for k in ("ct", "shape", "frac_bits")}
        )
        d = len(model.weights)
        if len(x.shape) != 2 or x.shape[1] != d:
            raise ProtocolError(f"send rows of {d} encrypted features, got shape {x.shape}")
        rows = x.shape[0]
        # Charge the budget before any work: a refused query releases nothing, and a charge
        # is recorded (on disk, with a file ledger) before any score can leave.
        used = book.charge(client, rows, limit=model.budget_rows)
        ctx.node_state.audit("predict.charge", client=client, rows=rows, used=used)
        flat = x.ciphertexts
        scores = []
        for i in range(rows):
            row = P.EncryptedVector(
                public_key=pk,
                ciphertexts=flat[i * d : (i + 1) * d],
                shape=(d,),
                frac_bits=x.frac_bits,
            )
            scores.append(row.matmul(model.weights.reshape(d, 1), frac_bits=_F_W).ciphertexts[0])
        out = P.EncryptedVector(
            public_key=pk, ciphertexts=tuple(scores), shape=(rows,), frac_bits=x.frac_bits + _F_W
        )
        offset = np.full(rows, model.bias)
        if model.noise_std > 0:
            # Fresh OS entropy: the client must not be able to predict or replay the noise.
            rng = np.random.default_rng(int.from_bytes(os.urandom(16), "little"))
            offset = offset + rng.normal(0.0, model.noise_std, size=rows)
        # Rerandomize: the product's randomness is prod r_i**w_i, which a client that knows
        # its r_i could attack for the weights; fresh r**n removes that channel.
        out = out.add_plain(offset).rerandomize()
        return {f"scores.{k}": v for k, v in out.to_payload().items()}

    return {PREDICT_TASK: spec(predict, {"scores.*": "clear"})}


class PredictionClient:
    """Scores rows at a model owner's node without revealing them (nor learning weights)."""

    def __init__(
        self, federation: Any, *, owner: str, key_bits: int = 2048, insecure: bool = False
    ) -> None:
        self.federation = federation
        self.owner = owner
        self.public_key, self._private_key = P.generate_keypair(key_bits, insecure=insecure)
        self.pool = P.RandomnessPool(public_key=self.public_key, private_key=self._private_key)

    def predict(self, x: Any, *, frac_bits: int = 32) -> np.ndarray:
        rows = np.asarray(x, dtype=np.float64)
        if rows.ndim != 2:
            raise ConfigError("predict takes a 2-d array of feature rows")
        self.pool.refill(max(0, rows.size - len(self.pool)))
        enc = P.encrypt(self.public_key, rows, frac_bits=frac_bits, pool=self.pool)
        payload = {"pk": np.frombuffer(self.public_key.to_bytes(), np.uint8)}
        payload.update({f"x.{k}": v for k, v in enc.to_payload().items()})
        replies, failures = self.federation.request([self.owner], PREDICT_TASK, common=payload)
        if failures:
            failure = failures[self.owner]
            raise ProtocolError(f"the model owner refused: {failure.kind.value}: {failure.detail}")
        reply = replies[self.owner]
        scores = P.EncryptedVector.from_payload(
            self.public_key, {k: reply[f"scores.{k}"] for k in ("ct", "shape", "frac_bits")}
        )
        return P.decrypt(self._private_key, scores)
