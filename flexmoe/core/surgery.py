"""Model surgery on Hugging Face decoders: dense -> MoE, opt-out, opt-in, top-k, freezing.

Every decoder layer's ``mlp`` becomes a :class:`~flexmoe.core.moe.MoEBlock` whose expert 0 is
the public MLP itself and whose other experts are copies of it (same class). Works for any
``transformers`` causal LM whose decoder layers have an ``mlp`` attribute (OLMo-2, Llama,
Mistral, Qwen2, Qwen3 are tested).

Opt-out, opt-in and freezing speak only the router protocol
(:class:`~flexmoe.core.moe.ExpertRouter`), so they work whatever router each layer holds.
Opt-out and opt-in also keep the model's provenance (:mod:`flexmoe.core.provenance`) in step:
the owner's record goes or comes with its expert, so the model card an export renders from it
always describes the experts the model holds.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from flexmoe.core.hashing import content_sha256, fingerprint
from flexmoe.core.moe import AffineRouter, MoEBlock, MoESettings, Router
from flexmoe.core.parsing import MAX_OWNER_NAME, valid_owner_name
from flexmoe.core.provenance import ExpertProvenance

if TYPE_CHECKING:  # pragma: no cover
    from flexmoe.artifacts.expert import ExpertArtifact

PUBLIC = "public"


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder layers (``model.model.layers`` for the supported families)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) and all(hasattr(layer, "mlp") for layer in layers):
        return layers
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(hasattr(layer, "mlp") for layer in module):
            return module
    raise TypeError(
        f"{type(model).__name__} has no list of decoder layers with an `mlp` attribute; "
        "flexmoe supports decoder-only transformers (OLMo-2, Llama, Mistral, Qwen2, Qwen3, ...)"
    )


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """The MoE block of every decoder layer, in layer order (empty for a dense model)."""
    return [layer.mlp for layer in decoder_layers(model) if isinstance(layer.mlp, MoEBlock)]


def is_moe(model: nn.Module) -> bool:
    return bool(moe_blocks(model))


def settings(model: nn.Module) -> MoESettings:
    """The :class:`MoESettings` shared by the model's MoE blocks."""
    blocks = moe_blocks(model)
    if not blocks:
        raise TypeError(f"{type(model).__name__} is a dense model; call flexmoe.upcycle(model) first")
    return blocks[0].settings


def upcycle(
    model: nn.Module,
    num_experts: int = 1,
    top_k: int | None = None,
    *,
    normalize: bool = False,
    owners: list[str] | None = None,
) -> nn.Module:
    """Turn a dense causal LM into a FlexOlmo MoE, **in place**, and return it.

    Expert 0 is the public MLP (the same module object, so its weights are untouched);
    experts ``1..num_experts`` are deep copies. Router rows start at zero and biases at 0,
    so with ``top_k`` = all experts the model computes exactly what the dense one did.

    Args:
        num_experts: how many owner experts to add next to the public one (0 is allowed).
        top_k: experts per token; ``None`` means all. Changeable later with :func:`set_top_k`.
        normalize: renormalise the top-k weights to sum to 1 (Mixtral); FlexOlmo does not.
        owners: names of the owner experts (default ``expert_1 ...``).
    """
    if is_moe(model):
        raise ValueError("model is already a flexmoe MoE; use add_expert() to append experts")
    if num_experts < 0:
        raise ValueError(f"num_experts must be >= 0, got {num_experts}")
    owners = list(owners) if owners is not None else [f"expert_{i}" for i in range(1, num_experts + 1)]
    if len(owners) != num_experts:
        raise ValueError(f"got {len(owners)} owner names for {num_experts} experts")
    _check_owner_names([PUBLIC, *owners])
    shared = MoESettings(owners=[PUBLIC, *owners], top_k=None, normalize=normalize)
    for layer in decoder_layers(model):
        mlp = layer.mlp
        ref = next(mlp.parameters())
        hidden = model.config.hidden_size
        experts = [mlp] + [copy.deepcopy(mlp) for _ in range(num_experts)]
        router = Router(hidden, num_experts + 1, dtype=ref.dtype, device=ref.device)
        layer.mlp = MoEBlock(experts, router, shared)
    set_top_k(model, top_k)
    return model


def set_top_k(model: nn.Module, top_k: int | None) -> None:
    """Set how many experts each token uses (``None``: all), for every layer at once."""
    s = settings(model)
    if top_k is not None and not 1 <= top_k <= s.num_experts:
        raise ValueError(f"top_k must be between 1 and the number of experts ({s.num_experts}), got {top_k}")
    s.top_k = top_k


def expert_index(model: nn.Module, expert: int | str) -> int:
    """Resolve an expert given by index or owner name."""
    owners = settings(model).owners
    if isinstance(expert, str):
        if expert not in owners:
            raise KeyError(f"no expert owned by {expert!r}; owners are {owners}")
        return owners.index(expert)
    if not 0 <= expert < len(owners):
        raise IndexError(f"expert index {expert} out of range for {len(owners)} experts")
    return expert


