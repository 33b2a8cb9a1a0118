"""Content hashes: the public model's fingerprint and an expert's content hash.

The fingerprint (sha256 over the public model's tensors by sorted name) is what every owner's
expert and the spec are checked against, so a dense model and any MoE upcycled from it hash the
same. It sits on the lowest floor because model surgery, the artifact loader, training and the
coordinator all need the same definition.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Mapping

import torch
from torch import nn

from flexmoe.core.moe import MoEBlock


def public_state(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The public model's tensors under their dense names, in sorted order.

    For a dense model this is its state dict; for a flexmoe MoE it is expert 0 under the
    original ``...mlp.*`` names, without routers and owner experts.
    """
    prefixes = [name + "." for name, m in model.named_modules() if isinstance(m, MoEBlock)]
    items = {}
    for name, t in model.state_dict().items():
        prefix = next((p for p in prefixes if name.startswith(p)), None)
        if prefix is not None:
            rest = name[len(prefix) :]
            if not rest.startswith("experts.0."):
                continue
            name = prefix + rest[len("experts.0.") :]
        items[name] = t
    for name in sorted(items):
        yield name, items[name]


def fingerprint(model: nn.Module) -> str:
    """sha256 over the public model's tensors (name, dtype, shape, bytes), by sorted name.

    Streams one tensor at a time; a dense model and the MoE upcycled from it (before or
    after training the owners' experts) have the same fingerprint.
    """
    h = hashlib.sha256()
    for name, t in public_state(model):
        hash_tensor(h, name, t)
    return h.hexdigest()


# Elements converted at a time when a tensor is hashed as another dtype: 64 MB of float32.
CAST_CHUNK = 1 << 24


def hash_tensor(h, name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """Feed one named tensor into the sha256 ``h``: name, dtype, shape, then its raw bytes.

    With ``dtype``, the tensor is hashed as if cast to it first (a bfloat16 public model hashed
    as the coordinator's float32 copy), converting :data:`CAST_CHUNK` elements at a time: sha256
    reads a stream, so the digest is the whole cast tensor's without ever holding it (a 7B
    model's embedding would be a 1.6 GB float32 copy)."""
    t = t.detach().to("cpu").contiguous()
    dtype = dtype or t.dtype
    h.update(f"{name}|{str(dtype).removeprefix('torch.')}|{list(t.shape)}\n".encode())
    flat = t.reshape(-1)
    if dtype == t.dtype:
        # The numpy view's buffer, not .tobytes(): hashing a 1.6 GB embedding must not copy it first.
        h.update(memoryview(flat.view(torch.uint8).numpy()))
        return
    for start in range(0, flat.numel(), CAST_CHUNK):
        h.update(memoryview(flat[start : start + CAST_CHUNK].to(dtype).view(torch.uint8).numpy()))


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def content_sha256(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> str:
    """sha256 of an expert's tensors (name, dtype, shape, bytes, by sorted name) and metadata (sorted
    items): the same for the same expert however its file was written, so owners and coordinator can
    name the experts of a merge by hash."""
    h = ContentHash()
    for name in sorted(tensors):
        h.add(name, tensors[name])
    return h.hexdigest(metadata)


class ContentHash:
    """:func:`content_sha256` fed one tensor at a time, for a caller that never holds them all
    (the coordinator's streamed assembly): :meth:`add` each tensor in sorted name order, then
    :meth:`hexdigest` with the metadata."""

    def __init__(self):
        self._h = hashlib.sha256()
        self._last: str | None = None

    def add(self, name: str, t: torch.Tensor) -> None:
        if self._last is not None and name <= self._last:
            raise ValueError(f"tensors are hashed in sorted name order: {name!r} came after {self._last!r}")
        self._last = name
        hash_tensor(self._h, name, t)

    def hexdigest(self, metadata: Mapping[str, str]) -> str:
        h = self._h.copy()
        for key in sorted(metadata):
            h.update(f"{key}={metadata[key]}\n".encode())
        return h.hexdigest()
