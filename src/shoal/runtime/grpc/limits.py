"""Bounds on connections that have not authenticated yet, and coalesced rejection records.

A coordinator faces the open network: anyone may connect to its gRPC and bulk lane ports.
Until a connection proves a registered key it costs the coordinator a slot (a thread, a file
descriptor), so there are at most ``per_peer`` such connections from one address and
``total`` in all, each for at most ``max_age_s``.

When a newcomer would exceed a bound, one connection goes: the one with the least *progress*
(:data:`SILENT` < :data:`PREFIX` < :data:`CALL` < :data:`PROVEN`), chosen uniformly at random
(from the operating system's randomness) among those with equally little, the newcomer
included. Progress counts for the first ``grace_s`` of a connection's life only: a node
authenticates within milliseconds, so a connection still pending after that ranks as silent
(otherwise an attacker who can reach a level would hold its slots at it until the deadline,
and newcomers below it, the node's among them, would all be refused). So a connection that
has shown more of a real handshake is never dropped, within its grace, while one that has
shown less is pending, and no one can predict which of equals goes: a flood from the node's
own address (a NAT, a shared host) can no longer aim at the node's connection by its age.
What each level means on each port is the caller's (see transport.py and lane.py);
:data:`PROVEN` is reserved for what only a federation member can show (a certificate of the
federation's CA, a live session's lane id), so a node that reached it cannot be displaced,
within its grace, by anyone who cannot.

Rejections are recorded individually up to ``burst`` per address and minute, then counted
and recorded once per minute as "N rejected connections from X", so none goes unrecorded
and none floods the log.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

__all__ = [
    "CALL",
    "PREAUTH_BYTES",
    "PREAUTH_RECORDS",
    "PREFIX",
    "PROBATION_BYTES",
    "PROVEN",
    "SILENT",
    "DropReason",
    "PendingLimiter",
    "RejectionLog",
    "peer_host",
]

# Progress of a pending connection; higher outranks lower when one must go.
SILENT = 0  # nothing yet, or nothing that could start a handshake
PREFIX = 1  # a well-formed start of the handshake (anyone can send one)
CALL = 2  # a full transport handshake and a gRPC call open, still unauthenticated
PROVEN = 3  # something only a federation member has (a CA-signed certificate, a lane id)

DropReason = Literal["evicted", "expired", "cut"]

# Bytes a connection may send before a node authenticates on it: at the front door, its
# HTTP/2 bytes (after TLS); with TLS, on the door and the bulk lane alike, also the bytes on
# the wire from the first (the handshake included). A node sends 808 bytes of HTTP/2
# (measured: the preface, SETTINGS, WINDOW_UPDATE, one call's headers and its hello), about
# 2.9 KB on the door's wire, and about 1.6 KB on a lane connection's. Floods of frames the
# meter does not count (WINDOW_UPDATE, unknown types, empty DATA, an endless header block)
# end here.
PREAUTH_BYTES = 32 << 10
# With TLS, records are bounded apart: an empty or one-byte record, a key update, costs a
# record's work but decrypts to nothing or next to nothing, so 32 KiB of decrypted bytes had
# allowed 32,768 one-byte records (750 KB on the wire, one relay pass each), and the lane,
# which counted nothing, 30,000 key updates in 4 s. A node sends 9-10 records on the door
# (its handshake with its certificate, then its HTTP/2 and hello), 7 on a lane connection
# (test_deploy_lane_flood.py prints them).
PREAUTH_RECORDS = 64
# What a connection from an address on probation (bans.py) may send before a node
# authenticates on it: a node needs about 2.9 KB on the wire with TLS.
PROBATION_BYTES = 8 << 10


def peer_host(peer: str) -> str:
    """The address part of a peer string: 'ipv4:1.2.3.4:5' or '[::1]:5' -> '1.2.3.4' / '::1'."""
    text = peer.split(":", 1)[1] if peer.startswith(("ipv4:", "ipv6:")) else peer
    text = text.replace("%5B", "[").replace("%5D", "]")
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


@dataclass
class _Pending:
    host: str
    level: int
    since: float
    deadline: float
    drop: Callable[[DropReason], None]


class PendingLimiter:
    """At most ``per_peer`` pending connections per address and ``total`` in all, each for at
    most ``max_age_s`` (None: no limit here; the caller's own timeouts apply).

    ``admit(host, drop, level=...)`` registers a new pending connection and returns its
    ticket, or None if the newcomer itself is the one that must go (the caller closes it;
    its ``drop`` is not called). When a bound is hit, the connection with the lowest rank
    (of ``host`` if its bound is hit, else of all) has ``drop("evicted")`` called and is
    forgotten; a connection's rank is its level for its first ``grace_s``, SILENT after;
    ties are broken uniformly at random with ``rng`` (default: the OS's randomness).
    ``advance(ticket, level)`` records progress (levels only rise), ``done`` removes a
    connection that authenticated or ended, and ``expire()`` calls ``drop("expired")`` for
    every connection past its deadline.
    """

    def __init__(
        self,
        *,
        per_peer: int = 16,
        total: int = 256,
        max_age_s: float | None = None,
        grace_s: float = 1.0,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_peer < 1 or total < per_peer:
            raise ValueError("need 1 <= per_peer <= total")
        if (max_age_s is not None and max_age_s <= 0) or grace_s <= 0:
            raise ValueError("max_age_s and grace_s must be positive")
        self.per_peer = per_peer
        self.total = total
        self.max_age_s = max_age_s
        self.grace_s = grace_s
        self._rng = rng or random.SystemRandom()
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[int, _Pending] = {}
        self._by_host: dict[str, set[int]] = {}
        self._next = 0
        self.evicted = 0  # dropped for a newcomer
        self.refused = 0  # newcomers that were themselves the one to go
        self.expired = 0

    def admit(
        self, host: str, drop: Callable[[DropReason], None], *, level: int = SILENT
    ) -> int | None:
        victim: _Pending | None = None
        now = self._clock()
        with self._lock:
            mine = self._by_host.get(host, set())
            if len(mine) >= self.per_peer:
                candidates: list[int] | None = list(mine)
            elif len(self._pending) >= self.total:
                candidates = list(self._pending)
            else:
                candidates = None
            if candidates is not None:
                ranks = {t: self._rank(self._pending[t], now) for t in candidates}
                lowest = min(ranks.values())
                if level < lowest:
                    self.refused += 1
                    return None
                equals = [t for t in candidates if ranks[t] == lowest]
                # The newcomer draws with its equals: none of them has shown more than it.
                pick = self._rng.randrange(len(equals) + (level == lowest))
                if pick == len(equals):
                    self.refused += 1
                    return None
                victim = self._forget(equals[pick])
                self.evicted += 1
            ticket = self._next
            self._next += 1
            deadline = now + self.max_age_s if self.max_age_s else float("inf")
            self._pending[ticket] = _Pending(
                host=host, level=level, since=now, deadline=deadline, drop=drop
            )
            self._by_host.setdefault(host, set()).add(ticket)
        if victim is not None:  # outside the lock: dropping may call back into the owner
            victim.drop("evicted")
        return ticket

    def advance(self, ticket: int | None, level: int) -> None:
        """Record that ``ticket`` has shown ``level`` (no effect if it is lower, or gone)."""
        with self._lock:
            entry = self._pending.get(ticket) if ticket is not None else None
            if entry is not None and level > entry.level:
                entry.level = level

    def level(self, ticket: int | None) -> int | None:
        """The level of a pending connection, None once it is gone."""
        with self._lock:
            entry = self._pending.get(ticket) if ticket is not None else None
            return entry.level if entry is not None else None

    def done(self, ticket: int | None) -> None:
        if ticket is None:
            return
        with self._lock:
            self._forget(ticket)

    def expire(self) -> int:
        """Drop every pending connection past its deadline; returns how many."""
        now = self._clock()
        with self._lock:
            late = [t for t, p in self._pending.items() if p.deadline <= now]
            victims = [v for v in map(self._forget, late) if v is not None]
            self.expired += len(victims)
        for victim in victims:
            victim.drop("expired")
        return len(victims)

    def levels(self, host: str | None = None) -> list[int]:
        """The levels of the pending connections (of ``host``, if given): for tests and stats."""
        with self._lock:
            return [p.level for p in self._pending.values() if host is None or p.host == host]

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)

    def _rank(self, entry: _Pending, now: float) -> int:
        return entry.level if now - entry.since < self.grace_s else SILENT

    def _forget(self, ticket: int) -> _Pending | None:
        entry = self._pending.pop(ticket, None)
        if entry is not None:
            mine = self._by_host[entry.host]
            mine.discard(ticket)
            if not mine:
                del self._by_host[entry.host]
        return entry


class RejectionLog:
    """Records rejections through ``record(host, reason, detail)``, coalesced per address.

    The first ``burst`` rejections from an address in a window of ``window_s`` seconds are
    passed to ``write(action_detail)`` one by one; later ones are counted and written once
    as a summary when the window closes (``flush``, called periodically and at close). Only
    ``hosts`` addresses a window are tracked one by one: a peer with many addresses (an IPv6
    prefix) gets one summary line for the rest, so neither the output nor the memory grows
    with the number of addresses.
    """

    def __init__(
        self,
        write: Callable[[dict[str, Any]], None],
        *,
        burst: int = 10,
        window_s: float = 60.0,
        hosts: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._write = write
        self.burst = burst
        self.window_s = window_s
        self.hosts = hosts
        self._clock = clock
        self._lock = threading.Lock()
        self._started = clock()
        self._counts: dict[str, int] = {}
        self._held: dict[str, Counter[str]] = {}  # host -> reasons beyond the burst
        self._others: Counter[str] = Counter()  # reasons from addresses beyond `hosts`
        self._other_hosts: set[str] = set()  # at most _MAX_COUNTED of them
        self.total = 0

    def record(self, host: str, reason: str, detail: dict[str, Any]) -> bool:
        """Count one rejection; True if it was written individually."""
        self.flush()
        with self._lock:
            self.total += 1
            if host not in self._counts and len(self._counts) >= self.hosts:
                _count(self._others, reason)
                if len(self._other_hosts) < _MAX_COUNTED:
                    self._other_hosts.add(host)
                return False
            count = self._counts.get(host, 0) + 1
            self._counts[host] = count
            if count > self.burst:
                _count(self._held.setdefault(host, Counter()), reason)
                return False
        self._write(detail)
        return True

    def flush(self, *, force: bool = False) -> None:
        """Write the summaries of a window that has ended (or now, with ``force``)."""
        with self._lock:
            now = self._clock()
            if not force and now - self._started < self.window_s:
                return
            held, self._held = self._held, {}
            others, self._others = self._others, Counter()
            other_hosts, self._other_hosts = len(self._other_hosts), set()
            self._counts = {}
            seconds = now - self._started
            self._started = now
        for host, reasons in held.items():
            count = sum(reasons.values())
            self._write(
                {
                    "peer": host,
                    "count": count,
                    "seconds": round(seconds, 1),
                    "reason": reasons.most_common(1)[0][0][:500],
                    "summary": f"{count} more rejected connections from {host} in the "
                    f"last {seconds:.0f} s",
                }
            )
        if others:
            count = sum(others.values())
            many = f"{other_hosts}{'+' if other_hosts >= _MAX_COUNTED else ''}"
            self._write(
                {
                    "peer": "other addresses",
                    "count": count,
                    "seconds": round(seconds, 1),
                    "reason": others.most_common(1)[0][0][:500],
                    "summary": f"{count} rejected connections from {many} other addresses in "
                    f"the last {seconds:.0f} s",
                }
            )


_MAX_COUNTED = 10_000  # distinct addresses counted in a summary (then "10000+")
_MAX_REASONS = 8  # distinct reasons kept per summary; a peer can vary its bytes at will


def _count(reasons: Counter[str], reason: str) -> None:
    if reason not in reasons and len(reasons) >= _MAX_REASONS:
        reason = "(other reasons)"
    reasons[reason] += 1
