"""The posterior router: route by the domain the prefix is in, mixed by each owner's own pair.

A token's hidden state tells its domain apart for only part of the tokens, so no router that reads
one token at a time can choose the right owner well; the whole prefix can. Each domain ``d``
(``0`` the public data, ``1..n`` the owners) ships token unigram counts ``c_d`` over the public
tokenizer's vocabulary (``V`` tokens, ``N_d = sum_v c_dv``). With add-``alpha`` smoothing

    log p(v | d)     = log(c_dv + alpha) - log(N_d + alpha V)

and the causal, tempered naive-Bayes posterior over domains at position ``t`` of a row is

    log post_t(d)    = log prior(d) + tau * sum_{s <= t} log p(x_s | d)     (normalised over d)

(``tau`` the temperature; the sum restarts after a document-end token when asked). With bigram
statistics (each domain's counts ``b_d`` of adjacent token pairs, hashed into ``K`` buckets by
:func:`bigram_bucket`; the default recipe ships them) a token after the row's first is scored by
the domain's bigram model interpolated towards its unigram (a Dirichlet prior of weight ``k``):

    log p(x_t | x_{t-1}, d) = log(b_d[h(x_{t-1}, x_t)] + k p(x_t | d)) - log(c_d x_{t-1} + k)

Unigrams see which words a domain uses; bigrams also see their order, which is what sets text
like licences apart from prose sharing its words (docs/routing.md measures both). In every layer
the token runs the public expert and the most probable owner's expert ``d* = argmax_{d >= 1}
post_t(d)``, weighted by the owners' own pairwise routers (the row ``r_d`` and bias each owner
trained against the public row ``r_0``):

    l_d = r_d . x + min(beta_d, 0),   l_0 = r_0 . x,   (1 - s_d, s_d) = softmax(l_0, l_d)
    g_0 = post(0) + sum_{d >= 1} post(d) (1 - s_d)        g_{d*} = post(d*) s_{d*}

and every other owner's gate is 0. ``g`` is the prototype's hierarchical mixture (public domain:
public expert; owner domain ``d``: ``d``'s own 2-expert model) restricted to one owner: the mass
``sum_{d != d*} post(d) s_d`` of the owners that do not run is dropped, not renormalised, as
FlexOlmo drops the weights of the experts outside its top-k (``MoESettings.normalize`` renormalises
the pair if set). When the public domain is the most probable, the pair is still the public expert
and ``d*``; ``g_{d*}`` is then small. With a certain posterior for owner ``d`` the gates are
``softmax(l_0, l_d)``: exactly the 2-expert model that owner trained.

Where things live: every layer's :class:`PosteriorRouter` holds its rows and biases; layer 0's
also holds the per-domain statistics (``unigram`` counts ``[E, V]``, optionally ``bigram`` counts
``[E, K]``, ``log_prior`` ``[E]``) and the settings (temperature, smoothing, bigram weight, reset
tokens), each indexed by expert so opt-out, opt-in and the native format carry them through the
router protocol. One :class:`CausalPosterior` per
model, shared by every layer's router, runs as a forward pre-hook on the decoder: it reads the
forward's ``input_ids`` once, advances the running per-row sums from where the KV cache left
them (generation costs one row of the table per new token, no rescan of the prefix) and leaves
``post`` for the layers to read.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flexmoe.core.errors import InputError
from flexmoe.core.moe import PerExpertRouter, Router, RouterFormatError, register_router
from flexmoe.core.surgery import decoder_layers, moe_blocks, settings

ROWS = {"weight": "router.embedding", "bias": "router.bias"}
# Per-domain statistics, held by layer 0's router only; named as an expert artifact names them.
STATISTICS = {"unigram": "stats.unigram", "log_prior": "posterior.log_prior"}
BIGRAM = {"bigram": "stats.bigram"}
SETTINGS = ("temperature", "smoothing", "reset_tokens")
BIGRAM_SETTINGS = ("bigram_weight",)
# The bucket hash: two multiplicative rounds on 32 bits. Both multipliers are below 2**31 and the
# values they multiply below 2**32, so every product fits int64 (no overflow for any vocabulary).
_HASH_A, _HASH_B, _MASK32 = 0x5BD1E995, 0x27D4EB2F, 0xFFFFFFFF
MAX_BIGRAM_BITS = 24


def bigram_bucket(prev: torch.Tensor, cur: torch.Tensor, buckets: int) -> torch.Tensor:
    """The bucket ``[0, buckets)`` of each adjacent token pair ``(prev, cur)`` (int64 tensors of
    ids of one shape; ``buckets`` a power of two up to ``2**24``): the top bits of a 32-bit
    multiplicative hash of the pair. The owners, the coordinator and the exported model's code
    all count and look up pairs with this one function (the exported copy is tested equal)."""
    bits = int(buckets).bit_length() - 1
    if buckets < 2 or 1 << bits != buckets or bits > MAX_BIGRAM_BITS:
        raise InputError(f"bigram buckets must be a power of two from 2 to 2**{MAX_BIGRAM_BITS}, got {buckets}")
    h = (prev.long() * _HASH_A + cur.long()) & _MASK32
    return ((h * _HASH_B) & _MASK32) >> (32 - bits)


def unigram_log_probs(unigram: torch.Tensor, smoothing: float) -> torch.Tensor:
    """``log p(v | d) = log(c_dv + alpha) - log(N_d + alpha V)`` for counts ``[E, V]``, in float64."""
    c = unigram.double() + smoothing
    return c.log() - c.sum(-1, keepdim=True).log()


class CausalPosterior:
    """The posterior over domains of every position of the forward in progress, shared by every
    layer's :class:`PosteriorRouter` of one model; installed by :func:`attach_posterior`.

    Called as a forward pre-hook of the decoder. ``sums`` ``[B, E]`` (float64) are the running
    ``tau * sum_s log p(x_s | d)`` of each row after the ``length`` positions seen so far, so a
    forward that continues a KV cache of that length adds only its new tokens; a forward with an
    empty cache starts again. ``scanned`` counts the positions read (per row), for checks.
    """

    def __init__(self, source: PosteriorRouter):
        self.source = source  # layer 0's router: the statistics and settings
        self.probs: torch.Tensor | None = None  # [B * S, E] float32, this forward's posterior
        self.sums: torch.Tensor | None = None
        self.last: torch.Tensor | None = None  # [B] each row's last token so far (the next pair's first)
        self.length = 0
        self.scanned = 0
        self._table: tuple[tuple, torch.Tensor] | None = None

    def table(self) -> torch.Tensor:
        """``log p(v | d)`` as ``[V, E]`` float64, recomputed when the statistics change."""
        src = self.source
        key = (id(src.unigram), src.unigram._version, float(src.smoothing))
        if self._table is None or self._table[0] != key:
            self._table = (key, unigram_log_probs(src.unigram, float(src.smoothing)).T.contiguous())
        return self._table[1]

    def log_likelihoods(self, ids: torch.Tensor, before: torch.Tensor | None) -> torch.Tensor:
        """``log p(x_t | d)`` ``[B, S, E]`` (float64) of every position of ``ids`` ``[B, S]``:
        the unigram model's, or with bigram statistics the interpolated bigram model's (module
        docstring) for every position that has a previous token (``before`` ``[B]``: the token
        preceding ``ids[:, 0]``, ``None`` at the start of the rows)."""
        src = self.source
        uni = self.table()
        ll = uni[ids]
        if not src.holds_bigram:
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
        context = src.unigram.double().T[prev]  # c_d(prev): how often the previous token occurs
        bi = (pair + k * ll.exp()).log() - (context + k).log()
        return torch.where(has[..., None], bi, ll)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise InputError(
                "the posterior router reads the token ids (its statistics are counts over the vocabulary); "
                "call the model with input_ids, not inputs_embeds"
            )
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        past = 0 if cache is None else int(cache.get_seq_length())
        self.advance(input_ids, kwargs.get("attention_mask"), past)

    @torch.no_grad()
    def advance(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, past: int = 0) -> None:
        """Set :attr:`probs` for ``input_ids`` ``[B, S]`` continuing ``past`` cached positions.

        Positions a 2-D ``attention_mask`` masks (padding) add no evidence. The sums are
        sequential (a cumulative sum seeded with the carried sums, in float64), and the last token
        carries over for the bigram of the next one, so a row advanced token by token gets the same
        posterior as the row read at once.
        """
        ids = input_ids.to(self.source.unigram.device).long()
        B, S = ids.shape
        E = self.source.unigram.shape[0]
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
        ll = float(self.source.temperature) * self.log_likelihoods(ids, before)
        if attention_mask is not None and attention_mask.dim() == 2 and attention_mask.shape[1] >= S:
            ll = ll * attention_mask[:, -S:].to(ll)[..., None]
        if carry is None:
            carry = ll.new_zeros(B, E)
        sums = torch.cat([carry[:, None], ll], 1).cumsum(1)[:, 1:]
        reset = self.source.reset_tokens.to(ids.device)
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
        log_prior = self.source.log_prior.to(sums)
        self.probs = torch.softmax(sums + log_prior, dim=-1).float().reshape(B * S, E)

    def for_tokens(self, n: int, num_experts: int) -> torch.Tensor:
        probs = self.probs
        if probs is None or probs.shape != (n, num_experts):
            got = "none" if probs is None else list(probs.shape)
            raise RuntimeError(
                f"the posterior router needs the posterior of {n} tokens over {num_experts} experts, the decoder's "
                f"pre-hook left {got}: call the whole model (with input_ids), not one block"
            )
        return probs


@register_router
class PosteriorRouter(PerExpertRouter):
    """Gates from the causal domain posterior and the owners' own pairwise routers (module docstring).

    Per expert: the row ``r_j`` and raw bias ``beta_j`` (used as ``min(beta_j, 0)``, ``0`` for the
    public expert, as :class:`~flexmoe.core.moe.Router`); on the router that holds the statistics
    (layer 0's) also the unigram counts and the log prior weight. An owner opts in with an artifact
    carrying ``stats.unigram`` and joins with prior weight 1 (uniform) unless its state names one.
    """

    kind = "posterior"
    returns_gates = True
    opt_in_hint = (
        "An owner joins a posterior-routed model with its token unigram counts (stats.unigram, written by the "
        "owner's training run): ask the owner for an artifact that carries them."
    )

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor,
        statistics: Mapping[str, torch.Tensor] | None = None,
        *,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.per_expert = dict(ROWS)
        self.weight = nn.Parameter(weight.detach().to(dtype or weight.dtype).clone())
        self.bias = nn.Parameter(bias.detach().float().clone().to(weight.device))
        self.posterior: CausalPosterior | None = None
        if statistics is not None:
            device = weight.device
            self.register_buffer("unigram", statistics["unigram"].detach().float().clone().to(device))
            self.register_buffer("log_prior", statistics["log_prior"].detach().float().clone().to(device))
            self.register_buffer("temperature", statistics["temperature"].detach().float().clone().to(device))
            self.register_buffer("smoothing", statistics["smoothing"].detach().float().clone().to(device))
            self.register_buffer("reset_tokens", statistics["reset_tokens"].detach().long().clone().to(device))
            self.per_expert.update(STATISTICS)
            if statistics.get("bigram") is not None:
                self.register_buffer("bigram", statistics["bigram"].detach().float().clone().to(device))
                weight = statistics["bigram_weight"]
                self.register_buffer("bigram_weight", torch.as_tensor(weight).detach().float().clone().to(device))
                self.per_expert.update(BIGRAM)

    @property
    def holds_statistics(self) -> bool:
        return "unigram" in self._buffers

    @property
    def holds_bigram(self) -> bool:
        return "bigram" in self._buffers

    @classmethod
    def from_native_state(cls, state: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None):
        statistics = None
        if "unigram" in state:
            names = (*STATISTICS, *SETTINGS, *((*BIGRAM, *BIGRAM_SETTINGS) if "bigram" in state else ()))
            statistics = {k: state[k] for k in names}
        return cls(state["weight"], state["bias"], statistics, dtype=dtype)

    def attach(self, model: nn.Module) -> None:
        attach_posterior(model)

    def append_expert(self, state: Mapping[str, torch.Tensor]) -> None:
        if self.holds_statistics:
            for key in (STATISTICS["unigram"], *(BIGRAM.values() if self.holds_bigram else ())):
                counts = state.get(key)
                if counts is not None and not (torch.isfinite(counts).all() and (counts >= 0).all()):
                    raise InputError(f"{key} of the new expert must be finite, non-negative counts")
            state = {STATISTICS["log_prior"]: torch.zeros(1), **state}
        super().append_expert(state)

    def effective_bias(self) -> torch.Tensor:
        b = self.bias.float().clamp(max=0.0)
        mask = torch.ones_like(b)
        mask[0] = 0.0
        return b * mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gates ``[T, E]`` (float32) for ``x`` ``[T, H]``: ``g_0``, ``g_{d*}``, zeros elsewhere."""
        if self.posterior is None:
            raise RuntimeError(
                "this PosteriorRouter is not attached to a model: call router.attach(model) "
                "(flexmoe.load and use_posterior_routers do)"
            )
        E = self.num_experts
        post = self.posterior.for_tokens(x.shape[0], E)
        if E == 1:
            return torch.ones_like(post)
        logits = F.linear(x.float(), self.frozen(self.weight.float())) + self.frozen(self.effective_bias())
        own = logits[:, 1:]
        pair = torch.softmax(torch.stack([logits[:, :1].expand_as(own), own], dim=-1), dim=-1)  # [T, n, 2]
        owner = post[:, 1:].argmax(-1, keepdim=True)  # d* - 1
        public = post[:, :1] + (post[:, 1:] * pair[..., 0]).sum(-1, keepdim=True)
        chosen = post[:, 1:].gather(1, owner) * pair[..., 1].gather(1, owner)
        return torch.cat([public, torch.zeros_like(own).scatter(1, owner, chosen)], dim=-1)

    def linear_gate(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise RouterFormatError(
            "PosteriorRouter's gates follow the posterior over domains of the tokens up to each position, "
            "not one token's hidden state, which is all a FlexOlmo or Mixtral gate ([E, H] rows, no bias) can "
            "hold; export with format='native'"
        )


def _decoder(model: nn.Module) -> nn.Module:
    """The module whose forward receives ``input_ids`` and runs the decoder layers."""
    layers = decoder_layers(model)
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) and getattr(inner, "layers", None) is layers else model


def _remove_posterior_hooks(module: nn.Module) -> None:
    for key, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, CausalPosterior):
            del module._forward_pre_hooks[key]
            module._forward_pre_hooks_with_kwargs.pop(key, None)


