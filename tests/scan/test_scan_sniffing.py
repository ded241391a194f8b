"""Format sniffing shortcuts give the answers of the checks they stand in front of."""

from __future__ import annotations

import io
import tarfile

from hypothesis import given, settings
from hypothesis import strategies as st

from shoal.scan import scanner


def _tarfile_opens(head: bytes) -> bool:
    """The check as tarfile itself makes it: ustar magic, or a v7 header's checksum."""
    if head[257:262] == b"ustar":
        return True
    if len(head) < 512:
        return False
    try:
        return tarfile.nti(head[148:156]) in tarfile.calc_chksums(head[:512])  # type: ignore[attr-defined]
    except (tarfile.HeaderError, ValueError):
        return False


_field_bytes = st.sampled_from(list(b"01234567_+-oO89aLx \t\n\x0b\x0c\r\x1c\x1f\x00\x80\xff"))
_fields = st.lists(_field_bytes, min_size=8, max_size=8).map(bytes) | st.binary(
    min_size=8, max_size=8
)


@settings(max_examples=2000, deadline=None)
@given(st.binary(min_size=148, max_size=148), _fields, st.binary(min_size=0, max_size=400))
def test_tar_header_shortcut_agrees_with_tarfile(front: bytes, field: bytes, back: bytes) -> None:
    head = front + field + back
    assert scanner._tar_header(head) == _tarfile_opens(head)


_pads = st.sampled_from([b"", b" ", b"0", b"\x00", b"\t", b"\x1c", b"_", b"+"])


@settings(max_examples=2000, deadline=None)
@given(
    st.binary(min_size=512, max_size=600),
    st.booleans(),
    st.integers(-3, 3),
    _pads,
    _pads,
    st.sampled_from(["o", "d"]),
)
def test_tar_header_shortcut_with_checksums_that_nearly_hold(
    head: bytes, signed: bool, off: int, lead: bytes, tail: bytes, base: str
) -> None:
    # the field written as a tar would (or nearly: off by a few, padded oddly, in decimal)
    unsigned_sum, signed_sum = tarfile.calc_chksums(head)  # type: ignore[attr-defined]
    value = (signed_sum if signed else unsigned_sum) + off
    text = (lead + (f"%{base}" % value).encode() + tail)[:8].ljust(8, b"\x00")
    head = head[:148] + text + head[156:]
    assert scanner._tar_header(head) == _tarfile_opens(head)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=64), st.integers(0, 0o7777777))
def test_real_v7_and_gnu_headers_are_tars(data: bytes, mode: int) -> None:
    for fmt in (tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT):
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
            info = tarfile.TarInfo("pickle")
            info.size, info.mode = len(data), mode
            tf.addfile(info, io.BytesIO(data))
        head = buf.getvalue()[:1024]
        assert scanner._tar_header(head) and _tarfile_opens(head)
    v7 = bytearray(head[:512])
    v7[257:265] = bytes(8)  # no magic: the checksum alone decides, as for a pre-POSIX tar
    chk = tarfile.calc_chksums(bytes(v7))[0]  # type: ignore[attr-defined]
    v7[148:156] = b"%06o\0 " % chk
    assert scanner._tar_header(bytes(v7)) and _tarfile_opens(bytes(v7))
