"""Encode payloads (names -> NumPy arrays or JSON values) to bytes and back, without pickle.

Layout: ``b"SHWL"``, a version byte, three zero bytes, a little-endian u32 header length,
a UTF-8 JSON header, then the raw little-endian bytes of each array at 64-byte aligned
offsets. Decoding returns read-only NumPy views into the input buffer (zero-copy).
"""

from __future__ import annotations

import functools
import json
import json.encoder as json_encoder
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from shoal.errors import WireError

__all__ = [
    "DTYPES",
    "VERSION",
    "JsonValue",
    "Payload",
    "WireLimits",
    "decode",
    "dtype_str",
    "encode",
]

MAGIC = b"SHWL"
VERSION = 1
_PREFIX = struct.Struct("<4sB3sI")
_ALIGN = 64
_LARGE = 1 << 20  # above this, assemble in a NumPy buffer

JsonValue = Union[  # noqa: UP007 (recursive alias)
    None, bool, int, float, str, list["JsonValue"], dict[str, "JsonValue"]
]
Payload = Mapping[str, Any]

# Only plain numeric dtypes cross the wire; object, string, void and datetime arrays never do.
DTYPES: dict[str, np.dtype[Any]] = {
    str(np.dtype(name).newbyteorder("<").str): np.dtype(name).newbyteorder("<")
    for name in (
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    )
}

# ``dtype.str`` builds a new string at every call (~0.5 us, several times per node and
# round); the wire's dtypes are looked up by equality instead (equal dtypes have equal strs).
_DTYPE_STR: dict[np.dtype[Any], str] = {dtype: key for key, dtype in DTYPES.items()}


def dtype_str(dtype: np.dtype[Any]) -> str:
    """``dtype.str``, without building it again for the dtypes the wire carries."""
    key = _DTYPE_STR.get(dtype)
    return key if key is not None else dtype.str


@dataclass(frozen=True, kw_only=True)
class WireLimits:
    """Bounds a decoder enforces before it trusts anything in a message."""

    max_bytes: int = 1 << 36  # 64 GiB: large models are streamed in chunks by transports
    max_items: int = 4096
    max_ndim: int = 32
    max_name_chars: int = 256
    max_header_bytes: int = 16 << 20
    max_string_chars: int = 1 << 20
    max_json_depth: int = 32


DEFAULT_LIMITS = WireLimits()
# json.dumps with options builds a new encoder at every call, which cost as much as encoding
# a small header: every node sends one small message per task. JSONEncoder.encode still makes
# its C encoder per call, so the C encoder is made once here. It runs without a circular-
# reference check: every JSON value has passed _check_json, whose depth limit stops a cycle.
_HEADER_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=True)
_MAKE_ENCODER: Any = getattr(json_encoder, "c_make_encoder", None)  # None without _json
_C_ENCODER: Any = (
    None
    if _MAKE_ENCODER is None
    else _MAKE_ENCODER(
        None,  # markers: no circular check (see above)
        _HEADER_ENCODER.default,
        json_encoder.encode_basestring_ascii,
        None,  # indent
        ":",
        ",",
        False,  # sort_keys
        False,  # skipkeys
        True,  # allow_nan
    )
)


def _header_json(header: Any) -> str:
    if _C_ENCODER is None:
        return _HEADER_ENCODER.encode(header)
    return "".join(_C_ENCODER(header, 0))


@functools.lru_cache(maxsize=256)
def _entries_json(entries: tuple[tuple[str, str, tuple[int, ...], int, int], ...]) -> str:
    """The header's array entries as JSON text. Messages of one kind carry the same arrays
    at the same offsets (every node's receipt of a map): their text is made once."""
    return _header_json(
        [[name, key, list(shape), offset, nbytes] for name, key, shape, offset, nbytes in entries]
    )


_HEADER_DECODER = json.JSONDecoder()
_HEADER_KEYS = frozenset("ajn")


_PADS = tuple(bytes(n) for n in range(_ALIGN))  # the zero bytes of each padding length


def _pad(n: int) -> int:
    return (-n) % _ALIGN


def _check_name(name: object, limits: WireLimits) -> str:
    if not isinstance(name, str) or not name:
        raise WireError(f"payload names must be non-empty strings, got {name!r}")
    if len(name) > limits.max_name_chars:
        raise WireError(
            f"payload name {name[:40]!r}... is {len(name)} characters; "
            f"the limit is {limits.max_name_chars}"
        )
    return name


_JSON_ATOMS = (type(None), bool, int, float)


def _string_too_long(text: str, limits: WireLimits) -> WireError:
    return WireError(
        f"string of {len(text)} characters exceeds the limit of "
        f"{limits.max_string_chars}; send large data as a uint8 array"
    )


