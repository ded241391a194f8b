"""The contract's refused calls, in the one check every engine runs before any task."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.errors import ConfigError
from shoal.runtime.engine import Task, check_dispatch

KNOWN = frozenset({"a", "b", "c"})
ids = st.lists(st.sampled_from(["a", "b", "c", "stranger"]), max_size=6)
deadlines = st.sampled_from([-1.0, 0.0, 1e-9, 5.0])


def tasks_for(node_ids: list[str]) -> list[Task]:
    return [
        Task(node_id=n, name="fit", payload=b"", task_id=f"t{i}") for i, n in enumerate(node_ids)
    ]


@given(node_ids=ids, deadline_s=deadlines, registry_decides=st.booleans())
def test_refuses_exactly_the_calls_the_contract_refuses(
    node_ids: list[str], deadline_s: float, registry_decides: bool
) -> None:
    known = None if registry_decides else KNOWN
    unknown = [] if known is None else [n for n in node_ids if n not in known]
    expect_refusal = deadline_s <= 0 or bool(unknown) or len(set(node_ids)) < len(node_ids)
    if not expect_refusal:
        check_dispatch(tasks_for(node_ids), deadline_s, known=known)
        return
    with pytest.raises(ConfigError) as caught:
        check_dispatch(tasks_for(node_ids), deadline_s, known=known)
    message = str(caught.value)
    if deadline_s <= 0:
        assert "deadline_s must be positive" in message
    else:
        # the first offending task is named: an unknown id or the second task of one node
        assert "'stranger'" in message or "two tasks in one dispatch" in message


def test_names_the_engine_s_own_noun() -> None:
    with pytest.raises(ConfigError, match=r"no site 'x' in this federated request"):
        check_dispatch(
            tasks_for(["x"]), 1.0, known={"y"}, noun="site", where="in this federated request"
        )
    with pytest.raises(ConfigError, match=r"site 'y' got two tasks in one dispatch"):
        check_dispatch(tasks_for(["y", "y"]), 1.0, known={"y"}, noun="site")
