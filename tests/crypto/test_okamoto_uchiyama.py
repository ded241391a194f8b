"""Okamoto-Uchiyama: homomorphic sums and scalings, signed fixed point, overflow, wire, keys."""

from __future__ import annotations

import gmpy2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.crypto import okamoto_uchiyama as OU
from shoal.errors import ConfigError, PlaintextOverflow, ProtocolError

BITS = 768  # short keys keep the tests fast; p has 256 bits


@pytest.fixture(scope="module")
def keys() -> tuple[OU.OUPublicKey, OU.OUPrivateKey]:
    return OU.generate_ou_keypair(BITS, insecure=True)


small = st.integers(-(2**120), 2**120)


def test_keygen_shape(keys) -> None:
    pk, sk = keys
    assert pk.bits == BITS and sk.p * sk.p * sk.q == pk.n
    assert gmpy2.is_prime(sk.p) and gmpy2.is_prime(sk.q) and sk.p != sk.q
    assert sk.p.bit_length() == pk.p_bits
    assert pk.h == gmpy2.powmod(pk.g, pk.n, pk.n)
    assert pk.max_int * 3 < sk.p  # the overflow band below is reachable
    with pytest.raises(ConfigError, match="too short"):
        OU.generate_ou_keypair(1024)


@settings(max_examples=40, deadline=None)
@given(a=small, b=small, k=st.integers(-(2**60), 2**60))
def test_dec_of_product_is_sum_and_power_is_scaling(keys, a: int, b: int, k: int) -> None:
    pk, sk = keys
    ca, cb = pk.raw_encrypt(a), pk.raw_encrypt(b)
    assert OU.decrypt(sk, pk.add([ca], [cb]), frac_bits=0).tolist() == [a + b]
    assert OU.decrypt(sk, pk.mul([ca], [k]), frac_bits=0).tolist() == [a * k]
    # fresh randomness: the same value twice gives two ciphertexts
    assert pk.raw_encrypt(a) != pk.raw_encrypt(a)


@settings(max_examples=30, deadline=None)
@given(xs=st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=10))
def test_fixed_point_round_trip(keys, xs: list[float]) -> None:
    pk, sk = keys
    x = np.array(xs)
    c = OU.encrypt(pk, x, frac_bits=32)
    np.testing.assert_allclose(OU.decrypt(sk, c, frac_bits=32), x, atol=2**-32)
    twice = pk.add(c, c)
    np.testing.assert_allclose(OU.decrypt(sk, twice, frac_bits=32), 2 * x, atol=2**-31)


def test_overflow_is_refused_not_wrapped(keys) -> None:
    pk, sk = keys
    with pytest.raises(PlaintextOverflow):
        pk.raw_encrypt(pk.max_int + 1)
    top = pk.raw_encrypt(pk.max_int)
    assert OU.decrypt(sk, [top], frac_bits=0).tolist() == [pk.max_int]
    # the plaintext space is Z_p and p is secret: a sum past p/3 must not come back wrong
    big = pk.mul([top], [2])
    with pytest.raises(PlaintextOverflow):
        OU.decrypt(sk, big, frac_bits=0)


def test_wire_and_hostile_ciphertexts(keys) -> None:
    pk, sk = keys
    back = OU.OUPublicKey.from_bytes(pk.to_bytes(), insecure=True)
    assert back == pk
    with pytest.raises(ConfigError, match="too short"):
        OU.OUPublicKey.from_bytes(pk.to_bytes())
    for bad in (pk.to_bytes()[:-1], b"", b"\x00" * 9):
        with pytest.raises(ConfigError):
            OU.OUPublicKey.from_bytes(bad, insecure=True)
    for c in (0, int(pk.n), int(pk.n) + 5, int(sk.p)):
        with pytest.raises(ProtocolError):
            sk.raw_decrypt(c)
    with pytest.raises(ConfigError):
        OU.OUPrivateKey(public_key=pk, p=sk.q, q=sk.p)
    with pytest.raises(ConfigError):
        OU.OUPublicKey(n=pk.n, g=1, h=pk.h)
