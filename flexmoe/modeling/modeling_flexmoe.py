"""A flexmoe merged model as a ``transformers`` model: the dense base's decoder with every MLP
replaced by a mixture of experts, routed as flexmoe routes it.

Shipped inside every ``remote`` export of flexmoe and loaded by ``transformers`` with
``trust_remote_code=True``; it imports only ``torch`` and ``transformers``, so the export runs
where flexmoe is not installed. The weights carry flexmoe's own names (those of its native
format), so the same files reopen in flexmoe with ``flexmoe.load``.

Each layer's MLP becomes a :class:`MoEBlock`: the experts (copies of the base's MLP), and a
router whose gates are either

- ``posterior`` (flexmoe's posterior router): a causal naive-Bayes posterior over the domains
  (public data first, then the owners) from the tokens up to each position, ``log post_t(d) =
  log prior(d) + tau * sum_{s <= t} log p(x_s | d)`` with ``log p(v | d) = log(c_dv + alpha) -
  log(N_d + alpha V)`` from each domain's unigram counts ``c_d`` (and, with bigram counts ``b_d``
  hashed into buckets, ``log p(x_t | x_{t-1}, d) = log(b_d[h(x_{t-1}, x_t)] + k p(x_t | d)) -
  log(c_d x_{t-1} + k)`` for every position after a row's first); the token runs the public
  expert and the most probable owner ``d*``, weighted by the owners' pairwise routers
  ``s_d = softmax(l_0, l_d)[1]`` (``l_d = r_d . x + min(beta_d, 0)``, ``l_0 = r_0 . x``):
  ``g_0 = post(0) + sum_d post(d) (1 - s_d)``, ``g_{d*} = post(d*) s_{d*}``, others 0;
- ``clamped`` or ``affine``: ``softmax(r_j . x + b_j)`` with ``b_j = min(beta_j, 0)`` and
  ``b_0 = 0`` (clamped) or ``b_j = beta_j`` (affine);

of which the block keeps the top-k (renormalised if ``moe_normalize``). The posterior is computed
once per forward, before the decoder runs, from the forward's ``input_ids``: running per-row sums
carry over a KV cache, so generating a token reads one new position, not the whole prefix.
"""

import copy
import inspect

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_flexmoe import FlexMoEConfig
from .domain_posterior import RunningPosterior, posterior_gates

ROUTER_KINDS = ("posterior", "clamped", "affine")


class Router(nn.Module):
    """One layer's router: rows ``weight`` ``[E, H]``, raw biases ``bias`` ``[E]`` and, on the
    layer holding them (layer 0 of a posterior-routed model), the domain statistics."""

    def __init__(self, kind: str, hidden_size: int, num_experts: int, statistics: dict | None = None):
        super().__init__()
        if kind not in ROUTER_KINDS:
            raise ValueError(f"unknown router kind {kind!r}; this modeling code knows {', '.join(ROUTER_KINDS)}")
        self.kind = kind
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.zeros(num_experts))
        self.posterior = None  # a RunningPosterior, set by FlexMoEForCausalLM
        if statistics is not None:
            vocab, resets, buckets = statistics["vocab_size"], statistics["reset_tokens"], statistics["buckets"]
            self.register_buffer("unigram", torch.zeros(num_experts, vocab))
            self.register_buffer("log_prior", torch.zeros(num_experts))
            self.register_buffer("temperature", torch.ones(()))
            self.register_buffer("smoothing", torch.ones(()))
            self.register_buffer("reset_tokens", torch.zeros(resets, dtype=torch.long))
            if buckets:
                self.register_buffer("bigram", torch.zeros(num_experts, buckets))
                self.register_buffer("bigram_weight", torch.ones(()))

    def effective_bias(self) -> torch.Tensor:
        b = self.bias.float()
        if self.kind == "affine":
            return b
        mask = torch.ones_like(b)
        mask[0] = 0.0
        return b.clamp(max=0.0) * mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Gates ``[T, E]`` (float32) for ``x`` ``[T, H]``."""
        logits = F.linear(x.float(), self.weight.float()) + self.effective_bias()
        if self.kind != "posterior":
            return torch.softmax(logits, dim=-1)
        post = self.posterior.probs
        if post is None or post.shape != (x.shape[0], self.weight.shape[0]):
            raise RuntimeError("the posterior router needs the whole model's forward, called with input_ids")
        return posterior_gates(post, logits)


class MoEBlock(nn.Module):
    """A decoder layer's MLP replaced by experts and a router: ``[B, S, H] -> [B, S, H]``."""

    def __init__(self, experts: list, router: Router, top_k: int | None, normalize: bool):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        self.router = router
        E = len(experts)
        self.top_k = max(1, min(E if top_k is None else top_k, E))
        self.normalize = normalize

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        h = hidden_states.reshape(-1, shape[-1])
        weights, indices = torch.topk(self.router(h), self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(h.dtype)
        if self.top_k == len(self.experts):  # every expert on every token
            w = torch.zeros_like(weights).scatter(1, indices, weights)
            out = self.experts[0](h) * w[:, :1]
            for e in range(1, len(self.experts)):
                out = out + self.experts[e](h) * w[:, e, None]
            return out.reshape(shape)
        out = torch.zeros_like(h)
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=len(self.experts)).tolist()
        tokens = order // indices.shape[1]
        w_sorted = weights.reshape(-1)[order]
        start = 0
        for e, n in enumerate(counts):
            if n:
                idx = tokens[start : start + n]
                y = self.experts[e](h[idx]) * w_sorted[start : start + n, None]
                out.index_add_(0, idx, y.to(out.dtype))
                start += n
        return out.reshape(shape)


