"""Bounds on connections that have not authenticated yet, and coalesced rejection records.

A coordinator faces the open network: anyone may connect to its gRPC and bulk lane ports.
Until a connection proves a registered key it costs the coordinator a slot, so there are at
most ``per_peer`` such connections from one address and ``total`` in all; when a new one
would exceed either bound, the *oldest* pending one (from that address first) is dropped. A
real node authenticates within milliseconds, so a flood of idle connections can only ever
delay it by the time its own handshake takes, never lock it out. Rejections are recorded
individually up to ``burst`` per address and minute, then counted and recorded once per
minute as "N rejected connections from X", so none goes unrecorded and none floods the log.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["PendingLimiter", "RejectionLog", "peer_host"]


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
    drop: Callable[[], None]


class PendingLimiter:
    """At most ``per_peer`` pending connections per address and ``total`` in all.

    ``admit(host, drop)`` registers a new pending connection and returns its ticket; when a
    bound is hit, the oldest pending connection (of ``host`` if that bound is hit, else the
    oldest of all) has its ``drop`` called and is forgotten. ``done(ticket)`` removes a
    connection that authenticated or ended.
    """

    def __init__(self, *, per_peer: int = 16, total: int = 256) -> None:
        if per_peer < 1 or total < per_peer:
            raise ValueError("need 1 <= per_peer <= total")
        self.per_peer = per_peer
        self.total = total
        self._lock = threading.Lock()
        self._pending: OrderedDict[int, _Pending] = OrderedDict()  # oldest first
        self._next = 0
        self.evicted = 0

    def admit(self, host: str, drop: Callable[[], None]) -> int:
        victims: list[_Pending] = []
        with self._lock:
            mine = [t for t, p in self._pending.items() if p.host == host]
            if len(mine) >= self.per_peer:
                victims.append(self._pending.pop(mine[0]))
            elif len(self._pending) >= self.total:
                victims.append(self._pending.popitem(last=False)[1])
            ticket = self._next
            self._next += 1
            self._pending[ticket] = _Pending(host=host, drop=drop)
            self.evicted += len(victims)
        for victim in victims:  # outside the lock: dropping may call back into the owner
            victim.drop()
        return ticket

    def done(self, ticket: int) -> None:
        with self._lock:
            self._pending.pop(ticket, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._pending)


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
