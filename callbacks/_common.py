"""Finding the flexmoe model inside a user's LightningModule."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from flexmoe.core.surgery import decoder_layers, is_moe


def find_moe_model(pl_module: nn.Module) -> nn.Module:
    """``pl_module.model`` when it is a flexmoe MoE, else the first submodule that is one."""
    candidate = getattr(pl_module, "model", None)
    if isinstance(candidate, nn.Module) and _safe_is_moe(candidate):
        return candidate
    for module in pl_module.modules():
        if hasattr(module, "config") and _safe_is_moe(module):
            return module
    raise TypeError(
        f"{type(pl_module).__name__} holds no flexmoe MoE model; build one with flexmoe.upcycle() "
        "(ExpertModule does this for you)"
    )


def _safe_is_moe(module: nn.Module) -> bool:
    try:
        return is_moe(module)
    except TypeError:
        return False


def fsdp_root(trainer) -> nn.Module | None:
    """The root FSDP unit when ``trainer`` shards the model with Lightning's ``FSDPStrategy``."""
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = getattr(trainer, "strategy", None)
    return strategy.model if isinstance(strategy, FSDPStrategy) else None


@contextlib.contextmanager
def unsharded(root: nn.Module | None, model: nn.Module | None = None) -> Iterator[None]:
    """Within the block, FSDP-sharded parameters are whole on every rank (a collective: every rank
    must enter), read-only: with ``model``, those of its decoder-layer units, which hold exactly
    what trains (expert 1 and the router: :func:`flexmoe.training.expert.fsdp_units` wraps every
    frozen part of a layer in a unit of its own); without, the root unit's own (embeddings, final
    norm, LM head), so the inner model runs forward while its layer units gather as in training.
    Nothing happens when ``root`` is None (no FSDP)."""
    if root is None:
        yield
        return
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    units = [root] if model is None else [u for u in FSDP.fsdp_modules(root) if u in set(decoder_layers(model))]
    with contextlib.ExitStack() as stack:
        for unit in units:
            stack.enter_context(FSDP.summon_full_params(unit, recurse=False, writeback=False))
        yield
