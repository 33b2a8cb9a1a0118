"""Token unigram counts as they travel: in an owner's expert artifact and in the spec's sidecar.

An owner's artifact may carry its training text's token counts over the public tokenizer's
vocabulary (:func:`flexmoe.data.statistics.unigram_counts`)::

    stats.unigram    [vocab_size]  float32, integral counts (one vector, not per layer)

with their total in the metadata ``unigram_tokens`` (a decimal string), and, when the spec's
routing recipe asks for them, the counts of adjacent token pairs within the packed rows, hashed
into the recipe's number of buckets (:func:`flexmoe.modeling.domain_posterior.bigram_bucket`)::

    stats.bigram     [buckets]     float32, integral counts

with their total in ``bigram_pairs``. The coordinator's public counts travel the same way in a
file next to the spec (``<spec stem>.public_stats.safetensors``), recorded in
:attr:`flexmoe.spec.FederationSpec.public_statistics` with its sha256.

Both are checked by the same rules (:func:`unigram_problem`, :func:`bigram_problem`): one
dimension, the public model's ``vocab_size`` entries (the recipe's bucket count), finite,
non-negative, integral, summing to the recorded total (no more pairs than tokens). What the counts
reveal (unigrams: the owner's vocabulary and its frequencies; bigrams: also which tokens follow
which, i.e. frequent short phrases; no longer text) and what they cost: docs/federation.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from flexmoe.artifacts.guard import read_safetensors_header
from flexmoe.core.errors import InputError
from flexmoe.core.hashing import file_sha256
from flexmoe.core.io import atomic_file
from flexmoe.core.parsing import parse_count, shorten
from flexmoe.modeling.domain_posterior import MAX_BIGRAM_BITS, valid_bucket_count
from flexmoe.spec import FederationSpec, PublicStatistics

UNIGRAM_TENSOR = "stats.unigram"
UNIGRAM_TOKENS = "unigram_tokens"
BIGRAM_TENSOR = "stats.bigram"
BIGRAM_PAIRS = "bigram_pairs"
TOKEN_STATISTICS = (UNIGRAM_TENSOR, BIGRAM_TENSOR)
PUBLIC_STATISTICS_SUFFIX = ".public_stats.safetensors"
# float32 rounds a count above 2**24 to within this relative error, so a large total may differ
# from the float32 vector's sum by up to that share of itself.
_FLOAT32_RELATIVE = 2.0**-24
# No honest total of tokens or pairs comes near this (float64 holds every integer up to it).
_MAX_COUNT = 2**53


class TokenStatistics(NamedTuple):
    """One domain's token counts: ``unigram`` ``float32 [vocab_size]`` and, when the recipe ships
    them, ``bigram`` ``float32 [buckets]`` (adjacent pairs within the packed rows, hashed)."""

    unigram: torch.Tensor
    bigram: torch.Tensor | None = None


def _counts_problem(counts: torch.Tensor, name: str, what: str, size, total_field: str, total):
    if counts.dim() != 1:
        return f"shape of {name}", f"[{what}]", list(counts.shape)
    if size is not None and counts.shape[0] != size:
        return f"shape of {name}", [size], list(counts.shape)
    if counts.dtype != torch.float32:
        return f"dtype of {name}", "F32", str(counts.dtype)
    if not bool(torch.isfinite(counts).all()):
        return f"values of {name}", "finite counts", f"{int((~torch.isfinite(counts)).sum())} NaN/Inf entries"
    if bool((counts < 0).any()):
        return f"values of {name}", "non-negative counts", f"minimum {float(counts.min())}"
    fractional = counts != counts.round()
    if bool(fractional.any()):
        first = int(fractional.nonzero()[0, 0])
        return f"values of {name}", "integral counts", f"{float(counts[first])!r} at index {first}"
    expected = _count(total)
    if expected is None:
        return f"metadata {total_field!r}", f"a non-negative integer up to 2**53 with {name}", shorten(total, 60)
    summed = float(counts.double().sum())
    if abs(summed - expected) > expected * _FLOAT32_RELATIVE:
        return f"sum of {name}", f"{total_field} = {expected}", f"{summed:.0f}"
    return None


def _count(value) -> int | None:
    """A recorded total (a decimal string or an int) as an int in ``[0, 2**53]``, else ``None``."""
    try:
        return parse_count(value, what="count", maximum=_MAX_COUNT)
    except InputError:
        return None


def unigram_problem(counts: torch.Tensor, tokens, vocab_size: int | None = None) -> tuple[str, object, object] | None:
    """The first rule ``counts`` (with the recorded total ``tokens``, a decimal string or int)
    breaks, as ``(field, expected, got)``, or ``None`` when it keeps them all."""
    return _counts_problem(counts, UNIGRAM_TENSOR, "vocab_size", vocab_size, UNIGRAM_TOKENS, tokens)


def bigram_problem(
    counts: torch.Tensor, pairs, tokens, buckets: int | None = None
) -> tuple[str, object, object] | None:
    """As :func:`unigram_problem` for the hashed pair counts (total ``pairs``), which also must
    have a power-of-two length (``buckets``: the recipe's) and count no more pairs than the
    unigram counts count tokens (``tokens``): a row of ``n`` tokens holds ``n - 1`` pairs."""
    problem = _counts_problem(counts, BIGRAM_TENSOR, "buckets", buckets, BIGRAM_PAIRS, pairs)
    if problem is not None:
        return problem
    n = counts.shape[0]
    if not valid_bucket_count(n):
        return f"shape of {BIGRAM_TENSOR}", f"a power of two up to 2**{MAX_BIGRAM_BITS}", [n]
    most = _count(tokens)
    if most is not None and _count(pairs) > most:
        return f"metadata {BIGRAM_PAIRS!r}", f"at most {UNIGRAM_TOKENS} = {most}", pairs
    return None


def statistics_problem(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], vocab_size=None, buckets=None
) -> tuple[str, object, object] | None:
    """The first rule the token statistics among ``tensors`` (an artifact's or the public file's)
    break: each present tensor by its rules, each total only with its tensor, bigrams only with
    unigrams. ``None`` when all hold (or none is present)."""
    for name, total in ((UNIGRAM_TENSOR, UNIGRAM_TOKENS), (BIGRAM_TENSOR, BIGRAM_PAIRS)):
        if name not in tensors and total in metadata:
            return name, f"present with metadata {total!r}", "missing"
    if UNIGRAM_TENSOR not in tensors:
        return (BIGRAM_TENSOR, f"only with {UNIGRAM_TENSOR}", "without it") if BIGRAM_TENSOR in tensors else None
    tokens = metadata.get(UNIGRAM_TOKENS)
    problem = unigram_problem(tensors[UNIGRAM_TENSOR], tokens, vocab_size)
    if problem is None and BIGRAM_TENSOR in tensors:
        problem = bigram_problem(tensors[BIGRAM_TENSOR], metadata.get(BIGRAM_PAIRS), tokens, buckets)
    return problem


# -- owners' statistics ---------------------------------------------------------------------------


class MissingUnigramStatistics(InputError):
    """Some owners' artifacts carry no token statistics (or no bigram counts, with ``bigram``) that
    a recipe needs; ``owners`` names them."""

    def __init__(self, owners: Sequence[str], bigram: bool = False):
        self.owners = list(owners)
        if len(self.owners) == 1:
            what, it = f"owner {self.owners[0]}'s artifact carries", "it"
        else:
            what, it = f"the artifacts of owners {', '.join(self.owners)} carry", "them"
        kind = "bigram" if bigram else "unigram"
        super().__init__(
            f"{what} no {kind} statistics: retrain {it} with this flexmoe version (`flexmoe train-expert`), "
            "whose artifacts carry them"
        )


def has_token_statistics(artifact, bigram: bool = False) -> bool:
    """Whether ``artifact`` (an :class:`~flexmoe.artifacts.expert.ExpertFile`, or a file whose
    header alone is read) carries ``stats.unigram`` (and, with ``bigram``, ``stats.bigram``)."""
    names = read_safetensors_header(artifact) if isinstance(artifact, (str, os.PathLike)) else artifact.tensors
    return UNIGRAM_TENSOR in names and (not bigram or BIGRAM_TENSOR in names)


def require_token_statistics(artifacts: Sequence, bigram: bool = False) -> None:
    """Raise :class:`MissingUnigramStatistics` naming every owner whose artifact (object or file:
    headers only, no weight is read) lacks the token statistics (bigrams too, with ``bigram``)."""
    missing = [_owner(a) for a in artifacts if not has_token_statistics(a, bigram)]
    if missing:
        raise MissingUnigramStatistics(missing, bigram=bigram and all(has_token_statistics(a) for a in artifacts))


def _owner(artifact) -> str:
    if not isinstance(artifact, (str, os.PathLike)):
        return artifact.owner
    owner = (read_safetensors_header(artifact).get("__metadata__") or {}).get("owner")
    return owner if isinstance(owner, str) else Path(artifact).name


def statistics_tensors(statistics: TokenStatistics) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``statistics`` as an artifact or the public file stores them: tensors (float32) and their
    totals as metadata strings."""
    unigram = statistics.unigram.detach().float().cpu().contiguous()
    tensors = {UNIGRAM_TENSOR: unigram}
    metadata = {UNIGRAM_TOKENS: str(int(unigram.double().sum().round()))}
    if statistics.bigram is not None:
        bigram = statistics.bigram.detach().float().cpu().contiguous()
        tensors[BIGRAM_TENSOR] = bigram
        metadata[BIGRAM_PAIRS] = str(int(bigram.double().sum().round()))
    return tensors, metadata


# -- the coordinator's public statistics ------------------------------------------------------------


def public_statistics_path(spec_path: str | os.PathLike) -> Path:
    """Where the public statistics of the spec at ``spec_path`` go: ``spec.json`` ->
    ``spec.public_stats.safetensors`` in the same directory."""
    spec_path = Path(spec_path)
    return spec_path.with_name(spec_path.name.removesuffix(".json") + PUBLIC_STATISTICS_SUFFIX)


def write_public_statistics(spec_path: str | os.PathLike, statistics: TokenStatistics) -> PublicStatistics:
    """Write the public domain's counts next to the spec at ``spec_path`` (atomically) and return
    the record the spec keeps (file name and sha256)."""
    tensors, metadata = statistics_tensors(statistics)
    problem = statistics_problem(tensors, metadata)
    if problem is not None:
        field, expected, got = problem
        raise ValueError(f"public statistics: {field}: expected {expected}, got {got}")
    path = public_statistics_path(spec_path)
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return PublicStatistics(file=path.name, sha256=file_sha256(path))


def load_public_statistics(
    spec: FederationSpec,
    spec_path: str | os.PathLike,
    vocab_size: int | None = None,
    bigram_buckets: int | None = None,
) -> TokenStatistics:
    """The public domain's counts recorded in ``spec`` (loaded from ``spec_path``): the file next
    to it, refused unless its sha256 is the one the spec records and its counts keep
    :func:`statistics_problem`'s rules (``vocab_size``: the public model's). Bigram counts are read
    in ``bigram_buckets`` buckets (default: the spec's recipe's; ``0``: not read), for a merge
    whose recipe differs from the spec's."""
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
    buckets = (spec.routing.bigram_buckets if bigram_buckets is None else bigram_buckets) or None
    wanted = {UNIGRAM_TENSOR, BIGRAM_TENSOR} if buckets else {UNIGRAM_TENSOR}
    if not {UNIGRAM_TENSOR} <= set(header) <= {UNIGRAM_TENSOR, BIGRAM_TENSOR} or not wanted <= set(header):
        hint = ""
        if UNIGRAM_TENSOR in header and BIGRAM_TENSOR not in header:
            hint = (
                f": the recipe routes by bigram counts in {buckets} buckets and this file has none; rewrite the spec "
                "with `flexmoe spec --public-data ...`, pass the public text instead, or route by unigrams "
                "(bigram_buckets=0)"
            )
        raise InputError(f"public statistics {path}: tensors: expected {sorted(wanted)}, got {sorted(header)}{hint}")
    with safe_open(str(path), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in wanted}
    totals = {k: v for k, v in metadata.items() if k == UNIGRAM_TOKENS or (k == BIGRAM_PAIRS and buckets)}
    problem = statistics_problem(tensors, totals, vocab_size, buckets)
    if problem is not None:
        field, expected, found = problem
        raise InputError(f"public statistics {path}: {field}: expected {expected}, got {found}")
    return TokenStatistics(tensors[UNIGRAM_TENSOR], tensors.get(BIGRAM_TENSOR))
