"""Next-character corpus partitioned by speaking role."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from shoal.data import load_shakespeare, parse_speeches, partition, summary
from shoal.errors import DataError

PLAY = """First Citizen:
Before we proceed any further, hear me speak.

All:
Speak, speak.

First Citizen:
You are all resolved rather to die than to famish?

KING RICHARD III:
Now is the winter: of our discontent.
"""

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"


def test_parse_speeches_by_role() -> None:
    speeches = parse_speeches(PLAY)
    assert list(speeches) == ["First Citizen", "All", "KING RICHARD III"]
    assert speeches["First Citizen"] == (
        "Before we proceed any further, hear me speak.\n"
        "You are all resolved rather to die than to famish?\n"
    )
    # A line ending in ':' inside a speech is text, not a new role.
    assert speeches["KING RICHARD III"] == "Now is the winter: of our discontent.\n"


def test_load_shakespeare_windows_and_vocab(tmp_path: Path) -> None:
    path = tmp_path / "play.txt"
    path.write_text(PLAY, encoding="utf-8")
    corpus = load_shakespeare(path, seq_len=10)
    assert list(corpus.roles) == ["First Citizen", "All", "KING RICHARD III"]
    assert corpus.vocab == "".join(sorted(set(corpus.vocab)))
    speech = parse_speeches(PLAY)["First Citizen"]
    ds = corpus.roles["First Citizen"]
    assert len(ds) == len(speech) - 10
    assert ds.x.shape == (len(speech) - 10, 10) and ds.x.dtype == np.int64
    assert ds.classes == len(corpus.vocab)
    for i in (0, 7, len(ds) - 1):
        assert corpus.decode(ds.x[i]) == speech[i : i + 10]
        assert corpus.decode([ds.y[i]]) == speech[i + 10]
    np.testing.assert_array_equal(corpus.encode(speech[:10]), ds.x[0])
    # Node subsets copy only their rows; summary accepts the role mapping directly.
    assert summary(corpus.roles).nodes == 3
    assert len(partition(ds, nodes=2)[0]) > 0
    with pytest.raises(DataError, match="vocabulary"):
        corpus.encode("~")


def test_roles_shorter_than_a_window_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "play.txt"
    path.write_text(PLAY, encoding="utf-8")
    corpus = load_shakespeare(path, seq_len=40)
    assert "All" not in corpus.roles
    with pytest.raises(DataError, match="smaller seq_len"):
        load_shakespeare(path, seq_len=500)


def test_missing_corpus_says_where_to_put_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SHOAL_DATA_DIR", raising=False)
    with pytest.raises(DataError, match="SHOAL_DATA_DIR"):
        load_shakespeare()
    monkeypatch.setenv("SHOAL_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=r"tinyshakespeare\.txt"):
        load_shakespeare()
    with pytest.raises(DataError, match="does not exist"):
        load_shakespeare(tmp_path / "nope.txt")
    (tmp_path / "tinyshakespeare.txt").write_text(PLAY, encoding="utf-8")
    assert "All" in load_shakespeare(seq_len=5).roles
    assert "All" in load_shakespeare(tmp_path, seq_len=5).roles
    (tmp_path / "prose.txt").write_text("no roles here\njust text\n", encoding="utf-8")
    with pytest.raises(DataError, match="no speeches"):
        load_shakespeare(tmp_path / "prose.txt")


@pytest.mark.skipif(
    not SHARED.is_file() and "SHOAL_DATA_DIR" not in os.environ,
    reason="tinyshakespeare.txt not available",
)
def test_real_corpus() -> None:
    corpus = load_shakespeare(SHARED if SHARED.is_file() else None)
    assert len(corpus.vocab) == 65
    assert len(corpus.roles) > 100
    assert "First Citizen" in corpus.roles and "GLOUCESTER" in corpus.roles
    assert all(name.upper() == name or name[0].isupper() for name in corpus.roles)
