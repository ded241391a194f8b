"""Decryption of values known to be short: the half CRT and the checked batch.

Every answer must be the full decryption's, whether or not the caller's bound holds; the
spies show which path produced it, so a test cannot pass by always taking the slow one.
"""

from __future__ import annotations

import gmpy2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.crypto import paillier as P
from shoal.crypto.paillier import bounded
from shoal.errors import ConfigError, PlaintextOverflow, ProtocolError

BITS = 512  # bits/4 = 128: half decryption applies up to 128-bit bounds here


@pytest.fixture(scope="module")
def keys() -> tuple[P.PublicKey, P.PrivateKey]:
    return P.generate_keypair(BITS, insecure=True)


def full(sk: P.PrivateKey, c: object) -> int:
    """The reference: full CRT decryption read as signed (n/3 rule)."""
    return P.decode_ints([sk.raw_decrypt(c)], sk.public_key.n)[0]


class Spy:
    """Counts calls of one PrivateKey method: ``_join`` completes a full CRT (the half mod
    q); ``raw_decrypt_signed`` decrypts one ciphertext alone (the batch's check, or its
    one-by-one fallback)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.count = 0
        real = getattr(P.PrivateKey, name)

        def spy(*args: object) -> object:
            self.count += 1
            return real(*args)

        monkeypatch.setattr(P.PrivateKey, name, spy)


@settings(max_examples=60, deadline=None)
@given(
    bound_bits=st.integers(1, BITS // 4),
    delta=st.integers(-3, 3),
    sign=st.sampled_from([1, -1]),
)
def test_half_decryption_at_and_around_the_bound(keys, bound_bits, delta, sign) -> None:
    pk, sk = keys
    m = sign * ((1 << bound_bits) + delta)  # |m| = 2**B + delta: inside iff delta < 0
    c = pk.raw_encrypt(m % pk.n)
    assert full(sk, c) == m
    with pytest.MonkeyPatch.context() as mp:
        joins = Spy(mp, "_join")
        assert sk.raw_decrypt_signed(c, bound_bits) == m
        # inside the bound the half alone answered; on or past it the full CRT did
        assert joins.count == (0 if abs(m) < 1 << bound_bits else 1)


@settings(max_examples=60, deadline=None)
@given(m=st.integers(-(2**509), 2**509), bound_bits=st.integers(0, 200))
def test_half_decryption_equals_full_for_any_plaintext(keys, m, bound_bits) -> None:
    pk, sk = keys
    m = max(-(int(pk.n) // 3), min(int(pk.n) // 3, m))
    c = pk.raw_encrypt(m % pk.n)
    assert sk.raw_decrypt_signed(c, bound_bits) == m


def test_out_of_bound_plaintexts_get_the_full_answer(keys, monkeypatch) -> None:
    """Plaintexts past the bound (random ones, ones just past it, ones up to n/3) fall
    back to the full CRT, and a middle-third plaintext is an overflow as in decrypt()."""
    pk, sk = keys
    n = int(pk.n)
    rng = np.random.default_rng(1)
    big = [int.from_bytes(rng.bytes(60), "big") for _ in range(20)]
    cases = [1 << 40, -(1 << 40), (1 << 41) + 7, n // 3, -(n // 3)] + big + [-b for b in big]
    joins = Spy(monkeypatch, "_join")
    for m in cases:
        assert sk.raw_decrypt_signed(pk.raw_encrypt(m % n), 40) == m
    assert joins.count == len(cases)
    with pytest.raises(PlaintextOverflow):
        sk.raw_decrypt_signed(pk.raw_encrypt(n // 2), 40)


def test_bounds_past_a_quarter_of_the_key_take_the_full_crt(keys, monkeypatch) -> None:
    pk, sk = keys
    joins = Spy(monkeypatch, "_join")
    assert sk.raw_decrypt_signed(pk.raw_encrypt(5), BITS // 4 + 1) == 5
    assert joins.count == 1


def test_a_plaintext_made_knowing_p_is_the_documented_exception(keys) -> None:
    """The one way the half is wrong: m within the bound of a multiple of p (not of n).
    Making one takes p; the docs say so, and this pins what it returns (m mod p)."""
    pk, sk = keys
    m = int(sk.p) + 5
    assert full(sk, pk.raw_encrypt(m)) == m
    assert sk.raw_decrypt_signed(pk.raw_encrypt(m), 40) == 5


def test_bad_input(keys) -> None:
    pk, sk = keys
    with pytest.raises(ConfigError, match="bound_bits"):
        sk.raw_decrypt_signed(pk.raw_encrypt(1), -1)
    with pytest.raises(ConfigError, match="bound_bits"):
        P.raw_decrypt_bounded(sk, [pk.raw_encrypt(1)], -1)
    for bad in (0, pk.nsquare, pk.nsquare + 5, sk.p, sk.q * 7):
        with pytest.raises(ProtocolError):
            sk.raw_decrypt_signed(bad, 40)
        with pytest.raises(ProtocolError):  # batch path: refused before any packing
            P.raw_decrypt_bounded(sk, [pk.raw_encrypt(1)] * 9 + [bad], 40)
    other_pk, _ = P.generate_keypair(BITS, insecure=True)
    with pytest.raises(ConfigError, match="another public key"):
        P.decrypt_bounded(sk, P.encrypt(other_pk, [1.0]), bound_bits=40)


@settings(max_examples=25, deadline=None)
@given(
    bound_bits=st.integers(1, 100),
    data=st.data(),
)
def test_batch_of_values_within_the_bound_is_packed_and_exact(keys, bound_bits, data) -> None:
    pk, sk = keys
    top = (1 << bound_bits) - 1
    edge = st.sampled_from([top, -top, 0, 1, -1])
    ms = data.draw(st.lists(st.one_of(st.integers(-top, top), edge), min_size=8, max_size=40))
    cts = [pk.raw_encrypt(m % pk.n) for m in ms]
    with pytest.MonkeyPatch.context() as mp:
        calls = Spy(mp, "raw_decrypt_signed")
        assert P.raw_decrypt_bounded(sk, cts, bound_bits) == ms
        assert calls.count == 1  # packed: only the check ciphertext was decrypted alone


@settings(max_examples=25, deadline=None)
@given(
    bound_bits=st.integers(1, 60),
    data=st.data(),
)
def test_batch_with_values_past_the_bound_falls_back_and_is_exact(keys, bound_bits, data) -> None:
    pk, sk = keys
    n, bound = int(pk.n), 1 << bound_bits
    ms = data.draw(st.lists(st.integers(-bound + 1, bound - 1), min_size=8, max_size=30))
    # (-bound itself still fits a packed slot, [-bound, bound), and unpacks exactly)
    past = st.one_of(
        st.sampled_from([bound, -bound - 1, 2 * bound, bound + 1, -2 * bound - 3]),
        st.integers(bound, n // 3),
        st.integers(-(n // 3), -bound - 1),
    )
    for _ in range(data.draw(st.integers(1, 3))):
        ms.insert(data.draw(st.integers(0, len(ms))), data.draw(past))
    cts = [pk.raw_encrypt(m % n) for m in ms]
    with pytest.MonkeyPatch.context() as mp:
        calls = Spy(mp, "raw_decrypt_signed")
        assert P.raw_decrypt_bounded(sk, cts, bound_bits) == ms
        assert calls.count >= len(ms)  # the check failed: each decrypted on its own


def test_a_carry_that_unpacks_cleanly_is_caught_by_the_check(keys, monkeypatch) -> None:
    """m = 2**(B+1) fills its slot exactly: it reads as 0 and adds 1 to the next slot, a
    packed plaintext that unpacks without complaint. The weighted check refuses it."""
    pk, sk = keys
    bound_bits = 30
    ms = [5, 1 << (bound_bits + 1), 7, -9, 11, 0, 2, 3, 4]
    cts = [pk.raw_encrypt(m % pk.n) for m in ms]
    packing = P.Packing(key_bits=pk.bits, value_bits=bound_bits + 1)
    vec = P.EncryptedVector(public_key=pk, ciphertexts=tuple(cts), shape=(len(ms),), frac_bits=0)
    packed = P.pack_encrypted(vec, packing)
    unpacked = packing.unpack([sk.raw_decrypt(c) for c in packed.ciphertexts], len(ms), 1)
    assert unpacked == [5, 0, 8, -9, 11, 0, 2, 3, 4]  # the silent carry, without a check
    calls = Spy(monkeypatch, "raw_decrypt_signed")
    assert P.raw_decrypt_bounded(sk, cts, bound_bits) == ms
    assert calls.count == 1 + len(ms)


def test_the_check_weights_are_fresh_and_full_width(keys, monkeypatch) -> None:
    pk, sk = keys
    seen: list[np.ndarray] = []
    real = bounded.multi_exp

    def spy(bases, exps, mod):
        seen.append(np.asarray(exps).copy())
        return real(bases, exps, mod)

    monkeypatch.setattr(bounded, "multi_exp", spy)
    cts = [pk.raw_encrypt(i) for i in range(16)]
    for _ in range(2):
        assert P.raw_decrypt_bounded(sk, cts, 8) == list(range(16))
    a, b = seen
    assert a.dtype == np.uint64 and not np.array_equal(a, b)
    assert int(max(a.max(), b.max())).bit_length() > 56  # 64-bit weights, not small ones


@settings(max_examples=20, deadline=None)
@given(xs=st.lists(st.floats(-1, 1, allow_nan=False), min_size=1, max_size=24))
def test_decrypt_bounded_equals_decrypt_for_fixed_point(keys, xs) -> None:
    pk, sk = keys
    enc = P.encrypt(pk, np.array(xs).reshape(-1, 1) if len(xs) % 2 else np.array(xs))
    bound = P.DEFAULT_FRAC_BITS + 1  # |x| <= 1: |round(x * 2**32)| <= 2**32 < 2**33
    out = P.decrypt_bounded(sk, enc, bound_bits=bound)
    assert out.shape == enc.shape
    np.testing.assert_array_equal(out, P.decrypt(sk, enc))


def test_phe_ciphertexts_decrypt_bounded(keys) -> None:
    """Ciphertexts from phe (uniform r, nothing shoal-specific) decrypt the same way."""
    phe = pytest.importorskip("phe")
    pk, sk = keys
    ppk = phe.PaillierPublicKey(int(pk.n))
    ms = [0, 1, -1, 2**20, -(2**20), 12345, -54321, 7, 8, 9]
    cts = [gmpy2.mpz(ppk.raw_encrypt(m % int(pk.n))) for m in ms]
    assert P.raw_decrypt_bounded(sk, cts, 21) == ms
    assert [sk.raw_decrypt_signed(c, 21) for c in cts] == ms
