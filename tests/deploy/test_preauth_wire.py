"""What a TLS peer may send before a node authenticates, counted on the wire (tlsend.py),
and the back-off for peers the front door keeps cutting (bans.py)."""

from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.runtime.grpc import make_certs
from shoal.runtime.grpc.bans import BanList, BanPolicy, Bans
from shoal.runtime.grpc.certs import ClientTLS, ServerTLS
from shoal.runtime.grpc.tlsend import Overspent, RecordCounter, TlsEnd


def records(sizes: list[int]) -> bytes:
    """A stream of TLS application-data records with payloads of ``sizes`` bytes."""
    return b"".join(bytes([23, 3, 3]) + n.to_bytes(2, "big") + b"\xab" * n for n in sizes)


@given(
    sizes=st.lists(st.integers(0, 300), max_size=40),
    cuts=st.lists(st.integers(0, 20_000), max_size=20),
)
def test_records_are_counted_however_the_bytes_are_split(sizes: list[int], cuts: list[int]) -> None:
    stream = records(sizes)
    counter = RecordCounter()
    at = 0
    for cut in sorted(c % (len(stream) + 1) for c in cuts):
        counter.feed(stream[at:cut])
        at = cut
    counter.feed(stream[at:])
    assert counter.records == len(sizes)


@pytest.fixture(scope="module")
def contexts(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    certs: Path = tmp_path_factory.mktemp("certs")
    make_certs(certs, nodes=["n0"])
    server = ServerTLS.from_dir(certs).ssl_context()
    client = ClientTLS.from_dir(certs, name="n0").ssl_context()
    return server, client


def one_byte_records(client: ssl.SSLObject, out: ssl.MemoryBIO, count: int) -> bytes:
    for _ in range(count):
        client.write(b"x")
    return out.read()


def test_one_byte_records_end_at_the_check_before_they_are_decrypted(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """A peer's records are counted as they arrive: past the check's bound, recv_into raises
    Overspent instead of decrypting them. Before, only decrypted bytes were seen (one per
    record here). The records within the bound are read first, though all 200 came in one
    read: what the peer sent within it is what names its flood (the door's frame meter saw
    nothing of a flood whose first read was past the byte bound)."""
    server_context, client_context = contexts
    near, far = socket.socketpair()
    seen: list[tuple[int, int]] = []

    def check(raw: int, received: int) -> str | None:
        seen.append((raw, received))
        return "too many records" if received > 64 else None

    end = TlsEnd(near, server_context, check=check)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    served = threading.Thread(target=end.handshake, args=(b"", time.monotonic() + 10))
    served.start()
    far.settimeout(10)
    while True:  # the client's side of the handshake, by hand over the socket pair
        try:
            client.do_handshake()
            break
        except ssl.SSLWantReadError:
            far.sendall(outgoing.read())
            incoming.write(far.recv(1 << 16))
    far.sendall(outgoing.read())
    served.join(timeout=10)
    handshake_records = end.records
    assert 0 < handshake_records < 16 and end.raw_bytes < 8192, (end.records, end.raw_bytes)
    far.sendall(one_byte_records(client, outgoing, 200))
    buffer = bytearray(1 << 16)
    got = 0
    with pytest.raises(Overspent, match="too many records"):
        while True:
            got += end.recv_into(buffer)
    assert got == 64 - handshake_records  # the records within the bound, and no more
    assert end.records > 64 and seen[-1][1] == end.records
    near.close()
    far.close()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_ban_starts_at_the_nth_cut_within_the_window_and_ends() -> None:
    clock = Clock()
    bans = BanList(BanPolicy(after=3, window_s=60, ban_s=300), clock=clock)
    assert not bans.cut("certificate A")
    clock.now = 61  # the first cut is out of the window
    assert not bans.cut("certificate A")
    assert not bans.cut("certificate A")
    assert bans.banned("certificate A") is None
    assert bans.cut("certificate A")  # three within 60 s
    assert bans.banned("certificate A") == pytest.approx(300)
    assert bans.banned("certificate B") is None  # others unaffected
    assert not bans.cut("certificate A")  # already banned: no second start
    clock.now = 61 + 300
    assert bans.banned("certificate A") is None


def test_never_banned_with_zero_cuts_and_keys_are_bounded() -> None:
    clock = Clock()
    never = BanList(BanPolicy(after=0), clock=clock)
    assert not any(never.cut("address x") for _ in range(100))
    small = BanList(BanPolicy(after=1, max_keys=4), clock=clock)
    for i in range(100):
        assert small.cut(f"address {i}")
    assert len(small._until) == 4  # the oldest forgotten first
    assert small.banned("address 99") is not None


def test_a_bad_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="ban policy"):
        BanPolicy(after=-1)


def test_the_coordinator_refuses_tls_renegotiation(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """A TLS 1.2 client may ask to renegotiate (a full handshake's work each time) on a
    connection already admitted; the server's context refuses it. Python cannot send a
    renegotiation request, so this checks the option OpenSSL acts on."""
    server_context, _ = contexts
    assert server_context.options & ssl.OP_NO_RENEGOTIATION


def test_bans_are_audited_once_each_and_coalesced_past_64_addresses() -> None:
    from shoal.runtime.grpc.trail import Trail

    class Registry:
        def __init__(self) -> None:
            self.entries: list[tuple[str, dict[str, object]]] = []

        def audit(
            self, *, actor: str, action: str, detail: dict[str, object], run_id: object
        ) -> None:
            self.entries.append((action, detail))

    registry = Registry()
    trail = Trail(registry, run_id=None)
    for i in range(100):
        trail.banned(f"10.0.0.{i}", f"banned: address 10.0.0.{i} on probation for 300 s")
    trail.flush(force=True)
    actions = [action for action, _ in registry.entries]
    assert actions.count("node.banned") == 64
    assert actions.count("node.banned_summary") == 1
    summary = dict(registry.entries)["node.banned_summary"]
    assert summary["count"] == 36
    assert "36 more bans from 36 other addresses" in str(summary["summary"])


@given(
    sizes=st.lists(st.integers(0, 300), max_size=40),
    cuts=st.lists(st.integers(0, 20_000), max_size=20),
)
def test_stepping_record_by_record_counts_as_feeding(sizes: list[int], cuts: list[int]) -> None:
    """RecordCounter.step (the handshake's admission, one record at a time) ends each step
    at a record's end and counts exactly as feed does, however the bytes are split."""
    stream = records(sizes)
    counter = RecordCounter()
    ends = []
    at = 0
    for cut in [*sorted(c % (len(stream) + 1) for c in cuts), len(stream)]:
        piece = memoryview(stream)[at:cut]
        while piece:
            taken = counter.step(piece)
            assert taken > 0
            piece = piece[taken:]
            ends.append(at + (cut - at - len(piece)))
        at = max(at, cut)
    assert counter.records == len(sizes)
    boundaries = {sum(5 + n for n in sizes[: i + 1]) for i in range(len(sizes))}
    assert boundaries <= set(ends)  # every record's end is a step's end


def test_a_client_hello_in_one_byte_records_is_cut_before_the_server_answers(
    contexts: tuple[ssl.SSLContext, ssl.SSLContext],
) -> None:
    """A ClientHello split into one-byte handshake records (plaintext: anyone can send it,
    no certificate needed). The handshake hands OpenSSL only the records the bound lets
    through, so the connection ends at the 65th record with no ServerHello made. Before:
    all 512 records went into OpenSSL in one read, which made its ServerHello (1,300 bytes:
    the key exchange and the signature) before the check saw them."""
    server_context, client_context = contexts
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    hello = outgoing.read()
    assert hello[0] == 22
    body = hello[5:]
    fragments = b"".join(bytes([22, 3, 1, 0, 1]) + body[i : i + 1] for i in range(len(body)))
    near, far = socket.socketpair()
    end = TlsEnd(near, server_context, check=lambda raw, n: "too many" if n > 64 else None)
    far.sendall(fragments)
    with pytest.raises(Overspent, match="too many"):
        end.handshake(b"", time.monotonic() + 10)
    assert end.records == len(body)  # all counted
    assert end._out.pending == 0  # nothing made for the peer: no ServerHello
    near.close()
    far.close()


def test_a_cut_on_either_port_counts_toward_one_ban() -> None:
    """bans.Bans is shared by the front door and the bulk lane: cuts of one certificate on
    both count together, a ban is told once, and addresses are kept apart."""
    clock = Clock()
    told: list[tuple[str, str]] = []
    bans = Bans(
        BanPolicy(after=3), banned=lambda host, line: told.append((host, line)), clock=clock
    )
    bans.strike("10.0.0.1", "CN=rogue sha256:ab")  # the lane
    bans.strike("10.0.0.2", "CN=rogue sha256:ab")  # the door, another address
    assert bans.refusal("CN=rogue sha256:ab") is None
    bans.strike("10.0.0.1", "CN=rogue sha256:ab")
    refusal = bans.refusal("CN=rogue sha256:ab")
    assert refusal is not None and "banned for 300 s more" in refusal
    line = "banned: certificate CN=rogue sha256:ab refused for 300 s after 3 cuts within 60 s"
    assert told == [("10.0.0.1", line)]
    assert bans.refusal("CN=n0 sha256:cd") is None and not bans.on_probation("10.0.0.1")
    for _ in range(3):
        bans.strike("10.0.0.9", "")
    assert bans.on_probation("10.0.0.9") and not bans.on_probation("10.0.0.1")
    bans.strike("10.0.0.8", "", record=False)  # a cut while closing: counted, not told
    assert len(told) == 2
