"""Federated heavy hitters through secure-summed Count-Min sketches: the sketch's algebra,
the per-level charge at each party, an end-to-end top-k with a known answer, bad input."""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.analytics import (
    KEYS_TASK,
    AnalyticsConfig,
    Database,
    Party,
    Privacy,
    analytics_tasks,
    heavy_hitters,
    query,
)
from shoal.analytics.simulate import federation
from shoal.analytics.sketch import SketchShape, decode, estimate, sketch, token_prints
from shoal.analytics.tasks import LEDGER_STATE, sketch_noise_scale
from shoal.errors import NotEnoughNodes, QueryError

KEYS = st.dictionaries(st.binary(max_size=5), st.integers(1, 6), max_size=40)


@settings(max_examples=60, deadline=None)
@given(a=KEYS, b=KEYS, seed=st.integers(0, 2**63 - 1))
def test_merged_sketches_are_the_sketch_of_the_union(
    a: dict[bytes, int], b: dict[bytes, int], seed: int
) -> None:
    shape = SketchShape(levels=5, depth=3, width=16, seed=seed)
    union = Counter(a) + Counter(b)
    np.testing.assert_array_equal(sketch(a, shape) + sketch(b, shape), sketch(union, shape))


@settings(max_examples=60, deadline=None)
@given(keys=KEYS, seed=st.integers(0, 2**63 - 1), width=st.sampled_from([16, 64]))
def test_count_min_never_under_counts_before_noise(
    keys: dict[bytes, int], seed: int, width: int
) -> None:
    shape = SketchShape(levels=5, depth=2, width=width, seed=seed)
    r, _, _ = shape.hashes()
    table = sketch(keys, shape)
    truth: Counter[tuple[int, int]] = Counter()
    for raw, n in keys.items():
        for level, f in enumerate(token_prints(raw, r, shape.levels)):
            truth[(level, f)] += n
    for (level, f), n in truth.items():
        assert estimate(table, shape, level, np.array([f]))[0] >= n


@settings(max_examples=40, deadline=None)
@given(keys=KEYS, seed=st.integers(0, 2**63 - 1))
def test_decoding_an_exact_sketch_finds_every_key(keys: dict[bytes, int], seed: int) -> None:
    # Without noise every key of at most levels - 1 bytes is found, with at least its count
    # (a width well above the tokens per level, so few absent prefixes collide in all rows).
    shape = SketchShape(levels=5, depth=3, width=1 << 12, seed=seed)
    found, overflowed = decode(sketch(keys, shape), shape, noise_scale=0.0, max_keys=10**4)
    got = {raw: est for est, raw in found}
    assert not overflowed
    for raw, n in keys.items():
        if len(raw) < shape.levels:
            assert got[raw] >= n


def _write(root: Path, parties: list[list[str]]) -> AnalyticsConfig:
    out = []
    uid = 0
    for i, words in enumerate(parties):
        path = root / f"p{i}.csv"
        lines = ["user,word,age"]
        for w in words:
            lines.append(f"{uid},{w},{uid % 90}")
            uid += 1
        path.write_text("\n".join(lines) + "\n")
        out.append(Party(name=f"p{i}", path=str(path)))
    return AnalyticsConfig(
        table="words",
        privacy_unit="user",
        max_contributions=1,
        parties=tuple(out),
        max_key_bytes=4,
        max_groups=64,
        bounds={"age": [0, 100]},
    )


TOP = {"the": 400, "and": 300, "love": 200, "king": 150, "o": 100}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> AnalyticsConfig:
    """Five parties; every user types one word: the top five are known, and 200 words are
    typed once each."""
    rng = np.random.default_rng(7)
    words = [w for w, n in TOP.items() for _ in range(n)] + [f"r{i:03d}" for i in range(200)]
    words = list(rng.permutation(words))
    return _write(tmp_path_factory.mktemp("hh"), [words[i::5] for i in range(5)])


def test_dp_heavy_hitters_find_the_known_top_k(corpus: AnalyticsConfig) -> None:
    result = heavy_hitters(
        federation(corpus), "word", k=5, config=corpus, privacy=Privacy(epsilon=4.0)
    )
    # The gaps between the counts are far above the noise.
    assert [r[0] for r in result.rows] == list(TOP), result.rows
    for (_, n), want in zip(result.rows, TOP.values()):
        assert abs(n - want) < 15, result.rows
    assert result.epsilon == 4.0 and result.errors is not None
    # Every top word is released; a word typed once has too small a count to pass the
    # threshold (a candidate released by noise or collisions shows its own count, near 0).
    wide = heavy_hitters(
        federation(corpus), "word", k=50, config=corpus, privacy=Privacy(epsilon=4.0)
    )
    released = dict(wide.rows)
    assert set(TOP) <= set(released), wide.rows
    assert all(abs(n) < 15 for w, n in released.items() if w not in TOP), wide.rows


