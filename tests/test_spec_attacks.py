"""A FederationSpec from another party: refused with one InputError naming the field, or read.

The spec travels from the coordinator to every owner (and back, by hash), so its reader gets the
same treatment as any other file: bounded JSON, every field checked against its annotated type
before a recipe compares or indexes it. Property tests put generated JSON values into every field;
the named tests are issue 17's classes (nested JSON, wrong types, a FIFO).
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexmoe.core.errors import InputError
from flexmoe.spec import FederationSpec

FP = "ab" * 32
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def base() -> dict:
    return FederationSpec(public_model="m", fingerprint=FP).to_dict()


def fields() -> list[tuple[str, ...]]:
    d = base()
    out = [(k,) for k in d if not isinstance(d[k], dict)]
    out += [(k, f) for k, v in d.items() if isinstance(v, dict) for f in v]
    return out


def refused_or_read(d):
    try:
        spec = FederationSpec.from_json(json.dumps(d))
    except InputError:
        return None
    assert isinstance(spec, FederationSpec)
    return spec


@PROPERTY
@given(path=st.sampled_from(fields()), value=JSON)
def test_any_value_in_any_field_is_refused_cleanly_or_read(path, value):
    d = base()
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    refused_or_read(d)


@PROPERTY
@given(JSON)
def test_any_json_document_is_refused_cleanly_or_read(value):
    refused_or_read(value)


@pytest.mark.parametrize(
    "path, value, field",
    [
        (("expert", "max_steps"), "300", "spec.expert.max_steps"),  # '300' > 0: a TypeError before
        (("expert", "betas"), 0.9, "spec.expert.betas"),
        (("expert", "lora_rank"), True, "spec.expert.lora_rank"),
        (("routing", "shrinkage"), [0.5], "spec.routing.shrinkage"),
        (("routing", "bigram_buckets"), 2**80, "spec.routing.bigram_buckets"),
        (("fingerprint",), 7, "spec.fingerprint"),  # len(7): a TypeError before
        (("public_model",), None, "spec.public_model"),
        (("public_router_embedding",), [[1.0], 2.0], "spec.public_router_embedding"),
        (("public_router_embedding",), "abc", "spec.public_router_embedding"),
        (("routing",), "lda", "spec.routing"),  # a string where a recipe goes: AttributeError before
        (("proxy", "min_docs"), 1.5, "spec.proxy.min_docs"),
    ],
)
def test_wrong_types_name_the_field(path, value, field):
    d = base()
    target = d
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(InputError, match=field.replace(".", r"\.")):
        FederationSpec.from_json(json.dumps(d))


def test_deeply_nested_json_is_one_error():
    with pytest.raises(InputError, match="nested deeper"):
        FederationSpec.from_json('{"public_model": ' + "[" * 5000 + "]" * 5000 + "}")


def test_a_fifo_is_refused_without_opening_it(tmp_path):
    path = tmp_path / "spec.json"
    os.mkfifo(path)
    with pytest.raises(InputError, match="not a regular file"):
        FederationSpec.load(path)


def test_a_spec_still_round_trips_with_its_hash(tmp_path):
    spec = FederationSpec(public_model="m", fingerprint=FP, public_router_embedding=[[0.5, -1.0], [1, 2]])
    back = FederationSpec.load(spec.save(tmp_path / "spec.json"))
    assert back == spec and back.sha256 == spec.sha256
    assert dataclasses.asdict(back) == dataclasses.asdict(spec)