class FlexMoEPreTrainedModel(PreTrainedModel):
    config_class = FlexMoEConfig
    config: FlexMoEConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # Routers compute in float32 and the posterior's counts and temperature must not round to bf16
    # (flexmoe keeps them in float32 whatever the model's dtype); reset_tokens stay token ids.
    _keep_in_fp32_modules_strict = [
        f"router.{name}"
        for name in ("weight", "bias", "unigram", "bigram", "bigram_weight", "log_prior", "temperature", "smoothing")
    ]


class FlexMoEForCausalLM(FlexMoEPreTrainedModel, GenerationMixin):
    """The base model's decoder (``self.model``, built by ``AutoModel`` from the base config)
    with every layer's ``mlp`` a :class:`MoEBlock`, and the language-model head."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: FlexMoEConfig):
        super().__init__(config)
        base = config.base_config()
        self.model = AutoModel.from_config(base, attn_implementation=config._attn_implementation)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        E = len(config.moe_owners)
        kinds = config.moe_router
        layers = self.model.layers
        kinds = [kinds] * len(layers) if isinstance(kinds, str) else list(kinds)
        stats = {
            "vocab_size": config.vocab_size,
            "reset_tokens": len(config.moe_reset_tokens or []),
            "buckets": config.moe_bigram_buckets or 0,
        }
        for L, (layer, kind) in enumerate(zip(layers, kinds)):
            holds = kind == "posterior" and config.moe_statistics_layer == L
            router = Router(kind, config.hidden_size, E, stats if holds else None)
            layer.mlp = MoEBlock(
                [copy.deepcopy(layer.mlp) for _ in range(E)], router, config.moe_top_k, config.moe_normalize
            )
        routers = [layer.mlp.router for layer in layers if layer.mlp.router.kind == "posterior"]
        self._posterior = None
        if routers:
            holder = config.moe_statistics_layer
            if holder is None or not hasattr(layers[holder].mlp.router, "unigram"):
                raise ValueError(f"moe_statistics_layer={holder} names no posterior-routed layer")
            self._posterior = RunningPosterior(layers[holder].mlp.router)
        for router in routers:
            router.posterior = self._posterior
        params = inspect.signature(self.model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.post_init()

    @property
    def posterior(self):
        """The :class:`RunningPosterior` of the last forward (``None`` without posterior routers)."""
        return self._posterior

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        logits_to_keep=0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        cache = cache if cache is not None else past_key_values
        if self._posterior is not None:
            if input_ids is None:
                raise ValueError(
                    "the posterior router reads the token ids (its statistics are counts over the vocabulary); "
                    "call the model with input_ids, not inputs_embeds"
                )
            past = 0 if cache is None else int(cache.get_seq_length())
            self._posterior.advance(input_ids, attention_mask, past)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **{self._cache_arg: cache},
            **kwargs,
        )
        hidden = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            **{self._cache_arg: getattr(outputs, self._cache_arg)},
        )


__all__ = ["FlexMoEForCausalLM", "FlexMoEPreTrainedModel"]
