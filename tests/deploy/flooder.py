"""An attacker on the node's own address (run as a script by the flood tests, not collected).

Opens TCP connections to ``--port`` from ``--source`` as fast as one process can, for
``--seconds``, keeping at most ``--hold`` of them open (it closes its oldest beyond that, so
it never runs out of descriptors), and writes on each what ``--mode`` says:

- ``silent``: nothing
- ``garbage``: bytes no handshake starts with
- ``lane``: the bulk lane's magic, a direction and a random lane id, then nothing
- ``h2``: HTTP/2's connection preface, then nothing
- ``tls``: a real TLS ClientHello, then nothing
- ``mixed``: each of the above in turn
- ``calls``: a plaintext gRPC channel per connection with a call open that never says
  hello (what an outsider can do on a coordinator started with ``--insecure``)

Each handshake-looking mode stops right where the real one would need a secret (a lane
token, a registered key, a federation certificate), since an attacker has none. Prints the
number of connections it opened, as JSON, when it stops.

    python tests/deploy/flooder.py --port P --mode mixed --seconds 8
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from typing import Any

MODES = ("silent", "garbage", "lane", "h2", "tls")


def client_hello() -> bytes:
    """The first flight of a real TLS client (no certificate needed to send it)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing)
    with contextlib.suppress(ssl.SSLWantReadError):  # it waits for the server's answer
        tls.do_handshake()
    return outgoing.read()


def payload(mode: str, hello: bytes) -> bytes:
    if mode == "silent":
        return b""
    if mode == "garbage":
        return b"GET / HTTP/1.1\r\n\r\n"
    if mode == "lane":
        return b"SHL1" + (b"D", b"U")[os.urandom(1)[0] % 2] + os.urandom(16)
    if mode == "h2":
        return b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    return hello


def calls(args: argparse.Namespace) -> tuple[int, int]:
    import grpc

    from shoal.runtime.grpc.protocol import METHOD

    stop = threading.Event()

    def never() -> Iterator[bytes]:
        stop.wait(args.seconds + 5)
        return
        yield b""  # pragma: no cover

    held: collections.deque[tuple[grpc.Channel, Any]] = collections.deque()
    opened = failed = 0
    while time.monotonic() < args.deadline:
        channel = grpc.insecure_channel(f"{args.host}:{args.port}")
        call = channel.stream_stream(METHOD)(never(), timeout=args.seconds + 5)
        try:
            next(iter(call))  # the challenge: the call is open at the coordinator
            opened += 1
        except grpc.RpcError:
            failed += 1
        held.append((channel, call))
        while len(held) > 64:
            old_channel, old_call = held.popleft()
            old_call.cancel()
            old_channel.close()
    stop.set()
    for channel, call in held:
        call.cancel()
        channel.close()
    return opened, failed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--source", default="127.0.0.1")
    parser.add_argument("--mode", choices=(*MODES, "mixed", "calls"), default="mixed")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--hold", type=int, default=400)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()
    args.deadline = time.monotonic() + args.seconds

    def stop(*_: object) -> None:
        args.deadline = 0.0  # every loop ends at its next check (a connect waits at most 1 s)

    signal.signal(signal.SIGTERM, stop)
    if args.mode == "calls":
        opened, failed = calls(args)
        print(json.dumps({"opened": opened, "failed": failed}), flush=True)
        return
    hello = client_hello()
    modes = MODES if args.mode == "mixed" else (args.mode,)
    counts = [0, 0]  # opened, failed
    lock = threading.Lock()

    def run() -> None:
        # Several threads: a connect that waits out a full backlog (the kernel retries the
        # SYN after a second) must not pause the flood.
        held: collections.deque[socket.socket] = collections.deque()
        while time.monotonic() < args.deadline:
            with lock:
                mode = modes[counts[0] % len(modes)]
            try:
                sock = socket.create_connection(
                    (args.host, args.port), timeout=1.0, source_address=(args.source, 0)
                )
                data = payload(mode, hello)
                if data:
                    sock.sendall(data)
            except OSError:
                with lock:
                    counts[1] += 1
                continue
            with lock:
                counts[0] += 1
            held.append(sock)
            while len(held) > args.hold // args.threads:
                held.popleft().close()
        for sock in held:
            sock.close()

    threads = [threading.Thread(target=run) for _ in range(args.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    print(json.dumps({"opened": counts[0], "failed": counts[1]}), flush=True)


if __name__ == "__main__":
    main()
