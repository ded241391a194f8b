"""Node identity for deployment: Ed25519 key files, message signatures and the replay guard.

Each node owns an Ed25519 key pair; the coordinator admits only public keys in its registry.
Every message a node sends is signed over a fixed context string, the session's challenge,
a timestamp and a fresh nonce, so a recorded message cannot be replayed or forged.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import os
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shoal.errors import AuthenticationError, ConfigError

__all__ = [
    "NONCE_BYTES",
    "SIGNING_CONTEXT",
    "ReplayGuard",
    "fingerprint",
    "load_private_key",
    "load_public_key",
    "public_key_bytes",
    "public_path_for",
    "sign",
    "verify",
    "write_key_pair",
]

# Domain separation: a signature made for this protocol is useless anywhere else.
SIGNING_CONTEXT = b"shoal-deploy-v1\x00"
NONCE_BYTES = 16
_PUBLIC_BYTES = 32


def public_key_bytes(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    """The raw 32-byte public key (what the registry stores)."""
    public = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(public_key: bytes) -> str:
    """A short, stable name for a public key, for logs and listings: ``SHA256:<base64>``."""
    digest = hashlib.sha256(public_key).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")[:22]


def public_path_for(private_path: str | os.PathLike[str]) -> Path:
    """``node.key`` -> ``node.pub``; any other name gets ``.pub`` appended."""
    path = Path(private_path)
    return path.with_suffix(".pub") if path.suffix == ".key" else Path(f"{path}.pub")


def write_key_pair(
    path: str | os.PathLike[str], *, force: bool = False
) -> tuple[Path, Path, Ed25519PrivateKey]:
    """Create a key pair: the private key at ``path`` (mode 0600) and the public key beside it.

    Returns (private path, public path, key). Refuses to overwrite unless ``force``.
    """
    private_path = Path(path)
    public_path = public_path_for(private_path)
    if not private_path.parent.is_dir():
        raise ConfigError(f"directory {str(private_path.parent)!r} does not exist; create it first")
    for target in (private_path, public_path):
        if target.exists() and not force:
            raise ConfigError(
                f"{str(target)!r} already exists; pass --force to replace it (the old key "
                "stops working once the coordinator's registry holds the new one)"
            )
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if force and private_path.exists():
        private_path.unlink()
    # O_EXCL with mode 0600: the private key is never readable by others, not even briefly.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path, key


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Read a node's private key (PEM, PKCS#8, unencrypted), refusing group/world-readable files."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"key file {str(p)!r} not found; create one with `shoal keys new`")
    if os.name == "posix" and stat.S_IMODE(p.stat().st_mode) & 0o077:
        raise ConfigError(
            f"private key {str(p)!r} is readable by other users; run `chmod 600 {p}` first"
        )
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"{str(p)!r} is not an unencrypted PEM private key ({exc}); "
            "create one with `shoal keys new`"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError(
            f"{str(p)!r} holds a {type(key).__name__}, not an Ed25519 key; "
            "create one with `shoal keys new`"
        )
    return key


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """Read a public key file (PEM, OpenSSH ``ssh-ed25519 ...`` or 64 hex digits) -> 32 bytes."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"public key file {str(p)!r} not found")
    data = p.read_bytes().strip()
    if len(data) > 16384:
        raise ConfigError(f"{str(p)!r} is too large to be a public key")
    loaded: object
    try:
        if data.startswith(b"-----BEGIN"):
            if b"PRIVATE KEY" in data:
                raise ConfigError(
                    f"{str(p)!r} is a PRIVATE key; register the .pub file next to it, and keep "
                    "the private key on the node"
                )
            loaded = serialization.load_pem_public_key(data)
        elif data.startswith(b"ssh-ed25519 "):
            loaded = serialization.load_ssh_public_key(data)
        else:
            raw = bytes.fromhex(data.decode("ascii"))
            if len(raw) != _PUBLIC_BYTES:
                raise ValueError(f"{len(raw)} bytes")
            loaded = Ed25519PublicKey.from_public_bytes(raw)
    except (ValueError, UnicodeDecodeError, TypeError) as exc:
        raise ConfigError(
            f"{str(p)!r} is not an Ed25519 public key (PEM, OpenSSH or hex) ({exc}); "
            "use the .pub file written by `shoal keys new`"
        ) from None
    if not isinstance(loaded, Ed25519PublicKey):
        raise ConfigError(f"{str(p)!r} holds a {type(loaded).__name__}, not an Ed25519 key")
    return public_key_bytes(loaded)


def sign(key: Ed25519PrivateKey, body: bytes) -> bytes:
    return key.sign(SIGNING_CONTEXT + body)


def verify(public_key: bytes, body: bytes, signature: bytes) -> bool:
    """True if ``signature`` is the holder of ``public_key``'s signature on ``body``."""
    if len(public_key) != _PUBLIC_BYTES or len(signature) != 64:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, SIGNING_CONTEXT + body)
    except (InvalidSignature, ValueError):
        return False
    return True


class ReplayGuard:
    """Rejects messages with a timestamp outside ``±window_s`` or a nonce already seen.

    Nonces are remembered for twice the window, which covers every timestamp the guard still
    accepts; older messages fail the timestamp check, so the memory stays bounded by the
    message rate times the window (and by ``max_entries`` as a hard stop against floods).
    """

    def __init__(
        self,
        *,
        window_s: float = 60.0,
        max_entries: int = 1_000_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if window_s <= 0:
            raise ConfigError(f"the replay window must be positive, got {window_s}")
        self.window_s = window_s
        self.max_entries = max_entries
        self._clock = clock
        self._seen: set[bytes] = set()
        self._expiry: collections.deque[tuple[float, bytes]] = collections.deque()
        self._lock = threading.Lock()

    def check(self, *, timestamp_ms: int, nonce: bytes, scope: bytes = b"") -> None:
        """Accept a message once; raise AuthenticationError for a stale or replayed one.

        ``scope`` namespaces nonces (e.g. per signing key), so one node cannot burn another's.
        """
        if len(nonce) != NONCE_BYTES:
            raise AuthenticationError(
                f"message nonce must be {NONCE_BYTES} random bytes, got {len(nonce)}"
            )
        now = self._clock()
        skew = abs(now - timestamp_ms / 1000.0)
        if skew > self.window_s:
            raise AuthenticationError(
                f"message timestamp is {skew:.0f} s away from the coordinator's clock (window "
                f"{self.window_s:.0f} s): a stale or replayed message, or a badly set clock"
            )
        key = scope + nonce
        with self._lock:
            while self._expiry and self._expiry[0][0] < now:
                self._seen.discard(self._expiry.popleft()[1])
            if key in self._seen:
                raise AuthenticationError("message nonce was already used: a replayed message")
            if len(self._seen) >= self.max_entries:
                raise AuthenticationError("too many messages in the replay window; slow down")
            self._seen.add(key)
            self._expiry.append((now + 2 * self.window_s, key))

    def __len__(self) -> int:
        return len(self._seen)
