"""Branch-Train-Merge ensembling (Li et al., 2022, "Branch-Train-Merge", section 4.1).

N causal LMs that share a tokenizer (the "expert LMs", one per domain) are mixed at every
position by the posterior over domains given the prefix, computed with Bayes' rule::

    p(x_{t+1} | x_{<=t}) = sum_j p(x_{t+1} | x_{<=t}, D=j) * p(D=j | x_{<=t})
    p(D=j | x_{<=t})     ∝ p(x_1 .. x_t | x_0, D=j) * p(D=j)

The mixture is of the members' next-token *probabilities*, not their logits. The prefix
likelihood is exactly causal: the weights at position ``t`` (which predicts ``x_{t+1}``) use
the members' log-probabilities of ``x_1 .. x_t`` only, and position 0 uses the prior (the
first token is never predicted, so it carries no evidence). Because each position's weights
are the Bayesian posterior given everything before it, the mixture's probability of a whole
sequence is ``sum_j p(D=j) p(x | D=j)`` exactly (the chain rule telescopes), so its total NLL
is at most the best member's plus ``-log p(D=best)``.

Everything runs in float32 log space (``logsumexp``) and streams over members, so memory does
not grow with N. The paper's refinements (an EMA-estimated prior, keeping the top-k domains)
fit into :meth:`BTMEnsemble.log_posterior`; they are not implemented yet.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput


@dataclass
class BTMOutput(ModelOutput):
    """``logits``: log mixture probabilities ``[B, T, V]`` (so cross-entropy on them is the
    mixture's NLL); ``loss``: mean next-token NLL when labels were given (as in transformers);
    ``posterior``: the mixture weights ``p(D=j | x_{<=t})`` per position, ``[B, T, N]``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    posterior: torch.Tensor | None = None


def _vocab_size(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return head.weight.shape[0]
    return model.config.vocab_size


class BTMEnsemble(nn.Module):
    """A BTM ensemble of causal LMs, used like one: ``ensemble(input_ids).logits``.

    Args:
        models: the member LMs (``transformers`` causal LMs or flexmoe MoEs), all over the
            same vocabulary and on the same device.
        prior: ``p(D=j)`` per member (any non-negative weights, normalised here);
            ``None`` is uniform.
    """

    def __init__(self, models: Sequence[nn.Module], prior: Sequence[float] | torch.Tensor | None = None):
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("a BTM ensemble needs at least one model")
        sizes = [_vocab_size(m) for m in models]
        if len(set(sizes)) != 1:
            raise ValueError(f"BTM members must share one vocabulary, but their output sizes are {sizes}")
        self.members = nn.ModuleList(models)
        self.vocab_size = sizes[0]
        self.register_buffer("log_prior", self._log_prior(prior, len(models)))

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
    def from_dirs(cls, paths: Sequence[str | os.PathLike], prior=None, *, dtype: torch.dtype | None = None):
        """Load each member with :func:`flexmoe.load` (dense ``transformers`` or any flexmoe format)."""
        from flexmoe.hf import load

        return cls([load(p, dtype=dtype) for p in paths], prior)

    @property
    def num_members(self) -> int:
        return len(self.members)

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
        # One pass over the members, one [B, T, V] tensor of theirs alive at a time: `mix` is the
        # mixture of the members seen so far, normalised by `norm` = logsumexp of their joints.
        # Adding member j rescales the old mixture by its share of the new total; every scalar
        # added to the big tensor is a log-weight <= 0, so nothing loses float32 precision to
        # the magnitude of a long prefix's log-likelihood.
        joints, mix, norm = [], None, None
        for j, model in enumerate(self.members):
            out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            lp = torch.log_softmax(out.logits.float(), dim=-1)
            del out
            tok = lp[:, :-1].gather(-1, next_ids).squeeze(-1)
            joint = self.log_joint(tok * keep if keep is not None else tok, j)
            joints.append(joint)
            if mix is None:
                mix, norm = lp, joint
                continue
            total = torch.logaddexp(norm, joint)
            # -inf - -inf (members with prior 0 so far) is NaN; their weight is then moot.
            old, new = ((x - total).nan_to_num(nan=0.0, neginf=-torch.inf).float()[..., None] for x in (norm, joint))
            mix, norm = torch.logaddexp(mix + old, lp + new), total
            del lp
        loss = None
        if labels is not None:
            target = labels[:, 1:].flatten().to(mix.device)
            loss = F.cross_entropy(mix[:, :-1].flatten(0, 1), target, ignore_index=-100)
        return BTMOutput(loss=loss, logits=mix, posterior=self.log_posterior(joints).exp().float())
