"""The posterior router's arithmetic, in one place: the causal posterior over domains and the gates.

flexmoe's :class:`~flexmoe.core.posterior.PosteriorRouter` and the modeling code a ``remote``
export ships (``modeling_flexmoe.py``, which imports this file relatively, so it is copied along)
both compute with these functions; this file imports only ``torch``.

Each domain ``d`` (``0`` the public data, ``1..n`` the owners) has token unigram counts ``c_d``
(``[E, V]``) and, optionally, counts ``b_d`` of adjacent token pairs hashed into ``K`` buckets
(``[E, K]``, :func:`bigram_bucket`). A token is scored by

    log p(v | d)             = log(c_dv + alpha) - log(N_d + alpha V)                 (unigram)
    log p(v | u, d)          = log(b_d[h(u, v)] + k p(v | d)) - log(c_du + k)         (bigram)

(the bigram for every token that has a previous one, interpolated towards the unigram with
weight ``k``), and the causal posterior at position ``t`` of a row is

    log post_t(d) = log prior(d) + tau * sum_{s <= t} log p(x_s | ...)   (normalised over d),

restarted after a document-end token when asked. :class:`RunningPosterior` keeps each row's sums
and last token, so a forward that continues a KV cache reads only its new tokens.
:func:`posterior_gates` turns the posterior and the owners' pairwise router logits into gates.
"""

import torch

# Two multiplicative rounds on 32 bits. Both multipliers are below 2**31 and the values they
# multiply below 2**32, so every product fits int64 (no overflow for any vocabulary).
_HASH_A, _HASH_B, _MASK32 = 0x5BD1E995, 0x27D4EB2F, 0xFFFFFFFF
MAX_BIGRAM_BITS = 24


def valid_bucket_count(buckets) -> bool:
    """Whether ``buckets`` can count bigrams: an int (not a bool), a power of two from 2 to
    ``2**MAX_BIGRAM_BITS``. The one rule for the recipe, the files and the router."""
    return (
        isinstance(buckets, int)
        and not isinstance(buckets, bool)
        and 2 <= buckets <= 1 << MAX_BIGRAM_BITS
        and buckets & (buckets - 1) == 0
    )


def bigram_bucket(prev: torch.Tensor, cur: torch.Tensor, buckets: int) -> torch.Tensor:
    """The bucket ``[0, buckets)`` of each adjacent token pair ``(prev, cur)`` (int64 tensors of
    ids of one shape; ``buckets`` a power of two up to ``2**24``): the top bits of a 32-bit
    multiplicative hash of the pair. Owners, the coordinator and the exported model count and
    look up pairs with this one function."""
    if not valid_bucket_count(buckets):
        raise ValueError(f"bigram buckets must be a power of two from 2 to 2**{MAX_BIGRAM_BITS}, got {buckets}")
    bits = buckets.bit_length() - 1
    h = (prev.long() * _HASH_A + cur.long()) & _MASK32
    return ((h * _HASH_B) & _MASK32) >> (32 - bits)


def unigram_log_probs(unigram: torch.Tensor, smoothing: float) -> torch.Tensor:
    """``log p(v | d) = log(c_dv + alpha) - log(N_d + alpha V)`` for counts ``[E, V]``, in float64."""
    c = unigram.double() + smoothing
    return c.log() - c.sum(-1, keepdim=True).log()


