"""Byte streams the scanner and loader read through: lying sizes cost nothing, every stream of
a multi-stream file is read, raw array bytes land in their buffer without copies."""

from __future__ import annotations

import bz2
import io
import lzma

import numpy as np
import pytest

from shoal.errors import UnsafeModelError
from shoal.scan import load
from shoal.scan.builders import empty_bytes
from shoal.scan.streams import ByteReader, Decompressed


class _ForwardOnly(io.RawIOBase):
    def __init__(self, data: bytes) -> None:
        self._f = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, b):  # type: ignore[no-untyped-def]
        return self._f.readinto(b)


@pytest.mark.parametrize("alloc", [bytearray, empty_bytes])
def test_read_buffer_never_trusts_a_size(alloc):
    r = ByteReader(io.BytesIO(b"0123456789"))
    assert r.take(2) == b"01"
    buf, got = r.read_buffer(1 << 50, alloc)  # a petabyte declared: 8 bytes exist
    assert got == 8 and bytes(memoryview(buf)[:got]) == b"23456789"
    assert r.pos == 10 and r.at_eof()
    fwd = ByteReader(_ForwardOnly(b"abcdef"))
    buf, got = fwd.read_buffer(1 << 50, alloc)
    assert (bytes(buf), got) == (b"abcdef", 6)


def test_read_buffer_reads_straight_into_the_buffer():
    data = bytes(range(256)) * 1000
    r = ByteReader(io.BytesIO(data))
    assert r.take(3) == data[:3]
    buf, got = r.read_buffer(len(data) - 3, empty_bytes)
    assert isinstance(buf, np.ndarray) and got == len(data) - 3
    assert buf.tobytes() == data[3:]


@pytest.mark.parametrize(
    ("codec", "compress"),
    [
        ("bz2", bz2.compress),
        ("xz", lzma.compress),
        ("lzma", lambda d: lzma.compress(d, format=lzma.FORMAT_ALONE)),
        ("gzip", lambda d: __import__("gzip").compress(d)),
    ],
)
def test_every_stream_is_read_as_the_loaders_read_them(codec, compress):
    parts = [b"first ", b"second ", b"third"]
    blob = b"".join(compress(p) for p in parts)
    got = Decompressed(base=io.BytesIO(blob), codec=codec, limit=1 << 20).read()
    assert got == b"first second third"
    if codec in ("bz2", "xz", "lzma"):  # trailing garbage after a stream is ignored by them too
        got = Decompressed(base=io.BytesIO(blob + b"junk!"), codec=codec, limit=1 << 20).read()
        assert got == b"first second third"


def test_truncated_npy_is_refused(tmp_path):
    buf = io.BytesIO()
    np.save(buf, np.arange(1000.0))
    path = tmp_path / "t.npy"
    path.write_bytes(buf.getvalue()[:-100])
    with pytest.raises(UnsafeModelError):
        load(path)


def test_output_zlib_holds_back_after_the_last_input_is_read():
    """16 MiB of zeros plus a 6-byte pickle tail, deflated: the last input is consumed while
    the final bytes are still inside zlib, exactly at a CHUNK boundary of output. That read
    as 'stream ends before its end marker' (a benign npz member or gzip file reported
    unreadable, and refused by load)."""
    import struct
    import zlib

    from shoal.scan.streams import Decompressed, Slice

    payload = b"B" + struct.pack("<I", 16 << 20) + bytes(16 << 20) + b"."
    comp = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = comp.compress(payload) + comp.flush()
    base = io.BytesIO(b"pad" + body)
    stream = Decompressed(
        base=Slice(base=base, start=3, length=len(body)), codec="deflate", limit=1 << 40
    )
    got = bytearray()
    while chunk := stream.read(1 << 16):
        got += chunk
    assert bytes(got) == payload
