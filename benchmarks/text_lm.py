"""Shakespeare by speaking role: a character LSTM, federated against centralized, and
compression for slow links.

Data: tinyshakespeare split LEAF-style (shoal.data.load_play: one node per role with at least
2 lines, 268 roles; each role's first 80% of characters train, the rest test). Every round
samples ``--nodes-per-round`` roles; each trains ``--steps`` minibatches of 32 (one pass over
its data if that is less). Evaluation after every round on ``--eval`` test windows drawn once
at random from all roles' test windows (a fixed subsample: the full 205,355 would cost more
than the training on this machine).

Part 1 (training): FedAvg and FedAdam against centralized training of the same model on the
pooled training windows of the same split, given the same number of minibatches per round as
the whole federation computes (``nodes_per_round * steps``), with accuracy, perplexity and
wall time per round. Part 2 (compression): FedAvg with the nodes' updates compressed by
``shoal.aggregate`` stages (8-bit, 4-bit, top-1% with error feedback, 8-bit under SecureSum;
``--variants`` adds others, such as a random subset under SecureSum),
uplink bytes per round as counted on the wire (``Federation.traffic``) against accuracy after
the same rounds. Part 3 (clock): virtual time to a target accuracy (95% of uncompressed
FedAvg's final accuracy) with every node on a ``--uplink-mbps`` uplink (download free), on
LocalEngine's virtual clock (``shoal.runtime.Devices``): each dispatch lasts as long as its
slowest node's upload plus its measured compute (server-side evaluation is not counted).

Like for like: federated and centralized runs share the model, seed, initialization, test
windows and the number of minibatches of 32 (centralized takes ``nodes_per_round * steps``
per round); only the order of the steps differs. Hyperparameters are tuned with ``--sweep``
on a validation split (each role's last ``--val-fraction`` of training windows, in time),
never on the test split. ``--rounds 150`` is the budget at which FedAvg came within 10% of
centralized perplexity (median ratio over its last 20 rounds 1.09); ``--training-runs``
runs one of them per process, ``--progress`` follows them (docs/text.md's table);
``fedavgm`` (server momentum ``--momentum``, server lr ``--fedavg-server-lr``) is one of them.
``--checkpoint DIR`` keeps every run's state there after each round (the federated runs in a
shoal Store, centralized in one .npz), so a long run that is stopped resumes from its last
round when the same command is given again (one process per run; a run whose settings differ
from the command's is refused, not mixed).

    python benchmarks/text_lm.py --json results/text_lm.json
    python benchmarks/text_lm.py --parts training --rounds 150 --lr 6 --progress
    python benchmarks/text_lm.py --sweep --rounds 30 --json results/text_lm_sweep.json
    python benchmarks/text_lm.py --hidden 256 --parts training --training-runs fedavg \
        --rounds 150 --checkpoint leaf/ --json leaf_fedavg.json   # again to resume
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from shoal.aggregate import Clip, Mean, Quantize, RandomRotation, RandomSubset, TopK
from shoal.crypto import SecureSum
from shoal.data import Dataset, load_play
from shoal.errors import DataError, StoreError
from shoal.learn import FedAdam, FedAvg, FedAvgM, FitConfig, simulate
from shoal.learn.algorithms import scheduled_lr
from shoal.learn.registry import build_model
from shoal.runtime import Devices, Store

CORPUS = "tinyshakespeare.txt"


def find_corpus(given: str | None) -> Path | None:
    if given:
        return Path(given)
    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "data" / CORPUS
        if candidate.is_file():
            return candidate
    return None


ROW = (
    "accuracy",
    "perplexity",
    "wall_s",
    "uplink_bytes",
    "uplink_bytes_max_node",
    "downlink_bytes",
    "virtual_s",
)


def row_of(metrics: Mapping[str, Any], round_num: int) -> dict[str, Any]:
    """One round's metrics (a report's, or as the store recorded them) as a row of the JSON."""
    return {"round": round_num, **{k: metrics.get(k) for k in ROW}}


def row(r: Any) -> dict[str, Any]:
    return row_of(r.metrics(), r.round)


def history(result: Any) -> list[dict[str, Any]]:
    return [row(r) for r in result.history]


class CheckpointError(Exception):
    """A --checkpoint that this command cannot resume (other settings, or a damaged file)."""


# What a run's checkpoint must agree on with the command resuming it: every setting but
# those that only say how results are shown or saved, or which runs this process makes.
NOT_TRAINING = (
    "progress",
    "table_every",
    "json",
    "checkpoint",
    "training_runs",
    "parts",
    "variants",
    "merge",
    "threads",
    "corpus",
)


def check_settings(where: str, saved: Mapping[str, Any], settings: Mapping[str, Any]) -> None:
    differ = sorted(k for k in saved.keys() | settings.keys() if saved.get(k) != settings.get(k))
    if differ:
        said = ", ".join(f"{k} {saved.get(k)!r} (now {settings.get(k)!r})" for k in differ)
        raise CheckpointError(
            f"{where} was trained with {said}: give the same settings to resume it, or "
            "another --checkpoint folder to start afresh"
        )


def federated_checkpoint(
    folder: Path, name: str, settings: Mapping[str, Any]
) -> tuple[Store, Any, list[dict[str, Any]]]:
    """The store keeping run ``name``'s rounds, its newest record of that run (None: start
    one) and the rows recorded so far."""
    try:
        store = Store(folder / "federated.db")
    except StoreError as exc:  # says what is wrong with the file and what to do
        raise CheckpointError(str(exc)) from exc
    try:
        found = [r for r in store.list_runs(limit=10_000) if r.name == name]
        if not found:
            return store, None, []
        record = found[0]
        check_settings(f"{folder}'s run {name!r} ({record.id})", record.config, settings)
        rows = [row_of(r.metrics, r.round) for r in store.round_metrics(record.id)]
    except StoreError as exc:
        store.close()
        raise CheckpointError(str(exc)) from exc
    except BaseException:
        store.close()
        raise
    return store, record, rows


def save_central(path: Path, net: Any, rng: Any, rows: list[Any], settings: Any) -> None:
    """Weights, the sampling generator's state and the rows so far, in one file replaced
    whole (a run stopped mid-write keeps the previous round's)."""
    state = json.dumps({"settings": settings, "rng": rng.bit_generator.state, "rows": rows})
    arrays = {f"weight/{k}": v for k, v in net.get_weights().items()}
    arrays["state"] = np.frombuffer(state.encode(), dtype=np.uint8)
    partial = path.with_name(path.name + ".partial.npz")
    np.savez(partial, **arrays)
    os.replace(partial, path)


def load_central(path: Path, net: Any, rng: Any, settings: Any) -> list[dict[str, Any]]:
    """Restore ``net`` and ``rng`` from ``path``; the rows recorded so far."""
    try:
        # Opened here: np.load leaves its own handle open when the zip is damaged.
        with path.open("rb") as handle, np.load(handle, allow_pickle=False) as saved:
            state = json.loads(bytes(saved["state"]))
            weights = {k.removeprefix("weight/"): saved[k] for k in saved.files if k != "state"}
        check_settings(str(path), state["settings"], settings)
        rng.bit_generator.state = state["rng"]
        net.set_weights(weights)
        rows: list[dict[str, Any]] = state["rows"]
        if not isinstance(rows, list) or [
            r.get("round") if isinstance(r, dict) else None for r in rows
        ] != list(range(1, len(rows) + 1)):
            raise ValueError("its rows are not rounds 1, 2, ... in order")
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise CheckpointError(
            f"{path} is not a checkpoint of this run ({type(exc).__name__}: {exc}); delete it "
            "to start the centralized run afresh"
        ) from exc
    return rows


def centralized(
    model: Any,
    train: Dataset,
    test: Dataset,
    *,
    rounds: int,
    steps: int,
    lr: float,
    seed: int,
    schedule: str = "constant",
    lr_final: float = 0.1,
    on_round: Any = None,
    checkpoint: Path | None = None,
    settings: Mapping[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], int]:
    """Plain SGD on the pooled windows, ``steps`` minibatches per 'round', evaluated alike,
    with the federated runs' lr schedule (the same decay per round); its rows, and how many
    of them it resumed. With ``checkpoint`` (a file) it resumes from the round saved there
    and saves after every round."""
    net = model.clone()
    net.set_weights(model.get_weights())
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    if checkpoint is not None and checkpoint.exists():
        out = load_central(checkpoint, net, rng, settings)
    resumed = len(out)
    for r in range(len(out) + 1, rounds + 1):
        step_lr = scheduled_lr(lr, schedule=schedule, final=lr_final, round_num=r, rounds=rounds)
        config = FitConfig(epochs=1, batch_size=32, lr=step_lr, max_steps=steps)
        t0 = time.perf_counter()
        # A fresh random slice of the pool each round: the same minibatches a full shuffle
        # gives, without copying 821k windows into a tensor every round.
        rows = rng.choice(len(train), size=steps * 32, replace=False)
        net.fit(train.subset(rows), config=config, rng=rng)
        wall = time.perf_counter() - t0
        metrics = net.evaluate(test)
        out.append(
            {
                "round": r,
                "accuracy": metrics["accuracy"],
                "perplexity": metrics["perplexity"],
                "wall_s": wall,
            }
        )
        if checkpoint is not None:
            save_central(checkpoint, net, rng, out, settings)
        if on_round is not None:
            on_round(out[-1])
    return out, resumed


def validation_split(corpus: Any, fraction: float) -> tuple[list[Dataset], Dataset]:
    """Each role's last ``fraction`` of training windows (in time, like the test split)
    held out for tuning: (the roles' remaining training windows, the pooled held-out ones).

    Tuning never sees the test split; the held-out windows' contexts may reach back into
    the role's kept training text, as the test windows' do.
    """
    kept: list[Dataset] = []
    held: list[Dataset] = []
    for data in corpus.train.values():
        n = len(data)
        cut = max(1, n - max(1, round(n * fraction)))
        kept.append(data.subset(np.arange(cut)))
        if cut < n:
            held.append(data.subset(np.arange(cut, n)))
    pooled = Dataset(
        x=np.concatenate([d.x for d in held]),
        y=np.concatenate([d.y for d in held]),
        classes=held[0].classes,
        name="play/validation",
    )
    return kept, pooled


def write_json(path: str, data: Any) -> None:
    """Whole or not at all: a run stopped while writing leaves the previous file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f".{target.name}.tmp")
    staging.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    staging.replace(target)


def time_to(rows: list[dict[str, Any]], target: float) -> float | None:
    """Virtual seconds (the engine's clock) at the first round whose accuracy >= target."""
    for row in rows:
        if row["accuracy"] >= target:
            return float(row["virtual_s"])
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", help=f"path of {CORPUS} (default: ../shared/data)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--nodes-per-round", type=int, default=10)
    parser.add_argument("--steps", type=int, default=15, help="local minibatches per round")
    parser.add_argument("--seq-len", type=int, default=80)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3.0, help="FedAvg's client lr")
    parser.add_argument("--fedadam-lr", type=float, help="FedAdam's client lr (default: --lr)")
    parser.add_argument("--server-lr", type=float, default=0.02, help="FedAdam's")
    parser.add_argument(
        "--fedavg-server-lr", type=float, default=1.0, help="FedAvg's and FedAvgM's server lr"
    )
    parser.add_argument("--momentum", type=float, default=0.9, help="FedAvgM's server momentum")
    parser.add_argument("--fedavgm-lr", type=float, help="FedAvgM's client lr (default: --lr)")
    parser.add_argument("--central-lr", type=float, help="centralized SGD's lr (default: --lr)")
    parser.add_argument(
        "--schedule",
        choices=["constant", "cosine"],
        default="constant",
        help="client lr schedule of every run, centralized included (lr_schedule)",
    )
    parser.add_argument(
        "--lr-final", type=float, default=0.1, help="cosine: the last round's lr / lr"
    )
    parser.add_argument(
        "--split",
        choices=["test", "validation"],
        default="test",
        help="evaluate on the test split, or on each role's last --val-fraction of training "
        "windows held out (training on the rest): the split to tune on",
    )
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="tune on the validation split: FedAvg at each --lrs, FedAdam at each "
        "--server-lrs (client lr --fedadam-lr), FedAvgM at each --fedavgm-grid pair, "
        "centralized at each --central-lrs, interleaved; prints the validation perplexity "
        "of each",
    )
    parser.add_argument("--lrs", type=float, nargs="*", default=[1.5, 3.0, 6.0])
    parser.add_argument("--server-lrs", type=float, nargs="*", default=[0.01, 0.03, 0.1])
    parser.add_argument("--central-lrs", type=float, nargs="*", default=[1.5, 3.0, 6.0])
    parser.add_argument(
        "--fedavgm-grid",
        nargs="*",
        default=[],
        metavar="MOMENTUM:SERVER_LR",
        help="sweep: FedAvgM at each momentum:server-lr pair (client lr --fedavgm-lr); "
        "its steady step is server_lr / (1 - momentum) times the mean delta",
    )
    parser.add_argument(
        "--training-runs",
        nargs="+",
        choices=["fedavg", "fedavgm", "fedadam", "centralized"],
        default=["fedavg", "fedadam", "centralized"],
        help="which runs part 1 makes (long budgets: run them as separate processes)",
    )
    parser.add_argument(
        "--progress", action="store_true", help="print every --table-every rounds as it goes"
    )
    parser.add_argument(
        "--table-every", type=int, default=10, help="rounds between rows of the per-round table"
    )
    parser.add_argument("--eval", type=int, default=2000, help="test windows evaluated")
    parser.add_argument("--clip", type=float, default=10.0, help="L2 clip under SecureSum")
    parser.add_argument("--uplink-mbps", type=float, default=1.0)
    parser.add_argument("--parts", nargs="+", default=["training", "compression"])
    parser.add_argument("--variants", nargs="+", help="compression runs (default: the main 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument(
        "--flush-denormal",
        action="store_true",
        help="flush denormal floats to zero (torch.set_flush_denormal): an LSTM whose gates "
        "saturate (large weights, e.g. an aggressive server step) computes with denormals "
        "and took 2.6x the CPU per step without this; off by default so runs repeat the "
        "documented ones bit for bit",
    )
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument(
        "--checkpoint",
        metavar="DIR",
        help="keep every run's state in DIR after each round and resume the runs found there "
        "from their last round (the same settings; one process per run)",
    )
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="JSON",
        help="train nothing: read part 1's runs from these --json files (one process per "
        "training, same split, seed and sizes) and print the per-round table and summary",
    )
    args = parser.parse_args()
    if args.merge:
        return merge(args)
    try:
        return train(args)
    except CheckpointError as exc:
        print(f"--checkpoint: {exc}", file=sys.stderr)
        return 2
    except DataError as exc:  # e.g. a --corpus with no speeches
        print(f"{args.corpus or CORPUS}: {exc}", file=sys.stderr)
        return 2


