"""Back-off for peers whose connections the front door or the bulk lane keeps cutting.

The door cuts a connection that floods (h2meter.py, the byte and record budgets and the call
count of transport.py), and so does the bulk lane before a node authenticates (the same
budgets, lane.py); the peer then reconnects and floods again, each time costing a TLS
handshake, threads and a burst of work. So a peer cut ``after`` times within ``window_s``
is *banned* for ``ban_s``, on both ports (one :class:`Bans`, whichever port cut it):

- a certificate (TLS: every relayed connection shows one of the federation's CA) is refused
  outright after its handshake, whatever address it comes from. Other certificates, other
  nodes at the same address included, are unaffected: only a federation member can be
  banned so, and only for what its own connections did.
- an address (a cut connection that showed no certificate: plaintext, or a TLS handshake
  that overspent) is put *on probation*, not refused: nothing before a node's signed hello
  tells a node's connection from an attacker's on the same address (a NAT, a shared host),
  and refusing the address would let a flood keep the node out. On probation every
  connection from it gets only what a node needs before it authenticates (transport.py's
  ``PROBATION_BYTES``): a node still gets in, a flood is cut after a few KiB.

A node never comes near a cut (it sends 808 bytes and a handful of frames before its
hello), so ``after`` can be small. Keys are bounded (``max_keys``, oldest forgotten first) so
a peer with many addresses cannot grow the table.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["BanList", "BanPolicy", "Bans"]


@dataclass(frozen=True, kw_only=True)
class BanPolicy:
    """``after`` cuts within ``window_s`` seconds ban a peer for ``ban_s`` seconds
    (``after=0``: never)."""

    after: int = 3
    window_s: float = 60.0
    ban_s: float = 300.0
    max_keys: int = 4096

    def __post_init__(self) -> None:
        if self.after < 0 or self.window_s <= 0 or self.ban_s <= 0 or self.max_keys < 1:
            raise ValueError(
                "a ban policy needs after >= 0, window_s > 0, ban_s > 0 and max_keys >= 1"
            )


class BanList:
    """Counts cuts per key (a certificate's identity, or an address) and bans as
    :class:`BanPolicy` says. Thread-safe."""

    def __init__(
        self, policy: BanPolicy | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy or BanPolicy()
        self._clock = clock
        self._lock = threading.Lock()
        self._cuts: OrderedDict[str, deque[float]] = OrderedDict()
        self._until: OrderedDict[str, float] = OrderedDict()

    def cut(self, key: str) -> bool:
        """Count a cut of ``key``'s connection; True if this cut starts a ban."""
        policy = self.policy
        if not key or policy.after == 0:
            return False
        now = self._clock()
        with self._lock:
            if self._until.get(key, 0.0) > now:
                return False  # already banned (a connection opened just before the ban)
            cuts = self._cuts.pop(key, None) or deque()
            while cuts and now - cuts[0] >= policy.window_s:
                cuts.popleft()
            cuts.append(now)
            if len(cuts) < policy.after:
                self._cuts[key] = cuts  # to the end: the newest
                _bound(self._cuts, policy.max_keys)
                return False
            self._until.pop(key, None)
            self._until[key] = now + policy.ban_s
            _bound(self._until, policy.max_keys)
            return True

    def banned(self, key: str) -> float | None:
        """Seconds left of ``key``'s ban, or None if it is not banned."""
        if not key:
            return None
        now = self._clock()
        with self._lock:
            until = self._until.get(key)
            if until is None:
                return None
            if until <= now:
                del self._until[key]
                return None
            return until - now


class Bans:
    """Cuts counted against the certificate a cut connection showed, else its address, for
    the front door and the bulk lane together. Certificates and addresses are kept apart, so
    a peer with many addresses cannot push a certificate's ban out. ``banned(host, line)``
    hears each ban as it starts (the audit trail)."""

    def __init__(
        self,
        policy: BanPolicy | None = None,
        *,
        banned: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy or BanPolicy()
        self.certificates = BanList(self.policy, clock=clock)
        self.addresses = BanList(self.policy, clock=clock)
        self._banned = banned or (lambda host, line: None)

    def strike(self, host: str, identity: str, *, record: bool = True) -> None:
        """Count a cut of a connection from ``host`` that showed certificate ``identity``
        (empty if none); a ban it starts is told to ``banned`` if ``record``."""
        key = f"certificate {identity}" if identity else f"address {host}"
        bans = self.certificates if identity else self.addresses
        if bans.cut(key) and record:
            policy = self.policy
            what = "refused" if identity else "on probation (a node's budget only)"
            self._banned(
                host,
                f"banned: {key} {what} for {policy.ban_s:g} s after {policy.after} cuts "
                f"within {policy.window_s:g} s",
            )

    def refusal(self, identity: str) -> str | None:
        """Why a connection that showed certificate ``identity`` is refused, or None."""
        left = self.certificates.banned(f"certificate {identity}")
        if left is None:
            return None
        return f"refused: its certificate is banned for {left:.0f} s more (cut too often)"

    def on_probation(self, host: str) -> bool:
        """Whether connections from ``host`` get only a node's budget before authenticating."""
        return self.addresses.banned(f"address {host}") is not None


def _bound(table: OrderedDict[str, Any], size: int) -> None:
    while len(table) > size:
        table.popitem(last=False)
