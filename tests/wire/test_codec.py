"""Tests for the wire codec: round trips, hostile bytes, limits, and what encode refuses."""

from __future__ import annotations

import json
import math
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from shoal.errors import WireError
from shoal.wire import DTYPES, VERSION, WireLimits, decode, encode

DTYPE_NAMES = [
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
]
PREFIX = struct.Struct("<4sB3sI")
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- helpers --------------------------------------------------------------------------------


def wire_bytes(array: np.ndarray) -> bytes:
    """The bytes a faithful round trip must reproduce: little-endian, C order."""
    little = array.astype(array.dtype.newbyteorder("<")) if array.dtype.byteorder == ">" else array
    return np.ascontiguousarray(little).tobytes()


def assert_same_array(original: np.ndarray, decoded: np.ndarray) -> None:
    assert isinstance(decoded, np.ndarray)
    assert decoded.shape == original.shape
    assert decoded.dtype == original.dtype.newbyteorder("<")
    assert decoded.dtype.byteorder in "<|="
    # Comparing bytes is exact, keeps NaN payloads and -0.0, and works for every dtype.
    assert decoded.tobytes() == wire_bytes(original)


def craft(header: Any, data: bytes = b"", *, raw_header: bytes | None = None) -> bytes:
    """A message with a hand-written header, padded like the encoder pads it."""
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    out = PREFIX.pack(b"SHWL", VERSION, b"\0\0\0", len(body)) + body
    out += b"\0" * ((-len(out)) % 64)
    return out + data


def header_of(encoded: bytes) -> tuple[dict[str, Any], int]:
    _, _, _, length = PREFIX.unpack_from(encoded, 0)
    return json.loads(encoded[PREFIX.size : PREFIX.size + length]), PREFIX.size + length


def nested(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def decode_or_wire_error(data: Any, **kwargs: Any) -> dict[str, Any] | None:
    """Decoding hostile input may succeed or raise WireError; nothing else is acceptable."""
    try:
        return decode(data, **kwargs)
    except WireError:
        return None


# -- strategies ------------------------------------------------------------------------------

names = st.text(min_size=1, max_size=40)
dtypes = st.sampled_from(DTYPE_NAMES).flatmap(
    lambda name: st.sampled_from(
        [np.dtype(name), np.dtype(name).newbyteorder(">"), np.dtype(name).newbyteorder("<")]
    )
)
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
plain_arrays = dtypes.flatmap(lambda dt: hnp.arrays(dt, shapes))


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    """Arrays of every wire dtype and byte order, contiguous or not."""
    array = draw(plain_arrays)
    layout = draw(st.sampled_from(["c", "transpose", "step", "fortran"]))
    if layout == "transpose":
        return array.T
    if layout == "step" and array.ndim:
        return array[::2]
    if layout == "fortran":
        return np.asfortranarray(array)
    return array


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=15,
)
payloads = st.dictionaries(names, arrays() | json_values, max_size=6)


# -- round trips ------------------------------------------------------------------------------


@FAST
@given(payloads)
def test_round_trip_of_arbitrary_payloads(payload: dict[str, Any]) -> None:
    decoded = decode(encode(payload))
    assert set(decoded) == set(payload)
    for name, value in payload.items():
        if isinstance(value, np.ndarray):
            assert_same_array(value, decoded[name])
        else:
            assert decoded[name] == value


@pytest.mark.parametrize("name", DTYPE_NAMES)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (1,), (2, 3, 4)])
def test_every_dtype_and_shape(name: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=math.prod(shape) * np.dtype(name).itemsize, dtype=np.uint8)
    array = raw.view(name).reshape(shape) if name != "bool" else (raw % 2).astype(bool)
    array = array.reshape(shape)
    decoded = decode(encode({"x": array}))["x"]
    assert_same_array(array, decoded)


def test_whitelist_is_exactly_the_numeric_dtypes() -> None:
    assert set(DTYPES) == {np.dtype(n).newbyteorder("<").str for n in DTYPE_NAMES}


def test_big_endian_input_arrives_little_endian() -> None:
    array = np.arange(6, dtype=">f8").reshape(2, 3)
    decoded = decode(encode({"x": array}))["x"]
    assert decoded.dtype == np.dtype("<f8")
    np.testing.assert_array_equal(decoded, array)


def test_numpy_scalars_become_zero_d_arrays() -> None:
    decoded = decode(encode({"f": np.float32(1.5), "b": np.bool_(True)}))
    assert decoded["f"].shape == () and decoded["f"].dtype == np.float32
    assert decoded["f"] == np.float32(1.5) and decoded["b"].item() is True


