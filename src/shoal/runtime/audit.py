"""Hash-chained audit entries: each entry holds the hash of the one before it.

The coordinator's Store and every node's state keep their audit log this way, so editing,
removing or reordering an entry breaks the chain and :func:`verify_chain` says where. The
newest (seq, hash) is *sealed* with an HMAC under a key kept outside the database (a file
beside it by default), so rewriting the chain or cutting its tail with SQL alone shows; an
*anchor* (the head exported to a file kept elsewhere) catches a rollback even by whoever
holds the key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from shoal.errors import ConfigError

__all__ = [
    "GENESIS",
    "Anchor",
    "AuditEntry",
    "AuditTrail",
    "ChainReport",
    "MemoryAuditLog",
    "entry_hash",
    "key_path_for",
    "load_key",
    "one_head",
    "parse_anchor",
    "parse_head",
    "read_anchor",
    "seal",
    "verify_chain",
    "write_anchor",
]

GENESIS = "0" * 64  # the "previous hash" of the first entry


# Built once: json.dumps with any option builds a new encoder per call, a few us each, and
# a node writes one entry per charged task.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False)
_FIELDS = json.JSONEncoder(separators=(",", ":"))


def canonical(detail: Mapping[str, Any] | str) -> str:
    """The one JSON text of ``detail`` that is hashed and stored (or of a string in it)."""
    return _CANONICAL.encode(detail)


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
    return hashlib.sha256(_FIELDS.encode(fields).encode()).hexdigest()


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
    last_seq: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_chain(
    entries: Iterable[AuditEntry],
    *,
    expected_last_seq: int | None = None,
    anchor: tuple[int, str] | None = None,
) -> ChainReport:
    """Check every link; ``expected_last_seq`` (the highest sequence number ever issued)
    catches entries removed from the end, which a chain alone cannot. ``anchor`` is a
    (seq, hash) exported earlier: the chain must still hold that entry, unchanged."""
    problems: list[str] = []
    prev, last_seq, count = GENESIS, 0, 0
    for entry in entries:
        count += 1
        if anchor is not None and entry.seq == anchor[0] and entry.hash != anchor[1]:
            problems.append(
                f"entry {entry.seq}: differs from the anchor exported earlier (the chain was "
                "rewritten since)"
            )
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
    if anchor is not None and anchor[0] > last_seq:
        problems.append(
            f"the log ends at entry {last_seq} but the anchor exported earlier holds entry "
            f"{anchor[0]} (entries removed since the anchor, or an older copy restored)"
        )
    return ChainReport(entries=count, head=prev, problems=tuple(problems), last_seq=last_seq)


# -- the keyed seal on the head ----------------------------------------------------------

KEY_BYTES = 32


def key_path_for(database: str | os.PathLike[str]) -> Path:
    """Where a database's audit key lives by default: a file beside it (mode 0600)."""
    return Path(f"{os.fspath(database)}.audit-key")


def load_key(path: str | os.PathLike[str], *, create: bool) -> bytes | None:
    """The audit key in ``path``; a new random one when it is missing and ``create`` (None
    otherwise). Written to a private temporary file and linked into place, so two
    processes creating it at once agree on one key and no reader sees half a key."""
    target = Path(path)
    try:
        data = target.read_bytes()
    except FileNotFoundError:
        if not create:
            return None
        temp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, os.urandom(KEY_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temp, target)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            temp.unlink()
        data = target.read_bytes()
    if len(data) != KEY_BYTES:
        raise ConfigError(
            f"audit key {str(target)!r} holds {len(data)} bytes, not {KEY_BYTES}; restore "
            "the key file that was written with this database"
        )
    return data


def seal(key: bytes, scope: str, seq: int, head: str) -> str:
    """HMAC-SHA256 over a chain's newest (seq, hash): only the key's holder can move it."""
    text = json.dumps(["shoal.audit-seal/1", scope, seq, head], separators=(",", ":"))
    return hmac.new(key, text.encode(), hashlib.sha256).hexdigest()


