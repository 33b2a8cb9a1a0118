"""Tokenised text as fixed-length rows: documents joined by EOS and cut into ``seq_len`` tokens.

:func:`tokenize_and_pack` is the one path from text to rows; :func:`pack_domain` (evaluation:
paths, lists or rows; refuses too little text), :func:`pack_documents` (router tuning: may be
empty) and :class:`~flexmoe.data.datamodule.TextDataModule` (training, cached) all use it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from flexmoe.data.documents import read_documents

_ENCODE_BATCH = 256
Documents = str | os.PathLike | Sequence[str] | torch.Tensor


def pack(token_ids: Iterable[Sequence[int]], eos_token_id: int, seq_len: int) -> tuple[torch.Tensor, int]:
    """Concatenate documents with ``eos_token_id`` after each and cut into rows of ``seq_len``.

    Returns the ``int32`` tensor [num_sequences, seq_len] and the number of tokens in the
    stream. The final partial row is dropped (at most ``seq_len - 1`` tokens): padding it
    would train on padding, as the model's labels are its inputs.
    """
    eos = np.array([eos_token_id], dtype=np.int32)
    parts = []
    for ids in token_ids:
        parts.append(np.asarray(ids, dtype=np.int32))
        parts.append(eos)
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    rows = len(stream) // seq_len
    return torch.from_numpy(stream[: rows * seq_len].reshape(rows, seq_len).copy()), len(stream)


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what the tokenizer does (its serialised vocabulary and rules), not its name."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False) + type(tokenizer).__name__
    extra = json.dumps([tokenizer.eos_token_id, getattr(tokenizer, "all_special_tokens", [])])
    return hashlib.sha256((body + extra).encode()).hexdigest()


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of ``texts``, no special tokens, no truncation (documents may be long)."""
    return tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]


def eos_token_id(tokenizer) -> int:
    """The tokenizer's EOS id, which separates documents in packed rows; a tokenizer without one
    is refused (any other id would silently join documents with an ordinary token)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"tokenizer {name} has no EOS token, which separates documents in packed rows; set tokenizer.eos_token"
        )
    return int(eos)


def tokenize_and_pack(documents: Sequence[str], tokenizer, seq_len: int) -> tuple[torch.Tensor, int]:
    """Tokenise ``documents`` (in batches, no special tokens) and :func:`pack` them with the
    tokenizer's EOS between documents: ``int32`` rows ``[N, seq_len]`` and the stream's length.
    Every tokenise-and-pack in flexmoe goes through here."""
    eos = eos_token_id(tokenizer)
    docs = list(documents)
    ids = (i for k in range(0, len(docs), _ENCODE_BATCH) for i in _encode(tokenizer, docs[k : k + _ENCODE_BATCH]))
    return pack(ids, eos, seq_len)


def pack_domain(documents: Documents, tokenizer, seq_len: int = 256, max_tokens: int | None = None) -> torch.Tensor:
    """The packed rows ``[N, seq_len]`` (int64) that a domain is evaluated on.

    ``documents``: a path (file, folder, glob, JSONL, ``datasets`` directory: anything
    :func:`flexmoe.data.documents.read_documents` reads; *all* its documents are used), a list of
    document strings, or already packed rows (returned as they are). ``max_tokens`` keeps
    the first ``max(1, max_tokens // seq_len)`` rows. Too little text for one row is an error.
    """
    if isinstance(documents, torch.Tensor):
        rows = documents.long()
    else:
        if isinstance(documents, (str, os.PathLike)):
            documents = read_documents(documents)
        docs = list(documents)
        rows, stream = tokenize_and_pack(docs, tokenizer, seq_len)
        if rows.shape[0] == 0:
            raise ValueError(
                f"{len(docs)} documents hold {stream} tokens, fewer than one row of seq_len={seq_len}; "
                "add text or lower seq_len"
            )
        rows = rows.long()
    if max_tokens is not None:
        rows = rows[: max(1, max_tokens // rows.shape[1])]
    return rows


def pack_documents(documents: Sequence[str], tokenizer, seq_len: int, max_documents: int | None = None) -> torch.Tensor:
    """The first ``max_documents`` documents (all by default) packed into ``[N, seq_len]`` int64
    rows; unlike :func:`pack_domain`, too little text gives zero rows (a router-tuning source
    that is empty is left out of the mixture, not an error)."""
    docs = list(documents)[:max_documents] if max_documents else list(documents)
    rows, _ = tokenize_and_pack(docs, tokenizer, seq_len)
    return rows.long()


def spread_rows(rows: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """At most ``max_tokens`` tokens of ``rows`` ``[N, S]``, as whole rows spread evenly over all
    of them: statistics from the first few documents alone are unrepresentative."""
    n = min(rows.shape[0], max(1, max_tokens // max(1, rows.shape[1])))
    return rows[torch.linspace(0, rows.shape[0] - 1, n).round().long().unique()]
