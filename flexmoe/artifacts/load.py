"""Open an owner's expert file whichever kind it is, full or LoRA-sized, by its header.

The coordinator's assembly, the CLI and ``add_expert`` take either kind: a LoRA-sized expert is
validated and materialised on the public model, so callers always get an ordinary
:class:`~flexmoe.ExpertArtifact`. It sits on the artifacts floor because it needs nothing but
the two file classes and the header guard.
"""

from __future__ import annotations

import os

from torch import nn

from flexmoe.artifacts.expert import ExpertArtifact
from flexmoe.artifacts.guard import read_safetensors_header
from flexmoe.artifacts.lora import LoraExpertArtifact


def is_lora_file(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a LoRA-sized expert (:class:`flexmoe.lora.LoraExpertArtifact`)."""
    version = (read_safetensors_header(path).get("__metadata__") or {}).get("format_version", "")
    return isinstance(version, str) and version.startswith("lora-")


def has_routing_stats(path: str | os.PathLike) -> bool:
    """Whether the expert file at ``path`` carries routing statistics (reads the header only)."""
    return "layers.0.stats.mean" in read_safetensors_header(path)


def load_expert(
    path: str | os.PathLike, public_model: nn.Module, *, fingerprint: str | None = None, spec_sha256: str | None = None
) -> ExpertArtifact:
    """Load an owner's expert file, full or LoRA-sized: a LoRA expert is validated and then
    materialised on ``public_model`` (``W + scaling * B @ A``), so either way the result is an
    ordinary :class:`ExpertArtifact`."""
    if is_lora_file(path):
        lora = LoraExpertArtifact.load(path, fingerprint=fingerprint, spec_sha256=spec_sha256)
        return lora.materialize(public_model, spec_sha256=spec_sha256)
    return ExpertArtifact.load(path, fingerprint=fingerprint, spec_sha256=spec_sha256)
