"""Fast path for the one thing the scanner needs from HDF5: the root group's string attributes.

Legacy Keras .h5 files keep their model config in root attributes. Importing h5py (and NumPy
with it) costs more CPU than scanning a whole folder of models, so the layouts h5py writes for
small attributes are read here directly; anything else returns None and the caller asks h5py.
"""

from __future__ import annotations

import struct
from typing import IO

__all__ = ["root_string_attributes"]

SIGNATURE = b"\x89HDF\r\n\x1a\n"

_MAX_BLOCKS = 1024  # object header continuation blocks followed before giving up
_MAX_VALUE = 64 << 20  # largest attribute value read here (h5py handles anything bigger)
_MAX_HEAP_OBJECTS = 1 << 16  # global heap objects walked before leaving the file to h5py

_ATTRIBUTE = 0x0C
_CONTINUATION = 0x10
_ATTRIBUTE_INFO = 0x15


class _Unsupported(Exception):
    """Outside the layouts read here; h5py decides instead."""


class _File:
    def __init__(self, f: IO[bytes], size: int, offset_size: int, length_size: int) -> None:
        self.f = f
        self.size = size
        self.o = offset_size
        self.len = length_size
        self.undefined = (1 << (8 * offset_size)) - 1

    def read(self, addr: int, n: int) -> bytes:
        if addr < 0 or n < 0 or addr + n > self.size:
            raise _Unsupported
        self.f.seek(addr)
        data = self.f.read(n)
        if len(data) != n:
            raise _Unsupported
        return data

    def addr(self, data: bytes, pos: int) -> int:
        return int.from_bytes(data[pos : pos + self.o], "little")

    def length(self, data: bytes, pos: int) -> int:
        return int.from_bytes(data[pos : pos + self.len], "little")


def _u16(data: bytes, pos: int) -> int:
    value: int = struct.unpack_from("<H", data, pos)[0]
    return value


def _open(f: IO[bytes], size: int) -> tuple[_File, int]:
    """(file view, root object header address) from a superblock at offset 0."""
    head = f.read(16) if f.seek(0) == 0 else b""
    if len(head) < 16 or head[:8] != SIGNATURE:
        raise _Unsupported  # e.g. a user block before the superblock
    version = head[8]
    if version in (0, 1):
        osize, lsize = head[13], head[14]
        pos = 24 + (4 if version == 1 else 0)
    elif version in (2, 3):
        osize, lsize = head[9], head[10]
        pos = 12
    else:
        raise _Unsupported
    if osize not in (2, 4, 8) or lsize not in (2, 4, 8):
        raise _Unsupported
    h = _File(f, size, osize, lsize)
    block = h.read(0, min(size, pos + 6 * osize))
    if len(block) < pos + 6 * osize or h.addr(block, pos) != 0:
        raise _Unsupported  # a non-zero base address shifts every address; rare, left to h5py
    if version in (0, 1):
        # base, free-space, end-of-file and driver addresses, then the root symbol table entry
        # (link name offset, object header address)
        return h, h.addr(block, pos + 5 * osize)
    return h, h.addr(block, pos + 3 * osize)


def _messages(h: _File, root: int) -> list[tuple[int, int, bytes]]:
    """Every (type, flags, body) message of an object header, continuation blocks included."""
    out: list[tuple[int, int, bytes]] = []
    first = h.read(root, 4)
    if first == b"OHDR":
        v2 = True
        pre = h.read(root, 6)
        if pre[4] != 2:
            raise _Unsupported
        flags = pre[5]
        pos = root + 6 + (16 if flags & 0x20 else 0) + (4 if flags & 0x10 else 0)
        width = 1 << (flags & 3)
        size = int.from_bytes(h.read(pos, width), "little")
        blocks = [(pos + width, size)]
        order = bool(flags & 0x04)
    elif first[0] == 1:
        v2 = False
        pre = h.read(root, 16)
        size = struct.unpack_from("<I", pre, 8)[0]
        blocks = [(root + 16, size)]
        order = False
    else:
        raise _Unsupported
    seen: set[int] = set()
    while blocks:
        start, size = blocks.pop(0)
        if start in seen or len(seen) >= _MAX_BLOCKS:
            raise _Unsupported
        seen.add(start)
        data = h.read(start, size)
        pos = 0
        head = (4 + (2 if order else 0)) if v2 else 8
        while pos + head <= len(data):
            if v2:
                mtype, msize, mflags = data[pos], _u16(data, pos + 1), data[pos + 3]
            else:
                mtype, msize, mflags = _u16(data, pos), _u16(data, pos + 2), data[pos + 4]
            body_at = pos + head
            if body_at + msize > len(data) or (not v2 and msize % 8):
                raise _Unsupported
            body = data[body_at : body_at + msize]
            if mtype == _CONTINUATION:
                if len(body) < h.o + h.len:
                    raise _Unsupported
                addr, length = h.addr(body, 0), h.length(body, h.o)
                if v2:  # "OCHK", messages, 4-byte checksum
                    if length < 8 or h.read(addr, 4) != b"OCHK":
                        raise _Unsupported
                    blocks.append((addr + 4, length - 8))
                else:
                    blocks.append((addr, length))
            out.append((mtype, mflags, body))
            pos = body_at + msize
    return out


