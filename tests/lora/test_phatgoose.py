"""PHATGOOSE (Muqeeth et al., 2024): sigmoid gates trained on frozen LoRA adapters, then per-token,
per-module top-k routing among the adapters.

Two real LoRA adapters on two clearly different domains (English licence texts; Unicode character
tables) are trained on a tiny OLMo-2 model, then gated and routed. The adapters sit on the output
projection: in a 2-layer, 32-wide model, gates of adapters spread over every linear layer were
measured near chance (docs/lora.md), while the output projection's input separates the domains."""

import copy
import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexmoe import ArtifactError
from flexmoe.artifacts.peft_adapters import LoraFactors
from flexmoe.data.corpus import local_corpus
from flexmoe.data.packing import pack_domain
from flexmoe.evaluate import perplexity
from flexmoe.lora import GatedAdapter, Phatgoose, gated, lora_factors, train_gates
from flexmoe.testing import license_texts, tiny_model, train_peft_lora

TARGETS = ["lm_head"]


def train_lora(base, rows, rank=4, steps=40, seed=0, targets=TARGETS):
    return train_peft_lora(base, rows, targets, rank=rank, steps=steps, seed=seed)


@pytest.fixture(scope="module")
def experts(public_dir):
    tokenizer = AutoTokenizer.from_pretrained(public_dir)
    base = AutoModelForCausalLM.from_pretrained(public_dir).eval()
    licenses = license_texts()
    unicode = local_corpus(max_docs_per_domain=12, domains=["unicode_names"])["unicode_names"]
    domains = {"licenses": (licenses[:-3], licenses[-3:]), "unicode": (unicode.train, unicode.val)}
    peft_models, gated_adapters = {}, []
    for name, (train, _) in domains.items():
        rows = pack_domain(train, tokenizer, 32)
        peft_models[name] = train_lora(base, rows)
        gated_adapters.append(train_gates(peft_models[name], rows, steps=100, name=name, progress=False))
    return base, tokenizer, domains, peft_models, gated_adapters


def test_gate_training_leaves_the_lora_and_the_model_as_they_were(experts):
    base, tokenizer, domains, _, _ = experts
    model = train_lora(base, pack_domain(domains["licenses"][0], tokenizer, 32), steps=5)
    before = lora_factors(model)
    ids = pack_domain(domains["licenses"][1], tokenizer, 32)[:2]
    with torch.no_grad():
        want = model(input_ids=ids).logits
    adapter = train_gates(
        model, domains["licenses"][0], tokenizer=tokenizer, seq_len=32, steps=5, name="lic", progress=False
    )
    assert adapter.name == "lic" and set(adapter.gates) == set(before) == {"lm_head"}
    assert adapter.gates["lm_head"].shape == (32,) and adapter.gates["lm_head"].abs().sum() > 0
    for module, f in before.items():  # the LoRA stayed frozen
        assert torch.equal(adapter.modules[module].A, f.A) and torch.equal(adapter.modules[module].B, f.B)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, want)  # hooks gone
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [
        n for n, p in model.named_parameters() if "lora_" in n
    ]  # requires_grad restored


def test_a_gated_module_computes_lora_times_sigmoid_of_v_dot_x(experts):
    base, tokenizer, domains, peft_models, _ = experts
    model = peft_models["licenses"]
    ids = pack_domain(domains["licenses"][1], tokenizer, 32)[:2]
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    f = lora_factors(model)["lm_head"]
    with torch.no_grad():
        h = base.model(input_ids=ids).last_hidden_state  # lm_head's input
        want = base.lm_head(h) + (h @ f.delta().T) * torch.sigmoid(h @ v)[..., None]
        with gated(model, {"lm_head": v}):
            got = model(input_ids=ids).logits
        zero = {"lm_head": torch.zeros(32)}
        with gated(model, zero):  # v = 0 (the initialisation): half the LoRA update
            half = model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(half, base.lm_head(h) + 0.5 * (h @ f.delta().T), atol=1e-5)


def test_routes_in_domain_tokens_mostly_to_the_matching_adapter(experts):
    base, tokenizer, domains, _, gated_adapters = experts
    model = Phatgoose(copy.deepcopy(base), gated_adapters, top_k=2)
    for name, (_, val) in domains.items():
        shares = model.top1_shares(pack_domain(val, tokenizer, 32)[:16])  # held-out documents
        assert shares[name] > 0.65, shares


def test_one_adapter_at_top_1_is_that_adapter_exactly(experts, ids):
    base, tokenizer, _, peft_models, gated_adapters = experts
    ids = ids % len(tokenizer)
    model = Phatgoose(copy.deepcopy(base), gated_adapters[:1], top_k=1)
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, peft_models["licenses"](input_ids=ids).logits, atol=1e-5)


def _standardise(t):
    """LN without learned parameters, written out: zero mean, unit (biased) variance, eps 1e-5."""
    mean = t.mean(-1, keepdim=True)
    return (t - mean) / torch.sqrt(((t - mean) ** 2).mean(-1, keepdim=True) + 1e-5)


def _synthetic_adapters(base, modules_of, ranks, seed=0):
    """Gated adapters with random LoRA factors and gates, adapter j on ``modules_of[j]``."""
    g = torch.Generator().manual_seed(seed)
    adapters = []
    for j, (modules, rank) in enumerate(zip(modules_of, ranks)):
        factors, gates = {}, {}
        for name in modules:
            layer = base.get_submodule(name)
            A = torch.randn(rank, layer.in_features, generator=g) / layer.in_features**0.5
            B = torch.randn(layer.out_features, rank, generator=g) * 0.5
            factors[name] = LoraFactors(A, B, scaling=0.5 + j / 4)
            gates[name] = torch.randn(layer.in_features, generator=g) * 2
        adapters.append(GatedAdapter(f"adapter{j}", factors, gates))
    return adapters


