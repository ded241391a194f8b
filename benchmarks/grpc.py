"""gRPC deployment cost: shoal's GrpcEngine against raw loopback TCP (the floor), same run.

Part 1, throughput: a coordinator broadcasts a 10M-parameter float32 model (40 MB) to 10
node processes and collects an update of the same size from each (800 MB per round), over
plaintext and over mutual TLS; shoal's payloads take its bulk lane (signed headers on the
gRPC stream, bytes on a TCP/TLS connection beside it). The floor moves exactly the same bytes
between the same number of processes over plain TCP sockets (sendall / recv_into, no
framing, no encoding, no encryption), and the TLS floor over the same sockets wrapped in TLS
with the same certificates, interleaved round by round with shoal's rounds. A third reference
moves them over bare grpcio (messages of shoal's chunk size on one stream per node, no shoal
code: no signatures, reply MACs, wire encoding or tasks), to show what gRPC in Python costs by
itself. Reported: seconds per round (median), effective throughput as a fraction of the raw
socket's (and TLS rounds also of the TLS floor's), and the CPU seconds one round costs the
coordinator process and the node processes together (the machine's cores bound the rate once
they are all busy).

Part 2, scale: N lightweight node processes connect at once (default 100) to a coordinator
in its own process; reported are that process's CPU seconds and RSS (psutil) once all are
connected, after an idle period of heartbeats and after one round of a small task to all.

    python benchmarks/grpc.py --json results/grpc.json
    python benchmarks/grpc.py --params 1000000 --rounds 2 --scale-nodes 20   # quick look

Needs nothing beyond shoal itself (grpcio, cryptography and psutil are dependencies).
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
from _deploy import cpu_s, make_federation, run_node, spawn_nodes, stop, wait_for_lanes

HERE = Path(__file__).resolve()


# -- node side (subprocesses) -----------------------------------------------------------------


def node_main(args: argparse.Namespace) -> int:
    """A node that echoes the model it receives as its update (the work is not the point)."""
    from shoal.runtime import NodeApp

    app = NodeApp()

    @app.task("update")
    def update(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
        return {"d": payload["w"]}

    @app.task("ping")
    def ping(ctx: Any, payload: dict[str, Any]) -> dict[str, Any]:
        return {"n": 1}

    run_node(app, args, max_idle_s=600)
    return 0


def raw_node_main(args: argparse.Namespace) -> int:
    """The floor's node: receive SIZE bytes, send SIZE bytes back, per round (TLS with --certs)."""
    size = args.size
    buffer = bytearray(size)
    view = memoryview(buffer)
    with socket.create_connection(("127.0.0.1", args.port)) as raw:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = raw
        if args.certs:
            from shoal.runtime.grpc import ClientTLS

            context = ClientTLS.from_dir(args.certs, name=args.name).ssl_context()
            sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        while True:
            received = 0
            while received < size:
                n = sock.recv_into(view[received:], size - received)
                if n == 0:
                    return 0
                received += n
            sock.sendall(view)


def bare_node_main(args: argparse.Namespace) -> int:
    """The bare-gRPC node: echo every message back on one bidirectional stream."""
    import grpc

    options = [
        ("grpc.max_receive_message_length", 8 << 20),
        ("grpc.max_send_message_length", 8 << 20),
    ]
    replies: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    def requests() -> Any:
        while (item := replies.get()) is not None:
            yield item

    with grpc.insecure_channel(args.target, options=options) as channel:
        try:
            for message in channel.stream_stream("/bench.Bare/Echo")(requests()):
                replies.put(message)
        except grpc.RpcError:
            pass
        replies.put(None)
    return 0


# -- coordinator side -------------------------------------------------------------------------


