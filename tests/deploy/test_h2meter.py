"""The front door's HTTP/2 frame counter (h2meter.py): it counts frames however the bytes
are split, passes what a node sends, cuts floods; and the door and the lane use the
limiter they are given (an empty one is falsy, and used to be swapped for a default)."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from shoal.runtime.grpc.h2meter import FrameLimits, FrameMeter
from shoal.runtime.grpc.lane import LaneServer
from shoal.runtime.grpc.limits import PendingLimiter
from shoal.runtime.grpc.transport import FrontDoor

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, WINDOW_UPDATE = 0, 1, 3, 4, 6, 8


def frame(kind: int, payload: bytes = b"", stream: int = 0, flags: int = 0) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream)


def with_payload(kind: int, payload: bytes, stream: int = 0) -> bytes:
    return frame(kind, payload, stream) + payload


def a_node_connection() -> bytes:
    """What a node sends in its first second: preface, SETTINGS, an ACK, a window, one call,
    data (a payload that looks like frame headers must not be read as frames)."""
    fake = frame(PING) * 200  # inside a DATA payload: not frames
    return (
        PREFACE
        + with_payload(SETTINGS, struct.pack(">HI", 4, 1 << 20))
        + frame(SETTINGS, flags=1)
        + with_payload(WINDOW_UPDATE, struct.pack(">I", 1 << 20))
        + with_payload(HEADERS, b"\x83\x86" + b"x" * 60, stream=1)
        + with_payload(DATA, fake, stream=1)
        + with_payload(PING, b"\0" * 8)
    )


@given(st.lists(st.integers(min_value=1, max_value=64), max_size=40))
def test_frames_are_counted_however_the_bytes_are_split(cuts: list[int]) -> None:
    data = a_node_connection()
    meter = FrameMeter(clock=lambda: 0.0)
    at = 0
    for size in cuts:
        assert meter.feed(data[at : at + size]) is None
        at += size
    assert meter.feed(data[at:]) is None
    assert meter.frames == 6  # the 200 frame headers inside the DATA payload are not frames


def test_a_flood_of_each_kind_is_cut_and_a_new_second_starts_afresh() -> None:
    now = [0.0]
    limits = FrameLimits(calls=4, resets=4, control=8)
    for flood, words in [
        (with_payload(HEADERS, b"\x83", stream=1), "HEADERS"),
        (with_payload(RST_STREAM, b"\0\0\0\x08", stream=1), "RST_STREAM"),
        (frame(SETTINGS) + with_payload(PING, b"\0" * 8), "PING"),
    ]:
        meter = FrameMeter(limits, clock=lambda: now[0])
        assert meter.feed(PREFACE + flood * 4) is None
        now[0] += 1.0  # a new second: the counts start again
        assert meter.feed(flood * 4) is None
        verdict = meter.feed(flood * 1 + flood)
        assert verdict is not None and words in verdict and verdict.startswith("cut:")


def test_the_door_and_the_lane_keep_the_limiter_they_are_given() -> None:
    """Red team: ``limiter or PendingLimiter(...)`` replaced the configured (empty, so falsy)
    limiter, and 16 addresses held 256 relays where max_pending said 64."""
    limiter = PendingLimiter(per_peer=2, total=4)
    door = FrontDoor(
        host="127.0.0.1",
        port=0,
        speaks="plaintext",
        upstream_port=1,
        mismatch=lambda *_: None,
        refused=lambda *_: None,
        limiter=limiter,
    )
    try:
        assert door._limiter is limiter
    finally:
        door.close()
    lane = LaneServer(
        host="127.0.0.1",
        port=0,
        context=None,
        token_for=lambda _: None,
        attach=lambda *_: "",
        serve=lambda *_: None,
        rejected=lambda *_: None,
        limiter=limiter,
    ).start()
    try:
        assert lane._limiter is limiter
    finally:
        lane.close()
