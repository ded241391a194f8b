"""Shared fixtures for the Core API tests: an engine wrapper that records what crosses it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from shoal.runtime import DispatchResult, LocalEngine, Task


@dataclass
class SpyEngine:
    """Wraps an engine and records every task sent and every result returned.

    ``tamper`` may rewrite a result before the server sees it (to test bad replies).
    """

    inner: LocalEngine
    sent: list[list[Task]] = field(default_factory=list)
    results: list[DispatchResult] = field(default_factory=list)
    tamper: Callable[[list[Task], DispatchResult], DispatchResult] | None = None

    def node_ids(self) -> Sequence[str]:
        return self.inner.node_ids()

    def dispatch(self, tasks: Sequence[Task], *, deadline_s: float) -> DispatchResult:
        result = self.inner.dispatch(tasks, deadline_s=deadline_s)
        if self.tamper is not None:
            result = self.tamper(list(tasks), result)
        self.sent.append(list(tasks))
        self.results.append(result)
        return result

    def close(self) -> None:
        self.inner.close()

    def dispatches_of(self, name: str) -> list[tuple[list[Task], DispatchResult]]:
        return [(t, r) for t, r in zip(self.sent, self.results) if t and t[0].name == name]


@pytest.fixture
def spy_factory() -> Callable[..., SpyEngine]:
    def make(inner: LocalEngine, **kw: Any) -> SpyEngine:
        return SpyEngine(inner=inner, **kw)

    return make
