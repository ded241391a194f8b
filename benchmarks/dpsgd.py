"""DP-SGD step speed: shoal vs non-private PyTorch vs Opacus, on scikit-learn's digits (8x8).

Two models (an MLP and a small CNN), the same batch size, clip norm and noise for every
method. Steps per second are the median over interleaved repeats; threads are pinned (default
1) so the numbers do not depend on what else the machine runs. Opacus runs in its own venv, in a
subprocess that also times its own non-private baseline, so ratios are formed within one process.

Opacus venv (torch comes from the system site-packages; --no-deps keeps pip from pulling
another torch):

    python -m venv --system-site-packages /work/venvs/opacus
    /work/venvs/opacus/bin/pip install --no-deps opacus opt-einsum

Run:  python benchmarks/dpsgd.py [--json out.json] [--steps 200] [--repeats 5]
Without that venv the script still runs and reports shoal and non-private PyTorch only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

DEFAULT_OPACUS_PYTHON = "/work/venvs/opacus/bin/python"
CLIP, NOISE, LR = 1.0, 1.0, 0.1


def make_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 2 * 2, 10),
    )


def load_batches(batch_size: int, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(count):
        idx = torch.from_numpy(rng.choice(len(x), size=batch_size, replace=False))
        out.append((x[idx], y[idx]))
    return out


Step = Callable[[torch.Tensor, torch.Tensor], None]


def nonprivate_step(model: nn.Module) -> Step:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()

    return step


def shoal_step(model: nn.Module, batch_size: int, method: str) -> Step:
    from shoal.privacy.dpsgd import DPSGD

    opt = DPSGD(
        model,
        lr=LR,
        clip_norm=CLIP,
        noise_multiplier=NOISE,
        batch_size=batch_size,
        dataset_size=1797,
        method=method,  # type: ignore[arg-type]
    )

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.step(x, y)

    step.dpsgd = opt  # type: ignore[attr-defined]
    return step


def opacus_step(model: nn.Module, batch_size: int, mode: str, data: Any) -> Step:
    import warnings

    from opacus import PrivacyEngine

    warnings.filterwarnings("ignore")  # Opacus warns about secure RNG and empty loaders
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size)
    engine = PrivacyEngine()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    if mode == "ghost":
        module, opt, criterion, _ = engine.make_private(
            module=model,
            optimizer=optimizer,
            criterion=nn.CrossEntropyLoss(),
            data_loader=loader,
            noise_multiplier=NOISE,
            max_grad_norm=CLIP,
            poisson_sampling=False,
            grad_sample_mode="ghost",
        )
    else:
        module, opt, _ = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=NOISE,
            max_grad_norm=CLIP,
            poisson_sampling=False,
            grad_sample_mode=mode,
        )
        criterion = nn.CrossEntropyLoss()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        criterion(module(x), y).backward()
        opt.step()

    return step


def time_methods(
    model_name: str,
    makers: dict[str, Callable[[nn.Module], Step]],
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    repeats: int,
    warmup: int = 20,
) -> tuple[dict[str, float], dict[str, Step]]:
    """Median steps/second per method (methods interleaved within each repeat), and the steps."""
    steps = {name: make(make_model(model_name)) for name, make in makers.items()}
    for step in steps.values():
        for x, y in batches[:warmup]:
            step(x, y)
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for x, y in batches:
                step(x, y)
            rates[name].append(len(batches) / (time.perf_counter() - t0))
    return {name: statistics.median(r) for name, r in rates.items()}, steps


def run_opacus_worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    batches = load_batches(args.batch_size, args.steps)
    xs = torch.cat([b[0] for b in batches[:4]])
    ys = torch.cat([b[1] for b in batches[:4]])
    data = torch.utils.data.TensorDataset(xs, ys)
    out: dict[str, Any] = {}
    import opacus

    makers: dict[str, Callable[[nn.Module], Step]] = {
        "nonprivate": nonprivate_step,
        "opacus_hooks": partial(opacus_step, batch_size=args.batch_size, mode="hooks", data=data),
        "opacus_ghost": partial(opacus_step, batch_size=args.batch_size, mode="ghost", data=data),
    }
    for model_name in args.models:
        out[model_name] = time_methods(model_name, makers, batches, args.repeats)[0]
    print(json.dumps({"opacus_version": opacus.__version__, "results": out}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--models", nargs="+", default=["mlp", "cnn"], choices=["mlp", "cnn"])
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--opacus-python", default=DEFAULT_OPACUS_PYTHON)
    parser.add_argument("--opacus-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.opacus_worker:
        run_opacus_worker(args)
        return 0

    torch.set_num_threads(args.threads)
    batches = load_batches(args.batch_size, args.steps)
    results: dict[str, dict[str, float]] = {}
    methods_used: dict[str, str] = {}
    makers: dict[str, Callable[[nn.Module], Step]] = {
        "nonprivate": nonprivate_step,
        "shoal": partial(shoal_step, batch_size=args.batch_size, method="auto"),
        "shoal_vmap": partial(shoal_step, batch_size=args.batch_size, method="vmap"),
    }
    for model_name in args.models:
        results[model_name], steps = time_methods(model_name, makers, batches, args.repeats)
        methods_used[model_name] = steps["shoal"].dpsgd.method  # type: ignore[attr-defined]

    opacus_note = ""
    opacus: dict[str, Any] | None = None
    if not os.path.exists(args.opacus_python):
        opacus_note = f"Opacus not measured: {args.opacus_python} does not exist (see docstring)"
    else:
        cmd = [
            args.opacus_python, __file__, "--opacus-worker", "--steps", str(args.steps),
            "--repeats", str(args.repeats), "--batch-size", str(args.batch_size),
            "--threads", str(args.threads), "--models", *args.models,
        ]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            tail = proc.stderr.strip().splitlines()[-1:] or ["no output"]
            opacus_note = f"Opacus not measured: worker failed ({tail[0]})"
        else:
            opacus = json.loads(proc.stdout.strip().splitlines()[-1])

    report: dict[str, Any] = {
        "config": {
            "batch_size": args.batch_size,
            "steps_per_repeat": args.steps,
            "repeats": args.repeats,
            "threads": args.threads,
            "clip_norm": CLIP,
            "noise_multiplier": NOISE,
            "torch": torch.__version__,
            "opacus": opacus["opacus_version"] if opacus else None,
        },
        "models": {},
        "note": opacus_note,
    }
    rows = []
    for model_name in args.models:
        r = results[model_name]
        entry: dict[str, Any] = {
            "steps_per_s": {k: round(v, 1) for k, v in r.items()},
            "shoal_method": methods_used[model_name],
            # time ratios: >1 means slower than the reference
            "ratios": {
                "shoal_dp_over_nonprivate": r["nonprivate"] / r["shoal"],
                "shoal_vmap_over_nonprivate": r["nonprivate"] / r["shoal_vmap"],
            },
        }
        rows.append((model_name, "PyTorch, non-private", r["nonprivate"], 1.0))
        rows.append(
            (
                model_name,
                f"shoal DP-SGD ({methods_used[model_name]})",
                r["shoal"],
                r["nonprivate"] / r["shoal"],
            )
        )
        rows.append(
            (model_name, "shoal DP-SGD (vmap)", r["shoal_vmap"], r["nonprivate"] / r["shoal_vmap"])
        )
        if opacus:
            o = opacus["results"][model_name]
            entry["opacus_steps_per_s"] = {k: round(v, 1) for k, v in o.items()}
            best = max(o["opacus_hooks"], o["opacus_ghost"])
            # Each side's slowdown over its own process's non-private baseline, then compared:
            # robust to load changing between the two processes.
            opacus_over_np = o["nonprivate"] / best
            entry["ratios"]["opacus_over_nonprivate"] = opacus_over_np
            entry["ratios"]["shoal_over_opacus"] = (
                entry["ratios"]["shoal_dp_over_nonprivate"] / opacus_over_np
            )
            entry["ratios"]["shoal_over_opacus_raw"] = best / r["shoal"]
            rows.append(
                (model_name, "Opacus hooks", o["opacus_hooks"], o["nonprivate"] / o["opacus_hooks"])
            )
            rows.append(
                (model_name, "Opacus ghost", o["opacus_ghost"], o["nonprivate"] / o["opacus_ghost"])
            )
        report["models"][model_name] = entry

    print(
        f"DP-SGD on digits, batch {args.batch_size}, {args.threads} thread(s), "
        f"median of {args.repeats} repeats of {args.steps} steps"
    )
    print(f"{'model':<6} {'method':<28} {'steps/s':>10} {'time vs non-private':>20}")
    for model_name, method, rate, ratio in rows:
        print(f"{model_name:<6} {method:<28} {rate:>10.1f} {ratio:>19.2f}x")
    for model_name in args.models:
        ratios = report["models"][model_name]["ratios"]
        if "shoal_over_opacus" in ratios:
            print(
                f"{model_name}: shoal step time = {ratios['shoal_over_opacus']:.2f}x Opacus's best "
                f"(normalized by each process's non-private baseline; raw "
                f"{ratios['shoal_over_opacus_raw']:.2f}x)"
            )
    if opacus_note:
        print(opacus_note)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
