"""Node-side SecAgg+ tasks, ready to install on a NodeApp: ``app.install(secagg_tasks())``.

Each task is ``(ctx, payload) -> payload``: it decodes the server's message, advances the
node's session (kept in ``ctx.state`` under the round id) and returns the encoded reply. The
masked-input task reads the node's vector through ``get_input`` and, when the payload
carries ``clip``, quantizes real values with the round's modulus first.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np

from shoal.crypto.quantize import Quantizer
from shoal.crypto.secagg.messages import (
    AdvertiseRequest,
    MaskedInputRequest,
    ShareKeysRequest,
    UnmaskRequest,
)
from shoal.crypto.secagg.node import SecAggNode
from shoal.errors import ProtocolError, ReleaseRefused, TaskError

__all__ = [
    "ADVERTISE_TASK",
    "MASKED_INPUT_TASK",
    "SHARE_TASK",
    "STATE_KEY",
    "UNMASK_TASK",
    "InputGetter",
    "KeyAuthority",
    "PreparedInput",
    "input_context",
    "kept_input",
    "quantizer_for",
    "secagg_tasks",
    "signed_keys",
]

ADVERTISE_TASK = "shoal.secagg.advertise"
SHARE_TASK = "shoal.secagg.share"
MASKED_INPUT_TASK = "shoal.secagg.masked_input"
UNMASK_TASK = "shoal.secagg.unmask"
STATE_KEY = "shoal.secagg"
MAX_SESSIONS = 4  # a node forgets the oldest rounds: their secrets must not pile up


class _Context(Protocol):
    node_id: str
    state: dict[str, Any]


class KeyAuthority(Protocol):
    """Identity keys for SecAgg+ keys: a node signs the keys it advertises and checks its
    peers' signatures before sharing secrets with them, so a server cannot stand in for a
    node by advertising keys of its own (Bonawitz et al.'s signed variant; the server only
    relays the signatures). ``ctx`` is the task's context (whose peers are trusted may
    depend on the node's state)."""

    def sign(self, ctx: Any, message: bytes) -> bytes: ...

    def verify(self, ctx: Any, peer: str, message: bytes, signature: bytes) -> bool: ...


def signed_keys(round_id: str, node: str, c_public: bytes, s_public: bytes) -> bytes:
    """The bytes a node signs: which round, which node, which two public keys."""
    import json

    text = {"round": round_id, "node": node, "c": c_public.hex(), "s": s_public.hex()}
    return json.dumps(text, sort_keys=True, separators=(",", ":")).encode()


# (ctx, payload, group) -> the node's input; ``group`` is the number of participants in
# the round's SecAgg+ parameters, which this node validated and key-agrees within.
InputGetter = Callable[[Any, Mapping[str, Any], int], Any]


@dataclass(frozen=True)
class PreparedInput:
    """An input whose getter has more to do once the node masked it or refused to: error
    feedback keeps, in the node's state, what it sent only if it did. ``settle(True)`` runs
    after the masked reply is built, ``settle(False)`` if masking raised."""

    value: Any
    settle: Callable[[bool], None]


def kept_input(ctx: Any, payload: Mapping[str, Any], group: int) -> Any:
    """The vector a node kept from an earlier task: ``payload["handle"]``, ``payload["field"]``,
    read through the runtime's checked accessor (its policy must allow a secure sum)."""
    from shoal.runtime.app import read_held  # the runtime is a lower layer; import on use

    handle, name = payload.get("handle"), payload.get("field")
    if not isinstance(handle, str) or not isinstance(name, str):
        raise TaskError(
            f"{MASKED_INPUT_TASK} needs 'handle' and 'field' naming the value the node kept"
        )
    request = payload.get("request")
    return read_held(
        ctx,
        handle,
        [name],
        use="secure",
        group=group,
        request=request if isinstance(request, str) else None,
    )[name]


# The masked-input request's entries that say how a node reads and prepares its input.
# "request" is the digest of the request that produced the value (runtime/request.py).
_INPUT_KEYS = ("handle", "field", "fields", "clip", "transforms", "request")


def input_context(payload: Mapping[str, Any]) -> str:
    """How a masked-input request tells a node to read and prepare its input (the value
    kept, the digest of the request that produced it, its fields, the clip and node
    transforms), as one canonical text.

    The coordinator fixes it in the round's parameters (``SecAggParams.context``), which
    every pair's keys depend on, and each node refuses a request that differs from it: so
    no participant can be told to clip its input to zero or read another field while the
    others sum theirs, which would make the "sum" one node's value. The request digest
    extends that to before the sum: a node whose value came from another request (a zero
    learning rate, a query selecting no row) refuses to mask it.
    """
    chosen = {k: payload[k] for k in _INPUT_KEYS if k in payload}
    try:
        return json.dumps(chosen, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"a masked-input request names its input malformedly: {exc}") from None