def train(args: Any) -> int:
    """Part 1, 2 or 3 as ``args`` asks (or the sweep)."""

    import torch

    torch.set_num_threads(args.threads)
    if args.flush_denormal and not torch.set_flush_denormal(True):
        print("--flush-denormal: this CPU cannot flush denormals", file=sys.stderr)
        return 2
    path = find_corpus(args.corpus)
    if path is None or not path.is_file():
        print(f"{CORPUS} not found; pass --corpus PATH", file=sys.stderr)
        return 2
    if args.sweep:
        args.split = "validation"
        args.parts = ["training"]
    args.fedadam_lr = args.fedadam_lr or args.lr
    args.central_lr = args.central_lr or args.lr
    args.fedavgm_lr = args.fedavgm_lr or args.lr
    fedavgm_grid = [pair.split(":") for pair in args.fedavgm_grid]
    try:
        pairs = [(float(m), float(s)) for m, s in fedavgm_grid]
    except ValueError:  # a pair of anything but two numbers
        print(
            f"--fedavgm-grid takes MOMENTUM:SERVER_LR pairs such as 0.9:0.1, got "
            f"{args.fedavgm_grid}",
            file=sys.stderr,
        )
        return 2
    corpus = load_play(path, seq_len=args.seq_len)
    if args.split == "validation":
        nodes, full_test = validation_split(corpus, args.val_fraction)
        train = Dataset(
            x=np.concatenate([d.x for d in nodes]),
            y=np.concatenate([d.y for d in nodes]),
            classes=nodes[0].classes,
            name="play/train-minus-validation",
        )
    else:
        train, full_test = corpus.pooled()
        nodes = list(corpus.train.values())
    pick = np.sort(np.random.default_rng(args.seed).choice(len(full_test), args.eval, False))
    test = full_test.subset(pick)
    model = build_model(
        "char_lstm",
        features=args.seq_len,
        classes=len(corpus.vocab),
        hidden=args.hidden,
        layers=args.layers,
        seed=args.seed,
    )
    params = sum(v.size for v in model.get_weights().values())
    print(
        f"{len(nodes)} roles, {len(train)} training windows, {args.eval} of {len(full_test)} "
        f"{args.split} windows; char LSTM embedding 8, {args.layers}x{args.hidden} ({params} "
        f"parameters), {args.rounds} rounds of {args.nodes_per_round} roles x {args.steps} "
        f"steps of 32, lr schedule {args.schedule}"
        + (f" (last round {args.lr_final:g} x lr)" if args.schedule != "constant" else "")
    )
    folder = Path(args.checkpoint) if args.checkpoint else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    settings = {
        **{k: v for k, v in vars(args).items() if k not in NOT_TRAINING},
        "roles": len(nodes),
        "training_windows": len(train),
    }
    common = {
        "rounds": args.rounds,
        "nodes_per_round": args.nodes_per_round,
        "max_steps": args.steps,
        "batch_size": 32,
        "lr_schedule": args.schedule,
        "lr_final": args.lr_final,
    }

    devices = Devices(up_mbps=args.uplink_mbps)

    partial: dict[str, list[dict[str, Any]]] = {}

    def progress(name: str, done: dict[str, Any]) -> None:
        r = done["round"]
        if args.json:
            # The rounds so far, so a long run stopped early keeps them (--merge reads them);
            # replaced by the full results at the end. Written before the round's line is
            # printed, so a printed round is in the file.
            partial.setdefault(name, []).append(done)
            write_json(args.json, {**results, "runs": partial, "partial": True})
        if args.progress and (r % args.table_every == 0 or r == args.rounds):
            print(
                f"    {name} round {r}: acc {done['accuracy']:.4f} ppl {done['perplexity']:.3f}",
                flush=True,
            )

    def run(name: str, **options: Any) -> list[dict[str, Any]]:
        algorithm = options.pop("algorithm", FedAvg)
        options.setdefault("lr", args.lr)
        t0 = time.perf_counter()
        store: Store | None = None
        record: Any = None  # the store's RunRecord of this run, if it has one
        done: list[dict[str, Any]] = []
        if folder is not None:
            store, record, done = federated_checkpoint(folder, name, settings)
            partial[name] = list(done)
        try:
            if record is not None and record.status == "finished":
                rows = done
            else:
                # One checkpoint is enough to resume; 150 of LEAF's width would be 490 MB.
                run_id: list[str | None] = [None]

                def on_round(r: Any) -> None:
                    if store is not None and run_id[0] is not None:
                        store.prune_checkpoints(run_id[0], keep=1)
                    progress(name, row(r))

                result = simulate(
                    model=model,
                    nodes=nodes,
                    algorithm=algorithm(**common, **options),
                    test=test,
                    seed=args.seed,
                    devices=devices,
                    store=store,
                    run_name=name,
                    config=settings,
                    resume=record.id if record is not None else None,
                    on_start=lambda given: run_id.__setitem__(0, given),
                    on_round=on_round,
                )
                rows = history(result)
        finally:
            if store is not None:
                store.close()
        last = rows[-1]
        ran = len(rows) - len(done)
        print(
            f"  {name:<28} acc {last['accuracy']:.4f}  ppl {last['perplexity']:.3f}  "
            f"uplink {last['uplink_bytes'] / 1e3:9.1f} kB/round  "
            + (
                f"{(time.perf_counter() - t0) / ran:.2f} s/round"
                + (f" ({len(done)} rounds resumed)" if done else "")
                if ran
                else f"(all {len(rows)} rounds from {folder})"
            ),
            flush=True,
        )
        return rows

    results: dict[str, Any] = {
        "config": {**vars(args), "corpus": str(path), "roles": len(nodes), "parameters": params},
        "runs": {},
    }
    runs = results["runs"]

    def central(name: str, lr: float) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        saved = folder / f"{name.replace(' ', '_')}.npz" if folder is not None else None
        own = {**settings, "central_run_lr": lr}
        if saved is not None and saved.exists():  # its rows so far, for the partial --json
            partial[name] = load_central(saved, model.clone(), np.random.default_rng(), own)
        rows, resumed = centralized(
            model,
            train,
            test,
            rounds=args.rounds,
            steps=args.nodes_per_round * args.steps,
            lr=lr,
            seed=args.seed,
            schedule=args.schedule,
            lr_final=args.lr_final,
            on_round=lambda done: progress(name, done),
            checkpoint=saved,
            settings=own,
        )
        last = rows[-1]
        ran = len(rows) - resumed
        print(
            f"  {name:<28} acc {last['accuracy']:.4f}  ppl {last['perplexity']:.3f}  "
            + (
                f"{(time.perf_counter() - t0) / ran:.2f} s/round"
                + (f" ({resumed} rounds resumed)" if resumed else "")
                if ran
                else f"(all {len(rows)} rounds from {folder})"
            ),
            flush=True,
        )
        return rows

    if args.sweep:
        print(f"sweep on the validation split ({args.rounds} rounds each, interleaved):")
        grids = [
            [(f"fedavg lr {lr:g}", {"lr": lr}) for lr in args.lrs],
            [
                (
                    f"fedadam lr {args.fedadam_lr:g} server {s:g}",
                    {"algorithm": FedAdam, "lr": args.fedadam_lr, "server_lr": s},
                )
                for s in args.server_lrs
            ],
            [
                (
                    f"fedavgm lr {args.fedavgm_lr:g} momentum {m:g} server {s:g}",
                    {
                        "algorithm": FedAvgM,
                        "lr": args.fedavgm_lr,
                        "momentum": m,
                        "server_lr": s,
                    },
                )
                for m, s in pairs
            ],
            [(f"centralized lr {lr:g}", {"central": lr}) for lr in args.central_lrs],
        ]
        for i in range(max(len(g) for g in grids)):
            for grid in grids:
                if i < len(grid):
                    name, options = grid[i]
                    if "central" in options:
                        runs[name] = central(name, options["central"])
                    else:
                        runs[name] = run(name, **options)
        results["summary"] = sweep_summary(runs, args)
        if args.json:
            write_json(args.json, results)
        return 0
    chosen = set(args.training_runs) if "training" in args.parts else set()
    if "fedavg" in chosen or "compression" in args.parts:
        print("federated and centralized:")
        runs["fedavg"] = run("fedavg", server_lr=args.fedavg_server_lr)
    if "fedavgm" in chosen:
        runs["fedavgm"] = run(
            "fedavgm",
            algorithm=FedAvgM,
            lr=args.fedavgm_lr,
            server_lr=args.fedavg_server_lr,
            momentum=args.momentum,
        )
    if "fedadam" in chosen:
        runs["fedadam"] = run(
            "fedadam", algorithm=FedAdam, lr=args.fedadam_lr, server_lr=args.server_lr
        )
    if "centralized" in chosen:
        runs["centralized"] = central("centralized", args.central_lr)
    if "centralized" in runs and len(runs) > 1:
        per_round_table(runs, args.table_every, args.nodes_per_round * args.steps)
    if "compression" in args.parts:
        print("compression (FedAvg):")
        sizes = math.sqrt(params)
        chains = {
            "8-bit": Quantize(8) | Mean(),
            "4-bit": Quantize(4) | Mean(),
            "2-bit": Quantize(2) | Mean(),
            "rotation + 2-bit": RandomRotation() | Quantize(2) | Mean(),
            "top-10% + EF + 4-bit": TopK(0.1) | Quantize(4) | Mean(),
            "top-1% + error feedback": TopK(0.01) | Mean(),
            "top-1% + EF + 8-bit, 8-bit downlink": TopK(0.01) | Quantize(8) | Mean(),
            "SecureSum 32-bit": Clip(args.clip) | SecureSum() | Mean(),
            # Rotated coordinates of a clipped update lie within a few C/sqrt(d).
            "SecureSum rotation + 8-bit": Clip(args.clip)
            | RandomRotation()
            | Quantize(8)
            | SecureSum(value_range=4.0 * args.clip / sizes)
            | Mean(),
        }
        # RandomSubset under SecureSum: the same public random positions at every node, so
        # only those are masked (error feedback at the node, or unbiased 1/fraction scaling).
        for fraction in (0.1, 0.25, 0.5):
            for feedback, label in ((True, "EF"), (False, "unbiased")):
                chains[f"SecureSum rotation + 8-bit + random {fraction:.0%} {label}"] = (
                    Clip(args.clip)
                    | RandomRotation()
                    | RandomSubset(fraction, error_feedback=feedback)
                    | Quantize(8)
                    | SecureSum(value_range=4.0 * args.clip / sizes)
                    | Mean()
                )
        extra = ("2-bit", "rotation + 2-bit", "top-10% + EF + 4-bit")
        chosen = args.variants or [n for n in chains if n not in extra and "random" not in n]
        unknown = sorted(set(chosen) - set(chains))
        if unknown:
            print(f"unknown variants {unknown}; choose from {list(chains)}", file=sys.stderr)
            return 2
        for name in chosen:
            chain = chains[name]
            downlink = {"downlink_bits": 8} if "downlink" in name else {}
            runs[name] = run(name, aggregator=chain, **downlink)

    summary = summarize(runs, args)
    results["summary"] = summary
    if args.json:
        write_json(args.json, results)
    return 0


