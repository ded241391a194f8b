"""TLS 1.3 records written by hand, for an attacker (h2attack.py) that sends what Python's
``ssl`` never writes: empty application-data records and KeyUpdate messages.

Python completes the handshake; its key log (``SSLContext.keylog_filename``) gives the
client's application traffic secret, from which this derives the record keys (RFC 8446
7.1, 7.3) and seals records itself (5.2), continuing the sequence numbers where Python's
own writes left them.
"""

from __future__ import annotations

import hashlib
import struct

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand

APPLICATION_DATA, HANDSHAKE = 23, 22
KEY_UPDATE = 24

_SUITES = {  # cipher suite -> (hash, key bytes, AEAD)
    "TLS_AES_128_GCM_SHA256": (hashes.SHA256, 16, AESGCM),
    "TLS_AES_256_GCM_SHA384": (hashes.SHA384, 32, AESGCM),
    "TLS_CHACHA20_POLY1305_SHA256": (hashes.SHA256, 32, ChaCha20Poly1305),
}


def expand_label(
    hash_type: type[hashes.HashAlgorithm], secret: bytes, label: bytes, length: int
) -> bytes:
    """HKDF-Expand-Label with an empty context (RFC 8446 7.1)."""
    full = b"tls13 " + label
    info = struct.pack(">H", length) + bytes([len(full)]) + full + b"\x00"
    return HKDFExpand(hash_type(), length, info).derive(secret)


def client_secret(keylog: str) -> bytes:
    """The client's first application traffic secret, from a key log of one connection."""
    for line in keylog.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "CLIENT_TRAFFIC_SECRET_0":
            return bytes.fromhex(parts[2])
    raise ValueError("no CLIENT_TRAFFIC_SECRET_0 in the key log")


class Sealer:
    """Seals the client's records under ``secret`` for ``suite``, from sequence ``seq``."""

    def __init__(self, suite: str, secret: bytes, seq: int) -> None:
        self.hash, self.key_bytes, self.aead = _SUITES[suite]
        self.seq = seq
        self._install(secret)

    def _install(self, secret: bytes) -> None:
        self.secret = secret
        self._cipher = self.aead(expand_label(self.hash, secret, b"key", self.key_bytes))
        self._iv = expand_label(self.hash, secret, b"iv", 12)

    def record(self, content_type: int, data: bytes) -> bytes:
        inner = data + bytes([content_type])
        header = bytes([APPLICATION_DATA, 3, 3]) + struct.pack(">H", len(inner) + 16)
        nonce = bytes(a ^ b for a, b in zip(self._iv, self.seq.to_bytes(12, "big"), strict=True))
        self.seq += 1
        return header + self._cipher.encrypt(nonce, inner, header)

    def empty(self) -> bytes:
        """An application-data record with nothing in it."""
        return self.record(APPLICATION_DATA, b"")

    def key_update(self, *, requested: bool = False) -> bytes:
        """A KeyUpdate (asking the server to update its keys too if ``requested``); later
        records go under the next secret."""
        record = self.record(HANDSHAKE, bytes([KEY_UPDATE, 0, 0, 1, int(requested)]))
        digest = hashlib.new(self.hash.name).digest_size
        self._install(expand_label(self.hash, self.secret, b"traffic upd", digest))
        self.seq = 0
        return record
