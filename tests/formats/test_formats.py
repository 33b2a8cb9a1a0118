"""Exports to FlexOlmo / Mixtral / native, imports back, and streaming assembly (flexmoe.formats.export).

The property docs/design.md promises: an export reloads with the same logits (float32, max abs
difference <= 1e-4), and anything a format cannot express is refused, not silently dropped.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    FlexOlmoConfig,
    FlexOlmoForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
)

import flexmoe
from flexmoe.core.surgery import decoder_layers, moe_blocks, settings
from flexmoe.formats import export as hf
from flexmoe.testing import perturb_, tiny_config, tiny_model

TOL = 1e-4


def make_moe(arch="olmo2", owners=3, top_k=None, *, normalize=False, biases=False, seed=0, **overrides):
    """A tiny MoE whose experts differ and whose routing is far from uniform."""
    model = flexmoe.upcycle(tiny_model(arch, seed=seed, **overrides), owners, top_k=top_k, normalize=normalize)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for L, block in enumerate(moe_blocks(model)):
            for j in range(1, owners + 1):
                perturb_(block.experts[j], seed=1000 * seed + 10 * L + j)
            block.router.weight.copy_(torch.randn(block.router.weight.shape, generator=g))
            if biases:
                block.router.bias.copy_(-torch.rand(owners + 1, generator=g) - 0.5)
    return model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def max_diff(a, b) -> float:
    return float((a - b).abs().max())


def tensors(directory) -> dict[str, torch.Tensor]:
    index = json.loads((directory / hf.INDEX).read_text())["weight_map"]
    out = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(directory / shard), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not iterable)
    assert set(out) == set(index)
    return out


# -- exports reload in transformers with the same logits ----------------------------------------


@pytest.mark.parametrize("top_k", [1, 2, None], ids=["top1", "top2", "all"])
@pytest.mark.parametrize("owners", [1, 3, 7])
def test_flexolmo_export_reproduces_logits(tmp_path, ids, owners, top_k):
    model = make_moe("olmo2", owners, top_k)
    out = flexmoe.export(model, tmp_path / "flex", "flexolmo")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded, FlexOlmoForCausalLM)
    assert loaded.config.num_experts == owners + 1
    assert max_diff(logits(loaded, ids), logits(model, ids)) <= TOL


@pytest.mark.parametrize("top_k", [1, 2, None], ids=["top1", "top2", "all"])
@pytest.mark.parametrize("owners", [1, 3, 7])
@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_mixtral_export_reproduces_logits(tmp_path, ids, arch, owners, top_k):
    # Mixtral renormalises top-k: exact for normalize=True, or for top-k = all without it.
    # A sliding window shorter than `ids` makes forgetting to copy it visible.
    overrides = {"sliding_window": 5} if arch == "mistral" else {}
    model = make_moe(arch, owners, top_k, normalize=top_k is not None, **overrides)
    out = flexmoe.export(model, tmp_path / "mix", "mixtral")
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(loaded, MixtralForCausalLM)
    assert loaded.config.sliding_window == overrides.get("sliding_window")
    assert max_diff(logits(loaded, ids), logits(model, ids)) <= TOL


def test_exported_config_copies_fields_whose_defaults_differ(tmp_path):
    # OLMo-2 rms_norm_eps 1e-5 vs FlexOlmo 1e-6; FlexOlmo's default RoPE theta 5e5;
    # Llama rms_norm_eps 1e-6 vs Mixtral 1e-5; Llama has no sliding window.
    olmo = make_moe("olmo2", 1, rope_parameters={"rope_type": "default", "rope_theta": 1234.0})
    flex = json.loads((flexmoe.export(olmo, tmp_path / "f", "flexolmo") / "config.json").read_text())
    assert flex["rms_norm_eps"] == 1e-5 and flex["rope_parameters"]["rope_theta"] == 1234.0
    assert flex["norm_topk_prob"] is False and flex["num_experts_per_tok"] == 2

    llama = make_moe("llama", 1, tie_word_embeddings=True, max_position_embeddings=48)
    mix = json.loads((flexmoe.export(llama, tmp_path / "m", "mixtral") / "config.json").read_text())
    assert mix["rms_norm_eps"] == 1e-6 and mix["sliding_window"] is None
    assert mix["tie_word_embeddings"] is True and mix["max_position_embeddings"] == 48
    assert (mix["bos_token_id"], mix["eos_token_id"], mix["pad_token_id"]) == (1, 2, 0)


def test_tied_embeddings_export_reproduces_logits(tmp_path, ids):
    model = make_moe("llama", 2, 2, normalize=True, tie_word_embeddings=True)
    loaded = AutoModelForCausalLM.from_pretrained(flexmoe.export(model, tmp_path / "m", "mixtral"))
    assert max_diff(logits(loaded, ids), logits(model, ids)) <= TOL
    native = flexmoe.load(flexmoe.export(model, tmp_path / "n", "native"))
    assert native.lm_head.weight is native.model.embed_tokens.weight
    assert max_diff(logits(native, ids), logits(model, ids)) == 0.0


def test_shards_hold_one_expert_each(tmp_path):
    out = flexmoe.export(make_moe("olmo2", 3), tmp_path / "f", "flexolmo")
    index = json.loads((out / hf.INDEX).read_text())
    by_shard: dict[str, set[str]] = {}
    for key, shard in index["weight_map"].items():
        by_shard.setdefault(shard, set()).add(key)
    assert len(by_shard) == 4
    first, *rest = sorted(by_shard)
    assert all(".experts.0." in k or ".experts." not in k for k in by_shard[first])
    assert any(k.endswith("mlp.gate.weight") for k in by_shard[first])
    for j, shard in enumerate(rest, start=1):
        assert by_shard[shard] and all(f".experts.{j}." in k for k in by_shard[shard])
    total = sum(t.numel() * t.element_size() for t in tensors(out).values())
    assert index["metadata"]["total_size"] == total


# -- native -----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["olmo2", "llama", "mistral", "qwen2", "qwen3"])
def test_native_round_trip(tmp_path, ids, arch):
    model = make_moe(arch, 3, 2, biases=True)  # native keeps what HF formats cannot: biases
    model.generation_config.max_new_tokens = 7
    loaded = flexmoe.load(flexmoe.export(model, tmp_path / "n", "native"))
    assert type(loaded) is type(model)
    assert settings(loaded) == settings(model)
    for a, b in zip(moe_blocks(loaded), moe_blocks(model)):
        assert torch.equal(a.router.bias, b.router.bias)
    assert max_diff(logits(loaded, ids), logits(model, ids)) == 0.0
    assert loaded.generation_config.max_new_tokens == 7
    assert flexmoe.fingerprint(loaded) == flexmoe.fingerprint(model)


def test_native_dir_is_not_mistaken_for_a_dense_model(tmp_path):
    # A config.json would let from_pretrained build the dense base with random MLPs and only
    # warn; the native format has none, so transformers refuses the directory outright.
    out = flexmoe.export(make_moe("llama", 2), tmp_path / "n", "native")
    assert not (out / "config.json").exists()
    with pytest.raises((OSError, ValueError), match="config.json"):
        AutoModelForCausalLM.from_pretrained(out)


def test_auto_format_picks_the_exact_one(tmp_path):
    def written(model, name):
        return json.loads((flexmoe.export(model, tmp_path / name, "auto") / hf.FLEXMOE_CONFIG).read_text())["format"]

    assert written(make_moe("olmo2", 1), "a") == "flexolmo"
    assert written(make_moe("olmo2", 1, biases=True), "b") == "native"
    assert written(make_moe("llama", 2, 1, normalize=True), "c") == "mixtral"
    assert written(make_moe("llama", 2, 1, normalize=False), "d") == "native"
    assert written(make_moe("llama", 2, attention_bias=True), "e") == "native"
    assert written(make_moe("qwen3", 1), "f") == "native"


# -- refusals ---------------------------------------------------------------------------------


def test_router_biases_need_the_flag(tmp_path, ids):
    model = make_moe("olmo2", 3, 2, biases=True)
    with pytest.raises(ValueError, match=r"allow_approximate.*") as err:
        flexmoe.export(model, tmp_path / "f", "flexolmo")
    assert "bias" in str(err.value) and "max |" in str(err.value)
    assert not (tmp_path / "f").exists()

    out = flexmoe.export(model, tmp_path / "f", "flexolmo", allow_approximate=True)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert max_diff(logits(loaded, ids), logits(model, ids)) > 1e-3
    with torch.no_grad():  # what was written is the model with its biases dropped
        for block in moe_blocks(model):
            block.router.bias.zero_()
    assert max_diff(logits(loaded, ids), logits(model, ids)) <= TOL


def test_mixtral_refuses_missing_renormalisation(tmp_path, ids):
    model = make_moe("llama", 3, 2, normalize=False)
    with pytest.raises(ValueError, match="renormalises") as err:
        flexmoe.export(model, tmp_path / "m", "mixtral")
    assert "allow_approximate" in str(err.value) and "logit difference" in str(err.value)

    out = flexmoe.export(model, tmp_path / "m", "mixtral", allow_approximate=True)
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert max_diff(logits(loaded, ids), logits(model, ids)) > 1e-3
    settings(model).normalize = True  # what Mixtral computes instead
    assert max_diff(logits(loaded, ids), logits(model, ids)) <= TOL


@pytest.mark.parametrize(
    ("arch", "fmt"), [("qwen2", "flexolmo"), ("qwen3", "mixtral"), ("olmo2", "mixtral"), ("llama", "flexolmo")]
)
def test_formats_refuse_other_bases(tmp_path, arch, fmt):
    with pytest.raises(ValueError, match="supported for.*native"):
        flexmoe.export(make_moe(arch, 1), tmp_path / "x", fmt, allow_approximate=True)


@pytest.mark.parametrize("field", ["attention_bias", "mlp_bias"])
def test_mixtral_refuses_llama_biases_even_when_approximate(tmp_path, field):
    model = make_moe("llama", 1, **{field: True})
    with pytest.raises(ValueError, match=field):
        flexmoe.export(model, tmp_path / "m", "mixtral", allow_approximate=True)
    assert not (tmp_path / "m").exists()


def test_export_refuses_a_non_empty_directory(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        flexmoe.export(make_moe("llama", 1), tmp_path / "m", "native")
    assert (tmp_path / "m" / "keep.txt").read_text() == "mine"


def test_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_save(tensors, filename, metadata=metadata)

    real_save = hf.save_file
    monkeypatch.setattr(hf, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        flexmoe.export(make_moe("olmo2", 3), tmp_path / "f", "flexolmo")
    assert list(tmp_path.iterdir()) == []


# -- import -----------------------------------------------------------------------------------


def genuine_hf_moe(kind: str, num_experts=4, top_k=2, sliding_window=None):
    """A transformers FlexOlmo / Mixtral model with random weights and a non-trivial router."""
    base = tiny_config("olmo2").to_dict()
    kw = {
        k: base[k]
        for k in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
            "bos_token_id",
            "eos_token_id",
            "pad_token_id",
        )
    }
    torch.manual_seed(3)
    if kind == "flex_olmo":
        model = FlexOlmoForCausalLM(FlexOlmoConfig(num_experts=num_experts, num_experts_per_tok=top_k, **kw))
    else:
        config = MixtralConfig(
            num_local_experts=num_experts, num_experts_per_tok=top_k, sliding_window=sliding_window, **kw
        )
        model = MixtralForCausalLM(config)
    with torch.no_grad():
        for layer in decoder_layers(model):
            layer.mlp.gate.weight.normal_(0, 1.0)
            layer.mlp.experts.gate_up_proj.normal_(0, 0.1)
            layer.mlp.experts.down_proj.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize(
    ("kind", "window", "base"), [("flex_olmo", None, "olmo2"), ("mixtral", None, "llama"), ("mixtral", 5, "mistral")]
)
def test_import_hf_checkpoint(tmp_path, ids, kind, window, base):
    reference = genuine_hf_moe(kind, sliding_window=window)
    reference.save_pretrained(tmp_path / "hf")
    model = flexmoe.load(tmp_path / "hf")
    assert model.config.model_type == base
    s = settings(model)
    assert s.owners == ["public", "expert_1", "expert_2", "expert_3"] and s.top_k == 2
    assert s.normalize == (kind == "mixtral")
    expected = logits(reference, ids)
    assert max_diff(logits(model, ids), expected) <= TOL

    # generate() works and agrees with transformers' own model
    prompt = ids[:1, :5]
    assert torch.equal(
        model.generate(prompt, max_new_tokens=6, do_sample=False),
        reference.generate(prompt, max_new_tokens=6, do_sample=False),
    )

    # re-export reproduces the original checkpoint's logits
    fmt = "flexolmo" if kind == "flex_olmo" else "mixtral"
    again = AutoModelForCausalLM.from_pretrained(flexmoe.export(model, tmp_path / "again", fmt))
    assert max_diff(logits(again, ids), expected) <= TOL

    # opt-out then opt-in the same expert again: nobody else changes, so neither do the logits
    artifact = flexmoe.ExpertArtifact.from_model(model, owner="expert_2", expert="expert_2")
    flexmoe.opt_out(model, "expert_2")
    assert settings(model).num_experts == 3
    assert max_diff(logits(model, ids), expected) > 1e-3
    flexmoe.add_expert(model, artifact)
    assert settings(model).owners[-1] == "expert_2"
    assert max_diff(logits(model, ids), expected) <= TOL


def test_import_keeps_owner_names_of_a_flexmoe_export(tmp_path, ids):
    model = make_moe("olmo2", 2, 2)
    settings(model).owners[1:] = ["clinic", "court"]
    loaded = flexmoe.load(flexmoe.export(model, tmp_path / "f", "flexolmo"))
    assert settings(loaded).owners == ["public", "clinic", "court"]
    flexmoe.opt_out(loaded, "court")
    flexmoe.opt_out(model, "court")
    assert max_diff(logits(loaded, ids), logits(model, ids)) <= TOL


def test_load_returns_dense_models_as_they_are(tmp_path, ids):
    dense = tiny_model("qwen2")
    dense.save_pretrained(tmp_path / "d")
    loaded = flexmoe.load(tmp_path / "d")
    assert not flexmoe.is_moe(loaded)
    assert max_diff(logits(loaded, ids), logits(dense, ids)) == 0.0


# -- streaming assembly -----------------------------------------------------------------------


def owner_artifacts(public_dir, arch, n, tmp_path, *, biases=True):
    paths = []
    for i in range(n):
        model = flexmoe.upcycle(AutoModelForCausalLM.from_pretrained(public_dir), 1)
        block_gen = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for block in moe_blocks(model):
                perturb_(block.experts[1], seed=200 + i)
                block.router.weight[1] = torch.randn(block.router.weight.shape[1], generator=block_gen)
                block.router.bias[1] = -float(torch.rand(1, generator=block_gen)) if biases else 0.0
        art = flexmoe.ExpertArtifact.from_model(model, owner=f"owner_{i}", spec_sha256="spec")
        paths.append(art.save(tmp_path / f"owner_{i}.safetensors"))
    return paths


@pytest.mark.parametrize(("arch", "fmt"), [("llama", "native"), ("olmo2", "flexolmo"), ("mistral", "mixtral")])
def test_assemble_to_dir_matches_in_memory_assembly(tmp_path, ids, arch, fmt):
    tiny_model(arch).save_pretrained(tmp_path / "public")
    (tmp_path / "public" / "tokenizer_config.json").write_text("{}")
    paths = owner_artifacts(tmp_path / "public", arch, 3, tmp_path, biases=fmt == "native")
    normalize = fmt == "mixtral"

    streamed = flexmoe.assemble_to_dir(
        tmp_path / "public", paths, tmp_path / "streamed", format=fmt, top_k=2, normalize=normalize, spec_sha256="spec"
    )
    merged = flexmoe.assemble(AutoModelForCausalLM.from_pretrained(tmp_path / "public"), paths, 2, normalize=normalize)
    in_memory = flexmoe.export(merged, tmp_path / "in_memory", fmt)

    a, b = tensors(streamed), tensors(in_memory)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((streamed / hf.INDEX).read_text()) == json.loads((in_memory / hf.INDEX).read_text())
    config = "base_config.json" if fmt == "native" else "config.json"
    assert (streamed / config).read_text() == (in_memory / config).read_text()
    assert (streamed / "tokenizer_config.json").exists()
    reopened = flexmoe.load(streamed)
    assert settings(reopened).owners == ["public", "owner_0", "owner_1", "owner_2"]
    assert max_diff(logits(reopened, ids), logits(merged, ids)) <= TOL


def test_assemble_to_dir_auto_falls_back_to_native_for_biases(tmp_path):
    tiny_model("olmo2").save_pretrained(tmp_path / "public")
    paths = owner_artifacts(tmp_path / "public", "olmo2", 1, tmp_path, biases=True)
    out = flexmoe.assemble_to_dir(tmp_path / "public", paths, tmp_path / "out", format="auto")
    assert json.loads((out / hf.FLEXMOE_CONFIG).read_text())["format"] == "native"
    with pytest.raises(ValueError, match="allow_approximate"):
        flexmoe.assemble_to_dir(tmp_path / "public", paths, tmp_path / "out2", format="flexolmo")


def test_assemble_to_dir_rejects_bad_artifacts(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "public")
    tiny_model("llama", seed=1).save_pretrained(tmp_path / "other_public")
    good = owner_artifacts(tmp_path / "public", "llama", 1, tmp_path)
    (tmp_path / "foreign").mkdir()
    foreign = owner_artifacts(tmp_path / "other_public", "llama", 1, tmp_path / "foreign")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(good[0].read_bytes()[:-10])

    with pytest.raises(flexmoe.ArtifactError, match="fingerprint"):
        flexmoe.assemble_to_dir(tmp_path / "public", good + foreign, tmp_path / "out")
    with pytest.raises(flexmoe.ArtifactError, match="truncated"):
        flexmoe.assemble_to_dir(tmp_path / "public", [truncated], tmp_path / "out")
    with pytest.raises(flexmoe.ArtifactError, match="spec_sha256"):
        flexmoe.assemble_to_dir(tmp_path / "public", good, tmp_path / "out", spec_sha256="another spec")
    assert not (tmp_path / "out").exists()

    # Found only when the artifact is streamed, after other shards were written: nothing is left.
    broken = flexmoe.ExpertArtifact.load(good[0])
    next(t for k, t in broken.tensors.items() if "expert" in k)[0, 0] = float("nan")
    broken.owner = broken.metadata["owner"] = "broken"
    nan = broken.save(tmp_path / "nan.safetensors")
    with pytest.raises(flexmoe.ArtifactError, match="NaN"):
        flexmoe.assemble_to_dir(tmp_path / "public", good + [nan], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


@pytest.mark.parametrize("fmt", ["native", "flexolmo"])
def test_exports_carry_the_tokenizer(tmp_path, public_dir, fmt):
    from transformers import AutoTokenizer

    public = AutoTokenizer.from_pretrained(public_dir)
    text = "Permission is hereby granted, free of charge"
    streamed = flexmoe.assemble_to_dir(public_dir, [], tmp_path / "streamed", format=fmt)
    assert AutoTokenizer.from_pretrained(streamed)(text).input_ids == public(text).input_ids
    model = flexmoe.upcycle(AutoModelForCausalLM.from_pretrained(public_dir), 1)
    exported = flexmoe.export(model, tmp_path / "exported", fmt, tokenizer=public)
    assert AutoTokenizer.from_pretrained(exported)(text).input_ids == public(text).input_ids