def _pad8(n: int) -> int:
    return (n + 7) & ~7


def _attribute(h: _File, body: bytes, wanted: set[str]) -> tuple[str, str] | None:
    """(name, text) of a wanted scalar string attribute; None for attributes not wanted."""
    version = body[0] if body else 0
    if version not in (1, 2, 3) or len(body) < 8:
        raise _Unsupported
    if version >= 2 and body[1] & 0x03:
        raise _Unsupported  # shared datatype or dataspace
    name_size, dt_size, ds_size = struct.unpack_from("<HHH", body, 2)
    pos = 9 if version == 3 else 8
    pad = _pad8 if version == 1 else (lambda n: n)
    raw_name = body[pos : pos + name_size]
    name = raw_name.split(b"\0", 1)[0].decode("utf-8", "replace")
    if name not in wanted:
        return None
    pos += pad(name_size)
    dt = body[pos : pos + dt_size]
    pos += pad(dt_size)
    ds = body[pos : pos + ds_size]
    pos += pad(ds_size)
    data = body[pos:]
    if len(dt) < 8 or len(ds) < 4 or len(dt) != dt_size or len(ds) != ds_size:
        raise _Unsupported
    scalar = ds[1] == 0 if ds[0] == 1 else (ds[0] == 2 and ds[3] == 0)
    if not scalar:
        raise _Unsupported  # h5py returns an array; let it report whatever that gives
    cls, bits = dt[0] & 0x0F, dt[1] | dt[2] << 8
    size = struct.unpack_from("<I", dt, 4)[0]
    if cls == 3:  # fixed-length string
        if len(data) < size:
            raise _Unsupported
        raw = data[:size].rstrip(b"\0")
    elif cls == 9 and bits & 0x0F == 1:  # variable-length string in the global heap
        if len(data) < 4 + h.o + 4:
            raise _Unsupported
        n = struct.unpack_from("<I", data, 0)[0]
        raw = _global_heap_object(h, h.addr(data, 4), struct.unpack_from("<I", data, 4 + h.o)[0])
        if len(raw) < n:
            raise _Unsupported
        raw = raw[:n]
    else:
        raise _Unsupported
    if b"\0" in raw:
        raise _Unsupported  # C-string conversions stop at a NUL; let h5py show what it reads
    try:
        return name, raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _Unsupported from None


def _global_heap_object(h: _File, collection: int, index: int) -> bytes:
    head = h.read(collection, 8 + h.len)
    if head[:4] != b"GCOL" or head[4] != 1:
        raise _Unsupported
    end = collection + h.length(head, 8)
    pos = collection + 8 + h.len
    obj_head = 8 + h.len
    found: list[tuple[int, int]] = []
    # Every object of the collection is walked: libhdf5 files each one in a table by its
    # index, so of two objects with one index the later wins, and it reads on past free space
    # (index 0). A second object with the wanted index (a benign config first, a Lambda layer
    # second: h5py, hence Keras, returns the second) is left to h5py.
    for _ in range(_MAX_HEAP_OBJECTS):
        if pos + obj_head > end:
            break
        oh = h.read(pos, obj_head)
        oindex, osize = _u16(oh, 0), h.length(oh, 8)
        if oindex == index:
            found.append((pos + obj_head, osize))
        pos += obj_head + _pad8(osize)
    else:
        raise _Unsupported
    if len(found) != 1 or found[0][1] > _MAX_VALUE:
        raise _Unsupported
    return h.read(*found[0])


def root_string_attributes(
    f: IO[bytes], size: int, names: tuple[str, ...]
) -> dict[str, str] | None:
    """The named root-group attributes of an HDF5 file as text, or None if this reader cannot
    say for sure (dense or shared attribute storage, a user block, non-string values, ...)."""
    wanted = set(names)
    try:
        h, root = _open(f, size)
        found: dict[str, str] = {}
        for mtype, mflags, body in _messages(h, root):
            if mtype == _ATTRIBUTE_INFO:
                if len(body) < 2:
                    raise _Unsupported
                at = 2 + (2 if body[1] & 0x01 else 0)
                if len(body) < at + h.o or h.addr(body, at) != h.undefined:
                    raise _Unsupported  # attributes in a fractal heap ("dense" storage)
            elif mtype == _ATTRIBUTE:
                if mflags & 0x02:
                    raise _Unsupported  # shared message
                hit = _attribute(h, body, wanted)
                if hit is not None:
                    if hit[0] in found:
                        raise _Unsupported
                    found[hit[0]] = hit[1]
    except (_Unsupported, IndexError, struct.error, OverflowError):
        return None
    return found
