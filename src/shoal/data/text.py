"""Next-token prediction data from a play's text, partitioned naturally by speaking role.

Each role is one party: its speeches, concatenated, become windows of ``seq_len`` token ids
(characters or words) whose label is the next token. :func:`load_play` is the LEAF-style
split (every role with enough lines is a node; each role's first lines train, its last ones
test); :func:`load_shakespeare` the plain all-windows corpus. No corpus file ships with shoal.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from shoal.data.dataset import Dataset
from shoal.data.files import is_file
from shoal.errors import DataError

__all__ = [
    "PAD",
    "TOKENS",
    "UNK",
    "CharCorpus",
    "RoleCorpus",
    "load_play",
    "load_shakespeare",
    "parse_speeches",
    "role_corpus",
    "speech_list",
    "split_roles",
    "tokenize",
]

CORPUS_FILE = "tinyshakespeare.txt"
DATA_DIR_ENV = "SHOAL_DATA_DIR"

# A speaker line: a capitalised name of words, ending in a colon ("First Citizen:",
# "KING RICHARD III:"), standing after a blank line or at the start of the file.
_ROLE = re.compile(r"[A-Z][A-Za-z'.,&\- ]{0,48}:")

PAD = "<pad>"  # id 0: fills the context before a role's first token
UNK = "<unk>"  # id 1: a token the training split never saw (or outside the vocabulary size)
TOKENS = ("char", "word")
# Words (with inner apostrophes: "know't", "o'er"), each newline, and each other
# non-space character (punctuation) are tokens; words are lower-cased.
_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)*|\n|[^\sA-Za-z]")


@dataclass(frozen=True, eq=False, kw_only=True)
class CharCorpus:
    """Per-role next-character data sets and the character vocabulary they index into."""

    roles: Mapping[str, Dataset]
    vocab: str

    def encode(self, text: str) -> npt.NDArray[np.int64]:
        """Character ids of ``text``; a character outside the vocabulary is a DataError."""
        index = {c: i for i, c in enumerate(self.vocab)}
        try:
            return np.array([index[c] for c in text], dtype=np.int64)
        except KeyError as exc:
            raise DataError(f"character {exc.args[0]!r} is not in the corpus vocabulary") from None

    def decode(self, ids: npt.ArrayLike) -> str:
        """The text whose character ids are ``ids``."""
        arr = np.asarray(ids).ravel()
        if arr.size and (arr.min() < 0 or arr.max() >= len(self.vocab)):
            raise DataError(f"character ids must lie in 0..{len(self.vocab) - 1}")
        return "".join(self.vocab[int(i)] for i in arr)


def speech_list(text: str) -> list[tuple[str, str]]:
    """Every speech of a play, in order: ``(role, its lines)``.

    A speech starts with a line ``ROLE:`` after a blank line (or at the top) and runs until
    the next blank line; each of its lines keeps its trailing newline.
    """
    out: list[tuple[str, list[str]]] = []
    after_blank = True
    current: list[str] | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            after_blank = True
            current = None
            continue
        if after_blank and _ROLE.fullmatch(stripped):
            current = []
            out.append((stripped[:-1].strip(), current))
        elif current is not None:
            current.append(line + "\n")
        after_blank = False
    return [(role, "".join(lines)) for role, lines in out if lines]


def parse_speeches(text: str) -> dict[str, str]:
    """Map each speaking role to its lines, in order of first appearance (the role's
    speeches of :func:`speech_list`, concatenated)."""
    out: dict[str, list[str]] = {}
    for role, body in speech_list(text):
        out.setdefault(role, []).append(body)
    return {r: "".join(parts) for r, parts in out.items()}


def split_roles(text: str, parties: int) -> dict[str, str]:
    """Split a play's speeches into ``parties`` parties, each one stretch of consecutive
    speeches of one role (named ``"ROLE/i"``): every role gets at least one party, and the
    rest go to the roles with the most speeches per party so far, so stretches are about
    equally long. For more parties than a play has distinct speaker names (tinyshakespeare:
    299 names, 7,097 speeches, plays not marked)."""
    import heapq

    parties = _check_int("parties", parties, 1)
    speeches = speech_list(text)
    by_role: dict[str, list[str]] = {}
    for role, body in speeches:
        by_role.setdefault(role, []).append(body)
    if not (len(by_role) <= parties <= len(speeches)):
        raise DataError(
            f"the text has {len(by_role)} roles and {len(speeches)} speeches; split_roles "
            f"makes between those many parties, not {parties}"
        )
    alloc = dict.fromkeys(by_role, 1)
    # Max-heap on speeches per party: split the role whose stretches are longest.
    heap: list[tuple[float, str]] = [(-float(len(b)), role) for role, b in by_role.items()]
    heapq.heapify(heap)
    for _ in range(parties - len(by_role)):
        _, role = heapq.heappop(heap)
        alloc[role] += 1
        heapq.heappush(heap, (-len(by_role[role]) / alloc[role], role))
    out: dict[str, str] = {}
    for role, bodies in by_role.items():
        for i, part in enumerate(np.array_split(np.arange(len(bodies)), alloc[role])):
            out[f"{role}/{i + 1}"] = "".join(bodies[j] for j in part)
    return out


def _corpus_path(path: str | os.PathLike[str] | None) -> Path:
    if path is None:
        folder = os.environ.get(DATA_DIR_ENV)
        if not folder:
            raise DataError(
                f"load_shakespeare needs the {CORPUS_FILE} corpus: pass path=... or set "
                f"{DATA_DIR_ENV} to the folder that holds it (in the shoal workspace it is "
                f"../shared/data/{CORPUS_FILE})"
            )
        candidate = Path(folder) / CORPUS_FILE
        if not candidate.is_file():
            raise DataError(
                f"{DATA_DIR_ENV}={folder!r} but {str(candidate)!r} does not exist; put "
                f"{CORPUS_FILE} in that folder or pass path=..."
            )
        return candidate
    p = Path(path)
    if not is_file(p, "corpus file") and p.is_dir():
        p = p / CORPUS_FILE
    if not is_file(p, "corpus file"):
        raise DataError(
            f"corpus file {str(p)!r} does not exist; put {CORPUS_FILE} there, pass its path, "
            f"or set {DATA_DIR_ENV} to its folder"
        )
    return p


def load_shakespeare(
    path: str | os.PathLike[str] | None = None,
    *,
    seq_len: int = 80,
    min_samples: int = 1,
) -> CharCorpus:
    """Read a tinyshakespeare-style play text and return one Dataset per speaking role.

    ``path`` is the text file (or its folder); without it the file is looked up in the folder
    named by the ``SHOAL_DATA_DIR`` environment variable. Each sample's ``x`` is ``seq_len``
    int64 character ids and ``y`` the id of the character that follows. Roles with fewer than
    ``min_samples`` windows are left out.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise DataError(f"seq_len must be a positive integer, got {seq_len!r}")
    if isinstance(min_samples, bool) or not isinstance(min_samples, int) or min_samples < 1:
        raise DataError(f"min_samples must be a positive integer, got {min_samples!r}")
    p = _corpus_path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"corpus file {str(p)!r} is not UTF-8 text ({exc})") from exc
    speeches = parse_speeches(text)
    if not speeches:
        raise DataError(
            f"corpus file {str(p)!r} has no speeches: expected lines like 'ROLE:' after a "
            "blank line, each followed by the role's lines"
        )
    vocab = "".join(sorted(set("".join(speeches.values()))))
    lookup = np.zeros(max(map(ord, vocab)) + 1, dtype=np.int64)
    lookup[[ord(c) for c in vocab]] = np.arange(len(vocab))
    roles: dict[str, Dataset] = {}
    for role, body in speeches.items():
        if len(body) - seq_len < min_samples:
            continue
        codes = np.frombuffer(body.encode("utf-32-le"), dtype=np.uint32)
        ids = lookup[codes]
        # Windows are strided views of the role's text, so memory stays one id per character
        # however long seq_len is; taking a node subset copies only the rows it needs.
        windows = np.lib.stride_tricks.sliding_window_view(ids, seq_len + 1)
        roles[role] = Dataset(
            x=windows[:, :seq_len],
            y=windows[:, seq_len].copy(),
            classes=len(vocab),
            name=f"shakespeare/{role}",
        )
    if not roles:
        raise DataError(
            f"no role in {str(p)!r} has {seq_len + min_samples} characters of speech; "
            "use a smaller seq_len"
        )
    return CharCorpus(roles=roles, vocab=vocab)


