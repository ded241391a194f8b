from __future__ import annotations

import gmpy2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.crypto import paillier as P
from shoal.errors import ConfigError, DataError, PlaintextOverflow, ProtocolError
from shoal.wire import decode, encode

BITS = 512  # short keys keep the tests fast; the arithmetic does not depend on the size


@pytest.fixture(scope="module")
def keys() -> tuple[P.PublicKey, P.PrivateKey]:
    return P.generate_keypair(BITS, insecure=True)


@pytest.fixture(scope="module")
def plain_keys() -> tuple[P.PublicKey, P.PrivateKey]:
    """A key without a DJN base: uniform r**n (public) and the CRT sampler (key holder)."""
    pk, sk = P.generate_keypair(BITS, insecure=True, djn=False)
    assert pk.hs is None
    return pk, sk


ints = st.integers(-(2**200), 2**200)
floats = st.floats(-1e9, 1e9, allow_nan=False)


def test_keygen_is_exact_size_with_g_n_plus_one() -> None:
    for bits in (256, 512, 1024):
        pk, sk = P.generate_keypair(bits, insecure=True)
        assert pk.bits == bits
        assert sk.p * sk.q == pk.n and sk.p != sk.q
        assert gmpy2.is_prime(sk.p) and gmpy2.is_prime(sk.q)
        assert gmpy2.gcd(pk.n, (sk.p - 1) * (sk.q - 1)) == 1
        # g = n + 1: Enc(1) with r = 1 is exactly n + 1
        assert pk.raw_encrypt(1, rn=gmpy2.mpz(1)) == pk.n + 1


def test_two_keys_differ() -> None:
    a, _ = P.generate_keypair(256, insecure=True)
    b, _ = P.generate_keypair(256, insecure=True)
    assert a.n != b.n


def test_short_keys_refused_unless_insecure() -> None:
    with pytest.raises(ConfigError, match="too short"):
        P.generate_keypair(1024)
    pk, _ = P.generate_keypair(512, insecure=True)
    with pytest.raises(ConfigError, match="too short"):
        P.PublicKey.from_bytes(pk.to_bytes())
    assert P.PublicKey.from_bytes(pk.to_bytes(), insecure=True) == pk


@settings(max_examples=40, deadline=None)
@given(a=ints, b=ints)
def test_dec_of_product_is_sum(keys, a: int, b: int) -> None:
    pk, sk = keys
    ea = P.encrypt(pk, np.array([a], dtype=object), frac_bits=0)
    # raw level: arbitrary-size ints, signed
    ca = pk.raw_encrypt(a % pk.n)
    cb = pk.raw_encrypt(b % pk.n)
    m = sk.raw_decrypt(ca * cb % pk.nsquare)
    assert P.decode_ints([m], pk.n) == [a + b]
    assert P.decode_ints([sk.raw_decrypt(c) for c in ea.ciphertexts], pk.n) == [a]


@settings(max_examples=40, deadline=None)
@given(xs=st.lists(floats, min_size=1, max_size=8), ys=st.lists(floats, min_size=8, max_size=8))
def test_vector_add_and_scalar_mul(keys, xs: list[float], ys: list[float]) -> None:
    pk, sk = keys
    x = np.array(xs)
    y = np.array(ys[: len(xs)])
    ex, ey = P.encrypt(pk, x, frac_bits=24), P.encrypt(pk, y, frac_bits=24)
    np.testing.assert_allclose(P.decrypt(sk, ex + ey), x + y, atol=2**-22)
    np.testing.assert_allclose(P.decrypt(sk, ex + y), x + y, atol=2**-22)
    k = np.round(y / 1e6, 3)
    got = P.decrypt(sk, ex.mul(k, frac_bits=16))
    np.testing.assert_allclose(got, x * P.from_fixed(P.to_fixed(k, 16), 16, k.shape), atol=1e-3)


