"""The bulk lane's TLS before a node authenticates on it: a coordinator on 127.0.0.1 (in this
process), an attacker in another process (laneattack.py) that holds a federation
certificate and sends TLS records that cost the server work and carry no lane hello, and a
node that must get its lane while the flood runs.

The lane's pre-authentication phase has the front door's bounds (transport.py): 32 KiB on
the wire and 64 TLS records, counted from the record headers before anything is decrypted;
a cut is audited with the certificate and counts toward its ban (bans.py), which the door
and the lane share."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from shoal.runtime import NodeApp
from shoal.runtime.grpc import ClientTLS, ServerTLS
from shoal.runtime.grpc.transport import PREAUTH_BYTES, PREAUTH_RECORDS

pytestmark = [pytest.mark.integration, pytest.mark.serial]

SCRIPT = Path(__file__).with_name("laneattack.py")
sys.path.insert(0, str(Path(__file__).parent))
from attackers import attacker, wait  # noqa: E402


@contextlib.contextmanager
def lane_attack(
    port: int, mode: str, certs: Path, *, seconds: float, until_exit: bool = False, **options: Any
) -> Iterator[dict[str, Any]]:
    """A laneattack.py process; yields a dict that holds its counts once it stopped
    (``until_exit``: stopped when the block ends, see attackers.attacker)."""
    args = ["--port", str(port), "--mode", mode, "--certs", str(certs)]
    for key, value in options.items():
        args += [f"--{key}", str(value)]
    with attacker(SCRIPT, args, seconds=seconds, until_exit=until_exit) as result:
        yield result


def lane_reasons(federation) -> list[str]:  # type: ignore[no-untyped-def]
    rows = federation.store.audit_log(limit=100_000)
    return [str(r.detail.get("reason", "")) for r in rows if r.action == "node.lane_rejected"]


def audit_lines(federation, action: str) -> list[str]:  # type: ignore[no-untyped-def]
    rows = federation.store.audit_log(limit=100_000)
    return [str(r.detail.get("reason", "")) for r in rows if r.action == action]


def tls_engine(federation, **options: Any):  # type: ignore[no-untyped-def]
    return federation.engine(
        tls=ServerTLS.from_dir(federation.certs), data_listen="127.0.0.1:0", **options
    )


@pytest.mark.parametrize("mode", ["keyupdate", "tlsempty", "records"])
def test_records_before_lane_authentication_end_at_the_record_bound(federation, mode: str) -> None:
    """KeyUpdates (a key derivation each), empty records (31 in a row, then one byte of a
    lane hello) and a hello one byte per record behind KeyUpdates, from a holder of a
    federation certificate. Before: the lane counted no records; KeyUpdates went on until
    the 5 s handshake deadline (a probe: 30,000 in 4 s, 0.83 CPU-s, one connection), the
    others until the hello's 21 bytes had come (672 and 84 records). Now each connection is
    cut past transport.PREAUTH_RECORDS records, before they are decrypted, and the cut is
    on record with the certificate."""
    engine = tls_engine(federation, ban_after_cuts=0)  # no bans: every connection floods
    cpu = time.process_time()
    with lane_attack(engine.data_port, mode, federation.certs, seconds=2.5) as attack:
        pass
    # This process's CPU over the flood: the coordinator's (nothing else runs in it).
    cpu = time.process_time() - cpu
    figures = {k: v for k, v in attack.items() if k != "proc"}
    print(f"\n{mode}: coordinator {cpu:.2f} CPU-s; attacker {json.dumps(figures)}")
    assert attack["handshakes"] >= 2, attack
    assert attack["ended"] >= 2, attack  # every connection ended by the coordinator, and soon
    assert attack["last_end_s"] < 1.5, attack
    engine.close()  # writes out what was coalesced
    cuts = [r for r in lane_reasons(federation) if "TLS records" in r]
    assert cuts, lane_reasons(federation)[:5]
    assert all(f"more than {PREAUTH_RECORDS} TLS records" in r for r in cuts), cuts[:3]
    assert all("(certificate CN=rogue sha256:" in r for r in cuts), cuts[:3]


def test_lane_cuts_ban_the_certificate_at_the_lane_and_the_door(federation, raw_session) -> None:
    """Cuts on the lane count toward the certificate's ban like the door's: the third within
    60 s bans it, once on record; later lane connections with it are refused right after
    their handshake, and so is a gRPC connection through the front door."""
    engine = tls_engine(federation)
    with lane_attack(engine.data_port, "keyupdate", federation.certs, seconds=2.0) as attack:
        pass
    assert attack["handshakes"] >= 4, attack
    assert wait(lambda: any("its certificate is banned" in r for r in lane_reasons(federation)), 5)
    banned = audit_lines(federation, "node.banned")
    assert len(banned) == 1 and "banned: certificate CN=rogue" in banned[0], banned
    with pytest.raises(grpc.RpcError):  # refused before any frame
        raw_session(
            f"127.0.0.1:{engine.port}", tls=ClientTLS.from_dir(federation.certs, name="rogue")
        )
    door = audit_lines(federation, "node.rejected")
    assert any("its certificate is banned" in r for r in door), door
    # Another certificate, from the same address, is unaffected: a node gets in.
    client = federation.client(
        "n0", NodeApp(), engine.port, tls=ClientTLS.from_dir(federation.certs, name="n0")
    )
    assert wait(lambda: client.lane_open, 10), client.detail


@pytest.mark.parametrize(
    ("mode", "options"),
    [
        ("keyupdate", {"connections": 4}),
        ("records", {"connections": 4}),
        ("hold", {"connections": 80, "sources": 8}),
        ("handshake", {"connections": 16, "sources": 8, "name": ""}),
    ],
    ids=["keyupdate", "records", "hold-80-from-8-addresses", "no-certificate-from-8-addresses"],
)
def test_a_node_gets_its_lane_while_certificate_holders_flood_it(
    federation, mode: str, options: dict[str, int]
) -> None:
    """The flood runs with bans off (each reconnection floods afresh) when the node comes:
    KeyUpdates or one-byte records on 4 connections, 80 connections from 8 addresses that
    finish their handshake and send nothing (past max_pending, 64), or handshakes with no
    certificate from 16 threads on 8 addresses (anyone can send those; each costs the
    coordinator its half of a handshake). The node's lane must open within a few seconds
    while it still runs."""
    engine = tls_engine(federation, ban_after_cuts=0)
    with lane_attack(
        engine.data_port, mode, federation.certs, seconds=8.0, until_exit=True, **options
    ) as attack:
        assert wait(lambda: engine.rejections >= 4, 5), engine.rejections
        started = time.monotonic()
        client = federation.client(
            "n0", NodeApp(), engine.port, tls=ClientTLS.from_dir(federation.certs, name="n0")
        )
        assert wait(lambda: client.lane_open, 6), client.detail
        took = time.monotonic() - started
        assert attack["proc"].poll() is None  # the flood still runs
    # What the node's lane connections sent before authenticating: far inside the bounds.
    records, wire = engine._lanes.server.preauth_peak
    print(f"\n{mode}: lane open after {took:.2f} s; node sent {records} records, {wire} bytes")
    print(json.dumps({k: v for k, v in attack.items() if k != "proc"}))
    assert 0 < records <= PREAUTH_RECORDS // 4 and 0 < wire <= PREAUTH_BYTES // 4
