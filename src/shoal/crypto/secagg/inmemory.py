"""Run a whole SecAgg+ round in one process: the server and node state machines, no network.

Every message goes through its wire form (``to_dict`` / ``from_dict``), so this exercises
what a deployment sends. Used by tests and for timing; dropouts are scripted per phase.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import numpy as np

from shoal.crypto.secagg.messages import (
    AdvertiseReply,
    AdvertiseRequest,
    MaskedInputReply,
    MaskedInputRequest,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)
from shoal.crypto.secagg.node import SecAggNode
from shoal.crypto.secagg.params import SecAggParams
from shoal.crypto.secagg.server import SecAggServer, ServerPhase
from shoal.errors import ConfigError, ProtocolError

__all__ = ["PHASES", "run_secagg_in_memory"]

PHASES = ("advertise", "share_keys", "masked_input", "unmask")

_M = TypeVar("_M")


def _normalise_drops(
    drop_at: Mapping[Any, Iterable[str]] | None, nodes: set[str]
) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {phase: set() for phase in PHASES}
    for phase, dropped in (drop_at or {}).items():
        name = phase.value if isinstance(phase, ServerPhase) else phase
        if name not in out:
            raise ConfigError(f"unknown SecAgg phase {phase!r}; phases are {list(PHASES)}")
        dropped = set(dropped)
        if not dropped <= nodes:
            raise ConfigError(f"drop_at[{name!r}] names non-participants {sorted(dropped - nodes)}")
        out[name] |= dropped
    return out


def _wire(message: Any, kind: type[_M], through_dicts: bool) -> _M:
    if not through_dicts:
        return message
    return kind.from_dict(message.to_dict())  # type: ignore[attr-defined]


def run_secagg_in_memory(
    inputs: Mapping[str, Any],
    params: SecAggParams,
    drop_at: Mapping[Any, Iterable[str]] | None = None,
    *,
    through_dicts: bool = True,
) -> np.ndarray:
    """The sum modulo 2**bits of the inputs of the nodes that survive to send a masked input.

    ``inputs`` maps every node of ``params.nodes`` to an integer vector in [0, 2**bits).
    ``drop_at[phase]`` holds nodes that stop answering from that phase on (phases:
    advertise, share_keys, masked_input, unmask). A node whose own checks fail (it raises
    ProtocolError) drops out too, as it would in a deployment. Raises ProtocolError
    (NotEnoughNodes) when more nodes fail than the round tolerates.
    """
    if set(inputs) != set(params.nodes):
        raise ConfigError("inputs must hold one vector for every node in params.nodes")
    drops = _normalise_drops(drop_at, set(params.nodes))
    gone: set[str] = set()
    server = SecAggServer(params=params)
    nodes = {v: SecAggNode(node_id=v) for v in params.nodes}

    def alive(phase: str, asked: Iterable[str]) -> list[str]:
        gone.update(drops[phase])
        return [v for v in asked if v not in gone]

    def answer(v: str, step: Any) -> Any:
        try:
            return step()
        except ProtocolError:
            gone.add(v)  # a node that refuses simply stops taking part
            return None

    request0 = _wire(server.advertise_request(), AdvertiseRequest, through_dicts)
    replies0 = {}
    for v in alive("advertise", params.nodes):
        r = answer(v, lambda v=v: nodes[v].advertise(request0))
        if r is not None:
            replies0[v] = _wire(r, AdvertiseReply, through_dicts)
    requests1 = server.collect_keys(replies0)

    replies1 = {}
    for v in alive("share_keys", requests1):
        req1 = _wire(requests1[v], ShareKeysRequest, through_dicts)
        r = answer(v, lambda v=v, req=req1: nodes[v].share_keys(req))
        if r is not None:
            replies1[v] = _wire(r, ShareKeysReply, through_dicts)
    requests2 = server.collect_shares(replies1)

    replies2 = {}
    for v in alive("masked_input", requests2):
        req2 = _wire(requests2[v], MaskedInputRequest, through_dicts)
        r = answer(v, lambda v=v, req=req2: nodes[v].masked_input(req, inputs[v]))
        if r is not None:
            replies2[v] = _wire(r, MaskedInputReply, through_dicts)
    requests3 = server.collect_masked(replies2)

    replies3 = {}
    for v in alive("unmask", requests3):
        req3 = _wire(requests3[v], UnmaskRequest, through_dicts)
        r = answer(v, lambda v=v, req=req3: nodes[v].unmask(req))
        if r is not None:
            replies3[v] = _wire(r, UnmaskReply, through_dicts)
    return server.finish(replies3)
