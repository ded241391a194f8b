from __future__ import annotations

import threading

import numpy as np

from shoal.crypto.scratch import MAX_CACHED_BYTES, scratch


def test_same_purpose_reuses_memory_and_grows_on_demand() -> None:
    a = scratch("test.reuse", 100, np.float64)
    assert a.shape == (100,) and a.dtype == np.float64
    b = scratch("test.reuse", 50, np.uint32)
    assert np.shares_memory(a, b)
    c = scratch("test.reuse", 10_000, np.float64)  # larger than what is held: a new buffer
    assert c.shape == (10_000,)
    assert np.shares_memory(c, scratch("test.reuse", 10_000, np.float64))


def test_purposes_and_threads_get_their_own_buffers() -> None:
    mine = scratch("test.threads", 64, np.uint8)
    assert not np.shares_memory(mine, scratch("test.other", 64, np.uint8))
    seen: list[np.ndarray] = []
    thread = threading.Thread(target=lambda: seen.append(scratch("test.threads", 64, np.uint8)))
    thread.start()
    thread.join()
    assert not np.shares_memory(mine, seen[0])


def test_huge_requests_are_not_cached() -> None:
    count = MAX_CACHED_BYTES // 8 + 1
    a = scratch("test.huge", count, np.float64)
    b = scratch("test.huge", count, np.float64)
    assert a.shape == (count,) and not np.shares_memory(a, b)
    del a, b
