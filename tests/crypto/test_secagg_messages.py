"""Every message converts to a flat payload (arrays and JSON values) and back, exactly."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from shoal.crypto.secagg import (
    AdvertiseReply,
    AdvertiseRequest,
    MaskedInputReply,
    MaskedInputRequest,
    ShareKeysReply,
    ShareKeysRequest,
    UnmaskReply,
    UnmaskRequest,
)
from shoal.errors import ProtocolError

STANDARD = {np.dtype(d) for d in ("uint8", "uint32", "uint64")}


def transcript(make_round: Any) -> list[Any]:
    r = make_round(6, vector_length=9, max_dropouts=1)
    out: list[Any] = [r.server.advertise_request()]
    r.advertise()
    out += list(r.share_requests.values())
    r.share()
    out += list(r.share_replies.values()) + list(r.masked_requests.values())
    r.mask(drop={"node-03"})
    out += list(r.masked_replies.values()) + list(r.unmask_requests.values())
    r.unmask()
    out += list(r.unmask_replies.values())
    out.append(AdvertiseReply(round_id="r", node_id="n", c_public=b"c" * 32, s_public=b"s" * 32))
    return out


def check_flat(payload: dict[str, Any]) -> None:
    for name, value in payload.items():
        assert isinstance(name, str)
        if isinstance(value, np.ndarray):
            assert value.dtype in STANDARD and value.dtype.isnative
        else:
            json.dumps(value)  # a JSON scalar or list


def same(a: Any, b: Any) -> bool:
    for field in a.__dataclass_fields__:
        x, y = getattr(a, field), getattr(b, field)
        if isinstance(x, np.ndarray):
            if not (isinstance(y, np.ndarray) and np.array_equal(x, y) and x.dtype == y.dtype):
                return False
        elif x != y:
            return False
    return True


def test_every_message_round_trips_through_a_flat_payload(make_round: Any) -> None:
    messages = transcript(make_round)
    kinds = {type(m) for m in messages}
    assert kinds == {
        AdvertiseRequest,
        AdvertiseReply,
        ShareKeysRequest,
        ShareKeysReply,
        MaskedInputRequest,
        MaskedInputReply,
        UnmaskRequest,
        UnmaskReply,
    }
    for message in messages:
        payload = message.to_dict()
        check_flat(payload)
        assert same(type(message).from_dict(payload), message)


def test_messages_cross_the_wire_codec(make_round: Any) -> None:
    wire = pytest.importorskip("shoal.wire")
    for message in transcript(make_round):
        decoded = wire.decode(wire.encode(message.to_dict()))
        assert same(type(message).from_dict(decoded), message)


def test_empty_peer_lists_round_trip() -> None:
    for message in (
        ShareKeysRequest(round_id="r", peers=(), c_publics=(), s_publics=()),
        UnmaskReply(round_id="r", node_id="n", b_peers=(), b_shares=(), s_peers=(), s_shares=()),
    ):
        assert same(type(message).from_dict(message.to_dict()), message)


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda d: d.pop("round_id"), "lacks field 'round_id'"),
        (lambda d: d.update(secagg="unmask_reply"), "expected"),
        (lambda d: d.update(c_public=np.zeros(31, dtype=np.uint8)), "32 bytes"),
        (lambda d: d.update(c_public=np.zeros(32, dtype=np.int8)), "uint8"),
        (lambda d: d.update(node_id=7), "string"),
        (lambda d: d.update(c_public=[1, 2]), "array"),
    ],
)
def test_malformed_payloads_raise_protocol_errors(mutate: Any, match: str) -> None:
    payload = AdvertiseReply(
        round_id="r", node_id="n", c_public=b"c" * 32, s_public=b"s" * 32
    ).to_dict()
    mutate(payload)
    with pytest.raises(ProtocolError, match=match):
        AdvertiseReply.from_dict(payload)


def test_row_counts_and_lists_are_checked() -> None:
    good = UnmaskReply(
        round_id="r",
        node_id="n",
        b_peers=("a", "b"),
        b_shares=(b"x" * 48, b"y" * 48),
        s_peers=(),
        s_shares=(),
    ).to_dict()
    with pytest.raises(ProtocolError, match="rows"):
        UnmaskReply.from_dict({**good, "b_peers": ["a"]})
    with pytest.raises(ProtocolError, match="twice"):
        UnmaskReply.from_dict({**good, "b_peers": ["a", "a"]})
    with pytest.raises(ProtocolError, match="list of node id"):
        UnmaskReply.from_dict({**good, "s_peers": "ab"})
    with pytest.raises(ProtocolError, match="mapping"):
        UnmaskReply.from_dict([("secagg", "unmask_reply")])  # type: ignore[arg-type]
    masked = MaskedInputReply(round_id="r", node_id="n", masked=np.zeros(3, np.uint32)).to_dict()
    with pytest.raises(ProtocolError, match="unsigned"):
        MaskedInputReply.from_dict({**masked, "masked": np.zeros(3, np.float32)})


def test_signatures_travel_from_advertise_to_the_peers() -> None:
    from shoal.crypto.secagg import SecAggNode, SecAggParams, SecAggServer

    names = ["a", "b", "c"]
    server = SecAggServer(params=SecAggParams.create(names, vector_length=2, max_dropouts=0))
    request = server.advertise_request()
    replies = {}
    for i, n in enumerate(names):
        reply = SecAggNode(node_id=n).advertise(request)
        signed = AdvertiseReply(
            round_id=reply.round_id,
            node_id=n,
            c_public=reply.c_public,
            s_public=reply.s_public,
            signature=bytes([i + 1]) * 64 if n != "c" else b"",
        )
        replies[n] = AdvertiseReply.from_dict(signed.to_dict())
        assert replies[n].signature == signed.signature
    shares = server.collect_keys(replies)
    got = ShareKeysRequest.from_dict(shares["c"].to_dict())
    assert got.peers == ("a", "b") and got.signatures == (b"\x01" * 64, b"\x02" * 64)
    # an unsigned peer is relayed as zero bytes, which no identity key verifies
    assert shares["a"].signatures[list(shares["a"].peers).index("c")] == bytes(64)
    bad = {**replies["a"].to_dict(), "signature": np.zeros(12, np.uint8)}
    with pytest.raises(ProtocolError, match="signature"):
        AdvertiseReply.from_dict(bad)


def test_unsigned_rounds_carry_no_signatures() -> None:
    from shoal.crypto.secagg import SecAggNode, SecAggParams, SecAggServer

    names = ["a", "b", "c"]
    server = SecAggServer(params=SecAggParams.create(names, vector_length=2, max_dropouts=0))
    request = server.advertise_request()
    replies = {n: SecAggNode(node_id=n).advertise(request) for n in names}
    shares = server.collect_keys(replies)
    assert all(r.signatures == () and "signatures" not in r.to_dict() for r in shares.values())
