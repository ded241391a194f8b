"""The coordinator's view of its node registry: which nodes are admitted, by which key, in
which order (a node's place in natural order seeds its randomness, as in a simulation)."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable, Sequence
from typing import Protocol

import grpc

from shoal.errors import ConfigError, ShoalError
from shoal.runtime.grpc.auth import fingerprint
from shoal.runtime.grpc.sessions import SessionAbort, natural
from shoal.runtime.store import NodeRecord

__all__ = ["AdmittedNodes", "NodeRegistry"]

log = logging.getLogger("shoal.deploy")


class NodeRegistry(Protocol):
    """Where admitted nodes' public keys live (the Store implements it)."""

    def list_nodes(self, *, include_revoked: bool = True) -> list[NodeRecord]: ...


class AdmittedNodes:
    """The registry's current non-revoked node ids, re-read on demand."""

    def __init__(self, registry: NodeRegistry) -> None:
        self.registry = registry
        self.ids: frozenset[str] = frozenset()
        self._order: dict[str, int] = {}  # node id -> its place in natural order

    def refresh(self) -> None:
        try:
            records = self.registry.list_nodes(include_revoked=False)
        except ShoalError as exc:
            log.warning("cannot read the node registry: %s", exc)
            return
        self._update(r.node_id for r in records)

    def _update(self, node_ids: Iterable[str]) -> None:
        ids = frozenset(node_ids)
        if ids != self.ids:  # sorting is the costly part: redo it only on a change
            order = {v: i for i, v in enumerate(sorted(ids, key=natural))}
            self.ids, self._order = ids, order

    def index(self, node_id: str) -> int:
        """The node's place in natural order (past the end if it is not admitted)."""
        order = self._order
        return order.get(node_id, len(order))

    def check_known(self, node_ids: Sequence[str]) -> None:
        """Raise ConfigError for a node the registry has never admitted (read afresh first)."""
        unknown = [n for n in node_ids if n not in self.ids]
        if unknown:
            self.refresh()
            unknown = [n for n in unknown if n not in self.ids]
            if unknown:
                raise ConfigError(f"no node {unknown[0]!r} in this federation's registry")

    def lookup(self, public_key: bytes) -> NodeRecord:
        """The admitted node holding ``public_key``; SessionAbort if none or revoked."""
        records = self.registry.list_nodes(include_revoked=True)
        self._update(r.node_id for r in records if not r.revoked)
        for record in records:
            if hmac.compare_digest(record.public_key, public_key):
                if record.revoked:
                    raise SessionAbort(
                        grpc.StatusCode.PERMISSION_DENIED,
                        f"node {record.node_id!r} has been revoked",
                    )
                return record
        raise SessionAbort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"public key {fingerprint(public_key)} is not registered with this coordinator; "
            "its operator admits a node with `shoal nodes add NODE.pub`",
        )