def attach_posterior(model: nn.Module) -> CausalPosterior | None:
    """Connect every layer's :class:`PosteriorRouter` to one :class:`CausalPosterior` that reads
    the statistics of the router holding them and runs as the decoder's forward pre-hook.
    Idempotent; returns the posterior (``None`` when no layer routes by posterior)."""
    routers = [b.router for b in moe_blocks(model) if isinstance(b.router, PosteriorRouter)]
    if not routers:
        return None
    sources = [r for r in routers if r.holds_statistics]
    if len(sources) != 1:
        raise InputError(
            f"a posterior-routed model needs the domain statistics on exactly one layer's router, found {len(sources)}"
        )
    decoder = _decoder(model)
    state = sources[0].posterior
    hooked = any(h is state for h in decoder._forward_pre_hooks.values())
    if state is not None and state.source is sources[0] and hooked and all(r.posterior is state for r in routers):
        return state
    state = CausalPosterior(sources[0])
    for r in routers:
        r.posterior = state
    _remove_posterior_hooks(decoder)
    decoder.register_forward_pre_hook(state, with_kwargs=True)
    return state


def use_posterior_routers(
    model: nn.Module,
    unigram: torch.Tensor,
    *,
    temperature: float = 0.3,
    smoothing: float = 0.1,
    prior: Sequence[float] | torch.Tensor | None = None,
    reset_at_eos: bool = False,
    bigram: torch.Tensor | None = None,
    bigram_weight: float = 30.0,
) -> nn.Module:
    """Route an assembled MoE by the causal domain posterior, in place; returns ``model``.

    ``model``: a merge whose layers hold clamped routers (rows ``[r_0, r_1 .. r_n]``, raw biases
    ``[0, beta_1 .. beta_n]``, as assembled; or posterior routers, to change the statistics).
    ``unigram``: token counts ``[E, V]`` over the model's vocabulary, row 0 the public data's, row
    ``j`` owner ``j``'s. ``prior``: the domain prior ``[E]`` (uniform if ``None``).
    ``reset_at_eos``: restart the posterior after every ``config.eos_token_id`` token. Off by
    default: a packed evaluation row holds documents of one source, whose evidence carries over,
    and a prompt is one document; turn it on for rows that pack documents of different sources.
    ``bigram``: adjacent-pair counts ``[E, K]`` hashed into ``K`` buckets (:func:`bigram_bucket`),
    rows as ``unigram``'s, interpolated towards the unigram with weight ``bigram_weight``; ``None``
    routes by unigrams alone. Sets ``top_k`` to 2 (the public expert and the chosen owner).
    """
    blocks = moe_blocks(model)
    if not blocks:
        raise TypeError(f"{type(model).__name__} is a dense model; assemble the MoE first")
    E = blocks[0].num_experts
    vocab = model.get_input_embeddings().num_embeddings
    unigram = torch.as_tensor(unigram)
    if unigram.shape != (E, vocab):
        raise InputError(
            f"unigram counts have shape {list(unigram.shape)}; this model needs [{E}, {vocab}] "
            f"(public data first, then the owners {settings(model).owners[1:]}, over its {vocab}-token vocabulary)"
        )
    if not (torch.isfinite(unigram).all() and (unigram >= 0).all()):
        raise InputError("unigram counts must be finite and non-negative")
    if not (temperature > 0 and smoothing > 0):
        raise InputError(f"temperature and smoothing must be positive, got {temperature} and {smoothing}")
    if bigram is not None:
        bigram = torch.as_tensor(bigram)
        if bigram.dim() != 2 or bigram.shape[0] != E:
            raise InputError(f"bigram counts have shape {list(bigram.shape)}; this model needs [{E}, buckets]")
        bigram_bucket(torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long), bigram.shape[1])
        if not (torch.isfinite(bigram).all() and (bigram >= 0).all()):
            raise InputError("bigram counts must be finite and non-negative")
        if not bigram_weight > 0:
            raise InputError(f"bigram_weight must be positive, got {bigram_weight}")
    if prior is None:
        log_prior = torch.zeros(E)
    else:
        prior = torch.as_tensor(prior, dtype=torch.float64)
        if prior.shape != (E,) or not (prior > 0).all():
            raise InputError(f"prior must be {E} positive weights (public first), got {prior.tolist()}")
        log_prior = prior.log().float()
    reset = []
    if reset_at_eos:
        eos = getattr(model.config, "eos_token_id", None)
        if eos is None:
            raise InputError("reset_at_eos needs config.eos_token_id; the model's config has none")
        reset = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    statistics = {
        "unigram": unigram,
        "log_prior": log_prior,
        "temperature": torch.tensor(float(temperature)),
        "smoothing": torch.tensor(float(smoothing)),
        "reset_tokens": torch.tensor(reset, dtype=torch.long),
    }
    if bigram is not None:
        statistics.update(bigram=bigram, bigram_weight=torch.tensor(float(bigram_weight)))
    for L, block in enumerate(blocks):
        if type(block.router) not in (Router, PosteriorRouter):
            raise InputError(
                f"layer {L} has a {block.router.kind!r} router; the posterior router takes the merge's clamped "
                "routers (each owner's row and bias against r_0, as trained)"
            )
    for L, block in enumerate(blocks):
        old = block.router
        block.router = PosteriorRouter(old.weight, old.bias, statistics if L == 0 else None)
    settings(model).top_k = min(2, E)
    attach_posterior(model)
    return model
