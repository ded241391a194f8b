"""ECDH PSI throughput: two parties, ``--ids`` ids each, 50% overlap, in one process.

Prints a table (wall time per phase, total, bytes per id) and writes JSON. Each repeat is a
fresh session (new salt and keys); medians of ``--repeats``.

    python benchmarks/psi.py --ids 100000 --repeats 3 --json psi.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def run_once(ids: int) -> dict[str, float]:
    from shoal.crypto.psi import PsiParty, new_salt

    a_ids = [f"id{i}" for i in range(ids)]
    b_ids = [f"id{i}" for i in range(ids // 2, ids // 2 + ids)]
    salt = new_salt()
    t0 = time.perf_counter()
    a = PsiParty(ids=a_ids, salt=salt)
    b = PsiParty(ids=b_ids, salt=salt)
    t1 = time.perf_counter()
    once_a, once_b = a.blind_own(), b.blind_own()
    t2 = time.perf_counter()
    full_a, full_b = b.blind(once_a), a.blind(once_b)
    t3 = time.perf_counter()
    ra = a.intersect(full_a, [full_b])
    rb = b.intersect(full_b, [full_a])
    t4 = time.perf_counter()
    assert ra.size == rb.size == ids - ids // 2
    # what crosses the wire per party: its once-blinded set, the other's set blinded
    # again (sent back to the owner), and its fully blinded set (sent to the other)
    sent = once_a.nbytes + full_b.nbytes + full_a.nbytes
    return {
        "hash_s": t1 - t0,
        "blind_own_s": t2 - t1,
        "blind_peer_s": t3 - t2,
        "intersect_s": t4 - t3,
        "total_s": t4 - t0,
        "bytes_per_id": sent / ids,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--ids", type=int, default=100000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    runs = [run_once(args.ids) for _ in range(args.repeats)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(f"ECDH PSI (Ristretto255), 2 parties x {args.ids} ids, 50% overlap, one process")
    print(f"medians of {args.repeats} sessions")
    for k, v in med.items():
        print(f"  {k:14s} {v:10.2f}")
    if args.json:
        args.json.write_text(json.dumps({"ids": args.ids, "median": med, "runs": runs}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