def _check_json(value: object, limits: WireLimits, depth: int = 0) -> None:
    """Raise WireError unless ``value`` is JSON within the limits.

    Atoms and strings inside containers are checked inline: a call per element dominated
    the cost of small messages, which every node sends every round.
    """
    kind = type(value)
    if kind in _JSON_ATOMS:
        return
    if kind is str:
        if len(value) > limits.max_string_chars:  # type: ignore[arg-type]
            raise _string_too_long(value, limits)  # type: ignore[arg-type]
        return
    if kind is list or kind is tuple or kind is dict:
        if depth >= limits.max_json_depth:
            raise WireError(f"JSON value nested deeper than {limits.max_json_depth} levels")
        container: Any = value
        items = container.values() if kind is dict else container
        if kind is dict:
            for key in container:
                if type(key) is not str:
                    raise WireError(f"JSON object keys must be strings, got {key!r}")
                if len(key) > limits.max_string_chars:
                    raise _string_too_long(key, limits)
        for item in items:
            item_kind = type(item)
            if item_kind in _JSON_ATOMS:
                continue
            if item_kind is str:
                if len(item) > limits.max_string_chars:
                    raise _string_too_long(item, limits)
                continue
            _check_json(item, limits, depth + 1)
        return
    # Subclasses: numpy.float64, IntEnum, str or dict subclasses...
    if isinstance(value, str):
        _check_json(str(value), limits, depth)
    elif isinstance(value, (bool, int, float)):
        return
    elif isinstance(value, (list, tuple)):
        _check_json(list(value), limits, depth)
    elif isinstance(value, dict):
        _check_json(dict(value), limits, depth)
    else:
        raise WireError(
            f"cannot send a {type(value).__name__} over the wire: payload values must be NumPy "
            "arrays of numeric dtypes or JSON values (None, bool, int, float, str, list, dict)"
        )


def _as_wire_array(name: str, value: np.ndarray | np.generic, limits: WireLimits) -> np.ndarray:
    array = np.asarray(value)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    key = array.dtype.str
    if key not in DTYPES:
        raise WireError(
            f"array {name!r} has dtype {array.dtype}, which the wire format refuses; "
            f"use one of: bool, int8..int64, uint8..uint64, float16/32/64, complex64/128"
        )
    if array.ndim > limits.max_ndim:
        raise WireError(f"array {name!r} has {array.ndim} dimensions; limit {limits.max_ndim}")
    # np.ascontiguousarray would turn a 0-d array into a 1-d one.
    return array if array.flags.c_contiguous else array.copy(order="C")


def encode(payload: Payload, *, limits: WireLimits = DEFAULT_LIMITS) -> memoryview:
    """Encode ``payload`` to a read-only bytes-like view; array data is copied exactly once.

    Large payloads are assembled in a NumPy buffer, which copies at memory speed where
    building a Python ``bytes`` object of the same size is several times slower.
    """
    if type(payload) is not dict and not isinstance(payload, Mapping):
        raise WireError(f"a payload is a mapping of names to values, got {type(payload).__name__}")
    if len(payload) > limits.max_items:
        raise WireError(f"payload has {len(payload)} items; the limit is {limits.max_items}")
    arrays: list[np.ndarray] = []
    entries: list[tuple[str, str, tuple[int, ...], int, int]] = []
    scalars: dict[str, Any] = {}
    offset = 0
    max_name, max_ndim = limits.max_name_chars, limits.max_ndim
    # The common cases (str names, native little-endian contiguous arrays, JSON atoms and
    # short strings) are checked inline; anything else takes the full checks, which raise
    # with the reason.
    for name, value in payload.items():
        if type(name) is not str or not name or len(name) > max_name:
            _check_name(name, limits)
        kind = type(value)
        if kind is np.ndarray or isinstance(value, (np.ndarray, np.generic)):
            key = dtype_str(value.dtype)
            if (
                kind is not np.ndarray  # scalars, ndarray subclasses
                or key not in DTYPES
                or not value.flags.c_contiguous
                or value.ndim > max_ndim
            ):
                value = _as_wire_array(name, value, limits)
                key = value.dtype.str
            nbytes = value.nbytes
            entries.append((name, key, value.shape, offset, nbytes))
            arrays.append(value)
            offset += nbytes + (-nbytes) % _ALIGN
        else:
            if kind not in _JSON_ATOMS and (
                kind is not str or len(value) > limits.max_string_chars
            ):
                _check_json(value, limits)
            scalars[name] = value
    data_len = offset
    try:
        header = (
            f'{{"a":{_entries_json(tuple(entries))},"j":{_header_json(scalars)},"n":{data_len}}}'
        ).encode()
    except (ValueError, TypeError, RecursionError) as exc:
        raise WireError(f"payload JSON values cannot be encoded: {exc}") from None
    if len(header) > limits.max_header_bytes:
        raise WireError(
            f"payload header is {len(header)} bytes (JSON values and array names); the limit "
            f"is {limits.max_header_bytes}: send bulky values as arrays"
        )
    head_len = _PREFIX.size + len(header)
    total = head_len + _pad(head_len) + data_len
    if total > limits.max_bytes:
        raise WireError(f"payload is {total} bytes; the limit is {limits.max_bytes}")
    prefix = _PREFIX.pack(MAGIC, VERSION, b"\0\0\0", len(header))
    if total < _LARGE:
        # bytes.join reads each (C-contiguous) array through the buffer protocol.
        parts: list[Any] = [prefix, header, _PADS[_pad(head_len)]]
        for array in arrays:
            parts.append(array)
            parts.append(_PADS[_pad(array.nbytes)])
        return memoryview(b"".join(parts))
    buffer = np.empty(total, dtype=np.uint8)
    buffer[: _PREFIX.size] = np.frombuffer(prefix, dtype=np.uint8)
    buffer[_PREFIX.size : head_len] = np.frombuffer(header, dtype=np.uint8)
    position = head_len + _pad(head_len)
    buffer[head_len:position] = 0
    for array in arrays:
        end = position + array.nbytes
        buffer[position:end] = array.reshape(-1).view(np.uint8)
        position = end + _pad(array.nbytes)
        buffer[end:position] = 0
    buffer.flags.writeable = False
    return buffer.data


