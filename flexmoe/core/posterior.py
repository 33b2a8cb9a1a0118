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
:func:`flexmoe.modeling.domain_posterior.bigram_bucket`; the default recipe ships them) a token
after the row's first is scored by the domain's bigram model interpolated towards its unigram (a
Dirichlet prior of weight ``k``):

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
from flexmoe.core.moe import PerExpertRouter, Router, RouterFormatError, clamped_bias, register_router
from flexmoe.core.surgery import decoder_layers, moe_blocks, settings
from flexmoe.modeling.domain_posterior import (
    MAX_BIGRAM_BITS,
    RunningPosterior,
    posterior_gates,
    valid_bucket_count,
)

__all__ = [
    "MAX_BIGRAM_BITS",
    "CausalPosterior",
    "PosteriorRouter",
    "attach_posterior",
    "use_posterior_routers",
    "valid_bucket_count",
]

ROWS = {"weight": "router.embedding", "bias": "router.bias"}
# Per-domain statistics, held by layer 0's router only; named as an expert artifact names them.
STATISTICS = {"unigram": "stats.unigram", "log_prior": "posterior.log_prior"}
BIGRAM = {"bigram": "stats.bigram"}
SETTINGS = ("temperature", "smoothing", "reset_tokens")
BIGRAM_SETTINGS = ("bigram_weight",)


class CausalPosterior(RunningPosterior):
    """The posterior over domains of every position of the forward in progress, shared by every
    layer's :class:`PosteriorRouter` of one model; installed by :func:`attach_posterior`.

    Called as a forward pre-hook of the decoder: reads the forward's ``input_ids`` once and
    advances the running per-row sums (:class:`~flexmoe.modeling.domain_posterior.RunningPosterior`,
    the arithmetic the exported modeling code shares) from where the KV cache left them.
    """

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
        return clamped_bias(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gates ``[T, E]`` (float32) for ``x`` ``[T, H]``: ``g_0``, ``g_{d*}``, zeros elsewhere."""
        if self.posterior is None:
            raise RuntimeError(
                "this PosteriorRouter is not attached to a model: call router.attach(model) "
                "(flexmoe.load and use_posterior_routers do)"
            )
        post = self.posterior.for_tokens(x.shape[0], self.num_experts)
        if self.num_experts == 1:
            return torch.ones_like(post)
        logits = F.linear(x.float(), self.frozen(self.weight.float())) + self.frozen(self.effective_bias())
        return posterior_gates(post, logits)

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
    ``bigram``: adjacent-pair counts ``[E, K]`` hashed into ``K`` buckets
    (:func:`~flexmoe.modeling.domain_posterior.bigram_bucket`),
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
        if not valid_bucket_count(bigram.shape[1]):
            raise InputError(
                f"bigram counts need a power of two of buckets up to 2**{MAX_BIGRAM_BITS}, got {bigram.shape[1]}"
            )
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
