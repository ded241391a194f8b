"""Recipe: import-and-call descriptions with JSON options, the only objects RayEngine sends."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shoal.errors import ConfigError
from shoal.runtime import NodeApp, Recipe

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=10,
)


@given(st.dictionaries(st.text(min_size=1, max_size=8), json_values, max_size=4))
def test_options_round_trip_through_json(options: dict[str, Any]) -> None:
    recipe = Recipe(target="shoal.learn.tasks:model_app", options=options)
    assert Recipe.from_json(recipe.to_json()) == recipe
    assert recipe.options == options


def test_build_imports_and_calls_the_target() -> None:
    recipe = Recipe(
        target="shoal.learn.tasks:model_app",
        options={"model": "softmax_regression", "features": 4, "classes": 3},
    )
    assert isinstance(recipe.build(), NodeApp)


@pytest.mark.parametrize(
    ("target", "options", "message"),
    [
        ("os.system", {}, "module:function"),
        ("__import__('os'):x", {}, "module:function"),
        ("m:f; rm -rf /", {}, "module:function"),
        ("m:f", {"a": object()}, "plain JSON"),
        ("m:f", {"a": math.nan}, "plain JSON"),
        ("m:f", {"a": b"bytes"}, "plain JSON"),
    ],
)
def test_bad_recipes_are_refused_when_made(target: str, options: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Recipe(target=target, options=options)


def test_build_errors_name_the_target() -> None:
    with pytest.raises(ConfigError, match="cannot import 'no_such_mod'"):
        Recipe(target="no_such_mod:f").build()
    with pytest.raises(ConfigError, match="has no nothing_here"):
        Recipe(target="shoal.learn.tasks:nothing_here").build()
    with pytest.raises(ConfigError, match="not callable"):
        Recipe(target="shoal.learn.tasks:TRAIN").build()
    for text in ("{}", "[]", '{"target": "a:b", "options": {}, "x": 1}'):
        with pytest.raises(ConfigError):
            Recipe.from_json(text)
