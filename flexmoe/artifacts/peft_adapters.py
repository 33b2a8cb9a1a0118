"""A LoRA adapter as plain factors: per module ``(A, B, scaling)``, read from ``peft`` models.

LoRA (Hu et al., 2021, eq. 3) adds ``scaling * B A x`` to a frozen linear layer ``W x``, with
``A`` ``[r, in]``, ``B`` ``[out, r]`` and ``scaling = alpha / r`` (``alpha / sqrt(r)`` for rsLoRA).
LoraHub and PHATGOOSE both work on these factors directly, so this module turns a ``peft`` model
into ``{module name: LoraFactors}``, named as in the plain ``transformers`` model (no
``base_model.model.`` prefix), and checks that a model holds only what they can combine: vanilla
LoRA (no DoRA or other variants) on ``nn.Linear`` layers, not merged into the base weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_PICKLED_WEIGHTS = "adapter_model.bin"


@dataclass
class LoraFactors:
    """One module's LoRA update ``scaling * B @ A`` (``A`` ``[r, in]``, ``B`` ``[out, r]``)."""

    A: torch.Tensor
    B: torch.Tensor
    scaling: float

    def __post_init__(self):
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[1]:
            raise ValueError(
                f"LoRA factors need A [r, in] and B [out, r] with the same r, got A {list(self.A.shape)}, "
                f"B {list(self.B.shape)}"
            )

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        """``scaling * B @ A`` ``[out, in]``, computed in float32."""
        return self.scaling * (self.B.float() @ self.A.float())


def inner_model(model: nn.Module) -> nn.Module:
    """The ``transformers`` model under a ``peft.PeftModel`` (the model itself otherwise)."""
    from peft import PeftModel  # deferred: peft is an optional extra (flexmoe[lora])

    return model.base_model.model if isinstance(model, PeftModel) else model


def lora_layers(model: nn.Module, adapter: str | None = None) -> Iterator[tuple[str, nn.Module, str]]:
    """``(module name, peft LoRA layer, adapter name)`` for every LoRA layer holding ``adapter``
    (default: the model's single active adapter), named as in the plain ``transformers`` model.

    Raises ``ValueError`` for what LoraHub and PHATGOOSE cannot use: no LoRA layers, several active
    adapters with none chosen, non-``Linear`` LoRA layers, LoRA variants (DoRA, ...), merged layers.
    """
    from peft.tuners.lora import LoraLayer  # deferred: peft is an optional extra (flexmoe[lora])

    root = inner_model(model)
    adapter = adapter or active_adapter(model)
    found = False
    for name, module in root.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        found = True
        where = f"LoRA layer {name!r} (adapter {adapter!r})"
        if not isinstance(module.get_base_layer(), nn.Linear):
            raise TypeError(f"{where} wraps a {type(module.get_base_layer()).__name__}; only nn.Linear is supported")
        if adapter in getattr(module, "lora_variant", {}):
            raise ValueError(f"{where} is a LoRA variant (e.g. DoRA); only vanilla LoRA is supported")
        if module.merged:
            raise ValueError(f"{where} is merged into the base weights; call unmerge_adapter() first")
        yield name, module, adapter
    if not found:
        raise ValueError(f"the model has no LoRA layers for adapter {adapter!r}; wrap it with peft first")


def active_adapter(model: nn.Module) -> str:
    """The one active adapter of a ``peft`` model (error if there are several or none)."""
    active = getattr(model, "active_adapters", None)
    # A PeftModel has a list here; a transformers model has a method of its own adapter integration.
    if active is None or callable(active):
        from peft.tuners.lora import LoraLayer  # deferred: peft is an optional extra (flexmoe[lora])

        layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        active = layers[0].active_adapters if layers else []
    active = list(active)
    if len(active) != 1:
        raise ValueError(f"the model has active adapters {active}; name the one to use with adapter=...")
    return active[0]


def lora_factors(model: nn.Module, adapter: str | None = None) -> dict[str, LoraFactors]:
    """``{module name: LoraFactors}`` of one adapter of a ``peft`` model (detached copies)."""
    return {
        name: LoraFactors(
            A=m.lora_A[a].weight.detach().clone(), B=m.lora_B[a].weight.detach().clone(), scaling=float(m.scaling[a])
        )
        for name, m, a in lora_layers(model, adapter)
    }


def check_peft_dir(path: str | os.PathLike) -> Path:
    """A saved ``peft`` adapter directory whose weights are safetensors (never a pickle)."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{path} is not a saved peft adapter (no adapter_config.json)")
    if not (path / PEFT_WEIGHTS).is_file():
        pickled = (path / PEFT_PICKLED_WEIGHTS).exists()
        found = " (only a pickled adapter_model.bin, which flexmoe never loads)" if pickled else ""
        raise FileNotFoundError(
            f"{path} has no {PEFT_WEIGHTS}{found}; save the adapter with save_pretrained(safe_serialization=True)"
        )
    return path
