"""ECDH PSI throughput: two parties, ``--ids`` ids each, 50% overlap.

Two rows, run interleaved (each repeat is a fresh session: new salt and keys):

- ``two-process``: each party in its own process, as on two machines, exchanging its
  blinded sets over a TCP socket on 127.0.0.1, so their group operations overlap on the
  cores. Wall time runs from both parties ready (imports done, socket connected) to both
  holding the intersection; CPU-s is each party process's own CPU time (all its threads).
- ``one-process``: both parties in this process, one after the other, as in simulation.

Each party uses ``--workers`` threads for its group operations (default: all cores). Bytes
per id: what one party sends over the socket (its once-blinded set, then the other's set
blinded again), payload plus framing, per own id. Prints medians and writes JSON.

    python benchmarks/psi.py --ids 100000 --repeats 3 --json psi.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import struct
import time
from pathlib import Path
from typing import Any


def _ids(ids: int, party: int) -> list[str]:
    start = 0 if party == 0 else ids // 2
    return [f"id{i}" for i in range(start, start + ids)]


def run_one_process(ids: int, workers: int | None) -> dict[str, float]:
    from shoal.crypto.psi import PsiParty, _rbcl, new_salt

    _rbcl()
    a_ids, b_ids = _ids(ids, 0), _ids(ids, 1)
    salt = new_salt()
    c0 = time.process_time()
    t0 = time.perf_counter()
    a = PsiParty(ids=a_ids, salt=salt, workers=workers)
    b = PsiParty(ids=b_ids, salt=salt, workers=workers)
    t1 = time.perf_counter()
    once_a, once_b = a.blind_own(), b.blind_own()
    t2 = time.perf_counter()
    full_a, full_b = b.blind(once_a), a.blind(once_b)
    t3 = time.perf_counter()
    ra = a.intersect(full_a, [full_b])
    rb = b.intersect(full_b, [full_a])
    t4 = time.perf_counter()
    assert ra.size == rb.size == ids - ids // 2
    return {
        "wall_s": t4 - t0,
        "cpu_s_both": time.process_time() - c0,
        "hash_s": t1 - t0,
        "blind_own_s": t2 - t1,
        "blind_peer_s": t3 - t2,
        "intersect_s": t4 - t3,
        "bytes_per_id": (once_a.nbytes + full_b.nbytes) / ids,
    }


def _send(sock: socket.socket, data: bytes) -> int:
    sock.sendall(struct.pack(">Q", len(data)) + data)
    return 8 + len(data)


def _recv(sock: socket.socket) -> bytes:
    def exactly(n: int) -> bytes:
        buf = bytearray(n)
        view, got = memoryview(buf), 0
        while got < n:
            k = sock.recv_into(view[got:])
            if not k:
                raise ConnectionError("peer closed the socket")
            got += k
        return bytes(buf)

    (n,) = struct.unpack(">Q", exactly(8))
    return exactly(n)


def _party(
    role: int, ids: int, salt: bytes, port: Any, barrier: Any, out: Any, workers: int | None
) -> None:
    import numpy as np

    from shoal.crypto.psi import POINT_BYTES, PsiParty, _rbcl

    _rbcl()  # loading libsodium happens once per process, before the clock starts
    my_ids = _ids(ids, role)
    if role == 0:
        srv = socket.create_server(("127.0.0.1", 0))
        port.value = srv.getsockname()[1]
        barrier.wait()  # port published
        sock, _ = srv.accept()
        srv.close()
    else:
        barrier.wait()
        sock = socket.create_connection(("127.0.0.1", port.value))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    barrier.wait()  # both connected: the clock starts
    c0, t0 = time.process_time(), time.perf_counter()
    me = PsiParty(ids=my_ids, salt=salt, workers=workers)
    sent = _send(sock, me.blind_own().tobytes())
    theirs = np.frombuffer(_recv(sock), dtype=np.uint8).reshape(-1, POINT_BYTES)
    full_theirs = me.blind(theirs)
    sent += _send(sock, full_theirs.tobytes())
    full_mine = np.frombuffer(_recv(sock), dtype=np.uint8).reshape(-1, POINT_BYTES)
    res = me.intersect(full_mine, [full_theirs])
    t1 = time.perf_counter()
    sock.close()
    out.send({"wall_s": t1 - t0, "cpu_s": time.process_time() - c0, "size": res.size, "sent": sent})


def run_two_process(ids: int, workers: int | None) -> dict[str, float]:
    from shoal.crypto.psi import new_salt

    ctx = mp.get_context("spawn")
    salt = new_salt()
    port, barrier = ctx.Value("i", 0), ctx.Barrier(3)
    pipes = [ctx.Pipe(duplex=False) for _ in range(2)]
    procs = [
        ctx.Process(target=_party, args=(r, ids, salt, port, barrier, pipes[r][1], workers))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    barrier.wait()
    barrier.wait()
    t0 = time.perf_counter()
    res = [pipes[r][0].recv() for r in range(2)]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join()
    assert res[0]["size"] == res[1]["size"] == ids - ids // 2
    return {
        "wall_s": wall,
        "cpu_s_a": res[0]["cpu_s"],
        "cpu_s_b": res[1]["cpu_s"],
        "bytes_per_id": res[0]["sent"] / ids,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ids", type=int, default=100000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workers", type=int, default=None, help="threads per party")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    runs: dict[str, list[dict[str, float]]] = {"two-process": [], "one-process": []}
    for _ in range(args.repeats):  # interleaved, so load from others hits both rows
        runs["two-process"].append(run_two_process(args.ids, args.workers))
        runs["one-process"].append(run_one_process(args.ids, args.workers))
    med = {row: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for row, rs in runs.items()}
    print(f"ECDH PSI (Ristretto255), 2 parties x {args.ids} ids, 50% overlap")
    print(f"medians of {args.repeats} sessions, workers per party: {args.workers or 'all cores'}")
    for row, m in med.items():
        print(f"{row}:")
        for k, v in m.items():
            print(f"  {k:14s} {v:10.2f}")
    if args.json:
        args.json.write_text(
            json.dumps({"ids": args.ids, "workers": args.workers, "median": med, "runs": runs})
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