def seal_problems(
    key: bytes | None,
    *,
    scope: str,
    report: ChainReport,
    sealed: tuple[int, str, str] | None,
    key_path: str | os.PathLike[str],
) -> list[str]:
    """What is wrong with a chain's seal ``sealed`` = (seq, hash, mac), given the chain."""
    if sealed is None or not sealed[2]:
        if report.entries == 0:
            return []
        return ["the chain has entries but no sealed head (the seal was removed)"]
    seq, head, mac = sealed
    if key is None:
        return [
            f"no audit key at {str(key_path)!r}: the sealed head cannot be checked; give the "
            "key file written with this database"
        ]
    problems = []
    if not hmac.compare_digest(mac, seal(key, scope, seq, head)):
        problems.append(
            "the sealed head's MAC does not match (the head was rewritten without the key, or "
            "this is not the database's key)"
        )
    if (seq, head) != (report.last_seq, report.head):
        problems.append(
            f"the chain ends at entry {report.last_seq} but the sealed head is entry {seq} "
            "(entries removed, added or rewritten behind the log's back)"
        )
    return problems


# -- anchors: the head, exported -----------------------------------------------------------

ANCHOR_FORMAT = "shoal.audit-anchor/1"


@dataclass(frozen=True, kw_only=True)
class Anchor:
    """Chain heads exported at one moment (``shoal audit anchor``), kept away from the
    database: ``heads`` maps a chain ("" for a deployed node or a store) to (seq, hash)."""

    source: str
    heads: Mapping[str, tuple[int, str]]


def write_anchor(path: str | os.PathLike[str], anchor: Anchor) -> None:
    data = {
        "format": ANCHOR_FORMAT,
        "source": anchor.source,
        "created": time.time(),
        "heads": {k: {"seq": s, "hash": h} for k, (s, h) in sorted(anchor.heads.items())},
    }
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def read_anchor(path: str | os.PathLike[str]) -> Anchor:
    where = f"audit anchor {str(path)!r}"
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"{where} does not exist; give a file `shoal audit anchor` wrote"
        ) from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where} is not readable JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != ANCHOR_FORMAT:
        raise ConfigError(f"{where} is not a shoal audit anchor (format {ANCHOR_FORMAT!r})")
    heads: dict[str, tuple[int, str]] = {}
    raw = data.get("heads")
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} has no heads")
    for name, head in raw.items():
        seq = head.get("seq") if isinstance(head, dict) else None
        digest = head.get("hash") if isinstance(head, dict) else None
        if type(seq) is not int or seq < 0 or not isinstance(digest, str):
            raise ConfigError(f"{where}: head {name!r} needs an integer seq and a hash")
        heads[str(name)] = (seq, digest)
    return Anchor(source=str(data.get("source", "")), heads=heads)


def _head_text(value: str) -> tuple[int, str] | None:
    seq, sep, digest = value.strip().partition(":")
    if sep and seq.isdigit() and len(digest) == 64 and not digest.strip("0123456789abcdef"):
        return int(seq), digest
    return None


def parse_head(value: str, *, source: str = "") -> Anchor:
    """An anchor given as ``SEQ:HASH`` (a single chain's head, as ``head`` commands print)."""
    head = _head_text(value)
    if head is None:
        raise ConfigError(
            f"anchor {value[:100]!r} is not SEQ:HASH (an entry number, a colon and the 64 hex "
            "digits of its hash)"
        )
    return Anchor(source=source, heads={"": head})


def parse_anchor(value: str, *, source: str = "") -> Anchor:
    """An anchor given as ``SEQ:HASH`` or as the path of a file ``write_anchor`` wrote."""
    if _head_text(value) is not None:
        return parse_head(value, source=source)
    return read_anchor(value)


def one_head(anchor: Anchor | None, *, of: str) -> tuple[int, str] | None:
    """The single chain head of ``anchor`` (a store's or a datasite's), for ``of``."""
    if anchor is None:
        return None
    if set(anchor.heads) != {""}:
        raise ConfigError(
            f"that anchor holds the chains of a node's state ({sorted(anchor.heads)}), not "
            f"the single chain of {of}"
        )
    return anchor.heads[""]


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
