"""One epoch of hetero logistic regression (2048-bit Paillier) per party, either mode.

Synthetic rows x (guest + host) features; times one training epoch after alignment and key
setup, and reports wall time and CPU seconds per party (each party's tasks timed with
``time.thread_time`` at its node), for several row counts to show how cost grows with rows,
next to the plaintext floor (the same batches in numpy, no encryption); then, apart from the
epoch, one evaluation on the training rows (what train() runs after each epoch). Prints a
table, writes JSON.

    python benchmarks/vertical.py --rows 512 1024 --guest 30 --host 300 --json vertical.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any


def run(
    rows: int, guest_cols: int, host_cols: int, key_bits: int, batch: int, mode: str
) -> dict[str, Any]:
    import numpy as np

    from shoal.core import Federation
    from shoal.runtime import LocalEngine, NodeApp
    from shoal.runtime.roles import NodeApps
    from shoal.vertical import MODELS, HeteroConfig, PartyData, train_centralized, vertical_tasks
    from shoal.vertical.model import batches
    from shoal.vertical.protocol import _batch, _setup, align, evaluate

    rng = np.random.default_rng(0)
    x = rng.normal(size=(rows, guest_cols + host_cols))
    y = (x @ rng.normal(size=x.shape[1]) > 0).astype(float)
    ids = [f"r{i}" for i in range(rows)]
    guest = PartyData.from_columns(ids, x[:, :guest_cols], y=y)
    host = PartyData.from_columns(ids, x[:, guest_cols:])
    cpu: dict[str, float] = defaultdict(float)

    class Timed(NodeApps):
        def handle(self, ctx: Any, name: str, payload: Any, **kw: Any) -> Any:
            start = time.thread_time()
            try:
                return super().handle(ctx, name, payload, **kw)
            finally:
                cpu[ctx.node_id] += time.thread_time() - start

    roles = {"guest": "guest", "host": "host"}
    if mode == "arbiter":
        roles["arbiter"] = "arbiter"
    apps = {}
    for node, role in roles.items():
        app = NodeApp(max_kept=8)
        app.install(vertical_tasks(role, mode=mode))
        apps[node] = app
    engine = LocalEngine(Timed(apps), nodes=list(roles), data=[guest, host, None][: len(roles)])
    fed = Federation(engine, roles={r: [n] for n, r in roles.items()})
    cfg = HeteroConfig(
        mode=mode, epochs=1, batch_size=batch, key_bits=key_bits, test_fraction=0.0,
        insecure_test_keys=key_bits < 2048,
    )  # fmt: skip
    size = align(fed, min_overlap=1)
    n_train = _setup(fed, cfg, size, run="bench")
    cpu.clear()
    start = time.perf_counter()
    for idx in batches(n_train, cfg.batch_size, epoch=0, seed=cfg.seed):
        _batch(fed, cfg, idx)
    wall = time.perf_counter() - start
    epoch_cpu, epoch_bytes = dict(cpu), fed.routed_bytes
    # The guest's metrics on the training rows, as train() computes them after every epoch:
    # each host encrypts its scores for the guest, which decrypts them.
    cpu.clear()
    start = time.perf_counter()
    evaluate(fed, model=cfg.model, split="train")
    eval_wall, eval_cpu = time.perf_counter() - start, dict(cpu)
    xs = np.hstack([(guest.x - guest.x.mean(0)) / guest.x.std(0), np.ones((rows, 1)),
                    (host.x - host.x.mean(0)) / host.x.std(0)])  # fmt: skip
    t = time.perf_counter()
    train_centralized(MODELS[cfg.model], xs, y, epochs=1, batch_size=batch, lr=cfg.lr)
    floor = time.perf_counter() - t
    return {
        "rows": rows,
        "wall_s": wall,
        "cpu_s": epoch_cpu,
        "evaluate_wall_s": eval_wall,
        "evaluate_cpu_s": eval_cpu,
        "relayed_bytes": epoch_bytes,
        "evaluate_relayed_bytes": fed.routed_bytes - epoch_bytes,
        "plaintext_floor_s": floor,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--guest", type=int, default=30)
    ap.add_argument("--host", type=int, default=300)
    ap.add_argument("--key-bits", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--mode", choices=["arbiter", "two_party"], default="arbiter")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    print(
        f"hetero LR, {args.mode} mode, {args.key_bits}-bit Paillier, {args.guest} guest + "
        f"{args.host} host features, batch {args.batch}: one epoch"
    )
    print(f"{'rows':>8s} {'wall s':>8s} {'guest cpu':>10s} {'host cpu':>10s} {'arb cpu':>8s} "
          f"{'host cpu/row ms':>16s} {'MB relayed':>10s} {'plain s':>8s}", flush=True)  # fmt: skip
    results = []
    for rows in args.rows:
        r = run(rows, args.guest, args.host, args.key_bits, args.batch, args.mode)
        results.append(r)
        c = r["cpu_s"]
        print(
            f"{r['rows']:8d} {r['wall_s']:8.1f} {c.get('guest', 0):10.1f} {c.get('host', 0):10.1f} "
            f"{c.get('arbiter', 0):8.1f} {1000 * c.get('host', 0) / r['rows']:16.1f} "
            f"{r['relayed_bytes'] / 1e6:10.1f} {r['plaintext_floor_s']:8.4f}",
            flush=True,
        )
        e = r["evaluate_cpu_s"]
        print(
            f"{'':8s} evaluation on the training rows after the epoch: "
            f"{r['evaluate_wall_s']:.1f} s wall, guest {e.get('guest', 0):.1f} / "
            f"host {e.get('host', 0):.1f} CPU-s, "
            f"{r['evaluate_relayed_bytes'] / 1e6:.1f} MB relayed",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": None}, "results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
