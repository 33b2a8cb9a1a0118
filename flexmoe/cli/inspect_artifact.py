"""``flexmoe inspect FILE``: what an expert artifact holds, shown to its owner before it is sent.

Every tensor (name, shape, dtype, bytes), each statistic summarised (token counts: total,
distinct tokens, the most frequent ids; bigram counts: total and occupied buckets; the MLP-input
moments: shapes, layers and token count), every metadata field, the file's size, its sha256 and
its content sha256 (:func:`~flexmoe.core.hashing.content_sha256`, the hash a merged model's card
lists for the expert), and in words what each part reveals (:data:`~flexmoe.core.provenance.SHARED`).

The file is read as the coordinator reads it: the header through
:func:`~flexmoe.artifacts.guard.read_safetensors_header` (a pickle or ``torch.save`` zip is
refused, never loaded) and the tensors with ``safetensors``, one at a time, so a file of any size
is inspected in the memory of its largest tensor. Nothing is validated against a public model:
that is the coordinator's check, and an owner may want to look at a file that would fail it.
"""

from __future__ import annotations

import json as jsonlib
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open

from flexmoe.artifacts.guard import ArtifactError, read_safetensors_header
from flexmoe.artifacts.unigram import BIGRAM_TENSOR, UNIGRAM_TENSOR
from flexmoe.core.hashing import content_sha256, file_sha256
from flexmoe.core.provenance import PUBLIC_ROW, SHARED, clean_text, shared_parts

TOP_TOKENS = 5  # the most frequent token ids shown with the unigram counts
_TEXT_VALUE = 200  # metadata values longer than this are cut in the text output (--json shows all)
_LAYER = re.compile(r"layers\.([0-9]+)\.(.+)")
_STATS = re.compile(r"layers\.[0-9]+\.stats\.(mean|covariance)")


def inspect(file: str, json: bool = False) -> None:
    """Show exactly what an expert artifact contains, before you send it.

    Every tensor (name, shape, dtype, bytes), each statistic summarised, every metadata field, the
    file's size and hashes, and what each part reveals about your text. Reads the file with
    safetensors only (never unpickles).

    Args:
        file: The artifact (``.safetensors``), full or LoRA-sized.
        json: Print the same as one JSON object (every metadata value in full).
    """
    contents = artifact_contents(file)
    print(jsonlib.dumps(contents, indent=2) if json else format_contents(contents))


def artifact_contents(path: str | os.PathLike) -> dict:
    """What the artifact at ``path`` holds, as a JSON-ready dict (keys: ``file``, ``bytes``,
    ``file_sha256``, ``content_sha256``, ``metadata``, ``tensors``, ``statistics``, ``shared``,
    ``unrecognised``). Raises :class:`~flexmoe.artifacts.guard.ArtifactError` for a file that
    is not a sound safetensors file."""
    path = Path(path)
    header = read_safetensors_header(path)
    metadata = header.pop("__metadata__", None) or {}
    names = sorted(header, key=_order)
    tensors = [
        {"name": n, "shape": header[n]["shape"], "dtype": header[n]["dtype"], "bytes": _nbytes(header[n])}
        for n in names
    ]
    owner = metadata.get("owner", path.name)
    try:
        with safe_open(str(path), framework="pt") as f:
            content = content_sha256(_LazyTensors(f, names), metadata)
            statistics = _statistics(f, names, metadata)
    except Exception as e:  # safetensors' own errors for a file its header check let through
        raise ArtifactError(
            owner, "file", "a readable safetensors file", f"{type(e).__name__}: {e}", source=path
        ) from e
    recognised = set(shared_parts(names))
    unrecognised = [n for n in names if not shared_parts([n]) and not PUBLIC_ROW.fullmatch(n)]
    return {
        "file": str(path),
        "bytes": path.stat().st_size,
        "file_sha256": file_sha256(path),
        "content_sha256": content,
        "metadata": dict(metadata),
        "tensors": tensors,
        "statistics": statistics,
        "shared": [{"part": p, "label": SHARED[p][0], "reveals": SHARED[p][1]} for p in SHARED if p in recognised],
        "unrecognised": unrecognised,
    }


