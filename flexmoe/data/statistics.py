"""Token counts: the aggregate of a text that owners and the coordinator share for routing.

:func:`token_statistics` is the one count used on both sides: the owner counts the packed rows it
trained on (:class:`~flexmoe.callbacks.ExportExpert`), the coordinator the packed rows of its
public data (``flexmoe spec``), so both count the same kind of stream, EOS separators included,
over the public tokenizer's vocabulary: tokens (:func:`unigram_counts`) and, for the recipe's
bucket count, adjacent pairs within a row (:func:`bigram_counts`). How the counts travel and are
checked: :mod:`flexmoe.artifacts.unigram`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from flexmoe.artifacts.unigram import TokenStatistics
from flexmoe.data.packing import tokenize_and_pack
from flexmoe.modeling.domain_posterior import bigram_bucket


def unigram_counts(tokens: torch.Tensor | Iterable[Sequence[int]], vocab_size: int) -> torch.Tensor:
    """How often each token id occurs: ``float32 [vocab_size]``, integral values.

    ``tokens``: a tensor of ids of any shape (packed rows ``[N, S]``) or an iterable of id
    sequences (tokenised documents). Ids outside ``[0, vocab_size)`` are an error: the counts
    are over the public model's vocabulary, and an id beyond it means another tokenizer. Counted
    in int64; float32 holds every count below 2**24 exactly, and rounds larger ones to within a
    relative 2**-24 (:func:`flexmoe.artifacts.unigram.unigram_problem` allows for that)."""
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if isinstance(tokens, torch.Tensor):
        parts = [tokens.reshape(-1)]
    else:
        parts = [torch.as_tensor(list(ids), dtype=torch.long) for ids in tokens]
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for ids in parts:
        ids = ids.long()
        if ids.numel() == 0:
            continue
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"token id {bad} is outside the vocabulary [0, {vocab_size}): the text was tokenised with "
                "another tokenizer than the public model's"
            )
        counts += torch.bincount(ids, minlength=vocab_size)
    return counts.float()


def bigram_counts(rows: torch.Tensor, buckets: int) -> torch.Tensor:
    """How often each adjacent pair of tokens within a row of ``rows`` ``[N, S]`` occurs, hashed
    into ``buckets`` (:func:`flexmoe.modeling.domain_posterior.bigram_bucket`): ``float32 [buckets]``,
    integral values, ``N (S - 1)`` pairs in all (pairs never straddle two rows: a row is what the
    model sees at once)."""
    rows = torch.as_tensor(rows).long()
    if rows.dim() != 2:
        raise ValueError(f"bigram counts are over packed rows [N, S], got shape {list(rows.shape)}")
    pairs = bigram_bucket(rows[:, :-1], rows[:, 1:], buckets).reshape(-1)
    return torch.bincount(pairs, minlength=buckets).float()


def token_statistics(rows: torch.Tensor, vocab_size: int, bigram_buckets: int = 0) -> TokenStatistics:
    """The token counts of packed rows ``[N, S]`` that the routing recipe ships: the unigram
    counts, and the bigram counts when ``bigram_buckets`` is not 0."""
    bigram = bigram_counts(rows, bigram_buckets) if bigram_buckets else None
    return TokenStatistics(unigram_counts(rows, vocab_size), bigram)


def packed_token_statistics(
    documents: Sequence[str], tokenizer, seq_len: int, vocab_size: int, bigram_buckets: int = 0
) -> TokenStatistics:
    """:func:`token_statistics` of ``documents`` packed as an owner packs its training text
    (:func:`flexmoe.data.packing.tokenize_and_pack`: EOS after each document, rows of ``seq_len``,
    the last partial row dropped): what the coordinator counts on its public data, so that its
    counts and the owners' count the same kind of stream."""
    rows, _ = tokenize_and_pack(documents, tokenizer, seq_len)
    return token_statistics(rows, vocab_size, bigram_buckets)
