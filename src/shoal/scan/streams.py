"""Bounded byte streams for the scanner: file slices, streaming decompressors, a peeking reader.

Every reader here holds at most a fixed-size buffer, so scanning a multi-gigabyte or
decompression-bomb file costs time but not memory.
"""

from __future__ import annotations

import bz2
import contextlib
import contextvars
import io
import lzma
import os
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from typing import IO, Any, Protocol

__all__ = [
    "Budget",
    "ByteReader",
    "Decompressed",
    "LimitExceeded",
    "Slice",
    "Source",
    "check_time",
    "spool",
    "time_budget",
]

CHUNK = 1 << 16


class LimitExceeded(Exception):
    """A stream produced more bytes than the scan limits allow."""


_DEADLINE: contextvars.ContextVar[tuple[float, float] | None] = contextvars.ContextVar(
    "shoal_scan_deadline", default=None
)


@contextlib.contextmanager
def time_budget(seconds: float) -> Iterator[None]:
    """Work inside this block that calls ``check_time`` stops once ``seconds`` have passed."""
    token = _DEADLINE.set((time.monotonic() + seconds, seconds))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def check_time() -> None:
    """Raise ``LimitExceeded`` when the current file's time budget is spent."""
    deadline = _DEADLINE.get()
    if deadline is not None and time.monotonic() > deadline[0]:
        raise LimitExceeded(f"refused: took longer than the {deadline[1]:g} s time budget")


class Source(Protocol):
    """The part of a binary file the scanner needs."""

    def read(self, n: int = -1, /) -> bytes: ...


def _seekable(f: object) -> bool:
    try:
        return bool(f.seekable())  # type: ignore[attr-defined]
    except Exception:
        return False


class Slice(io.RawIOBase):
    """A read-only window ``[start, start + length)`` of a seekable file."""

    def __init__(self, *, base: IO[bytes], start: int, length: int) -> None:
        super().__init__()
        self._base = base
        self._start = start
        self._length = max(0, length)
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        if whence == os.SEEK_SET:
            pos = offset
        elif whence == os.SEEK_CUR:
            pos = self._pos + offset
        elif whence == os.SEEK_END:
            pos = self._length + offset
        else:
            raise ValueError(f"bad whence {whence}")
        if pos < 0:
            raise OSError(22, "negative seek position")  # what real files raise; zipfile expects it
        self._pos = pos
        return pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self._length - self._pos)
        if n <= 0:
            return 0
        self._base.seek(self._start + self._pos)
        readinto = getattr(self._base, "readinto", None)
        if readinto is not None:  # straight into the caller's buffer: no copy
            with memoryview(buffer) as view:
                got = readinto(view[:n]) or 0
        else:
            data = self._base.read(n)
            buffer[: len(data)] = data
            got = len(data)
        self._pos += got
        return got

    def read(self, n: int = -1, /) -> bytes:
        if n is None or n < 0:
            n = self._length - self._pos
        n = min(n, self._length - self._pos)
        if n <= 0:
            return b""
        self._base.seek(self._start + self._pos)
        data = self._base.read(n)
        self._pos += len(data)
        return data

    @property
    def size(self) -> int:
        return self._length


class Budget:
    """Bytes that all decompressed streams of one file may still produce, and the largest
    expansion ratio a stream may reach: judged once it has produced 16 MiB of bytes read as
    opcodes, headers or records, or ``ratio_after`` bytes in all (raw data included)."""

    def __init__(
        self, total: int, *, ratio: int | None = None, ratio_after: int = 256 << 20
    ) -> None:
        self.total = total
        self.left = total
        self.ratio = ratio
        self.ratio_after = ratio_after

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise LimitExceeded(
                f"refused: decompressed data expands past {size_text(self.total)} "
                "(ScanLimits.max_total_bytes)"
            )


def size_text(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n} bytes"


