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

Every router implements :class:`ExpertRouter`, so model surgery (opt-out, opt-in, freezing) and
the checkpoint formats work on any router without knowing its class. :class:`Router` and
:class:`AffineRouter` are the library's per-token routers (:mod:`flexmoe.core.posterior` holds
its router by the sequence's domain posterior); a router defined elsewhere subclasses
:class:`PerExpertRouter` and registers itself (:func:`register_router`) so a native export of
it loads again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from flexmoe.core.errors import InputError
from flexmoe.core.provenance import Provenance


@dataclass
class MoESettings:
    """Runtime settings shared by every MoE block of one model.

    ``owners[j]`` names expert ``j`` (``owners[0]`` is the public model). ``top_k=None``
    means "all experts". The blocks hold a reference to one instance, so changing it
    here changes every layer at once. ``provenance`` records who contributed each owner expert
    (:mod:`flexmoe.core.provenance`); surgery keeps it in step with ``owners``.
    """

    owners: list[str] = field(default_factory=lambda: ["public"])
    top_k: int | None = None
    normalize: bool = False
    provenance: Provenance = field(default_factory=Provenance, repr=False, compare=False)
    # Set by :func:`record_router_logits`; each block appends its float32 logits.
    recorded: list[torch.Tensor] | None = field(default=None, repr=False, compare=False)

    @property
    def num_experts(self) -> int:
        return len(self.owners)

    def effective_top_k(self) -> int:
        k = self.num_experts if self.top_k is None else self.top_k
        return max(1, min(k, self.num_experts))


class RouterFormatError(InputError):
    """A checkpoint format cannot hold this router; the message names what it cannot express."""


@runtime_checkable
class ExpertRouter(Protocol):
    """What every router of a :class:`MoEBlock` provides.

    Surgery and export speak only this protocol, so a new router (one that holds per-expert
    statistics beside its rows, or judges the whole prefix) plugs in without touching them:

    - ``router(x)``: float32 logits ``[T, E]`` for ``x`` ``[T, H]``; the block takes their
      softmax and top-k. A router whose weights are no softmax of per-expert logits sets
      ``returns_gates = True`` and returns the gates themselves (non-negative, each row summing
      to at most 1); the block then takes their top-k as they are.
    - :meth:`freeze_rows`: while an owner trains, the public row ``r_0`` and the other owners'
      rows share a tensor with the trainable ones and must not move.
    - :meth:`expert_state`, :meth:`keep_experts`, :meth:`append_expert`: opt-out and opt-in
      by expert index. An expert's state is named as an :class:`~flexmoe.ExpertArtifact` names
      it under ``layers.{L}.`` (``router.embedding``, ``router.bias``, ...), so an artifact's
      tensors opt an owner in and the state of one expert round-trips exactly.
    - :meth:`linear_gate`: the rows ``[E, H]`` and effective biases ``[E]`` (float32) with
      ``logits = x @ W.T + b``: what the FlexOlmo and Mixtral gates hold. A router that is
      not such a map raises :class:`RouterFormatError` saying why.
    - ``kind``, :meth:`native_state`, :meth:`from_native_state`: the native format writes
      ``kind`` and the tensors and rebuilds the router from them (:func:`router_class`).
    - :meth:`attach`: called with the whole model once every layer's router is in place (after a
      native load), for a router that shares state across layers (a posterior over the sequence's
      tokens, computed once per forward) to reconnect it. A no-op for per-token routers.
    """

    kind: ClassVar[str]
    returns_gates: ClassVar[bool]

    @property
    def num_experts(self) -> int: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def freeze_rows(self, trainable: Sequence[int] | None) -> None: ...

    def expert_state(self, j: int) -> dict[str, torch.Tensor]: ...

    def keep_experts(self, keep: Sequence[int]) -> None: ...

    def append_expert(self, state: Mapping[str, torch.Tensor]) -> None: ...

    def linear_gate(self) -> tuple[torch.Tensor, torch.Tensor]: ...

    def native_state(self) -> dict[str, torch.Tensor]: ...

    def attach(self, model: nn.Module) -> None: ...

    @classmethod
    def from_native_state(cls, state: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None): ...


ROUTERS: dict[str, type[ExpertRouter]] = {}


def register_router(cls):
    """Class decorator: let native exports of routers of ``cls.kind`` load again (:func:`router_class`)."""
    known = ROUTERS.get(cls.kind)
    reloaded = known is not None and (known.__module__, known.__qualname__) == (cls.__module__, cls.__qualname__)
    if known is not None and not reloaded:
        raise ValueError(f"router kind {cls.kind!r} is taken by {known.__module__}.{known.__qualname__}")
    ROUTERS[cls.kind] = cls
    return cls


def router_class(kind: str) -> type[ExpertRouter]:
    """The router class a native export names by ``kind``."""
    if kind not in ROUTERS:
        raise InputError(
            f"unknown router kind {kind!r}; this process knows {', '.join(sorted(ROUTERS))}. A router defined "
            "outside flexmoe registers itself (flexmoe.core.moe.register_router) when its module is imported: "
            "import it before loading"
        )
    return ROUTERS[kind]


