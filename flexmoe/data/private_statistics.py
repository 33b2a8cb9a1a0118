"""Token counts released with differential privacy: the Gaussian mechanism on an owner's counts.

What an owner ships for the posterior router (:func:`flexmoe.data.statistics.token_statistics`:
unigram counts over the public vocabulary, hashed bigram counts) is an aggregate of its text, and
a rare phrase shows in it. :func:`private_token_statistics` releases the same two vectors with
(epsilon, delta)-differential privacy for one packed training row, the unit DP-SGD protects
(:mod:`flexmoe.training.privacy`), so the two guarantees compose:

1. each row's count vector (its unigram and bigram counts, as one vector) is scaled down to an L2
   norm of at most ``clip``: adding or removing a row then moves the sum by at most ``clip``;
2. the scaled vectors are summed and Gaussian noise of standard deviation ``noise_multiplier * clip``
   is added to every entry, zeros included, so which tokens occur at all is hidden too (the Gaussian
   mechanism, Dwork & Roth, 2014, section 3.5.3; ``noise_multiplier`` from
   :func:`statistics_noise_multiplier`);
3. post-processing, which costs no privacy: every entry below the level pure noise reaches about
   once in a tensor of that size (``Phi^-1(1 - 1/n)`` deviations) is set to 0, the rest are
   rounded, and bigram counts are scaled down when they would outnumber the unigram tokens. The
   result keeps the loaders' rules (:mod:`flexmoe.artifacts.unigram`: non-negative, integral,
   totals recomputed from the released counts).

Without the threshold, the positive half of the noise on the empty entries would add about
``0.4 * noise_multiplier * clip`` phantom counts per entry: on 2**20 bigram buckets, far more than
the owner's text holds. What the noise costs the posterior router: docs/privacy.md.
"""

from __future__ import annotations

import math
import warnings

import torch

from flexmoe.artifacts.unigram import TokenStatistics
from flexmoe.core.errors import InputError
from flexmoe.modeling.domain_posterior import bigram_bucket
from flexmoe.spec import PrivacyRecipe


def require_opacus() -> None:
    """Import Opacus (the optional extra ``flexmoe[privacy]``), or say how to install it."""
    try:
        import opacus  # noqa: F401
    except ImportError:
        raise InputError(
            "differential privacy needs Opacus: pip install 'flexmoe[privacy]' (or pip install opacus)"
        ) from None


