"""Benchmark: the scanner's cost per byte of opcodes it reads one at a time (its slow path).

Real model files are mostly raw array data (skipped) and a few common opcodes the scanner
reads inline; a hostile file can instead repeat whichever opcode costs the most per byte, and
compress it: 16 MiB of opcodes (what a stream may expand to before ``max_ratio`` counts) fit in
a few hundred bytes of bz2. For each pattern this builds ``--mb`` MiB of it inside one pickle
and reports the scanner's in-process CPU per byte (median of ``--repeats``), and the CPU to
scan a bz2 bomb of it (16 MiB plus one; refused by the ratio).

Run:  python benchmarks/scan_opcodes.py [--mb 2] [--repeats 3] [--json out.json]
Compare two versions by running it with each on PYTHONPATH (the commit message says how).
"""

from __future__ import annotations

import argparse
import bz2
import json
import statistics
import sys
import time
from typing import Any

from shoal.scan import scan_bytes

# name -> repeated bytes (each keeps the stack bounded, imports nothing)
PATTERNS: dict[str, bytes] = {
    "NONE POP": b"N0",
    "DUP POP": b"20",
    "MARK POP_MARK": b"(1",
    "EMPTY_SET POP": b"\x8f0",
    "MARK LIST POP": b"(l0",
    "MARK DICT POP": b"(d0",
    "MARK PAIR DICT POP": b"(K\x00K\x00d0",
    "MARK FROZENSET POP": b"(\x910",
    "PROTO 4": b"\x80\x04",
    "INT POP": b"I1\n0",
    "FLOAT POP": b"F1\n0",
    "LONG POP": b"L1\n0",
    "STRING POP": b"S'a'\n0",
    "UNICODE POP": b"Va\n0",
    "LONG1 POP": b"\x8a\x01\x010",
    "SHORT_BINSTRING POP": b"U\x01a0",
    "EMPTY_LIST POP": b"]0",
    "BINGET POP": b"h\x000",
    "FRAME (inline)": b"\x95" + bytes(8),
}


def pickle_of(pattern: bytes, size: int) -> bytes:
    # NONE first (memo 0 holds it, for BINGET), then the pattern
    return b"\x80\x04N\x94" + pattern * (size // len(pattern)) + b"."


def cpu(fn: Any) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=2.0, help="MiB of each pattern")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--bomb", action="store_true", help="also scan a 16 MiB bz2 of each")
    parser.add_argument("--only", help="comma-separated pattern names")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    size = int(args.mb * (1 << 20))
    names = args.only.split(",") if args.only else list(PATTERNS)
    rows = []
    for name in names:
        data = pickle_of(PATTERNS[name], size)
        report = scan_bytes(data)
        assert report.severity.name in ("NONE", "LOW"), (name, report.findings)
        times = [cpu(lambda d=data: scan_bytes(d)) for _ in range(args.repeats)]
        row: dict[str, Any] = {
            "pattern": name,
            "mib": round(len(data) / 2**20, 2),
            "us_per_byte": round(statistics.median(times) / len(data) * 1e6, 4),
            "cpu_s": [round(t, 3) for t in times],
        }
        if args.bomb:
            bomb = bz2.compress(pickle_of(PATTERNS[name], (16 << 20) + (1 << 20)))
            found: list[Any] = []
            row["bomb_bytes"] = len(bomb)
            row["bomb_cpu_s"] = round(cpu(lambda b=bomb, f=found: f.append(scan_bytes(b))), 3)
            row["bomb_severity"] = found[0].severity.name
        rows.append(row)
        print(
            f"{name:22s} {row['mib']:5.2f} MiB  {row['us_per_byte']:7.4f} us/byte"
            + (
                f"   bz2 bomb {row['bomb_bytes']} B: {row['bomb_cpu_s']} s {row['bomb_severity']}"
                if args.bomb
                else ""
            ),
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "argv": sys.argv[1:]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