def test_exact_heavy_hitters_count_every_word(corpus: AnalyticsConfig) -> None:
    config = dataclasses.replace(corpus, max_groups=300)
    result = heavy_hitters(federation(config), "word", k=6, config=config)
    assert result.rows[:5] == tuple(TOP.items())
    assert result.rows[5][1] == 1


def test_each_party_charges_every_level_of_the_tree(corpus: AnalyticsConfig) -> None:
    task = analytics_tasks()[KEYS_TASK]
    ctx = SimpleNamespace(
        data=Database(corpus.parties[0].path, table="words"), state={}, task_id="t1"
    )
    payload = {
        "sql": "SELECT word, COUNT(*) FROM words GROUP BY word",
        "config": corpus.to_json(),
        "seed": 12345,
        "privacy": {"epsilon": 2.0, "mode": "distributed", "shares": 5},
    }
    out = task(ctx, payload)
    levels = corpus.max_key_bytes + 1
    assert out["stats"].size == levels * corpus.sketch_depth * corpus.sketch_columns
    (entry,) = ctx.state[LEDGER_STATE].entries
    # One Laplace step per level, each of epsilon / levels (scale m * depth / eps_level).
    assert entry.mechanism == "laplace" and entry.steps == levels
    assert entry.noise_multiplier == pytest.approx(levels / 2.0)
    scale = sketch_noise_scale(corpus, 2.0)
    assert scale == pytest.approx(corpus.max_contributions * corpus.sketch_depth * levels / 2.0)
    # Composed, the levels spend the request's epsilon (pure DP, read through RDP at delta).
    assert 2.0 <= ctx.state[LEDGER_STATE].epsilon(1e-6) < 2.2


def test_too_small_an_epsilon_releases_nothing_and_says_why(corpus: AnalyticsConfig) -> None:
    result = heavy_hitters(
        federation(corpus), "word", k=5, config=corpus, privacy=Privacy(epsilon=0.05)
    )
    assert result.rows == () and result.errors == (), (result.rows, result.notes)
    assert result.epsilon == pytest.approx(0.025)  # only key selection was spent
    (why,) = [n for n in result.notes if n.startswith("no key was released")]
    assert "raise epsilon" in why


def test_bad_heavy_hitter_requests(corpus: AnalyticsConfig, tmp_path: Path) -> None:
    fed = federation(corpus)
    for k in (0, -3, 2.5, True):
        with pytest.raises(QueryError, match="k >= 1"):
            heavy_hitters(fed, "word", k=k, config=corpus)  # type: ignore[arg-type]
    with pytest.raises(QueryError, match="positive integer"):
        query(fed, "SELECT word, COUNT(*) AS n FROM words GROUP BY word LIMIT 0", config=corpus)
    with pytest.raises(QueryError, match="column name"):
        heavy_hitters(fed, "word; DROP", k=3, config=corpus)
    # A numeric column: refused by the coordinator when it has bounds ...
    with pytest.raises(QueryError, match="numeric bounds"):
        heavy_hitters(fed, "age", k=3, config=corpus)
    # ... and by every party when it has none (the parties see the numbers).
    with pytest.raises(NotEnoughNodes, match="holds numbers"):
        heavy_hitters(fed, "user", k=3, config=corpus, privacy=Privacy(epsilon=1.0))


def test_sketch_layout_is_bounded() -> None:
    from shoal.errors import ConfigError

    assert AnalyticsConfig(table="t", max_groups=1000).sketch_columns == 16384
    assert AnalyticsConfig(table="t", max_groups=20_000).sketch_columns == 1 << 16
    with pytest.raises(ConfigError, match="max_groups is at most"):
        AnalyticsConfig(table="t", max_groups=10**6)
    with pytest.raises(ConfigError, match="cells"):
        AnalyticsConfig(table="t", max_key_bytes=200, sketch_width=1 << 16)
    with pytest.raises(ConfigError, match="sketch_width"):
        AnalyticsConfig(table="t", sketch_width=3)
    assert math.isfinite(sketch_noise_scale(AnalyticsConfig(table="t"), 1.0))
