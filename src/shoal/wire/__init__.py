"""Safe encoding of payloads to bytes: NumPy arrays of numeric dtypes and JSON values only."""

from __future__ import annotations

from shoal.wire.codec import DTYPES, VERSION, JsonValue, Payload, WireLimits, decode, encode

__all__ = ["DTYPES", "VERSION", "JsonValue", "Payload", "WireLimits", "decode", "encode"]
