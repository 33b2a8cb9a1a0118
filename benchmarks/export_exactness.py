"""How exact the transformers exports are: max |logit difference| between flexmoe and
`AutoModelForCausalLM.from_pretrained(export)` for 1/3/7 owners x top-k 1/2/all (float32).

Run from the repository root: `.venv/bin/python benchmarks/export_exactness.py`.
"""

import itertools
import logging
import tempfile

import torch
from transformers import AutoModelForCausalLM

import flexmoe
from flexmoe.core.surgery import moe_blocks
from flexmoe.testing import perturb_, tiny_model

logging.disable(logging.WARNING)
ids = torch.randint(3, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def merged(arch, owners, normalize):
    arts = []
    for i in range(owners):
        m = flexmoe.upcycle(tiny_model(arch), num_experts=1, owners=[f"o{i}"])
        for b in moe_blocks(m):
            perturb_(b.experts[1], seed=10 + i, scale=0.2)
            b.router.weight.data[1].normal_(generator=torch.Generator().manual_seed(i))
        arts.append(flexmoe.ExpertArtifact.from_model(m, owner=f"o{i}"))
    return flexmoe.assemble(tiny_model(arch), arts, normalize=normalize)


worst = {}
for fmt, arch in [("flexolmo", "olmo2"), ("mixtral", "llama"), ("mixtral", "mistral")]:
    for owners, k in itertools.product([1, 3, 7], [1, 2, None]):
        E = owners + 1
        if k is not None and k > E:
            continue
        norm = fmt == "mixtral" and k is not None and k < E
        m = merged(arch, owners, norm)
        flexmoe.set_top_k(m, k)
        with torch.no_grad():
            ref = m(ids).logits
        d = tempfile.mkdtemp() + "/x"
        flexmoe.export(m, d, format=fmt)
        with torch.no_grad():
            got = AutoModelForCausalLM.from_pretrained(d)(ids).logits
        diff = (got - ref).abs().max().item()
        worst[(fmt, arch)] = max(worst.get((fmt, arch), 0), diff)
        print(fmt, arch, owners, k, f"{diff:.2e}")
print("WORST", worst)
