"""Model soups: parameter averages of models fine-tuned from one starting point.

:func:`average` is the uniform soup (Wortsman et al., 2022, "Model soups", eq. 1) or, with
``weights``, a weighted one. :class:`WeightedSoup` is FlexOlmo's "weighted model soup"
baseline (Shi et al., 2025, section 4): a different average for every input sequence, weighted
by how well each model explains the beginning of that sequence.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from transformers.utils import ModelOutput

from flexmoe.merge.kernel import MergeMethod, merge_dirs, merge_in_memory


def average(models: Sequence, weights: Sequence[float] | None = None, *, dtype: torch.dtype | None = None):
    """``Σ_i w_i θ_i / Σ_i w_i`` over every floating-point parameter and buffer.

    ``models``: ``transformers`` models, flexmoe MoEs (of the same experts) or plain state
    dicts, all of one architecture. ``weights``: non-negative, not all zero (default:
    uniform); they are normalised to sum to 1. Returns the same kind as ``models[0]``: a new
    module (a deep copy of it holding the average) or a new state dict. Tensors that are not
    floating point come from ``models[0]``. For directories on disk use :func:`average_dirs`.
    """
    return merge_in_memory(MergeMethod(combine="mean"), models, weights=weights, dtype=dtype)


def average_dirs(
    models: Sequence[str | os.PathLike], out: str | os.PathLike, weights=None, *, dtype: torch.dtype | None = None
) -> Path:
    """:func:`average` from ``save_pretrained`` directories to a new one, a tensor at a time."""
    return merge_dirs(MergeMethod(combine="mean"), models, out, weights=weights, dtype=dtype)


@dataclass
class WeightedSoupOutput(ModelOutput):
    """``logits`` ``[B, T, V]`` of each sequence under its own soup; ``loss``: mean next-token
    NLL over the labelled targets *after* the prefix; ``weights``: the soup weights ``[B, N]``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    weights: torch.Tensor | None = None


class WeightedSoup(nn.Module):
    """A per-sequence weighted parameter average, used like a causal LM.

    For a sequence ``x_0 .. x_{T-1}`` and models ``θ_1 .. θ_N`` (one architecture):

    1. ``ℓ_j = Σ_{s=1}^{P-1} log p_{θ_j}(x_s | x_{<s})``, the log-likelihood of the first
       ``P = min(prefix_len, length)`` tokens under model ``j`` (``x_0`` is conditioned on,
       never predicted; padding, per ``attention_mask``, is not counted);
    2. ``w = softmax_j(ℓ_j / temperature)``; with ``temperature=1`` this is the posterior over
       models given the prefix under a uniform prior (as in BTM), which becomes nearly one-hot
       as the prefix grows; ``temperature=P-1`` uses the mean per-token log-likelihood instead;
    3. the whole sequence runs through one model whose parameters are ``Σ_j w_j θ_j``
       (``torch.func.functional_call`` on the first model; the members are not modified).

    The prefix's own tokens chose the weights, so scoring them would let the answer leak into
    the model; the ``loss`` therefore counts only targets ``x_t`` with ``t >= P`` (the logits
    cover every position). Compare methods on the same post-prefix tokens.

    Each sequence gets its own parameter set, so a batch costs ``N + B`` forward passes and
    one averaged copy of the parameters at a time.
    """

    def __init__(self, models: Sequence[nn.Module], prefix_len: int = 32, temperature: float = 1.0):
        super().__init__()
        models = list(models)
        if not models:
            raise ValueError("a weighted soup needs at least one model")
        if prefix_len < 2:
            raise ValueError(f"prefix_len must be >= 2 (the first token is never predicted), got {prefix_len}")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        shapes = [{n: tuple(p.shape) for n, p in m.named_parameters()} for m in models]
        for i, s in enumerate(shapes[1:], start=1):
            if s != shapes[0]:
                raise ValueError(f"model {i} does not have the parameters of model 0; a soup needs one architecture")
        self.members = nn.ModuleList(models)
        self.prefix_len, self.temperature = prefix_len, temperature

    @classmethod
    def from_dirs(cls, paths: Sequence[str | os.PathLike], **kwargs) -> WeightedSoup:
        """Load each member with :func:`flexmoe.load` (dense ``transformers`` or a flexmoe format)."""
        # deferred: formats.load pulls in transformers' Auto model classes, and flexmoe.merge stays quick to import
        from flexmoe.formats.load import load

        return cls([load(p) for p in paths], **kwargs)

    @torch.no_grad()
    def prefix_weights(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The soup weights ``[B, N]`` of each sequence (steps 1-2 of the class docstring)."""
        prefix = input_ids[:, : self.prefix_len]
        mask = attention_mask[:, : self.prefix_len] if attention_mask is not None else None
        scores = []
        for model in self.members:
            logits = model(input_ids=prefix, attention_mask=mask, use_cache=False).logits.float()
            lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, prefix[:, 1:, None]).squeeze(-1)
            if mask is not None:
                lp = lp * mask[:, 1:].to(lp.dtype)
            scores.append(lp.double().sum(dim=1))
        return torch.softmax(torch.stack(scores, dim=-1) / self.temperature, dim=-1).float()

    def soup_parameters(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """``Σ_j w_j θ_j`` for one sequence's weights ``[N]``, per parameter name of model 0."""
        params = [dict(m.named_parameters()) for m in self.members]
        out = {}
        for name, p0 in params[0].items():
            acc = p0.detach().float() * weights[0]
            for w, ps in zip(weights[1:], params[1:]):
                acc += ps[name].detach().float() * w
            out[name] = acc.to(p0.dtype)
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **_: object,
    ) -> WeightedSoupOutput:
        """``input_ids`` ``[B, T]``; ``labels`` as in ``transformers`` (the inputs, shifted inside,
        ``-100`` ignored)."""
        weights = self.prefix_weights(input_ids, attention_mask)
        skeleton = self.members[0]
        logits = []
        for b in range(input_ids.shape[0]):
            params = self.soup_parameters(weights[b])
            kwargs = {"input_ids": input_ids[b : b + 1], "use_cache": False}
            if attention_mask is not None:
                kwargs["attention_mask"] = attention_mask[b : b + 1]
            logits.append(functional_call(skeleton, params, args=(), kwargs=kwargs, strict=False).logits)
            del params
        logits = torch.cat(logits)
        loss = None
        if labels is not None:
            target = labels[:, 1:].clone()
            target[:, : self.prefix_len - 1] = -100  # targets x_1 .. x_{P-1} chose the weights
            loss = F.cross_entropy(
                logits[:, :-1].float().flatten(0, 1), target.flatten().to(logits.device), ignore_index=-100
            )
        return WeightedSoupOutput(loss=loss, logits=logits, weights=weights)
