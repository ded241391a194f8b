"""Helpers for benchmarks that start a real deployment: node keys in a registry, a federation
CA, node processes on 127.0.0.1, and their CPU time.

shoal is imported inside the functions: ``benchmarks/grpc.py`` shares this directory and
must drop it from ``sys.path`` before anything imports grpcio.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil


def make_federation(root: Path, count: int) -> tuple[Any, list[Path]]:
    """A registry (Store) of ``count`` nodes n0..n{count-1}, their key files and certificates
    under ``root/certs``."""
    from shoal.runtime import Store
    from shoal.runtime.grpc import make_certs, public_key_bytes, write_key_pair

    root.mkdir(parents=True, exist_ok=True)
    store = Store(root / "bench.db")
    keys = []
    names = [f"n{i}" for i in range(count)]
    for name in names:
        path = root / f"{name}.key"
        _, _, key = write_key_pair(path)
        store.add_node(node_id=name, public_key=public_key_bytes(key))
        keys.append(path)
    make_certs(root / "certs", nodes=names)
    return store, keys


def spawn_nodes(
    script: Path,
    keys: list[Path],
    target: str,
    certs: Path | None,
    *,
    extra: list[str] | None = None,
) -> list[subprocess.Popen[bytes]]:
    """One ``script --worker node`` process per key file, each named after its key."""
    # grpc core logs every GOAWAY at shutdown at INFO level: keep node stderr for errors
    env = {**os.environ, "GRPC_VERBOSITY": "ERROR"}
    procs = []
    for path in keys:
        cmd = [sys.executable, str(script), "--worker", "node", "--target", target]
        cmd += ["--key", str(path), "--name", path.stem]
        if certs is not None:
            cmd += ["--certs", str(certs)]
        procs.append(subprocess.Popen(cmd + (extra or []), stdout=subprocess.DEVNULL, env=env))
    return procs


def run_node(app: Any, args: Any, *, max_idle_s: float) -> None:
    """Serve ``app`` as the node a ``spawn_nodes`` worker was started as (its ``--target``,
    ``--key``, ``--name`` and, unless plaintext, ``--certs``) until the coordinator leaves."""
    from shoal.runtime.grpc import Backoff, ClientTLS, NodeClient, load_private_key

    tls = ClientTLS.from_dir(args.certs, name=args.name) if args.certs else None
    NodeClient(
        app=app,
        coordinator=args.target,
        key=load_private_key(args.key),
        tls=tls,
        insecure=tls is None,
        backoff=Backoff(initial_s=0.2, max_s=2.0),
        max_idle_s=max_idle_s,
    ).run()


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for_lanes(engine: Any, count: int, timeout_s: float = 120) -> None:
    """Until ``count`` sessions have their bulk lane attached."""
    deadline = time.monotonic() + timeout_s
    while sum(s.lane for s in engine.sessions()) < count:
        if time.monotonic() > deadline:
            raise RuntimeError("not all nodes opened their bulk lane")
        time.sleep(0.05)


def cpu_s(procs: list[Any]) -> float:
    """User + system CPU seconds so far of ``procs`` (Popen objects, or None for this one)."""
    total = 0.0
    for proc in procs:
        times = psutil.Process(proc.pid if proc is not None else None).cpu_times()
        total += times.user + times.system
    return total
