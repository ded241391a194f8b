"""Wire codec speed: shoal.wire encode/decode against the memory-copy floor, and safetensors.

Three payloads: one large float32 array (100 MB by default), a model of many small arrays
(50 layers: a weight matrix and a bias each), and a small control message (a few JSON
values and a short array, where fixed overhead dominates). The floor is ``np.copy`` of the
same bytes (all the arrays' bytes, made one contiguous buffer beforehand) into a fresh
buffer: what the one unavoidable copy costs, since encode too writes a fresh buffer.
safetensors (a shoal dependency, so no extra venv is needed) is the reference library doing
the same job; its numpy ``load`` copies, while shoal's decode returns read-only views into
the message (zero-copy), so decode is expected to beat the floor. Every figure is the median
of ``--repeat`` runs, all measured in this one run.

    python benchmarks/wire.py --json results/wire.json
    python benchmarks/wire.py --size-mb 20 --repeat 3        # quicker
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from shoal.wire import decode, encode

try:
    from safetensors.numpy import load as st_load
    from safetensors.numpy import save as st_save
except ImportError:  # pragma: no cover - safetensors is a shoal dependency
    st_load = st_save = None


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], repeat: int, inner: int = 1
) -> dict[str, tuple[float, float]]:
    """Median (wall, CPU) seconds per call of each function.

    Runs are interleaved so that load from other processes falls on every contender alike;
    CPU time (all single-threaded work here) is the steadier figure on a shared machine.
    """
    for fn in fns.values():
        fn()  # warm up: imports, first-touch of caches
    wall: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            for _ in range(inner):
                result = fn()
            cpu[name].append((time.process_time() - start_cpu) / inner)
            wall[name].append((time.perf_counter() - start) / inner)
            del result
    return {name: (statistics.median(wall[name]), statistics.median(cpu[name])) for name in fns}


def payloads(size_mb: float, layers: int, width: int) -> dict[str, dict[str, Any]]:
    rng = np.random.default_rng(0)
    big = rng.standard_normal(int(size_mb * 1e6) // 4, dtype=np.float32)
    model: dict[str, Any] = {}
    for i in range(layers):
        model[f"layer{i}.weight"] = rng.standard_normal((width, width), dtype=np.float32)
        model[f"layer{i}.bias"] = rng.standard_normal(width, dtype=np.float32)
    message = {"round": 17, "lr": 0.05, "phase": "train", "ids": [1, 2, 3], "mask": np.ones(8)}
    return {
        f"array {size_mb:g} MB": {"x": big},
        f"model {layers} layers": model,
        "small message": message,
    }


def floor_copy(arrays: list[np.ndarray]) -> Callable[[], Any]:
    """np.copy of all the payload's array bytes, laid out as one buffer (as a message is)."""
    flat = np.concatenate([np.ascontiguousarray(a).reshape(-1).view(np.uint8) for a in arrays])
    return flat.copy


def measure(name: str, payload: dict[str, Any], repeat: int) -> dict[str, Any]:
    arrays = [v for v in payload.values() if isinstance(v, np.ndarray)]
    nbytes = sum(a.nbytes for a in arrays)
    encoded = bytes(encode(payload))
    inner = 1 if nbytes > 1 << 20 else max(1, (1 << 22) // max(nbytes, 1))
    inner = min(inner, 2000)
    row: dict[str, Any] = {
        "payload": name,
        "arrays": len(arrays),
        "array_bytes": nbytes,
        "message_bytes": len(encoded),
    }
    fns: dict[str, Callable[[], Any]] = {
        "memcpy": floor_copy(arrays),
        "encode": lambda: encode(payload),
        "decode": lambda: decode(encoded),
        # Decode plus a copy out of the message: what a consumer needing writable arrays pays.
        "decode_copy": lambda: [
            np.array(v) for v in decode(encoded).values() if isinstance(v, np.ndarray)
        ],
    }
    if st_save is not None and st_load is not None and len(arrays) == len(payload):
        blob = st_save(payload)
        fns["safetensors_save"] = lambda: st_save(payload)
        fns["safetensors_load"] = lambda: st_load(blob)
    for op, (seconds, cpu_seconds) in interleaved_medians(fns, repeat, inner).items():
        row[f"{op}_s"] = seconds
        row[f"{op}_cpu_s"] = cpu_seconds
        row[f"{op}_gbps"] = nbytes / seconds / 1e9
    for op in ("encode", "decode", "decode_copy", "safetensors_save", "safetensors_load"):
        if f"{op}_s" in row:
            row[f"{op}_over_memcpy"] = row[f"{op}_s"] / row["memcpy_s"]
            # process_time has a coarse tick on some systems; guard the ratio.
            floor_cpu = row["memcpy_cpu_s"]
            row[f"{op}_cpu_over_memcpy"] = row[f"{op}_cpu_s"] / floor_cpu if floor_cpu else None
    return row


def fmt_time(seconds: float) -> str:
    if seconds >= 0.1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-4:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def print_table(rows: list[dict[str, Any]]) -> None:
    ops = [
        ("memcpy (floor)", "memcpy"),
        ("shoal encode", "encode"),
        ("shoal decode (zero-copy)", "decode"),
        ("shoal decode + copy out", "decode_copy"),
        ("safetensors save", "safetensors_save"),
        ("safetensors load", "safetensors_load"),
    ]
    header = (
        f"{'payload':<20} {'operation':<26} {'wall':>10} {'GB/s':>8} {'x memcpy':>9} "
        f"{'cpu':>10} {'x memcpy':>9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        label = row["payload"]
        for title, op in ops:
            if f"{op}_s" not in row:
                continue
            ratio = row.get(f"{op}_over_memcpy", 1.0)
            cpu_ratio = row.get(f"{op}_cpu_over_memcpy", 1.0)
            print(
                f"{label:<20} {title:<26} {fmt_time(row[op + '_s']):>10} "
                f"{row[op + '_gbps']:>8.2f} {ratio:>9.2f} {fmt_time(row[op + '_cpu_s']):>10} "
                + (f"{cpu_ratio:>9.2f}" if cpu_ratio is not None else f"{'-':>9}")
            )
            label = ""
        print()
    if st_save is None:
        print("note: safetensors is not importable, so only shoal and the floor were measured")
    print("x memcpy: time relative to np.copy of the same array bytes (lower is faster);")
    print("wall and CPU are medians per call; on a loaded machine trust the CPU columns")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=100.0, help="size of the large array")
    parser.add_argument("--layers", type=int, default=50, help="layers of the many-array model")
    parser.add_argument("--width", type=int, default=256, help="width of each model layer")
    parser.add_argument("--repeat", type=int, default=7, help="runs per figure (median)")
    parser.add_argument("--json", type=Path, help="write the results as JSON to this path")
    args = parser.parse_args(argv)
    rows = [
        measure(name, payload, args.repeat)
        for name, payload in payloads(args.size_mb, args.layers, args.width).items()
    ]
    print_table(rows)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "python": sys.version.split()[0],
            "numpy": np.__version__,
            "machine": platform.machine(),
            "repeat": args.repeat,
            "safetensors": st_save is not None,
        }
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
