"""Benchmark: the floor of a per-file scan of small pickle files, in-process.

benchmarks/scan.py times each scanner as a command (net of start-up); this times, in one
warm process, what a scan of the small corpus's pickle files (``.pkl``, ``.pt``, ``.bin``: the files
both shoal and ModelScan analyse but two ``.h5``, plus two hostile ``.pt`` zips ModelScan
cannot open) cannot go below, interleaved, medians over ``--repeats`` passes:

- read: open and read every file;
- genops: read, then walk every pickle stream with ``pickletools.genops`` (each ``*.pkl``
  member of a zip, every concatenated pickle of a file): what a scanner that lists opcodes
  and globals does, as ModelScan's pickle scan does;
- shoal: ``shoal.scan.scan_file`` on every file (symbolic execution with all its checks).

Run:  python benchmarks/scan_floor.py [--repeats 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import io
import json
import pickletools
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scan_corpus


def _streams(data: bytes) -> list[bytes]:
    if data[:2] == b"PK":
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as z:
                return [z.read(n) for n in z.namelist() if n.endswith(".pkl")]
        except (zipfile.BadZipFile, RuntimeError):  # a hostile zip zipfile will not open
            return []
    return [data]


def _genops(path: Path) -> int:
    ops = 0
    for s in _streams(path.read_bytes()):
        f = io.BytesIO(s)
        while f.tell() < len(s):
            try:
                for _op in pickletools.genops(f):
                    ops += 1
            except Exception:  # a hostile file's damage: stop where genops stops
                break
    return ops


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from shoal.scan import scan_file

    with tempfile.TemporaryDirectory(prefix="shoal-scan-floor-") as tmp:
        corpus = scan_corpus.build(Path(tmp), big_mb=0)
        files = sorted(
            p
            for g in ("hostile", "benign")
            for p in corpus[g]
            if p.suffix in (".pkl", ".pt", ".bin")
        )
        ops = sum(_genops(p) for p in files)
        for p in files:  # warm: imports, caches
            scan_file(p)
        steps = {
            "read": lambda p: p.read_bytes(),
            "genops": _genops,
            "shoal": scan_file,
        }
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                t = time.process_time()
                for p in files:
                    step(p)
                times[name].append(time.process_time() - t)
        mb = sum(p.stat().st_size for p in files) / 2**20
    med = {k: statistics.median(v) for k, v in times.items()}
    out: dict[str, Any] = {
        "files": len(files),
        "mb": mb,
        "opcodes": ops,
        "cpu_s": med,
        "range_s": {k: [min(v), max(v)] for k, v in times.items()},
        "shoal_over_genops": med["shoal"] / med["genops"],
    }
    print(f"{len(files)} small pickle files, {mb:.2f} MB, {ops} opcodes; {args.repeats} passes")
    for k in steps:
        lo, hi = out["range_s"][k]
        print(f"  {k:7s} {med[k] * 1e3:7.1f} ms CPU [{lo * 1e3:.1f}-{hi * 1e3:.1f}]")
    print(f"  shoal / genops {out['shoal_over_genops']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
