"""Branch-Train-MiX (Sukhbaatar et al., 2024): dense expert LMs mixed into one MoE, then MoE-finetuned."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

import flexmoe
from flexmoe.core.surgery import decoder_layers, moe_blocks, settings
from flexmoe.data.packing import pack_domain
from flexmoe.merge import MoEFinetune, btx
from flexmoe.testing import LICENSES, VOCAB, perturb_, tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def _branches(arch="olmo2", n=3):
    """A seed LM and ``n`` expert LMs branched from it (seeded noise stands in for domain training)."""
    seed = tiny_model(arch, seed=0)
    experts = [tiny_model(arch, seed=0) for _ in range(n)]
    for j, m in enumerate(experts):
        perturb_(m, seed=j + 1, scale=0.1)
    return seed, experts


@pytest.mark.parametrize("arch", ["olmo2", "llama"])
@pytest.mark.parametrize(("router_init", "top_k"), [("random", 1), ("random", 2), ("embedding", 2), ("random", 3)])
def test_identical_experts_give_the_seed_model(arch, router_init, top_k, ids):
    seed = tiny_model(arch)
    experts = [tiny_model(arch) for _ in range(2)]
    hidden = seed.config.hidden_size
    embeddings = [torch.randn(hidden, generator=torch.Generator().manual_seed(j)) for j in range(3)]
    moe = btx(
        experts,
        seed,
        router_init=router_init,
        top_k=top_k,
        seed=5,
        embeddings=embeddings if router_init == "embedding" else None,
    ).eval()
    assert settings(moe).num_experts == 3 and settings(moe).top_k == top_k and settings(moe).normalize
    assert (_logits(moe, ids) - _logits(seed, ids)).abs().max() <= 1e-5
    router = moe_blocks(moe)[0].router.weight
    assert router.abs().sum() > 0  # the router is not a trivial zero: routing really differs per token
    if router_init == "embedding":
        torch.testing.assert_close(router[1], embeddings[1])


def test_experts_are_the_dense_mlps_and_the_rest_is_their_average(ids):
    seed, experts = _branches(n=2)
    members = [seed, *experts]
    moe = btx(experts, seed)
    assert settings(moe).owners == ["public", "expert_1", "expert_2"]
    for L, block in enumerate(moe_blocks(moe)):
        for j, member in enumerate(members):
            for name, t in decoder_layers(member)[L].mlp.state_dict().items():
                assert torch.equal(block.experts[j].state_dict()[name], t), (L, j, name)
        assert torch.equal(block.router.bias, torch.zeros(3)) and not block.router.bias.requires_grad
    states = [m.state_dict() for m in members]
    checked = 0
    for name, t in moe.state_dict().items():
        if ".mlp." in name:
            continue
        expected = sum(s[name] for s in states) / 3
        torch.testing.assert_close(t, expected, atol=1e-6, rtol=0, msg=name)
        assert not torch.allclose(t, states[1][name])  # really mixed, not one member's copy
        checked += 1
    assert checked > 10  # embeddings, attention, norms, head
    # the inputs were not modified, and without a seed model only the expert LMs are mixed
    assert torch.equal(
        seed.model.layers[0].self_attn.q_proj.weight, states[0]["model.layers.0.self_attn.q_proj.weight"]
    )
    two = btx(experts, names=["wiki"])
    assert settings(two).owners == ["public", "wiki"] and len(moe_blocks(two)[0].experts) == 2
    q = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(two.state_dict()[q], (states[1][q] + states[2][q]) / 2)


def test_random_router_is_seeded():
    _, experts = _branches(n=2)
    a, b, c = btx(experts, seed=1), btx(experts, seed=1), btx(experts, seed=2)
    wa, wb, wc = (moe_blocks(m)[1].router.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)
    assert abs(wa.std().item() - experts[0].config.initializer_range) < 0.01


def test_refuses_what_it_cannot_mix():
    seed, experts = _branches(n=2)
    with pytest.raises(ValueError, match="at least one"):
        btx([])
    with pytest.raises(ValueError, match="top_k"):
        btx(experts, top_k=3)
    with pytest.raises(ValueError, match="one embedding per expert"):
        btx(experts, seed, router_init="embedding", embeddings=[torch.zeros(32)] * 2)
    with pytest.raises(ValueError, match="router_init"):
        btx(experts, router_init="zeros")
    with pytest.raises(ValueError, match="one architecture"):
        btx([experts[0], tiny_model("llama")])
    with pytest.raises(ValueError, match="shape"):
        btx([experts[0], tiny_model("olmo2", intermediate_size=64)])
    with pytest.raises(ValueError, match="already a flexmoe MoE"):
        btx([flexmoe.upcycle(tiny_model(), 1)])


# -- MoE finetuning ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_rows(public_dir):
    tok = AutoTokenizer.from_pretrained(public_dir)
    return pack_domain([Path(LICENSES, "GPL-3").read_text(encoding="utf-8")], tok, seq_len=32)[:16]


def _public_branches(public_dir, n=2):
    seed = AutoModelForCausalLM.from_pretrained(public_dir)
    experts = [AutoModelForCausalLM.from_pretrained(public_dir) for _ in range(n)]
    for j, m in enumerate(experts):
        perturb_(m, seed=j + 1, scale=0.02)
    return seed, experts


def _finetune(module, rows, steps=12):
    loader = DataLoader(
        rows,
        batch_size=4,
        shuffle=True,
        collate_fn=lambda b: {"input_ids": torch.stack(b)},
        generator=torch.Generator().manual_seed(0),
    )
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, loader)
    return trainer


def _loss(model, rows):
    model.eval()
    with torch.no_grad():
        return model(rows, labels=rows).loss.item()


def test_moe_finetune_lowers_the_loss_and_balances(public_dir, text_rows):
    seed, experts = _public_branches(public_dir)
    moe = btx(experts, seed)
    before = {n: p.detach().clone() for n, p in moe.named_parameters()}
    loss_before = _loss(moe, text_rows)
    module = MoEFinetune(moe, lr=3e-3, warmup_steps=2, max_steps=12)
    trainer = _finetune(module, text_rows)
    m = trainer.callback_metrics
    assert torch.isfinite(m["train/balance_loss"]) and m["train/balance_loss"] > 0
    torch.testing.assert_close(m["train/loss"], m["train/lm_loss"] + 0.01 * m["train/balance_loss"])
    assert _loss(moe, text_rows) < loss_before - 0.1
    after = dict(moe.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    # BTX finetunes every parameter: attention, embeddings, experts and router
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "model.embed_tokens.weight" in changed
    assert "model.layers.0.mlp.experts.2.down_proj.weight" in changed and "model.layers.0.mlp.router.weight" in changed
    assert not any(n.endswith("router.bias") for n in changed)


def _usage(moe, rows):
    """Each expert's share of the top-2 routing slots, mean over layers, computed from the
    recorded router logits."""
    moe.eval()
    with torch.no_grad(), flexmoe.record_router_logits(moe) as logits:
        moe(input_ids=rows, use_cache=False)
    shares = [torch.bincount(x.topk(2, -1).indices.reshape(-1), minlength=3).float() / (2 * x.shape[0]) for x in logits]
    return torch.stack(shares).mean(0)


def _lopsided(moe, rows):
    """Point routers 0 and 1 along each layer's mean MLP input and router 2 against it: expert 2
    is left out of most tokens' top 2."""
    means = []
    hooks = [
        b.register_forward_pre_hook(lambda m, args: means.append(args[0].detach().flatten(0, -2).mean(0)))
        for b in moe_blocks(moe)
    ]
    with torch.no_grad():
        moe(input_ids=rows, use_cache=False)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for block, x in zip(moe_blocks(moe), means):
            u = x / x.norm() ** 2
            block.router.weight.copy_(torch.stack([u, u, -u]))
    return moe


