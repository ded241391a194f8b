"""Export: ONNX checked with onnxruntime, the NumPy-only predictor, int8, hub folders.

The adversary: a predictor or hub file that is truncated, lies about its tensors, or hides
a pickle; each is refused with a clear error, and the predictor module runs without torch.
"""

from __future__ import annotations

import contextlib
import functools
import json
import pickle
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
nn = torch.nn

from shoal.data import Dataset, load_digits  # noqa: E402
from shoal.errors import ConfigError, UnsafeModelError  # noqa: E402
from shoal.learn import FitConfig, SoftmaxRegression  # noqa: E402
from shoal.learn.export import (  # noqa: E402
    NumpyPredictor,
    PredictorError,
    TrainingRecord,
    check_onnx,
    export_onnx,
    model_logits,
    predictor_for,
    read_config,
    write_hub,
    write_predictor,
)
from shoal.learn.torch import TorchModel, cnn_module, load_pretrained, mlp_module  # noqa: E402

pytestmark = pytest.mark.torch


class CharLSTM(nn.Module):
    """The shape of shoal's next-token LSTM: embed -> LSTM -> head on the last step."""

    def __init__(self, vocab: int = 12, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 4)
        self.lstm = nn.LSTM(4, 8, num_layers=layers, batch_first=True)
        self.head = nn.Linear(8, vocab)

    def forward(self, x: Any) -> Any:
        out, _ = self.lstm(self.embed(x.long()))
        return self.head(out[:, -1])


def lstm_model() -> TorchModel:
    model = TorchModel(CharLSTM, seed=3)
    model.token_inputs = True  # what shoal.learn.text_models sets for token-id inputs
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    # Tiny batches run fastest on one intra-op thread, above all on a shared machine.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def digits() -> tuple[Dataset, Dataset]:
    return load_digits(test_fraction=0.2, seed=0)


def trained(name: str, digits: tuple[Dataset, Dataset]) -> Any:
    if name == "softmax":
        model: Any = SoftmaxRegression(features=64, classes=10)
    elif name == "mlp":
        model = TorchModel(functools.partial(mlp_module, 64, 10, 16))
    else:
        model = TorchModel(functools.partial(cnn_module, 64, 10, 4))
    model.fit(digits[0], config=FitConfig(epochs=1, lr=0.05), rng=np.random.default_rng(0))
    return model


def tokens(n: int = 64, seq: int = 7, vocab: int = 12) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, size=(n, seq))


@pytest.mark.parametrize("name", ["softmax", "mlp", "cnn"])
def test_onnx_export_matches_the_model_under_onnxruntime(
    tmp_path: Path, digits: tuple[Dataset, Dataset], name: str
) -> None:
    pytest.importorskip("onnxruntime")
    model = trained(name, digits)
    path = tmp_path / "m.onnx"
    x = digits[1].x[:200]
    export_onnx(model, path, sample=x)
    check = check_onnx(path, model, x)
    assert check.examples == 200
    assert check.ok, check
    assert check.max_prob_diff <= 1e-5


