"""RouterTuning (FlexOlmo section 3.4): only the routers move, on a uniform proxy/public mixture."""

from __future__ import annotations

import copy
import glob

import lightning.pytorch as pl
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import flexmoe
from flexmoe.core.surgery import moe_blocks, settings
from flexmoe.data.packing import pack_documents
from flexmoe.spec import RouterTuningRecipe
from flexmoe.testing import license_texts, perturb_
from flexmoe.training.router_tuning import (
    RouterTuning,
    aggregate_router_rows,
    check_router_rows,
    frozen_digest,
    mixture_loader,
    router_rounds_in_process,
    router_rows,
    tune_router,
)


def merged_model(public_dir, seed: int = 0):
    """public + two perturbed experts with random router rows, top-2 of 3."""
    model = AutoModelForCausalLM.from_pretrained(public_dir)
    flexmoe.upcycle(model, num_experts=2, top_k=2, owners=["a", "b"])
    g = torch.Generator().manual_seed(seed)
    for block in moe_blocks(model):
        for j in (1, 2):
            perturb_(block.experts[j], seed=seed + j, scale=0.2)
        with torch.no_grad():
            block.router.weight.copy_(torch.randn(block.router.weight.shape, generator=g))
    return model


def python_texts() -> list[str]:
    return [
        open(p, encoding="utf-8").read()[:4000] for p in sorted(glob.glob(torch.__path__[0] + "/nn/modules/*.py"))[:12]
    ]


def mixture_loss(model, rows: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=rows, labels=rows).loss)


def test_only_router_rows_move_and_mixture_loss_drops(public_dir):
    tok = AutoTokenizer.from_pretrained(public_dir)
    model = merged_model(public_dir)
    before = copy.deepcopy(model)
    proxy = {"a": license_texts()[:4], "b": python_texts()[:4]}
    public = license_texts()[4:] + python_texts()[4:]
    recipe = RouterTuningRecipe(max_steps=30, batch_size=4, seq_len=32, lr=2e-2, warmup_steps=2)
    rows = torch.cat([pack_documents(d, tok, 32)[:8] for d in (*proxy.values(), public)])
    loss_before = mixture_loss(model, rows)

    report = tune_router(model, proxy_documents=proxy, public_documents=public, tokenizer=tok, recipe=recipe)

    assert report["steps"] == 30
    assert set(report["rows"]) == {"proxy:a", "proxy:b", "public"}
    assert frozen_digest(model) == frozen_digest(before)
    for new, old in zip(moe_blocks(model), moe_blocks(before)):
        for e_new, e_old in zip(new.experts, old.experts):
            for p, q in zip(e_new.parameters(), e_old.parameters()):
                assert torch.equal(p, q)
        assert not torch.equal(new.router.weight, old.router.weight)  # every row may move, r_pub too
        assert not torch.equal(new.router.weight[0], old.router.weight[0])
        assert torch.equal(new.router.bias, old.router.bias)  # train_bias is off by default
    assert settings(model).top_k == 2  # restored after tuning with all experts
    assert mixture_loss(model, rows) < loss_before


def test_train_bias_moves_owner_biases(public_dir):
    tok = AutoTokenizer.from_pretrained(public_dir)
    model = merged_model(public_dir, seed=3)
    recipe = RouterTuningRecipe(max_steps=6, batch_size=2, seq_len=32, lr=5e-2, warmup_steps=0, train_bias=True)
    tune_router(
        model, proxy_documents={"a": license_texts()[:2]}, public_documents=python_texts(), tokenizer=tok, recipe=recipe
    )
    assert any(b.router.bias[1:].abs().sum() > 0 for b in moe_blocks(model))


