from __future__ import annotations

import os

import numpy as np
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from shoal.crypto import prg
from shoal.errors import ConfigError


def test_deterministic_and_seed_dependent() -> None:
    seed = os.urandom(32)
    a = prg.expand(seed, 1000)
    assert np.array_equal(a, prg.expand(seed, 1000))
    assert not np.array_equal(a, prg.expand(os.urandom(32), 1000))
    assert not np.array_equal(a, prg.expand(seed, 1000, nonce=b"\x01" * 16))
    # a prefix is stable: masks of different lengths from one seed agree where they overlap
    assert np.array_equal(prg.expand(seed, 10), a[:10])


def test_matches_aes_ctr_reference_across_chunks() -> None:
    seed = os.urandom(32)
    n = (1 << 20) + 12345  # crosses the internal 1 MiB chunk boundary
    # AES-128 keyed by the seed's first half, counting up from its second half
    reference = Cipher(algorithms.AES(seed[:16]), modes.CTR(seed[16:])).encryptor().update(bytes(n))
    assert prg.keystream(seed, n).tobytes() == reference
    words = prg.expand(seed, 1000, dtype=np.uint64)
    assert words.dtype == np.uint64
    assert words.tobytes() == reference[:8000]
    nonce = os.urandom(16)
    start = bytes(a ^ b for a, b in zip(seed[16:], nonce))
    shifted = Cipher(algorithms.AES(seed[:16]), modes.CTR(start)).encryptor().update(bytes(64))
    assert prg.keystream(seed, 64, nonce=nonce).tobytes() == shifted


def test_bytes_and_words_look_uniform() -> None:
    seed = os.urandom(32)
    data = prg.keystream(seed, 1 << 20)
    assert chisquare(np.bincount(data, minlength=256)).pvalue > 1e-6
    words = prg.expand(seed, 1 << 18, dtype=np.uint32)
    assert chisquare(np.bincount(words >> 24, minlength=256)).pvalue > 1e-6  # top byte
    assert chisquare(np.bincount(words & 0xF, minlength=16)).pvalue > 1e-6  # low bits
    # the test has power: a biased stream is rejected
    biased = np.minimum(data, 250)
    assert chisquare(np.bincount(biased, minlength=256)).pvalue < 1e-6


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3000), st.sampled_from([np.uint32, np.uint64]))
def test_masks_cancel_with_wraparound(length: int, dtype: type) -> None:
    seeds = [os.urandom(32) for _ in range(3)]
    x = prg.expand(os.urandom(32), length, dtype=dtype).copy()
    acc = x.copy()
    prg.add_masks(acc, [(seeds[0], 1), (seeds[1], -1), (seeds[2], 1)])
    assert not np.array_equal(acc, x)
    prg.add_mask(acc, seeds[2], sign=-1)
    prg.add_masks(acc, [(seeds[1], 1), (seeds[0], -1)])
    assert np.array_equal(acc, x)


def test_add_masks_equals_explicit_sum() -> None:
    seeds = [os.urandom(32) for _ in range(4)]
    acc = np.zeros(500, dtype=np.uint32)
    prg.add_masks(acc, [(s, 1 if i % 2 else -1) for i, s in enumerate(seeds)])
    expected = np.zeros(500, dtype=np.uint64)
    for i, s in enumerate(seeds):
        m = prg.expand(s, 500).astype(np.uint64)
        expected = expected + m if i % 2 else expected - m
    assert np.array_equal(acc, (expected % (1 << 32)).astype(np.uint32))


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        prg.expand(b"short", 10)
    with pytest.raises(ConfigError):
        prg.expand(os.urandom(32), 10, nonce=b"x")
    with pytest.raises(ConfigError):
        prg.expand(os.urandom(32), 10, dtype=np.int32)
    with pytest.raises(ConfigError):
        prg.expand(os.urandom(32), -1)
    with pytest.raises(ConfigError):
        prg.add_mask(np.zeros(3, dtype=np.float64), os.urandom(32))
    with pytest.raises(ConfigError):
        prg.add_mask(np.zeros(3, dtype=np.uint32), os.urandom(32), sign=2)
    with pytest.raises(ConfigError):
        prg.keystream(os.urandom(32), 100, out=np.empty(100, dtype=np.uint8))
