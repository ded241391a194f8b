"""What the coordinator records in its audit trail: connections, ended sessions, tampered
replies, rejected connections and nodes on the wrong transport (both coalesced per
address, see limits.RejectionLog).

A failed write is logged, never raised: the audit trail must not take a session down.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from shoal.errors import ShoalError
from shoal.runtime.grpc.auth import fingerprint
from shoal.runtime.grpc.limits import RejectionLog, peer_host

__all__ = ["Trail"]

log = logging.getLogger("shoal.deploy")


class Trail:
    """Writes to ``registry.audit`` when the registry has one (the Store does)."""

    def __init__(self, registry: object, *, run_id: str | None) -> None:
        self._write_entry = getattr(registry, "audit", None)
        self.run_id = run_id
        self.rejections = 0  # connections refused so far
        self._counting = threading.Lock()  # connection threads record at once
        self._log = RejectionLog(self._write_rejection)
        # A node on the wrong transport retries: one line per address, then a count a minute.
        self._mismatches = RejectionLog(self._write_mismatch, burst=1)
        # A ban starts at most once per key and ban period; many addresses are summed.
        self._bans = RejectionLog(self._write_ban, burst=1)

    def record(self, action: str, actor: str, **detail: Any) -> None:
        if self._write_entry is None:
            return
        try:
            self._write_entry(
                actor=actor or "unknown", action=action, detail=detail, run_id=self.run_id
            )
        except ShoalError as exc:
            log.warning("cannot write the audit log: %s", exc)

    def rejected(self, peer: str, reason: str, *, claimed_key: bytes = b"") -> None:
        """A stream refused before or during its handshake."""
        self._count()
        # Coalesced per address: a flood of bad connections is counted, not written out
        # one fsync at a time, and none goes unrecorded.
        self._log.record(
            peer_host(peer),
            reason,
            {
                "action": "node.rejected",
                "peer": peer,
                "reason": reason[:500],
                "key": fingerprint(claimed_key) if claimed_key else "",
            },
        )

    def lane_rejected(self, peer: str, reason: str) -> None:
        """A bulk lane connection refused."""
        self._count()
        self._log.record(
            peer_host(peer),
            reason,
            {"action": "node.lane_rejected", "peer": peer, "reason": reason[:500]},
        )

    def door_refused(self, host: str, reason: str) -> None:
        """A connection the front door refused before it reached gRPC (transport.py)."""
        self._count()
        self._log.record(
            host, reason, {"action": "node.rejected", "peer": host, "reason": reason[:500]}
        )

    def transport_mismatch(self, host: str, line: str) -> None:
        """A node dialling with the other transport (TLS against plaintext, or back)."""
        self._count()
        self._mismatches.record(
            host, line, {"action": "node.transport_mismatch", "peer": host, "reason": line}
        )

    def banned(self, host: str, line: str) -> None:
        """A peer banned for being cut too often (bans.py)."""
        self._bans.record(host, line, {"action": "node.banned", "peer": host, "reason": line})

    def _count(self) -> None:
        with self._counting:
            self.rejections += 1

    def flush(self, *, force: bool = False) -> None:
        """Write out the coalesced counts whose window has passed (all of them if ``force``)."""
        self._log.flush(force=force)
        self._mismatches.flush(force=force)
        self._bans.flush(force=force)

    def _write_rejection(self, detail: dict[str, Any]) -> None:
        action = detail.pop("action", "node.rejected")
        if "summary" in detail:
            log.warning("%s (%s)", detail["summary"], detail["reason"])
            self.record("node.rejected_summary", "unknown", **detail)
            return
        what = "bulk lane connection" if action == "node.lane_rejected" else "connection"
        log.warning("rejected %s from %s: %s", what, detail.get("peer"), detail.get("reason"))
        self.record(action, "unknown", **detail)

    def _write_ban(self, detail: dict[str, Any]) -> None:
        action = detail.pop("action", "node.banned")
        if "summary" in detail:
            detail["summary"] = detail["summary"].replace("rejected connections", "more bans")
            log.warning("%s (%s)", detail["summary"], detail["reason"])
            self.record("node.banned_summary", "unknown", **detail)
            return
        log.warning("%s (from %s)", detail["reason"], detail["peer"])
        self.record(action, "unknown", **detail)

    def _write_mismatch(self, detail: dict[str, Any]) -> None:
        action = detail.pop("action", "node.transport_mismatch")
        if "summary" in detail:
            detail["summary"] = detail["summary"].replace(
                "rejected connections", "connections on the wrong transport"
            )
            log.warning("%s", detail["summary"])
            self.record("node.transport_mismatch_summary", "unknown", **detail)
            return
        log.warning("%s", detail["reason"])
        self.record(action, "unknown", **detail)
