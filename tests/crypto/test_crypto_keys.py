from __future__ import annotations

import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.crypto import keys
from shoal.errors import ProtocolError


def test_agreement_is_symmetric_and_keys_are_separated() -> None:
    a, b, c = keys.KeyPair.generate(), keys.KeyPair.generate(), keys.KeyPair.generate()
    z = keys.agree(a.private, b.public)
    assert z == keys.agree(b.private, a.public)
    assert z != keys.agree(a.private, c.public)
    assert keys.agree_many(a.private, [b.public, c.public]) == [z, keys.agree(a.private, c.public)]
    enc = keys.derive_key(z, purpose="enc", context=b"round-1")
    mask = keys.derive_key(z, purpose="mask", context=b"round-1")
    other_round = keys.derive_key(z, purpose="enc", context=b"round-2")
    assert len({enc, mask, other_round}) == 3 and all(len(k) == 32 for k in (enc, mask))
    assert keys.public_from_private(a.private) == a.public


def test_private_key_hidden_from_repr() -> None:
    pair = keys.KeyPair.generate()
    assert pair.private.hex() not in repr(pair)


def test_degenerate_public_key_is_refused() -> None:
    pair = keys.KeyPair.generate()
    with pytest.raises(ProtocolError, match="degenerate"):
        keys.agree(pair.private, bytes(32))  # the identity point: all-zero shared secret
    with pytest.raises(ProtocolError):
        keys.agree(pair.private, b"short")


@settings(max_examples=50, deadline=None)
@given(st.binary(max_size=200), st.data())
def test_aead_rejects_any_tampering(plaintext: bytes, data: st.DataObject) -> None:
    key = os.urandom(32)
    blob = keys.encrypt(key, plaintext, associated_data=b"alice->bob")
    assert keys.decrypt(key, blob, associated_data=b"alice->bob") == plaintext
    i = data.draw(st.integers(0, len(blob) - 1))
    flip = data.draw(st.integers(1, 255))
    tampered = blob[:i] + bytes([blob[i] ^ flip]) + blob[i + 1 :]
    with pytest.raises(ProtocolError):
        keys.decrypt(key, tampered, associated_data=b"alice->bob")
    with pytest.raises(ProtocolError):
        keys.decrypt(key, blob, associated_data=b"alice->carol")  # moved to another peer
    with pytest.raises(ProtocolError):
        keys.decrypt(os.urandom(32), blob, associated_data=b"alice->bob")
    with pytest.raises(ProtocolError):
        keys.decrypt(
            key, blob[: data.draw(st.integers(0, len(blob) - 1))], associated_data=b"alice->bob"
        )


def test_encryption_is_randomised() -> None:
    key = os.urandom(32)
    assert keys.encrypt(key, b"x", associated_data=b"") != keys.encrypt(
        key, b"x", associated_data=b""
    )