def test_moving_an_expert_is_refused(public_dir):
    """RouterTuning checks, at the end of fit, that nothing but the routers moved."""
    model = merged_model(public_dir)
    module = RouterTuning(model, RouterTuningRecipe(max_steps=2, batch_size=2, seq_len=16))
    expert = moe_blocks(model)[0].experts[1]

    class Tamper(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            with torch.no_grad():
                next(expert.parameters()).add_(1.0)

    rows = torch.randint(3, 50, (8, 16))
    loader = mixture_loader({"x": rows}, batch_size=2, num_samples=4)
    trainer = pl.Trainer(
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        callbacks=[Tamper()],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with pytest.raises(RuntimeError, match="other than the routers"):
        trainer.fit(module, train_dataloaders=loader)


def test_mixture_is_uniform_over_sources():
    big = torch.zeros(1000, 4, dtype=torch.long)
    small = torch.ones(5, 4, dtype=torch.long)
    loader = mixture_loader({"big": big, "small": small}, batch_size=50, num_samples=4000, seed=1)
    share = torch.cat([b["input_ids"][:, 0] for b in loader]).float().mean()
    assert 0.45 < share < 0.55


def test_dense_model_and_empty_data_are_refused(public_dir):
    dense = AutoModelForCausalLM.from_pretrained(public_dir)
    with pytest.raises(ValueError, match="dense model"):
        RouterTuning(dense)
    with pytest.raises(ValueError, match="no data"):
        mixture_loader({"a": torch.empty(0, 4, dtype=torch.long)}, batch_size=2, num_samples=4)


def test_tune_router_command(public_dir, tmp_path):
    """``flexmoe tune-router`` on an assembled FlexOlmo directory: routers move, experts do not,
    and the output still loads in transformers."""
    import json

    from flexmoe.cli import main
    from flexmoe.owner.proxy import ProxySelection

    model = merged_model(public_dir)
    flexmoe.export(model, tmp_path / "merged", format="flexolmo", tokenizer=str(public_dir))
    public = tmp_path / "public.jsonl"
    docs = license_texts()[:6] + python_texts()[:6]
    public.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    sel = ProxySelection(indices=(0, 1), scores=(2.0, 1.0), budget=2, num_public=len(docs))
    (tmp_path / "a.proxy.json").write_text(sel.to_json())
    main(
        [
            "tune-router",
            "--model",
            str(tmp_path / "merged"),
            "--proxy",
            f"a={tmp_path / 'a.proxy.json'}",
            "--proxy",
            f"b={tmp_path / 'public.jsonl'}",
            "--public-data",
            str(public),
            "--out",
            str(tmp_path / "tuned"),
            "--recipe.max_steps",
            "3",
            "--recipe.batch_size",
            "2",
            "--recipe.seq_len",
            "32",
        ]
    )
    tuned = flexmoe.load(tmp_path / "tuned")
    assert frozen_digest(tuned) == frozen_digest(model)
    assert not torch.equal(moe_blocks(tuned)[0].router.weight, moe_blocks(model)[0].router.weight)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "tuned")
    ids = torch.randint(3, 50, (1, 10))
    with torch.no_grad():
        assert (hf(ids).logits - tuned(ids).logits).abs().max() < 1e-4


# -- federated router tuning (RouterTuningRecipe.data="owners") --------------------------------


def test_federated_rounds_keep_experts_and_their_average_lowers_the_mixture_loss(public_dir):
    """Two owners (licences, Python) and the public data each take their local steps from the same
    routers; the FedAvg of the three lowers the loss on a mixture of all three, and no expert moves."""
    tok = AutoTokenizer.from_pretrained(public_dir)
    model = merged_model(public_dir)
    digest = frozen_digest(model)
    recipe = RouterTuningRecipe(
        data="owners", rounds=3, max_steps=30, batch_size=4, seq_len=32, lr=2e-2, warmup_steps=1, server_lr=1.0
    )
    sources = {"public": license_texts()[4:6] + python_texts()[4:6], "a": license_texts()[:4], "b": python_texts()[:4]}
    rows = {name: pack_documents(docs, tok, 32) for name, docs in sources.items()}
    held = torch.cat([r[:6] for r in rows.values()])
    loss_before = mixture_loss(model, held)
    start = router_rows(model)
    log = router_rounds_in_process(model, rows, recipe, seed=0)
    assert len(log) == recipe.rounds and all(sorted(r) == ["a", "b", "public"] for r in log)
    assert all(res["steps"] == recipe.local_steps == 10 for r in log for res in r.values())
    assert frozen_digest(model) == digest
    assert settings(model).top_k == 2  # restored after every round
    assert mixture_loss(model, held) < loss_before
    assert not torch.equal(router_rows(model)["layers.0.router.weight"], start["layers.0.router.weight"])


def test_aggregate_is_the_mean_change_scaled_by_the_server_lr():
    start = {"layers.0.router.weight": torch.zeros(3, 4), "layers.0.router.bias": torch.zeros(3)}
    ups = [{k: torch.full_like(v, x) for k, v in start.items()} for x in (1.0, 2.0, 6.0)]
    plain = aggregate_router_rows(start, ups, server_lr=1.0)  # FedAvg: the mean
    assert torch.equal(plain["layers.0.router.weight"], torch.full((3, 4), 3.0))
    summed = aggregate_router_rows(start, ups)  # default: every participant's change in full
    assert torch.equal(summed["layers.0.router.weight"], torch.full((3, 4), 9.0))
    scaled = aggregate_router_rows({k: v + 1 for k, v in start.items()}, ups, server_lr=2.0)
    assert torch.equal(scaled["layers.0.router.bias"], torch.full((3,), 1.0 + 2.0 * (3.0 - 1.0)))
    with pytest.raises(ValueError, match="no router rows"):
        aggregate_router_rows(start, [])


@pytest.mark.parametrize(
    "corrupt, field",
    [
        (lambda r: r.pop("layers.1.router.bias"), "router tensors"),
        (lambda r: r.update({"layers.0.router.extra": torch.zeros(1)}), "router tensors"),
        (
            lambda r: r.update({"layers.0.router.weight": r["layers.0.router.weight"][:-1]}),
            "shape of layers.0.router.weight",
        ),
        (
            lambda r: r.update({"layers.0.router.weight": r["layers.0.router.weight"].half()}),
            "dtype of layers.0.router.weight",
        ),
        (lambda r: r["layers.1.router.bias"].fill_(float("nan")), "values of layers.1.router.bias"),
    ],
)
def test_router_rows_from_another_party_are_checked(public_dir, corrupt, field):
    from flexmoe.artifacts.guard import ArtifactError

    model = merged_model(public_dir)
    rows = router_rows(model)
    check_router_rows(rows, model, "alice")
    corrupt(rows)
    with pytest.raises(ArtifactError, match="alice") as e:
        check_router_rows(rows, model, "alice")
    assert e.value.field == field


def test_owners_recipe_needs_a_step_per_round():
    assert RouterTuningRecipe(data="owners", rounds=4, max_steps=10).local_steps == 3
    with pytest.raises(ValueError, match="rounds=20 is more than max_steps=10"):
        RouterTuningRecipe(data="owners", rounds=20, max_steps=10)
    with pytest.raises(ValueError, match="data must be one of"):
        RouterTuningRecipe(data="everyone")
