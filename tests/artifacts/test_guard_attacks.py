"""The header guard against a hostile sender: any file is refused cleanly or read as declared.

A refusal is an ``ArtifactError`` (an ``InputError``) with a message of readable length, decided
from the header alone; never a ``RecursionError``, ``KeyError`` or a read of what the header
declares. The property tests generate headers (well formed, malformed, nested, oversized) and
write them to real files; the named tests are the attack classes of issue 17, one each.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tracemalloc

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import flexmoe
from flexmoe import ArtifactError, ExpertArtifact
from flexmoe.artifacts.guard import HeaderBounds, check_owner_name, read_safetensors_header
from flexmoe.core.errors import InputError
from flexmoe.core.surgery import moe_blocks
from flexmoe.testing import perturb_, tiny_model

PROPERTY = settings(
    max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


def write(path, header, data: bytes = b"", *, raw: bytes | None = None):
    body = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def entry(dtype="F32", shape=(2,), start=0):
    size = {"F32": 4, "F16": 2, "BF16": 2}[dtype]
    n = size
    for d in shape:
        n *= d
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [start, start + n]}


@pytest.fixture(scope="module")
def expert_file(tmp_path_factory):
    model = flexmoe.upcycle(tiny_model("olmo2"), num_experts=1, owners=["alice"])
    for block in moe_blocks(model):
        perturb_(block.experts[1], seed=1)
    art = ExpertArtifact.from_model(model, owner="alice", spec_sha256="s", unigram=torch.ones(model.config.vocab_size))
    return model.config, art.save(tmp_path_factory.mktemp("a") / "alice.safetensors")


# -- generated attacks -------------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
_entry = (
    st.fixed_dictionaries(
        {
            "dtype": st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "F4", "x", ""]) | _json,
            "shape": st.lists(st.integers(-2, 2**40), max_size=10) | _json,
            "data_offsets": st.lists(st.integers(-(2**70), 2**70), min_size=0, max_size=3) | _json,
        }
    )
    | _json
)
_names = st.text(min_size=0, max_size=12) | st.sampled_from(["layers.0.router.bias", "a\n", "x" * 600])
_header = st.dictionaries(_names, _entry, max_size=6) | _json
_metadata = st.dictionaries(st.text(max_size=10), st.text(max_size=30), max_size=4) | _json


@PROPERTY
@given(header=_header, metadata=_metadata, data=st.binary(max_size=64))
def test_any_header_is_refused_cleanly_or_read_as_declared(tmp_path, header, metadata, data):
    if isinstance(header, dict) and metadata is not None:
        header = {**header, "__metadata__": metadata}
    path = write(tmp_path / "x.safetensors", header, data)
    try:
        got = read_safetensors_header(path)
    except InputError as e:
        assert isinstance(e, ArtifactError) and len(str(e)) < 3000
        return
    # Accepted: what it declares is exactly what is on disk.
    spans = sorted(tuple(e["data_offsets"]) for k, e in got.items() if k != "__metadata__")
    assert sum(b - a for a, b in spans) == len(data)


@PROPERTY
@given(raw=st.binary(max_size=200), declared=st.none() | st.integers(0, 2**64 - 1))
def test_any_bytes_are_refused_cleanly(tmp_path, raw, declared):
    path = tmp_path / "x.safetensors"
    path.write_bytes(raw if declared is None else struct.pack("<Q", declared) + raw)
    with contextlib.suppress(ArtifactError):
        read_safetensors_header(path)


@PROPERTY
@given(depth=st.integers(1, 200_000), kind=st.sampled_from(["[", '{"a":']))
def test_nested_headers_are_refused_without_recursion(tmp_path, depth, kind):
    body = (kind * depth).encode()
    with pytest.raises(ArtifactError, match="header"):
        read_safetensors_header(write(tmp_path / "x.safetensors", None, raw=body))


# -- one test per attack class -----------------------------------------------------------------


def test_honest_expert_files_keep_the_bounds_of_their_public_model(expert_file):
    config, path = expert_file
    header = read_safetensors_header(path, bounds=HeaderBounds.for_expert(config))
    assert header["__metadata__"]["owner"] == "alice"


def test_sparse_file_declaring_huge_tensors_is_refused_from_the_header(expert_file, tmp_path):
    """Two 512 MiB tensors in a sparse file: refused on the public model's bounds, reading nothing
    of the data, with a peak allocation far below one tensor."""
    config, _ = expert_file
    big = 512 * 2**20
    header = {"layers.0.expert.up_proj.weight": entry(shape=(big // 4,))}
    header["layers.0.expert.down_proj.weight"] = entry(shape=(big // 4,), start=big)
    path = write(tmp_path / "sparse.safetensors", header)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + 2 * big)  # a hole: no disk used
    bounds = HeaderBounds.for_expert(config)
    tracemalloc.start()
    with pytest.raises(ArtifactError, match="file size"):
        read_safetensors_header(path, bounds=bounds)
    # The same tensors in a file no larger than the bound: refused per tensor, from the header.
    small = {"x": entry(shape=(bounds.max_tensor_bytes // 4 + 1,))}
    path = write(tmp_path / "one.safetensors", small)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size + bounds.max_tensor_bytes + 4)
    with pytest.raises(ArtifactError, match="size of tensor"):
        read_safetensors_header(path, bounds=bounds)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 * 2**20


def test_a_fifo_is_refused_without_blocking(tmp_path):
    path = tmp_path / "pipe.safetensors"
    os.mkfifo(path)
    with pytest.raises(ArtifactError, match="a regular file"):
        read_safetensors_header(path)


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (b'{"x": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}', "digits"),
        (b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, NaN]}}', "NaN"),
        (b'{"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "x": {}}', "twice"),
        (b'{"x": {"dtype": "F32", "shape": [true], "data_offsets": [0, 4]}}', "header entry"),
        (b'{"x\\n": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', "tensor name"),
        (b'{"x": {"dtype": "F32", "shape": [1, 1, 1, 1, 1, 1, 1, 1, 1], "data_offsets": [0, 4]}}', "header entry"),
        (b'{"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', "shape x dtype"),
    ],
    ids=["huge-int", "nan", "duplicate-name", "bool-shape", "newline-name", "too-many-dims", "size-mismatch"],
)
def test_malformed_entries_are_refused_by_name(tmp_path, body, match):
    with pytest.raises(ArtifactError, match=match):
        read_safetensors_header(write(tmp_path / "x.safetensors", None, b"\0" * 4, raw=body))


def test_overlapping_tensors_are_refused(tmp_path):
    # Two names for the same bytes: safetensors would read both, the guard refuses the file.
    header = {"a": entry(), "b": entry()}
    with pytest.raises(ArtifactError, match="overlaps"):
        read_safetensors_header(write(tmp_path / "x.safetensors", header, b"\0" * 8))


@pytest.mark.parametrize("owner", ["", " alice", "a/b", "..", "x" * 20_000_000, "line\nbreak"])
def test_bad_owner_names_are_refused_with_a_short_message(tmp_path, owner):
    path = tmp_path / "x.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata={"owner": owner})
    with pytest.raises(ArtifactError, match="owner") as e:
        read_safetensors_header(path)
    assert len(str(e.value)) < 1500 and "\n" not in str(e.value)
    assert not check_owner_name(owner) and check_owner_name("alice") and check_owner_name("Ärztekammer Süd")


def test_a_pickle_is_still_recognised_and_a_header_length_of_0x80_is_not_one(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"\x80\x04\x95" + b"\0" * 20)
    with pytest.raises(ArtifactError, match="pickle"):
        read_safetensors_header(path)
    # A header whose length's low byte is 0x80 and next byte 0x02 (640 bytes) is safetensors.
    meta = {"pad": "p" * (640 - 100)}
    body = json.dumps({"__metadata__": meta, "x": entry()}).encode()
    body += b" " * (640 - len(body))
    path.write_bytes(struct.pack("<Q", len(body)) + body + b"\0" * 8)
    assert read_safetensors_header(path)["x"]["shape"] == [2]


@pytest.mark.parametrize("dtype", [[], {}, ["F32"], 1.5, None])
def test_a_dtype_that_is_not_a_string_is_refused_by_name(tmp_path, dtype):
    """Found by the property test above: an unhashable dtype once reached a dict look-up."""
    header = {"x": {"dtype": dtype, "shape": [], "data_offsets": [0, 0]}}
    raw = json.dumps(header).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(ArtifactError, match="x"):
        read_safetensors_header(path)