def sweep_summary(runs: dict[str, list[dict[str, Any]]], args: Any) -> dict[str, Any]:
    """Validation perplexity of every swept setting: after the last round, the mean of the
    last 5 rounds (one round moves by about +-0.2) and the best."""
    print(f"\n{'setting':<44} {'val ppl (last)':>15} {'last 5':>8} {'best':>8} {'at round':>9}")
    summary: dict[str, Any] = {}
    for name, rows in runs.items():
        best = min(rows, key=lambda r: r["perplexity"])
        tail = float(np.mean([r["perplexity"] for r in rows[-5:]]))
        summary[name] = {
            "perplexity": rows[-1]["perplexity"],
            "mean_perplexity_last_5_rounds": tail,
            "accuracy": rows[-1]["accuracy"],
            "best_perplexity": best["perplexity"],
            "best_round": best["round"],
        }
        print(
            f"{name:<44} {rows[-1]['perplexity']:>15.3f} {tail:>8.3f} "
            f"{best['perplexity']:>8.3f} {best['round']:>9}"
        )
    return summary


def per_round_table(runs: dict[str, list[dict[str, Any]]], every: int, per_round: int) -> None:
    """Perplexity per round of every run, and each federated run / centralized."""
    federated = [name for name in runs if name != "centralized"]
    names = [*federated, "centralized"]
    print(
        f"\n{'round':>6} {'minibatches':>12} "
        + " ".join(f"{name:>11}" for name in names)
        + " "
        + " ".join(f"{name + '/c':>13}" for name in federated)
    )
    n = min(len(rows) for rows in runs.values())
    for i in range(n):
        if (i + 1) % every and i + 1 != n:
            continue
        c = runs["centralized"][i]["perplexity"]
        ppl = [runs[name][i]["perplexity"] for name in names]
        print(
            f"{i + 1:>6} {per_round * (i + 1):>12} "
            + " ".join(f"{v:>11.3f}" for v in ppl)
            + " "
            + " ".join(f"{runs[name][i]['perplexity'] / c:>13.3f}" for name in federated)
        )