def test_json_specials_and_unicode() -> None:
    payload = {
        "π · ünïcødé 🐟": "text with \u2028 and \0 and 🐟",
        "nan": math.nan,
        "inf": [math.inf, -math.inf],
        "big": 10**40,
        "nested": {"a": [1, {"b": None}], "": True},
        "tuple": (1, 2),
    }
    decoded = decode(encode(payload))
    assert math.isnan(decoded["nan"])
    assert decoded["inf"] == [math.inf, -math.inf]
    assert decoded["big"] == 10**40
    assert decoded["nested"] == payload["nested"]
    assert decoded["tuple"] == [1, 2]
    assert decoded["π · ünïcødé 🐟"] == payload["π · ünïcødé 🐟"]


def test_large_payload_path_round_trips_and_is_read_only() -> None:
    # Above 1 MiB the encoder assembles the message in a NumPy buffer instead of bytes.join.
    big = np.arange(300_000, dtype=np.float64)[::-1]  # non-contiguous, 2.4 MB
    small = np.arange(5, dtype=">i4")
    encoded = encode({"big": big, "small": small, "meta": {"k": [1, 2]}})
    assert encoded.readonly
    decoded = decode(encoded)
    assert_same_array(big, decoded["big"])
    assert_same_array(small, decoded["small"])
    assert decoded["meta"] == {"k": [1, 2]}


def test_empty_payload() -> None:
    assert decode(encode({})) == {}


def test_encode_returns_a_read_only_view_of_the_stated_size() -> None:
    encoded = encode({"x": np.ones(3)})
    assert isinstance(encoded, memoryview) and encoded.readonly
    assert encoded.nbytes == len(bytes(encoded))
    assert len(bytes(encoded)) % 64 == 0  # header and arrays are padded to 64 bytes


def test_decoded_arrays_are_read_only_zero_copy_views_of_bytes() -> None:
    data = bytes(encode({"x": np.arange(10.0), "y": np.ones((2, 2), np.int16)}))
    decoded = decode(data)
    for array in decoded.values():
        assert not array.flags.writeable
        with pytest.raises(ValueError):
            array[...] = 0
        # A view into the input, not a copy.
        assert np.shares_memory(array, np.frombuffer(data, dtype=np.uint8))


def test_arrays_sit_at_64_byte_offsets() -> None:
    data = bytearray(encode({"a": np.ones(3, np.int8), "b": np.ones(7), "c": np.ones(1)}))
    base = np.frombuffer(data, dtype=np.uint8).ctypes.data
    for array in decode(data).values():
        assert (array.ctypes.data - base) % 64 == 0


def test_any_bytes_like_input_decodes() -> None:
    data = bytes(encode({"x": np.arange(4.0), "s": "hi"}))
    as_uint8 = np.frombuffer(data, dtype=np.uint8)
    strided = np.zeros((len(data), 2), dtype=np.uint8)
    strided[:, 0] = as_uint8
    for variant in (
        bytearray(data),
        memoryview(data),
        as_uint8,
        memoryview(as_uint8.view(np.int8)),
        memoryview(strided[:, 0]),  # not contiguous
        memoryview(as_uint8.view(np.float64)),  # multi-byte items
    ):
        out = decode(variant)
        np.testing.assert_array_equal(out["x"], np.arange(4.0))
        assert out["s"] == "hi"


# -- fuzzing -----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_wire_error(data: bytes) -> None:
    decode_or_wire_error(data)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=400))
def test_random_bytes_after_a_valid_prefix_raise_only_wire_error(body: bytes, length: int) -> None:
    decode_or_wire_error(PREFIX.pack(b"SHWL", VERSION, b"\0\0\0", length) + body)


@settings(max_examples=200, deadline=None)
@given(json_values, st.binary(max_size=200))
def test_arbitrary_json_headers_raise_only_wire_error(header: Any, data: bytes) -> None:
    decode_or_wire_error(craft(header, data))


entry_parts = st.one_of(
    st.none() | st.booleans() | st.floats() | st.text(max_size=5),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.lists(st.integers(min_value=-(2**70), max_value=2**70), max_size=5),
    st.sampled_from(["<f4", "|b1", "|O", "|V8", "<M8[ns]", "|S5", "<U3", ">f8", "<f16"]),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(entry_parts, min_size=5, max_size=5), max_size=3), st.data())
