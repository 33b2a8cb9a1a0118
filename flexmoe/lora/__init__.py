"""Parameter-efficient experts: LoraHub composition, PHATGOOSE routing, LoRA-sized FlexOlmo experts.

Needs the ``lora`` extra (``pip install "flexmoe[lora]"``: ``peft``, and ``nevergrad`` for LoraHub).

- :class:`LoraHub` (Huang et al., 2024): weights for an element-wise sum of LoRA adapters, found
  gradient-free on a few examples of a new task.
- :func:`train_gates` and :class:`Phatgoose` (Muqeeth et al., 2024): per-module sigmoid gates
  trained on frozen LoRA adapters, then per-token, per-module top-2 routing among them.
- :class:`LoraExpertModule` and :class:`LoraExpertArtifact`: an owner trains its FlexOlmo expert
  as a LoRA on the copy of the public MLP and uploads only the factors; the coordinator
  materialises them into an ordinary :class:`~flexmoe.ExpertArtifact`.

A baselines floor, beside :mod:`flexmoe.merge` and independent of it, above training and below
evaluation; the LoRA-sized expert's file and module live on the artifacts and training floors and
are re-exported here. See docs/lora.md.
"""

import importlib

# peft, nevergrad and Lightning are slow to import: each name loads its module on first use.
_LAZY = {
    "LoraFactors": "flexmoe.artifacts.peft_adapters",
    "lora_factors": "flexmoe.artifacts.peft_adapters",
    "LoraHub": "flexmoe.lora.lorahub",
    "LoraHubResult": "flexmoe.lora.lorahub",
    "Candidate": "flexmoe.lora.lorahub",
    "GatedAdapter": "flexmoe.lora.phatgoose",
    "Phatgoose": "flexmoe.lora.phatgoose",
    "PhatgooseLinear": "flexmoe.lora.phatgoose",
    "train_gates": "flexmoe.lora.phatgoose",
    "gated": "flexmoe.lora.phatgoose",
    "LoraExpertArtifact": "flexmoe.artifacts.lora",
    "LORA_FORMAT_VERSION": "flexmoe.artifacts.lora",
    "LoraExpertModule": "flexmoe.training.lora_expert",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flexmoe.lora' has no attribute {name!r}")


__all__ = list(_LAZY)
