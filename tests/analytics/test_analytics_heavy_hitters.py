"""Federated heavy hitters on the Shakespeare corpus split into 1,000 role stretches
(split_roles; skipped when the corpus file is absent: the library never needs it)."""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import pytest

from shoal.analytics import AnalyticsConfig, Party, query
from shoal.analytics.simulate import federation
from shoal.data.text import split_roles


def _corpus() -> Path | None:
    here = Path(__file__).resolve()
    for base in (
        os.environ.get("SHOAL_DATA_DIR"),
        here.parents[3] / "shared/data",
        "/work/shared/data",
    ):
        if base and (Path(base) / "tinyshakespeare.txt").exists():
            return Path(base) / "tinyshakespeare.txt"
    return None


CORPUS = _corpus()
pytestmark = pytest.mark.skipif(CORPUS is None, reason="tinyshakespeare.txt not available")


def _roles(root: Path, count: int) -> tuple[list[Party], Counter[str]]:
    assert CORPUS is not None
    speeches = list(split_roles(CORPUS.read_text(), 1000).values())[:count]
    parties, roles_per_word = [], Counter()
    for i, text in enumerate(speeches):
        words = sorted(set(re.findall(r"[a-z']+", text.lower())))
        roles_per_word.update(words)
        path = root / f"role{i}.csv"
        # Quoted: words such as 'tis must not make the CSV sniffer take ' as the quote.
        path.write_text("role,word\n" + "".join(f'{i},"{w}"\n' for w in words))
        parties.append(Party(name=f"role{i}", path=str(path)))
    return parties, roles_per_word


def test_exact_top_words_across_roles(tmp_path: Path) -> None:
    parties, truth = _roles(tmp_path, 8)
    # Every key of at most 8 bytes is found (exact counts need no threshold; count-min
    # never under-counts, and the exact aggregate round drops collisions' false keys).
    truth = Counter({w: n for w, n in truth.items() if len(w.encode()) <= 8})
    config = AnalyticsConfig(
        table="words", parties=tuple(parties), max_groups=2000, max_key_bytes=8
    )
    sql = "SELECT word, COUNT(*) AS roles FROM words GROUP BY word ORDER BY roles DESC LIMIT 10"
    result = query(federation(config), sql, config=config)
    got = [(w, n) for w, n in result.rows]
    # Ties at the cut may order differently: compare counts, and the words above the cut.
    want = truth.most_common()
    assert [n for _, n in got] == [n for _, n in want[:10]]
    cut = want[9][1]
    assert {w for w, n in got if n > cut} == {w for w, n in want[:10] if n > cut}