# ----------------------------------------------------------------- LEAF-style role split


def tokenize(text: str, tokens: str = "char") -> list[str]:
    """``text`` as tokens: its characters, or lower-cased words, newlines and punctuation."""
    if tokens == "char":
        return list(text)
    if tokens == "word":
        return [t.lower() for t in _WORD.findall(text)]
    raise DataError(f"tokens must be one of {TOKENS}, got {tokens!r}")


@dataclass(frozen=True, eq=False, kw_only=True)
class RoleCorpus:
    """Per-role training and test windows of a play, and the vocabulary they index into.

    ``train[role]`` and ``test[role]`` are Datasets whose ``x`` rows are ``seq_len`` token ids
    and whose ``y`` is the id of the token that follows; ``vocab[0]`` is :data:`PAD`,
    ``vocab[1]`` :data:`UNK`. Both mappings have the same roles, in the same order.
    """

    train: Mapping[str, Dataset]
    test: Mapping[str, Dataset]
    vocab: tuple[str, ...]
    tokens: str
    seq_len: int

    @property
    def roles(self) -> list[str]:
        return list(self.train)

    def encode(self, text: str) -> npt.NDArray[np.int64]:
        """Token ids of ``text`` (unknown tokens become the id of :data:`UNK`)."""
        index = {t: i for i, t in enumerate(self.vocab)}
        return np.array([index.get(t, 1) for t in tokenize(text, self.tokens)], dtype=np.int64)

    def decode(self, ids: npt.ArrayLike) -> str:
        """The text of token ids ``ids`` (words joined by spaces)."""
        arr = np.asarray(ids).ravel()
        if arr.size and (arr.min() < 0 or arr.max() >= len(self.vocab)):
            raise DataError(f"token ids must lie in 0..{len(self.vocab) - 1}")
        sep = "" if self.tokens == "char" else " "
        return sep.join(self.vocab[int(i)] for i in arr)

    def pooled(self) -> tuple[Dataset, Dataset]:
        """(every role's training windows, every role's test windows): the centralized split."""
        return _pool(self.train, "train"), _pool(self.test, "test")


