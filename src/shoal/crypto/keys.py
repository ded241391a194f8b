"""Key agreement (X25519 + HKDF-SHA256) and authenticated encryption (AES-256-GCM).

Raw 32-byte keys travel as bytes so that protocol state stays plain data. Every failure a
peer can cause (a bad public key, a tampered ciphertext) raises ProtocolError.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from shoal.errors import ConfigError, ProtocolError

__all__ = [
    "AEAD_NONCE_BYTES",
    "AEAD_OVERHEAD",
    "KEY_BYTES",
    "KeyPair",
    "agree",
    "agree_many",
    "decrypt",
    "derive_key",
    "encrypt",
    "public_from_private",
]

KEY_BYTES = 32
AEAD_NONCE_BYTES = 12
AEAD_TAG_BYTES = 16
AEAD_OVERHEAD = AEAD_NONCE_BYTES + AEAD_TAG_BYTES
_HKDF_SALT = b"shoal/kdf/v1"


@dataclass(frozen=True)
class KeyPair:
    """An X25519 key pair as raw bytes; the private half never appears in repr."""

    private: bytes = field(repr=False)
    public: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        sk = X25519PrivateKey.generate()
        return cls(private=sk.private_bytes_raw(), public=sk.public_key().public_bytes_raw())


def _check_key(key: bytes, what: str) -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_BYTES:
        raise ProtocolError(f"{what} must be {KEY_BYTES} bytes")


def public_from_private(private: bytes) -> bytes:
    """The X25519 public key of a raw private key."""
    _check_key(private, "an X25519 private key")
    return X25519PrivateKey.from_private_bytes(bytes(private)).public_key().public_bytes_raw()


def agree(private: bytes, peer_public: bytes) -> bytes:
    """The raw X25519 shared secret; raises ProtocolError for a degenerate peer key."""
    return agree_many(private, [peer_public])[0]


def agree_many(private: bytes, peer_publics: Sequence[bytes]) -> list[bytes]:
    """:func:`agree` with each of ``peer_publics``, loading the private key once."""
    _check_key(private, "an X25519 private key")
    sk = X25519PrivateKey.from_private_bytes(bytes(private))
    out = []
    for peer_public in peer_publics:
        _check_key(peer_public, "an X25519 public key")
        try:
            out.append(sk.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public))))
        except ValueError as exc:  # low-order points give an all-zero secret
            raise ProtocolError(
                "a peer's public key is degenerate (low order); refuse to use it"
            ) from exc
    return out


def derive_key(shared: bytes, *, purpose: str, context: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 of a shared secret, bound to a ``purpose`` and a ``context``.

    Different purposes (share encryption, mask seeds) get independent keys from one secret.
    """
    if not purpose:
        raise ConfigError("derive_key needs a non-empty purpose")
    info = purpose.encode() + b"\x00" + bytes(context)
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_HKDF_SALT, info=info).derive(
        bytes(shared)
    )


def encrypt(key: bytes, plaintext: bytes, *, associated_data: bytes) -> bytes:
    """AES-256-GCM: ``nonce || ciphertext || tag``, authenticating ``associated_data`` too."""
    if len(key) != KEY_BYTES:
        raise ConfigError(f"an AEAD key is {KEY_BYTES} bytes")
    nonce = os.urandom(AEAD_NONCE_BYTES)
    return nonce + AESGCM(bytes(key)).encrypt(nonce, bytes(plaintext), bytes(associated_data))


def decrypt(key: bytes, blob: bytes, *, associated_data: bytes) -> bytes:
    """Inverse of :func:`encrypt`; raises ProtocolError if anything was altered or misrouted."""
    if len(key) != KEY_BYTES:
        raise ConfigError(f"an AEAD key is {KEY_BYTES} bytes")
    if len(blob) < AEAD_OVERHEAD:
        raise ProtocolError(f"a ciphertext is at least {AEAD_OVERHEAD} bytes, got {len(blob)}")
    try:
        return AESGCM(bytes(key)).decrypt(
            bytes(blob[:AEAD_NONCE_BYTES]), bytes(blob[AEAD_NONCE_BYTES:]), bytes(associated_data)
        )
    except InvalidTag as exc:
        raise ProtocolError(
            "a ciphertext failed authentication: it was tampered with, or sent to the wrong "
            "peer or round"
        ) from exc
