"""The digest of the request that produced a held value, so a secure sum can fix it.

A secure sum hides each input inside the total only if every participant computed its input
the same way. The coordinator could instead send different task requests before the sum (a
learning rate of 0, a query that selects no row, to every node but one), and the "sum" would
then be one node's value. So a node keeps, with each value it holds, the digest of the request
that produced it; the round's SecAgg+ parameters state the digest every participant's value
must carry (``crypto.secagg.tasks.input_context``), and each node checks its own before masking.

A map sends every node the same bytes (one encoding for all), so the digest is over those
bytes and the task name. What legitimately differs per node never travels in the payload: the
node's id, its task id and seed (in the task's header), its data and the data's size. Hashing
the bytes (not a re-encoding) means nothing is left out by accident.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from shoal.runtime.engine import Buffer

__all__ = ["request_digest", "rule_digest"]

_DOMAIN = b"shoal/request\x00"
# The last payload hashed, by identity: in simulation every node of a map gets the very same
# bytes object, so the digest is computed once per map, not once per node.
_last: tuple[object, str, str] | None = None


def request_digest(task: str, payload: Buffer) -> str:
    """SHA-256 of a task's name and its request's wire bytes (hex)."""
    global _last
    last = _last
    if last is not None and last[0] is payload and last[1] == task:
        return last[2]
    # Only bytes that cannot change are remembered by identity.
    immutable = type(payload) is bytes or (
        type(payload) is memoryview and payload.readonly and type(payload.obj) is bytes
    )
    h = hashlib.sha256(_DOMAIN)
    h.update(task.encode())
    h.update(b"\x00")
    h.update(payload)
    digest = h.hexdigest()
    if immutable:
        _last = (payload, task, digest)
    return digest


def rule_digest(task: str, values: Mapping[str, Any]) -> str:
    """SHA-256 of a task's name and a request's JSON entries (canonical JSON; the caller
    leaves out what may legitimately differ, e.g. the model version of asynchronous
    training). Raises TypeError/ValueError on entries that are not plain JSON."""
    text = json.dumps(
        {"task": task, "request": dict(values)},
        sort_keys=True,
        separators=(",", ":"),
        allow_nan=False,
    )
    return hashlib.sha256(_DOMAIN + text.encode()).hexdigest()
