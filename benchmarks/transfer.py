"""Transfer learning on Shakespeare: pretrain on half the roles centrally, fine-tune on the rest.

The roles of tinyshakespeare with the most text are split in two, alternately by size.
A character LSTM (shoal.learn.text_models.char_lstm) is pretrained centrally on the first
half's training text, saved as safetensors and read back through the scanner; then the
second half's roles, one node each, train it federated (FedAvg, the same rounds and local
steps for every variant):

- scratch: a fresh model, all weights federated (no pretraining);
- pretrained, no training: the backbone as it is;
- full fine-tune: all weights federated, from the pretrained ones;
- head only: the LSTM frozen, the linear head federated;
- LoRA: the LSTM frozen, rank-``--rank`` adapters on the head federated;
- FedPer: the LSTM federated, each node's head its own (never sent).

Every variant is judged the same way: each node evaluates on its own held-out text (the
last fifth of its role, split in time) and the nodes' metrics are averaged weighted by
their example counts; perplexity is exp of that mean loss. "uplink floats" is what one
node sends per round. Also printed: wall seconds per variant on this machine.

    python benchmarks/transfer.py --json results/transfer.json
    python benchmarks/transfer.py --quick
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from shoal.data import Dataset, load_play  # noqa: E402
from shoal.learn import FedAvg, FitConfig, LocalData, simulate  # noqa: E402
from shoal.learn.text_models import char_lstm  # noqa: E402
from shoal.learn.torch import TorchModel  # noqa: E402
from shoal.learn.transfer import (  # noqa: E402
    LORA_PATTERNS,
    PartialModel,
    PretrainedFactory,
    add_lora,
    read_weights,
)


def _corpus() -> Path:
    if os.environ.get("SHOAL_DATA_DIR"):
        return Path(os.environ["SHOAL_DATA_DIR"]) / "tinyshakespeare.txt"
    for folder in Path(__file__).resolve().parents:
        candidate = folder / "shared" / "data" / "tinyshakespeare.txt"
        if candidate.exists():
            return candidate
    return Path("shared/data/tinyshakespeare.txt")


def pooled(parts: list[Dataset]) -> Dataset:
    return Dataset(
        x=np.concatenate([d.x for d in parts]),
        y=np.concatenate([d.y for d in parts]),
        classes=parts[0].classes,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--roles", type=int, default=40, help="roles used (most text first)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--pretrain-steps", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.roles, args.hidden, args.layers = 10, 32, 1
        args.pretrain_steps, args.rounds, args.per_round, args.local_steps = 30, 2, 5, 3
    torch.set_num_threads(1)
    corpus_path = _corpus()
    if not corpus_path.exists():
        print(f"no {corpus_path}: set SHOAL_DATA_DIR to the folder of tinyshakespeare.txt")
        return 1
    corpus = load_play(corpus_path, tokens="char", seq_len=80, max_roles=args.roles)
    roles = sorted(corpus.roles, key=lambda r: -len(corpus.train[r]))
    pre_roles, fed_roles = roles[0::2], roles[1::2]
    vocab = len(corpus.vocab)

    def fresh() -> TorchModel:
        model = char_lstm(features=80, classes=vocab, hidden=args.hidden, layers=args.layers)
        assert isinstance(model, TorchModel)
        return model

    started = time.perf_counter()
    base = fresh()
    base.fit(
        pooled([corpus.train[r] for r in pre_roles]),
        config=FitConfig(epochs=1, batch_size=64, lr=args.lr, max_steps=args.pretrain_steps),
        rng=np.random.default_rng(0),
    )
    pretrain_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        from safetensors.torch import save_file

        path = Path(folder) / "pretrained.safetensors"
        save_file({k: v.contiguous() for k, v in base.module.state_dict().items()}, str(path))
        weights = read_weights(path)  # scanned, as any pretrained file would be

    def pretrained(then: Any = None) -> TorchModel:
        factory = PretrainedFactory(fresh().module_factory, weights, then=then)
        return TorchModel(factory, token_inputs=True)

    variants: dict[str, Any] = {
        "scratch": fresh(),
        "pretrained, no training": None,
        "full fine-tune": pretrained(),
        "head only (LSTM frozen)": PartialModel(pretrained(), shared=("head.*",)),
        f"LoRA r={args.rank} on the head": PartialModel(
            pretrained(lambda m: add_lora(m, rank=args.rank, targets=("head",))),
            shared=LORA_PATTERNS,
        ),
        "FedPer (head personal)": PartialModel(pretrained(), personal=("head.*",)),
    }
    nodes = [LocalData(train=corpus.train[r], test=corpus.test[r]) for r in fed_roles]
    algorithm = FedAvg(
        rounds=args.rounds,
        nodes_per_round=min(args.per_round, len(nodes)),
        lr=args.lr,
        batch_size=64,
        max_steps=args.local_steps,
    )
    rows = []
    for name, model in variants.items():
        t0 = time.perf_counter()
        if model is None:  # evaluate the backbone at every node, no round
            tested = [pretrained().evaluate(corpus.test[r]) for r in fed_roles]
            counts = [len(corpus.test[r]) for r in fed_roles]
            accuracy = float(np.average([m["accuracy"] for m in tested], weights=counts))
            loss = float(np.average([m["loss"] for m in tested], weights=counts))
            uplink = 0
        else:
            result = simulate(
                model=model, nodes=nodes, algorithm=algorithm, federated_eval_every=args.rounds
            )
            accuracy = float(result.metrics["federated_accuracy"])
            loss = float(result.metrics["federated_loss"])
            uplink = int(sum(v.size for v in result.weights.values()))
        rows.append(
            {
                "variant": name,
                "accuracy": accuracy,
                "perplexity": math.exp(loss),
                "uplink_floats_per_round": uplink,
                "wall_s": time.perf_counter() - t0,
            }
        )
        print(f"{name}: accuracy {accuracy:.4f}", file=sys.stderr)
    print(
        f"\npretrained on {len(pre_roles)} roles ({args.pretrain_steps} steps, "
        f"{pretrain_s:.0f} s); "
        f"fine-tuned on {len(fed_roles)} other roles: {args.rounds} rounds of "
        f"{algorithm.nodes_per_round} nodes x {args.local_steps} steps; char-LSTM "
        f"{args.layers}x{args.hidden}"
    )
    print(f"{'variant':<30}{'accuracy':>10}{'perplexity':>12}{'uplink floats':>15}{'wall s':>8}")
    for row in rows:
        print(
            f"{row['variant']:<30}{row['accuracy']:>10.4f}{row['perplexity']:>12.2f}"
            f"{row['uplink_floats_per_round']:>15,}{row['wall_s']:>8.1f}"
        )
    if args.json:
        out = {
            "benchmark": "transfer",
            "settings": vars(args),
            "machine": {"python": platform.python_version(), "torch": torch.__version__},
            "pretrain_roles": pre_roles,
            "federated_roles": fed_roles,
            "pretrain_s": pretrain_s,
            "rows": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