def test_onnx_export_of_an_lstm_on_token_ids(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model = lstm_model()
    path = tmp_path / "lstm.onnx"
    export_onnx(model, path, sample=tokens())
    check = check_onnx(path, model, tokens(100, seq=9))  # another window length: dynamic
    assert check.ok and check.max_prob_diff <= 1e-5, check


def test_the_tiny_transformer_exports_to_onnx_and_round_trips_a_hub_folder(
    tmp_path: Path,
) -> None:
    pytest.importorskip("onnxruntime")
    from shoal.learn.registry import build_model

    options = {"width": 16, "heads": 2, "layers": 1, "ff": 32}
    model = build_model("tiny_transformer", features=9, classes=12, seed=0, **options)
    x = tokens(100, seq=9)
    path = tmp_path / "t.onnx"
    export_onnx(model, path, sample=x)
    check = check_onnx(path, model, x)
    assert check.examples == 100 and check.ok and check.max_prob_diff <= 1e-5, check
    out = tmp_path / "hub"
    write_hub(
        out,
        model=model,
        name="tiny_transformer",
        options=options,
        features=9,
        classes=12,
        record=record(),
    )
    loaded = load_pretrained(str(out))
    np.testing.assert_allclose(model_logits(loaded, x), model_logits(model, x), atol=1e-6)


@pytest.mark.parametrize("name", ["softmax", "mlp", "lstm"])
def test_the_numpy_predictor_computes_what_the_model_computes(
    tmp_path: Path, digits: tuple[Dataset, Dataset], name: str
) -> None:
    model = lstm_model() if name == "lstm" else trained(name, digits)
    x = tokens() if name == "lstm" else digits[1].x[:100]
    path = tmp_path / "p.safetensors"
    write_predictor(path, model, info={"note": "test"})
    predictor = NumpyPredictor.load(path)
    assert predictor.meta == {"note": "test"}
    want = model_logits(model, x)
    np.testing.assert_allclose(predictor.logits(x), want, atol=1e-5)
    np.testing.assert_array_equal(predictor.predict(x), want.argmax(axis=1))
    np.testing.assert_allclose(predictor.predict_proba(x).sum(axis=1), 1.0, rtol=1e-6)


def test_int8_weights_are_4x_smaller_and_move_logits_by_a_bounded_amount(
    tmp_path: Path, digits: tuple[Dataset, Dataset]
) -> None:
    model = trained("mlp", digits)
    full, small = tmp_path / "f.safetensors", tmp_path / "q.safetensors"
    write_predictor(full, model)
    write_predictor(small, model, int8=True)
    assert small.stat().st_size < full.stat().st_size / 2.5
    x = digits[1].x
    exact, quantized = NumpyPredictor.load(full), NumpyPredictor.load(small)
    for name, value in exact.tensors.items():
        if value.ndim == 2:  # every weight within half a step of its row's scale
            step = np.abs(value).max(axis=1, keepdims=True) / 127
            assert (np.abs(quantized.tensors[name] - value) <= step / 2 + 1e-7).all()
    agree = (exact.predict(x) == quantized.predict(x)).mean()
    assert agree > 0.95
    assert np.array_equal(predictor_for(model, int8=True).logits(x[:5]), quantized.logits(x[:5]))


def test_models_the_predictor_cannot_run_name_the_onnx_route(
    digits: tuple[Dataset, Dataset],
) -> None:
    with pytest.raises(ConfigError, match="has no NumPy version; export with --format onnx"):
        predictor_for(TorchModel(functools.partial(cnn_module, 64, 10, 4)))


def test_the_predictor_module_needs_neither_torch_nor_onnxruntime() -> None:
    code = (
        "import sys; import shoal.learn.export.predictor as p; "
        "bad = [m for m in ('torch', 'onnxruntime', 'onnx') if m in sys.modules]; "
        "assert not bad, bad"
    )
    src = str(Path(__file__).resolve().parents[2] / "src")
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": src}, timeout=60)


def _header_file(path: Path, header: dict[str, Any], body: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


def test_lying_predictor_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    meta = {"format": "shoal.numpy-predictor/1", "program": "[]"}
    cases = [
        (
            {"__metadata__": meta, "w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 64]}},
            b"\0" * 16,
            "outside",
        ),
        (
            {"__metadata__": meta, "w": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}},
            b"\0" * 16,
            "bytes for",
        ),
        (
            {"__metadata__": meta, "w": {"dtype": "O", "shape": [1], "data_offsets": [0, 8]}},
            b"\0" * 8,
            "malformed",
        ),
        ({"__metadata__": {"format": "other"}}, b"", "not a shoal predictor"),
        ({"__metadata__": {**meta, "program": '[{"op": "exec"}]'}}, b"", "unknown layer"),
        (
            {"__metadata__": {**meta, "program": '[{"op": "linear", "weight": "nope"}]'}},
            b"",
            "missing tensor",
        ),
    ]
    for header, body, message in cases:
        _header_file(path, header, body)
        with pytest.raises(PredictorError, match=message):
            NumpyPredictor.load(path)
    path.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(PredictorError):
        NumpyPredictor.load(path)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_the_predictor_reader_never_crashes_on_arbitrary_bytes(blob: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x"
        path.write_bytes(blob)
        with contextlib.suppress(PredictorError):
            NumpyPredictor.load(path)


def test_out_of_vocabulary_tokens_are_refused_by_the_predictor() -> None:
    predictor = predictor_for(lstm_model())
    with pytest.raises(PredictorError, match=r"0\.\.11"):
        predictor.predict(np.full((1, 3), 12))


# ------------------------------------------------------------------ hub folders


def record(**privacy: Any) -> TrainingRecord:
    return TrainingRecord(
        run_id="r1",
        name="digits-fl",
        status="finished",
        data={"dataset": "digits", "test_fraction": 0.2},
        partition={"scheme": "dirichlet", "nodes": 20, "alpha": 0.5},
        model={"name": "mlp", "hidden": 16},
        algorithm={"name": "fedavg", "rounds": 5, "nodes_per_round": 10, "lr": 0.1},
        aggregate={"rule": "mean", "clip": 2.0, "secure": True},
        privacy=privacy or None,
        rounds_completed=5,
        final={"accuracy": 0.91, "loss": 0.3, "epsilon": 2.5, "train_loss": float("nan")},
    )


def test_a_hub_folder_round_trips_and_its_card_records_the_training(
    tmp_path: Path, digits: tuple[Dataset, Dataset]
) -> None:
    yaml = pytest.importorskip("yaml")
    model = TorchModel(functools.partial(mlp_module, 64, 10, 16))
    model.fit(digits[0], config=FitConfig(epochs=1), rng=np.random.default_rng(0))
    out = tmp_path / "hub"
    sizes = write_hub(
        out,
        model=model,
        name="mlp",
        options={"hidden": 16},
        features=64,
        classes=10,
        record=record(
            epsilon=3.0, delta=1e-5, accountant="pld", level="example", mode="distributed"
        ),
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    assert sizes["model.safetensors"] == (out / "model.safetensors").stat().st_size
    loaded = load_pretrained(str(out))
    x = digits[1].x
    np.testing.assert_allclose(model_logits(loaded, x), model_logits(model, x), atol=1e-6)
    text = (out / "README.md").read_text()
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    fed = meta["federated_training"]
    assert meta["library_name"] == "shoal"
    assert "differential-privacy" in meta["tags"]
    assert fed["nodes"] == 20 and fed["rounds"] == 5
    assert fed["algorithm"]["name"] == "fedavg"
    assert fed["aggregator"]["rule"] == "mean"
    assert fed["secure_aggregation"]["enabled"] is True
    dp = fed["differential_privacy"]
    assert (dp["epsilon_spent"], dp["delta"], dp["accountant"]) == (2.5, 1e-5, "pld")
    assert fed["metrics"] == {"accuracy": 0.91, "loss": 0.3}
    assert fed["data"]["source"] == "digits"
    assert "huggingface-cli upload" in body
    assert read_config(out)["shoal_model"] == "mlp"


def test_a_hub_folder_of_a_softmax_model_round_trips(
    tmp_path: Path, digits: tuple[Dataset, Dataset]
) -> None:
    model = trained("softmax", digits)
    write_hub(
        tmp_path / "h",
        model=model,
        name="softmax_regression",
        options={},
        features=64,
        classes=10,
        record=record(),
    )
    loaded = load_pretrained(str(tmp_path / "h"))
    x = digits[1].x
    np.testing.assert_allclose(model_logits(loaded, x), model_logits(model, x), atol=1e-5)


def test_hostile_or_broken_hub_folders_are_refused(
    tmp_path: Path, digits: tuple[Dataset, Dataset]
) -> None:
    model = trained("mlp", digits)
    out = tmp_path / "hub"
    write_hub(
        out,
        model=model,
        name="mlp",
        options={"hidden": 16},
        features=64,
        classes=10,
        record=record(),
    )
    with pytest.raises(ConfigError, match="not an empty folder"):
        write_hub(
            out, model=model, name="mlp", options={}, features=64, classes=10, record=record()
        )
    good = (out / "model.safetensors").read_bytes()

    class Evil:
        def __reduce__(self) -> Any:
            return (print, ("pwned",))

    (out / "model.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(UnsafeModelError):
        load_pretrained(str(out))
    (out / "model.safetensors").write_bytes(good)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "shoal_options": {"hidden": 8}}))
    with pytest.raises(
        ConfigError, match=r"shape mismatches.*1.weight \(file \(16, 64\), model \(8, 64\)\)"
    ):
        load_pretrained(str(out))
    (out / "config.json").write_text(json.dumps({**config, "format": "transformers"}))
    with pytest.raises(ConfigError, match="not written by `shoal export"):
        load_pretrained(str(out))


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 6).flatmap(
        lambda rows: st.lists(
            st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=rows * 3, max_size=rows * 3
        ).map(lambda v: np.array(v, dtype=np.float32).reshape(-1, 3))
    )
)
def test_int8_moves_each_weight_by_at_most_half_its_rows_step(matrix: np.ndarray) -> None:
    from shoal.learn.export.predictor import dequantize
    from shoal.learn.export.quantize import quantize_int8

    stored = quantize_int8({"w": matrix, "b": matrix[0]})
    assert stored["w"].dtype == np.int8 and stored["b"].dtype == np.float32
    back = dequantize(stored)["w"]
    step = np.abs(matrix).max(axis=1, keepdims=True).astype(np.float64) / 127
    assert (np.abs(back.astype(np.float64) - matrix) <= step / 2 * (1 + 1e-5) + 1e-30).all()