class _LazyTensors(Mapping):
    """The file's tensors by name, each read when asked for: :func:`content_sha256` hashes them in
    sorted order, so only one is in memory at a time."""

    def __init__(self, handle, names: list[str]):
        self.handle, self.names = handle, names

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.names:
            raise KeyError(name)
        return self.handle.get_tensor(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _order(name: str) -> tuple:
    """Layer by layer in numeric order (``layers.10`` after ``layers.9``), then model-wide tensors."""
    m = _LAYER.fullmatch(name)
    return (0, int(m[1]), m[2]) if m else (1, 0, name)


def _nbytes(entry: dict) -> int:
    start, end = entry["data_offsets"]
    return end - start


def _statistics(f, names: list[str], metadata: Mapping[str, str]) -> dict:
    """Each statistic the file carries, summarised from its values."""
    out: dict = {}
    if UNIGRAM_TENSOR in names:
        counts = f.get_tensor(UNIGRAM_TENSOR).double().reshape(-1)
        top = torch.topk(counts, min(TOP_TOKENS, counts.numel())) if counts.numel() else None
        out["unigram"] = {
            "tokens": _number(counts.sum()),
            "distinct_tokens": int((counts != 0).sum()),
            "vocab_size": counts.numel(),
            "most_frequent": [] if top is None else [[int(i), _number(v)] for v, i in zip(top.values, top.indices)],
        }
    if BIGRAM_TENSOR in names:
        counts = f.get_tensor(BIGRAM_TENSOR).double().reshape(-1)
        out["bigram"] = {
            "pairs": _number(counts.sum()),
            "occupied_buckets": int((counts != 0).sum()),
            "buckets": counts.numel(),
        }
    for kind in ("mean", "covariance"):
        held = [n for n in names if (m := _STATS.fullmatch(n)) and m[1] == kind]
        if held:
            shapes = sorted({tuple(f.get_slice(n).get_shape()) for n in held})
            out[f"mlp_input_{kind}"] = {"layers": len(held), "shapes": [list(s) for s in shapes]}
    if any(k.startswith("mlp_input") for k in out) and "stats_tokens" in metadata:
        out["stats_tokens"] = metadata["stats_tokens"]
    return out


def _number(value: torch.Tensor) -> int | float:
    """A count as an ``int`` when it is one (token counts are), else a float."""
    v = float(value)
    return int(v) if v.is_integer() else v


def format_contents(contents: dict) -> str:
    """:func:`artifact_contents` as the text ``flexmoe inspect`` prints. Metadata values are shown
    printable (escapes for control characters) and cut at 200 characters."""
    lines = [
        f"{_show(contents['file'], 400)} ({contents['bytes']:,} bytes)",
        f"  file sha256     {contents['file_sha256']}",
        f"  content sha256  {contents['content_sha256']}  (what a merged model's card lists for this expert)",
        "",
        f"metadata ({len(contents['metadata'])} fields)",
    ]
    metadata = contents["metadata"]
    width = max((len(_show(k)) for k in metadata), default=0)
    for key, value in metadata.items():
        shown = _show(value, _TEXT_VALUE)
        more = f"  ({len(value):,} characters; --json shows all)" if len(value) > _TEXT_VALUE else ""
        lines.append(f"  {_show(key):<{width}}  {shown}{more}")
    tensors = contents["tensors"]
    total = sum(t["bytes"] for t in tensors)
    lines += ["", f"tensors ({len(tensors)}, {total:,} bytes)"]
    width = max((len(t["name"]) for t in tensors), default=0)
    shapes = max((len(str(t["shape"])) for t in tensors), default=0)
    for t in tensors:
        lines.append(f"  {t['name']:<{width}}  {str(t['shape']):<{shapes}}  {t['dtype']:<4}  {t['bytes']:>12,}")
    stats = contents["statistics"]
    if stats:
        lines += ["", "statistics"]
    if "unigram" in stats:
        u = stats["unigram"]
        top = ", ".join(f"{i} ({c:,})" for i, c in u["most_frequent"])
        lines.append(
            f"  {UNIGRAM_TENSOR}  {u['tokens']:,} tokens, {u['distinct_tokens']:,} distinct token ids of "
            f"{u['vocab_size']:,}; most frequent ids: {top or 'none'}"
        )
    if "bigram" in stats:
        b = stats["bigram"]
        pairs, occupied = f"{b['pairs']:,}", f"{b['occupied_buckets']:,}"
        lines.append(f"  {BIGRAM_TENSOR}   {pairs} adjacent pairs in {occupied} of {b['buckets']:,} buckets")
    for kind in ("mean", "covariance"):
        if f"mlp_input_{kind}" in stats:
            s = stats[f"mlp_input_{kind}"]
            over = f", over {_show(stats['stats_tokens'], 40)} tokens" if "stats_tokens" in stats else ""
            lines.append(f"  MLP-input {kind}: {' or '.join(map(str, s['shapes']))} in {s['layers']} layers{over}")
    lines += ["", "what leaves your machine with this file"]
    lines += [f"  - {s['label']}: {s['reveals']}" for s in contents["shared"]]
    if contents["unrecognised"]:
        names = ", ".join(contents["unrecognised"][:10])
        lines.append(f"  - tensors flexmoe does not recognise (a coordinator refuses them): {names}")
    return "\n".join(lines)


def _show(value, limit: int = 120) -> str:
    """A value from the file as one printable line (a terminal never sees its control characters)."""
    return clean_text(value, limit) or "''"
