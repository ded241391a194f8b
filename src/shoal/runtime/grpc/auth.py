"""Node identity for deployment: Ed25519 key files, signatures, replay guard, reply MACs.

Each node owns an Ed25519 key pair; the coordinator admits only public keys in its registry.
Every message a node sends is signed over a fixed context string, the session's challenge,
a timestamp and a fresh nonce, so a recorded message cannot be replayed or forged. Reply
bytes are authenticated by a MAC under a key agreed in the signed hello (:class:`KeyShare`).
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
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from cryptography.hazmat.primitives.poly1305 import Poly1305

from shoal.errors import AuthenticationError, ConfigError

__all__ = [
    "KEY_SHARE_BYTES",
    "LANE_ID_BYTES",
    "NONCE_BYTES",
    "SIGNING_CONTEXT",
    "KeyShare",
    "ReplayGuard",
    "ReplyKey",
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
KEY_SHARE_BYTES = 32
_PUBLIC_BYTES = 32
_REPLY_KEY_INFO = b"shoal-deploy-v1 reply key\x00"
_REPLY_MAC_INFO = b"shoal-deploy-v1 reply mac\x00"
_LANE_ID_INFO = b"shoal-deploy-v1 lane id\x00"
_LANE_TOKEN_INFO = b"shoal-deploy-v1 lane token\x00"
LANE_ID_BYTES = 16


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


class ReplyKey:
    """A session's reply key: authenticates reply bytes far faster than hashing them.

    Each reply gets its own one-time Poly1305 key, derived from this key and the nonce of the
    signed header that announces the reply (nonces never repeat: the replay guard refuses a
    second use), so a tag says "these exact bytes come from the holder of this session key".
    Only the node that signed the hello and the coordinator know the key; unlike a signed
    digest, a third party cannot check the tag, which nothing in shoal needs.
    """

    def __init__(self, secret: bytes) -> None:
        if len(secret) != 32:
            raise ValueError("a reply key is 32 bytes")
        self._secret = secret

    def mac(self, nonce: bytes) -> Poly1305:
        """The incremental MAC for the reply announced with ``nonce``: update, then finalize."""
        if len(nonce) != NONCE_BYTES:
            raise AuthenticationError(
                f"message nonce must be {NONCE_BYTES} random bytes, got {len(nonce)}"
            )
        one_time = HKDFExpand(
            algorithm=hashes.SHA256(), length=32, info=_REPLY_MAC_INFO + nonce
        ).derive(self._secret)
        return Poly1305(one_time)

    def tag(self, nonce: bytes, data: bytes | memoryview) -> bytes:
        mac = self.mac(nonce)
        mac.update(data)
        return mac.finalize()

    def lane(self) -> tuple[bytes, bytes]:
        """(lane id, lane token) of this session's bulk lane, derived from the session secret.

        The id only names the session on the lane (it is sent in the clear); the token never
        travels: each side proves it holds it with an HMAC over a fresh nonce. Separate HKDF
        labels keep both independent of the reply MAC keys.
        """
        lane_id = HKDFExpand(
            algorithm=hashes.SHA256(), length=LANE_ID_BYTES, info=_LANE_ID_INFO
        ).derive(self._secret)
        token = HKDFExpand(algorithm=hashes.SHA256(), length=32, info=_LANE_TOKEN_INFO).derive(
            self._secret
        )
        return lane_id, token


class KeyShare:
    """One side's ephemeral X25519 key for one session (fresh per session, never stored).

    Coordinator and node each send ``public``; the node signs the hello carrying both its
    share and the session's challenge, so the agreed :class:`ReplyKey` is bound to the
    node's registered identity and to this session, even through a TLS-terminating proxy.
    """

    def __init__(self) -> None:
        self._private = X25519PrivateKey.generate()
        self.public = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def agree(
        self,
        peer: bytes,
        *,
        challenge: bytes,
        coordinator_share: bytes,
        node_share: bytes,
        node_key: bytes,
    ) -> ReplyKey:
        """The session's reply key, from ``peer``'s share and what both sides saw."""
        if len(peer) != KEY_SHARE_BYTES:
            raise AuthenticationError(
                f"key share must be {KEY_SHARE_BYTES} bytes, got {len(peer)}: the peer does "
                "not speak this protocol version"
            )
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(peer))
        except ValueError:  # a low-order point: the shared secret would be all zeros
            raise AuthenticationError("invalid key share (a degenerate X25519 point)") from None
        secret = HKDF(
            algorithm=hashes.SHA256(),
            length=32,
            salt=challenge,
            info=_REPLY_KEY_INFO + coordinator_share + node_share + node_key,
        ).derive(shared)
        return ReplyKey(secret)
