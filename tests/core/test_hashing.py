"""hash_tensor: a tensor hashed as another dtype, a chunk at a time, hashes as the cast tensor."""

from __future__ import annotations

import hashlib

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexmoe.core import hashing


def digest(name, t, dtype=None):
    h = hashlib.sha256()
    hashing.hash_tensor(h, name, t, dtype)
    return h.hexdigest()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.integers(0, 7), min_size=1, max_size=3),
    chunk=st.integers(1, 9),
    source=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    seed=st.integers(0, 2**16),
)
def test_casting_in_chunks_hashes_as_the_cast_tensor(monkeypatch, shape, chunk, source, seed):
    # Chunks smaller than, equal to and beyond the tensor (monkeypatch: each example sets its own).
    monkeypatch.setattr(hashing, "CAST_CHUNK", chunk)
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(source)
    assert digest("w", t, torch.float32) == digest("w", t.float())
    assert digest("w", t, t.dtype) == digest("w", t)
    if t.numel() and source != torch.float32:
        assert digest("w", t, torch.float32) != digest("w", t)  # the dtype and the bytes are hashed


def test_a_non_contiguous_tensor_hashes_as_its_contiguous_copy(monkeypatch):
    monkeypatch.setattr(hashing, "CAST_CHUNK", 5)
    t = torch.randn(6, 4).to(torch.bfloat16).t()
    assert digest("w", t, torch.float32) == digest("w", t.contiguous().float())