def decode(
    data: bytes | bytearray | memoryview, *, limits: WireLimits = DEFAULT_LIMITS
) -> dict[str, Any]:
    """Decode bytes made by :func:`encode`; raise :class:`WireError` on anything else."""
    try:
        view = memoryview(data)
    except TypeError:
        raise WireError(f"expected bytes, got {type(data).__name__}") from None
    if not view.c_contiguous:
        # A strided buffer cannot be viewed as one run of bytes: decode a compact copy.
        view = memoryview(view.tobytes())
    elif view.ndim != 1 or view.format != "B":
        view = view.cast("B")
    try:
        return _decode(view, limits)
    except WireError:
        raise
    except (
        ValueError,
        TypeError,
        KeyError,
        IndexError,
        OverflowError,
        RecursionError,
        BufferError,
    ) as exc:
        # Defence in depth: every check below should fire first, but a decoder must never
        # leak another exception type to a server handling hostile bytes.
        raise WireError(f"malformed payload: {type(exc).__name__}: {exc}") from None


def _decode(view: memoryview, limits: WireLimits) -> dict[str, Any]:
    size = view.nbytes
    if size > limits.max_bytes:
        raise WireError(f"payload is {size} bytes; the limit is {limits.max_bytes}")
    if size < _PREFIX.size:
        raise WireError(f"payload is {size} bytes, shorter than the {_PREFIX.size}-byte prefix")
    magic, version, reserved, header_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise WireError("not a shoal payload (bad magic bytes); was it encoded with shoal.wire?")
    if version != VERSION:
        raise WireError(
            f"payload wire version {version} is not supported (this shoal speaks version "
            f"{VERSION}); upgrade the older side"
        )
    if reserved != b"\0\0\0":
        raise WireError("reserved prefix bytes are not zero")
    if header_len > limits.max_header_bytes:
        raise WireError(f"header of {header_len} bytes exceeds {limits.max_header_bytes}")
    head_end = _PREFIX.size + header_len
    if head_end > size:
        raise WireError("payload truncated inside its header")
    try:
        text = str(view[_PREFIX.size : head_end], "utf-8")
    except UnicodeDecodeError:
        raise WireError("payload header is not valid UTF-8") from None
    # Many messages share one header (every node's receipt of a map, every fetch request):
    # a header is parsed and checked once, and later messages only cut their arrays.
    if len(text) > _CACHED_HEADER_CHARS:
        header = _parse_header(text, limits)
    elif limits is DEFAULT_LIMITS:  # keyed by the text alone: hashing the limits cost ~2 us
        header = _cached_default_header(text)
    else:
        header = _cached_header(text, limits)
    data_start = head_end + _pad(head_end)
    if data_start + header.data_len != size:
        raise WireError(
            f"payload length {size} does not match its header ({data_start + header.data_len}); "
            "it was truncated or has trailing bytes"
        )
    if header.problem is not None:
        raise WireError(header.problem)
    out: dict[str, Any] = {}
    for name, dtype, shape, offset, nbytes in header.arrays:
        start = data_start + offset
        out[name] = np.frombuffer(view[start : start + nbytes], dtype=dtype).reshape(shape)
    scalars = header.scalars
    if header.containers:  # each message's own copy of its lists and dicts
        for name, value in scalars.items():
            out[name] = copy_json(value) if type(value) in (list, dict) else value
    else:
        out.update(scalars)
    return out


