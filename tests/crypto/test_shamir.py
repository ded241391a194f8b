from __future__ import annotations

import itertools
import os
import secrets

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from shoal.crypto import shamir
from shoal.errors import ConfigError, ProtocolError


@st.composite
def sharing(draw: st.DrawFn) -> tuple[bytes, int, list[shamir.Share]]:
    secret = draw(st.binary(min_size=1, max_size=64))
    n = draw(st.integers(1, 9))
    t = draw(st.integers(1, n))
    xs = draw(st.lists(st.integers(1, 10**6), min_size=n, max_size=n, unique=True))
    return secret, t, shamir.split(secret, threshold=t, xs=xs)


@settings(max_examples=60, deadline=None)
@given(sharing(), st.randoms(use_true_random=False))
def test_any_t_shares_reconstruct(case: tuple[bytes, int, list[shamir.Share]], rnd) -> None:
    secret, t, shares = case
    subset = rnd.sample(shares, t)
    assert shamir.combine(subset, threshold=t, length=len(secret)) == secret


def test_every_t_subset_reconstructs() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, threshold=3, xs=[1, 2, 3, 4, 5])
    for subset in itertools.combinations(shares, 3):
        assert shamir.combine(list(subset), threshold=3, length=32) == secret
    # more shares than needed also work (the first t are used)
    assert shamir.combine(shares, threshold=3, length=32) == secret


@settings(max_examples=40, deadline=None)
@given(sharing())
def test_fewer_than_t_shares_refuse_and_interpolate_wrongly(
    case: tuple[bytes, int, list[shamir.Share]],
) -> None:
    secret, t, shares = case
    if t == 1:
        return
    with pytest.raises(ProtocolError):
        shamir.combine(shares[: t - 1], threshold=t, length=len(secret))
    # interpolating t-1 points gives a different polynomial: the first chunk is not recovered
    first = int.from_bytes(secret[: shamir.CHUNK_BYTES], "big")
    guess = shamir.interpolate_at_zero([(s.x, s.ys[0]) for s in shares[: t - 1]])
    assert guess != first  # fails only with probability 1/PRIME


@settings(max_examples=30, deadline=None)
@given(
    st.integers(2, 6),
    st.integers(0, shamir.PRIME - 1),
    st.integers(0, shamir.PRIME - 1),
)
def test_t_minus_1_shares_are_consistent_with_any_secret(t: int, secret: int, other: int) -> None:
    xs = list(range(1, t + 1))
    ys = shamir.split_int(secret, threshold=t, xs=xs)
    known = list(zip(xs[:-1], ys[:-1]))
    # For the other secret there is a degree t-1 polynomial through the same t-1 shares;
    # its value at the last point completes a valid sharing of `other`.
    w = shamir.lagrange_weights(xs)
    partial = sum(wi * y for wi, (_, y) in zip(w, known)) % shamir.PRIME
    missing = (other - partial) * pow(w[-1], -1, shamir.PRIME) % shamir.PRIME
    assert shamir.interpolate_at_zero([*known, (xs[-1], missing)]) == other


def test_t_minus_1_shares_are_distributed_independently_of_the_secret() -> None:
    # In a small field the joint law of t-1 shares must be uniform whatever the secret.
    p, t, runs = 11, 3, 6000
    for secret in (0, 7):
        counts = np.zeros((p, p))
        for _ in range(runs):
            y1, y2, _ = shamir.split_int(secret, threshold=t, xs=[1, 2, 3], prime=p)
            counts[y1, y2] += 1
        assert chisquare(counts.ravel()).pvalue > 1e-6
        # while all t shares pin the secret down: only p**(t-1) of the p**t triples occur


def test_share_bytes_round_trip_and_malformed() -> None:
    share = shamir.split(b"k" * 32, threshold=2, xs=[5, 9])[1]
    assert shamir.Share.from_bytes(9, share.to_bytes()) == share
    with pytest.raises(ProtocolError):
        shamir.Share.from_bytes(9, share.to_bytes()[:-1])
    with pytest.raises(ProtocolError):
        shamir.Share.from_bytes(9, b"")
    with pytest.raises(ProtocolError):
        shamir.Share.from_bytes(9, b"\xff" * 16)  # >= PRIME
    with pytest.raises(ProtocolError):
        shamir.Share.from_bytes(0, share.to_bytes())


def test_corrupted_share_is_detected() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, threshold=3, xs=[1, 2, 3])
    # a share replaced by random field elements (the chance it still decodes is ~2**-111)
    bad = shamir.Share(
        x=shares[0].x, ys=tuple(secrets.randbelow(shamir.PRIME) for _ in shares[0].ys)
    )
    with pytest.raises(ProtocolError, match="inconsistent"):
        shamir.combine([bad, *shares[1:]], threshold=3, length=32)


def test_bad_arguments() -> None:
    with pytest.raises(ConfigError):
        shamir.split(b"s", threshold=0, xs=[1])
    with pytest.raises(ConfigError):
        shamir.split(b"s", threshold=3, xs=[1, 2])
    with pytest.raises(ConfigError):
        shamir.split(b"s", threshold=2, xs=[1, 1])
    with pytest.raises(ConfigError):
        shamir.split(b"s", threshold=1, xs=[0])
    with pytest.raises(ConfigError):
        shamir.split(b"", threshold=1, xs=[1])
    with pytest.raises(ConfigError):
        shamir.split_int(shamir.PRIME, threshold=1, xs=[1])
    shares = shamir.split(b"abc", threshold=2, xs=[1, 2])
    with pytest.raises(ProtocolError):
        shamir.combine([shares[0], shares[0]], threshold=2, length=3)
    with pytest.raises(ProtocolError):
        shamir.combine(shares, threshold=2, length=40)  # wrong chunk count


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 2**130), st.integers(0, 50))
def test_random_below_stays_in_range(bound: int, count: int) -> None:
    values = shamir.random_below(bound, count)
    assert len(values) == count
    assert all(0 <= v < bound for v in values)


def test_random_below_is_uniform() -> None:
    # bound 5 rejects 3 of every 8 draws: the survivors must still be uniform
    counts = np.bincount(shamir.random_below(5, 20_000), minlength=5)
    assert chisquare(counts).pvalue > 1e-4


@pytest.mark.parametrize("xs", [list(range(1, 41)), [shamir.PRIME - k for k in range(1, 41)]])
def test_small_and_wide_points_rebuild(xs: list[int]) -> None:
    # 40 points near the prime take the reduce-every-factor path, small ones the exact one
    secret = os.urandom(32)
    shares = shamir.split(secret, threshold=40, xs=xs)
    assert shamir.combine(shares[::-1], threshold=40, length=32) == secret


def test_points_equal_modulo_the_prime_are_refused() -> None:
    with pytest.raises(ProtocolError, match="repeated"):
        shamir.lagrange_weights([3, 3 + shamir.PRIME])
