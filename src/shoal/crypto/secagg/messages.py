"""SecAgg+ messages: frozen dataclasses that convert to and from flat wire payloads.

A payload maps names to NumPy arrays (bytes travel as uint8 arrays, one row per peer) or
JSON values. ``from_dict`` trusts nothing: any missing field, wrong type, dtype or length
raises ProtocolError naming the field.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, TypeVar

import numpy as np

from shoal.crypto.keys import KEY_BYTES
from shoal.crypto.secagg.params import SecAggParams
from shoal.errors import ConfigError, ProtocolError

__all__ = [
    "AdvertiseReply",
    "AdvertiseRequest",
    "MaskedInputReply",
    "MaskedInputRequest",
    "ShareKeysReply",
    "ShareKeysRequest",
    "UnmaskReply",
    "UnmaskRequest",
    "parse_replies",
]

TYPE_KEY = "secagg"
COMMITMENT_BYTES = 32
SIGNATURE_BYTES = 64  # Ed25519
SIGNATURE_KEY = "signature"
SIGNATURES_KEY = "signatures"


# -- field readers: every one raises ProtocolError with the field's name ------------------------


def _check_type(data: Mapping[str, Any], expected: str) -> None:
    if not isinstance(data, Mapping):
        raise ProtocolError(f"a secagg message is a mapping, got {type(data).__name__}")
    tag = data.get(TYPE_KEY)
    if not isinstance(tag, str) or tag != expected:
        raise ProtocolError(f"expected a {expected!r} secagg message, got {tag!r}")


def _get(data: Mapping[str, Any], key: str) -> Any:
    try:
        return data[key]
    except KeyError:
        raise ProtocolError(f"secagg message lacks field {key!r}") from None


def _str(data: Mapping[str, Any], key: str) -> str:
    value = _get(data, key)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"field {key!r} must be a non-empty string")
    return value


def _str_tuple(data: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = _get(data, key)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ProtocolError(f"field {key!r} must be a list of node id strings")
    if len(set(value)) != len(value):
        raise ProtocolError(f"field {key!r} lists a node twice")
    return tuple(value)


def _array(data: Mapping[str, Any], key: str, dtype: Any, ndim: int) -> np.ndarray:
    value = _get(data, key)
    if not isinstance(value, np.ndarray) or value.dtype != np.dtype(dtype) or value.ndim != ndim:
        got = (
            f"{value.dtype} array of {value.ndim} dims"
            if isinstance(value, np.ndarray)
            else type(value).__name__
        )
        raise ProtocolError(f"field {key!r} must be a {ndim}-D {np.dtype(dtype)} array, got {got}")
    return value


def _bytes(data: Mapping[str, Any], key: str, length: int) -> bytes:
    arr = _array(data, key, np.uint8, 1)
    if arr.shape[0] != length:
        raise ProtocolError(f"field {key!r} must hold {length} bytes, got {arr.shape[0]}")
    return arr.tobytes()


def _rows(data: Mapping[str, Any], key: str, count: int) -> tuple[bytes, ...]:
    arr = _array(data, key, np.uint8, 2)
    if arr.shape[0] != count:
        raise ProtocolError(
            f"field {key!r} must have {count} rows (one per peer), not {arr.shape[0]}"
        )
    return tuple(row.tobytes() for row in arr)


def _as_rows(rows: Sequence[bytes]) -> np.ndarray:
    if not rows:
        return np.zeros((0, 0), dtype=np.uint8)
    width = len(rows[0])
    if any(len(r) != width for r in rows):
        raise ConfigError("rows of one field must all have the same length")
    return np.frombuffer(b"".join(rows), dtype=np.uint8).reshape(len(rows), width).copy()


def _as_bytes(value: bytes) -> np.ndarray:
    return np.frombuffer(bytes(value), dtype=np.uint8).copy()


# -- messages, in protocol order ----------------------------------------------------------------


@dataclass(frozen=True)
class AdvertiseRequest:
    """Server -> every node: the round's parameters (the node validates them itself)."""

    params: SecAggParams
    TYPE: ClassVar[str] = "advertise_request"

    def to_dict(self) -> dict[str, Any]:
        return {TYPE_KEY: self.TYPE, **self.params.to_dict()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdvertiseRequest:
        _check_type(data, cls.TYPE)
        try:
            return cls(params=SecAggParams.from_dict(data))
        except ConfigError as exc:
            raise ProtocolError(f"the server proposed unusable SecAgg parameters: {exc}") from exc


@dataclass(frozen=True)
class AdvertiseReply:
    """Node -> server: the node's two public keys (c: share encryption, s: masking).

    ``signature`` (optional, 64 bytes): the node's identity signature over its keys, which
    the server relays to its neighbours so that a server cannot stand in for a node (nodes
    with identity keys sign; see :class:`shoal.crypto.secagg.KeyAuthority`).
    """

    round_id: str
    node_id: str
    c_public: bytes
    s_public: bytes
    signature: bytes = b""
    TYPE: ClassVar[str] = "advertise_reply"

    def to_dict(self) -> dict[str, Any]:
        out = {
            TYPE_KEY: self.TYPE,
            "round_id": self.round_id,
            "node_id": self.node_id,
            "c_public": _as_bytes(self.c_public),
            "s_public": _as_bytes(self.s_public),
        }
        if self.signature:
            out[SIGNATURE_KEY] = _as_bytes(self.signature)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdvertiseReply:
        _check_type(data, cls.TYPE)
        return cls(
            round_id=_str(data, "round_id"),
            node_id=_str(data, "node_id"),
            c_public=_bytes(data, "c_public", KEY_BYTES),
            s_public=_bytes(data, "s_public", KEY_BYTES),
            signature=(
                _bytes(data, SIGNATURE_KEY, SIGNATURE_BYTES) if SIGNATURE_KEY in data else b""
            ),
        )


@dataclass(frozen=True)
class ShareKeysRequest:
    """Server -> node: the public keys of the node's neighbours that advertised.

    ``signatures``: each peer's identity signature over its keys, relayed as the peers sent
    them (empty when no peer signed; with some signed, unsigned peers get 64 zero bytes).
    """

    round_id: str
    peers: tuple[str, ...]
    c_publics: tuple[bytes, ...]
    s_publics: tuple[bytes, ...]
    signatures: tuple[bytes, ...] = ()
    TYPE: ClassVar[str] = "share_keys_request"

    def to_dict(self) -> dict[str, Any]:
        out = {
            TYPE_KEY: self.TYPE,
            "round_id": self.round_id,
            "peers": list(self.peers),
            "c_public": _as_rows(self.c_publics).reshape(len(self.peers), KEY_BYTES),
            "s_public": _as_rows(self.s_publics).reshape(len(self.peers), KEY_BYTES),
        }
        if self.signatures:
            out[SIGNATURES_KEY] = _as_rows(self.signatures).reshape(
                len(self.peers), SIGNATURE_BYTES
            )
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShareKeysRequest:
        _check_type(data, cls.TYPE)
        peers = _str_tuple(data, "peers")
        c = _rows(data, "c_public", len(peers))
        s = _rows(data, "s_public", len(peers))
        if any(len(k) != KEY_BYTES for k in c + s):
            raise ProtocolError(f"public keys are {KEY_BYTES} bytes")
        signatures: tuple[bytes, ...] = ()
        if SIGNATURES_KEY in data:
            signatures = _rows(data, SIGNATURES_KEY, len(peers))
            if any(len(g) != SIGNATURE_BYTES for g in signatures):
                raise ProtocolError(f"identity signatures are {SIGNATURE_BYTES} bytes")
        return cls(
            round_id=_str(data, "round_id"),
            peers=peers,
            c_publics=c,
            s_publics=s,
            signatures=signatures,
        )


@dataclass(frozen=True)
class ShareKeysReply:
    """Node -> server: encrypted shares for each neighbour, and a commitment to its self-mask."""

    round_id: str
    node_id: str
    recipients: tuple[str, ...]
    ciphertexts: tuple[bytes, ...]
    b_commitment: bytes
    TYPE: ClassVar[str] = "share_keys_reply"

    def to_dict(self) -> dict[str, Any]:
        return {
            TYPE_KEY: self.TYPE,
            "round_id": self.round_id,
            "node_id": self.node_id,
            "recipients": list(self.recipients),
            "ciphertexts": _as_rows(self.ciphertexts),
            "b_commitment": _as_bytes(self.b_commitment),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ShareKeysReply:
        _check_type(data, cls.TYPE)
        recipients = _str_tuple(data, "recipients")
        return cls(
            round_id=_str(data, "round_id"),
            node_id=_str(data, "node_id"),
            recipients=recipients,
            ciphertexts=_rows(data, "ciphertexts", len(recipients)),
            b_commitment=_bytes(data, "b_commitment", COMMITMENT_BYTES),
        )


@dataclass(frozen=True)
class MaskedInputRequest:
    """Server -> node: the ciphertexts its neighbours addressed to it."""

    round_id: str
    senders: tuple[str, ...]
    ciphertexts: tuple[bytes, ...]
    TYPE: ClassVar[str] = "masked_input_request"

    def to_dict(self) -> dict[str, Any]:
        return {
            TYPE_KEY: self.TYPE,
            "round_id": self.round_id,
            "senders": list(self.senders),
            "ciphertexts": _as_rows(self.ciphertexts),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MaskedInputRequest:
        _check_type(data, cls.TYPE)
        senders = _str_tuple(data, "senders")
        return cls(
            round_id=_str(data, "round_id"),
            senders=senders,
            ciphertexts=_rows(data, "ciphertexts", len(senders)),
        )


@dataclass(frozen=True)
class MaskedInputReply:
    """Node -> server: its input plus masks, modulo 2**bits (uniformly random on its own)."""

    round_id: str
    node_id: str
    masked: np.ndarray
    TYPE: ClassVar[str] = "masked_input_reply"

    def to_dict(self) -> dict[str, Any]:
        return {
            TYPE_KEY: self.TYPE,
            "round_id": self.round_id,
            "node_id": self.node_id,
            "masked": self.masked,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MaskedInputReply:
        _check_type(data, cls.TYPE)
        masked = _get(data, "masked")
        if not isinstance(masked, np.ndarray) or masked.dtype.kind != "u" or masked.ndim != 1:
            raise ProtocolError("field 'masked' must be a 1-D unsigned integer array")
        return cls(round_id=_str(data, "round_id"), node_id=_str(data, "node_id"), masked=masked)


@dataclass(frozen=True)
class UnmaskRequest:
    """Server -> surviving node: who sent a masked input, and who shared keys but did not."""

    round_id: str
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    TYPE: ClassVar[str] = "unmask_request"

    def to_dict(self) -> dict[str, Any]:
        return {
            TYPE_KEY: self.TYPE,
            "round_id": self.round_id,
            "survivors": list(self.survivors),
            "dropped": list(self.dropped),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UnmaskRequest:
        _check_type(data, cls.TYPE)
        return cls(
            round_id=_str(data, "round_id"),
            survivors=_str_tuple(data, "survivors"),
            dropped=_str_tuple(data, "dropped"),
        )


@dataclass(frozen=True)
class UnmaskReply:
    """Node -> server: self-mask shares of survivors and mask-key shares of dropped nodes."""

    round_id: str
    node_id: str
    b_peers: tuple[str, ...]
    b_shares: tuple[bytes, ...]
    s_peers: tuple[str, ...]
    s_shares: tuple[bytes, ...]
    TYPE: ClassVar[str] = "unmask_reply"

    def to_dict(self) -> dict[str, Any]:
        return {
            TYPE_KEY: self.TYPE,
            "round_id": self.round_id,
            "node_id": self.node_id,
            "b_peers": list(self.b_peers),
            "b_shares": _as_rows(self.b_shares),
            "s_peers": list(self.s_peers),
            "s_shares": _as_rows(self.s_shares),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> UnmaskReply:
        _check_type(data, cls.TYPE)
        b_peers = _str_tuple(data, "b_peers")
        s_peers = _str_tuple(data, "s_peers")
        return cls(
            round_id=_str(data, "round_id"),
            node_id=_str(data, "node_id"),
            b_peers=b_peers,
            b_shares=_rows(data, "b_shares", len(b_peers)),
            s_peers=s_peers,
            s_shares=_rows(data, "s_shares", len(s_peers)),
        )


class _Message(Protocol):
    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Any: ...


_M = TypeVar("_M", bound=_Message)


def parse_replies(
    kind: type[_M], payloads: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, _M], dict[str, str]]:
    """Decode the replies that arrived; a malformed one is a failure (its node drops out)."""
    parsed: dict[str, _M] = {}
    failures: dict[str, str] = {}
    for node, payload in payloads.items():
        try:
            parsed[node] = kind.from_dict(payload)
        except ProtocolError as exc:
            failures[node] = str(exc)
    return parsed, failures
