"""The token routing recipe (lda) end to end: owners ship statistics in the artifact, the coordinator
builds the discriminant router (flexmoe.routing.route), and its exportable form reloads in transformers."""

from __future__ import annotations

import json

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import flexmoe
from flexmoe.artifacts.expert import ExpertArtifact, MLPInputStats
from flexmoe.artifacts.guard import ArtifactError
from flexmoe.core.moe import AffineRouter, record_router_logits
from flexmoe.core.surgery import moe_blocks, upcycle
from flexmoe.data.datamodule import TextDataModule
from flexmoe.routing import _OnlyPublic, fold_router_bias, owner_statistics, route
from flexmoe.spec import ExpertRecipe, FederationSpec, RoutingRecipe
from flexmoe.testing import LICENSES, perturb_, tiny_model
from flexmoe.training.expert import ExpertModule, expert_callbacks


def owner_model(seed: int, arch: str = "olmo2"):
    model = upcycle(tiny_model(arch), num_experts=1, top_k=2, owners=[f"o{seed}"])
    for block in moe_blocks(model):
        perturb_(block.experts[1], seed=seed, scale=0.2)
    return model.eval()


def rows(seed: int, n: int = 8, seq: int = 16, lo: int = 3, hi: int = 96):
    return torch.randint(lo, hi, (n, seq), generator=torch.Generator().manual_seed(seed))


def artifact_with_stats(seed: int, data: torch.Tensor, covariance: bool = True) -> ExpertArtifact:
    model = owner_model(seed)
    recipe = RoutingRecipe(covariance="pooled" if covariance else "public")
    stats = owner_statistics(model, data, recipe)
    return ExpertArtifact.from_model(model, owner=f"o{seed}", stats=stats)


