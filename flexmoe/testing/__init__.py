"""What the tests and the benchmarks share: tiny models of every supported architecture, seeded
perturbations standing in for training, local text, small tokenizers and LoRA adapters, and
(:mod:`flexmoe.testing.federation`) real Flower deployments on loopback.

Outside the floors: the library never imports it (an import-linter contract checks that), so
nothing here can leak into what users run.
"""

from __future__ import annotations

import copy
import os

import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Qwen2Config,
    Qwen3Config,
)

from flexmoe.data.tokenizer import train_tokenizer

LICENSES = "/usr/share/common-licenses"


CONFIGS = {
    "olmo2": Olmo2Config,
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}


ARCHS = list(CONFIGS)


VOCAB = 96


def tiny_config(arch: str, **overrides):
    kw = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(overrides)
    return CONFIGS[arch](**kw)


def tiny_model(arch: str = "olmo2", seed: int = 0, **overrides):
    """A randomly initialised causal LM in eval mode, float32."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, **overrides)).eval()


def perturb_(module: torch.nn.Module, seed: int, scale: float = 0.05) -> None:
    """Move every parameter of ``module`` by seeded noise, as a stand-in for training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def license_texts() -> list[str]:
    """Real prose found on every machine of this image: the Debian licence texts."""
    out = []
    for name in sorted(os.listdir(LICENSES)):
        path = os.path.join(LICENSES, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                out.append(f.read())
    return out


def train_peft_lora(base, rows: torch.Tensor, targets, rank: int = 4, steps: int = 40, seed: int = 0):
    """A peft LoRA adapter on a copy of ``base``, trained on packed ``rows`` with plain AdamW (what an
    adapter's author would do); returned in eval mode."""
    from peft import LoraConfig, get_peft_model  # deferred: peft is an optional extra (flexmoe[lora])

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = rows[torch.randint(0, len(rows), (8,), generator=g)]
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def train_tiny_tokenizer(texts, vocab_size: int = VOCAB * 3):
    """A small byte-level BPE tokenizer trained on local text, as a transformers tokenizer."""
    return train_tokenizer(texts, vocab_size=vocab_size, special_tokens=["<pad>", "<bos>", "<eos>"])
