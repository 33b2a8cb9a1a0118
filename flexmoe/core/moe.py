"""The FlexOlmo mixture-of-experts block and its router (Shi et al., 2025, section 3).

Nothing here knows about Hugging Face: a :class:`MoEBlock` wraps a list of expert
modules (each maps ``[..., H] -> [..., H]``) and a :class:`Router`.

Router, per layer (FlexOlmo eq. 1 with the negative-bias opt-out of section 3.3)::

    logits_j = r_j . x + b_j        b_0 = 0 (public expert), b_j = min(beta_j, 0)
    p        = softmax(logits)      in float32, over *all* experts
    (w, i)   = top_k(p)             renormalised only if ``normalize=True`` (Mixtral style)
    y        = sum_k w_k * E_{i_k}(x)

Only the tokens routed to an expert run through it, so expert compute depends on
``top_k``, not on the number of experts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module


@dataclass
class MoESettings:
    """Runtime settings shared by every MoE block of one model.

    ``owners[j]`` names expert ``j`` (``owners[0]`` is the public model). ``top_k=None``
    means "all experts". The blocks hold a reference to one instance, so changing it
    here changes every layer at once.
    """

    owners: list[str] = field(default_factory=lambda: ["public"])
    top_k: int | None = None
    normalize: bool = False
    # Set by :func:`record_router_logits`; each block appends its float32 logits.
    recorded: list[torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def num_experts(self) -> int:
        return len(self.owners)

    def effective_top_k(self) -> int:
        k = self.num_experts if self.top_k is None else self.top_k
        return max(1, min(k, self.num_experts))


class Router(nn.Module):
    """Linear router with one embedding row and one clamped bias per expert.

    ``weight`` is ``[E, H]`` (row ``j`` is ``r_j``); ``bias`` holds the raw ``beta_j``.
    The effective bias is ``min(beta_j, 0)`` for owners and exactly 0 for the public
    expert (index 0), whatever ``bias[0]`` holds.
    """

    def __init__(self, hidden_size: int, num_experts: int, *, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32, device=device))
        # When set, only these rows (experts) receive gradients; the others are frozen while
        # sharing one tensor with them (an owner trains r_1 but never r_0).
        self.register_buffer("trainable_rows", None, persistent=False)

    def freeze_rows(self, trainable: Sequence[int] | None) -> None:
        """Let only the router rows and biases of ``trainable`` experts learn (``None``: all)."""
        if trainable is None:
            self.trainable_rows = None
            return
        mask = torch.zeros(self.weight.shape[0], dtype=torch.bool, device=self.weight.device)
        mask[list(trainable)] = True
        self.trainable_rows = mask

    def effective_bias(self) -> torch.Tensor:
        b = self.bias.float().clamp(max=0.0)
        # Multiply rather than assign so the graph stays differentiable for owners.
        mask = torch.ones_like(b)
        mask[0] = 0.0
        return b * mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 router logits ``[T, E]`` for ``x`` of shape ``[T, H]``."""
        w, b = self.weight.float(), self.effective_bias()
        if self.trainable_rows is not None:
            m = self.trainable_rows
            w, b = torch.where(m[:, None], w, w.detach()), torch.where(m, b, b.detach())
        return F.linear(x.float(), w) + b