def quantizer_for(clip: float, *, nodes: int, bits: int) -> Quantizer:
    """The quantizer nodes and server share for a round of ``nodes`` with modulus 2**bits."""
    return Quantizer(clip=clip, max_inputs=nodes, bits=bits)


def _sessions(ctx: _Context) -> OrderedDict[str, SecAggNode]:
    sessions: OrderedDict[str, SecAggNode] = ctx.state.setdefault(STATE_KEY, OrderedDict())
    return sessions


def _session(ctx: _Context, round_id: str) -> SecAggNode:
    node = _sessions(ctx).get(round_id)
    if node is None:
        raise ProtocolError(
            f"node {ctx.node_id!r} has no SecAgg session for round {round_id!r} (never "
            "advertised, or forgotten)"
        )
    return node


def secagg_tasks(
    get_input: InputGetter = kept_input, *, authority: KeyAuthority | None = None
) -> dict[str, Any]:
    """The four node-side tasks, by name, each with its release policy (TaskSpec).

    With ``authority`` the node signs its advertised keys and shares secrets only with
    peers whose keys carry a signature the authority accepts.
    """
    from shoal.runtime.app import TaskSpec  # the runtime is a lower layer; import on use

    def advertise(ctx: _Context, payload: dict[str, Any]) -> dict[str, Any]:
        request = AdvertiseRequest.from_dict(payload)
        sessions = _sessions(ctx)
        round_id = request.params.round_id
        if round_id in sessions:
            raise ProtocolError(f"round {round_id!r} was already advertised; keys are not reissued")
        node = SecAggNode(node_id=ctx.node_id)
        reply = node.advertise(request)
        sessions[round_id] = node
        while len(sessions) > MAX_SESSIONS:
            sessions.popitem(last=False)
        if authority is not None:
            message = signed_keys(reply.round_id, reply.node_id, reply.c_public, reply.s_public)
            reply = replace(reply, signature=authority.sign(ctx, message))
        return reply.to_dict()

    def share(ctx: _Context, payload: dict[str, Any]) -> dict[str, Any]:
        request = ShareKeysRequest.from_dict(payload)
        if authority is not None:
            signatures = request.signatures or (b"",) * len(request.peers)
            for i, peer in enumerate(request.peers):
                message = signed_keys(
                    request.round_id, peer, request.c_publics[i], request.s_publics[i]
                )
                if not authority.verify(ctx, peer, message, signatures[i]):
                    raise ProtocolError(
                        f"the keys given for peer {peer!r} are not signed by its identity "
                        "key: refusing to share secrets with it"
                    )
        return _session(ctx, request.round_id).share_keys(request).to_dict()

    def masked_input(ctx: _Context, payload: dict[str, Any]) -> dict[str, Any]:
        request = MaskedInputRequest.from_dict(payload)
        node = _session(ctx, request.round_id)
        params = node.params
        if params is None:
            raise ProtocolError("the SecAgg session has no parameters yet")
        if input_context(payload) != params.context:
            raise ReleaseRefused(
                "the masked-input request reads or prepares this node's input differently "
                "from the round's parameters, which every participant agreed on: refusing "
                "(a coordinator could otherwise clip the others' inputs to zero and read "
                "this node's value as the sum)"
            )
        # The group is the participant list of the parameters this node checked when it
        # advertised its keys, not anything the masked-input request claims.
        got = get_input(ctx, payload, len(params.nodes))
        prepared = got if isinstance(got, PreparedInput) else None
        try:
            value = np.asarray(prepared.value if prepared is not None else got)
            if value.size != params.vector_length:
                raise ProtocolError(
                    f"this node's input, read and prepared as the request says, has "
                    f"{value.size} entries, but the round's parameters ask for "
                    f"{params.vector_length} (a subset or field list of another size): "
                    "refusing to mask it"
                )
            clip = payload.get("clip")
            if clip is not None:
                if not isinstance(clip, (int, float)) or isinstance(clip, bool):
                    raise ProtocolError("'clip' must be a number")
                quantizer = quantizer_for(float(clip), nodes=len(params.nodes), bits=params.bits)
                value = quantizer.quantize(value.ravel())
            reply = node.masked_input(request, value).to_dict()
        except BaseException:
            if prepared is not None:
                prepared.settle(False)
            raise
        if prepared is not None:
            prepared.settle(True)
        return reply

    def unmask(ctx: _Context, payload: dict[str, Any]) -> dict[str, Any]:
        request = UnmaskRequest.from_dict(payload)
        return _session(ctx, request.round_id).unmask(request).to_dict()

    # Every reply is a protocol message meant for the coordinator: public keys, shares
    # encrypted to other nodes, a masked vector, the shares that unmask the sum. The node's
    # own value enters only through get_input, which reads it under its task's policy.
    protocol = {"*": "clear"}
    return {
        ADVERTISE_TASK: TaskSpec(advertise, protocol),
        SHARE_TASK: TaskSpec(share, protocol),
        MASKED_INPUT_TASK: TaskSpec(masked_input, protocol),
        UNMASK_TASK: TaskSpec(unmask, protocol),
    }
