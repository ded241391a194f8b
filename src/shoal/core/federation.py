"""Federation and NodeGroup: choose nodes, place values at them, run tasks there.

``fed.sample(k)`` picks a NodeGroup; ``group.map("train", weights=w)`` runs a task at each
node and leaves the results there as NodeValues; only an aggregate brings them back.
Failed or late nodes are dropped from the round and reported, down to ``min_nodes``.
"""

from __future__ import annotations

import functools
import itertools
import logging
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shoal.core.roles import Roles
from shoal.core.values import FieldSpec, NodeValues
from shoal.errors import ConfigError, NotEnoughNodes, ShoalError, WireError
from shoal.runtime import SEND_KEY, SENT_PREFIX, Engine, Failure, FailureKind, Task
from shoal.runtime.audit import AuditEntry, AuditTrail, MemoryAuditLog
from shoal.runtime.request import request_digest
from shoal.wire import decode, encode

__all__ = ["Broadcast", "Federation", "NodeGroup", "Traffic"]

log = logging.getLogger("shoal.core")


@dataclass(frozen=True)
class Broadcast:
    """A server value placed at every node of a group; encoded once, sent to all."""

    values: Mapping[str, Any]
    encoded: bytes | memoryview = field(repr=False)


class Federation:
    """The server's view of a set of nodes reachable through an engine.

    ``audit`` is where it records what it asked of the nodes (``request``, ``reveal``,
    routing) and every refusal or decline a node reports: in memory by default, or the
    Store's hash-chained log (``store.audit_trail(run_id)``); ``audit_log`` reads it back.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        min_nodes: int = 1,
        deadline_s: float = 600.0,
        seed: int | None = None,
        audit: AuditTrail | None = None,
        roles: Mapping[str, Sequence[str] | str] | Roles | None = None,
    ) -> None:
        if min_nodes < 1:
            raise ConfigError(f"min_nodes must be at least 1, got {min_nodes}")
        if deadline_s <= 0:
            raise ConfigError(f"deadline_s must be positive, got {deadline_s}")
        self.engine = engine
        self.min_nodes = min_nodes
        self.deadline_s = deadline_s
        self._rng = np.random.default_rng(seed)
        self._sequence = itertools.count()
        # Task ids are unique across federations and coordinator restarts: a node refuses a
        # charged request whose id it has seen (a replay), so a restarted coordinator must
        # not reuse the ids of its previous life.
        self._token = secrets.token_hex(6)
        self.trail: AuditTrail = audit if audit is not None else MemoryAuditLog()
        # Roles of a multi-party job (guest, host, arbiter, ...), assigned by the job.
        self.roles: Roles | None = Roles.of(roles) if roles is not None else None
        self.routed_bytes = 0  # bytes relayed by values.to (per destination node)
        # Wire bytes of every task payload sent and every reply received (all tasks: maps,
        # fetches, secure-sum phases), in total and per node: the cost of a slow link.
        self.traffic = Traffic()

    @property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(self.engine.node_ids())

    def audit(self, action: str, **detail: Any) -> AuditEntry:
        """Append an entry to this federation's audit trail."""
        return self.trail.record(action, detail)

    @property
    def audit_log(self) -> tuple[AuditEntry, ...]:
        """The trail's entries, oldest first."""
        return tuple(self.trail.entries)

    def role(self, name: str) -> NodeGroup:
        """The NodeGroup of every node playing role ``name``; all must be connected."""
        if self.roles is None:
            raise ConfigError("this federation has no roles; pass Federation(roles={...})")
        nodes = self.roles.nodes(name)
        online = set(self.node_ids)
        missing = [n for n in nodes if n not in online]
        if missing:
            raise NotEnoughNodes(f"role {name!r}: node(s) {missing} are not connected")
        return NodeGroup(self, nodes)

    def role_of_group(self, group: NodeGroup) -> str:
        """The one role every node of ``group`` plays (routing targets a single role)."""
        if self.roles is None:
            raise ConfigError("routing needs roles; pass Federation(roles={...})")
        found = {self.roles.role_of(n) for n in group.node_ids}
        if len(found) != 1 or None in found:
            raise ConfigError(
                f"a routing target must be nodes of one role; these play {sorted(map(str, found))}"
            )
        return next(iter(found))  # type: ignore[return-value]

    def all(self) -> NodeGroup:
        return NodeGroup(self, self.node_ids)

    def group(self, node_ids: Sequence[str]) -> NodeGroup:
        known = set(self.node_ids)
        missing = [n for n in node_ids if n not in known]
        if missing:
            raise ConfigError(f"unknown or offline node(s): {missing[:5]}")
        return NodeGroup(self, tuple(node_ids))

    def sample(self, k: int, *, seed: int | None = None) -> NodeGroup:
        """``k`` nodes chosen uniformly without replacement (all available if fewer)."""
        if k < 1:
            raise ConfigError(f"sample size must be at least 1, got {k}")
        available = self.node_ids
        if len(available) < self.min_nodes:
            raise NotEnoughNodes(
                f"{len(available)} node(s) available, fewer than the minimum of "
                f"{self.min_nodes}; wait for more nodes to connect or lower min_nodes"
            )
        if k >= len(available):
            return NodeGroup(self, available)
        rng = self._rng if seed is None else np.random.default_rng(seed)
        chosen = rng.choice(len(available), size=k, replace=False)
        return NodeGroup(self, tuple(available[i] for i in sorted(chosen)))

    def sample_poisson(self, rate: float, *, seed: int | None = None) -> NodeGroup:
        """Each available node independently with probability ``rate`` (Poisson sampling,
        which differential-privacy accounting's amplification by sampling assumes)."""
        if not 0.0 < rate <= 1.0:
            raise ConfigError(f"sampling rate must be in (0, 1], got {rate}")
        available = self.node_ids
        rng = self._rng if seed is None else np.random.default_rng(seed)
        chosen = rng.random(len(available)) < rate
        group = tuple(node for node, keep in zip(available, chosen) if keep)
        if len(group) < self.min_nodes:
            raise NotEnoughNodes(
                f"Poisson sampling at rate {rate} chose {len(group)} of {len(available)} "
                f"node(s), fewer than the minimum of {self.min_nodes}"
            )
        return NodeGroup(self, group)

    def request(
        self,
        node_ids: Sequence[str],
        task: str,
        *,
        common: Mapping[str, Any] | Broadcast | None = None,
        per_node: Mapping[str, Mapping[str, Any]] | None = None,
        keep_as: str | None = None,
        deadline_s: float | None = None,
    ) -> tuple[dict[str, dict[str, Any]], dict[str, Failure]]:
        """Run ``task`` on nodes and return their decoded replies and failures.

        The replies are whatever the task sends back, and each node sends back only fields
        its task's release policy lets out in the clear (the others refuse: REJECTED). So
        this is for tasks whose outputs are public by design (protocol messages, kept-value
        receipts); it is recorded in the audit trail. Learning code uses
        :meth:`NodeGroup.map`, whose results stay at the nodes.
        """
        self.audit("request", task=task, nodes=len(node_ids), keep_as=keep_as)
        return self._dispatch(
            node_ids, task, common=common, per_node=per_node, keep_as=keep_as, deadline_s=deadline_s
        )

    def discard(self, handles: Mapping[str, Sequence[str]]) -> None:
        """Let nodes forget kept values (``handles[node]``): the code is done with them.

        Only a simulation engine, which hosts its nodes' state itself (``LocalEngine`` in
        this process, ``RayEngine`` in its actors), acts on it, through its optional
        ``forget`` method, with no dispatch: there, values kept by 10^5 idle nodes would be
        the engine's memory. A deployed node holds its own values on its own machine and
        drops the oldest past its ``max_kept``.
        """
        forget = getattr(self.engine, "forget", None)
        if callable(forget):
            forget({node: list(h) for node, h in handles.items() if h})

    def _dispatch(
        self,
        node_ids: Sequence[str],
        task: str,
        *,
        common: Mapping[str, Any] | Broadcast | None = None,
        per_node: Mapping[str, Mapping[str, Any]] | None = None,
        keep_as: str | None = None,
        deadline_s: float | None = None,
        elapsed: dict[str, float] | None = None,
    ) -> tuple[dict[str, dict[str, Any]], dict[str, Failure]]:
        """:meth:`request` without its own audit entry (maps and fetches, which are the
        Core API's normal path); node refusals are recorded all the same. ``elapsed`` gets
        each replying node's time for the task (virtual time on a simulated engine)."""
        sequence = next(self._sequence)
        shared: bytes | memoryview | None = (
            common.encoded if isinstance(common, Broadcast) else None
        )
        common_values = (common.values if isinstance(common, Broadcast) else common) or {}
        if shared is None and not per_node:
            shared = encode(common_values)
        tasks = []
        for node_id in node_ids:
            payload: bytes | memoryview
            if per_node is not None and node_id in per_node:
                payload = encode({**common_values, **per_node[node_id]})
            elif shared is not None:
                payload = shared
            else:
                payload = encode(common_values)
            tasks.append(
                Task(
                    node_id=node_id,
                    name=task,
                    payload=payload,
                    task_id=f"{self._token}.{sequence}/{node_id}",
                    keep_as=keep_as,
                )
            )
        self.traffic.add_all(down={t.node_id: len(t.payload) for t in tasks})
        result = self.engine.dispatch(tasks, deadline_s=deadline_s or self.deadline_s)
        self.traffic.add_all(up={n: len(r.payload) for n, r in result.replies.items()})
        replies: dict[str, dict[str, Any]] = {}
        failures: dict[str, Failure] = dict(result.failures)
        for node_id, reply in result.replies.items():
            if elapsed is not None:
                elapsed[node_id] = reply.elapsed_s
            try:
                replies[node_id] = decode(reply.payload)
            except WireError as exc:
                failures[node_id] = Failure(
                    node_id=node_id,
                    task_id=reply.task_id,
                    kind=FailureKind.INVALID,
                    detail=f"undecodable reply: {exc}",
                )
        for node_id in node_ids:
            if node_id not in replies and node_id not in failures:
                failures[node_id] = Failure(
                    node_id=node_id, task_id="", kind=FailureKind.DROPPED, detail="no reply"
                )
        for failure in failures.values():
            log.info(
                "node %s failed %s: %s (%s)",
                failure.node_id,
                task,
                failure.kind.value,
                failure.detail,
            )
            if failure.kind in (FailureKind.REJECTED, FailureKind.DECLINED):
                self.audit(
                    f"node.{failure.kind.value}",
                    node=failure.node_id,
                    task=task,
                    reason=failure.detail[:1000],
                )
        return replies, failures


