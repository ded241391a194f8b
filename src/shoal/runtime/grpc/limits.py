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
from collections import OrderedDict
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
    as a summary when the window closes (``flush``, called periodically and at close).
    """

    def __init__(
        self,
        write: Callable[[dict[str, Any]], None],
        *,
        burst: int = 10,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._write = write
        self.burst = burst
        self.window_s = window_s
        self._clock = clock
        self._lock = threading.Lock()
        self._started = clock()
        self._counts: dict[str, int] = {}
        self._held: dict[str, list[str]] = {}  # host -> reasons beyond the burst
        self.total = 0

    def record(self, host: str, reason: str, detail: dict[str, Any]) -> bool:
        """Count one rejection; True if it was written individually."""
        self.flush()
        with self._lock:
            self.total += 1
            count = self._counts.get(host, 0) + 1
            self._counts[host] = count
            if count > self.burst:
                self._held.setdefault(host, []).append(reason)
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
            self._counts = {}
            seconds = now - self._started
            self._started = now
        for host, reasons in held.items():
            common = max(set(reasons), key=reasons.count)
            self._write(
                {
                    "peer": host,
                    "count": len(reasons),
                    "seconds": round(seconds, 1),
                    "reason": common[:500],
                    "summary": f"{len(reasons)} more rejected connections from {host} in the "
                    f"last {seconds:.0f} s",
                }
            )
