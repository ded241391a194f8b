"""Housekeeping on a thread of its own: drop nodes that fell silent (no heartbeat) and
streams that never finished their handshake, drop nodes revoked in the registry, and write
out coalesced rejection counts."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import grpc

from shoal.runtime.grpc.config import CoordinatorConfig
from shoal.runtime.grpc.registry import AdmittedNodes
from shoal.runtime.grpc.sessions import Session, SessionTable
from shoal.runtime.grpc.trail import Trail

__all__ = ["Monitor"]


class Monitor:
    """Runs until ``stop`` is set; ``end_session(session, reason)`` ends a session."""

    def __init__(
        self,
        *,
        config: CoordinatorConfig,
        table: SessionTable,
        admitted: AdmittedNodes,
        trail: Trail,
        end_session: Callable[[Session, str], None],
        stop: threading.Event,
    ) -> None:
        self.config = config
        self.table = table
        self.admitted = admitted
        self.trail = trail
        self.end_session = end_session
        self.stop = stop
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="shoal-monitor", daemon=True)
        self._thread.start()

    def join(self, timeout_s: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout=timeout_s)
            self._thread = None

    def _run(self) -> None:
        config = self.config
        tick = min(1.0, config.heartbeat_s / 2, config.registry_refresh_s)
        silent_after_s = config.silent_after_s
        last_registry = time.monotonic()
        while not self.stop.wait(tick):
            self.trail.flush()
            now = time.monotonic()
            for s in self.table.all_open():
                if not s.authenticated and now - s.opened > config.handshake_timeout_s:
                    self.trail.rejected(s.peer, "no hello within the handshake timeout")
                    self.end_session(s, "handshake timed out")
                    s.context.cancel()
                elif s.authenticated and now - s.last_seen > silent_after_s:
                    self.end_session(s, f"silent for {now - s.last_seen:.0f} s")
                    s.context.cancel()
            if now - last_registry > config.registry_refresh_s:
                last_registry = now
                self.admitted.refresh()
                revoked = [s for s in self.table.connected() if s.node_id not in self.admitted.ids]
                for s in revoked:
                    s.abort(grpc.StatusCode.PERMISSION_DENIED, "node was revoked", reason="revoked")
                    self.end_session(s, "revoked")
