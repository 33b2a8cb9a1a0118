"""TODO docstring."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flexmoe.core.moe import Router
from flexmoe.core.surgery import moe_blocks
from flexmoe.routing import layer_lda


class PosteriorMixRouter(nn.Module):
    """Router of :func:`lda_mixture_router`: gates are the hierarchical mixture
    ``g_d = p(d|x) p(e_d|x, d)`` for owners and ``g_0 = p(0|x) + sum_d p(d|x) p(e_0|x, d)`` for
    the public expert, returned as log-gates (their softmax is the gates themselves)."""

    def __init__(self, router: Router, lda_weight: torch.Tensor, lda_bias: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(router.weight.detach().clone(), requires_grad=False)
        self.register_buffer("bias", router.effective_bias().detach().clone())
        self.register_buffer("lda_weight", lda_weight.float())
        self.register_buffer("lda_bias", lda_bias.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        post = torch.log_softmax(x @ self.lda_weight.T + self.lda_bias, dim=-1)  # [T, E]: public, owners
        own = x @ self.weight.float().T + self.bias  # each owner's own 2-expert logits share column 0
        pair = torch.stack([own[:, :1].expand_as(own[:, 1:]), own[:, 1:]], dim=-1)  # [T, n, 2]
        pair = torch.log_softmax(pair, dim=-1)
        owners = post[:, 1:] + pair[..., 1]
        public = torch.logsumexp(torch.cat([post[:, :1], post[:, 1:] + pair[..., 0]], dim=-1), dim=-1, keepdim=True)
        return torch.cat([public, owners], dim=-1)


def lda_mixture_router(
    model: nn.Module,
    public_mean: torch.Tensor,
    owner_means: Sequence[torch.Tensor],
    covariance: torch.Tensor,
    *,
    prior: Sequence[float] | torch.Tensor | None = None,
    shrinkage: float = 0.1,
    temperature: float = 1.0,
) -> nn.Module:
    """Token-level hierarchical routing, in place: at every layer the LDA posterior over
    ``public, owner_1..n`` (as in :func:`lda_router`) weights each owner's own 2-expert router
    (``r_0, r_d, b_d`` as trained), so a token the owner's data explains is mixed between
    public and owner expert exactly as the owner's model would. With a one-hot posterior it
    is the owner's model. Not expressible as a linear router (the public gate is a sum)."""
    blocks = moe_blocks(model)
    scores = layer_lda(blocks, public_mean, owner_means, covariance, prior, shrinkage, temperature)
    for block, (W, b) in zip(blocks, scores):
        block.router = PosteriorMixRouter(block.router, W, b)
    return model


class _PrefixClass:
    """Shared per-forward state: the class chosen for every token, ``[B * S]``."""

    classes: torch.Tensor | None = None


class PrefixGatedRouter(nn.Module):
    """Router of :func:`prefix_lda_router`: the original rows and effective biases, with every
    expert other than the public one and the token's chosen owner masked to ``-inf``."""

    def __init__(self, router: Router, state: _PrefixClass):
        super().__init__()
        self.weight = nn.Parameter(router.weight.detach().clone(), requires_grad=False)
        self.register_buffer("bias", router.effective_bias().detach().clone())
        self.state = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = x.float() @ self.weight.float().T + self.bias
        cls = self.state.classes
        if cls is None or cls.shape[0] != x.shape[0]:
            raise RuntimeError("PrefixGatedRouter runs inside a model prepared by prefix_lda_router only")
        keep = torch.zeros_like(logits, dtype=torch.bool)
        keep[:, 0] = True
        keep[torch.arange(x.shape[0], device=x.device), cls.to(x.device)] = True
        return logits.masked_fill(~keep, float("-inf"))


def prefix_lda_router(
    model: nn.Module,
    public_mean: torch.Tensor,
    owner_means: Sequence[torch.Tensor],
    covariance: torch.Tensor,
    *,
    prior: Sequence[float] | torch.Tensor | None = None,
    shrinkage: float = 0.1,
    prefix: bool = True,
) -> nn.Module:
    """Sequence-level causal routing (see the module docstring), in place.

    Token ``t`` of a sequence is classed ``argmax_c mean_{s<=t} logit_c(x_s)`` with
    ``logit_c`` layer 0's LDA score (:func:`lda_weights` on the layer-0 rows of the means and
    ``covariance``); only the public expert and that owner's expert can be chosen, weighted by
    the owner's own router row and bias. Use ``top_k=2``. ``prefix=False`` classes each token
    by its own layer-0 score alone (the token-level ablation of the same router). Not expressible as a
    ``transformers`` checkpoint: the choice depends on the prefix, not on the token alone.
    """
    blocks = moe_blocks(model)
    W, b = layer_lda(blocks[:1], public_mean, owner_means, covariance, prior, shrinkage, 1.0)[0]
    W, b = W.float(), b.float()
    state = _PrefixClass()

    def classify(module, args):
        x = args[0]  # [B, S, H]: layer 0's MLP input
        scores = x.float() @ W.to(x.device).T + b.to(x.device)  # [B, S, C]
        steps = torch.arange(1, x.shape[1] + 1, device=x.device, dtype=torch.float32)[None, :, None]
        if prefix:
            scores = scores.cumsum(1) / steps
        state.classes = scores.argmax(-1).reshape(-1)

    for block in blocks:
        block.router = PrefixGatedRouter(block.router, state)
    blocks[0].register_forward_pre_hook(classify)
    return model
