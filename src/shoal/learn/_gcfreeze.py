"""Simulation helpers that touch the interpreter, not the federation."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

__all__ = ["RUN_OLDEST_THRESHOLD", "older_objects_frozen"]

_FROZEN_LOCK = threading.Lock()
_frozen_by = [0]  # simulations under way that froze the collector's older objects
# The thresholds found when the first concurrent simulation started, and the ones it set.
_saved: list[tuple[tuple[int, int, int], tuple[int, int, int]]] = []

# During a run the oldest generation is collected after this many collections of the middle
# one (CPython's default is 10): about one full pass per 7M net allocations instead of 1-2
# per round at 10^4 nodes.
RUN_OLDEST_THRESHOLD = 1000


@contextlib.contextmanager
def older_objects_frozen() -> Iterator[None]:
    """Keep the cyclic garbage collector's full passes off the objects that exist before
    a simulation starts (every module, the caller's data sets), and make full passes rare
    while it runs.

    At 10^4 nodes a full pass in a round re-scanned all of them: 88 ms each, 15% of the
    round's CPU. Frozen objects are only left out of the scans; objects the simulation makes
    are collected as usual, and the frozen ones return to the oldest generation when the
    last concurrent simulation ends. A round's live per-node objects (tasks, replies,
    receipts) still reached the oldest generation fast enough to start 1-2 full passes a
    round over all of them (about 40 ms a round at 10^4 nodes, which free almost nothing):
    the oldest generation's threshold is raised for the run. The young generations keep
    theirs, so cycles the run makes are still found by the young passes, and the old
    thresholds come back when the last concurrent simulation ends, unless the caller's own
    code changed them meanwhile.
    """
    with _FROZEN_LOCK:
        if _frozen_by[0] == 0:
            gc.freeze()
            before = gc.get_threshold()
            during = (before[0], before[1], max(before[2], RUN_OLDEST_THRESHOLD))
            gc.set_threshold(*during)
            _saved[:] = [(before, during)]
        _frozen_by[0] += 1
    try:
        yield
    finally:
        with _FROZEN_LOCK:
            _frozen_by[0] -= 1
            if _frozen_by[0] == 0:
                gc.unfreeze()
                if _saved:
                    before, during = _saved.pop()
                    if gc.get_threshold() == during:  # the caller's own setting is theirs
                        gc.set_threshold(*before)