@settings(max_examples=30, deadline=None)
@given(xs=st.lists(ints, min_size=1, max_size=6), ys=st.lists(ints, min_size=6, max_size=6), k=ints)
def test_key_holder_crt_encryption_round_trips_and_stays_homomorphic(
    plain_keys, xs: list[int], ys: list[int], k: int
) -> None:
    """Encryption with the key holder's CRT r**n is ordinary Paillier: it decrypts, adds to
    a public-key ciphertext and to plaintexts, and multiplies by a scalar, all exactly."""
    pk, sk = plain_keys
    x, y = np.array(xs, dtype=object), np.array(ys[: len(xs)], dtype=object)
    ex = P.encrypt(pk, x, frac_bits=0, private_key=sk)
    ey = P.encrypt(pk, y, frac_bits=0)  # public-key encryption, the other party's
    assert all(0 < c < pk.nsquare and gmpy2.gcd(c, pk.n) == 1 for c in ex.ciphertexts)
    assert P.decode_ints([sk.raw_decrypt(c) for c in ex.ciphertexts], pk.n) == xs
    assert P.decode_ints([sk.raw_decrypt(c) for c in (ex + ey).ciphertexts], pk.n) == [
        a + b for a, b in zip(xs, ys)
    ]
    got = [sk.raw_decrypt(c) for c in ex.mul(np.array([k] * len(xs), dtype=object)).ciphertexts]
    assert P.decode_ints(got, pk.n) == [a * k for a in xs]
    # the same plaintexts twice: fresh randomness every time
    again = P.encrypt(pk, x, frac_bits=0, private_key=sk)
    assert not set(again.ciphertexts) & set(ex.ciphertexts)


def test_key_holder_encryption_refuses_mixed_sources(keys) -> None:
    pk, sk = keys
    pool = P.RandomnessPool(public_key=pk, size=2)
    with pytest.raises(ConfigError, match="not both"):
        P.encrypt(pk, np.array([1.0]), pool=pool, private_key=sk)
    _, other = P.generate_keypair(BITS, insecure=True)
    with pytest.raises(ConfigError, match="does not belong"):
        P.encrypt(pk, np.array([1.0]), private_key=other)
    packing = P.Packing(key_bits=pk.bits, value_bits=16, additions=3, frac_bits=0)
    pv = P.encrypt_packed(pk, np.arange(10), packing, private_key=sk)
    np.testing.assert_array_equal(P.decrypt_packed(sk, pv), np.arange(10))


@settings(max_examples=30, deadline=None)
@given(xs=st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=6), k=ints)
def test_exact_integer_scalar_mul(keys, xs: list[int], k: int) -> None:
    pk, sk = keys
    e = P.encrypt(pk, np.array(xs, dtype=np.int64), frac_bits=0)
    got = [sk.raw_decrypt(c) for c in e.mul(np.int64(k % 2**40 - 2**39)).ciphertexts]
    assert P.decode_ints(got, pk.n) == [x * (k % 2**40 - 2**39) for x in xs]