class PerExpertRouter(nn.Module):
    """An :class:`ExpertRouter` whose state is tensors indexed by expert along dim 0.

    ``per_expert`` maps each such attribute (parameter or buffer) to the name of one expert's
    slice in :meth:`expert_state` (a ``[E]`` tensor gives a ``[1]`` slice, ``[E, ...]`` gives
    ``[...]``, as artifacts store them). Opt-out, opt-in and freezing follow from it; a subclass
    supplies ``forward`` (calling :meth:`frozen` on each per-expert tensor it reads),
    :meth:`linear_gate` and :meth:`from_native_state`.
    """

    kind: ClassVar[str]
    per_expert: ClassVar[dict[str, str]] = {}
    returns_gates: ClassVar[bool] = False
    # Appended to the error when :meth:`append_expert` misses part of a new expert's state.
    opt_in_hint: ClassVar[str] = ""

    def __init__(self):
        super().__init__()
        # When set, only these rows (experts) receive gradients; the others are frozen while
        # sharing one tensor with them (an owner trains r_1 but never r_0).
        self.register_buffer("trainable_rows", None, persistent=False)

    @property
    def num_experts(self) -> int:
        return getattr(self, next(iter(self.per_expert))).shape[0]

    def freeze_rows(self, trainable: Sequence[int] | None) -> None:
        """Let only the rows of the ``trainable`` experts learn (``None``: all)."""
        if trainable is None:
            self.trainable_rows = None
            return
        ref = getattr(self, next(iter(self.per_expert)))
        mask = torch.zeros(self.num_experts, dtype=torch.bool, device=ref.device)
        mask[list(trainable)] = True
        self.trainable_rows = mask

    def frozen(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (indexed by expert along dim 0) with the frozen experts' rows detached."""
        if self.trainable_rows is None:
            return t
        m = self.trainable_rows.reshape(-1, *([1] * (t.dim() - 1)))
        return torch.where(m, t, t.detach())

    def expert_state(self, j: int) -> dict[str, torch.Tensor]:
        out = {}
        for attr, key in self.per_expert.items():
            t = getattr(self, attr).detach()
            out[key] = (t[j : j + 1] if t.dim() == 1 else t[j]).clone()
        return out

    def keep_experts(self, keep: Sequence[int]) -> None:
        """Keep the experts ``keep``, in that order (opt-out drops one); freezing is reset."""
        keep = list(keep)
        for attr in self.per_expert:
            self._replace(attr, getattr(self, attr).detach()[keep])
        self.freeze_rows(None)

    def append_expert(self, state: Mapping[str, torch.Tensor]) -> None:
        """Append one expert, given its :meth:`expert_state` (extra entries are ignored). Nothing
        changes if part of it is missing or misshapen."""
        missing = [key for key in self.per_expert.values() if key not in state]
        if missing:
            raise InputError(
                (
                    f"{type(self).__name__} needs {missing} for a new expert, got {sorted(state)}. {self.opt_in_hint}"
                ).strip()
            )
        grown = {}
        for attr, key in self.per_expert.items():
            t, x = getattr(self, attr).detach(), state[key]
            if x.numel() != t[0].numel():
                raise InputError(
                    f"{key} of the new expert has shape {list(x.shape)}, this router's is {list(t.shape[1:])}"
                )
            grown[attr] = torch.cat([t, x.detach().to(t).reshape(1, *t.shape[1:])])
        for attr, t in grown.items():
            self._replace(attr, t)
        self.freeze_rows(None)

    def _replace(self, attr: str, value: torch.Tensor) -> None:
        old = getattr(self, attr)
        if isinstance(old, nn.Parameter):
            value = nn.Parameter(value, requires_grad=old.requires_grad)
        setattr(self, attr, value)

    def linear_gate(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise RouterFormatError(
            f"{type(self).__name__} is not a linear map of one token's hidden state, which is all a FlexOlmo or "
            "Mixtral gate ([E, H] rows, no bias) can hold; export with format='native'"
        )

    def native_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach() for k, v in self.state_dict().items()}

    def attach(self, model: nn.Module) -> None:
        """Nothing to reconnect: this router reads only the token it routes."""


class _ClampedBias(torch.autograd.Function):
    """``min(beta, 0)`` whose gradient does not die above the clamp.

    Owners' biases start at ``beta = 0``, exactly on the clamp's boundary, and AdamW's first step
    moves every parameter by about ``lr`` in the sign of its gradient: a bias pushed up once sits
    at ``beta > 0``, where ``min(beta, 0)`` is flat, and a plain clamp would never let it learn
    again. Forward is the clamp, unchanged (every export and every exactness property keeps it);
    backward passes the gradient where ``beta <= 0`` and, above the clamp, only when descent would
    move ``beta`` back down (a positive gradient), so the bias can return to where it acts. The
    FlexOlmo reference router adds ``torch.minimum(expert_bias, 0)`` to the owners' logits: the same
    forward, with a gradient that is 0 above the clamp (and halved exactly on it).
    """

    @staticmethod
    def forward(ctx, beta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(beta)
        return beta.clamp(max=0.0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (beta,) = ctx.saved_tensors
        return torch.where((beta <= 0) | (grad > 0), grad, torch.zeros_like(grad))


def clamped_bias(beta: torch.Tensor) -> torch.Tensor:
    """Owners' effective biases from the raw ``beta`` ``[E]``: ``min(beta_j, 0)`` for ``j >= 1`` and
    exactly 0 for the public expert (index 0), in float32, differentiable as
    :class:`_ClampedBias` explains."""
    b = _ClampedBias.apply(beta.float())
    # Multiply rather than assign so the graph stays differentiable for owners.
    mask = torch.ones_like(b)
    mask[0] = 0.0
    return b * mask


@register_router
class Router(PerExpertRouter):
    """Linear router with one embedding row and one clamped bias per expert.

    ``weight`` is ``[E, H]`` (row ``j`` is ``r_j``); ``bias`` holds the raw ``beta_j``.
    The effective bias is ``min(beta_j, 0)`` for owners and exactly 0 for the public
    expert (index 0), whatever ``bias[0]`` holds.
    """

    kind = "clamped"
    per_expert = {"weight": "router.embedding", "bias": "router.bias"}

    def __init__(self, hidden_size: int, num_experts: int, *, dtype=None, device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden_size, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32, device=device))

    @classmethod
    def from_rows(cls, weight: torch.Tensor, bias: torch.Tensor, *, dtype: torch.dtype | None = None):
        """A router holding copies of ``weight`` ``[E, H]`` (in ``dtype``, default its own) and the raw
        biases ``bias`` ``[E]`` (float32)."""
        router = cls(weight.shape[1], weight.shape[0], dtype=dtype or weight.dtype, device=weight.device)
        with torch.no_grad():
            router.weight.copy_(weight)
            router.bias.copy_(bias)
        return router

    @classmethod
    def from_native_state(cls, state: Mapping[str, torch.Tensor], *, dtype: torch.dtype | None = None):
        return cls.from_rows(state["weight"], state["bias"], dtype=dtype)

    def effective_bias(self) -> torch.Tensor:
        return clamped_bias(self.bias)

    def linear_gate(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight.detach(), self.effective_bias().detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Float32 router logits ``[T, E]`` for ``x`` of shape ``[T, H]``."""
        return F.linear(x.float(), self.frozen(self.weight.float())) + self.frozen(self.effective_bias())


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
    in place): the same numbers as the module's forward, in less time on CPU, where the
    temporaries' allocations cost page faults (docs/performance.md). Inference only: autograd
    needs them."""
    a = F.linear(x, expert.gate_proj.weight)
    F.silu(a, inplace=True)
    a.mul_(F.linear(x, expert.up_proj.weight))
    return F.linear(a, expert.down_proj.weight)


class MoEBlock(nn.Module):
    """A drop-in replacement for a decoder layer's MLP: ``[B, S, H] -> [B, S, H]``."""

    def __init__(self, experts: Sequence[nn.Module], router: ExpertRouter, settings: MoESettings):
        super().__init__()
        if len(experts) != router.num_experts:
            raise ValueError(f"{len(experts)} experts but the router routes to {router.num_experts}")
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
        """Return ``(logits [T,E] float32, weights [T,k] float32, indices [T,k])``; for a router
        that returns gates, ``logits`` are their logarithms (what the router recording holds)."""
        if self.router.returns_gates:
            probs = self.router(h)
            logits = probs.log()
        else:
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
        experts with no tokens never run. A loop of plain matmuls rather than
        ``torch._grouped_mm``, which was slower on CPU; ``benchmarks/moe_inference.py`` compares
        this path with ``transformers``' own (docs/performance.md).
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
    return torch.stack([torch.logsumexp(layer.float(), dim=-1).pow(2).mean() for layer in logits]).mean()


def load_balancing_loss(logits: Sequence[torch.Tensor] | torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-Transformer load-balancing loss (Fedus et al., 2021, eq. 4), top-k form:
    ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of routing slots given to expert ``e``
    and ``P_e`` its mean router probability; 1.0 when perfectly balanced. Averaged over layers."""
    if isinstance(logits, torch.Tensor):
        logits = [logits]
    if not logits:
        raise ValueError("no router logits recorded; run a forward pass inside record_router_logits()")
    losses = []
    for layer in logits:
        num_experts = layer.shape[-1]
        probs = torch.softmax(layer.float(), dim=-1)
        chosen = torch.topk(probs, min(top_k, num_experts), dim=-1).indices
        f = torch.bincount(chosen.reshape(-1), minlength=num_experts).float() / chosen.numel()
        losses.append(num_experts * (f * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


@register_router
class AffineRouter(Router):
    """A :class:`Router` whose biases are used as they are: no ``min(beta, 0)`` clamp, and the
    public expert's bias is free too. ``logits_j = r_j . x + b_j``."""

    kind = "affine"

    def effective_bias(self) -> torch.Tensor:
        return self.bias.float()
