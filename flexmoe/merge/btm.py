"""Branch-Train-Merge ensembling and averaging (Li et al., 2022, "Branch-Train-Merge", section 4).

N causal LMs that share a tokenizer (the "expert LMs", one per domain) are mixed at every
position by the posterior over domains given the prefix, computed with Bayes' rule (eq. 2)::

    p(x_{t+1} | x_{<=t}) = sum_j p(x_{t+1} | x_{<=t}, D=j) * p(D=j | x_{<=t})
    p(D=j | x_{<=t})     ∝ p(x_1 .. x_t | x_0, D=j) * p(D=j)

The mixture is of the members' next-token *probabilities*, not their logits. The prefix
likelihood is exactly causal: the weights at position ``t`` (which predicts ``x_{t+1}``) use
the members' log-probabilities of ``x_1 .. x_t`` only, and position 0 uses the prior (the
first token is never predicted, so it carries no evidence). Because each position's weights
are the Bayesian posterior given everything before it, the mixture's probability of a whole
sequence is ``sum_j p(D=j) p(x | D=j)`` exactly (the chain rule telescopes), so its total NLL
is at most the best member's plus ``-log p(D=best)``.

The paper's configuration (section 4.1, following DEMix, Gururangan et al. 2022) is the default:

* **cached prior** (``prior="ema"``): ``p(D=j)`` is an exponential moving average, with
  ``ema_alpha=0.3``, of the domain posterior on held-out text of the evaluation domain,
  refreshed every ``update_every`` tokens of that text (by default, once per held-out
  sequence); each refresh's posterior is Bayes' rule under the prior as it stands, so the
  estimate keeps updating as evidence arrives (:meth:`BTMEnsemble.fit_prior`,
  :meth:`BTMEnsemble.update_prior`). Before any held-out text is seen the EMA is at its start,
  the uniform prior;
* **top-k** (``top_k``, default :data:`PAPER_TOP_K` = 3): at every position only the ``k``
  most probable domains are kept and their weights renormalised to sum to 1.

``prior=None`` (uniform, fixed), explicit weights, and ``top_k=None`` (every domain) remain
available for ablations.

:func:`btm_average` is the paper's other way to use the experts (section 4.2): one dense model
whose parameters are the experts' average weighted by such a posterior.

Everything runs in float32 log space (``logsumexp``) and streams over members, so memory does
not grow with N (with ``top_k`` below N, a first pass over the members computes the weights and
a second one mixes, so each member runs twice). :meth:`BTMEnsemble.generate` decodes with one
key/value cache per member and updates the posterior token by token.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from flexmoe.merge.soup import average

PAPER_TOP_K = 3  # BTM (section 4.1) keeps the top-3 domains per position
PAPER_EMA_ALPHA = 0.3  # the EMA's weight on each refresh of the cached prior (DEMix, BTM section 4.1)
Rows = torch.Tensor | Sequence[torch.Tensor]


@dataclass
class BTMOutput(ModelOutput):
    """``logits``: log mixture probabilities ``[B, T, V]`` (so cross-entropy on them is the
    mixture's NLL); ``loss``: mean next-token NLL when labels were given (as in transformers);
    ``posterior``: the mixture weights per position, ``[B, T, N]``: ``p(D=j | x_{<=t})``, or
    with ``top_k`` its renormalised top-k (zero for the domains left out)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    posterior: torch.Tensor | None = None


def _vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return head.weight.shape[0]
    return model.config.vocab_size


def keep_top_k(log_weights: torch.Tensor, k: int | None) -> torch.Tensor:
    """Keep the ``k`` largest of ``log_weights`` (last dimension) and renormalise them in log
    space; the others become ``-inf``. ``None`` or ``k >= N`` returns the input unchanged."""
    n = log_weights.shape[-1]
    if k is None or k >= n:
        return log_weights
    top = torch.topk(log_weights, k, dim=-1).indices
    kept = torch.full_like(log_weights, -torch.inf).scatter(-1, top, log_weights.gather(-1, top))
    return torch.log_softmax(kept, dim=-1)


class BTMEnsemble(nn.Module):
    """A BTM ensemble of causal LMs, used like one: ``ensemble(input_ids).logits``.

    Args:
        models: the member LMs (``transformers`` causal LMs or flexmoe MoEs), all over the
            same vocabulary and on the same device.
        prior: ``p(D=j)`` per member. ``"ema"`` (the default) is the paper's cached prior: uniform
            until held-out text updates it (``held_out``, :meth:`fit_prior`, :meth:`update_prior`).
            Also accepted: any non-negative weights (normalised here, fixed) or ``None``
            (uniform, fixed).
        top_k: keep this many domains per position and renormalise (default: the paper's
            :data:`PAPER_TOP_K` = 3; ``None``: all).
        ema_alpha: the EMA's weight on each refresh (the paper: 0.3).
        update_every: refresh the cached prior every this many held-out tokens (``None``: once
            per held-out sequence).
        held_out: token ids of held-out text of the evaluation domain for ``prior="ema"``
            (``[S, T]`` or a list of 1-D tensors, read as one stream in that order), used at once
            by :meth:`fit_prior`.
    """

    def __init__(
        self,
        models: Sequence[nn.Module],
        prior: Sequence[float] | torch.Tensor | str | None = "ema",
        *,
        top_k: int | None = PAPER_TOP_K,
        ema_alpha: float = PAPER_EMA_ALPHA,
        update_every: int | None = None,
        held_out: Rows | None = None,
    ):
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("a BTM ensemble needs at least one model")
        sizes = [_vocab_size(m) for m in models]
        if len(set(sizes)) != 1:
            raise ValueError(f"BTM members must share one vocabulary, but their output sizes are {sizes}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k is how many domains to keep per position, an integer >= 1 or None; got {top_k!r}")
        _check_alpha(ema_alpha)
        _check_every(update_every)
        if isinstance(prior, str) and prior != "ema":
            raise ValueError(f"prior must be weights, None (uniform) or 'ema'; got {prior!r}")
        if held_out is not None and prior != "ema":
            raise ValueError("held_out sequences estimate the cached prior; pass prior='ema' with them")
        self.members = nn.ModuleList(models)
        self.vocab_size = sizes[0]
        self.top_k, self.ema_alpha, self.update_every = top_k, ema_alpha, update_every
        self.prior_kind = "ema" if prior == "ema" else "fixed"
        self.prior_refreshes = 0  # how many held-out blocks the cached prior has seen
        self.register_buffer("log_prior", self._log_prior(None if prior == "ema" else prior, len(models)))
        if held_out is not None:
            self.fit_prior(held_out)

    @staticmethod
    def _log_prior(prior, n: int) -> torch.Tensor:
        if prior is None:
            return torch.full((n,), -torch.log(torch.tensor(float(n))).item())
        p = torch.as_tensor(prior, dtype=torch.float32).flatten()
        if p.numel() != n:
            raise ValueError(f"prior has {p.numel()} weights for {n} models")
        if not torch.isfinite(p).all() or (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"prior weights must be finite, non-negative and not all zero, got {p.tolist()}")
        return torch.log(p / p.sum())

    @classmethod
    def from_dirs(cls, paths: Sequence[str | os.PathLike], prior=None, *, dtype: torch.dtype | None = None, **kwargs):
        """Load each member with :func:`flexmoe.load` (dense ``transformers`` or any flexmoe format);
        ``kwargs`` go to the constructor (``top_k``, ``ema_alpha``, ``update_every``, ``held_out``)."""
        # deferred: formats.load pulls in transformers' Auto model classes (~0.9 s), needed only to load from disk
        from flexmoe.formats.load import load

        return cls([load(p, dtype=dtype) for p in paths], prior, **kwargs)

    @property
    def num_members(self) -> int:
        return len(self.members)

    @property
    def prior(self) -> torch.Tensor:
        """``p(D=j)`` ``[N]`` float32, as the ensemble uses it."""
        return self.log_prior.exp()

    # -- the cached prior ------------------------------------------------------------------

    @torch.no_grad()
    def sequence_posterior(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``p(D=j | x_1 .. x_T)`` ``[B, N]`` of whole sequences under a **uniform** prior: the
        softmax over members of each sequence's log-likelihood (padding excluded)."""
        scores = []
        for model in self.members:
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            lp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            if attention_mask is not None:
                lp = lp * attention_mask[:, 1:].to(lp.dtype)
            scores.append(lp.double().sum(dim=1))
        return torch.softmax(torch.stack(scores, dim=-1), dim=-1)

    @torch.no_grad()
    def fit_prior(
        self,
        rows: Rows,
        *,
        ema_alpha: float | None = None,
        update_every: int | None = None,
        batch_size: int = 8,
    ) -> torch.Tensor:
        """Estimate the cached prior from held-out text, starting from uniform, and use it from
        now on: :meth:`update_prior` from ``π_0`` uniform. Returns the prior ``[N]``."""
        self.log_prior = self._log_prior(None, self.num_members).to(self.log_prior.device)
        self.prior_refreshes = 0
        return self.update_prior(rows, ema_alpha=ema_alpha, update_every=update_every, batch_size=batch_size)

    @torch.no_grad()
    def update_prior(
        self,
        rows: Rows,
        *,
        ema_alpha: float | None = None,
        update_every: int | None = None,
        batch_size: int = 8,
    ) -> torch.Tensor:
        """Continue the cached prior's exponential moving average over more held-out text.

        BTM section 4.1 (after DEMix): the held-out text is read as one stream, in the order
        given, and cut into blocks ``b`` of ``update_every`` predicted tokens (``None``: one
        block per sequence; a final shorter block counts too). At each block the prior
        ``π`` is refreshed with the posterior of that block under it::

            p(D=j | b) ∝ π_j · Π_{t in b} p_j(x_{t+1} | x_{<=t})
            π ← (1 − α) π + α · p(D | b)

        with ``α = ema_alpha``. Each member predicts every token from the start of its own
        sequence (the context runs across block boundaries, not across sequences). Because
        ``π`` stays a mixture with the previous prior, a domain's weight never falls below
        ``(1 − α)`` times its previous value per block, so strong evidence can bring it back.
        ``rows``: ``[S, T]`` token ids, or a list of 1-D tensors of any lengths (>= 2 tokens
        each). Returns ``π`` ``[N]`` float32, which the ensemble uses from now on.
        """
        alpha = self.ema_alpha if ema_alpha is None else ema_alpha
        every = self.update_every if update_every is None else update_every
        _check_alpha(alpha)
        _check_every(every)
        device = self.log_prior.device
        if isinstance(rows, torch.Tensor):
            if rows.dim() != 2:
                raise ValueError(f"held-out rows must be [sequences, tokens], got shape {list(rows.shape)}")
            batches = [rows[i : i + batch_size] for i in range(0, rows.shape[0], batch_size)]
        else:
            batches = [torch.as_tensor(r).reshape(1, -1) for r in rows]
        if not batches or any(b.shape[1] < 2 for b in batches):
            raise ValueError("the cached prior needs at least one held-out sequence of two or more tokens")
        log_pi = self.log_prior.double()
        pending = torch.zeros(self.num_members, dtype=torch.float64, device=device)
        filled = 0

        def refresh(log_pi, evidence):
            post = torch.softmax(log_pi + evidence, dim=-1)
            self.prior_refreshes += 1
            return torch.log((1 - alpha) * log_pi.exp() + alpha * post)

        for batch in batches:
            token_lp = self._token_logprobs(batch.to(device))  # [N, B, T-1]
            for row in token_lp.unbind(1):  # [N, T-1], in the stream's order
                if every is None:
                    log_pi = refresh(log_pi, row.sum(-1))
                    continue
                pos = 0
                while pos < row.shape[1]:
                    take = min(every - filled, row.shape[1] - pos)
                    pending += row[:, pos : pos + take].sum(-1)
                    pos, filled = pos + take, filled + take
                    if filled == every:
                        log_pi, pending, filled = refresh(log_pi, pending), torch.zeros_like(pending), 0
        if filled:
            log_pi = refresh(log_pi, pending)
        self.log_prior = log_pi.float()
        return self.prior

    def _token_logprobs(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``log p_j(x_{t+1} | x_{<=t})`` ``[N, B, T-1]`` float64 for every member ``j``."""
        out = []
        for model in self.members:
            logits = model(input_ids=input_ids, use_cache=False).logits[:, :-1].float()
            lp = torch.log_softmax(logits, dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
            out.append(lp.double())
        return torch.stack(out)

    # -- the mixture -----------------------------------------------------------------------

    def log_joint(self, token_logprobs: torch.Tensor, j: int) -> torch.Tensor:
        """``log p(D=j) + log p(x_1 .. x_t | x_0, D=j)`` for every position ``t``, ``[B, T]``
        float64, from member ``j``'s log-probabilities of the observed next tokens,
        ``token_logprobs[b, t] = log p_j(x_{t+1} | x_{<=t})`` ``[B, T-1]``.

        Position ``t`` adds the evidence of positions ``< t`` only (an exclusive cumulative
        sum): position 0 is the prior and nothing at or after ``t`` is used.
        """
        cum = token_logprobs.double().cumsum(dim=1)
        return self.log_prior[j].double() + torch.cat([cum.new_zeros(cum[:, :1].shape), cum], dim=1)

    def log_posterior(self, log_joints: Sequence[torch.Tensor]) -> torch.Tensor:
        """``log p(D=j | x_{<=t})`` ``[B, T, N]`` from every member's :meth:`log_joint`."""
        return torch.log_softmax(torch.stack(list(log_joints), dim=-1), dim=-1)

    def _member_logprobs(self, model, input_ids, attention_mask, next_ids, keep):
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        lp = torch.log_softmax(out.logits.float(), dim=-1)
        tok = lp[:, :-1].gather(-1, next_ids).squeeze(-1)
        return lp, tok * keep if keep is not None else tok

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: object,
    ) -> BTMOutput:
        """Mixture log-probabilities for every position of ``input_ids`` ``[B, T]``.

        ``attention_mask`` (1 = real token) keeps padding out of the prefix evidence.
        ``labels`` as in ``transformers``: the inputs (shifted inside), ``-100`` ignored.
        """
        next_ids = input_ids[:, 1:, None]
        keep = attention_mask[:, 1:].to(torch.float32) if attention_mask is not None else None
        if self.top_k is not None and self.top_k < self.num_members:
            mix, weights = self._mix_top_k(input_ids, attention_mask, next_ids, keep)
        else:
            mix, weights = self._mix_all(input_ids, attention_mask, next_ids, keep)
        loss = None
        if labels is not None:
            target = labels[:, 1:].flatten().to(mix.device)
            loss = F.cross_entropy(mix[:, :-1].flatten(0, 1), target, ignore_index=-100)
        return BTMOutput(loss=loss, logits=mix, posterior=weights)

    def _mix_all(self, input_ids, attention_mask, next_ids, keep):
        # One pass over the members, one [B, T, V] tensor of theirs alive at a time: `mix` is the
        # mixture of the members seen so far, normalised by `norm` = logsumexp of their joints.
        # Adding member j rescales the old mixture by its share of the new total; every scalar
        # added to the big tensor is a log-weight <= 0, so nothing loses float32 precision to
        # the magnitude of a long prefix's log-likelihood.
        joints, mix, norm = [], None, None
        for j, model in enumerate(self.members):
            lp, tok = self._member_logprobs(model, input_ids, attention_mask, next_ids, keep)
            joint = self.log_joint(tok, j)
            joints.append(joint)
            if mix is None:
                mix, norm = lp, joint
                continue
            total = torch.logaddexp(norm, joint)
            # -inf - -inf (members with prior 0 so far) is NaN; their weight is then moot.
            old, new = ((x - total).nan_to_num(nan=0.0, neginf=-torch.inf).float()[..., None] for x in (norm, joint))
            mix, norm = torch.logaddexp(mix + old, lp + new), total
            del lp
        return mix, self.log_posterior(joints).exp().float()

    def _mix_top_k(self, input_ids, attention_mask, next_ids, keep):
        # The top-k of the posterior needs every member's evidence first: pass 1 keeps only the
        # token log-probabilities, pass 2 re-runs each member and adds it with its kept weight.
        joints = []
        with torch.no_grad():
            for j, model in enumerate(self.members):
                joints.append(
                    self.log_joint(self._member_logprobs(model, input_ids, attention_mask, next_ids, keep)[1], j)
                )
        log_w = keep_top_k(self.log_posterior(joints), self.top_k).float()  # [B, T, N]
        mix = None
        for j, model in enumerate(self.members):
            if not torch.isfinite(log_w[..., j]).any():
                continue  # never among the top k: its probabilities would be multiplied by 0
            lp = self._member_logprobs(model, input_ids, attention_mask, next_ids, keep)[0]
            term = lp + log_w[..., j, None]
            mix = term if mix is None else torch.logaddexp(mix, term)
            del lp, term
        return mix, log_w.exp()

    # -- decoding --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Decode from the mixture's next-token distribution: greedy (``do_sample=False``) or
        sampled at ``temperature``. Returns ``[B, T + new]`` token ids (prompt included).

        Like ``transformers``' ``generate``: prompts may be left-padded (``attention_mask``),
        a sequence that produced ``eos_token_id`` continues with ``pad_token_id``, and decoding
        stops when every sequence has finished or after ``max_new_tokens``. Both default to the
        first member's generation config. Each member keeps its own key/value cache, and the
        posterior (and its top-k) is updated with every new token, exactly as :meth:`forward`
        computes it on the whole sequence.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise ValueError(f"temperature must be positive when sampling, got {temperature}")
        eos, pad = self._special_tokens(eos_token_id, pad_token_id)
        ids = input_ids
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(ids.dtype)
        positions = mask.cumsum(-1) - 1
        positions = positions.masked_fill(mask == 0, 1)
        caches, last, joints = [], [], []
        keep = mask[:, 1:].to(torch.float32)
        for j, model in enumerate(self.members):
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
            lp = torch.log_softmax(out.logits.float(), dim=-1)
            tok = lp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1) * keep
            caches.append(_returned_cache(out))
            last.append(lp[:, -1])
            joints.append(self.log_prior[j].double() + tok.double().sum(dim=1))
        finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        position = positions[:, -1:]
        for _ in range(max_new_tokens):
            log_w = keep_top_k(torch.log_softmax(torch.stack(joints, dim=-1), dim=-1), self.top_k).float()
            mix = torch.logsumexp(torch.stack(last, dim=1) + log_w[..., None], dim=1)  # [B, V]
            if do_sample:
                probs = torch.softmax(mix / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                nxt = mix.argmax(dim=-1)
            if pad is not None:
                nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if eos:
                finished |= torch.isin(nxt, torch.tensor(eos, device=nxt.device))
                if finished.all():
                    break
            for j in range(self.num_members):
                joints[j] = joints[j] + last[j].gather(-1, nxt[:, None]).squeeze(-1).double()
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            position = position + 1
            for j, model in enumerate(self.members):
                out = model(
                    input_ids=nxt[:, None],
                    attention_mask=mask,
                    position_ids=position,
                    use_cache=True,
                    **{_cache_argument(model): caches[j]},
                )
                caches[j] = _returned_cache(out)
                last[j] = torch.log_softmax(out.logits[:, -1].float(), dim=-1)
        return ids

    def _special_tokens(self, eos_token_id, pad_token_id) -> tuple[list[int], int | None]:
        config = getattr(self.members[0], "generation_config", None) or getattr(self.members[0], "config", None)
        if eos_token_id is None:
            eos_token_id = getattr(config, "eos_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(config, "pad_token_id", None)
        eos = [] if eos_token_id is None else [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        if eos and pad_token_id is None:
            pad_token_id = eos[0]  # as transformers does when a model has no pad token
        return eos, pad_token_id


def _check_alpha(alpha: float) -> None:
    if not 0.0 < alpha <= 1.0:
        raise ValueError(f"ema_alpha is the EMA's weight on each refresh of the prior, in (0, 1]; got {alpha}")


def _check_every(every: int | None) -> None:
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(f"update_every is a number of held-out tokens per prior refresh (>= 1) or None; got {every!r}")


def _cache_argument(model: nn.Module) -> str:
    # transformers 5.x renamed the key/value cache argument `past_key_values` to `cache`.
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _returned_cache(out):
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


def btm_average(experts: Sequence, posterior: Sequence[float] | torch.Tensor, *, dtype: torch.dtype | None = None):
    """BTM parameter averaging (Li et al., 2022, section 4.2): one dense model whose parameters
    are ``Σ_j p(D=j) θ_j``, the experts' average weighted by a domain posterior.

    ``experts``: models (or state dicts) of one architecture, e.g. the members of a
    :class:`BTMEnsemble`. ``posterior``: ``[N]`` non-negative weights, normalised here; the
    paper uses the cached prior estimated on held-out text of the target domain, i.e.
    ``ensemble.fit_prior(rows)`` or ``ensemble.prior``. Returns what
    :func:`flexmoe.merge.average` returns: a new model (or state dict); the experts are not
    modified. A one-hot posterior gives that expert's parameters exactly.
    """
    experts = list(experts)
    w = torch.as_tensor(posterior, dtype=torch.float64).detach().cpu()
    if w.dim() != 1:
        raise ValueError(
            f"posterior must be one weight per expert, shape [{len(experts)}], got {list(w.shape)}; "
            "for per-position posteriors pass ensemble.fit_prior(rows) instead"
        )
    if w.numel() != len(experts):
        raise ValueError(f"posterior has {w.numel()} weights for {len(experts)} experts")
    return average(experts, weights=w.tolist(), dtype=dtype)
