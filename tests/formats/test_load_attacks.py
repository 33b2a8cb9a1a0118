"""Opening a model directory another party wrote: refused cleanly, before the work, or opened.

Every refusal is an ``InputError`` decided from the JSON files and the shard headers, before the
model is built: a shard outside the directory, a FIFO, a ``flexmoe_config.json`` naming more
owners than the tensors hold, JSON nested to overflow the parser, fields of the wrong type.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flexmoe
from flexmoe.core.errors import InputError
from flexmoe.formats import export as hf
from flexmoe.formats.load import detect_format
from flexmoe.testing import tiny_model


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    model = flexmoe.upcycle(tiny_model("olmo2"), 2, owners=["alice", "bob"])
    return flexmoe.export(model, tmp_path_factory.mktemp("m") / "native", "native")


@pytest.fixture
def copy(native, tmp_path):
    return shutil.copytree(native, tmp_path / "copy")


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def first_shard(directory):
    return sorted(set(json.loads((directory / hf.INDEX).read_text())["weight_map"].values()))[0]


def test_the_untouched_export_opens(native):
    assert flexmoe.load(native) is not None


def test_a_shard_outside_the_directory_is_refused(copy, tmp_path):
    index = json.loads((copy / hf.INDEX).read_text())
    shard = first_shard(copy)
    outside = shutil.copy(copy / shard, tmp_path / "elsewhere.safetensors")
    for name in (str(outside), "../elsewhere.safetensors"):
        weight_map = {k: (name if v == shard else v) for k, v in index["weight_map"].items()}
        (copy / hf.INDEX).write_text(json.dumps({**index, "weight_map": weight_map}))
        with pytest.raises(InputError, match="outside|relative"):
            flexmoe.load(copy)
    # A symbolic link out of the directory is the same thing.
    (copy / hf.INDEX).write_text(json.dumps(index))
    (copy / shard).unlink()
    (copy / shard).symlink_to(outside)
    with pytest.raises(InputError, match="outside"):
        flexmoe.load(copy)


def test_a_fifo_shard_is_refused_without_blocking(copy):
    shard = first_shard(copy)
    (copy / shard).unlink()
    os.mkfifo(copy / shard)
    with pytest.raises(InputError, match="not a regular file"):
        flexmoe.load(copy)
    os.mkfifo(copy / "flexmoe_config.fifo")
    (copy / hf.FLEXMOE_CONFIG).unlink()
    os.rename(copy / "flexmoe_config.fifo", copy / hf.FLEXMOE_CONFIG)
    with pytest.raises(InputError, match="not a regular file"):
        detect_format(copy)


def test_many_owners_are_refused_before_any_expert_is_copied(copy):
    edit_json(copy / hf.FLEXMOE_CONFIG, owners=["public", *(f"o{i}" for i in range(20_000))])
    start = time.perf_counter()
    with pytest.raises(InputError, match="20001 owners"):
        flexmoe.load(copy)
    assert time.perf_counter() - start < 5  # deep-copying 20,000 MLPs per layer takes minutes


@pytest.mark.parametrize("name", [hf.FLEXMOE_CONFIG, hf.BASE_CONFIG, hf.INDEX])
def test_deeply_nested_json_is_refused_without_recursion(copy, name):
    (copy / name).write_text('{"a": ' * 100_000 + "1" + "}" * 100_000)
    with pytest.raises(InputError, match="nested deeper"):
        flexmoe.load(copy)


@pytest.mark.parametrize(
    "change",
    [
        {"owners": "alice"},
        {"owners": ["public", "alice", "alice"]},
        {"owners": ["public", ""]},
        {"owners": ["public", {"a": 1}]},
        {"top_k": "2"},
        {"top_k": True},
        {"top_k": 10**30},
        {"normalize": "no"},
        {"router": 7},
        {"format_version": ["1"]},
    ],
    ids=lambda c: str(c)[:30],
)
def test_wrong_types_in_flexmoe_config_are_refused(copy, change):
    edit_json(copy / hf.FLEXMOE_CONFIG, **change)
    with pytest.raises(InputError):
        flexmoe.load(copy)


def test_a_shard_holding_a_tensor_the_index_does_not_list_is_refused(copy):
    index = json.loads((copy / hf.INDEX).read_text())
    key = sorted(index["weight_map"])[0]
    del index["weight_map"][key]
    (copy / hf.INDEX).write_text(json.dumps(index))
    with pytest.raises(InputError, match="not in"):
        flexmoe.load(copy)


def test_a_base_config_larger_than_the_tensors_is_refused_before_building(copy):
    edit_json(copy / hf.BASE_CONFIG, hidden_size=65536, intermediate_size=65536)
    with pytest.raises(InputError, match="the model expects"):
        flexmoe.load(copy)


_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(["format", "format_version", "owners", "top_k", "normalize", "router"]), value=_value)
def test_any_flexmoe_config_value_is_refused_cleanly_or_opens(native, tmp_path_factory, field, value):
    directory = shutil.copytree(native, tmp_path_factory.mktemp("h") / "m")
    edit_json(directory / hf.FLEXMOE_CONFIG, **{field: value})
    with contextlib.suppress(InputError, FileNotFoundError):
        flexmoe.load(directory)