def test_a_module_onnx_cannot_express_is_a_clear_error_and_leaves_no_file(tmp_path: Path) -> None:
    pytest.importorskip("onnx")

    class Spectrum(nn.Module):
        def forward(self, x: Any) -> Any:
            return torch.linalg.svd(x)[1]  # no ONNX operator for an SVD

    path = tmp_path / "u.onnx"
    with pytest.raises(ConfigError, match=r"torch.onnx could not export Spectrum.*linalg_svd"):
        export_onnx(TorchModel(Spectrum), path, sample=np.zeros((2, 3), np.float32))
    assert not path.exists()


def test_an_export_that_traced_wrong_fails_its_check(tmp_path: Path) -> None:
    """Tracing turns a forward that leaves torch into a constant; the check catches it."""
    pytest.importorskip("onnxruntime")

    class LeavesTorch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Linear(3, 3)

        def forward(self, x: Any) -> Any:
            return self.scale(torch.tensor(np.asarray(x.detach()) ** 2))

    model = TorchModel(LeavesTorch)
    path = tmp_path / "w.onnx"
    export_onnx(model, path, sample=np.zeros((2, 3), np.float32))
    x = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    with pytest.raises(ConfigError, match="does not run under onnxruntime"):
        check_onnx(path, model, x)


def test_the_check_fails_a_file_that_is_not_the_model(
    tmp_path: Path, digits: tuple[Dataset, Dataset]
) -> None:
    pytest.importorskip("onnxruntime")
    model = trained("mlp", digits)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, sample=digits[1].x[:4])
    model.set_weights({k: v * 1.01 for k, v in model.get_weights().items()})  # a later round
    check = check_onnx(path, model, digits[1].x[:200])
    assert not check.ok and check.max_prob_diff > 1e-5
