"""Routing sealed values between roles: ``values.to(group, task=...)``.

The holders release the selected fields through the runtime's ``shoal.forward`` task, which
lets out only fields whose release policy is ``sealed`` for the destination role (or
clear); the coordinator relays the bytes, which it cannot read (ciphertexts under another
party's key, masked vectors), to a task at the destination nodes, records the move in its
audit trail, and gets back NodeValues placed at the destination.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from shoal.errors import ConfigError, NotEnoughNodes, WireError
from shoal.runtime import FETCH_TASK

if TYPE_CHECKING:
    from shoal.core.federation import NodeGroup
    from shoal.core.values import NodeValues

__all__ = ["ENFORCED", "ROUTED_FROM", "ROUTED_PREFIX", "received", "route"]

ROUTED_PREFIX = "routed/"
ROUTED_FROM = "routed.from"
# The runtime's checked forward (release policies, ``sealed:<roles>``). A runtime without
# release policies has none: routing then reads the fields with the plain fetch, which
# releases anything, so only the values' own sealing (encryption, masks) protects them.
_FORWARD: str | None = getattr(importlib.import_module("shoal.runtime"), "FORWARD_TASK", None)
ENFORCED = _FORWARD is not None


def route(
    values: NodeValues,
    group: NodeGroup,
    *,
    task: str,
    min_nodes: int | None = None,
    deadline_s: float | None = None,
    send: Sequence[str] = (),
    **extra: Any,
) -> NodeValues:
    """Forward ``values``' fields from their holders to ``task`` at ``group`` (one role)."""
    fed = values.federation
    if group.federation is not fed:
        raise ConfigError("route to a group of the same federation")
    role = fed.role_of_group(group)
    fields = list(values.field_names)
    if not values.node_ids:
        raise NotEnoughNodes("no node holds these values; nothing to route")
    if _FORWARD is not None:
        task_name, common = _FORWARD, {"handle": values.handle, "fields": fields, "role": role}
    else:
        task_name, common = FETCH_TASK, {"handle": values.handle, "fields": fields}
    replies, failures = fed.request(
        values.node_ids, task_name, common=common, deadline_s=deadline_s
    )
    if failures:
        first = next(iter(failures.values()))
        fed.audit(
            "route.refused",
            handle=values.handle,
            fields=fields,
            role=role,
            nodes=sorted(failures),
            reason=first.detail[:500],
        )
        raise NotEnoughNodes(
            f"routing {fields} to role {role!r}: {len(failures)} holder(s) did not release "
            f"them ({first.kind.value} at {first.node_id}: {first.detail})"
        )
    relayed: dict[str, Any] = {ROUTED_FROM: list(replies)}
    size = 0
    for source, payload in replies.items():
        missing = [f for f in fields if f not in payload]
        if missing:
            raise WireError(f"node {source!r} forwarded no field(s) {missing}")
        for name in fields:
            value = payload[name]
            relayed[f"{ROUTED_PREFIX}{source}/{name}"] = value
            size += value.nbytes if isinstance(value, np.ndarray) else len(str(value))
    fed.audit(
        "route",
        handle=values.handle,
        fields=fields,
        sources=sorted(replies),
        role=role,
        to=list(group.node_ids),
        task=task,
        bytes=size,
    )
    fed.routed_bytes += size * len(group)
    return group.map(
        task, min_nodes=min_nodes, deadline_s=deadline_s, send=send, **extra, **relayed
    )


def received(payload: Mapping[str, Any], field: str) -> dict[str, Any]:
    """At the destination: ``{source node: value}`` of one routed field (node side)."""
    sources = payload.get(ROUTED_FROM)
    if not isinstance(sources, list) or not all(isinstance(s, str) for s in sources):
        raise WireError("this task expects routed values (it is the target of values.to)")
    out = {}
    for source in sources:
        key = f"{ROUTED_PREFIX}{source}/{field}"
        if key not in payload:
            raise WireError(f"no routed field {field!r} from {source!r}")
        out[source] = payload[key]
    return out