class RunningPosterior:
    """The posterior over domains of every position of the forward in progress.

    ``source`` holds the statistics as buffers: ``unigram`` ``[E, V]``, ``log_prior`` ``[E]``,
    ``temperature``, ``smoothing``, ``reset_tokens`` and, with bigrams, ``bigram`` ``[E, K]`` and
    ``bigram_weight``. ``sums`` ``[B, E]`` (float64) are each row's running ``tau * sum log p``
    after ``length`` positions and ``last`` ``[B]`` its last token (the next pair's first), so a
    forward continuing a cache of that length adds only its new tokens; ``scanned`` counts the
    positions read, for checks. :attr:`probs` ``[B * S, E]`` (float32) is the last forward's.
    """

    def __init__(self, source):
        self.source = source
        self.probs: torch.Tensor | None = None
        self.sums: torch.Tensor | None = None
        self.last: torch.Tensor | None = None
        self.length = 0
        self.scanned = 0
        self._table = None

    def tables(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``log p(v | d)`` and the counts ``c_dv``, each ``[V, E]`` float64, computed once per
        change of the statistics (not once per forward: generation calls it for every token)."""
        src = self.source
        key = (id(src.unigram), src.unigram._version, float(src.smoothing))
        if self._table is None or self._table[0] != key:
            log_probs = unigram_log_probs(src.unigram, float(src.smoothing)).T.contiguous()
            self._table = (key, log_probs, src.unigram.double().T.contiguous())
        return self._table[1], self._table[2]

    def log_likelihoods(self, ids: torch.Tensor, before: torch.Tensor | None) -> torch.Tensor:
        """``log p(x_t | d)`` ``[B, S, E]`` (float64) of every position of ``ids`` ``[B, S]``: the
        unigram model's, or with bigram statistics the interpolated bigram model's for every
        position that has a previous token (``before`` ``[B]``: the token preceding ``ids[:, 0]``,
        ``None`` at the start of the rows)."""
        src = self.source
        uni, counts = self.tables()
        ll = uni[ids]
        if getattr(src, "bigram", None) is None:
            return ll
        B, S = ids.shape
        E = uni.shape[1]
        start = ids.new_full((B, 1), -1) if before is None else before.to(ids)[:, None]
        prev = torch.cat([start, ids[:, :-1]], 1)
        has = prev >= 0
        prev = prev.clamp(min=0)
        pair = src.bigram.index_select(1, bigram_bucket(prev, ids, src.bigram.shape[1]).reshape(-1))
        pair = pair.T.reshape(B, S, E).double()
        k = float(src.bigram_weight)
        context = counts[prev]  # c_d(prev): how often the previous token occurs
        bi = (pair + k * ll.exp()).log() - (context + k).log()
        return torch.where(has[..., None], bi, ll)

    @torch.no_grad()
    def advance(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, past: int = 0) -> None:
        """Set :attr:`probs` for ``input_ids`` ``[B, S]`` continuing ``past`` cached positions.

        Positions a 2-D ``attention_mask`` masks (padding) add no evidence. The sums are
        sequential (a cumulative sum seeded with the carried sums, in float64), and the last token
        carries over for the bigram of the next one, so a row advanced token by token gets the same
        posterior as the row read at once.
        """
        src = self.source
        ids = input_ids.to(src.unigram.device).long()
        B, S = ids.shape
        E = src.unigram.shape[0]
        if past == 0:
            carry, before = None, None
        elif self.sums is None or self.length != past or self.sums.shape != (B, E):
            have = "nothing" if self.sums is None else f"{self.length} positions of {self.sums.shape[0]} rows"
            raise RuntimeError(
                f"the posterior router's running sums cover {have}, but this forward continues a cache of {past} "
                f"positions of {B} rows over {E} experts. It follows the cache of the last sequence it saw; "
                "beam search and caches reordered or cropped behind its back are not supported"
            )
        else:
            carry, before = self.sums, self.last
        ll = float(src.temperature) * self.log_likelihoods(ids, before)
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] >= S:
            ll = ll * attention_mask[:, -S:].to(ll)[..., None]
        if carry is None:
            carry = ll.new_zeros(B, E)
        sums = torch.cat([carry[:, None], ll], 1).cumsum(1)[:, 1:]
        reset = src.reset_tokens.to(ids.device, torch.long)  # token ids, whatever dtype loading gave it
        if reset.numel():  # subtract the sums up to the last document end before each position
            ends = torch.isin(ids, reset)
            last = torch.where(ends, torch.arange(S, device=ids.device), -1).cummax(1).values
            previous_end = torch.cat([last.new_full((B, 1), -1), last[:, :-1]], 1)
            base = sums.gather(1, previous_end.clamp(min=0)[..., None].expand(-1, -1, E))
            sums = torch.where((previous_end >= 0)[..., None], sums - base, sums)
            self.sums = torch.where(ends[:, -1:], 0.0, sums[:, -1])
        else:
            self.sums = sums[:, -1]
        self.last = ids[:, -1].clone()
        self.length = past + S
        self.scanned += S
        self.probs = torch.softmax(sums + src.log_prior.to(sums), dim=-1).float().reshape(B * S, E)


def posterior_gates(post: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Gates ``[T, E]`` from the posterior ``post`` ``[T, E]`` and the router logits ``[T, E]``
    (``l_0 = r_0 . x``, ``l_d = r_d . x + min(beta_d, 0)``): the token runs the public expert and
    the most probable owner ``d*``, weighted by each owner's pairwise router
    ``(1 - s_d, s_d) = softmax(l_0, l_d)``:

        g_0 = post(0) + sum_{d >= 1} post(d) (1 - s_d)        g_{d*} = post(d*) s_{d*}

    and every other owner's gate is 0 (the mass of the owners that do not run is dropped, as
    FlexOlmo drops the experts outside its top-k). With one expert the gate is 1."""
    if post.shape[1] == 1:
        return torch.ones_like(post)
    own = logits[:, 1:]
    pair = torch.softmax(torch.stack([logits[:, :1].expand_as(own), own], dim=-1), dim=-1)  # [T, n, 2]
    owner = post[:, 1:].argmax(-1, keepdim=True)  # d* - 1
    public = post[:, :1] + (post[:, 1:] * pair[..., 0]).sum(-1, keepdim=True)
    chosen = post[:, 1:].gather(1, owner) * pair[..., 1].gather(1, owner)
    return torch.cat([public, torch.zeros_like(own).scatter(1, owner, chosen)], dim=-1)