class Traffic:
    """Bytes on the wire between the coordinator and the nodes, counted as they pass."""

    def __init__(self) -> None:
        self.down = 0  # coordinator -> nodes
        self.up = 0  # nodes -> coordinator
        self.down_by_node: Counter[str] = Counter()
        self.up_by_node: Counter[str] = Counter()

    def add(self, node_id: str, *, down: int = 0, up: int = 0) -> None:
        self.down += down
        self.up += up
        if down:
            self.down_by_node[node_id] += down
        if up:
            self.up_by_node[node_id] += up

    def add_all(
        self, *, down: Mapping[str, int] | None = None, up: Mapping[str, int] | None = None
    ) -> None:
        """:meth:`add` for many nodes at once (a dispatch's payloads, or its replies)."""
        if down:
            self.down += sum(down.values())
            self.down_by_node.update({node: size for node, size in down.items() if size})
        if up:
            self.up += sum(up.values())
            self.up_by_node.update({node: size for node, size in up.items() if size})

    def snapshot(self) -> tuple[int, int, dict[str, int], dict[str, int]]:
        return self.down, self.up, dict(self.down_by_node), dict(self.up_by_node)


class NodeGroup:
    """A set of nodes chosen for one step of a computation."""

    def __init__(self, federation: Federation, node_ids: Sequence[str]) -> None:
        self.federation = federation
        self.node_ids = tuple(node_ids)

    def __len__(self) -> int:
        return len(self.node_ids)

    def __repr__(self) -> str:
        return f"<NodeGroup of {len(self)} nodes>"

    def broadcast(self, **values: Any) -> Broadcast:
        """Place server values at every node of the group (encoded once for all of them)."""
        return Broadcast(values=values, encoded=encode(values))

    def map(
        self,
        task: str,
        broadcast: Broadcast | None = None,
        /,
        *,
        min_nodes: int | None = None,
        deadline_s: float | None = None,
        send: Sequence[str] = (),
        **values: Any,
    ) -> NodeValues:
        """Run ``task`` at every node; the results stay at the nodes as NodeValues.

        ``send`` names result fields the code will aggregate in the clear anyway: nodes send
        them with their receipts, which saves the fetch a plain aggregate would make. Leave
        it empty for anything a secure aggregate will handle. Raises NotEnoughNodes when
        fewer than ``min_nodes`` (default: the federation's) succeed; the failures of the
        others are reported on the returned values.
        """
        common: Broadcast
        if send:
            values = {**values, SEND_KEY: list(send)}
        if broadcast is not None and values:
            merged = {**broadcast.values, **values}
            common = Broadcast(values=merged, encoded=encode(merged))
        elif broadcast is not None:
            common = broadcast
        else:
            common = Broadcast(values=values, encoded=encode(values))
        # Every node gets these bytes: the digest each holder keeps with its value.
        request = request_digest(task, common.encoded)
        handle = f"v{next(self.federation._sequence)}"
        elapsed: dict[str, float] = {}
        replies, failures = self.federation._dispatch(
            self.node_ids,
            task,
            common=common,
            keep_as=handle,
            deadline_s=deadline_s,
            elapsed=elapsed,
        )
        specs: dict[str, dict[str, FieldSpec]] = {}
        sent: dict[str, dict[str, Any]] = {}
        wire_names = [(SENT_PREFIX + f, f) for f in send]
        # Every node of a map usually describes the same fields: a description equal to the
        # previous node's shares its parsed (read-only) specs.
        last_fields: Any = None
        last_specs: dict[str, FieldSpec] = {}
        for node_id, receipt in replies.items():
            try:
                fields = receipt.get("fields")
                if (
                    last_fields is not None
                    and receipt.get("kept") == handle
                    and fields == last_fields
                ):
                    specs[node_id] = last_specs
                else:
                    specs[node_id] = last_specs = _parse_receipt(receipt, handle)
                    last_fields = fields
                if send:
                    sent[node_id] = {f: receipt[k] for k, f in wire_names if k in receipt}
            except ShoalError as exc:
                failures[node_id] = Failure(
                    node_id=node_id, task_id="", kind=FailureKind.INVALID, detail=str(exc)
                )
        succeeded = [n for n in self.node_ids if n in specs]
        needed = self.federation.min_nodes if min_nodes is None else min_nodes
        if len(succeeded) < needed:
            kinds = sorted({f.kind.value for f in failures.values()})
            example = next(iter(failures.values()), None)
            raise NotEnoughNodes(
                f"task {task!r}: {len(succeeded)} of {len(self.node_ids)} node(s) succeeded, "
                f"fewer than the minimum of {needed} (failures: {', '.join(kinds) or 'none'}"
                + (f"; e.g. {example.node_id}: {example.detail}" if example else "")
                + ")"
            )
        return NodeValues(
            federation=self.federation,
            handle=handle,
            node_ids=succeeded,
            specs=specs,
            failures=failures,
            sent=sent,
            elapsed={n: elapsed[n] for n in succeeded if n in elapsed},
            request=request,
        )


