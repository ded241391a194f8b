"""The bulk lane's TLS at the coordinator's end: Python's ``SSLSocket`` (what lane.py used
until its connections got the front door's pre-authentication bounds) against
``tlsend.TlsEnd`` (now: OpenSSL over memory buffers, every record counted), same sockets.

A node process (this script with ``--worker``, an ``SSLSocket`` as ``connect_lane`` makes)
receives a payload on a lane connection and sends it back; the coordinator's end
(``LaneSocket`` over either kind) sends it and reads it back, as a round sends a model down
and an update up. The two kinds alternate trial by trial; reported are the median seconds
per round trip, the throughput (payload bytes each way over the time), and the CPU seconds
the coordinator's process spent per round trip (the node's are the same for both kinds).

    python benchmarks/lane_tls.py --size-mb 40 --trials 7 --json results/lane_tls.json
"""

from __future__ import annotations

import argparse
import json
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# benchmarks/grpc.py sits beside this file: with this directory first on sys.path, `import
# grpc` (which shoal's deployment imports) would find it instead of grpcio.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path.pop(0)

from shoal.runtime.grpc import ClientTLS, ServerTLS, make_certs
from shoal.runtime.grpc.lane import LaneSocket
from shoal.runtime.grpc.tlsend import BULK_READ_BYTES, TlsEnd

KINDS = ("sslsocket", "tlsend")


def worker(port: int, certs: Path, trials: int) -> None:
    context = ClientTLS.from_dir(certs, name="n0").ssl_context()
    for _ in range(trials):
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        lane = LaneSocket(context.wrap_socket(raw, server_hostname="localhost"))
        task_id, size = lane.read_head()
        payload = lane.read_payload(size)
        lane.send(task_id, payload)
        lane.read_head()  # the coordinator's "done": it read everything
        lane.close()


def coordinator_end(kind: str, conn: socket.socket, context: ssl.SSLContext) -> LaneSocket:
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if kind == "sslsocket":
        return LaneSocket(context.wrap_socket(conn, server_side=True))
    end = TlsEnd(conn, context)
    end.handshake(b"", time.monotonic() + 30)
    end.read_bytes = BULK_READ_BYTES  # as lane.py sets it on an up connection
    return LaneSocket(end)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size-mb", type=float, default=40.0)
    parser.add_argument("--trials", type=int, default=7, help="per kind")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--port", type=int)
    parser.add_argument("--certs")
    args = parser.parse_args()
    if args.worker:
        worker(args.port, Path(args.certs), args.trials)
        return
    size = int(args.size_mb * (1 << 20))
    payload = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    with tempfile.TemporaryDirectory() as scratch:
        certs = Path(scratch)
        make_certs(certs, nodes=["n0"])
        context = ServerTLS.from_dir(certs).ssl_context()
        listener = socket.create_server(("127.0.0.1", 0))
        port = listener.getsockname()[1]
        total = 2 * args.trials
        node = subprocess.Popen(
            [sys.executable, __file__, "--worker", "--port", str(port), "--certs", str(certs),
             "--trials", str(total)]
        )  # fmt: skip
        seconds: dict[str, list[float]] = {k: [] for k in KINDS}
        cpu: dict[str, list[float]] = {k: [] for k in KINDS}
        for trial in range(total):
            kind = KINDS[trial % 2]
            conn, _ = listener.accept()
            lane = coordinator_end(kind, conn, context)
            start, cpu0 = time.perf_counter(), time.process_time()
            lane.send("t", payload)
            task_id, got = lane.read_head()
            back = lane.read_payload(got)
            took, spent = time.perf_counter() - start, time.process_time() - cpu0
            assert task_id == "t" and got == size and bytes(back[:64]) == payload[:64].tobytes()
            lane.send("done", b"")
            seconds[kind].append(took)
            cpu[kind].append(spent)
            lane.close()
        node.wait(timeout=60)
        listener.close()
    rows = {}
    for kind in KINDS:
        median = statistics.median(seconds[kind])
        rows[kind] = {
            "seconds": round(median, 4),
            "range": [round(min(seconds[kind]), 4), round(max(seconds[kind]), 4)],
            "mb_per_s": round(2 * size / median / 1e6, 1),
            "coordinator_cpu_s": round(statistics.median(cpu[kind]), 4),
        }
    ratio = rows["sslsocket"]["seconds"] / rows["tlsend"]["seconds"]
    print(f"payload {size / 1e6:.1f} MB down and back, {args.trials} trials each, interleaved")
    print("| coordinator's end | s per round trip (median [range]) | MB/s | coordinator CPU-s |")
    print("|---|---|---|---|")
    for kind, row in rows.items():
        low, high = row["range"]
        print(
            f"| {kind} | {row['seconds']} [{low}-{high}] | {row['mb_per_s']} | "
            f"{row['coordinator_cpu_s']} |"
        )
    print(f"TlsEnd throughput / SSLSocket throughput: {ratio:.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(
            json.dumps({"size": size, "trials": args.trials, "rows": rows, "ratio": ratio})
        )


if __name__ == "__main__":
    main()
