"""Finding the flexmoe model inside a user's LightningModule."""

from __future__ import annotations

from torch import nn

from flexmoe.core.surgery import is_moe


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
