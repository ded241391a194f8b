"""Paillier throughput: shoal.crypto.paillier against phe (python-paillier with gmpy2).

Both libraries use the same 2048-bit key in the same run; each repeat times shoal in this
process and phe in its own virtualenv (``--phe-python``, default /work/venvs/phe), the order
alternating between repeats. Prints a table of medians and writes JSON.

    python benchmarks/paillier.py --repeats 5 --json paillier.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PHE_PYTHON = os.environ.get("PHE_PYTHON", "/work/venvs/phe/bin/python")


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def run_phe(key: dict[str, int], count: int, adds: int) -> dict[str, float]:
    """phe's encrypt/add/scalar-mul/decrypt rates (runs inside the phe virtualenv)."""
    import random

    import phe

    pk = phe.PaillierPublicKey(key["n"])
    sk = phe.PaillierPrivateKey(pk, key["p"], key["q"])
    rnd = random.Random(0)
    xs = [rnd.uniform(-1, 1) for _ in range(count)]
    t = time.perf_counter()
    enc = [pk.encrypt(x) for x in xs]
    out = {"encrypt": _rate(count, time.perf_counter() - t)}
    a = [enc[i % count] for i in range(adds)]
    b = [enc[(i + 1) % count] for i in range(adds)]
    t = time.perf_counter()
    _ = [x + y for x, y in zip(a, b)]
    out["add"] = _rate(adds, time.perf_counter() - t)
    ks = [rnd.uniform(-1, 1) for _ in range(count)]
    t = time.perf_counter()
    _ = [e * k for e, k in zip(enc, ks)]
    out["scalar_mul"] = _rate(count, time.perf_counter() - t)
    t = time.perf_counter()
    _ = [sk.decrypt(e) for e in enc]
    out["decrypt"] = _rate(count, time.perf_counter() - t)
    return out


