"""Malformed, tampered and misrouted messages: a clear ProtocolError, never a crash or a
silently wrong sum."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shoal.crypto import keys
from shoal.crypto.secagg import (
    AdvertiseRequest,
    MaskedInputReply,
    MaskedInputRequest,
    SecAggNode,
    ShareKeysRequest,
    UnmaskRequest,
)
from shoal.errors import ConfigError, ProtocolError


def flip(blob: bytes, i: int = -1) -> bytes:
    b = bytearray(blob)
    b[i] ^= 0x01
    return bytes(b)


@pytest.fixture
def shared(make_round: Any) -> Any:
    r = make_round(7, vector_length=16, max_dropouts=2)
    r.advertise()
    r.share()
    return r


def test_tampered_share_ciphertext(shared: Any) -> None:
    v = "node-00"
    req = shared.masked_requests[v]
    bad = replace(req, ciphertexts=(flip(req.ciphertexts[0]), *req.ciphertexts[1:]))
    with pytest.raises(ProtocolError, match="authentication"):
        shared.nodes[v].masked_input(bad, shared.inputs[v])
    # the refusal left the node untouched: the genuine request still works
    shared.nodes[v].masked_input(req, shared.inputs[v])


def test_share_delivered_to_the_wrong_peer(shared: Any) -> None:
    a, b = "node-00", "node-01"
    req_a, req_b = shared.masked_requests[a], shared.masked_requests[b]
    common = next(u for u in req_a.senders if u in req_b.senders)
    # the ciphertext common -> b, handed to a as if it were common -> a
    stolen = req_b.ciphertexts[req_b.senders.index(common)]
    i = req_a.senders.index(common)
    moved = replace(
        req_a, ciphertexts=(*req_a.ciphertexts[:i], stolen, *req_a.ciphertexts[i + 1 :])
    )
    with pytest.raises(ProtocolError):
        shared.nodes[a].masked_input(moved, shared.inputs[a])


def test_share_relabelled_to_another_sender(shared: Any) -> None:
    v = "node-02"
    req = shared.masked_requests[v]
    swapped = replace(req, senders=(req.senders[1], req.senders[0], *req.senders[2:]))
    with pytest.raises(ProtocolError):
        shared.nodes[v].masked_input(swapped, shared.inputs[v])


def test_wrong_lengths_and_counts(shared: Any) -> None:
    v = "node-03"
    req = shared.masked_requests[v]
    truncated = replace(req, ciphertexts=(req.ciphertexts[0][:10], *req.ciphertexts[1:]))
    with pytest.raises(ProtocolError):
        shared.nodes[v].masked_input(truncated, shared.inputs[v])
    missing = replace(req, ciphertexts=req.ciphertexts[:-1])
    with pytest.raises(ProtocolError, match="one ciphertext per sender"):
        shared.nodes[v].masked_input(missing, shared.inputs[v])
    too_few = replace(req, senders=req.senders[:1], ciphertexts=req.ciphertexts[:1])
    with pytest.raises(ProtocolError, match="threshold"):
        shared.nodes[v].masked_input(too_few, shared.inputs[v])
    stranger = replace(req, senders=("nobody", *req.senders[1:]))
    with pytest.raises(ProtocolError, match="never given"):
        shared.nodes[v].masked_input(stranger, shared.inputs[v])


def test_wrong_round(shared: Any) -> None:
    v = "node-04"
    other = replace(shared.masked_requests[v], round_id="another-round")
    with pytest.raises(ProtocolError, match="round"):
        shared.nodes[v].masked_input(other, shared.inputs[v])


def test_bad_share_keys_requests(make_round: Any) -> None:
    r = make_round(16, vector_length=4, max_dropouts=2)  # sparse: degree 8 of 15
    r.advertise()
    v = "node-00"
    req = r.share_requests[v]
    outsider = next(u for u in r.params.nodes if u != v and u not in r.params.neighbours(v))
    cases = [
        (replace(req, peers=(outsider, *req.peers[1:])), "not neighbours"),
        (replace(req, c_publics=(req.c_publics[1], *req.c_publics[1:])), "repeats a public key"),
        (
            replace(
                req, peers=req.peers[:2], c_publics=req.c_publics[:2], s_publics=req.s_publics[:2]
            ),
            "threshold",
        ),
        (replace(req, s_publics=(bytes(32), *req.s_publics[1:])), "degenerate"),
        (replace(req, c_publics=(bytes(32), *req.c_publics[1:])), "degenerate"),
        (replace(req, c_publics=req.c_publics[:-1]), "one pair"),
    ]
    for bad, match in cases:
        node = SecAggNode(node_id=v)
        node.advertise(AdvertiseRequest(params=r.params))
        with pytest.raises(ProtocolError, match=match):
            node.share_keys(bad)


def test_node_checks_its_own_membership_and_the_servers_parameters(make_round: Any) -> None:
    r = make_round(5, vector_length=4)
    with pytest.raises(ProtocolError, match="not among"):
        SecAggNode(node_id="intruder").advertise(AdvertiseRequest(params=r.params))
    unsafe = AdvertiseRequest(params=r.params).to_dict()
    unsafe["threshold"] = 1  # would let the server rebuild both secrets
    with pytest.raises(ProtocolError, match="unusable"):
        AdvertiseRequest.from_dict(unsafe)


def test_server_drops_malformed_replies_and_still_sums_exactly(make_round: Any) -> None:
    r = make_round(9, vector_length=32, max_dropouts=3)
    r.advertise()
    request = r.share_requests
    replies = {v: r.nodes[v].share_keys(req) for v, req in request.items()}
    # one node addresses its shares to the wrong peers, one sends a short ciphertext
    a, b = "node-02", "node-06"
    replies[a] = replace(replies[a], recipients=tuple(reversed(replies[a].recipients))[:-1])
    replies[b] = replace(
        replies[b], ciphertexts=(replies[b].ciphertexts[0][:-1], *replies[b].ciphertexts[1:])
    )
    replies["ghost"] = replies["node-00"]
    r.masked_requests = r.server.collect_shares(replies)
    assert {a, b} <= set(r.server.rejected) and "ghost" in r.server.rejected
    r.masked_replies = {
        v: r.nodes[v].masked_input(req, r.inputs[v]) for v, req in r.masked_requests.items()
    }
    c = "node-04"
    r.masked_replies[c] = replace(r.masked_replies[c], masked=r.masked_replies[c].masked[:-1])
    r.unmask_requests = r.server.collect_masked(r.masked_replies)
    assert c in r.server.rejected and c in r.server.dropped
    replies3 = {v: r.nodes[v].unmask(req) for v, req in r.unmask_requests.items()}
    total = r.server.finish(replies3)
    assert np.array_equal(total, r.expected())
    assert set(r.server.survivors) == set(r.params.nodes) - {a, b, c}


def test_corrupted_unmask_share_gives_no_result(make_round: Any) -> None:
    r = make_round(6, vector_length=8, max_dropouts=1)
    r.advertise()
    r.share()
    r.mask(drop={"node-05"})
    replies = {v: r.nodes[v].unmask(req) for v, req in r.unmask_requests.items()}
    for v, reply in replies.items():
        # keep every share a valid field element but change its value
        replies[v] = replace(
            reply,
            b_shares=tuple(bytes(16) + s[16:] for s in reply.b_shares),
            s_shares=tuple(bytes(16) + s[16:] for s in reply.s_shares),
        )
    with pytest.raises(ProtocolError, match="corrupted"):
        r.server.finish(replies)


def test_wrong_masked_vector_values_rejected(make_round: Any) -> None:
    # 12 bits travel as uint16, which has room for a value past the modulus.
    r = make_round(6, vector_length=8, max_dropouts=1, bits=12)
    r.advertise()
    r.share()
    r.masked_replies = {
        v: r.nodes[v].masked_input(req, r.inputs[v]) for v, req in r.masked_requests.items()
    }
    v = "node-01"
    big = r.masked_replies[v].masked.copy()
    assert big.dtype == np.uint16
    big[0] = 1 << 14
    r.masked_replies[v] = MaskedInputReply(round_id=r.params.round_id, node_id=v, masked=big)
    r.unmask_requests = r.server.collect_masked(r.masked_replies)
    assert v in r.server.rejected
    assert np.array_equal(r.unmask(), r.expected())


node_bound = st.sampled_from(["share_keys", "masked_input", "unmask"])
junk = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=5),
    st.lists(st.text(max_size=3), max_size=3),
    st.builds(
        lambda n, d: np.zeros(n, dtype=d),
        st.integers(0, 40),
        st.sampled_from([np.uint8, np.float32, np.uint32]),
    ),
    st.builds(
        lambda r, c: np.zeros((r, c), dtype=np.uint8), st.integers(0, 8), st.integers(0, 140)
    ),
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(node_bound, st.data())
def test_fuzzed_requests_raise_protocol_errors_only(
    make_round: Any, step: str, data: st.DataObject
) -> None:
    r = make_round(5, vector_length=4, max_dropouts=1)
    r.advertise()
    v = "node-01"
    if step == "share_keys":
        message, kind = r.share_requests[v], ShareKeysRequest
    else:
        r.share()
        if step == "masked_input":
            message, kind = r.masked_requests[v], MaskedInputRequest
        else:
            r.mask()
            message, kind = r.unmask_requests[v], UnmaskRequest
    payload = message.to_dict()
    key = data.draw(st.sampled_from(sorted(payload)))
    if data.draw(st.booleans()):
        del payload[key]
    else:
        payload[key] = data.draw(junk)
    node = r.nodes[v]
    try:
        decoded = kind.from_dict(payload)
        if step == "share_keys":
            node.share_keys(decoded)
        elif step == "masked_input":
            node.masked_input(decoded, r.inputs[v])
        else:
            node.unmask(decoded)
    except ProtocolError:
        pass
    except ConfigError as exc:  # pragma: no cover - would be a bug
        raise AssertionError(f"expected ProtocolError, got ConfigError: {exc}") from exc


def test_public_key_checks_in_key_module() -> None:
    with pytest.raises(ProtocolError):
        keys.agree(keys.KeyPair.generate().private, b"\x01" + bytes(31))