def test_routing_is_the_papers_formula_with_several_adapters_at_top_2(ids):
    """Four adapters (ranks and scalings differ; one of them skips a module), top-2, against the
    formula computed directly with forward hooks on a plain copy of the base model: per token and
    module, ``p = softmax_j(LN(x) . LN(v_j) / sqrt(d))`` over the adapters of that module, the two
    largest kept and renormalised, ``y = W x + sum_{j in top-2} p_j scaling_j B_j A_j x``."""
    base = tiny_model("llama").eval()
    both = ["lm_head", "model.layers.1.self_attn.o_proj"]
    adapters = _synthetic_adapters(base, [both, ["lm_head"], both, both], ranks=[2, 4, 3, 2])
    model = Phatgoose(copy.deepcopy(base), adapters, top_k=2)
    reference = copy.deepcopy(base)
    chosen = []

    def hook(name):
        members = [a for a in adapters if name in a.modules]

        def add_routed_lora(module, args, out):
            x = args[0].float()
            d = x.shape[-1]
            gates = _standardise(torch.stack([a.gates[name] for a in members]))
            p = torch.softmax(_standardise(x) @ gates.T / d**0.5, dim=-1)
            top = p.topk(2, dim=-1)
            chosen.append(top.indices.flatten(0, -2))
            w = torch.zeros_like(p).scatter(-1, top.indices, top.values / top.values.sum(-1, keepdim=True))
            for j, a in enumerate(members):
                out = out + w[..., j, None] * (x @ a.modules[name].delta().T)
            return out

        return add_routed_lora

    for name in both:
        reference.get_submodule(name).register_forward_hook(hook(name))
    with torch.no_grad():
        got, want = model(input_ids=ids).logits, reference(input_ids=ids).logits
        everything = Phatgoose(copy.deepcopy(base), adapters, top_k=4)(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - base(input_ids=ids).logits).abs().max() > 0.1  # the adapters matter
    assert (everything - got).abs().max() > 0.01  # and so does keeping only two of them
    pairs = {tuple(sorted(row.tolist())) for c in chosen for row in c}
    assert len(pairs) >= 3, pairs  # tokens pick different pairs


def test_evaluation_and_generate_work(experts):
    base, tokenizer, domains, _, gated_adapters = experts
    model = Phatgoose(copy.deepcopy(base), gated_adapters, top_k=2)
    held_out = {name: val for name, (_, val) in domains.items()}
    routed = perplexity(model, held_out, tokenizer, seq_len=32, max_tokens=512)["per_domain"]
    public = perplexity(base, held_out, tokenizer, seq_len=32, max_tokens=512)["per_domain"]
    assert all(routed[d] < public[d] for d in held_out), (routed, public)  # routing helps on both domains
    prompt = tokenizer("U+0041", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, prompt["input_ids"].shape[1] + 6)
    model.settings.top_k = 1
    assert perplexity(model, held_out, tokenizer, seq_len=32, max_tokens=512)["per_domain"] != routed


def test_the_base_model_must_be_plain_and_fit_the_adapters(experts):
    base, _, _, peft_models, gated_adapters = experts
    with pytest.raises(ValueError, match="plain base model"):
        Phatgoose(peft_models["licenses"], gated_adapters)
    with pytest.raises(ValueError, match="unique"):
        Phatgoose(copy.deepcopy(base), [gated_adapters[0], gated_adapters[0]])
    other = GatedAdapter(
        "other",
        {"model.layers.9.mlp.up_proj": gated_adapters[0].modules["lm_head"]},
        {"model.layers.9.mlp.up_proj": gated_adapters[0].gates["lm_head"]},
    )
    with pytest.raises(ValueError, match="no module 'model.layers.9.mlp.up_proj'"):
        Phatgoose(copy.deepcopy(base), [other])


def test_gated_adapters_round_trip_and_bad_files_are_refused(experts, tmp_path):
    adapter = experts[4][0]
    path = adapter.save(tmp_path / "lic.safetensors")
    back = GatedAdapter.load(path)
    assert back.name == "licenses" and torch.equal(back.gates["lm_head"], adapter.gates["lm_head"])
    assert torch.equal(back.modules["lm_head"].B, adapter.modules["lm_head"].B)
    assert back.modules["lm_head"].scaling == adapter.modules["lm_head"].scaling

    def rewrite(change, drop=None, metadata=None):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            meta = {**json.loads(f.read(n))["__metadata__"], **(metadata or {})}
        t = {**load_file(str(path)), **change}
        t.pop(drop, None)
        bad = tmp_path / f"bad{len(list(tmp_path.glob('bad*')))}.safetensors"
        save_file(t, str(bad), metadata=meta)
        return bad

    nan = adapter.gates["lm_head"].clone()
    nan[3] = float("nan")
    cases = [
        (rewrite({"lm_head.gate": nan}), "values of lm_head.gate"),
        (rewrite({}, drop="lm_head.gate"), "tensors of module 'lm_head'"),
        (rewrite({"lm_head.gate": torch.zeros(31)}), "gate shape"),
        (rewrite({}, metadata={"format_version": "9"}), "format_version"),
    ]
    for bad, expected in cases:
        with pytest.raises(ArtifactError, match=expected):
            GatedAdapter.load(bad)
