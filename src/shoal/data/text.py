"""Next-character prediction data from a play's text, partitioned naturally by speaking role.

Each role is one party: its speeches, concatenated, become windows of ``seq_len`` character ids
whose label is the next character. The corpus file is optional; shoal runs without it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from shoal.data.dataset import Dataset
from shoal.errors import DataError

__all__ = ["CharCorpus", "load_shakespeare", "parse_speeches"]

CORPUS_FILE = "tinyshakespeare.txt"
DATA_DIR_ENV = "SHOAL_DATA_DIR"

# A speaker line: a capitalised name of words, ending in a colon ("First Citizen:",
# "KING RICHARD III:"), standing after a blank line or at the start of the file.
_ROLE = re.compile(r"[A-Z][A-Za-z'.,&\- ]{0,48}:")


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


def parse_speeches(text: str) -> dict[str, str]:
    """Map each speaking role to its lines, in order of first appearance.

    A speech starts with a line ``ROLE:`` after a blank line (or at the top) and runs until
    the next blank line; each of its lines keeps its trailing newline.
    """
    out: dict[str, list[str]] = {}
    role: str | None = None
    after_blank = True
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped:
            after_blank = True
            role = None
            continue
        if after_blank and _ROLE.fullmatch(stripped):
            role = stripped[:-1].strip()
            out.setdefault(role, [])
        elif role is not None:
            out[role].append(line + "\n")
        after_blank = False
    return {r: "".join(lines) for r, lines in out.items() if lines}


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
    if p.is_dir():
        p = p / CORPUS_FILE
    if not p.is_file():
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
