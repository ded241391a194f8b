"""The datasite as a shoal node for federated requests.

A :class:`~shoal.runtime.NodeApp` with one task of the site's own, ``datasite.hold``, which
keeps an approved ``secure-sum`` request's result at the site under release policy
``secure`` (it leaves only as the input of a secure sum; ``shoal.fetch`` of it is refused),
and shoal's SecAgg+ tasks with keys signed by the site's identity key. Each request has its
own node state (held values, SecAgg+ sessions, in memory); the node's refusals and declines
go into the datasite's own hash-chained audit trail.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from shoal.crypto.secagg import ADVERTISE_TASK, AdvertiseRequest, secure_sum_tasks
from shoal.datasite.federated import HOLD_TASK, SiteIdentity, verify
from shoal.errors import ProtocolError
from shoal.runtime.app import NodeApp, TaskContext, TaskSpec
from shoal.runtime.nodestate import NodeState

if TYPE_CHECKING:
    from shoal.datasite.state import DatasiteState

__all__ = ["FEDERATION_KEY", "SiteKeys", "SiteNodeState", "site_app"]

# Where a request's node state keeps the federation its owner approved.
FEDERATION_KEY = "datasite.federation"
# A held result may be read only into a secure sum.
HOLD_RELEASE = {"result": "secure"}


class SiteNodeState(NodeState):
    """The node's audit entries, written into the datasite's audit chain (actor ``node``)."""

    def __init__(self, *, state: DatasiteState, node_id: str, request: int) -> None:
        super().__init__(node_id=node_id)
        self._state = state
        self._request = request

    def _append(self, action: str, detail: Mapping[str, Any]) -> None:
        with self._state.tx() as conn:
            self._state._audit(conn, "node", f"node.{action}", {"request": self._request, **detail})


class SiteKeys:
    """The site's :class:`~shoal.crypto.secagg.KeyAuthority`: it signs with the site's
    identity key and trusts exactly the keys of the federation its owner approved."""

    def __init__(self, identity: SiteIdentity) -> None:
        self.identity = identity

    def sign(self, ctx: Any, message: bytes) -> bytes:
        return self.identity.sign(message)

    def verify(self, ctx: Any, peer: str, message: bytes, signature: bytes) -> bool:
        key = ctx.state[FEDERATION_KEY]["sites"].get(peer)
        return key is not None and len(signature) == 64 and verify(key, signature, message)


def check_round(params: Any, federation: Mapping[str, Any], me: str) -> None:
    """A SecAgg+ round this site joins: approved sites only, this one among them, the
    agreed vector, and never fewer survivors than the federation's ``min_sites``."""
    sites = federation["sites"]
    strangers = sorted(set(params.nodes) - set(sites))
    if strangers or me not in params.nodes:
        raise ProtocolError(
            f"the round's participants {sorted(params.nodes)} are not within the approved "
            f"federation {sorted(sites)} (with this site, {me!r})"
        )
    need = int(federation.get("min_sites", len(sites)))
    if params.min_survivors < need:
        raise ProtocolError(
            f"the round would unmask a sum of {params.min_survivors} site(s), fewer than the "
            f"approved federation's min_sites {need}"
        )
    if params.vector_length != math.prod(federation["shape"]):
        raise ProtocolError(
            f"the round's vector has {params.vector_length} numbers, not the agreed "
            f"{math.prod(federation['shape'])} (shape {federation['shape']})"
        )


def site_app(identity: SiteIdentity, hold: Any) -> NodeApp:
    """The site's NodeApp. ``hold(ctx)`` returns ``{"result": array}`` for the request in
    ``ctx.data``, after checking and charging (it runs once per request)."""
    app = NodeApp(max_kept=2, require_release=True)
    app.register(HOLD_TASK, lambda ctx, payload: hold(ctx), release=HOLD_RELEASE)
    tasks = secure_sum_tasks(authority=SiteKeys(identity))
    advertise = tasks[ADVERTISE_TASK]

    def checked_advertise(ctx: TaskContext, payload: dict[str, Any]) -> Any:
        params = AdvertiseRequest.from_dict(payload).params
        check_round(params, ctx.state[FEDERATION_KEY], ctx.node_id)
        return advertise.fn(ctx, payload)

    tasks[ADVERTISE_TASK] = TaskSpec(checked_advertise, advertise.release)
    app.install(tasks)
    return app