def _silu_gated(expert: nn.Module) -> bool:
    """Whether ``expert`` is the gated SiLU MLP of OLMo-2, Llama, Mistral and Qwen
    (``down(silu(gate(x)) * up(x))``, bias-free linears) with no forward hooks on it or its
    linears (nor global ones), so :func:`_gated_inplace` computes exactly what its forward would."""
    act = getattr(expert, "act_fn", None)
    linears = [getattr(expert, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    silu = isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"
    if not (silu and all(type(m) is nn.Linear and m.bias is None for m in linears)):
        return False
    hooked = any(m._forward_hooks or m._forward_pre_hooks for m in (expert, act, *linears))
    return not (hooked or torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


def _gated_inplace(expert: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The gated SiLU MLP without its two ``[n, intermediate]`` temporaries (SiLU and the product
    in place): the same numbers as the module's forward, 1-14% less time on CPU for a few hundred
    to a few thousand rows (the allocations' page faults). Inference only: autograd needs them."""
    a = F.linear(x, expert.gate_proj.weight)
    F.silu(a, inplace=True)
    a.mul_(F.linear(x, expert.up_proj.weight))
    return F.linear(a, expert.down_proj.weight)


class MoEBlock(nn.Module):
    """A drop-in replacement for a decoder layer's MLP: ``[B, S, H] -> [B, S, H]``."""

    def __init__(self, experts: Sequence[nn.Module], router: Router, settings: MoESettings):
        super().__init__()
        if len(experts) != router.weight.shape[0]:
            raise ValueError(f"{len(experts)} experts but the router has {router.weight.shape[0]} rows")
        self.experts = nn.ModuleList(experts)
        self.router = router
        self.settings = settings

    def expert(self, e: int, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Expert ``e`` on ``x``, times ``weight`` (``[n, 1]``) if given; without autograd, unhooked
        gated SiLU experts skip their temporaries and take the weight in place (same numbers)."""
        module = self.experts[e]
        if not torch.is_grad_enabled() and _silu_gated(module):
            y = _gated_inplace(module, x)  # a fresh tensor, so it may be scaled in place
            return y if weight is None else y.mul_(weight)
        y = module(x)
        return y if weight is None else y * weight

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    def route(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return ``(logits [T,E] float32, weights [T,k] float32, indices [T,k])``."""
        logits = self.router(h)
        probs = torch.softmax(logits, dim=-1)
        weights, indices = torch.topk(probs, self.settings.effective_top_k(), dim=-1)
        if self.settings.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, indices

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        h = hidden_states.reshape(-1, shape[-1])
        logits, weights, indices = self.route(h)
        if self.settings.recorded is not None:
            self.settings.recorded.append(logits)
        weights = weights.to(h.dtype)
        if indices.shape[1] == self.num_experts:
            return self._all_experts(h, weights, indices).reshape(shape)
        return self._routed_experts(h, weights, indices).reshape(shape)

    def _all_experts(self, h: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Every token goes to every expert (an owner's top-2 of 2, router tuning's top-k = all):
        run each expert on the whole batch; no sort, gathers, scatters or host sync."""
        w = torch.zeros_like(weights).scatter(1, indices, weights)  # back in expert order
        out = self.expert(0, h, w[:, :1])
        for e in range(1, self.num_experts):
            # Multiply, then add: the rounding of transformers' per-expert loop, so exports match to 0.0.
            out = out + self.expert(e, h, w[:, e, None])
        return out

    def _routed_experts(self, h: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Each expert runs once, on a contiguous slice of the (token, slot) pairs routed to it.

        The pairs are sorted by expert once (one host sync for the counts, none per expert);
        experts with no tokens never run. Measured on CPU (benchmarks/moe_inference.py, 2-16
        experts, two runs): median 1.01-1.06x the faster of transformers' two paths (mostly its
        eager per-expert loop), per-cycle quartiles down to 0.98; ``torch._grouped_mm`` itself
        (torch 2.13) took ~1.3x as long as this loop of plain matmuls for 16 groups of 256 rows.
        """
        out = torch.zeros_like(h)
        flat = indices.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        tokens = order // indices.shape[1]
        w_sorted = weights.reshape(-1)[order]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            idx = tokens[start : start + n]
            y = self.expert(e, h[idx], w_sorted[start : start + n, None])
            out.index_add_(0, idx, y.to(out.dtype))
            start += n
        return out


@contextlib.contextmanager
def record_router_logits(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect every MoE layer's float32 router logits ``[T, E]`` during the block.

    >>> with record_router_logits(model) as logits:
    ...     loss = model(ids, labels=ids).loss + 1e-3 * router_z_loss(logits)
    """
    blocks = [m for m in model.modules() if isinstance(m, MoEBlock)]
    settings = {id(b.settings): b.settings for b in blocks}.values()
    recorded: list[torch.Tensor] = []
    previous = [(s, s.recorded) for s in settings]
    for s in settings:
        s.recorded = recorded
    try:
        yield recorded
    finally:
        for s, old in previous:
            s.recorded = old


def router_z_loss(logits: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """Router z-loss (Zoph et al., 2022, eq. 5): mean over tokens of ``logsumexp(logits)^2``,
    averaged over layers."""
    if isinstance(logits, torch.Tensor):
        logits = [logits]
    if not logits:
        raise ValueError("no router logits recorded; run a forward pass inside record_router_logits()")
    return torch.stack([torch.logsumexp(l.float(), dim=-1).pow(2).mean() for l in logits]).mean()


def load_balancing_loss(logits: Sequence[torch.Tensor] | torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss (Fedus et al., 2021, eq. 4), top-k form:
    ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of routing slots given to expert ``e``
    and ``P_e`` its mean router probability; 1.0 when perfectly balanced. Averaged over layers."""
    if isinstance(logits, torch.Tensor):
        logits = [logits]
    if not logits:
        raise ValueError("no router logits recorded; run a forward pass inside record_router_logits()")
    losses = []
    for l in logits:
        num_experts = l.shape[-1]
        probs = torch.softmax(l.float(), dim=-1)
        chosen = torch.topk(probs, min(top_k, num_experts), dim=-1).indices
        f = torch.bincount(chosen.reshape(-1), minlength=num_experts).float() / chosen.numel()
        losses.append(num_experts * (f * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


class AffineRouter(Router):
    """A :class:`~flexmoe.core.moe.Router` whose biases are used as they are: no ``min(beta, 0)``
    clamp, and the public expert's bias is free too. ``logits_j = r_j . x + b_j``."""

    def effective_bias(self) -> torch.Tensor:
        return self.bias.float()
