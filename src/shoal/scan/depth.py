"""How deeply a built value nests containers, walked without recursion and bounded.

``pickle.load`` builds values of any depth without recursing (a few bytes per level), but
almost everything a caller does with them recurses: ``repr``, ``==``, ``json.dumps``,
``copy.deepcopy`` and pickling them again fail past Python's recursion limit. The loader and
the scanner refuse values nested deeper than ``ScanLimits.max_value_depth`` (``nesting``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from shoal.scan.streams import check_time

__all__ = ["nesting"]

# References a value held only by its parent has when the walk finishes it (the parent's slot,
# the local variable, getrefcount's argument): more means it is shared, and its height is kept.
# Counting wrong costs only memory (a height kept for nothing) or time (a subtree walked again),
# never a wrong depth.
_ALONE = 3


def _nothing(v: Any) -> None:
    return None


Children = Mapping[type, Callable[[Any], Iterable[Any] | None]]


def nesting(root: Any, limit: int, kinds: Children) -> int | None:
    """Containers on the longest chain from ``root`` down (0 for a leaf), or None as soon as a
    chain is longer than ``limit``. ``kinds`` maps each container type to a function giving its
    items (None for a value of that type that holds none, such as a numeric array); values of
    any other type are leaves. Shared values are walked once: their heights
    are kept (a tuple holding one tuple twice, 40 levels over, is 40 deep, not 2**40 steps); a
    value met again on its own chain (a list holding itself) adds nothing, as ``repr`` prints
    it ``[...]``."""
    items = kinds.get(type(root))
    first = items(root) if items is not None else None
    if first is None:
        return 0
    refcount = sys.getrefcount
    heights: dict[int, int] = {}
    on_chain = {id(root)}
    nodes: list[Any] = [root]
    iters = [iter(first)]
    best = [0]
    rounds = 0
    while True:
        rounds += 1
        if not rounds & 0xFFF:
            check_time()
        deeper = sub = None
        deeper_items: Callable[[Any], Iterable[Any] | None] = _nothing
        top = best[-1]
        for child in iters[-1]:
            items = kinds.get(type(child))
            if items is None:
                continue
            sub = items(child)
            if sub is None:
                continue
            key = id(child)
            known = heights.get(key)
            if known is not None:
                if len(nodes) + known > limit:
                    return None
                if known > top:
                    top = known
            elif key not in on_chain:
                for grandchild in sub:
                    if type(grandchild) in kinds:
                        deeper, deeper_items = child, items
                        break
                if deeper is not None:
                    break
                sub = None  # its iterator holds a reference: gone before refcount looks
                # holds no container (most do): one deep, no need to walk it as a node
                if len(nodes) >= limit:
                    return None
                top = top or 1
                if refcount(child) > _ALONE:
                    heights[key] = 1
        best[-1] = top
        if deeper is not None:
            if len(nodes) >= limit:
                return None
            nodes.append(deeper)
            sub = None
            iters.append(iter(deeper_items(deeper) or ()))  # afresh: `sub` was read through
            best.append(0)
            on_chain.add(id(deeper))
            continue
        node = nodes.pop()
        iters.pop()
        height = best.pop() + 1
        on_chain.discard(id(node))
        if not nodes:
            return height
        if refcount(node) > _ALONE:
            heights[id(node)] = height
        if height > best[-1]:
            best[-1] = height