def _pool(parts: Mapping[str, Dataset], name: str) -> Dataset:
    first = next(iter(parts.values()))
    return Dataset(
        x=np.concatenate([d.x for d in parts.values()]),
        y=np.concatenate([d.y for d in parts.values()]),
        classes=first.classes,
        name=f"{first.name.rsplit('/', 1)[0]}/{name}",
    )


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def role_corpus(
    text: str,
    *,
    tokens: str = "char",
    seq_len: int = 80,
    min_lines: int = 2,
    test_fraction: float = 0.2,
    vocab_size: int | None = None,
    max_roles: int | None = None,
    source: str = "play",
) -> RoleCorpus:
    """Split a play-formatted ``text`` LEAF-style: one node per role with ``min_lines`` lines.

    Each role's tokens, in order, are split in time: the first ``1 - test_fraction`` of them
    are its training targets, the rest its test targets (at least one of each). A target's
    window is the ``seq_len`` tokens before it, padded with :data:`PAD` at the role's start,
    so short roles keep every line. The vocabulary is built from the training split only:
    every character seen there, or the ``vocab_size - 2`` most frequent training words (ties
    alphabetical); anything else is :data:`UNK`. ``max_roles`` keeps the roles with the most
    tokens (ties by name). Ids are uint8 when the vocabulary fits, else int32.
    """
    if tokens not in TOKENS:
        raise DataError(f"tokens must be one of {TOKENS}, got {tokens!r}")
    seq_len = _check_int("seq_len", seq_len, 1)
    min_lines = _check_int("min_lines", min_lines, 1)
    if max_roles is not None:
        max_roles = _check_int("max_roles", max_roles, 1)
    if vocab_size is not None:
        vocab_size = _check_int("vocab_size", vocab_size, 3)
    if isinstance(test_fraction, bool) or not 0.0 < float(test_fraction) < 1.0:
        raise DataError(f"test_fraction must be strictly between 0 and 1, got {test_fraction!r}")
    speeches = parse_speeches(text)
    if not speeches:
        raise DataError(
            f"{source} has no speaker lines: a play's text needs speeches that start with a "
            "line 'ROLE:' (a capitalised name and a colon, after a blank line or at the top), "
            "followed by the role's lines"
        )
    kept = {r: body for r, body in speeches.items() if body.count("\n") >= min_lines}
    if not kept:
        most = max(body.count("\n") for body in speeches.values())
        raise DataError(
            f"{source}: no role has {min_lines} lines (the most any of its {len(speeches)} "
            f"roles has is {most}); lower min_lines"
        )
    streams = {r: tokenize(body, tokens) for r, body in kept.items()}
    streams = {r: s for r, s in streams.items() if len(s) >= 2}
    if max_roles is not None:
        ranked = sorted(streams, key=lambda r: (-len(streams[r]), r))[:max_roles]
        streams = {r: streams[r] for r in streams if r in set(ranked)}
    cut = {
        r: min(len(s) - 1, max(1, round(len(s) * (1 - test_fraction)))) for r, s in streams.items()
    }
    counts = Counter(t for r, s in streams.items() for t in s[: cut[r]])
    if tokens == "char":
        words: Sequence[str] = sorted(counts)
    else:
        ranked_words = sorted(counts, key=lambda t: (-counts[t], t))
        words = ranked_words if vocab_size is None else ranked_words[: vocab_size - 2]
    vocab = (PAD, UNK, *words)
    index = {t: i for i, t in enumerate(vocab)}
    dtype = np.uint8 if len(vocab) <= 256 else np.int32
    train: dict[str, Dataset] = {}
    test: dict[str, Dataset] = {}
    for role, stream in streams.items():
        ids = np.zeros(seq_len + len(stream), dtype=dtype)
        ids[seq_len:] = [index.get(t, 1) for t in stream]
        # Strided views: memory stays one id per token however long seq_len is.
        windows = np.lib.stride_tricks.sliding_window_view(ids, seq_len + 1)
        labels = windows[:, seq_len].astype(np.int64)
        for out, rows in ((train, slice(0, cut[role])), (test, slice(cut[role], None))):
            out[role] = Dataset(
                x=windows[rows, :seq_len],
                y=labels[rows],
                classes=len(vocab),
                name=f"{source}/{role}",
            )
    return RoleCorpus(train=train, test=test, vocab=vocab, tokens=tokens, seq_len=seq_len)


def load_play(
    path: str | os.PathLike[str],
    *,
    tokens: str = "char",
    seq_len: int = 80,
    min_lines: int = 2,
    test_fraction: float = 0.2,
    vocab_size: int | None = None,
    max_roles: int | None = None,
) -> RoleCorpus:
    """:func:`role_corpus` of the play-formatted UTF-8 text file at ``path``."""
    p = Path(path)
    if not is_file(p, "play text file"):
        raise DataError(f"play text file {str(p)!r} does not exist; pass the path of a text file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"play text file {str(p)!r} is not UTF-8 text ({exc})") from exc
    return role_corpus(
        text,
        tokens=tokens,
        seq_len=seq_len,
        min_lines=min_lines,
        test_fraction=test_fraction,
        vocab_size=vocab_size,
        max_roles=max_roles,
        source=p.stem,
    )
