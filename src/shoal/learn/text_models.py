"""Next-token language models for federated text (the ``shoal[torch]`` extra).

A character LSTM as in LEAF's Shakespeare benchmark (embedding 8, two LSTM layers of 256), a
small word-level LSTM and a tiny transformer. Each reads ``seq_len`` token ids and predicts
the next token's id; registered as ``char_lstm``, ``word_lstm`` and ``tiny_transformer``.
"""

from __future__ import annotations

import functools

from shoal.errors import ConfigError
from shoal.learn.model import Model
from shoal.learn.registry import register_model
from shoal.learn.torch import TorchModel, nn, torch

__all__ = ["NextTokenLSTM", "TinyTransformer", "char_lstm", "tiny_transformer", "word_lstm"]


class NextTokenLSTM(nn.Module):
    """Embedding -> stacked LSTM -> linear head on the last step: logits of the next token."""

    def __init__(self, *, vocab: int, embedding: int, hidden: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embedding)
        self.lstm = nn.LSTM(embedding, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x.long()))
        result: torch.Tensor = self.head(out[:, -1])
        return result


class TinyTransformer(nn.Module):
    """Token and learned position embeddings -> pre-norm encoder layers -> head on the last
    position. No causal mask: every input precedes the token predicted, so attending to all
    of the window leaks nothing."""

    def __init__(
        self, *, vocab: int, seq_len: int, width: int, heads: int, layers: int, ff: int
    ) -> None:
        super().__init__()
        if width % heads:
            raise ConfigError(f"width ({width}) must be a multiple of heads ({heads})")
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(seq_len, width))
        nn.init.normal_(self.position, std=0.02)
        layer = nn.TransformerEncoderLayer(
            width, heads, dim_feedforward=ff, dropout=0.0, batch_first=True, norm_first=True
        )
        # Nested tensors help only with padding masks, which fixed windows never have.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.position.shape[0]:
            raise ValueError(
                f"windows of {x.shape[1]} tokens are longer than the model's seq_len "
                f"{self.position.shape[0]}"
            )
        h = self.embed(x.long()) + self.position[-x.shape[1] :]
        h = self.encoder(h)
        result: torch.Tensor = self.head(self.norm(h[:, -1]))
        return result


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _lstm(vocab: int, embedding: int, hidden: int, layers: int) -> nn.Module:
    return NextTokenLSTM(vocab=vocab, embedding=embedding, hidden=hidden, layers=layers)


def _transformer(
    vocab: int, seq_len: int, width: int, heads: int, layers: int, ff: int
) -> nn.Module:
    return TinyTransformer(
        vocab=vocab, seq_len=seq_len, width=width, heads=heads, layers=layers, ff=ff
    )


def _text_model(
    factory: functools.partial[nn.Module], optimizer: str, momentum: float, seed: int
) -> Model:
    return TorchModel(factory, optimizer=optimizer, momentum=momentum, seed=seed, token_inputs=True)


def char_lstm(
    *,
    features: int,
    classes: int,
    embedding: int = 8,
    hidden: int = 256,
    layers: int = 2,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    seed: int = 0,
) -> Model:
    """LEAF's Shakespeare model: ``classes`` characters, windows of ``features`` of them."""
    _positive("features (the window length)", features)
    factory = functools.partial(
        _lstm,
        _positive("classes (the vocabulary size)", classes),
        _positive("embedding", embedding),
        _positive("hidden", hidden),
        _positive("layers", layers),
    )
    return _text_model(factory, optimizer, momentum, seed)


def word_lstm(
    *,
    features: int,
    classes: int,
    embedding: int = 64,
    hidden: int = 128,
    layers: int = 1,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    seed: int = 0,
) -> Model:
    """A small next-word LSTM over a vocabulary of ``classes`` words (PAD and UNK included)."""
    return char_lstm(
        features=features,
        classes=classes,
        embedding=embedding,
        hidden=hidden,
        layers=layers,
        optimizer=optimizer,
        momentum=momentum,
        seed=seed,
    )


def tiny_transformer(
    *,
    features: int,
    classes: int,
    width: int = 64,
    heads: int = 4,
    layers: int = 2,
    ff: int = 128,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    seed: int = 0,
) -> Model:
    """A two-layer pre-norm transformer encoder over windows of ``features`` tokens."""
    factory = functools.partial(
        _transformer,
        _positive("classes (the vocabulary size)", classes),
        _positive("features (the window length)", features),
        _positive("width", width),
        _positive("heads", heads),
        _positive("layers", layers),
        _positive("ff", ff),
    )
    if width % heads:
        raise ConfigError(f"width ({width}) must be a multiple of heads ({heads})")
    return _text_model(factory, optimizer, momentum, seed)


register_model("char_lstm", char_lstm)
register_model("word_lstm", word_lstm)
register_model("tiny_transformer", tiny_transformer)
