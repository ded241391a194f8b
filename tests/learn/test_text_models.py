"""Next-token language models: LEAF's char LSTM, a word LSTM, a tiny transformer."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from shoal.data import Dataset, role_corpus  # noqa: E402
from shoal.errors import ConfigError, DataError  # noqa: E402
from shoal.learn import FedAdam, FedAvg, FitConfig, simulate  # noqa: E402
from shoal.learn.registry import build_model  # noqa: E402
from shoal.learn.torch import TorchModel  # noqa: E402

pytestmark = pytest.mark.torch

VERSE = "to be or not to be, that is the question.\n"
PLAY = "\n\n".join(f"{role}:\n{VERSE * 6}" for role in ("HAMLET", "OPHELIA", "HORATIO"))


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_leaf_sizes_by_default() -> None:
    model = build_model("char_lstm", features=80, classes=66)
    shapes = {k: v.shape for k, v in model.get_weights().items()}
    assert shapes["embed.weight"] == (66, 8)
    assert shapes["lstm.weight_ih_l0"] == (4 * 256, 8)
    assert shapes["lstm.weight_hh_l1"] == (4 * 256, 256)
    assert "lstm.weight_hh_l2" not in shapes
    assert shapes["head.weight"] == (66, 256)


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("char_lstm", {"embedding": 4, "hidden": 16, "layers": 1}),
        ("word_lstm", {"embedding": 8, "hidden": 16}),
        ("tiny_transformer", {"width": 16, "heads": 2, "layers": 1, "ff": 32, "optimizer": "adam"}),
    ],
)
def test_small_models_learn_a_repeated_verse(name: str, options: dict[str, object]) -> None:
    tokens = "word" if name == "word_lstm" else "char"
    corpus = role_corpus(PLAY, tokens=tokens, seq_len=6)
    train, test = corpus.pooled()
    model = build_model(name, features=6, classes=len(corpus.vocab), **options)
    assert isinstance(model, TorchModel)
    before = model.evaluate(test)
    lr = 0.01 if options.get("optimizer") == "adam" else 1.0
    model.fit(train, config=FitConfig(epochs=8, lr=lr, batch_size=16), rng=np.random.default_rng(0))
    after = model.evaluate(test)
    assert after["perplexity"] == pytest.approx(np.exp(after["loss"]))
    assert after["loss"] < before["loss"] - 0.5
    assert after["accuracy"] > max(before["accuracy"], 0.4)
    # The same weights give the same predictions in a fresh instance.
    clone = model.clone()
    clone.set_weights(model.get_weights())
    assert clone.evaluate(test) == after


def test_federated_fedavg_and_fedadam_reduce_perplexity() -> None:
    corpus = role_corpus(PLAY, seq_len=6)
    _, test = corpus.pooled()
    model = build_model("char_lstm", features=6, classes=len(corpus.vocab), hidden=16, layers=1)
    start = model.evaluate(test)["perplexity"]
    for algorithm in (
        FedAvg(rounds=3, nodes_per_round=3, lr=1.0, batch_size=16, local_epochs=2),
        FedAdam(rounds=3, nodes_per_round=3, lr=1.0, batch_size=16, local_epochs=2, server_lr=0.05),
    ):
        result = simulate(
            model=model, nodes=list(corpus.train.values()), algorithm=algorithm, test=test
        )
        assert result.history[-1].extra["perplexity"] < start * 0.7
        assert result.metrics["perplexity"] == result.history[-1].extra["perplexity"]


def test_bad_inputs_are_named() -> None:
    model = build_model("char_lstm", features=4, classes=10, hidden=8, layers=1)
    ids = Dataset(x=np.full((3, 4), 12, dtype=np.uint8), y=np.zeros(3, np.int64), classes=13)
    with pytest.raises(DataError, match=r"0\.\.9 \(the model's vocabulary of 10\)"):
        model.evaluate(ids)
    floats = Dataset(x=np.zeros((3, 4), np.float32), y=np.zeros(3, np.int64), classes=10)
    with pytest.raises(DataError, match="integer inputs"):
        model.fit(floats, config=FitConfig(), rng=np.random.default_rng(0))
    with pytest.raises(ConfigError, match="multiple of heads"):
        build_model("tiny_transformer", features=4, classes=10, width=10, heads=4)
    with pytest.raises(ConfigError, match="hidden must be a positive integer"):
        build_model("char_lstm", features=4, classes=10, hidden=0)
    with pytest.raises(ConfigError, match="unexpected keyword"):
        build_model("word_lstm", features=4, classes=10, width=3)
    transformer = build_model("tiny_transformer", features=4, classes=10, width=8, heads=2)
    long = Dataset(x=np.zeros((2, 6), np.uint8), y=np.zeros(2, np.int64), classes=10)
    with pytest.raises(ValueError, match="longer than the model's seq_len 4"):
        transformer.evaluate(long)
