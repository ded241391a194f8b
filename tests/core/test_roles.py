"""Roles and routing: fed.role(...), values.to(...), and a hostile coordinator that tries to
route what the node's owner did not seal for that role."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from shoal.core import Federation, Roles
from shoal.core.routing import ENFORCED, received
from shoal.crypto import paillier as P
from shoal.errors import ConfigError, NotEnoughNodes
from shoal.runtime import LocalEngine, NodeApp
from shoal.runtime.roles import NodeApps

KEYS = P.generate_keypair(512, insecure=True)
# Node-side enforcement of 'sealed' needs the runtime's release policies.
needs_policies = pytest.mark.skipif(
    not ENFORCED, reason="this runtime has no release policies (shoal.forward) yet"
)


def _task(app: NodeApp, name: str, release: dict[str, str]):
    if "release" in inspect.signature(app.register).parameters:
        return app.task(name, release=release)
    return app.task(name)


def _apps() -> NodeApps:
    pk, sk = KEYS
    sender = NodeApp()

    @_task(sender, "make", {"enc.*": "sealed:arbiter", "plain": "clear", "secret": "never"})
    def make(ctx, payload):
        enc = P.encrypt(pk, np.arange(3.0) + float(payload["k"]))
        return {
            **{f"enc.{k}": v for k, v in enc.to_payload().items()},
            "plain": 1.0,
            "secret": np.ones(2),
        }

    arbiter = NodeApp()

    @_task(arbiter, "open", {"*": "clear"})
    def open_(ctx, payload):
        parts = {k: received(payload, f"enc.{k}") for k in ("ct", "shape", "frac_bits")}
        out = {}
        for src in parts["ct"]:
            vec = P.EncryptedVector.from_payload(pk, {k: parts[k][src] for k in parts})
            out[src] = P.decrypt(sk, vec)
        return out

    other = NodeApp()

    @_task(other, "open", {"*": "clear"})
    def peek(ctx, payload):
        ctx.state["seen"] = {k: v for k, v in payload.items() if k.startswith("routed/")}
        return {"n": len(ctx.state["seen"])}

    return NodeApps({"h1": sender, "h2": sender, "arb": arbiter, "g": other})


def _fed() -> tuple[Federation, LocalEngine]:
    engine = LocalEngine(_apps(), nodes=["h1", "h2", "arb", "g"])
    fed = Federation(engine, roles={"host": ["h1", "h2"], "arbiter": "arb", "guest": ["g"]})
    return fed, engine


def test_roles_validate() -> None:
    with pytest.raises(ConfigError, match="two roles"):
        Roles.of({"host": ["a"], "guest": ["a"]})
    with pytest.raises(ConfigError, match="names no node"):
        Roles.of({"host": []})
    with pytest.raises(ConfigError, match="role names"):
        Roles.of({"ho st": ["a"]})
    fed, _ = _fed()
    assert fed.role("host").node_ids == ("h1", "h2")
    with pytest.raises(ConfigError, match="no role"):
        fed.role("lab")


def test_sealed_value_is_routed_and_audited() -> None:
    fed, _ = _fed()
    made = fed.role("host").map("make", k=10)
    sealed = made.select("enc.ct", "enc.shape", "enc.frac_bits")
    opened = sealed.to(fed.role("arbiter"), task="open", send=["h1", "h2"])
    got = opened.select("h1", "h2").reveal()
    np.testing.assert_allclose(got["arb"]["h1"], [10, 11, 12])
    routes = [e for e in fed.audit_log if e.action == "route"]
    assert len(routes) == 1
    detail = routes[0].detail
    assert detail["role"] == "arbiter" and detail["sources"] == ["h1", "h2"]
    assert detail["to"] == ["arb"] and detail["bytes"] > 0


@needs_policies
def test_hostile_coordinator_cannot_route_unsealed_or_to_wrong_role() -> None:
    from shoal.runtime import FORWARD_TASK

    fed, engine = _fed()
    made = fed.role("host").map("make", k=0)
    # a field the owner declared 'never'
    with pytest.raises(NotEnoughNodes, match="never"):
        made.select("secret").to(fed.role("arbiter"), task="open")
    # a sealed field, but to a role it was not sealed for
    with pytest.raises(NotEnoughNodes, match="refuses"):
        made.select("enc.ct").to(fed.role("guest"), task="open")
    assert not engine.node_state("g").get("seen")
    # bypassing values.to: asking the node's forward task directly for the wrong role
    replies, failures = fed.request(
        ["h1"], FORWARD_TASK, common={"handle": made.handle, "fields": ["enc.ct"], "role": "guest"}
    )
    assert not replies and failures["h1"].kind.value == "rejected"
    refused = [e for e in fed.audit_log if e.action == "route.refused"]
    assert len(refused) == 2
    # the coordinator lying about the destination (role 'arbiter', node of another role):
    # the honest Federation refuses, and what a hostile one could deliver is ciphertext under
    # the arbiter's key, which the guest cannot read
    with pytest.raises(ConfigError, match="one role"):
        made.select("enc.ct").to(fed.group(["g", "arb"]), task="open")
    replies, _ = fed.request(
        ["h1"],
        FORWARD_TASK,
        common={"handle": made.handle, "fields": ["enc.ct"], "role": "arbiter"},
    )
    raw = np.asarray(replies["h1"]["enc.ct"])
    assert raw.shape[1] == KEYS[0].ciphertext_bytes
    assert not {0, 1, 2} & {int.from_bytes(bytes(r), "big") for r in raw}


def test_routing_needs_roles_and_a_connected_role() -> None:
    engine = LocalEngine(_apps(), nodes=["h1", "h2", "arb", "g"])
    plain = Federation(engine)
    with pytest.raises(ConfigError, match="roles"):
        plain.role("host")
    fed, engine = _fed()
    engine.set_offline(["arb"])
    with pytest.raises(NotEnoughNodes, match="not connected"):
        fed.role("arbiter")
