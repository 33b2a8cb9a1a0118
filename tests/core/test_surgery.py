"""Model surgery: upcycling is exact, opt-out/opt-in keep the rest intact, generation keeps working."""

import pytest
import torch

import flexmoe
from flexmoe.artifacts.expert import ExpertArtifact
from flexmoe.core.surgery import decoder_layers, moe_blocks, settings
from flexmoe.testing import ARCHS, perturb_, tiny_model


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_identity_upcycle_reproduces_the_dense_model(arch, ids):
    model = tiny_model(arch)
    dense = logits(model, ids)
    mlp_class = type(decoder_layers(model)[0].mlp)
    flexmoe.upcycle(model, num_experts=1, top_k=2)
    assert (logits(model, ids) - dense).abs().max() <= 1e-5
    for block in moe_blocks(model):
        assert [type(e) for e in block.experts] == [mlp_class, mlp_class]
        assert block.router.weight.shape == (2, model.config.hidden_size)


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_and_kv_cache_survive_every_operation(arch, ids):
    model = flexmoe.upcycle(tiny_model(arch), num_experts=2, top_k=2, owners=["a", "b"])
    for block in moe_blocks(model):
        perturb_(block.experts[1], seed=1)
        perturb_(block.experts[2], seed=2)
        torch.nn.init.normal_(block.router.weight, std=1.0)
    donor = flexmoe.upcycle(tiny_model(arch), num_experts=1, owners=["c"])
    for block in moe_blocks(donor):
        perturb_(block.experts[1], seed=3)
    artifact = ExpertArtifact.from_model(donor, owner="c")

    def check():
        prompt = ids[:1, :5]
        cached = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False)
        assert cached.shape == (1, 11) and torch.equal(cached, uncached)

    check()
    flexmoe.opt_out(model, "a")
    check()
    flexmoe.add_expert(model, artifact)
    check()
    flexmoe.set_top_k(model, 1)
    check()


def test_opt_out_equals_never_having_joined(ids):
    public = tiny_model("olmo2")
    owners = []
    for seed, name in [(1, "a"), (2, "b"), (3, "c")]:
        m = flexmoe.upcycle(tiny_model("olmo2"), num_experts=1, owners=[name])
        for block in moe_blocks(m):
            perturb_(block.experts[1], seed=seed)
            # Each owner's own row; r_0 stays the shared public row every owner trains against.
            block.router.weight.data[1].normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed))
            block.router.bias.data[1] = -0.3 * seed
        owners.append(ExpertArtifact.from_model(m, owner=name))
    merged = flexmoe.assemble(public, owners, top_k=2)
    without_b = flexmoe.assemble(tiny_model("olmo2"), [owners[0], owners[2]], top_k=2)
    before = logits(merged, ids)
    flexmoe.opt_out(merged, "b")
    assert settings(merged).owners == ["public", "a", "c"]
    assert torch.equal(logits(merged, ids), logits(without_b, ids))
    assert not torch.allclose(before, logits(merged, ids))


def test_add_expert_round_trips_an_extracted_expert(ids):
    trained = flexmoe.upcycle(tiny_model("llama"), num_experts=1, owners=["a"])
    for block in moe_blocks(trained):
        perturb_(block.experts[1], seed=7)
        block.router.weight.data[1].normal_()
        block.router.bias.data[1] = -0.5
    artifact = ExpertArtifact.from_model(trained, owner="a")
    rebuilt = flexmoe.upcycle(tiny_model("llama"), num_experts=0)
    flexmoe.add_expert(rebuilt, artifact)
    assert torch.equal(logits(rebuilt, ids), logits(trained, ids))


def test_public_expert_cannot_be_removed_and_names_resolve():
    model = flexmoe.upcycle(tiny_model(), num_experts=2, owners=["a", "b"])
    with pytest.raises(ValueError, match="public"):
        flexmoe.opt_out(model, 0)
    with pytest.raises(KeyError, match="nobody"):
        flexmoe.opt_out(model, "nobody")
    flexmoe.opt_out(model, 2)
    assert settings(model).owners == ["public", "a"]
    assert all(b.router.weight.shape[0] == 2 and len(b.experts) == 2 for b in moe_blocks(model))


def test_top_k_validation_and_clamping_after_opt_out():
    model = flexmoe.upcycle(tiny_model(), num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="between 1"):
        flexmoe.set_top_k(model, 4)
    flexmoe.opt_out(model, 1)
    assert settings(model).top_k == 2


def test_upcycle_twice_and_duplicate_owner_are_refused():
    model = flexmoe.upcycle(tiny_model(), num_experts=1, owners=["a"])
    with pytest.raises(ValueError, match="already"):
        flexmoe.upcycle(model)
    artifact = ExpertArtifact.from_model(model, owner="a")
    with pytest.raises(ValueError, match="already"):
        flexmoe.add_expert(model, artifact)


def test_fingerprint_covers_the_public_part_only():
    dense = tiny_model("qwen3")
    fp = flexmoe.fingerprint(dense)
    moe = flexmoe.upcycle(dense, num_experts=2)
    for block in moe_blocks(moe):
        perturb_(block.experts[1], seed=1)
        block.router.weight.data.normal_()
    assert flexmoe.fingerprint(moe) == fp  # owners' experts and routers are not public
    with torch.no_grad():
        moe_blocks(moe)[0].experts[0].down_proj.weight[0, 0] += 1e-3  # the public expert is
    assert flexmoe.fingerprint(moe) != fp
    assert flexmoe.fingerprint(tiny_model("qwen3", seed=1)) != fp


def test_upcycle_keeps_dtype_and_the_public_mlp_itself():
    dense = tiny_model().to(torch.bfloat16)
    public_mlp = decoder_layers(dense)[0].mlp
    block = moe_blocks(flexmoe.upcycle(dense, num_experts=1))[0]
    assert block.router.weight.dtype == torch.bfloat16
    assert next(block.experts[1].parameters()).dtype == torch.bfloat16
    # expert 0 is the very module of the public MLP (no copy that could drift); expert 1 is a copy
    assert block.experts[0] is public_mlp and block.experts[1] is not public_mlp
    assert torch.equal(block.experts[1].up_proj.weight, public_mlp.up_proj.weight)
