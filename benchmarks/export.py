"""On-device export: prediction latency and file sizes, exported against PyTorch eager.

For three models (softmax regression and an MLP on digits, LEAF's character LSTM on
tinyshakespeare: embedding 8, 2x256 LSTM, 80-character windows), trained centrally for a
short while so that accuracies mean something, this measures in one run:

- latency per example of PyTorch eager (the model as trained; ``module(x)`` under
  ``no_grad``), onnxruntime on the exported ONNX file, and shoal's NumPy-only predictor, at
  batch 1 (one prediction on a device) and batch 256; every runtime on one thread, runs
  interleaved, medians of ``--repeat`` runs;
- file sizes: the float64 checkpoint, a PyTorch state dict, ONNX, the NumPy predictor and
  its int8 version;
- int8's accuracy cost: test accuracy of the NumPy predictor with float32 and int8 weights.

The softmax model has no PyTorch form (it is shoal's NumPy model); its eager figure is its
own ``x @ W + b`` in NumPy (float64, as it trains).

    python benchmarks/export.py --json results/export.json
    python benchmarks/export.py --quick                       # smaller, for a smoke run
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread for every runtime, set before NumPy loads

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from shoal.data import Dataset, load_digits  # noqa: E402
from shoal.learn import FitConfig, SoftmaxRegression  # noqa: E402
from shoal.learn.export import (  # noqa: E402
    NumpyPredictor,
    check_onnx,
    export_onnx,
    model_logits,
    write_predictor,
)
from shoal.learn.export.convert import torch_module  # noqa: E402
from shoal.learn.text_models import char_lstm  # noqa: E402
from shoal.learn.torch import TorchModel, mlp_module  # noqa: E402


def _corpus() -> Path:
    """tinyshakespeare.txt from $SHOAL_DATA_DIR, or from a shared/data/ above this checkout."""
    if os.environ.get("SHOAL_DATA_DIR"):
        return Path(os.environ["SHOAL_DATA_DIR"]) / "tinyshakespeare.txt"
    for folder in Path(__file__).resolve().parents:
        candidate = folder / "shared" / "data" / "tinyshakespeare.txt"
        if candidate.exists():
            return candidate
    return Path("shared/data/tinyshakespeare.txt")


CORPUS = _corpus()


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], repeat: int, inner: int
) -> dict[str, float]:
    """Median wall seconds per call of each function, the contenders' runs interleaved."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(inner):
                fn()
            times[name].append((time.perf_counter() - start) / inner)
    return {name: statistics.median(v) for name, v in times.items()}


def char_lstm_model(vocab: int) -> TorchModel:
    """LEAF's model, as `[model] name = "char_lstm"` builds it."""
    model = char_lstm(features=80, classes=vocab)
    assert isinstance(model, TorchModel)
    return model


def shakespeare(limit_train: int, limit_test: int) -> tuple[Dataset, Dataset, int]:
    """Windows of tinyshakespeare split in time per role (shoal.data.load_play), subsampled."""
    from shoal.data import load_play

    corpus = load_play(CORPUS, tokens="char", seq_len=80)
    train, test = corpus.pooled()
    rng = np.random.default_rng(0)
    pick_train = rng.choice(len(train.y), size=min(limit_train, len(train.y)), replace=False)
    pick_test = rng.choice(len(test.y), size=min(limit_test, len(test.y)), replace=False)
    vocab = len(corpus.vocab)
    return (
        Dataset(x=train.x[pick_train], y=train.y[pick_train], classes=vocab),
        Dataset(x=test.x[pick_test], y=test.y[pick_test], classes=vocab),
        vocab,
    )


def models(quick: bool) -> list[tuple[str, Any, Dataset, Dataset]]:
    train, test = load_digits(test_fraction=0.2, seed=0)
    rng = np.random.default_rng(0)
    softmax = SoftmaxRegression(features=64, classes=10)
    softmax.fit(train, config=FitConfig(epochs=20, lr=0.05), rng=rng)
    mlp = TorchModel(functools.partial(mlp_module, 64, 10, 64))
    mlp.fit(train, config=FitConfig(epochs=20, lr=0.1), rng=rng)
    out = [("softmax (digits)", softmax, train, test), ("mlp 64 (digits)", mlp, train, test)]
    if CORPUS.exists():
        text_train, text_test, vocab = shakespeare(20_000 if quick else 60_000, 2_000)
        lstm = char_lstm_model(vocab)
        steps = 60 if quick else 600
        config = FitConfig(epochs=1, batch_size=64, lr=1.0, max_steps=steps)
        started = time.perf_counter()
        lstm.fit(text_train, config=config, rng=rng)
        took = time.perf_counter() - started
        print(f"char-LSTM: {steps} SGD steps in {took:.0f} s", file=sys.stderr)
        out.append(("char-LSTM 2x256 (shakespeare)", lstm, text_train, text_test))
    else:
        print(f"no {CORPUS}: the char-LSTM row is skipped", file=sys.stderr)
    return out


