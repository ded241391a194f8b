"""Paillier throughput: shoal.crypto.paillier against phe (python-paillier with gmpy2).

Both libraries use the same 2048-bit key in the same run; each repeat times shoal in this
process and phe in a subprocess (``--phe-python``: $PHE_PYTHON, else /work/venvs/phe if it
exists, else this interpreter when phe is installed here from the dev extra), the order
alternating between repeats. Every operation is timed by wall clock and by the process's
CPU time; rates are medians of the repeats, ratios are CPU-time ratios (the machine is shared,
so wall time carries other jobs' load). Prints a table and writes JSON.

Encryption rows say where each ``r**n`` comes from: fresh from the public key (phe's way),
fresh from the key holder's CRT sampler (no precomputation), fresh as ``h_s**a`` from the
key's DJN base (a fixed-base table built once per key, its build time reported on its own),
or taken from a pool filled beforehand (online cost only; the pool's generation is its own
row). phe is always timed its own way (a uniform r per ciphertext, no base).

Decryption rows: the full CRT (phe's way), then the same ciphertexts decrypted by a key
holder that knows every value lies within 2**33 once encoded (|x| < 1 at 32 fractional
bits): the half CRT per ciphertext, and the checked batch of all ``--count`` of them (see
docs/paillier.md). phe has neither; its row is its ordinary decrypt.

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
from typing import Any


def _default_phe_python() -> str:
    if os.environ.get("PHE_PYTHON"):
        return os.environ["PHE_PYTHON"]
    if Path("/work/venvs/phe/bin/python").exists():
        return "/work/venvs/phe/bin/python"
    import importlib.util

    # phe is a dev extra: never a library dependency, but present in a dev environment
    return sys.executable if importlib.util.find_spec("phe") else "/work/venvs/phe/bin/python"


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


class _Clock:
    """Records ``name``: ops/s by wall clock and by CPU time."""

    def __init__(self, out: dict[str, float]) -> None:
        self.out = out

    def __call__(self, name: str, count: int, fn: Any) -> Any:
        c, t = time.process_time(), time.perf_counter()
        res = fn()
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        self.out[name] = _rate(count, wall)
        self.out[name + "_cpu"] = _rate(count, cpu)
        return res


def run_phe(key: dict[str, int], count: int, adds: int) -> dict[str, float]:
    """phe's encrypt/add/scalar-mul/decrypt rates (runs in phe's interpreter)."""
    import random

    import phe

    pk = phe.PaillierPublicKey(key["n"])
    sk = phe.PaillierPrivateKey(pk, key["p"], key["q"])
    rnd = random.Random(0)
    xs = [rnd.uniform(-1, 1) for _ in range(count)]
    out: dict[str, float] = {}
    clock = _Clock(out)
    enc = clock("encrypt", count, lambda: [pk.encrypt(x) for x in xs])
    a = [enc[i % count] for i in range(adds)]
    b = [enc[(i + 1) % count] for i in range(adds)]
    clock("add", adds, lambda: [x + y for x, y in zip(a, b)])
    ks = [rnd.uniform(-1, 1) for _ in range(count)]
    clock("scalar_mul", count, lambda: [e * k for e, k in zip(enc, ks)])
    clock("decrypt", count, lambda: [sk.decrypt(e) for e in enc])
    return out


def run_shoal(key: dict[str, int], count: int, adds: int) -> dict[str, float]:
    import numpy as np

    from shoal.crypto import paillier as P

    pk = P.PublicKey(n=key["n"])  # no DJN base: uniform r**n, as phe
    sk = P.PrivateKey(public_key=pk, p=key["p"], q=key["q"])
    pkd = P.PublicKey(n=key["n"], hs=key["hs"])  # the same key with its DJN base
    skd = P.PrivateKey(public_key=pkd, p=key["p"], q=key["q"])
    rng = np.random.default_rng(0)
    xs = rng.uniform(-1, 1, size=count)
    out: dict[str, float] = {}
    clock = _Clock(out)
    c = time.process_time()
    pkd.djn_table()  # once per key, reused by every later encryption
    out["djn_table_s_cpu"] = time.process_time() - c
    clock("encrypt_djn", count, lambda: P.encrypt(pkd, xs))
    clock("encrypt_djn_key_holder", count, lambda: P.encrypt(pkd, xs, private_key=skd))
    # a fresh r**n per value from the public key alone, as phe does
    enc = clock("encrypt", count, lambda: P.encrypt(pk, xs))
    # the key holder: a fresh r**n per value by CRT, nothing precomputed
    clock("encrypt_key_holder", count, lambda: P.encrypt(pk, xs, private_key=sk))
    pool = clock(
        "pool_refill_key_holder",
        count,
        lambda: P.RandomnessPool(public_key=pk, size=count, private_key=sk),
    )
    clock("pool_refill_public", count, lambda: P.RandomnessPool(public_key=pk, size=count))
    clock("encrypt_online_pool", count, lambda: P.encrypt(pk, xs, pool=pool))
    big = P.EncryptedVector(
        public_key=pk,
        ciphertexts=tuple(enc.ciphertexts[i % count] for i in range(adds)),
        shape=(adds,),
        frac_bits=enc.frac_bits,
    )
    clock("add", adds, lambda: big.add(big))
    ks = rng.uniform(-1, 1, size=count)
    clock("scalar_mul", count, lambda: enc.mul(ks, frac_bits=53))  # phe's float precision
    clock("decrypt", count, lambda: P.decrypt(sk, enc))
    # The same ciphertexts, by a key holder that knows |x| < 1 at 32 fractional bits, so
    # every encoded value lies within 2**33: the half CRT one by one, and the checked batch
    # (packed under encryption, 64-bit weighted check). Both return decrypt()'s array.
    bound = enc.frac_bits + 1
    clock(
        "decrypt_half",
        count,
        lambda: P.from_fixed(
            [sk.raw_decrypt_signed(c, bound) for c in enc.ciphertexts], enc.frac_bits, (count,)
        ),
    )
    clock("decrypt_batch", count, lambda: P.decrypt_bounded(sk, enc, bound_bits=bound))
    packing = P.Packing(key_bits=pk.bits, value_bits=48, additions=1023, frac_bits=32)
    vals = rng.uniform(-1000, 1000, size=packing.slots * count)
    pool = P.RandomnessPool(public_key=pk, size=count, private_key=sk)
    clock(
        "packed_values_online_pool",
        vals.size,
        lambda: P.encrypt_packed(pk, vals, packing, pool=pool),
    )
    clock(
        "packed_values_key_holder",
        vals.size,
        lambda: P.encrypt_packed(pk, vals, packing, private_key=sk),
    )
    clock(
        "packed_values_djn",
        vals.size,
        lambda: P.encrypt_packed(pkd, vals, packing),
    )
    clock(
        "packed_values_djn_key_holder",
        vals.size,
        lambda: P.encrypt_packed(pkd, vals, packing, private_key=skd),
    )
    # decryption per value when 35 values share a plaintext (phe has no packing)
    packed = P.encrypt_packed(pkd, vals, packing)
    clock("decrypt_packed_values", vals.size, lambda: P.decrypt_packed(sk, packed))
    out["packed_slots"] = float(packing.slots)
    run_ou(key, xs, ks, clock, adds)
    return out


def run_ou(key: dict[str, int], xs: Any, ks: Any, clock: _Clock, adds: int) -> None:
    """The second scheme, Okamoto-Uchiyama, at the same modulus size (rows ``ou_*``)."""
    import numpy as np

    from shoal.crypto import okamoto_uchiyama as OU

    n = key["ou_p"] ** 2 * key["ou_q"]
    pk = OU.OUPublicKey(n=n, g=key["ou_g"], h=pow(key["ou_g"], n, n))
    sk = OU.OUPrivateKey(public_key=pk, p=key["ou_p"], q=key["ou_q"])
    c = time.process_time()
    pk.h_table()  # once per key, like the DJN table
    clock.out["ou_table_s_cpu"] = time.process_time() - c
    enc = clock("ou_encrypt", len(xs), lambda: OU.encrypt(pk, xs, frac_bits=32))
    a = [enc[i % len(enc)] for i in range(adds)]
    b = [enc[(i + 1) % len(enc)] for i in range(adds)]
    clock("ou_add", adds, lambda: pk.add(a, b))
    scal = [int(v) for v in np.rint(np.ldexp(ks, 53)).tolist()]
    clock("ou_scalar_mul", len(enc), lambda: pk.mul(enc, scal))
    clock("ou_decrypt", len(enc), lambda: OU.decrypt(sk, enc, frac_bits=32))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bits", type=int, default=2048)
    ap.add_argument("--count", type=int, default=60, help="values per expensive operation")
    ap.add_argument("--adds", type=int, default=20000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--phe-python", default=None)
    ap.add_argument("--worker", choices=["phe"], help=argparse.SUPPRESS)
    ap.add_argument("--key", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker == "phe":
        key = json.loads(args.key.read_text())
        print(json.dumps(run_phe(key, args.count, args.adds)))
        return 0

    from shoal.crypto import paillier as P

    args.phe_python = args.phe_python or _default_phe_python()
    pk, sk = P.generate_keypair(args.bits, insecure=args.bits < 2048)
    key = {"n": int(pk.n), "p": int(sk.p), "q": int(sk.q), "hs": int(pk.hs)}
    from shoal.crypto import okamoto_uchiyama as OU

    ou_pk, ou_sk = OU.generate_ou_keypair(args.bits, insecure=args.bits < 2048)
    key.update(ou_p=int(ou_sk.p), ou_q=int(ou_sk.q), ou_g=int(ou_pk.g))
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
        ("encrypt, public key (fresh r^n each)", "encrypt", "encrypt"),
        ("encrypt, key holder (fresh CRT r^n each)", "encrypt_key_holder", "encrypt"),
        ("encrypt, public key + DJN base (fresh h_s^a)", "encrypt_djn", "encrypt"),
        ("encrypt, key holder + DJN base (fresh h_s^a)", "encrypt_djn_key_holder", "encrypt"),
        ("encrypt online (pooled r^n; excl. pool)", "encrypt_online_pool", None),
        ("pool generation, key holder (CRT)", "pool_refill_key_holder", None),
        ("pool generation, public key only", "pool_refill_public", None),
        ("add", "add", "add"),
        ("scalar multiply (53-bit)", "scalar_mul", "scalar_mul"),
        ("decrypt", "decrypt", "decrypt"),
        ("decrypt, |x| < 2^33 known: half CRT each", "decrypt_half", "decrypt"),
        ("decrypt, |x| < 2^33 known: checked batch", "decrypt_batch", "decrypt"),
        ("decrypt, packed values (per value)", "decrypt_packed_values", "decrypt"),
        ("packed values, online (excl. pool)", "packed_values_online_pool", None),
        ("packed values, key holder (fresh CRT r^n)", "packed_values_key_holder", None),
        ("packed values, public key + DJN (fresh)", "packed_values_djn", None),
        ("packed values, key holder + DJN (fresh)", "packed_values_djn_key_holder", None),
        ("Okamoto-Uchiyama encrypt (fresh r)", "ou_encrypt", "encrypt"),
        ("Okamoto-Uchiyama add", "ou_add", "add"),
        ("Okamoto-Uchiyama scalar multiply (53-bit)", "ou_scalar_mul", "scalar_mul"),
        ("Okamoto-Uchiyama decrypt", "ou_decrypt", "decrypt"),
    ]
    print(f"Paillier {args.bits}-bit, medians of {args.repeats} interleaved repeats (ops/s)")
    print(f"phe: {args.phe_python if have_phe else 'not run'}")
    head = f"{'operation':44s} {'shoal cpu':>10s} {'phe cpu':>10s} {'ratio':>6s}"
    print(head + f" {'shoal wall':>10s} {'phe wall':>10s}")
    table = []
    for label, sk_key, phe_key in rows:
        s_cpu, s_wall = med["shoal"][sk_key + "_cpu"], med["shoal"][sk_key]
        phe_med = med.get("phe", {})
        p_cpu = phe_med.get(phe_key + "_cpu") if phe_key else None
        p_wall = phe_med.get(phe_key) if phe_key else None
        ratio = s_cpu / p_cpu if p_cpu else None
        table.append(
            {
                "operation": label,
                "shoal_cpu": s_cpu,
                "phe_cpu": p_cpu,
                "ratio_cpu": ratio,
                "shoal_wall": s_wall,
                "phe_wall": p_wall,
            }
        )

        def f(v: float | None, w: int = 10, d: int = 0) -> str:
            return f"{v:{w}.{d}f}" if v else f"{'-':>{w}s}"

        print(f"{label:44s} {f(s_cpu)} {f(p_cpu)} {f(ratio, 6, 2)} {f(s_wall)} {f(p_wall)}")
    print(f"slots per {args.bits}-bit packed plaintext: {int(med['shoal']['packed_slots'])}")
    print(f"DJN fixed-base table, once per key: {med['shoal']['djn_table_s_cpu']:.2f} CPU-s")
    print(
        f"Okamoto-Uchiyama h table, once per key: {med['shoal']['ou_table_s_cpu']:.2f} CPU-s; "
        "its rows' ratios are against phe's Paillier (another scheme, same modulus size)"
    )
    if not have_phe:
        print(f"phe not run: no interpreter at {args.phe_python}", file=sys.stderr)
    if args.json:
        args.json.write_text(
            json.dumps({"bits": args.bits, "repeats": args.repeats, "table": table, "runs": runs})
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