@settings(max_examples=15, deadline=None)
@given(
    rows=st.integers(1, 40),
    cols=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_matmul_equals_plaintext_product(keys, rows: int, cols: int, seed: int) -> None:
    pk, sk = keys
    rng = np.random.default_rng(seed)
    x = rng.integers(-1000, 1000, size=rows)
    m = rng.integers(-(2**20), 2**20, size=(rows, cols))
    got = P.decrypt(sk, P.encrypt(pk, x, frac_bits=0).matmul(m))
    assert got.tolist() == (x.astype(object) @ m.astype(object)).tolist()


def test_matmul_with_huge_entries_and_zeros(keys) -> None:
    pk, sk = keys
    x = np.array([3, -5, 7])
    m = np.array([[2**70, 0], [0, 0], [-(2**65), 1]], dtype=object)
    got = [sk.raw_decrypt(c) for c in P.encrypt(pk, x, frac_bits=0).matmul(m).ciphertexts]
    assert P.decode_ints(got, pk.n) == [3 * 2**70 - 7 * 2**65, 7]


def test_multi_exp_matches_naive(keys) -> None:
    pk, _ = keys
    rng = np.random.default_rng(1)
    bases = [pk.random_rn() for _ in range(50)]
    exps = rng.integers(0, 2**53, size=50)
    exps[::7] = 0
    want = gmpy2.mpz(1)
    for b, e in zip(bases, exps.tolist()):
        want = want * gmpy2.powmod(b, e, pk.nsquare) % pk.nsquare
    assert P.multi_exp(bases, exps, pk.nsquare) == want
    assert P.multi_exp(bases, [int(e) for e in exps], pk.nsquare) == want


def test_overflow_is_refused(keys) -> None:
    pk, sk = keys
    with pytest.raises(PlaintextOverflow):
        P.encrypt(pk, [2**600], frac_bits=0)
    top = int(pk.n) // 3
    big = P.encrypt(pk, np.array([top], dtype=object), frac_bits=0)
    assert P.decrypt(sk, big).tolist() == [top]
    with pytest.raises(PlaintextOverflow, match="overflowed"):
        P.decrypt(sk, big + big)  # 2n/3: wrapped into the middle third
    with pytest.raises(PlaintextOverflow, match="overflowed"):
        P.decrypt(sk, big.mul(np.array([-2])))
    with pytest.raises(DataError):
        P.encrypt(pk, [float("nan")])


def test_pool_gives_each_factor_once(keys) -> None:
    pk, sk = keys
    pool = P.RandomnessPool(public_key=pk, size=20, private_key=sk)
    assert len(pool) == 20
    e = P.encrypt(pk, np.arange(30), frac_bits=0, pool=pool)
    assert len(pool) == 0 and pool.taken == 30 and pool.generated == 30
    assert len(set(e.ciphertexts)) == 30
    # the same plaintext twice gives two different ciphertexts (no factor reused)
    z = P.encrypt(pk, np.zeros(10), pool=pool)
    assert len(set(z.ciphertexts)) == 10
    assert P.decrypt(sk, e).tolist() == list(range(30))


@pytest.mark.parametrize("which", ["keys", "plain_keys"])
def test_key_holder_sampler_gives_nth_residues(which: str, request) -> None:
    pk, sk = request.getfixturevalue(which)
    # an n-th residue mod n^2 decrypts to 0 and has order dividing phi(n)
    phi = (sk.p - 1) * (sk.q - 1)
    for _ in range(10):
        rn = sk.random_rn()
        assert gmpy2.powmod(rn, phi, pk.nsquare) == 1
        assert sk.raw_decrypt(rn) == 0
    assert len({sk.random_rn() for _ in range(20)}) == 20


@settings(max_examples=30, deadline=None)
@given(
    vals=st.lists(st.floats(-1000, 1000, allow_nan=False), min_size=1, max_size=40),
    adds=st.integers(0, 6),
)
def test_packing_round_trips_through_sums(keys, vals: list[float], adds: int) -> None:
    pk, sk = keys
    packing = P.Packing(key_bits=pk.bits, value_bits=40, additions=adds, frac_bits=20)
    v = np.array(vals)
    pv = P.encrypt_packed(pk, v, packing)
    assert len(pv.ciphertexts) == -(-len(vals) // packing.slots)
    acc = pv
    for _ in range(adds):
        acc = acc.add(pv)
    expect = P.from_fixed(P.to_fixed(v, 20), 20, v.shape) * (adds + 1)
    np.testing.assert_allclose(P.decrypt_packed(sk, acc), expect, rtol=0, atol=1e-9)
    with pytest.raises(PlaintextOverflow, match="headroom"):
        acc.add(pv)


def test_packing_refuses_values_too_wide(keys) -> None:
    pk, _ = keys
    packing = P.Packing(key_bits=pk.bits, value_bits=8, additions=1)
    with pytest.raises(PlaintextOverflow):
        P.encrypt_packed(pk, np.array([200]), packing)
    pv = P.encrypt_packed(pk, np.array([-128, 127, 5]), packing)
    with pytest.raises(PlaintextOverflow):
        pv.mul(3)
    with pytest.raises(ConfigError):
        P.Packing(key_bits=pk.bits, value_bits=600)


def test_packed_extremes_and_mul(keys) -> None:
    pk, sk = keys
    packing = P.Packing(key_bits=pk.bits, value_bits=8, additions=3)
    v = np.array([-128, 127, 0, -1] * 20)
    pv = P.encrypt_packed(pk, v, packing)
    assert P.decrypt_packed(sk, pv.mul(4)).tolist() == (v * 4).tolist()


def test_wire_round_trip_and_tamper(keys) -> None:
    pk, sk = keys
    e = P.encrypt(pk, np.array([[1.0, -2.0], [3.5, 0.0]]))
    back = decode(encode({"pk": np.frombuffer(pk.to_bytes(), np.uint8), **e.to_payload()}))
    pk2 = P.PublicKey.from_bytes(bytes(back["pk"]), insecure=True)
    e2 = P.EncryptedVector.from_payload(pk2, back)
    assert P.decrypt(sk, e2).tolist() == [[1.0, -2.0], [3.5, 0.0]]
    ct = np.array(back["ct"])
    bad = ct.copy()
    bad[0, :] = 0xFF  # >= n^2
    with pytest.raises(ProtocolError, match="outside"):
        P.EncryptedVector.from_payload(pk, {**back, "ct": bad})
    zero = ct.copy()
    zero[1, :] = 0
    with pytest.raises(ProtocolError, match="outside"):
        P.EncryptedVector.from_payload(pk, {**back, "ct": zero})
    shared = ct.copy()
    shared[2] = np.frombuffer(int(pk.n).to_bytes(ct.shape[1], "big"), np.uint8)
    with pytest.raises(ProtocolError, match="factor"):
        P.EncryptedVector.from_payload(pk, {**back, "ct": shared})
    with pytest.raises(ProtocolError):
        P.EncryptedVector.from_payload(pk, {**back, "ct": ct[:, 1:]})
    with pytest.raises(ProtocolError):
        P.EncryptedVector.from_payload(pk, {**back, "shape": [3]})
    pp = P.encrypt_packed(pk, np.arange(5), P.Packing(key_bits=pk.bits, value_bits=16))
    back = P.PackedVector.from_payload(pk, decode(encode(pp.to_payload())))
    assert P.decrypt_packed(sk, back).tolist() == list(range(5))


def test_private_key_round_trip(keys) -> None:
    pk, sk = keys
    sk2 = P.PrivateKey.from_bytes(pk, sk.to_bytes())
    c = pk.raw_encrypt(42)
    assert sk2.raw_decrypt(c) == 42
    with pytest.raises(ConfigError):
        P.PrivateKey.from_bytes(pk, (12345).to_bytes(2, "big"))


def test_mismatched_keys_refused(keys) -> None:
    pk, sk = keys
    pk2, sk2 = P.generate_keypair(256, insecure=True)
    e = P.encrypt(pk, [1.0])
    with pytest.raises(ConfigError):
        P.decrypt(sk2, e)
    with pytest.raises(ConfigError):
        e + P.encrypt(pk2, [1.0])
    with pytest.raises(ConfigError):
        P.RandomnessPool(public_key=pk2, private_key=sk)


@settings(max_examples=20, deadline=None)
@given(xs=st.lists(floats, min_size=1, max_size=6))
def test_masked_decryption_is_exact_and_hides(keys, xs: list[float]) -> None:
    pk, sk = keys
    x = np.array(xs)
    enc = P.encrypt(pk, x, frac_bits=20)
    masked, masks = P.mask(enc)
    plains = P.ints_from_bytes(pk, P.ints_to_bytes(pk, P.decrypt_raw(sk, masked)))
    got = P.unmask(pk, plains, masks, frac_bits=20, shape=x.shape)
    assert got.tolist() == P.decrypt(sk, enc).tolist()
    # what the key holder sees is x + r mod n with r uniform in Z_n: not x itself
    assert not set(plains) & set(P.encode_ints(P.to_fixed(x, 20), pk.n)) or len(xs) == 0
    with pytest.raises(ProtocolError):
        P.ints_from_bytes(pk, P.ints_to_bytes(pk, [int(pk.n) - 1])[:, 1:])


@settings(max_examples=20, deadline=None)
@given(xs=st.lists(floats, min_size=1, max_size=9), slot=st.sampled_from([80, 120, 192]))
def test_packed_masking_is_exact(keys, xs: list[float], slot: int) -> None:
    """Packing ciphertexts without the key, masking, decrypting and unpacking gives exactly
    the values decrypt gives, negatives included; fewer ciphertexts travel."""
    pk, sk = keys
    x = np.array(xs)
    enc = P.encrypt(pk, x, frac_bits=20)
    packing = P.Packing(key_bits=pk.bits, value_bits=slot, frac_bits=20)
    masked, masks = P.mask_packed(enc, packing)
    assert len(masked) == -(-len(xs) // packing.slots)
    plains = P.decrypt_raw(sk, masked)
    got = P.unmask_packed(pk, plains, masks, packing=packing, count=len(xs), shape=x.shape)
    assert got.tolist() == P.decrypt(sk, enc).tolist()


def test_packing_ciphertexts_checks_its_layout_and_a_carry_shows(keys) -> None:
    pk, sk = keys
    enc = P.encrypt(pk, np.array([1.0, -1.0, 2.0]), frac_bits=8)
    with pytest.raises(ConfigError, match="fractional bits"):
        P.pack_encrypted(enc, P.Packing(key_bits=pk.bits, value_bits=64, frac_bits=20))
    with pytest.raises(ConfigError, match="key size"):
        P.pack_encrypted(enc, P.Packing(key_bits=1024, value_bits=64, frac_bits=8))
    # a value beyond the slot's bound (the caller's promise) carries into its neighbour:
    # unpacking no longer gives the values back, which is why the bound is stated
    wide = P.encrypt(pk, np.array([2.0**70, 1.0]), frac_bits=8)
    packing = P.Packing(key_bits=pk.bits, value_bits=64, frac_bits=8)
    masked, masks = P.mask_packed(wide, packing)
    got = P.unmask_packed(
        pk, P.decrypt_raw(sk, masked), masks, packing=packing, count=2, shape=(2,)
    )
    assert got.tolist() != [2.0**70, 1.0]