def run_shoal(key: dict[str, int], count: int, adds: int) -> dict[str, float]:
    import numpy as np

    from shoal.crypto import paillier as P

    pk = P.PublicKey(n=key["n"])
    sk = P.PrivateKey(public_key=pk, p=key["p"], q=key["q"])
    rng = np.random.default_rng(0)
    xs = rng.uniform(-1, 1, size=count)
    out: dict[str, float] = {}
    t = time.perf_counter()
    enc = P.encrypt(pk, xs)  # no pool: a fresh r**n per value, as phe does
    out["encrypt"] = _rate(count, time.perf_counter() - t)
    t = time.perf_counter()
    pool = P.RandomnessPool(public_key=pk, size=count, private_key=sk)
    out["pool_refill_key_holder"] = _rate(count, time.perf_counter() - t)
    t = time.perf_counter()
    P.RandomnessPool(public_key=pk, size=count)
    out["pool_refill_public"] = _rate(count, time.perf_counter() - t)
    t = time.perf_counter()
    P.encrypt(pk, xs, pool=pool)
    out["encrypt_online_pool"] = _rate(count, time.perf_counter() - t)
    big = P.EncryptedVector(
        public_key=pk,
        ciphertexts=tuple(enc.ciphertexts[i % count] for i in range(adds)),
        shape=(adds,),
        frac_bits=enc.frac_bits,
    )
    t = time.perf_counter()
    big.add(big)
    out["add"] = _rate(adds, time.perf_counter() - t)
    ks = rng.uniform(-1, 1, size=count)
    t = time.perf_counter()
    enc.mul(ks, frac_bits=53)  # same precision as phe's float scalars
    out["scalar_mul"] = _rate(count, time.perf_counter() - t)
    t = time.perf_counter()
    P.decrypt(sk, enc)
    out["decrypt"] = _rate(count, time.perf_counter() - t)
    packing = P.Packing(key_bits=pk.bits, value_bits=48, additions=1023, frac_bits=32)
    vals = rng.uniform(-1000, 1000, size=packing.slots * count)
    pool = P.RandomnessPool(public_key=pk, size=count, private_key=sk)
    t = time.perf_counter()
    P.encrypt_packed(pk, vals, packing, pool=pool)
    out["packed_values_online_pool"] = _rate(vals.size, time.perf_counter() - t)
    t = time.perf_counter()
    P.encrypt_packed(pk, vals, packing, pool=P.RandomnessPool(public_key=pk, private_key=sk))
    out["packed_values_key_holder_incl_refill"] = _rate(vals.size, time.perf_counter() - t)
    out["packed_slots"] = float(packing.slots)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bits", type=int, default=2048)
    ap.add_argument("--count", type=int, default=60, help="values per expensive operation")
    ap.add_argument("--adds", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--phe-python", default=PHE_PYTHON)
    ap.add_argument("--worker", choices=["phe"], help=argparse.SUPPRESS)
    ap.add_argument("--key", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "phe":
        key = json.loads(args.key.read_text())
        print(json.dumps(run_phe(key, args.count, args.adds)))
        return 0

    from shoal.crypto import paillier as P

    pk, sk = P.generate_keypair(args.bits, insecure=args.bits < 2048)
    key = {"n": int(pk.n), "p": int(sk.p), "q": int(sk.q)}
    have_phe = Path(args.phe_python).exists()
    runs: dict[str, list[dict[str, float]]] = {"shoal": [], "phe": []}
    with tempfile.TemporaryDirectory() as tmp:
        kp = Path(tmp) / "key.json"
        kp.write_text(json.dumps(key))
        for r in range(args.repeats):
            order = ["shoal", "phe"] if r % 2 == 0 else ["phe", "shoal"]
            for lib in order:
                if lib == "shoal":
                    runs["shoal"].append(run_shoal(key, args.count, args.adds))
                elif have_phe:
                    cmd = [args.phe_python, __file__, "--worker", "phe", "--key", str(kp)]
                    cmd += ["--count", str(args.count), "--adds", str(args.adds)]
                    res = subprocess.run(cmd, check=True, capture_output=True, text=True)
                    runs["phe"].append(json.loads(res.stdout))
    med = {
        lib: {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        for lib, rs in runs.items()
        if rs
    }
    rows = [
        ("encrypt (fresh r^n each)", "encrypt", "encrypt"),
        ("encrypt online (pooled r^n)", "encrypt_online_pool", "encrypt"),
        ("pool refill, key holder (CRT)", "pool_refill_key_holder", None),
        ("pool refill, public key only", "pool_refill_public", None),
        ("add", "add", "add"),
        ("scalar multiply (53-bit)", "scalar_mul", "scalar_mul"),
        ("decrypt", "decrypt", "decrypt"),
        ("packed values, online", "packed_values_online_pool", None),
        ("packed values, key holder incl. refill", "packed_values_key_holder_incl_refill", None),
    ]
    print(f"Paillier {args.bits}-bit, medians of {args.repeats} interleaved repeats (ops/s)")
    print(f"{'operation':42s} {'shoal':>12s} {'phe':>12s} {'ratio':>8s}")
    table = []
    for label, sk_key, phe_key in rows:
        s = med["shoal"][sk_key]
        p = med.get("phe", {}).get(phe_key) if phe_key else None
        ratio = s / p if p else None
        table.append({"operation": label, "shoal": s, "phe": p, "ratio": ratio})
        ps = f"{p:12.0f}" if p else f"{'-':>12s}"
        rs = f"{ratio:8.1f}" if ratio else f"{'-':>8s}"
        print(f"{label:42s} {s:12.0f} {ps} {rs}")
    print(f"slots per 2048-bit packed plaintext: {int(med['shoal']['packed_slots'])}")
    if not have_phe:
        print(f"phe not run: no interpreter at {args.phe_python}", file=sys.stderr)
    if args.json:
        args.json.write_text(
            json.dumps({"bits": args.bits, "repeats": args.repeats, "table": table, "runs": runs})
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
