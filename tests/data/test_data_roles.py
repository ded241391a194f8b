"""LEAF-style role split of a play: per-role time split, padding, vocabularies, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.data import PAD, UNK, load_play, parse_speeches, role_corpus, tokenize
from shoal.errors import DataError

PLAY = """ROMEO:
But soft, what light through yonder window breaks?
It is the east, and Juliet is the sun.

JULIET:
O Romeo, Romeo! wherefore art thou Romeo?
Deny thy father and refuse thy name.

NURSE:
Anon!

ROMEO:
I take thee at thy word: call me but love.
"""

# The workspace's shared corpus, next to the checkout (or a worktree of it), if there is one.
SHARED = next(
    (
        p / "shared" / "data" / "tinyshakespeare.txt"
        for p in Path(__file__).resolve().parents
        if (p / "shared" / "data" / "tinyshakespeare.txt").is_file()
    ),
    Path("/nonexistent"),
)


def test_char_split_keeps_roles_with_two_lines_and_splits_in_time() -> None:
    corpus = role_corpus(PLAY, seq_len=8, test_fraction=0.25)
    assert corpus.roles == ["ROMEO", "JULIET"]  # the nurse has one line
    assert list(corpus.test) == corpus.roles
    assert corpus.vocab[:2] == (PAD, UNK)
    body = parse_speeches(PLAY)["ROMEO"]
    train, test = corpus.train["ROMEO"], corpus.test["ROMEO"]
    assert len(train) + len(test) == len(body)  # every character is a target exactly once
    assert len(test) == round(len(body) * 0.25)
    # Targets in order; the first window is all padding; later ones are the text before.
    assert corpus.decode(train.y) == body[: len(train)]
    # Test characters never seen in training are UNK ("k" of "take", ":" ... here).
    bodies = parse_speeches(PLAY)
    seen = {c for r in corpus.roles for c in bodies[r][: len(corpus.train[r])]}
    expected = [c if c in seen else UNK for c in body[len(train) :]]
    assert [corpus.vocab[i] for i in test.y] == expected and UNK in expected
    assert (train.x[0] == 0).all()
    assert corpus.decode(train.x[20]) == body[12:20]
    assert corpus.decode(test.x[0]) == body[len(train) - 8 : len(train)]
    assert train.x.dtype == np.uint8 and train.classes == len(corpus.vocab)
    pooled_train, pooled_test = corpus.pooled()
    assert len(pooled_train) == sum(len(d) for d in corpus.train.values())
    assert len(pooled_test) == sum(len(d) for d in corpus.test.values())


def test_word_vocabulary_comes_from_the_training_split_only() -> None:
    assert tokenize("Know't, O'er\nthe-sea!", "word") == [
        "know't",
        ",",
        "o'er",
        "\n",
        "the",
        "-",
        "sea",
        "!",
    ]
    corpus = role_corpus(PLAY, tokens="word", seq_len=4, test_fraction=0.3, vocab_size=12)
    assert len(corpus.vocab) == 12
    train_words = {corpus.vocab[i] for d in corpus.train.values() for i in np.unique(d.y)}
    romeo = tokenize(parse_speeches(PLAY)["ROMEO"], "word")
    # "love" ends Romeo's text: in his test split, never in any training split.
    assert romeo[-3:] == ["love", ".", "\n"] and "love" not in corpus.vocab
    assert int(corpus.test["ROMEO"].y[-3]) == corpus.vocab.index(UNK)
    assert train_words <= set(corpus.vocab)
    assert corpus.encode("Romeo love")[1] == 1
    assert corpus.decode(corpus.encode("romeo , romeo")) == "romeo , romeo"


def test_max_roles_keeps_the_longest() -> None:
    corpus = role_corpus(PLAY, seq_len=4, max_roles=1)
    assert corpus.roles == ["ROMEO"]


def test_bad_input_is_named() -> None:
    with pytest.raises(DataError, match="no speaker lines"):
        role_corpus("once upon a time\nthere was a play without roles\n")
    with pytest.raises(DataError, match="no speaker lines"):
        role_corpus("")
    with pytest.raises(DataError, match=r"no role has 5 lines.*lower min_lines"):
        role_corpus(PLAY, min_lines=5)
    with pytest.raises(DataError, match="tokens"):
        role_corpus(PLAY, tokens="byte")
    with pytest.raises(DataError, match="seq_len"):
        role_corpus(PLAY, seq_len=0)
    with pytest.raises(DataError, match="test_fraction"):
        role_corpus(PLAY, test_fraction=1.0)
    with pytest.raises(DataError, match="vocab_size"):
        role_corpus(PLAY, tokens="word", vocab_size=2)
    corpus = role_corpus(PLAY, seq_len=4)
    with pytest.raises(DataError, match="token ids"):
        corpus.decode([len(corpus.vocab)])


def test_load_play_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_play(tmp_path / "none.txt")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("ROMEO:\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_play(bad)
    prose = tmp_path / "prose.txt"
    prose.write_text("no speakers\nhere at all\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"prose has no speaker lines"):
        load_play(prose)
    good = tmp_path / "play.txt"
    good.write_text(PLAY, encoding="utf-8")
    assert load_play(good, seq_len=5).roles == ["ROMEO", "JULIET"]


line = st.text(alphabet="abc ,.!'", min_size=1, max_size=12).filter(lambda s: s.strip() != "")
speech = st.tuples(
    st.sampled_from(["ANNE", "BOB", "First Lord"]), st.lists(line, min_size=1, max_size=4)
)


@settings(max_examples=40, deadline=None)
@given(speeches=st.lists(speech, min_size=1, max_size=6), seq_len=st.integers(1, 6))
def test_every_target_is_its_roles_next_token(
    speeches: list[tuple[str, list[str]]], seq_len: int
) -> None:
    text = "\n\n".join(f"{role}:\n" + "\n".join(lines) for role, lines in speeches) + "\n"
    bodies = parse_speeches(text)
    if not any(b.count("\n") >= 2 for b in bodies.values()):
        with pytest.raises(DataError):
            role_corpus(text, seq_len=seq_len)
        return
    corpus = role_corpus(text, seq_len=seq_len)
    for role in corpus.roles:
        body = bodies[role]
        ids = corpus.encode(body)
        padded = np.concatenate([np.zeros(seq_len, np.int64), ids])
        x = np.concatenate([corpus.train[role].x, corpus.test[role].x]).astype(np.int64)
        y = np.concatenate([corpus.train[role].y, corpus.test[role].y])
        np.testing.assert_array_equal(y, ids)
        for i in range(len(ids)):
            np.testing.assert_array_equal(x[i], padded[i : i + seq_len])


@pytest.mark.skipif(not SHARED.is_file(), reason="tinyshakespeare.txt not available")
def test_tinyshakespeare_roles() -> None:
    corpus = load_play(SHARED, seq_len=80)
    assert len(corpus.roles) == 268  # of 299 speaking roles, those with at least 2 lines
    words = load_play(SHARED, tokens="word", seq_len=10, vocab_size=5000)
    assert len(words.vocab) == 5000 and words.train["First Citizen"].x.dtype == np.int32


def test_split_roles_cuts_each_role_into_stretches_of_consecutive_speeches() -> None:
    from shoal.data import speech_list, split_roles

    parts = split_roles(PLAY, 4)  # 3 roles; ROMEO speaks twice, so he is split
    assert list(parts) == ["ROMEO/1", "ROMEO/2", "JULIET/1", "NURSE/1"]
    speeches = speech_list(PLAY)
    assert parts["ROMEO/1"] == speeches[0][1] and parts["ROMEO/2"] == speeches[3][1]
    assert "".join(parts.values()) == "".join(
        b for r in ("ROMEO", "JULIET", "NURSE") for role, b in speeches if role == r
    )
    for bad in (2, 5, 0):
        with pytest.raises(DataError, match="parties"):
            split_roles(PLAY, bad)


@pytest.mark.skipif(not SHARED.is_file(), reason="tinyshakespeare.txt not available")
def test_tinyshakespeare_splits_into_1000_role_stretches() -> None:
    from shoal.data import speech_list, split_roles

    text = SHARED.read_text()
    parts = split_roles(text, 1000)
    assert len(parts) == 1000 and len(parse_speeches(text)) == 299
    assert sum(len(v) for v in parts.values()) == sum(len(b) for _, b in speech_list(text))
