"""Token unigram counts as they travel: in an owner's expert artifact and in the spec's sidecar.

An owner's artifact may carry its training text's token counts over the public tokenizer's
vocabulary (:func:`flexmoe.data.statistics.unigram_counts`)::

    stats.unigram    [vocab_size]  float32, integral counts (one vector, not per layer)

with their total in the metadata ``unigram_tokens`` (a decimal string). The coordinator's public
counts travel the same way in a file next to the spec (``<spec stem>.public_stats.safetensors``),
recorded in :attr:`flexmoe.spec.FederationSpec.public_statistics` with its sha256.

Both are checked by the same rules (:func:`unigram_problem`): one dimension, the public model's
``vocab_size`` entries, finite, non-negative, integral, summing to the recorded total. What the
counts reveal (the owner's vocabulary and its frequencies; no text, no order) and what they cost:
docs/federation.md.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flexmoe.artifacts.guard import read_safetensors_header
from flexmoe.core.errors import InputError
from flexmoe.core.hashing import file_sha256
from flexmoe.core.io import atomic_file
from flexmoe.spec import FederationSpec, PublicStatistics

UNIGRAM_TENSOR = "stats.unigram"
UNIGRAM_TOKENS = "unigram_tokens"
PUBLIC_STATISTICS_SUFFIX = ".public_stats.safetensors"
# float32 rounds a count above 2**24 to within this relative error, so a large total may differ
# from the float32 vector's sum by up to that share of itself.
_FLOAT32_RELATIVE = 2.0**-24


def unigram_problem(counts: torch.Tensor, tokens, vocab_size: int | None = None) -> tuple[str, object, object] | None:
    """The first rule ``counts`` (with the recorded total ``tokens``, a decimal string or int)
    breaks, as ``(field, expected, got)``, or ``None`` when it keeps them all."""
    if counts.dim() != 1:
        return f"shape of {UNIGRAM_TENSOR}", "[vocab_size]", list(counts.shape)
    if vocab_size is not None and counts.shape[0] != vocab_size:
        return f"shape of {UNIGRAM_TENSOR}", [vocab_size], list(counts.shape)
    if counts.dtype != torch.float32:
        return f"dtype of {UNIGRAM_TENSOR}", "F32", str(counts.dtype)
    if not bool(torch.isfinite(counts).all()):
        return f"values of {UNIGRAM_TENSOR}", "finite counts", f"{int((~torch.isfinite(counts)).sum())} NaN/Inf entries"
    if bool((counts < 0).any()):
        return f"values of {UNIGRAM_TENSOR}", "non-negative counts", f"minimum {float(counts.min())}"
    fractional = counts != counts.round()
    if bool(fractional.any()):
        first = int(fractional.nonzero()[0, 0])
        return f"values of {UNIGRAM_TENSOR}", "integral counts", f"{float(counts[first])!r} at token id {first}"
    text = str(tokens) if tokens is not None else None
    if text is None or not text.isdigit():
        return f"metadata {UNIGRAM_TOKENS!r}", f"a non-negative integer with {UNIGRAM_TENSOR}", text
    total, summed = int(text), float(counts.double().sum())
    if abs(summed - total) > total * _FLOAT32_RELATIVE:
        return f"sum of {UNIGRAM_TENSOR}", f"{UNIGRAM_TOKENS} = {total}", f"{summed:.0f}"
    return None


# -- owners' statistics ---------------------------------------------------------------------------


class MissingUnigramStatistics(InputError):
    """Some owners' artifacts carry no unigram statistics that a recipe needs; ``owners`` names them."""

    def __init__(self, owners: Sequence[str]):
        self.owners = list(owners)
        if len(self.owners) == 1:
            what, it = f"owner {self.owners[0]}'s artifact carries", "it"
        else:
            what, it = f"the artifacts of owners {', '.join(self.owners)} carry", "them"
        super().__init__(
            f"{what} no unigram statistics: retrain {it} with this flexmoe version (`flexmoe train-expert`), "
            "whose artifacts carry them"
        )


