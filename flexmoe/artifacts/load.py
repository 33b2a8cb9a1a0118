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
from flexmoe.artifacts.guard import HeaderBounds, read_safetensors_header
from flexmoe.artifacts.lora import LoraExpertArtifact


def is_lora_file(path: str | os.PathLike, *, bounds: HeaderBounds | None = None) -> bool:
    """Whether ``path`` holds a LoRA-sized expert (:class:`flexmoe.lora.LoraExpertArtifact`);
    the header alone is read (within ``bounds`` when given)."""
    version = (read_safetensors_header(path, bounds=bounds).get("__metadata__") or {}).get("format_version", "")
    return isinstance(version, str) and version.startswith("lora-")


def has_routing_stats(path: str | os.PathLike, *, bounds: HeaderBounds | None = None) -> bool:
    """Whether the expert file at ``path`` carries routing statistics (reads the header only)."""
    return "layers.0.stats.mean" in read_safetensors_header(path, bounds=bounds)


def load_expert(
    path: str | os.PathLike,
    public_model: nn.Module,
    *,
    fingerprint: str | None = None,
    spec_sha256: str | None = None,
    bounds: HeaderBounds | None = None,
) -> ExpertArtifact:
    """Load an owner's expert file, full or LoRA-sized: a LoRA expert is validated and then
    materialised on ``public_model`` (``W + scaling * B @ A``), so either way the result is an
    ordinary :class:`ExpertArtifact`.

    ``bounds``: what an expert for ``public_model`` may hold (default
    :meth:`HeaderBounds.for_expert` of its config, with the largest bigram table any recipe
    allows); a caller loading several files computes them once, with its recipe's
    ``bigram_buckets``. A file declaring more is refused from its header."""
    if bounds is None:
        bounds = HeaderBounds.for_expert(public_model.config)
    if is_lora_file(path, bounds=bounds):
        lora = LoraExpertArtifact.load(path, fingerprint=fingerprint, spec_sha256=spec_sha256, bounds=bounds)
        return lora.materialize(public_model, spec_sha256=spec_sha256)
    return ExpertArtifact.load(path, fingerprint=fingerprint, spec_sha256=spec_sha256, bounds=bounds)