def test_statistics_round_trip_through_the_artifact_file(tmp_path):
    art = artifact_with_stats(1, rows(1))
    art.save(tmp_path / "o1.safetensors")
    back = ExpertArtifact.load(tmp_path / "o1.safetensors")
    s = back.routing_stats
    assert s.count == 8 * 16 and s.mean.shape == (2, 32) and s.covariance.shape == (2, 32, 32)
    # what was written is the mean and (population) covariance of the owner's MLP inputs
    for L, x in enumerate(captured_mlp_inputs(owner_model(1), rows(1))):
        np.testing.assert_allclose(s.mean[L].numpy(), x.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(s.covariance[L].numpy(), np.cov(x.T, bias=True), rtol=1e-4, atol=1e-6)
    # Statistics are optional: an artifact without them has none, and the mean alone is allowed.
    assert ExpertArtifact.from_model(owner_model(1), owner="o1").routing_stats is None
    assert artifact_with_stats(1, rows(1), covariance=False).routing_stats.covariance is None


@pytest.mark.parametrize(
    "corrupt, field",
    [
        (lambda t, m: t.__setitem__("layers.1.stats.mean", torch.zeros(31)), "shape of layers.1.stats.mean"),
        (lambda t, m: t.__setitem__("layers.0.stats.covariance", torch.triu(torch.ones(32, 32))), "stats.covariance"),
        (lambda t, m: t.__setitem__("layers.0.stats.mean", torch.full((32,), float("nan"))), "values of"),
        (lambda t, m: t.__setitem__("layers.0.stats.mean", torch.zeros(32, dtype=torch.float16)), "dtype of"),
        (lambda t, m: t.pop("layers.1.stats.covariance"), "tensors of layer 1"),
        (lambda t, m: m.pop("stats_tokens"), "stats_tokens"),
        (lambda t, m: [t.pop(f"layers.{L}.stats.mean") for L in (0, 1)], "stats.mean"),
    ],
)
def test_bad_statistics_are_rejected_with_the_field(tmp_path, corrupt, field):
    art = artifact_with_stats(2, rows(2))
    corrupt(art.tensors, art.metadata)
    art.save(tmp_path / "bad.safetensors")
    with pytest.raises(ArtifactError, match=field.replace(".", r"\.")):
        ExpertArtifact.load(tmp_path / "bad.safetensors")


def test_only_public_computes_the_dense_public_model():
    public = tiny_model("olmo2")
    merged = flexmoe.assemble(tiny_model("olmo2"), [artifact_with_stats(s, rows(s)) for s in (1, 2)], top_k=2)
    ids = rows(9)
    with torch.no_grad():
        want = public(ids).logits
        before = merged(ids).logits
        with _OnlyPublic(merged) as m:
            assert torch.equal(m(ids).logits, want)
        assert torch.equal(merged(ids).logits, before)  # restored


def captured_mlp_inputs(model, ids) -> list[np.ndarray]:
    """Every decoder layer's MLP input on ``ids``, ``[tokens, H]`` float64, captured by a hook on
    each ``mlp`` module (not through flexmoe.routing)."""
    seen = []
    hooks = [
        layer.mlp.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
        for layer in model.model.layers
    ]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return [x.double().numpy() for x in seen]


def test_route_is_lda_from_the_shipped_statistics():
    """The routers ``route`` writes are the discriminant written out here in numpy from the
    public model's MLP inputs on the public rows (captured directly) and the owners' shipped
    means and covariances: pooled covariance weighted by token counts, shrunk by 0.3 towards
    ``tr/H · I``, rows ``Σ^-1 μ_c``, biases ``−½ μ_c^T Σ^-1 μ_c + log(1/3)``."""
    arts = [artifact_with_stats(s, rows(s, lo=3 + 30 * (s - 1), hi=33 + 30 * (s - 1))) for s in (1, 2)]
    public_rows = rows(7, n=12)
    merged = flexmoe.assemble(tiny_model("olmo2"), arts, top_k=2)
    summary = route(merged, arts, public_rows, RoutingRecipe(covariance="pooled", shrinkage=0.3))
    assert summary["method"] == "lda" and not summary["folded"]
    assert all(isinstance(b.router, AffineRouter) for b in moe_blocks(merged))

    public = captured_mlp_inputs(tiny_model("olmo2"), public_rows)
    for L, block in enumerate(moe_blocks(merged)):
        x = public[L]
        owners = [(a.routing_stats.mean[L].numpy(), a.routing_stats.covariance[L].numpy()) for a in arts]
        counts = [len(x)] + [a.routing_stats.count for a in arts]
        covs = [np.cov(x.T, bias=True)] + [c for _, c in owners]
        pooled = sum(n * c for n, c in zip(counts, covs)) / sum(counts)
        H = pooled.shape[0]
        inv = np.linalg.inv(0.7 * pooled + 0.3 * np.trace(pooled) / H * np.eye(H))
        means = [x.mean(0)] + [m for m, _ in owners]
        W = np.stack([inv @ m for m in means])
        b = np.array([-0.5 * m @ inv @ m + np.log(1 / 3) for m in means])
        np.testing.assert_allclose(block.router.weight.detach().double().numpy(), W, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(block.router.bias.detach().double().numpy(), b, rtol=1e-4, atol=1e-4)


def test_route_names_the_owner_without_statistics():
    arts = [artifact_with_stats(1, rows(1)), ExpertArtifact.from_model(owner_model(2), owner="o2")]
    merged = flexmoe.assemble(tiny_model("olmo2"), arts)
    with pytest.raises(ValueError, match="owner 'o2' shipped no routing statistics"):
        route(merged, arts, rows(7))
    assert route(merged, arts, rows(7), RoutingRecipe(method="published")) == {"method": "published"}


def test_fold_is_exact_when_the_input_has_a_constant_direction():
    """A bias moved into the rows along the input's constant direction changes no logit."""
    model = upcycle(tiny_model("olmo2"), num_experts=3)
    H = 32
    g = torch.Generator().manual_seed(0)
    c = torch.randn(H, generator=g) * 3
    basis = torch.linalg.qr(torch.randn(H, H, generator=g)).Q
    k = basis[:, :-1]  # inputs vary in H-1 directions; one direction (orthogonal to them) is constant
    x = c + (torch.randn(500, H - 1, generator=g) @ k.T)
    x = x - (x - c) @ basis[:, -1:] @ basis[:, -1:].T  # exactly constant along basis[:, -1]
    cov = torch.cov(x.T.double())
    stats = MLPInputStats(mean=x.double().mean(0).expand(2, H), count=500, covariance=cov.expand(2, H, H))
    for block in moe_blocks(model):
        with torch.no_grad():
            block.router = AffineRouter(H, 4)
            block.router.weight.copy_(torch.randn(4, H, generator=g))
            block.router.bias.copy_(torch.tensor([0.5, -1.0, 2.0, 0.0]))
    before = [b.router(x) for b in moe_blocks(model)]
    q = fold_router_bias(model, stats, shrinkage=0.0)
    assert min(q) > 1e6  # the constant direction is found
    for block, old in zip(moe_blocks(model), before):
        assert type(block.router) is flexmoe.Router and torch.equal(block.router.effective_bias(), torch.zeros(4))
        new = block.router(x)
        torch.testing.assert_close(torch.softmax(new, -1), torch.softmax(old, -1), atol=1e-4, rtol=1e-4)


def test_owner_training_ships_statistics_and_the_coordinator_exports_exactly(public_dir, tmp_path):
    """ExpertModule + expert_callbacks put the statistics in the artifact; route(exportable=True)
    gives a bias-free router that a transformers FlexOlmo checkpoint reproduces."""
    public = AutoModelForCausalLM.from_pretrained(public_dir)
    spec = FederationSpec(
        public_model=str(public_dir),
        fingerprint=flexmoe.fingerprint(public),
        embedder=None,
        expert=ExpertRecipe(max_steps=3, batch_size=2, seq_len=32, warmup_steps=1),
        routing=RoutingRecipe(stats_tokens=512),
    )
    paths = []
    for owner, source in (("gpl", f"{LICENSES}/GPL-3"), ("apache", f"{LICENSES}/Apache-2.0")):
        pl.seed_everything(0)
        data = TextDataModule(source, tokenizer=str(public_dir), seq_len=32, batch_size=2, cache_dir=tmp_path / "c")
        trainer = pl.Trainer(
            max_steps=3,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            callbacks=expert_callbacks(spec, tmp_path / f"{owner}.safetensors"),
        )
        trainer.fit(ExpertModule(str(public_dir), spec, owner=owner), data)
        paths.append(tmp_path / f"{owner}.safetensors")
    arts = [ExpertArtifact.load(p, fingerprint=spec.fingerprint, spec_sha256=spec.sha256) for p in paths]
    assert all(a.routing_stats is not None and a.routing_stats.count == 512 for a in arts)

    merged = flexmoe.assemble(AutoModelForCausalLM.from_pretrained(public_dir), arts, top_k=2)
    public_rows = TextDataModule(
        f"{LICENSES}/BSD", tokenizer=str(public_dir), seq_len=32, val_fraction=0.0, cache_dir=tmp_path / "c"
    )
    public_rows.setup()
    summary = route(merged, arts, public_rows.train_rows, spec.routing, exportable=True)
    assert summary["folded"] and len(summary["fold_q"]) == 2
    flexmoe.export(merged, tmp_path / "merged", format="flexolmo", tokenizer=str(public_dir))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    ids = public_rows.train_rows[:2].long()
    with torch.no_grad(), record_router_logits(merged):
        assert (hf(ids).logits - merged(ids).logits).abs().max() < 1e-4
    # The same from the command line: with public data `auto` picks the posterior recipe, whose
    # FlexOlmo export (named) carries its token router, the discriminant, folded.
    from flexmoe.cli import main

    main(
        [
            "assemble",
            "--public",
            str(public_dir),
            "--experts",
            *map(str, paths),
            "--public-data",
            f"{LICENSES}/BSD",
            "--out",
            str(tmp_path / "cli"),
            "--top-k",
            "2",
            "--format",
            "flexolmo",
        ]
    )
    assert json.loads((tmp_path / "cli" / "flexmoe_config.json").read_text())["routing"]["router"] == "token (lda)"
    assert (tmp_path / "cli" / "config.json").is_file()  # a transformers FlexOlmo checkpoint
    again = flexmoe.load(tmp_path / "cli")
    stacked = flexmoe.assemble(AutoModelForCausalLM.from_pretrained(public_dir), arts)
    assert not torch.allclose(moe_blocks(again)[1].router.weight, moe_blocks(stacked)[1].router.weight)
    main(
        [
            "assemble",
            "--public",
            str(public_dir),
            "--experts",
            *map(str, paths),
            "--public-data",
            f"{LICENSES}/BSD",
            "--out",
            str(tmp_path / "native"),
            "--format",
            "native",
            "--routing",
            "lda",
        ]
    )
    native = flexmoe.load(tmp_path / "native")
    assert all(isinstance(b.router, AffineRouter) for b in moe_blocks(native))  # biases kept, exactly


def test_class_mixture_is_the_moments_of_the_pooled_sample():
    from flexmoe.routing import class_mixture

    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g).double() + torch.tensor([2.0, 0.0, -1.0])
    b = torch.randn(4000, 3, generator=g).double() * 0.5
    stats = [
        MLPInputStats(mean=x.mean(0)[None], count=len(x), covariance=torch.cov(x.T, correction=0)[None]) for x in (a, b)
    ]
    within = (stats[0].covariance + stats[1].covariance) / 2
    mix = class_mixture(stats, within)
    both = torch.cat([a, b])
    torch.testing.assert_close(mix.mean[0], both.mean(0))
    torch.testing.assert_close(mix.covariance[0], torch.cov(both.T, correction=0))