# What must agree between runs merged into one comparison (like for like).
SAME = ("split", "seed", "nodes_per_round", "steps", "eval", "seq_len", "hidden", "layers")


def merge(args: Any) -> int:
    """Part 1's runs from separate processes' --json files, compared like for like."""
    runs: dict[str, list[dict[str, Any]]] = {}
    first: dict[str, Any] = {}
    for path in args.merge:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
            config, found = data["config"], data["runs"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            print(f"{path}: not a text_lm.py --json file ({exc})", file=sys.stderr)
            return 2
        first = first or config
        differ = [k for k in SAME if config.get(k) != first.get(k)]
        if differ:
            print(
                f"{path}: {', '.join(f'{k} {config.get(k)!r}' for k in differ)} differ from "
                f"{args.merge[0]}'s ({', '.join(repr(first.get(k)) for k in differ)}): "
                f"not like for like",
                file=sys.stderr,
            )
            return 2
        for name, rows in found.items():
            label = name
            if name == "fedavgm":  # several FedAvgM settings may be merged
                label = f"fedavgm {config['momentum']:g}:{config['fedavg_server_lr']:g}"
            runs[label] = rows
    if "centralized" not in runs or len(runs) < 2:
        print("--merge needs a centralized run and at least one other", file=sys.stderr)
        return 2
    rounds = min(len(rows) for rows in runs.values())
    runs = {name: rows[:rounds] for name, rows in runs.items()}
    per_round = first["nodes_per_round"] * first["steps"]
    per_round_table(runs, args.table_every, per_round)
    args.rounds, args.parts = rounds, ["training"]
    summary = summarize(runs, args)
    if args.json:
        out = {"merged": args.merge, "config": first, "rounds": rounds, "summary": summary}
        write_json(args.json, out)
    return 0


def summarize(runs: dict[str, list[dict[str, Any]]], args: Any) -> dict[str, Any]:
    base = runs.get("fedavg")
    summary: dict[str, Any] = {}
    trained = [n for n in runs if n.split()[0] in ("fedavg", "fedavgm", "fedadam", "centralized")]
    if "centralized" in runs and len(trained) > 1:
        central = runs["centralized"][-1]
        print(f"\nafter {args.rounds} rounds: {'run':<28} {'accuracy':>9} {'perplexity':>11}")
        for name in trained:
            last = runs[name][-1]
            gap = last["perplexity"] / central["perplexity"] - 1
            mean_wall = float(np.median([r["wall_s"] for r in runs[name]]))
            # One round's perplexity on 2,000 windows moves by about +-0.2, so the gap is
            # also judged as the median ratio, round by round, over the last rounds.
            tail = min(20, len(runs[name]))
            smoothed = float(
                np.median(
                    [
                        runs[name][-i]["perplexity"] / runs["centralized"][-i]["perplexity"]
                        for i in range(1, tail + 1)
                    ]
                )
            )
            summary[name] = {
                "accuracy": last["accuracy"],
                "perplexity": last["perplexity"],
                "perplexity_vs_centralized": gap,
                f"median_ratio_last_{tail}_rounds": smoothed,
                "median_wall_s_per_round": mean_wall,
            }
            print(
                f"{'':<21}{name:<28} {last['accuracy']:>9.4f} {last['perplexity']:>11.3f} "
                f"({gap:+.1%} vs centralized, median ratio over the last {tail} rounds "
                f"{smoothed:.3f}; median {mean_wall:.2f} s/round)"
            )
    if base is not None and "compression" in args.parts:
        target = 0.95 * base[-1]["accuracy"]
        print(
            f"\n{'compression':<28} {'uplink/round':>13} {'vs none':>8} {'accuracy':>9} "
            f"{'lost (pts)':>10} {'time to ' + format(target, '.3f'):>15}"
        )
        for name, rows in runs.items():
            if name in ("fedavgm", "fedadam", "centralized") or not rows[-1].get("uplink_bytes"):
                continue
            up = float(np.median([r["uplink_bytes"] for r in rows]))
            ratio = float(np.median([r["uplink_bytes"] for r in base])) / up
            lost = 100 * (base[-1]["accuracy"] - rows[-1]["accuracy"])
            clock = time_to(rows, target)
            summary.setdefault("compression", {})[name if name != "fedavg" else "none"] = {
                "uplink_bytes_per_round": up,
                "fewer_bytes_than_none": ratio,
                "accuracy": rows[-1]["accuracy"],
                "points_lost": lost,
                "virtual_s_to_target": clock,
            }
            print(
                f"{(name if name != 'fedavg' else 'none'):<28} {up / 1e3:>10.1f} kB "
                f"{ratio:>7.1f}x {rows[-1]['accuracy']:>9.4f} {lost:>10.2f} "
                f"{(f'{clock:.0f} s' if clock is not None else 'not reached'):>15}"
            )
        summary["target_accuracy"] = target
        summary["uplink_mbps"] = args.uplink_mbps
    return summary


if __name__ == "__main__":
    sys.exit(main())
