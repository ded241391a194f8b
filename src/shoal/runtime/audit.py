"""Hash-chained audit entries: each entry holds the hash of the one before it.

The coordinator's Store and every node's state keep their audit log this way, so editing,
removing or reordering an entry breaks the chain and :func:`verify_chain` says where.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

__all__ = [
    "GENESIS",
    "AuditEntry",
    "AuditTrail",
    "ChainReport",
    "MemoryAuditLog",
    "entry_hash",
    "verify_chain",
]

GENESIS = "0" * 64  # the "previous hash" of the first entry


def canonical(detail: Mapping[str, Any]) -> str:
    """The one JSON text of ``detail`` that is hashed and stored."""
    return json.dumps(detail, sort_keys=True, separators=(",", ":"), allow_nan=False)


def entry_hash(
    prev: str,
    seq: int,
    ts: float,
    actor: str,
    action: str,
    detail: str,
    run_id: str | None = None,
) -> str:
    """SHA-256 over the previous hash and every field of the entry (``detail`` as stored)."""
    fields: list[Any] = [prev, seq, ts, actor, action, detail]
    if run_id is not None:
        fields.append(run_id)
    text = json.dumps(fields, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, kw_only=True)
class AuditEntry:
    """One link of a chain: ``prev`` is the hash of the entry before, ``hash`` this one's."""

    seq: int
    ts: float
    actor: str
    action: str
    detail: Mapping[str, Any]
    prev: str
    hash: str
    run_id: str | None = None
    detail_text: str = field(default="", repr=False, compare=False)

    @property
    def task_id(self) -> str | None:
        value = self.detail.get("task_id")
        return value if isinstance(value, str) else None


@dataclass(frozen=True, kw_only=True)
class ChainReport:
    """What :func:`verify_chain` found: entries checked, the head hash, and any problems."""

    entries: int
    head: str
    problems: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_chain(
    entries: Iterable[AuditEntry], *, expected_last_seq: int | None = None
) -> ChainReport:
    """Check every link; ``expected_last_seq`` (the highest sequence number ever issued)
    catches entries removed from the end, which a chain alone cannot."""
    problems: list[str] = []
    prev, last_seq, count = GENESIS, 0, 0
    for entry in entries:
        count += 1
        if entry.seq != last_seq + 1:
            problems.append(
                f"entry {entry.seq}: follows entry {last_seq} (an entry was removed or reordered)"
            )
        if entry.prev != prev:
            problems.append(
                f"entry {entry.seq}: does not link to the entry before it (removed, inserted "
                "or reordered entries)"
            )
        text = entry.detail_text or canonical(entry.detail)
        digest = entry_hash(
            entry.prev, entry.seq, entry.ts, entry.actor, entry.action, text, entry.run_id
        )
        if digest != entry.hash:
            problems.append(f"entry {entry.seq}: its content does not match its hash (edited)")
        prev, last_seq = entry.hash, entry.seq
    if expected_last_seq is not None and expected_last_seq > last_seq:
        problems.append(
            f"the log ends at entry {last_seq} but entries up to {expected_last_seq} were "
            "written (entries removed from the end)"
        )
    return ChainReport(entries=count, head=prev, problems=tuple(problems))


class AuditTrail(Protocol):
    """Where a coordinator records what it did: in memory, or the Store's durable chain."""

    def record(self, action: str, detail: Mapping[str, Any]) -> AuditEntry: ...

    @property
    def entries(self) -> Sequence[AuditEntry]: ...


class MemoryAuditLog:
    """An in-memory chain (simulation, tests): the same entries a durable log holds."""

    def __init__(self, *, actor: str = "coordinator") -> None:
        self.actor = actor
        self._entries: list[AuditEntry] = []

    def record(self, action: str, detail: Mapping[str, Any]) -> AuditEntry:
        prev = self._entries[-1].hash if self._entries else GENESIS
        seq = len(self._entries) + 1
        ts = time.time()
        text = canonical(detail)
        entry = AuditEntry(
            seq=seq,
            ts=ts,
            actor=self.actor,
            action=action,
            detail=json.loads(text),
            prev=prev,
            hash=entry_hash(prev, seq, ts, self.actor, action, text),
            detail_text=text,
        )
        self._entries.append(entry)
        return entry

    @property
    def entries(self) -> Sequence[AuditEntry]:
        return tuple(self._entries)

    def verify(self) -> ChainReport:
        return verify_chain(self._entries, expected_last_seq=len(self._entries))
