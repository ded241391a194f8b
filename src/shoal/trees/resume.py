"""What a SecureBoost party keeps so that a run survives the loss of its process.

The guest keeps each complete round's trees and the margins after it; a host keeps its
table of won splits (record ids index it). Both go in the party's checkpoint store
(:mod:`shoal.vertical.checkpoint`: in memory, or the SQLite ``--state`` file of a deployed
party, on disk before the party answers), as float64 vectors under the run's id. Nothing
here leaves the party.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from shoal.errors import NodeStateError, ProtocolError
from shoal.trees.bins import Bins
from shoal.trees.vertical import TREE_FIELDS, VerticalTree, tree_from_arrays
from shoal.vertical.checkpoint import Checkpoints

__all__ = ["load_margin", "load_records", "load_round", "save_records", "save_round"]

_FIELDS = TREE_FIELDS


def _key(run: str, what: str) -> str:
    return f"{run}-{what}"


def save_round(
    store: Checkpoints, run: str, done: int, trees: Sequence[VerticalTree], margin: np.ndarray
) -> None:
    """Round ``done`` (1-based) complete: its trees, then the margins after it. Margins of
    two rounds are kept (slots ``done % 2``): a coordinator that lost the reply ending a
    round rolls back to the one before."""
    parts: list[np.ndarray] = [np.asarray([len(trees)], dtype=np.float64)]
    for tree in trees:
        parts.append(np.asarray([len(tree.left)], dtype=np.float64))
        parts += [np.asarray(getattr(tree, f), dtype=np.float64) for f in _FIELDS]
    store.save(_key(run, "t"), done, np.concatenate(parts))
    store.save(_key(run, "m"), done % 2, np.concatenate([[float(done)], margin.ravel()]))


def load_round(
    store: Checkpoints, run: str, done: int, *, bins: Bins, hosts: int
) -> tuple[VerticalTree, ...]:
    """The trees of round ``done`` (checked as a guest model file's are)."""
    if done not in store.epochs(_key(run, "t")):
        raise ProtocolError(
            f"this party holds no saved trees of run {run!r} round {done}: they were lost "
            "with its process (a deployed party keeps them with --state FILE)"
        )
    flat = store.load(_key(run, "t"), done)
    try:
        count, at, trees = int(flat[0]), 1, []
        for _ in range(count):
            n = int(flat[at])
            at += 1
            raw = {}
            for f in _FIELDS:
                raw[f] = flat[at : at + n]
                if len(raw[f]) != n:
                    raise ValueError("short")
                at += n
            trees.append(tree_from_arrays(raw, bins, hosts))
    except (IndexError, ValueError) as exc:
        raise NodeStateError(f"the saved trees of run {run!r} round {done} are damaged") from exc
    return tuple(trees)


def load_margin(store: Checkpoints, run: str, done: int, shape: tuple[int, int]) -> np.ndarray:
    """The margins after round ``done`` (0: none saved, the caller starts from the base)."""
    if done % 2 not in store.epochs(_key(run, "m")):
        raise ProtocolError(f"this party holds no saved margins of run {run!r}")
    flat = store.load(_key(run, "m"), done % 2)
    if int(flat[0]) != done or len(flat) != 1 + shape[0] * shape[1]:
        raise ProtocolError(
            f"this party holds the margins of round {int(flat[0])}, not {done}: it cannot "
            "resume there"
        )
    return flat[1:].reshape(shape).astype(np.float32)


def save_records(store: Checkpoints, run: str, records: Sequence[tuple[int, int, bool]]) -> None:
    """A host's whole table of won splits (feature, left bins, default left)."""
    table = np.asarray(records, dtype=np.float64).reshape(-1, 3)
    store.save(_key(run, "r"), 0, table.ravel())


def load_records(store: Checkpoints, run: str, *, complete: int) -> list[tuple[int, int, bool]]:
    """The table :func:`save_records` kept; empty at the start of a run. Every level's
    commit saves it, so after a complete round a missing table is a lost one: refused,
    or new records would take the ids the guest's trees give to the lost ones."""
    if 0 not in store.epochs(_key(run, "r")):
        if complete:
            raise ProtocolError(
                f"this host holds no saved split table of run {run!r}, which has {complete} "
                "complete round(s): it was lost with its process (a deployed party keeps it "
                "with --state FILE)"
            )
        return []
    table = store.load(_key(run, "r"), 0)
    if len(table) % 3:
        raise NodeStateError(f"the saved split table of run {run!r} is damaged")
    return [(int(f), int(t), bool(d)) for f, t, d in table.reshape(-1, 3).tolist()]