def has_unigram(artifact) -> bool:
    """Whether ``artifact`` (an :class:`~flexmoe.artifacts.expert.ExpertFile`, or a file whose
    header alone is read) carries ``stats.unigram``."""
    if isinstance(artifact, (str, os.PathLike)):
        return UNIGRAM_TENSOR in read_safetensors_header(artifact)
    return UNIGRAM_TENSOR in artifact.tensors


def require_unigram(artifacts: Sequence) -> None:
    """Raise :class:`MissingUnigramStatistics` naming every owner whose artifact (object or file:
    headers only, no weight is read) lacks unigram statistics."""
    missing = [_owner(a) for a in artifacts if not has_unigram(a)]
    if missing:
        raise MissingUnigramStatistics(missing)


def _owner(artifact) -> str:
    if not isinstance(artifact, (str, os.PathLike)):
        return artifact.owner
    owner = (read_safetensors_header(artifact).get("__metadata__") or {}).get("owner")
    return owner if isinstance(owner, str) else Path(artifact).name


# -- the coordinator's public statistics ------------------------------------------------------------


def public_statistics_path(spec_path: str | os.PathLike) -> Path:
    """Where the public statistics of the spec at ``spec_path`` go: ``spec.json`` ->
    ``spec.public_stats.safetensors`` in the same directory."""
    spec_path = Path(spec_path)
    return spec_path.with_name(spec_path.name.removesuffix(".json") + PUBLIC_STATISTICS_SUFFIX)


def write_public_statistics(spec_path: str | os.PathLike, counts: torch.Tensor) -> PublicStatistics:
    """Write the public domain's counts next to the spec at ``spec_path`` (atomically) and return
    the record the spec keeps (file name and sha256)."""
    counts = counts.float().contiguous()
    total = int(counts.double().sum().round())
    problem = unigram_problem(counts, total)
    if problem is not None:
        field, expected, got = problem
        raise ValueError(f"public statistics: {field}: expected {expected}, got {got}")
    path = public_statistics_path(spec_path)
    with atomic_file(path) as tmp:
        save_file({UNIGRAM_TENSOR: counts}, str(tmp), metadata={UNIGRAM_TOKENS: str(total)})
    return PublicStatistics(file=path.name, sha256=file_sha256(path))


def load_public_statistics(
    spec: FederationSpec, spec_path: str | os.PathLike, vocab_size: int | None = None
) -> torch.Tensor:
    """The public domain's counts ``float32 [vocab_size]`` recorded in ``spec`` (loaded from
    ``spec_path``): the file next to it, refused unless its sha256 is the one the spec records
    and its counts keep :func:`unigram_problem`'s rules (``vocab_size``: the public model's)."""
    record = spec.public_statistics
    if record is None:
        raise InputError(
            f"the spec {spec_path} records no public statistics: write it with `flexmoe spec --public-data ...` "
            "(the coordinator's public text), or pass the public data to the command instead"
        )
    path = Path(spec_path).parent / record.file
    if not path.is_file():
        raise InputError(f"the spec's public statistics {path} are missing: keep the file next to {spec_path}")
    got = file_sha256(path)
    if got != record.sha256:
        raise InputError(
            f"public statistics {path}: sha256: expected {record.sha256} (recorded in the spec), got {got}; the "
            "file was changed after the spec was written: rewrite both with `flexmoe spec`"
        )
    header = read_safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    if set(header) != {UNIGRAM_TENSOR}:
        raise InputError(f"public statistics {path}: tensors: expected [{UNIGRAM_TENSOR!r}], got {sorted(header)}")
    with safe_open(str(path), framework="pt") as f:
        counts = f.get_tensor(UNIGRAM_TENSOR)
    problem = unigram_problem(counts, metadata.get(UNIGRAM_TOKENS), vocab_size)
    if problem is not None:
        field, expected, found = problem
        raise InputError(f"public statistics {path}: {field}: expected {expected}, got {found}")
    return counts