def test_load_balancing_evens_expert_usage(public_dir, text_rows):
    """The same lopsided start and the same steps, with and without the load-balancing loss: with
    it the neglected expert wins back a share of the tokens, without it it does not. (A larger
    coefficient than BTX's 0.01 makes the effect visible within 8 steps.)"""
    shares, before = {}, None
    for coef in (0.0, 1.0):
        seed, experts = _public_branches(public_dir)
        moe = _lopsided(btx(experts, seed), text_rows)
        before = _usage(moe, text_rows)
        _finetune(MoEFinetune(moe, train="moe", balance_coef=coef, lr=1e-2, warmup_steps=2, max_steps=8), text_rows, 8)
        shares[coef] = _usage(moe, text_rows)
    assert before[2] < 0.1, before  # the construction: expert 2 is rarely in the top 2
    assert shares[0.0][2] <= before[2] + 0.02, shares  # the LM loss alone does not bring it back
    assert shares[1.0][2] >= before[2] + 0.08, shares  # load balancing does
    spread = {c: float(s.max() - s.min()) for c, s in shares.items()}
    assert spread[1.0] < spread[0.0] - 0.1, spread
    assert MoEFinetune(btx(_branches()[1])).hparams.balance_coef == 0.01  # BTX's coefficient by default


def test_moe_finetune_can_train_only_experts_and_router(public_dir, text_rows):
    seed, experts = _public_branches(public_dir)
    moe = btx(experts, seed)
    before = {n: p.detach().clone() for n, p in moe.named_parameters()}
    _finetune(MoEFinetune(moe, train="moe", lr=3e-3, warmup_steps=2, max_steps=6), text_rows, steps=6)
    for n, p in moe.named_parameters():
        trained = ".mlp.experts." in n or n.endswith("router.weight")
        assert torch.equal(before[n], p) != trained, n
    with pytest.raises(ValueError, match="'all'"):
        MoEFinetune(moe, train="router")
    with pytest.raises(TypeError, match="dense model"):
        MoEFinetune(tiny_model())


@pytest.mark.parametrize("fmt", ["native", "auto"])
def test_the_btx_model_exports(fmt, public_dir, tmp_path, ids):
    seed, experts = _public_branches(public_dir)
    moe = btx(experts, seed).eval()
    ids = ids % VOCAB
    out = flexmoe.export(moe, tmp_path / "btx", format=fmt, tokenizer=public_dir)
    reloaded = flexmoe.load(out) if fmt == "native" else AutoModelForCausalLM.from_pretrained(out)
    if fmt == "auto":
        assert reloaded.config.model_type == "flex_olmo" and reloaded.config.norm_topk_prob
    assert (_logits(reloaded.eval(), ids) - _logits(moe, ids)).abs().max() <= 1e-4


def test_flexmoe_merge_btx_is_the_function_even_after_importing_its_module():
    import importlib
    import types

    import flexmoe.merge

    module = importlib.import_module("flexmoe.merge.btx")
    assert isinstance(flexmoe.merge.btx, types.FunctionType) and flexmoe.merge.btx is module.btx
    assert flexmoe.merge.MoEFinetune is module.MoEFinetune
