"""Benchmark: the floor of a per-file scan of small pickle files, in-process.

benchmarks/scan.py times each scanner as a command (net of start-up); this times, in one
warm process, what a scan of the small corpus's pickle files (``.pkl``, ``.pt``, ``.bin``: the files
both shoal and ModelScan analyse but two ``.h5``, plus two hostile ``.pt`` zips ModelScan
cannot open) cannot go below, interleaved, medians over ``--repeats`` passes:

- read: open and read every file;
- genops: read, then walk every pickle stream with ``pickletools.genops`` (each ``*.pkl``
  member of a zip, every concatenated pickle of a file): what a scanner that lists opcodes
  and globals does, as ModelScan's pickle scan does;
- shoal: ``shoal.scan.scan_file`` on every file (symbolic execution with all its checks);
- shoal-base (with ``--baseline SRC``, an earlier shoal's ``src`` folder): the same in a child
  process importing that shoal, told to make each pass in turn with the others, so before and
  after come from one interleaved run (its CPU is measured inside the child).

Run:  python benchmarks/scan_floor.py [--repeats 15] [--json out.json] [--baseline SRC]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickletools
import statistics
import subprocess
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


# The baseline's passes: warm once, then one timed pass per line read from stdin.
_CHILD = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from shoal.scan import scan_file\n"
    "files = [Path(p) for p in sys.argv[1:]]\n"
    "for p in files: scan_file(p)\n"
    "print('ready', flush=True)\n"
    "for _line in sys.stdin:\n"
    "    t = time.process_time()\n"
    "    for p in files: scan_file(p)\n"
    "    print(time.process_time() - t, flush=True)\n"
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--baseline", type=Path, help="an earlier shoal's src folder")
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
        steps: dict[str, Any] = {
            "read": lambda p: p.read_bytes(),
            "genops": _genops,
            "shoal": scan_file,
        }
        child = None
        if args.baseline:
            env = {**os.environ, "PYTHONPATH": str(args.baseline.resolve())}
            child = subprocess.Popen(
                [sys.executable, "-c", _CHILD, *map(str, files)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                env=env,
            )
            assert child.stdin is not None and child.stdout is not None
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError("the baseline shoal did not start")
            steps["shoal-base"] = None
        times: dict[str, list[float]] = {k: [] for k in steps}
        for _ in range(args.repeats):
            for name, step in steps.items():
                if step is None and child is not None:  # the baseline, timed in its process
                    assert child.stdin is not None and child.stdout is not None
                    child.stdin.write("pass\n")
                    child.stdin.flush()
                    times[name].append(float(child.stdout.readline()))
                    continue
                t = time.process_time()
                for p in files:
                    step(p)
                times[name].append(time.process_time() - t)
        if child is not None:
            assert child.stdin is not None
            child.stdin.close()
            child.wait()
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
    if "shoal-base" in med:
        out["base_over_genops"] = med["shoal-base"] / med["genops"]
        out["shoal_over_base"] = med["shoal"] / med["shoal-base"]
    print(f"{len(files)} small pickle files, {mb:.2f} MB, {ops} opcodes; {args.repeats} passes")
    for k in steps:
        lo, hi = out["range_s"][k]
        print(f"  {k:10s} {med[k] * 1e3:7.1f} ms CPU [{lo * 1e3:.1f}-{hi * 1e3:.1f}]")
    print(f"  shoal / genops {out['shoal_over_genops']:.2f}x")
    if "shoal-base" in med:
        print(f"  shoal-base / genops {out['base_over_genops']:.2f}x")
        print(f"  shoal / shoal-base {out['shoal_over_base']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
