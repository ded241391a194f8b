"""Interoperability with phe (python-paillier): one key, ciphertexts cross both ways."""

from __future__ import annotations

import numpy as np
import pytest

from shoal.crypto import paillier as P

phe = pytest.importorskip("phe", reason="phe is in the dev extra")


def test_same_key_decrypts_across_libraries() -> None:
    pk, sk = P.generate_keypair(1024, insecure=True)
    ppk = phe.PaillierPublicKey(int(pk.n))
    psk = phe.PaillierPrivateKey(ppk, int(sk.p), int(sk.q))
    assert ppk.g == int(pk.n) + 1
    rng = np.random.default_rng(0)
    values = [int(v) for v in rng.integers(0, 2**62, size=20)] + [0, int(pk.n) - 1]
    for m in values:
        # ours -> phe
        assert psk.raw_decrypt(int(pk.raw_encrypt(m))) == m
        # phe -> ours
        assert sk.raw_decrypt(ppk.raw_encrypt(m)) == m
    # a homomorphic sum mixing both libraries' ciphertexts
    c = int(pk.raw_encrypt(5)) * ppk.raw_encrypt(7) % int(pk.nsquare)
    assert sk.raw_decrypt(c) == psk.raw_decrypt(c) == 12
    # signed fixed-point values through phe's EncryptedNumber at exponent 0
    e = P.encrypt(pk, np.array([-17, 23]), frac_bits=0)
    got = [psk.decrypt(phe.EncryptedNumber(ppk, int(ct), 0)) for ct in e.ciphertexts]
    assert got == [-17, 23]


def test_key_holder_crt_encryption_decrypts_in_phe() -> None:
    """Ciphertexts whose r**n came from the key holder's CRT sampler are ordinary Paillier
    ciphertexts: phe decrypts them, alone and multiplied with phe's own."""
    pk, sk = P.generate_keypair(1024, insecure=True)
    ppk = phe.PaillierPublicKey(int(pk.n))
    psk = phe.PaillierPrivateKey(ppk, int(sk.p), int(sk.q))
    e = P.encrypt(pk, np.array([-17, 23, 0, 2**40]), frac_bits=0, private_key=sk)
    got = [psk.decrypt(phe.EncryptedNumber(ppk, int(ct), 0)) for ct in e.ciphertexts]
    assert got == [-17, 23, 0, 2**40]
    c = int(e.ciphertexts[1]) * ppk.raw_encrypt(7) % int(pk.nsquare)
    assert psk.raw_decrypt(c) == 30


def test_djn_ciphertexts_decrypt_in_phe() -> None:
    """Obfuscators h_s**a from the DJN base are n-th residues like phe's r**n: phe decrypts
    DJN ciphertexts, alone and multiplied with its own."""
    pk, sk = P.generate_keypair(1024, insecure=True)
    assert pk.hs is not None
    ppk = phe.PaillierPublicKey(int(pk.n))
    psk = phe.PaillierPrivateKey(ppk, int(sk.p), int(sk.q))
    for source in ({}, {"private_key": sk}):
        e = P.encrypt(pk, np.array([-17, 23, 0, 2**40]), frac_bits=0, **source)
        got = [psk.decrypt(phe.EncryptedNumber(ppk, int(ct), 0)) for ct in e.ciphertexts]
        assert got == [-17, 23, 0, 2**40]
    c = int(e.ciphertexts[1]) * ppk.raw_encrypt(7) % int(pk.nsquare)
    assert psk.raw_decrypt(c) == 30
