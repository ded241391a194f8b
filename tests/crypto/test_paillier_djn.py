"""DJN obfuscators: fixed-base powers of the key holder's h_s, its wire form and its checks."""

from __future__ import annotations

import gmpy2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.crypto import paillier as P
from shoal.crypto.paillier.djn import FixedBase, exponent_bits
from shoal.errors import ConfigError, PlaintextOverflow

BITS = 512


@pytest.fixture(scope="module")
def keys() -> tuple[P.PublicKey, P.PrivateKey]:
    return P.generate_keypair(BITS, insecure=True)


def test_keygen_makes_a_djn_modulus_and_an_nth_residue_base(keys) -> None:
    pk, sk = keys
    assert sk.p % 4 == 3 and sk.q % 4 == 3
    assert gmpy2.gcd(sk.p - 1, sk.q - 1) == 2
    # h_s is an n-th residue: order dividing phi(n), and it decrypts to 0
    phi = (sk.p - 1) * (sk.q - 1)
    assert gmpy2.powmod(pk.hs, phi, pk.nsquare) == 1
    assert sk.raw_decrypt(pk.hs) == 0
    # h = -x^2 has Jacobi symbol 1 but is no square: h_s mod n is h^n, a non-square mod p
    assert gmpy2.jacobi(pk.hs % pk.n, pk.n) == 1
    assert gmpy2.legendre(pk.hs % sk.p, sk.p) == -1
    assert exponent_bits(pk.bits) == BITS // 2


@settings(max_examples=60, deadline=None)
@given(e=st.integers(0, 2 ** exponent_bits(BITS) - 1))
def test_fixed_base_power_equals_powmod(keys, e: int) -> None:
    pk, _ = keys
    table = pk.djn_table()
    assert table is not None and table is pk.djn_table()  # built once
    assert table.pow(e) == gmpy2.powmod(pk.hs, e, pk.nsquare)


def test_fixed_base_edges_and_range() -> None:
    fb = FixedBase(base=7, modulus=1009 * 1013, bits=20)
    for e in (0, 1, 255, 256, 2**20 - 1):
        assert fb.pow(e) == pow(7, e, 1009 * 1013)
    for bad in (-1, 2**20):
        with pytest.raises(ValueError, match="exponent"):
            fb.pow(bad)


def test_fresh_obfuscators_are_distinct_nth_residues(keys) -> None:
    pk, sk = keys
    phi = (sk.p - 1) * (sk.q - 1)
    rns = [pk.random_rn() for _ in range(30)] + [sk.random_rn() for _ in range(30)]
    assert len(set(rns)) == 60
    assert all(gmpy2.powmod(r, phi, pk.nsquare) == 1 for r in rns)


@settings(max_examples=40, deadline=None)
@given(a=st.integers(-(2**200), 2**200), b=st.integers(-(2**200), 2**200))
def test_dec_of_sum_with_djn_and_uniform_ciphertexts(keys, a: int, b: int) -> None:
    """A DJN ciphertext and a uniform-r one (as another library makes) add exactly."""
    pk, sk = keys
    uniform = P.PublicKey(n=pk.n)  # the same key without the base: r**n for uniform r
    assert uniform == pk and uniform.hs is None
    ca = P.encrypt(pk, np.array([a], dtype=object), frac_bits=0)
    cb = P.encrypt(uniform, np.array([b], dtype=object), frac_bits=0)
    assert P.decode_ints([sk.raw_decrypt(c) for c in (ca + cb).ciphertexts], pk.n) == [a + b]


@settings(max_examples=20, deadline=None)
@given(vals=st.lists(st.floats(-1000, 1000, allow_nan=False), min_size=1, max_size=80))
def test_packed_fresh_djn_encryption_round_trips(keys, vals: list[float]) -> None:
    pk, sk = keys
    packing = P.Packing(key_bits=pk.bits, value_bits=48, additions=3, frac_bits=24)
    x = np.array(vals)
    a = P.encrypt_packed(pk, x, packing)  # public key: fresh h_s**a each
    b = P.encrypt_packed(pk, x, packing, private_key=sk)  # key holder
    total = a.add(b).add(a).add(b)
    np.testing.assert_allclose(P.decrypt_packed(sk, total), 4 * x, atol=4 * 2**-23)
    with pytest.raises(PlaintextOverflow):
        total.add(a)


def test_wire_keeps_the_base_and_reads_bare_keys(keys) -> None:
    pk, sk = keys
    raw = pk.to_bytes()
    back = P.PublicKey.from_bytes(raw, insecure=True)
    assert back == pk and back.hs == pk.hs
    bare = P.PublicKey(n=pk.n).to_bytes()
    assert bare[0] != 0 and P.PublicKey.from_bytes(bare, insecure=True).hs is None
    with pytest.raises(ConfigError, match="too short"):
        P.PublicKey.from_bytes(raw)
    e = P.encrypt(back, np.array([1.5, -2.0]))
    assert P.decrypt(sk, e).tolist() == [1.5, -2.0]


def test_hostile_bases_are_refused(keys) -> None:
    """A base of order 1 or 2 would make 'encryptions' readable by anyone (c = (1+n)^m
    times +-1); bases outside Z_{n^2}^* and mangled layouts are refused too."""
    pk, _ = keys
    raw = pk.to_bytes()
    width = (pk.bits + 7) // 8
    head, n_bytes = raw[:3], raw[3 : 3 + width]
    cw = pk.ciphertext_bytes
    for hs in (0, 1, int(pk.nsquare) - 1, int(pk.n), int(pk.nsquare)):
        tampered = head + n_bytes + (hs % (1 << (8 * cw))).to_bytes(cw, "big")
        with pytest.raises(ConfigError):
            P.PublicKey.from_bytes(tampered, insecure=True)
    for bad in (raw[:-1], raw[: 3 + width], b"\x00", b"\x00\x00\x01\x05" + raw[3:], b""):
        with pytest.raises(ConfigError):
            P.PublicKey.from_bytes(bad, insecure=True)
    with pytest.raises(ConfigError):
        P.PublicKey(n=pk.n, hs=int(pk.nsquare) - 1)


def test_private_key_from_bytes_keeps_the_base(keys) -> None:
    pk, sk = keys
    sk2 = P.PrivateKey.from_bytes(pk, sk.to_bytes())
    assert sk2.public_key.hs == pk.hs
    e = P.encrypt(pk, np.array([3.25]), private_key=sk2)
    assert P.decrypt(sk, e).tolist() == [3.25]