def contenders(
    model: Any, module: Any, session: Any, predictor: NumpyPredictor, xb: np.ndarray
) -> dict[str, Callable[[], Any]]:
    """The three ways to get logits for the batch ``xb``."""
    tb = torch.tensor(xb)

    def eager() -> Any:
        if module is None:  # shoal's own NumPy softmax regression, as it trains
            return xb.astype(np.float64) @ model.W + model.b
        with torch.no_grad():
            return module(tb)

    return {
        "eager": eager,
        "onnxruntime": lambda: session.run(["logits"], {"x": xb}),
        "numpy": lambda: predictor.logits(xb),
    }


def measure(name: str, model: Any, test: Dataset, folder: Path, repeat: int) -> dict[str, Any]:
    import onnxruntime

    x = np.asarray(test.x)
    dtype = "int64" if getattr(model, "token_inputs", False) else "float32"
    files = {
        "onnx": folder / "m.onnx",
        "numpy": folder / "m.safetensors",
        "numpy_int8": folder / "m.int8.safetensors",
        "torch_state_dict": folder / "m.pt",
    }
    export_onnx(model, files["onnx"], sample=x[:8])
    check = check_onnx(files["onnx"], model, x[:512])
    write_predictor(files["numpy"], model)
    write_predictor(files["numpy_int8"], model, int8=True)
    module = torch_module(model)
    if module is not None:
        torch.save(module.state_dict(), files["torch_state_dict"])
    else:
        del files["torch_state_dict"]
    predictor = NumpyPredictor.load(files["numpy"])
    small = NumpyPredictor.load(files["numpy_int8"])
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(
        str(files["onnx"]), options, providers=["CPUExecutionProvider"]
    )
    y = np.asarray(test.y)
    accuracy = {
        "model": float((model_logits(model, x).argmax(1) == y).mean()),
        "onnx": float((session.run(["logits"], {"x": x.astype(dtype)})[0].argmax(1) == y).mean()),
        "numpy": float((predictor.predict(x) == y).mean()),
        "numpy_int8": float((small.predict(x) == y).mean()),
    }
    latency: dict[str, dict[str, float]] = {}
    for batch in (1, 256):
        xb = np.ascontiguousarray(x[:batch].astype(dtype))
        inner = max(1, 256 // batch) if "LSTM" not in name else max(1, 16 // batch)
        medians = interleaved_medians(
            contenders(model, module, session, predictor, xb), repeat, inner
        )
        latency[f"batch {batch}"] = {k: v / batch * 1e6 for k, v in medians.items()}
    return {
        "model": name,
        "parameters": int(sum(v.size for v in model.get_weights().values())),
        "onnx_check": {
            "examples": check.examples,
            "max_prob_diff": check.max_prob_diff,
            "max_logit_diff": check.max_logit_diff,
            "same_predictions": check.same_predictions,
        },
        "latency_us_per_example": latency,
        "bytes": {
            # the Store's checkpoint holds the server's float64 weights
            "checkpoint_float64": 8 * int(sum(v.size for v in model.get_weights().values())),
            **{k: p.stat().st_size for k, p in files.items()},
        },
        "accuracy": accuracy,
        "int8_accuracy_cost": accuracy["numpy"] - accuracy["numpy_int8"],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="shorter training, fewer repeats")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    repeat = 3 if args.quick else args.repeat
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, model, _train, test in models(args.quick):
            sub = Path(folder) / str(len(rows))
            sub.mkdir()
            rows.append(measure(name, model, test, sub, repeat))
    print(f"\nlatency per example, microseconds (median of {repeat}, one thread each)")
    print(f"{'model':<31}{'batch':>6}{'eager':>10}{'onnxrt':>10}{'numpy':>10}")
    for row in rows:
        for batch, values in row["latency_us_per_example"].items():
            print(
                f"{row['model']:<31}{batch.split()[1]:>6}{values['eager']:>10.3g}"
                f"{values['onnxruntime']:>10.3g}{values['numpy']:>10.3g}"
            )
    print("\nfile sizes, bytes; accuracy on the test set")
    print(
        f"{'model':<31}{'params':>9}{'ckpt f64':>10}{'torch .pt':>10}{'onnx':>10}{'numpy':>10}"
        f"{'int8':>9}{'acc':>7}{'acc int8':>9}{'onnx dp':>9}"
    )
    for row in rows:
        b, a = row["bytes"], row["accuracy"]
        print(
            f"{row['model']:<31}{row['parameters']:>9,}{b['checkpoint_float64']:>10,}"
            f"{b.get('torch_state_dict', 0):>10,}{b['onnx']:>10,}{b['numpy']:>10,}"
            f"{b['numpy_int8']:>9,}{a['numpy']:>7.4f}{a['numpy_int8']:>9.4f}"
            f"{row['onnx_check']['max_prob_diff']:>9.1e}"
        )
    if args.json:
        out = {
            "benchmark": "export",
            "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count()},
            "versions": _versions(),
            "repeat": repeat,
            "quick": args.quick,
            "rows": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime

    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


if __name__ == "__main__":
    sys.exit(main())
