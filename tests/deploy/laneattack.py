"""An attacker on the bulk lane's TLS (run as a script by the lane flood tests, not collected).

Connects to the lane's ``--port`` over TLS with a federation certificate (``--certs DIR
--name NAME``: an insider, or with ``--name ''`` none at all) and, on ``--connections``
connections at once (from ``--sources`` addresses, 127.0.0.2 and up) for ``--seconds``,
reconnecting whenever the coordinator ends one, sends what ``--mode`` says before it could
ever authenticate (it knows no session's lane token):

- ``keyupdate``: TLS 1.3 KeyUpdate messages sealed by hand (tls13craft.py), 256 at a time:
  a key derivation each for the server, and no byte of the lane's hello
- ``tlsempty``: empty application-data records, 31 in a row then one byte of a lane hello
  (OpenSSL itself ends 32 empty records in a row)
- ``records``: a lane hello one byte per record, each behind 3 KeyUpdates
- ``hold``: the handshake, then nothing (a connection held open until the server ends it)
- ``handshake``: full handshakes, each closed at once (what a banned certificate costs)

Prints its counts as JSON when it stops: connections opened, records and bytes sent, and
``ended``: how many connections the coordinator ended, with ``first_end_s``/``last_end_s``,
the seconds from a connection's handshake to its end (the first and the slowest).

    python tests/deploy/laneattack.py --port P --mode keyupdate --certs DIR --seconds 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import ssl
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from h2attack import SealedPipe, _alive
from tls13craft import APPLICATION_DATA, Sealer, client_secret

_HELLO = b"SHL1D" + os.urandom(16)  # a lane hello naming no live session: never accepted


class LaneAttack:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.deadline = time.monotonic() + args.seconds
        self.lock = threading.Lock()
        self.counts: dict[str, float] = {"connections": 0, "failed": 0, "ended": 0,
                                         "records": 0, "bytes": 0, "handshakes": 0,
                                         "first_end_s": 0.0, "last_end_s": 0.0}  # fmt: skip

    def add(self, key: str, n: float = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def ended(self, seconds: float) -> None:
        with self.lock:
            self.counts["ended"] += 1
            first = self.counts["first_end_s"]
            self.counts["first_end_s"] = seconds if not first else min(first, seconds)
            self.counts["last_end_s"] = max(self.counts["last_end_s"], seconds)

    def context(self, keylog: Path | None) -> ssl.SSLContext:
        certs = Path(self.args.certs)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(certs / "ca.pem")
        if self.args.name:
            name = self.args.name
            context.load_cert_chain(certs / f"{name}.pem", certs / f"{name}-key.pem")
        context.check_hostname = False
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        if keylog is not None:
            context.keylog_filename = str(keylog)
        return context

    def connect(self, worker: int) -> socket.socket | None:
        source = f"127.0.0.{2 + worker % self.args.sources}"
        try:
            sock = socket.create_connection(
                ("127.0.0.1", self.args.port), timeout=5, source_address=(source, 0)
            )
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            self.add("failed")
            time.sleep(0.05)
            return None
        self.add("connections")
        return sock

    def sealed(self, raw: socket.socket) -> SealedPipe | None:
        """The handshake, with this attacker holding the client's record keys."""
        with tempfile.TemporaryDirectory() as scratch:
            keylog = Path(scratch) / "keys"
            try:
                pipe = SealedPipe(raw, self.context(keylog))
            except (OSError, ssl.SSLError):
                raw.close()
                self.add("failed")  # refused at the handshake (a banned certificate)
                time.sleep(0.05)
                return None
            suite = pipe._tls.cipher()[0]
            pipe.sealer = Sealer(suite, client_secret(keylog.read_text()), 0)
        self.add("handshakes")
        raw.settimeout(1.0)
        return pipe

    def batch(self, sealer: Sealer, sent: int) -> tuple[bytes, int]:
        """The next burst of records for the mode, and how many records it holds."""
        mode = self.args.mode
        if mode == "keyupdate":
            return b"".join(sealer.key_update() for _ in range(256)), 256
        if mode == "tlsempty":
            out = bytearray()
            for i in range(8):
                out += b"".join(sealer.empty() for _ in range(31))
                byte = _HELLO[(sent + i) % len(_HELLO) : (sent + i) % len(_HELLO) + 1]
                out += sealer.record(APPLICATION_DATA, byte)
            return bytes(out), 256
        # records: the hello one byte per record, each behind 3 key updates
        out = bytearray()
        for i in range(64):
            out += b"".join(sealer.key_update() for _ in range(3))
            at = (sent // 4 + i) % len(_HELLO)
            out += sealer.record(APPLICATION_DATA, _HELLO[at : at + 1])
        return bytes(out), 256

    def connection(self, worker: int) -> None:
        while time.monotonic() < self.deadline:
            raw = self.connect(worker)
            if raw is None:
                continue
            if self.args.mode == "handshake":
                try:
                    with self.context(None).wrap_socket(raw, server_hostname="localhost"):
                        self.add("handshakes")
                except OSError:
                    raw.close()
                    self.add("failed")
                continue
            pipe = self.sealed(raw)
            if pipe is None:
                continue
            start = time.monotonic()
            sent = 0
            try:
                while time.monotonic() < self.deadline:
                    if self.args.mode == "hold":
                        if not _alive(raw):
                            raise ConnectionResetError("ended")
                        time.sleep(0.05)
                        continue
                    with pipe.sealing:
                        data, n = self.batch(pipe.sealer, sent)
                        raw.sendall(data)
                    sent += n
                    self.add("records", n)
                    self.add("bytes", len(data))
            except OSError:
                if time.monotonic() < self.deadline:
                    self.ended(time.monotonic() - start)
            finally:
                with contextlib.suppress(OSError):
                    raw.shutdown(socket.SHUT_RDWR)
                raw.close()

    def run(self) -> dict[str, float]:
        workers = [
            threading.Thread(target=self.connection, args=(i,), daemon=True)
            for i in range(self.args.connections)
        ]
        for worker in workers:
            worker.start()
        end = self.deadline + 10
        while any(w.is_alive() for w in workers) and time.monotonic() < end:
            time.sleep(0.05)
        with self.lock:
            return {k: round(v, 3) for k, v in self.counts.items()}

    def stop(self) -> None:
        self.deadline = 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--mode",
        choices=("keyupdate", "tlsempty", "records", "hold", "handshake"),
        required=True,
    )
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--sources", type=int, default=1, help="from 127.0.0.2, .3, ...")
    parser.add_argument("--certs", required=True, help="a federation's certificate directory")
    parser.add_argument("--name", default="rogue", help="whose certificate ('': none)")
    args = parser.parse_args()
    attack = LaneAttack(args)
    signal.signal(signal.SIGTERM, lambda *_: attack.stop())
    print(json.dumps(attack.run()), flush=True)


if __name__ == "__main__":
    main()