class _Costs:
    """Wall and CPU seconds of each measured round of one transport."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.coordinator_cpu: list[float] = []
        self.nodes_cpu: list[float] = []

    def measure(self, nodes: list[Any], run: Any, *args: Any) -> None:
        own, theirs = cpu_s([None]), cpu_s(nodes)
        self.wall.append(run(*args))
        self.coordinator_cpu.append(cpu_s([None]) - own)
        self.nodes_cpu.append(cpu_s(nodes) - theirs)

    def report(self, moved: int) -> dict[str, Any]:
        per_round = statistics.median(self.wall)
        return {
            "s_per_round": per_round,
            "rounds_s": self.wall,
            "throughput_MBps": moved / per_round / 1e6,
            "coordinator_cpu_s": statistics.median(self.coordinator_cpu),
            "nodes_cpu_s": statistics.median(self.nodes_cpu),
        }


class RawFloor:
    """The same transfer as a shoal round, over plain TCP (or TLS with ``certs``) between the
    same process counts: no framing, encoding, signatures or MACs."""

    def __init__(self, nodes: int, size: int, certs: Path | None = None) -> None:
        self.size = size
        self.listener = socket.create_server(("127.0.0.1", 0))
        port = self.listener.getsockname()[1]
        cmd = [sys.executable, str(HERE), "--worker", "raw", "--port", str(port)]
        cmd += ["--size", str(size)]
        if certs is not None:
            cmd += ["--certs", str(certs)]
        self.procs = [
            subprocess.Popen(cmd + (["--name", f"n{i}"] if certs else [])) for i in range(nodes)
        ]
        context = None
        if certs is not None:
            from shoal.runtime.grpc import ServerTLS

            context = ServerTLS.from_dir(certs).ssl_context()
        self.conns: list[socket.socket] = []
        for _ in range(nodes):
            conn, _ = self.listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if context is not None:
                conn = context.wrap_socket(conn, server_side=True)
            self.conns.append(conn)
        self.inbox = [bytearray(size) for _ in range(nodes)]

    def round(self, payload: memoryview) -> float:
        def one(i: int) -> None:
            conn, view = self.conns[i], memoryview(self.inbox[i])
            conn.sendall(payload)
            received = 0
            while received < self.size:
                n = conn.recv_into(view[received:], self.size - received)
                if n == 0:
                    raise ConnectionError("raw node went away")
                received += n

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(self.conns))]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return time.perf_counter() - start

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.listener.close()
        stop(self.procs)


class BareGrpcFloor:
    """The transfer over bare grpcio: same processes, messages of shoal's chunk size, no shoal.

    No signatures, digests, wire encoding or task handling: it shows what gRPC in Python
    costs by itself, between the raw socket and shoal.
    """

    def __init__(self, nodes: int, payload: Any, chunk_bytes: int) -> None:
        from concurrent import futures

        import grpc

        view = memoryview(payload).cast("B")
        self.frames = [bytes(view[i : i + chunk_bytes]) for i in range(0, view.nbytes, chunk_bytes)]
        self.size = view.nbytes
        self.rounds: list[queue.SimpleQueue[bool | None]] = []
        self.done = threading.Semaphore(0)
        self.lock = threading.Lock()
        options = [
            ("grpc.max_receive_message_length", 8 << 20),
            ("grpc.max_send_message_length", 8 << 20),
        ]
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=nodes + 4), options=options
        )
        handler = grpc.stream_stream_rpc_method_handler(self._serve)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("bench.Bare", {"Echo": handler}),)
        )
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()
        self.procs = [
            subprocess.Popen(
                [sys.executable, str(HERE), "--worker", "bare", "--target", f"127.0.0.1:{port}"]
            )
            for _ in range(nodes)
        ]
        deadline = time.monotonic() + 300
        while len(self.rounds) < nodes and time.monotonic() < deadline:
            time.sleep(0.05)

    def _serve(self, request_iterator: Any, context: Any) -> Any:
        rounds: queue.SimpleQueue[bool | None] = queue.SimpleQueue()
        with self.lock:
            self.rounds.append(rounds)

        def read() -> None:
            received = 0
            for message in request_iterator:
                received += len(message)
                if received == self.size:
                    received = 0
                    self.done.release()

        threading.Thread(target=read, daemon=True).start()
        while rounds.get():
            yield from self.frames

    def round(self) -> float:
        start = time.perf_counter()
        for rounds in self.rounds:
            rounds.put(True)
        for _ in self.rounds:
            self.done.acquire()
        return time.perf_counter() - start

    def close(self) -> None:
        for rounds in self.rounds:
            rounds.put(None)
        self.server.stop(grace=1).wait()
        stop(self.procs)


def grpc_round(engine: Any, payload: Any, node_ids: list[str], number: int) -> float:
    from shoal.runtime import Task

    tasks = [
        Task(node_id=n, name="update", payload=payload, task_id=f"{number}/{n}") for n in node_ids
    ]
    start = time.perf_counter()
    result = engine.dispatch(tasks, deadline_s=600)
    elapsed = time.perf_counter() - start
    if result.failures or len(result.replies) != len(node_ids):
        raise RuntimeError(f"round failed: {dict(result.failures)}")
    return elapsed


def throughput(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    from shoal.runtime.grpc import GrpcEngine, ServerTLS
    from shoal.wire import encode

    store, keys = make_federation(root, args.nodes)
    weights = np.random.default_rng(0).standard_normal(args.params).astype(np.float32)
    payload = encode({"w": weights})
    size = memoryview(payload).nbytes
    moved = 2 * size * args.nodes
    floor = RawFloor(args.nodes, size)
    tls_floor = RawFloor(args.nodes, size, certs=root / "certs")
    bare = BareGrpcFloor(args.nodes, payload, args.chunk_bytes)
    floor_payload = memoryview(payload)
    results: dict[str, Any] = {
        "params": args.params,
        "payload_bytes": size,
        "nodes": args.nodes,
        "bytes_per_round": moved,
    }
    floor_costs, tls_floor_costs, bare_costs = _Costs(), _Costs(), _Costs()
    try:
        for mode in ("insecure", "tls"):
            tls = ServerTLS.from_dir(root / "certs") if mode == "tls" else None
            engine = GrpcEngine(
                listen="127.0.0.1:0",
                registry=store,
                tls=tls,
                insecure=tls is None,
                chunk_bytes=args.chunk_bytes,
            ).start()
            procs = spawn_nodes(
                HERE,
                keys,
                f"127.0.0.1:{engine.port}",
                root / "certs" if tls is not None else None,
            )
            try:
                if engine.wait_for_nodes(args.nodes, timeout_s=300) < args.nodes:
                    raise RuntimeError("not all nodes connected")
                wait_for_lanes(engine, args.nodes)
                node_ids = list(engine.node_ids())
                grpc_round(engine, payload, node_ids, 0)  # warm-up: buffers, TLS sessions
                floor.round(floor_payload)
                tls_floor.round(floor_payload)
                bare.round()
                costs = _Costs()
                for r in range(args.rounds):  # interleaved: the load on the machine is shared
                    costs.measure(procs, grpc_round, engine, payload, node_ids, r + 1)
                    if mode == "tls":
                        tls_floor_costs.measure(tls_floor.procs, tls_floor.round, floor_payload)
                    else:
                        floor_costs.measure(floor.procs, floor.round, floor_payload)
                    bare_costs.measure(bare.procs, bare.round)
                lane_sent, lane_received = engine.lane_bytes
            finally:
                engine.close()
                stop(procs)
            results[mode] = costs.report(moved)
            results[mode]["lane_bytes"] = lane_sent + lane_received
    finally:
        floor.close()
        tls_floor.close()
        bare.close()
        store.close()
    results["bare_grpc"] = bare_costs.report(moved)
    results["raw_socket"] = floor_costs.report(moved)
    results["raw_tls_socket"] = tls_floor_costs.report(moved)
    raw = results["raw_socket"]["throughput_MBps"]
    for mode in ("insecure", "tls", "bare_grpc", "raw_tls_socket"):
        results[mode]["ratio_to_raw"] = results[mode]["throughput_MBps"] / raw
    results["tls"]["ratio_to_raw_tls"] = (
        results["tls"]["throughput_MBps"] / results["raw_tls_socket"]["throughput_MBps"]
    )
    return results


def scale_coordinator_main(args: argparse.Namespace) -> int:
    """The scale test's coordinator, in its own process so its RSS is only its own."""
    from shoal.runtime import Store, Task
    from shoal.runtime.grpc import GrpcEngine
    from shoal.wire import encode

    me = psutil.Process()
    store = Store(Path(args.root) / "bench.db")
    engine = GrpcEngine(
        listen="127.0.0.1:0", registry=store, insecure=True, max_nodes=args.nodes + 16
    ).start()
    baseline = {"rss_MB": me.memory_info().rss / 1e6, "cpu_s": _cpu(me)}
    print(json.dumps({"port": engine.port}), flush=True)
    start = time.perf_counter()
    connected = engine.wait_for_nodes(args.nodes, timeout_s=args.connect_timeout)
    connect_s = time.perf_counter() - start
    after_connect = {"rss_MB": me.memory_info().rss / 1e6, "cpu_s": _cpu(me)}
    threads = me.num_threads()
    time.sleep(args.idle)
    after_idle = {"rss_MB": me.memory_info().rss / 1e6, "cpu_s": _cpu(me)}
    payload = encode({"x": np.zeros(1000, dtype=np.float32)})
    ids = list(engine.node_ids())
    start = time.perf_counter()
    result = engine.dispatch(
        [Task(node_id=n, name="ping", payload=payload, task_id=n) for n in ids], deadline_s=120
    )
    round_s = time.perf_counter() - start
    after_round = {"rss_MB": me.memory_info().rss / 1e6, "cpu_s": _cpu(me)}
    engine.finish(grace_s=10)
    engine.close()
    store.close()
    print(
        json.dumps(
            {
                "connected": connected,
                "connect_s": connect_s,
                "idle_s": args.idle,
                "round_s": round_s,
                "round_replies": len(result.replies),
                "threads": threads,
                "baseline": baseline,
                "after_connect": after_connect,
                "after_idle": after_idle,
                "after_round": after_round,
                "peak_rss_MB": max(
                    x["rss_MB"] for x in (baseline, after_connect, after_idle, after_round)
                ),
            }
        ),
        flush=True,
    )
    return 0


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def scale(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    store, keys = make_federation(root, args.scale_nodes)
    store.close()
    cmd = [sys.executable, str(HERE), "--worker", "scale-coordinator", "--root", str(root)]
    cmd += ["--nodes", str(args.scale_nodes), "--idle", str(args.idle)]
    coordinator = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    procs: list[subprocess.Popen[bytes]] = []
    node_rss: list[float] = []
    done = threading.Event()

    def sample() -> None:  # node RSS while they are all alive and connected
        while not done.wait(0.5):
            try:
                alive = [psutil.Process(p.pid) for p in procs if p.poll() is None]
                if len(alive) == len(procs) and alive:
                    node_rss[:] = [c.memory_info().rss / 1e6 for c in alive]
            except psutil.Error:
                continue

    try:
        assert coordinator.stdout is not None
        port = json.loads(coordinator.stdout.readline())["port"]
        procs = spawn_nodes(HERE, keys, f"127.0.0.1:{port}", None)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        line = coordinator.stdout.readline()
        done.set()
        coordinator.wait(timeout=120)
        report: dict[str, Any] = json.loads(line)
        report["node_processes"] = len(procs)
        report["node_rss_MB_each"] = statistics.median(node_rss) if node_rss else float("nan")
    finally:
        done.set()
        stop(procs)
        if coordinator.poll() is None:
            coordinator.kill()
    return report


def table(results: dict[str, Any]) -> str:
    t = results.get("throughput")
    lines = []
    if t:
        lines.append(
            f"throughput: {t['params']:,} float32 params ({t['payload_bytes'] / 1e6:.1f} MB) to "
            f"{t['nodes']} node processes and back ({t['bytes_per_round'] / 1e6:.0f} MB/round)"
        )
        lines.append(
            f"{'transport':<26}{'s/round':>10}{'MB/s':>10}{'vs raw':>9}{'vs TLS raw':>12}"
            f"{'CPU s coord':>13}{'CPU s nodes':>13}"
        )
        for label, key in (
            ("raw TCP socket", "raw_socket"),
            ("raw TLS socket", "raw_tls_socket"),
            ("bare grpcio (no shoal)", "bare_grpc"),
            ("shoal plaintext (lane)", "insecure"),
            ("shoal mutual TLS (lane)", "tls"),
        ):
            row = t[key]
            ratio = row.get("ratio_to_raw", 1.0)
            tls_ratio = row.get("ratio_to_raw_tls", 1.0 if key == "raw_tls_socket" else None)
            tls_text = f"{tls_ratio:>11.0%} " if tls_ratio is not None else f"{'':>12}"
            lines.append(
                f"{label:<26}{row['s_per_round']:>10.3f}{row['throughput_MBps']:>10.0f}"
                f"{ratio:>8.0%} {tls_text}{row['coordinator_cpu_s']:>13.2f}"
                f"{row['nodes_cpu_s']:>13.2f}"
            )
    s = results.get("scale")
    if s:
        lines.append("")
        lines.append(
            f"scale: {s['connected']}/{s['node_processes']} node processes connected in "
            f"{s['connect_s']:.1f} s; one round to all of them in {s['round_s']:.2f} s"
        )
        lines.append(f"{'coordinator':<26}{'RSS MB':>10}{'CPU s':>10}")
        for label, key in (
            ("started, no nodes", "baseline"),
            ("all connected", "after_connect"),
            (f"after {s['idle_s']:.0f} s idle", "after_idle"),
            ("after one round", "after_round"),
        ):
            lines.append(f"{label:<26}{s[key]['rss_MB']:>10.1f}{s[key]['cpu_s']:>10.2f}")
        lines.append(
            f"coordinator threads: {s['threads']}; node RSS ~{s['node_rss_MB_each']:.0f} MB each"
        )
    return "\n".join(lines)


def main() -> int:
    # This file is named grpc.py: with its directory first on sys.path, `import grpc` would
    # find this script instead of grpcio.
    if sys.path and Path(sys.path[0]).resolve() == HERE.parent:
        sys.path.pop(0)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=["node", "raw", "bare", "scale-coordinator"])
    parser.add_argument("--params", type=int, default=10_000_000)
    parser.add_argument("--nodes", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunk-bytes", type=int, default=4 << 20)
    parser.add_argument("--scale-nodes", type=int, default=100)
    parser.add_argument("--idle", type=float, default=15.0)
    parser.add_argument("--skip", choices=["throughput", "scale"], action="append", default=[])
    parser.add_argument("--json", metavar="PATH")
    # worker options
    parser.add_argument("--target")
    parser.add_argument("--key")
    parser.add_argument("--name")
    parser.add_argument("--certs")
    parser.add_argument("--port", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--root")
    parser.add_argument("--connect-timeout", type=float, default=600)
    args = parser.parse_args()
    if args.worker == "node":
        return node_main(args)
    if args.worker == "raw":
        return raw_node_main(args)
    if args.worker == "bare":
        return bare_node_main(args)
    if args.worker == "scale-coordinator":
        return scale_coordinator_main(args)

    results: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_avg_1m_at_start": os.getloadavg()[0]},
        "python": sys.version.split()[0],
    }
    with tempfile.TemporaryDirectory(prefix="shoal-grpc-bench-") as tmp:
        if "throughput" not in args.skip:
            results["throughput"] = throughput(args, Path(tmp) / "t")
        if "scale" not in args.skip:
            results["scale"] = scale(args, Path(tmp) / "s")
    results["machine"]["load_avg_1m_at_end"] = os.getloadavg()[0]
    print(table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