# Read as opcodes, headers or records, 16 MiB cost seconds of Python (raw data only
# decompression): past this the ratio counts for them, past Budget.ratio_after for all bytes.
_RATIO_FLOOR = 16 << 20


class Decompressed(io.RawIOBase):
    """Streaming decompression of zlib, raw deflate, gzip, bz2 or xz/lzma data, size-capped."""

    def __init__(
        self,
        *,
        base: Source,
        codec: str,
        limit: int,
        owns_base: bool = False,
        budget: Budget | None = None,
        filters: list[dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self._filters = filters  # raw LZMA1 (zip method 14): the filter from the member header
        self._budget = budget
        self._owns_base = owns_base
        self._base = base
        self._codec = codec
        self._limit = limit
        self._out = 0
        self._in = 0
        self._data = 0  # bytes of _out the reader took as raw data (see count_data)
        self._buf = b""
        self._eof = False
        self._dec: Any = self._new_decompressor()

    def _new_decompressor(self) -> Any:
        if self._codec == "zlib":
            return zlib.decompressobj()
        if self._codec == "deflate":
            return zlib.decompressobj(-15)
        if self._codec == "gzip":
            return zlib.decompressobj(31)
        if self._codec == "bz2":
            return bz2.BZ2Decompressor()
        if self._codec in ("xz", "lzma"):
            return lzma.LZMADecompressor(format=lzma.FORMAT_AUTO)
        if self._codec == "zip-lzma":
            return lzma.LZMADecompressor(format=lzma.FORMAT_RAW, filters=self._filters)
        raise ValueError(f"unknown codec {self._codec}")

    def readable(self) -> bool:
        return True

    def count_data(self, n: int) -> None:
        """The reader takes (or, negative, did not take) ``n`` bytes as raw data: skipped or
        copied as one block (array and tensor data, long bytes and strings). Raw data is
        bounded by the total only until ``Budget.ratio_after``: an all-zero weight compresses
        1,000:1 in deflate and 1,000,000:1 in bz2, and is what a real model file may hold.
        Raw data read again as opcodes (pickle.load's reading of joblib array data, replayed
        from memory) is taken back, negative, and counts from then on."""
        self._data = max(0, self._data + n)
        if n < 0:
            self._check_ratio()

    def _check_ratio(self) -> None:
        budget = self._budget
        if budget is None or budget.ratio is None:
            return
        out = self._out
        if out < budget.ratio_after:
            out -= self._data  # raw data counts only past ratio_after
        if out > _RATIO_FLOOR and out > budget.ratio * self._in:
            raise LimitExceeded(
                f"refused: {self._codec} data expands more than {budget.ratio} times "
                "(ScanLimits.max_ratio; raw array data counts once a stream passes "
                f"{size_text(budget.ratio_after)}, ScanLimits.ratio_after_bytes)"
            )

    def close(self) -> None:
        if self._owns_base and not self.closed:
            close = getattr(self._base, "close", None)
            if close is not None:
                close()
        super().close()

    def _raw(self) -> bytes:
        data = self._base.read(CHUNK)
        self._in += len(data)
        return data

    def _fill(self) -> None:
        while not self._buf and not self._eof:
            dec = self._dec
            if not isinstance(dec, (bz2.BZ2Decompressor, lzma.LZMADecompressor)):
                if dec.eof:
                    # gzip files may hold several members (gzip.open reads them all); zlib and
                    # deflate stop at their end marker.
                    rest = dec.unused_data or (self._raw() if self._codec == "gzip" else b"")
                    if self._codec != "gzip" or not rest:
                        self._eof = True
                        break
                    self._dec = dec = self._new_decompressor()
                    self._buf = dec.decompress(rest, CHUNK)
                else:
                    raw = dec.unconsumed_tail or self._raw()
                    # All input taken, zlib may still hold output back (a long match cut by
                    # the CHUNK bound): only a call without input that gives nothing is the end
                    self._buf = dec.decompress(raw, CHUNK)
                    if not raw and not self._buf and not dec.eof:
                        raise EOFError(f"{self._codec} stream ends before its end marker")
            else:
                if dec.eof and self._codec == "zip-lzma":
                    self._eof = True  # zipfile reads one stream per member
                    break
                if dec.eof:
                    # As bz2.BZ2File and lzma.LZMAFile (hence joblib) do: a further stream
                    # follows unless the rest is not a stream of this codec at all.
                    rest = dec.unused_data or self._raw()
                    if not rest:
                        self._eof = True
                        break
                    self._dec = dec = self._new_decompressor()
                    try:
                        self._buf = dec.decompress(rest, CHUNK)
                    except (OSError, lzma.LZMAError):
                        self._eof = True  # trailing garbage: the loaders ignore it too
                        break
                else:
                    raw = b"" if dec.needs_input is False else self._raw()
                    if not raw and dec.needs_input:
                        raise EOFError(f"{self._codec} stream ends before its end marker")
                    self._buf = dec.decompress(raw, CHUNK)
            self._out += len(self._buf)
            if self._budget is not None:
                self._budget.spend(len(self._buf))
                self._check_ratio()
            if self._out > self._limit:
                raise LimitExceeded(
                    f"refused: a {self._codec} stream expands past {size_text(self._limit)} "
                    "(ScanLimits.max_member_bytes)"
                )
            check_time()

    def read(self, n: int = -1, /) -> bytes:
        if n is None or n < 0:
            parts: list[bytes] = []
            while True:
                chunk = self.read(CHUNK)
                if not chunk:
                    return b"".join(parts)
                parts.append(chunk)
        self._fill()
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _count_data(base: object, n: int) -> None:
    count = getattr(base, "count_data", None)
    if count is not None:
        count(n)


class _Prefixed:
    def __init__(self, *, prefix: bytes, base: Source) -> None:
        self._prefix = prefix
        self._base = base

    def close(self) -> None:
        close = getattr(self._base, "close", None)
        if close is not None:
            close()

    def count_data(self, n: int) -> None:
        _count_data(self._base, n)

    def read(self, n: int = -1, /) -> bytes:
        if self._prefix:
            head = self._prefix if n < 0 else self._prefix[:n]
            self._prefix = self._prefix[len(head) :]
            if n >= 0:
                n -= len(head)
                if n == 0:
                    return head
            return head + self._base.read(n)
        return self._base.read(n)


class ByteReader:
    """Buffered forward reader with absolute positions, bounded lines and cheap skipping."""

    __slots__ = ("_base", "_buf", "_i", "_origin", "_seek")

    def __init__(self, base: Source, *, origin: int = 0) -> None:
        self._base = base
        self._buf = b""
        self._i = 0
        self._origin = origin  # stream offset of _buf[0]
        self._seek = _seekable(base)

    @property
    def pos(self) -> int:
        return self._origin + self._i

    def _more(self, want: int) -> bool:
        """Make sure at least ``want`` unread bytes are buffered, if the stream has them."""
        have = len(self._buf) - self._i
        if have >= want:
            return True
        check_time()
        self._origin += self._i
        self._buf = self._buf[self._i :]
        self._i = 0
        while len(self._buf) < want:
            chunk = self._base.read(max(CHUNK, want - len(self._buf)))
            if not chunk:
                return False
            self._buf += chunk
        return True

    def peek(self, n: int) -> bytes:
        self._more(n)
        return self._buf[self._i : self._i + n]

    def at_eof(self) -> bool:
        return not self._more(1)

    def byte(self) -> int:
        """Next byte, or -1 at end of stream."""
        if self._i >= len(self._buf) and not self._more(1):
            return -1
        b = self._buf[self._i]
        self._i += 1
        return b

    def window(self) -> tuple[bytes, int]:
        """The buffer and the index of the next unread byte in it (refilled if exhausted), for
        hot loops that parse in place; report what they consumed with ``consumed_to``."""
        if self._i >= len(self._buf):
            self._more(1)
        return self._buf, self._i

    def consumed_to(self, i: int) -> None:
        """Mark the buffer from ``window`` as read up to index ``i``."""
        self._i = i

    def take(self, n: int) -> bytes:
        """Exactly ``n`` bytes (caller keeps ``n`` small), or fewer at end of stream."""
        self._more(n)
        out = self._buf[self._i : self._i + n]
        self._i += len(out)
        return out

    def take_large(self, n: int) -> bytes:
        """Exactly ``n`` bytes for a large argument (read in chunks, never more than the stream
        holds, so a length field that lies costs nothing), or fewer at end of stream."""
        if len(self._buf) - self._i >= n:
            return self.take(n)
        out = bytearray(self._buf[self._i :])
        self._origin += len(self._buf)
        self._buf = b""
        self._i = 0
        while len(out) < n:
            chunk = self._data_read(min(n - len(out), 1 << 24))
            if not chunk:
                break
            out += chunk
            self._origin += len(chunk)
        return bytes(out)

    def read_buffer(self, n: int, alloc: Any = bytearray) -> tuple[Any, int]:
        """(buffer, bytes read): ``n`` bytes read straight into ``alloc(n)`` (a writable buffer,
        e.g. ``numpy.empty``) when the stream is seekable and holds them, else accumulated in a
        bytearray. Never allocates more than the stream has, so a size that lies costs nothing;
        fewer than ``n`` bytes means the stream ended."""
        head = self._buf[self._i : self._i + n]
        self._i += len(head)
        if len(head) == n:
            out = alloc(n)
            memoryview(out).cast("B")[:n] = head
            return out, n
        self._origin += len(self._buf)
        self._buf = b""
        self._i = 0
        base = self._base
        remaining = None
        if self._seek:
            cur = base.tell()  # type: ignore[attr-defined]
            remaining = base.seek(0, os.SEEK_END) - cur  # type: ignore[attr-defined]
            base.seek(cur)  # type: ignore[attr-defined]
        readinto = getattr(base, "readinto", None)
        if remaining is not None and readinto is not None and len(head) + remaining >= n:
            buf = alloc(n)
            view = memoryview(buf).cast("B")
            view[: len(head)] = head
            got = len(head)
            while got < n:
                k = readinto(view[got:])
                if not k:
                    break
                got += k
            view.release()
            self._origin += got - len(head)
            return buf, got
        acc = bytearray(head)
        while len(acc) < n:
            chunk = self._data_read(min(n - len(acc), 1 << 24))
            if not chunk:
                break
            acc += chunk
        self._origin += len(acc) - len(head)
        return acc, len(acc)

    def _data_read(self, n: int) -> bytes:
        """Read up to ``n`` bytes of raw data (see ``Decompressed.count_data``)."""
        _count_data(self._base, n)
        chunk = self._base.read(n)
        _count_data(self._base, len(chunk) - n)
        return chunk

    def skip(self, n: int) -> int:
        """Advance ``n`` bytes without keeping them; returns how many were really skipped."""
        have = len(self._buf) - self._i
        if n <= have:
            self._i += n
            return n
        done = have
        self._origin += len(self._buf)
        self._buf = b""
        self._i = 0
        left = n - done
        if self._seek:
            base = self._base
            cur = base.tell()  # type: ignore[attr-defined]
            end = base.seek(0, os.SEEK_END)  # type: ignore[attr-defined]
            step = min(left, max(0, end - cur))
            base.seek(cur + step)  # type: ignore[attr-defined]
            self._origin += step
            return done + step
        while left > 0:
            chunk = self._data_read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)
            self._origin += len(chunk)
        return n - left

    def line(self, limit: int) -> tuple[bytes, int, bool]:
        """Read through the next newline: (first ``limit`` bytes, full length, saw newline)."""
        buf, i = self._buf, self._i
        j = buf.find(b"\n", i)
        if j >= 0:  # the whole line is buffered (most are): one slice, no copies
            self._i = j + 1
            return bytes(buf[i : min(j, i + limit)]), j - i, True
        kept = bytearray()
        total = 0
        while True:
            if self._i >= len(self._buf) and not self._more(1):
                return bytes(kept), total, False
            j = self._buf.find(b"\n", self._i)
            end = len(self._buf) if j < 0 else j
            piece = self._buf[self._i : end]
            total += len(piece)
            if len(kept) < limit:
                kept += piece[: limit - len(kept)]
            if j >= 0:
                self._i = j + 1
                return bytes(kept), total, True
            self._i = len(self._buf)

    def fork(self, limit: int) -> Callable[[], tuple[ByteReader, bool]]:
        """A second reading from the current position, for when two loaders part ways here.

        Call the result once this reader is done: it gives a reader positioned where ``fork``
        was called, and whether that reader ends early. A seekable stream is read again; any
        other records the next ``limit`` bytes as this reader goes on (so the second reader
        ends there, and says so, if the stream is longer)."""
        pos = self.pos
        base = self._base
        if self._seek:
            at = base.tell() - (len(self._buf) - self._i)  # type: ignore[attr-defined]

            def again() -> tuple[ByteReader, bool]:
                base.seek(at)  # type: ignore[attr-defined]
                return ByteReader(base, origin=pos), False

            return again
        tee = _Tee(base=base, limit=limit, head=self._buf[self._i :])
        self._base = tee

        def replay() -> tuple[ByteReader, bool]:
            tee.active = False
            recorded = _Reread(data=b"".join(tee.parts), owner=tee.base)
            return ByteReader(recorded, origin=pos), tee.truncated

        return replay

    def raw(self) -> Source:
        """The underlying stream positioned at ``pos`` (hands the buffered bytes over with it)."""
        rest = self._buf[self._i :]
        self._origin += len(self._buf)
        self._buf = b""
        self._i = 0
        if not rest:
            return self._base
        self._origin -= len(rest)
        return _Prefixed(prefix=rest, base=self._base)


class _Reread(io.BytesIO):
    """Bytes kept from a stream, read again as opcodes: the stream they came from counts them
    as read (not raw data) as they go, so its ratio bounds this reading too."""

    def __init__(self, *, data: bytes, owner: Source) -> None:
        super().__init__(data)
        self._owner = owner

    def read(self, n: int | None = -1, /) -> bytes:
        chunk = super().read(n)
        _count_data(self._owner, -len(chunk))
        return chunk


class _Tee:
    """A forward-only stream that keeps a copy of the first ``limit`` bytes read through it."""

    def __init__(self, *, base: Source, limit: int, head: bytes) -> None:
        self.base = base
        self.parts = [head[:limit]]
        self.kept = len(self.parts[0])
        self.limit = limit
        self.active = True
        self.truncated = len(head) > limit

    def count_data(self, n: int) -> None:
        _count_data(self.base, n)

    def read(self, n: int = -1, /) -> bytes:
        data = self.base.read(n)
        if self.active and data:
            room = self.limit - self.kept
            if len(data) > room:
                self.truncated = True
                self.active = False
            keep = data[:room]
            self.parts.append(keep)
            self.kept += len(keep)
        return data

    def close(self) -> None:
        close = getattr(self.base, "close", None)
        if close is not None:
            close()


def spool(src: Source, *, limit: int) -> IO[bytes]:
    """Copy a forward-only stream into a seekable temp file (in memory while small)."""
    out = tempfile.SpooledTemporaryFile(max_size=32 << 20)  # noqa: SIM115 (returned to caller)
    copied = 0
    while True:
        chunk = src.read(CHUNK * 16)
        if not chunk:
            break
        copied += len(chunk)
        if copied > limit:
            out.close()
            raise LimitExceeded(f"stream larger than {limit} bytes cannot be made seekable")
        out.write(chunk)
    out.seek(0)
    return out