def test_arbitrary_array_entries_raise_only_wire_error(entries: list[Any], data: Any) -> None:
    n = data.draw(st.sampled_from([0, 64, 128, 192]))
    decode_or_wire_error(craft({"a": entries, "j": {}, "n": n}, bytes(n)))


@st.composite
def mutations(draw: st.DrawFn) -> bytes:
    payload = draw(st.dictionaries(names, arrays() | json_values, min_size=1, max_size=3))
    data = bytearray(encode(payload))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        if not data:
            break
        at = draw(st.integers(min_value=0, max_value=len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        elif kind == "set":
            data[at] = draw(st.integers(min_value=0, max_value=255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at : at + draw(st.integers(min_value=1, max_value=8))]
    return bytes(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations())
def test_mutated_encodings_raise_only_wire_error(data: bytes) -> None:
    decode_or_wire_error(data)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(names, arrays() | json_values, max_size=4), st.data())
def test_every_truncation_is_refused(payload: dict[str, Any], data: Any) -> None:
    encoded = bytes(encode(payload))
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    with pytest.raises(WireError):
        decode(encoded[:cut])
    with pytest.raises(WireError):
        decode(encoded + b"\0")


def valid_header() -> tuple[dict[str, Any], bytes]:
    encoded = bytes(encode({"a": np.arange(4, dtype=np.float32), "b": np.ones(2), "s": 1}))
    header, end = header_of(encoded)
    data_start = end + (-end) % 64
    return header, encoded[data_start:]


def edit_entry(index: int, position: int, value: Any) -> bytes:
    header, data = valid_header()
    header["a"][index][position] = value
    return craft(header, data)


HOSTILE: dict[str, bytes] = {
    "huge shape": edit_entry(0, 2, [2**62, 2**62]),
    "huge shape with zero": edit_entry(0, 2, [0, 2**62, 2**62]),
    "shape beyond int64": edit_entry(0, 2, [0, 2**64]),
    "too many dimensions": edit_entry(0, 2, [1] * 40),
    "negative dimension": edit_entry(0, 2, [-4]),
    "float dimension": edit_entry(0, 2, [4.0]),
    "bool dimension": edit_entry(0, 2, [True]),
    "shape not a list": edit_entry(0, 2, 4),
    "negative offset": edit_entry(1, 3, -64),
    "unaligned offset": edit_entry(1, 3, 8),
    "overlapping arrays": edit_entry(1, 3, 0),
    "offset past the end": edit_entry(1, 3, 10**6),
    "bool offset": edit_entry(0, 3, False),
    "float offset": edit_entry(0, 3, 0.0),
    "nbytes mismatch": edit_entry(0, 4, 12),
    "huge nbytes": edit_entry(0, 4, 2**80),
    "dtype O": edit_entry(0, 1, "|O"),
    "dtype V8": edit_entry(0, 1, "|V8"),
    "dtype M8": edit_entry(0, 1, "<M8"),
    "dtype M8[ns]": edit_entry(0, 1, "<M8[ns]"),
    "dtype S5": edit_entry(0, 1, "S5"),
    "dtype U1": edit_entry(0, 1, "<U1"),
    "big-endian dtype": edit_entry(0, 1, ">f4"),
    "longdouble": edit_entry(0, 1, "<f16"),
    "dtype not a string": edit_entry(0, 1, 4),
    "empty name": edit_entry(0, 0, ""),
    "name not a string": edit_entry(0, 0, 7),
    "long name": edit_entry(0, 0, "x" * 10_000),
    "duplicate array name": edit_entry(1, 0, "a"),
    "short entry": craft({"a": [["a", "<f4", [1], 0]], "j": {}, "n": 64}, bytes(64)),
    "entry not a list": craft({"a": [{"name": "a"}], "j": {}, "n": 0}),
    "array and scalar share a name": craft(
        {"a": [["a", "|u1", [1], 0, 1]], "j": {"a": 1}, "n": 64}, bytes(64)
    ),
    "header is a list": craft([1, 2, 3]),
    "header lacks a key": craft({"a": [], "j": {}}),
    "header has an extra key": craft({"a": [], "j": {}, "n": 0, "x": 1}),
    "a is not a list": craft({"a": {}, "j": {}, "n": 0}),
    "j is not an object": craft({"a": [], "j": [], "n": 0}),
    "negative n": craft({"a": [], "j": {}, "n": -64}),
    "float n": craft({"a": [], "j": {}, "n": 0.0}),
    "NaN n": craft(None, raw_header=b'{"a":[],"j":{},"n":NaN}'),
    "n past the end": craft({"a": [], "j": {}, "n": 64}),
    "trailing bytes": craft({"a": [], "j": {}, "n": 0}, b"\0"),
    "deep JSON": craft(None, raw_header=b'{"a":[],"j":{"x":' + b"[" * 100_000 + b"]" * 100_000),
    "deep JSON value": craft({"a": [], "j": {"x": nested(40)}, "n": 0}),
    "huge integer": craft(None, raw_header=b'{"a":[],"j":{"x":' + b"9" * 5000 + b'},"n":0}'),
    "bad UTF-8": craft(None, raw_header=b'{"a":[],"j":{"x":"\xff"},"n":0}'),
    "not JSON": craft(None, raw_header=b"{'a': []}"),
    "scalar name empty": craft({"a": [], "j": {"": 1}, "n": 0}),
    "bad magic": b"SHWX" + craft({"a": [], "j": {}, "n": 0})[4:],
    "other version": b"SHWL\x02" + craft({"a": [], "j": {}, "n": 0})[5:],
    "reserved bytes set": b"SHWL\x01\x00\x01\x00" + craft({"a": [], "j": {}, "n": 0})[8:],
    "header length past the end": PREFIX.pack(b"SHWL", VERSION, b"\0\0\0", 1000) + b"{}",
    "header length huge": PREFIX.pack(b"SHWL", VERSION, b"\0\0\0", 2**32 - 1) + b"{}",
    "empty": b"",
    "prefix only": PREFIX.pack(b"SHWL", VERSION, b"\0\0\0", 0),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_are_refused(case: str) -> None:
    with pytest.raises(WireError):
        decode(HOSTILE[case])


def test_hand_crafted_valid_message_decodes() -> None:
    # The crafting helper itself is sound, so the refusals above are about the edits.
    header, data = valid_header()
    out = decode(craft(header, data))
    np.testing.assert_array_equal(out["a"], np.arange(4, dtype=np.float32))
    assert out["s"] == 1


@pytest.mark.parametrize("bad", ["text", 3, None, [1, 2], {"a": 1}, object()])
def test_non_bytes_input_is_a_wire_error(bad: Any) -> None:
    with pytest.raises(WireError):
        decode(bad)


# -- limits ---------------------------------------------------------------------------------

TIGHT = WireLimits(
    max_bytes=4096,
    max_items=3,
    max_ndim=2,
    max_name_chars=5,
    max_header_bytes=1024,
    max_string_chars=5,
    max_json_depth=3,
)


WITHIN_TIGHT = {
    "size": {"x": np.zeros(400, np.uint8)},
    "items": {"a": 1, "b": 2, "c": 3},
    "ndim": {"x": np.zeros((1, 1))},
    "name": {"abcde": 1},
    "string": {"s": "abcde"},
    "depth": {"d": nested(3)},
    "header": {"d": list(range(100))},
}
BEYOND_TIGHT = {
    "size": {"x": np.zeros(5000, np.uint8)},
    "items": {"a": 1, "b": 2, "c": 3, "d": 4},
    "ndim": {"x": np.zeros((1, 1, 1))},
    "name": {"abcdef": 1},
    "array name": {"abcdef": np.zeros(1)},
    "string": {"s": "abcdef"},
    "string in a list": {"s": ["abcdef"]},
    "dict key": {"s": {"abcdef": 1}},
    "depth": {"d": nested(4)},
    "depth in dicts": {"d": {"a": {"b": {"c": {"d": 1}}}}},
    "header": {"d": list(range(400))},
}


@pytest.mark.parametrize("case", sorted(WITHIN_TIGHT))
def test_values_at_the_limits_pass(case: str) -> None:
    payload = WITHIN_TIGHT[case]
    decoded = decode(encode(payload, limits=TIGHT), limits=TIGHT)
    assert list(decoded) == list(payload)


@pytest.mark.parametrize("case", sorted(BEYOND_TIGHT))
def test_limits_are_enforced_on_both_sides(case: str) -> None:
    payload = BEYOND_TIGHT[case]
    with pytest.raises(WireError):
        encode(payload, limits=TIGHT)
    encoded = encode(payload)  # the default limits let it through; a strict decoder does not
    with pytest.raises(WireError):
        decode(encoded, limits=TIGHT)


def test_default_limits_refuse_deep_json_and_too_many_items() -> None:
    with pytest.raises(WireError, match="deeper"):
        encode({"d": nested(40)})
    with pytest.raises(WireError, match="items"):
        encode({f"k{i}": i for i in range(5000)})


def test_self_referencing_json_is_refused() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(WireError):
        encode({"loop": loop})


# -- what encode refuses -----------------------------------------------------------------------

REFUSED_VALUES: dict[str, Any] = {
    "object array": np.array([1, "a", None], dtype=object),
    "str array": np.array(["abc", "d"]),
    "bytes array": np.array([b"abcde"]),
    "void array": np.zeros(2, dtype="V8"),
    "datetime array": np.array(["2024-01-01"], dtype="datetime64[ns]"),
    "timedelta array": np.array([1], dtype="timedelta64[s]"),
    "structured array": np.zeros(2, dtype=[("a", "<i4"), ("b", "<f8")]),
    "longdouble array": np.zeros(2, dtype=np.longdouble),
    "set": {1, 2},
    "bytes": b"raw",
    "bytearray": bytearray(b"raw"),
    "object": object(),
    "function": len,
    "complex number": 1 + 2j,
    "numpy int in a list": [np.int64(3)],
    "array in a list": [np.zeros(2)],
    "array in a dict": {"w": np.zeros(2)},
    "non-string key": {1: "a"},
    "huge integer": 10**5000,
}


@pytest.mark.parametrize("case", sorted(REFUSED_VALUES))
def test_encode_refuses_non_wire_values(case: str) -> None:
    with pytest.raises(WireError):
        encode({"x": REFUSED_VALUES[case]})


@pytest.mark.parametrize("bad", [[("a", 1)], "abc", 5, None])
def test_encode_refuses_non_mappings(bad: Any) -> None:
    with pytest.raises(WireError, match="mapping"):
        encode(bad)


@pytest.mark.parametrize("name", ["", 1, None, ("a",)])
def test_encode_refuses_bad_names(name: Any) -> None:
    with pytest.raises(WireError, match="names"):
        encode({name: 1})


def test_self_referencing_subclass_json_is_refused() -> None:
    class Tagged(dict):  # type: ignore[type-arg]
        pass

    loop = Tagged()
    loop["again"] = loop
    with pytest.raises(WireError):
        encode({"loop": loop})


def test_header_is_what_json_dumps_writes() -> None:
    """The codec's cached C encoder writes the header exactly as json.dumps would."""
    import json

    payload = {
        "nan": float("nan"),
        "inf": [float("inf"), -float("inf"), 1e-300, 2**70],
        "text": 'é\u2028"quoted"\n',
        "nested": {"a": [None, True, False, {"b": []}]},
        "array": np.arange(3, dtype=np.int16),
    }
    data = bytes(encode(payload))
    (length,) = np.frombuffer(data[8:12], dtype="<u4")
    header = data[12 : 12 + int(length)].decode()
    expected = json.dumps(
        {
            "a": [["array", "<i2", [3], 0, 6]],
            "j": {k: v for k, v in payload.items() if k != "array"},
            "n": 64,
        },
        separators=(",", ":"),
        allow_nan=True,
    )
    assert header == expected


def test_messages_sharing_a_header_each_get_their_own_values() -> None:
    # The second decode of a header comes from the parsed-header cache: its arrays must view
    # its own bytes and its JSON containers must be its own copies.
    receipt = {"kept": "v1", "fields": {"d": "<f8:3"}, "tags": [1, [2]], "d": np.arange(3.0)}
    first = decode(encode(receipt))
    first["fields"]["d"] = "changed"
    first["tags"][1].append(3)
    second = decode(encode({**receipt, "d": np.arange(3.0) + 10}))
    assert second["fields"] == {"d": "<f8:3"} and second["tags"] == [1, [2]]
    np.testing.assert_array_equal(second["d"], [10.0, 11.0, 12.0])
    np.testing.assert_array_equal(first["d"], [0.0, 1.0, 2.0])


def test_a_cached_header_still_checks_each_message_length_and_entries() -> None:
    good = bytes(encode({"a": np.arange(4.0), "n": 1}))
    decode(good)  # the header is now cached
    with pytest.raises(WireError, match="length"):
        decode(good[:-8])
    with pytest.raises(WireError, match="length"):
        decode(good + bytes(64))
    header, start = header_of(good)
    header["j"]["a"] = 2  # a name given twice: refused at every decode, not only the first
    twice = craft(header, good[start + (-start) % 64 :])
    for _ in range(2):
        with pytest.raises(WireError, match="twice"):
            decode(twice)