def opt_out(model: nn.Module, expert: int | str) -> nn.Module:
    """Remove one owner's expert MLP, router row and bias from every layer (in place).

    FlexOlmo's opt-out (section 3.3): the remaining experts and routers are untouched, so
    with the published and posterior routings the model is exactly what it would have been had
    that owner never joined. The ``lda`` routing's rows were fitted with every owner's statistics
    pooled, so after an opt-out they are the old rows less the leaver's; routing again from the
    remaining owners' statistics gives the merge without it (docs/routing.md). The owner's
    provenance record goes too; the history keeps that it opted out.
    """
    j = expert_index(model, expert)
    if j == 0:
        raise ValueError("the public expert (index 0) anchors the router and cannot be removed")
    s = settings(model)
    for block in moe_blocks(model):
        keep = [i for i in range(block.num_experts) if i != j]
        block.experts = nn.ModuleList([block.experts[i] for i in keep])
        block.router.keep_experts(keep)
    s.provenance.opt_out(s.owners.pop(j))
    if s.top_k is not None and s.top_k > s.num_experts:
        s.top_k = s.num_experts
    return model


def add_expert(model: nn.Module, artifact: ExpertArtifact, *, check_fingerprint: bool = True) -> nn.Module:
    """Append an owner's expert (from an :class:`~flexmoe.ExpertArtifact`) to every layer, in place.

    The artifact is validated against this model first (fingerprint of the public part,
    layer count, tensor names, shapes and dtypes); nobody else is retrained. Each layer's router
    takes the artifact's tensors of that layer other than the expert's
    (:meth:`~flexmoe.core.moe.ExpertRouter.append_expert`); if one refuses, the model is left
    as it was. The model's provenance records the owner, the artifact's content hash and what it
    carried (:class:`~flexmoe.core.provenance.ExpertProvenance`).
    """
    s = settings(model)
    if artifact.owner in s.owners:
        raise ValueError(f"an expert owned by {artifact.owner!r} is already in the model")
    _check_owner_names([*s.owners, artifact.owner])
    artifact.validate(model, fingerprint=fingerprint(model) if check_fingerprint else None)
    # A LoRA-sized expert's materialised artifact names the hash of the file its owner sent.
    sent = getattr(artifact, "sent_content_sha256", None) or content_sha256(artifact.tensors, artifact.metadata)
    record = ExpertProvenance.of(artifact.owner, artifact.metadata, artifact.tensors, sent)
    blocks = moe_blocks(model)
    for L, block in enumerate(blocks):
        try:
            block.router.append_expert(_router_state(artifact, L))
        except Exception:
            for done in blocks[:L]:
                done.router.keep_experts(range(done.num_experts))
            raise
    for L, block in enumerate(blocks):
        expert = copy.deepcopy(block.experts[0])
        expert.load_state_dict(artifact.layer(L)[0])
        block.experts.append(expert)
    s.owners.append(artifact.owner)
    s.provenance.add(record)
    return model


def _router_state(artifact: ExpertArtifact, L: int) -> dict[str, torch.Tensor]:
    """Layer ``L``'s tensors of ``artifact`` other than the expert's, named without ``layers.{L}.``
    (``router.embedding``, ``router.bias``, ``stats.*``), and the artifact's model-wide tensors
    under their own names (``stats.unigram``): what a router may keep per expert."""
    prefix = f"layers.{L}."
    state = {name: t for name, t in artifact.tensors.items() if not name.startswith("layers.")}
    state.update(
        (name[len(prefix) :], t)
        for name, t in artifact.tensors.items()
        if name.startswith(prefix) and not name.startswith(prefix + "expert.")
    )
    return state


def _check_owner_names(owners: list[str]) -> None:
    for o in owners:
        if not valid_owner_name(o):
            raise ValueError(
                f"owner names must be 1 to {MAX_OWNER_NAME} printable characters without '/' or '\\', not '.' or '..', "
                f"without surrounding spaces; got {o!r:.200}"
            )
    if len(set(owners)) != len(owners):
        raise ValueError(f"owner names must be unique, got {owners}")


def use_affine_routers(model: nn.Module) -> nn.Module:
    """Replace every MoE layer's router by an :class:`AffineRouter` computing the same logits
    (its :meth:`~flexmoe.core.moe.ExpertRouter.linear_gate`), in place. Returns ``model``."""
    for block in moe_blocks(model):
        if not isinstance(block.router, AffineRouter):
            block.router = AffineRouter.from_rows(*block.router.linear_gate())
    return model


def freeze_public(model: nn.Module, trainable: tuple[int, ...] = (1,)) -> list[nn.Parameter]:
    """Freeze everything of the public model; leave the experts in ``trainable`` and their
    router rows and biases trainable. Returns the trainable parameters.

    Router rows of frozen experts share one tensor with the trainable rows; the router
    detaches them (:meth:`~flexmoe.core.moe.ExpertRouter.freeze_rows`) and gets no weight decay
    (see :meth:`ExpertModule.configure_optimizers`), so ``r_0`` stays bit-for-bit unchanged.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    trainable_params: list[nn.Parameter] = []
    for block in moe_blocks(model):
        for j in trainable:
            for p in block.experts[j].parameters():
                p.requires_grad_(True)
                trainable_params.append(p)
        block.router.freeze_rows(trainable)
        for p in block.router.parameters():
            p.requires_grad_(True)
            trainable_params.append(p)
    return trainable_params