def _parse_receipt(receipt: Mapping[str, Any], handle: str) -> dict[str, FieldSpec]:
    fields = receipt.get("fields")
    if receipt.get("kept") != handle or not isinstance(fields, dict):
        raise WireError("the node's receipt does not describe the value it kept")
    specs: dict[str, FieldSpec] = {}
    for name, spec in fields.items():
        parsed = _field_spec(spec) if type(spec) is str else None
        if parsed is None:
            raise WireError(_spec_problem(name, spec))
        specs[name] = parsed
    return specs


@functools.lru_cache(maxsize=1024)
def _field_spec(spec: str) -> FieldSpec | None:
    """The FieldSpec a description stands for, or None if it is malformed. Every node of a
    map usually describes the same fields: each description is parsed once and its frozen
    spec shared (a hostile node's odd descriptions only churn this bounded cache)."""
    dtype, colon, dims = spec.partition(":")
    if not colon or not dtype:
        return None
    try:
        shape = tuple(int(d) for d in dims.split(",")) if dims else ()
    except ValueError:
        return None
    if any(d < 0 for d in shape):
        return None
    return FieldSpec(dtype=dtype, shape=shape)


def _spec_problem(name: str, spec: object) -> str:
    dtype, colon, dims = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not colon or not dtype:
        return f"bad field description for {name!r}: expected 'dtype:d0,d1,...'"
    return f"bad shape for field {name!r}: {dims!r}"