def accountant_epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str = "prv") -> float:
    """The epsilon at ``delta`` of the composition of subsampled Gaussian mechanisms ``history``
    (``(noise_multiplier, sample_rate, steps)`` each, Opacus's accountant history), by Opacus's
    ``accountant`` (``"prv"``: Gopi et al., 2021; ``"rdp"``: Mironov, 2017). A Gaussian mechanism
    run once on the whole data is ``(noise_multiplier, 1.0, 1)``; ``0.0`` for an empty history."""
    if not history:
        return 0.0
    require_opacus()
    from opacus.accountants import create_accountant  # deferred: an optional extra that loads scipy

    acc = create_accountant(accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the accountants' numerics at sample rate 1 (log of 0)
        return float(acc.get_epsilon(delta))


def statistics_noise_multiplier(epsilon: float, delta: float, accountant: str = "prv") -> float:
    """The noise multiplier (noise deviation / L2 sensitivity) of a Gaussian mechanism run once
    on the whole data that meets ``(epsilon, delta)`` by ``accountant``, to within 1%."""
    require_opacus()
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(
            get_noise_multiplier(
                target_epsilon=epsilon, target_delta=delta, sample_rate=1.0, steps=1, accountant=accountant
            )
        )


def statistics_noise(recipe: PrivacyRecipe | None) -> float | None:
    """The token counts' noise multiplier under an owner's privacy ``recipe`` (``None``: the
    recipe releases them exact)."""
    if recipe is None or not recipe.private_statistics:
        return None
    return statistics_noise_multiplier(recipe.statistics_epsilon, recipe.delta, recipe.accountant)


def row_norms(rows: torch.Tensor, vocab_size: int, buckets: int = 0) -> torch.Tensor:
    """The L2 norm of each row's count vector (unigram counts, and hashed bigram counts when
    ``buckets``), ``float64 [N]``, without building the ``[N, vocab]`` matrix."""
    rows = torch.as_tensor(rows).long()
    n = rows.shape[0]
    squares = torch.zeros(n, dtype=torch.float64)
    keys = [(rows, vocab_size)]
    if buckets:
        keys.append((bigram_bucket(rows[:, :-1], rows[:, 1:], buckets), buckets))
    for ids, size in keys:
        flat = (torch.arange(n).unsqueeze(1) * size + ids).reshape(-1)
        uniq, counts = torch.unique(flat, return_counts=True)
        squares.index_add_(0, uniq // size, counts.double() ** 2)
    return squares.sqrt()


def noise_threshold(size: int) -> float:
    """Deviations of standard normal noise that ``size`` independent draws exceed about once:
    ``Phi^-1(1 - 1/size)`` (3.3 for 2,048 entries, 4.8 for 2**20)."""
    return math.sqrt(2.0) * float(torch.special.erfinv(torch.tensor(1.0 - 2.0 / max(size, 2), dtype=torch.float64)))


def clipped_token_counts(rows: torch.Tensor, vocab_size: int, buckets: int, clip: float) -> TokenStatistics:
    """The sum over ``rows`` ``[N, S]`` of each row's count vector (unigrams and, with ``buckets``,
    hashed bigrams) scaled to an L2 norm of at most ``clip``: the query whose sensitivity to one
    row is ``clip``, before any noise (float32, not integral)."""
    if not clip > 0:
        raise ValueError(f"clip must be > 0, got {clip}")
    rows = torch.as_tensor(rows).long()
    if rows.dim() != 2:
        raise ValueError(f"token counts are over packed rows [N, S], got shape {list(rows.shape)}")
    scale = (clip / row_norms(rows, vocab_size, buckets).clamp(min=clip)).float()  # min(1, clip / norm)
    s = rows.shape[1]
    unigram = torch.zeros(vocab_size, dtype=torch.float32).index_add_(0, rows.reshape(-1), scale.repeat_interleave(s))
    bigram = None
    if buckets:
        pairs = bigram_bucket(rows[:, :-1], rows[:, 1:], buckets).reshape(-1)
        bigram = torch.zeros(buckets, dtype=torch.float32).index_add_(0, pairs, scale.repeat_interleave(s - 1))
    return TokenStatistics(unigram, bigram)


def private_token_statistics(
    rows: torch.Tensor,
    vocab_size: int,
    buckets: int,
    *,
    noise_multiplier: float,
    clip: float,
    generator: torch.Generator | None = None,
) -> TokenStatistics:
    """The token counts of packed ``rows`` ``[N, S]`` (as :func:`~flexmoe.data.statistics.token_statistics`:
    unigrams over ``vocab_size``, bigrams in ``buckets`` when not 0), released by the Gaussian
    mechanism with each row's contribution bounded by ``clip`` (L2) and noise
    ``noise_multiplier * clip``: the module docstring gives the steps. ``generator`` draws the
    noise; it must not be one whose seed anyone else knows (a known seed gives the noise back)."""
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    unigram, bigram = clipped_token_counts(rows, vocab_size, buckets, clip)
    std = noise_multiplier * clip
    released = []
    for counts in (unigram, bigram):
        if counts is None:
            released.append(None)
            continue
        noisy = counts + std * torch.randn(counts.shape, generator=generator, dtype=torch.float32)
        noisy = torch.where(noisy >= std * noise_threshold(counts.numel()), noisy.round(), torch.zeros(()))
        released.append(noisy.clamp(min=0))
    unigram, bigram = released
    if bigram is not None and float(bigram.sum()) > float(unigram.sum()):
        # A row of n tokens holds n - 1 pairs; the loaders check that the totals keep that order.
        bigram = (bigram * (float(unigram.sum()) / float(bigram.sum()))).floor()
    return TokenStatistics(unigram, bigram)
