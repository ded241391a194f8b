"""Per-thread scratch buffers for the big temporaries of masking and quantization.

A fresh array of a few hundred kilobytes is mapped from the OS on every call and returned
on free, so each call pays a page fault per 4 KiB; on virtualized hosts that cost more than
the arithmetic. Temporaries that live within one call take a buffer from here instead.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

__all__ = ["MAX_CACHED_BYTES", "scratch"]

# Beyond this a buffer is not kept: the page faults are small next to the work on it, and a
# long-lived worker thread should not pin hundreds of megabytes.
MAX_CACHED_BYTES = 64 << 20

_local = threading.local()


def scratch(purpose: str, count: int, dtype: Any) -> np.ndarray:
    """A ``count``-element array of ``dtype`` owned by this thread for ``purpose``.

    Its contents are garbage. It is reused by the next call with the same ``purpose`` on
    this thread, so use it only within one call and never return it or a view of it.
    """
    dt = np.dtype(dtype)
    nbytes = count * dt.itemsize
    if nbytes > MAX_CACHED_BYTES:
        return np.empty(count, dtype=dt)
    buffers: dict[str, np.ndarray] = _local.__dict__.setdefault("buffers", {})
    buffer = buffers.get(purpose)
    if buffer is None or buffer.nbytes < nbytes:
        buffer = np.empty(max(nbytes, 1), dtype=np.uint8)
        buffers[purpose] = buffer
    return buffer[:nbytes].view(dt)