# Headers up to this size are cached (after their checks) in a bounded LRU cache.
_CACHED_HEADER_CHARS = 4096


@dataclass(frozen=True)
class _Header:
    """A message header, checked: its arrays (name, dtype, shape, offset, nbytes), its JSON
    values, the length of its data, and the first problem found in its entries (raised
    only once the message's length is known to match)."""

    arrays: tuple[tuple[str, np.dtype[Any], tuple[int, ...], int, int], ...]
    scalars: dict[str, Any]
    data_len: int
    containers: bool
    problem: str | None


def _parse_header(text: str, limits: WireLimits) -> _Header:
    # A header this small cannot hold a string over the limit nor nest deeper than its
    # brackets: the per-value JSON walk below would find nothing (it dominated small replies).
    small = len(text) <= limits.max_string_chars and (
        text.count("[") + text.count("{") <= limits.max_json_depth
    )
    try:
        header = _HEADER_DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise WireError(f"payload header is not valid JSON: {exc.msg}") from None
    if type(header) is not dict or len(header) != 3 or not _HEADER_KEYS.issuperset(header):
        raise WireError("payload header must be an object with keys 'a', 'j' and 'n'")
    entries, scalars, data_len = header["a"], header["j"], header["n"]
    if not isinstance(entries, list) or not isinstance(scalars, dict):
        raise WireError("payload header fields 'a' (list) and 'j' (object) have wrong types")
    if type(data_len) is not int or data_len < 0:
        raise WireError("payload header field 'n' must be a non-negative integer")
    if len(entries) + len(scalars) > limits.max_items:
        raise WireError(f"payload has more than {limits.max_items} items")
    arrays = []
    seen: set[str] = set()
    try:
        end_of_previous = 0
        for entry in entries:
            array = _check_array(entry, data_len, end_of_previous, limits)
            name = array[0]
            if name in seen:
                raise WireError(f"payload names {name!r} twice")
            seen.add(name)
            arrays.append(array)
            end_of_previous = array[3] + array[4]
        for name, value in scalars.items():
            _check_name(name, limits)
            if not small:
                _check_json(value, limits)
            if name in seen:
                raise WireError(f"payload names {name!r} twice")
            seen.add(name)
    except WireError as exc:
        return _Header(arrays=(), scalars={}, data_len=data_len, containers=False, problem=str(exc))
    containers = any(type(v) in (list, dict) for v in scalars.values())
    return _Header(
        arrays=tuple(arrays),
        scalars=scalars,
        data_len=data_len,
        containers=containers,
        problem=None,
    )


_cached_header = functools.lru_cache(maxsize=256)(_parse_header)


@functools.lru_cache(maxsize=256)
def _cached_default_header(text: str) -> _Header:
    return _parse_header(text, DEFAULT_LIMITS)


def copy_json(value: Any) -> Any:
    """A deep copy of decoded JSON (lists, dicts and atoms), several times faster than
    copy.deepcopy on the small lists and dicts that payloads carry."""
    if type(value) is list:
        return [copy_json(v) if type(v) in (list, dict) else v for v in value]
    if type(value) is dict:
        return {k: copy_json(v) if type(v) in (list, dict) else v for k, v in value.items()}
    return value


def _check_array(
    entry: object, data_len: int, min_offset: int, limits: WireLimits
) -> tuple[str, np.dtype[Any], tuple[int, ...], int, int]:
    if not isinstance(entry, list) or len(entry) != 5:
        raise WireError("array entries must be [name, dtype, shape, offset, nbytes]")
    name, dtype_key, shape, offset, nbytes = entry
    _check_name(name, limits)
    dtype = DTYPES.get(dtype_key) if isinstance(dtype_key, str) else None
    if dtype is None:
        raise WireError(f"array {name!r} has dtype {dtype_key!r}, which is not allowed")
    if not isinstance(shape, list) or len(shape) > limits.max_ndim:
        raise WireError(f"array {name!r} shape must be a list of at most {limits.max_ndim} ints")
    for dim in shape:
        if type(dim) is not int or dim < 0:
            raise WireError(f"array {name!r} shape {shape!r} must hold non-negative integers")
    if type(offset) is not int or type(nbytes) is not int:
        raise WireError(f"array {name!r} offset and size must be integers")
    if nbytes != math.prod(shape) * dtype.itemsize:
        raise WireError(f"array {name!r}: {nbytes} bytes do not match shape {shape} and dtype")
    if offset < min_offset or offset % _ALIGN or offset + nbytes > data_len:
        raise WireError(f"array {name!r} lies outside the payload or overlaps another")
    return name, dtype, tuple(shape), offset, nbytes
