"""A merge recipe (YAML) from anywhere is one clear ``MergeConfigError`` or a valid config.

No alias bomb expands, no nesting overflows the parser, no value of the wrong type reaches code
that assumed its type; nothing is read but the recipe itself.
"""

from __future__ import annotations

import contextlib
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexmoe.merge.config import MergeConfig, MergeConfigError

PROPERTY = settings(max_examples=200, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


def recipe(tmp_path, text: str):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def test_an_alias_bomb_is_refused_before_it_expands(tmp_path):
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, 10):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [{', '.join(['*' + prev] * 9)}]")
    lines.append("models: *j\nmethod: average")
    text = "\n".join(lines)
    assert len(text) < 600
    start = time.perf_counter()
    with pytest.raises(MergeConfigError, match="expands to more than"):
        MergeConfig.from_yaml(recipe(tmp_path, text))
    assert time.perf_counter() - start < 2


def test_a_recursive_alias_is_refused(tmp_path):
    with pytest.raises(MergeConfigError, match="expands to more than"):
        MergeConfig.from_yaml(recipe(tmp_path, "method: average\nmodels: &m [a, *m]\n"))


@pytest.mark.parametrize("text", ["[" * 50_000, "a:\n" + "".join(" " * i + "b:\n" for i in range(1, 1000))])
def test_deep_nesting_is_refused_without_recursion(tmp_path, text):
    with pytest.raises(MergeConfigError, match="nested deeper|not valid YAML"):
        MergeConfig.from_yaml(recipe(tmp_path, text))


@pytest.mark.parametrize(
    "text",
    [
        "method: [average]\nmodels: [a, b]",
        "method: average\nmodels: {a: b}",
        "method: average\nmodels: [a, [b]]",
        "method: average\nmodels: [a, b]\nweights: one",
        "method: average\nmodels: [a, b]\nweights: [1, .nan]",
        "method: ties\nbase: p\nmodels: [a]\ndensity: '0.2'",
        "method: ties\nbase: [p]\nmodels: [a]\ndensity: 0.2",
        "method: dare\nbase: p\nmodels: [a]\ndrop: 0.9\nseed: 1.5",
        "method: dare\nbase: p\nmodels: [a]\ndrop: 0.9\nseed: " + "9" * 5000,
        "method: average\nmodels: [a]\nmax_shard_size: true",
        "method: average\nmodels: [a]\nmax_shard_size: " + "9" * 400 + "GB",
        "method: average\nmodels: [a]\nmax_shard_size: ²GB",
        "method: average\nmodels: [a]\ndtype: 16",
        "? [a, b]\n: c\nmethod: average\nmodels: [a]",
        "method: !!python/object/apply:os.system [echo hi]\nmodels: [a]",
        "- just\n- a list",
    ],
)
def test_wrong_types_are_one_clear_error(tmp_path, text):
    with pytest.raises(MergeConfigError) as e:
        MergeConfig.from_yaml(recipe(tmp_path, text))
    assert len(str(e.value)) < 1000


_scalar = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10)
_value = st.recursive(
    _scalar, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
)
_keys = st.sampled_from(
    ["method", "models", "base", "weights", "density", "trim", "sign", "lam", "drop", "seed", "then", "dtype"]
    + ["max_shard_size", "other"]
)
_methods = st.sampled_from(["average", "task_arithmetic", "ties", "dare", "linear"]) | _value


@PROPERTY
@given(
    data=st.dictionaries(_keys, _value, max_size=6),
    method=_methods,
    models=st.lists(st.text(min_size=1, max_size=5), min_size=1, max_size=3) | _value,
)
def test_any_recipe_is_a_config_or_one_clear_error(tmp_path, data, method, models):
    text = yaml.safe_dump({**data, "method": method, "models": models})
    try:
        config = MergeConfig.from_yaml(recipe(tmp_path, text))
    except MergeConfigError:
        return
    assert config.method in ("average", "task_arithmetic", "ties", "dare")
    assert all(isinstance(m, str) for m in config.models)


@PROPERTY
@given(text=st.text(max_size=300))
def test_any_text_is_a_config_or_one_clear_error(tmp_path, text):
    with contextlib.suppress(MergeConfigError):
        MergeConfig.from_yaml(recipe(tmp_path, text))
