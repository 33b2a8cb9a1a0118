"""Every router keeps the router protocol (flexmoe.core.moe.ExpertRouter): its logits are its formula,
freezing holds the frozen rows through an optimiser step, opt-out then opt-in gives the model back bit
for bit, and an export reloads with the same logits -- or the router says clearly why it cannot.

The matrix runs over the library's routers and the research routers of benchmarks/routing_table.py."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

import flexmoe
from flexmoe.artifacts.expert import ExpertArtifact
from flexmoe.core.hashing import fingerprint
from flexmoe.core.moe import ROUTERS, AffineRouter, ExpertRouter, Router, RouterFormatError, router_class
from flexmoe.core.posterior import PosteriorRouter, use_posterior_routers
from flexmoe.core.surgery import freeze_public, moe_blocks, settings, upcycle, use_affine_routers
from flexmoe.formats.export import export
from flexmoe.formats.load import detect_format, load
from flexmoe.routing import mlp_input_moments
from flexmoe.testing import perturb_, tiny_model


def _benchmark(name: str):
    """A script of benchmarks/ (scripts run by path, not a package), loaded by its path once per
    session, so every test file sees the same classes (the router registry holds one of each)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[2] / "benchmarks" / f"{name}.py")
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


research = _benchmark("routing_table")  # importing it registers its exportable router

OWNERS = 3
LIBRARY = {"clamped": Router, "affine": AffineRouter, "posterior": PosteriorRouter}
RESEARCH = ("posterior-mix", "prefix-lda")
KINDS = (*LIBRARY, *RESEARCH)
# What each router cannot do, and the words its error uses.
NO_LINEAR_GATE = {
    "posterior": "posterior over domains",
    "posterior-mix": "log-sum-exp over the LDA posterior",
    "prefix-lda": "sequence-level",
}
NO_NATIVE_FORM = {"prefix-lda": "cannot hold it either"}


def model_with(kind: str, arch: str = "olmo2", *, gate_fits: bool = False, seed: int = 0):
    """A tiny merged MoE (public + 3 perturbed owners, all experts per token) whose routers are
    ``kind``. Rows are random; biases too (positive betas included, which a clamped router reads as
    0), unless ``gate_fits``: then they are what a bias-free FlexOlmo/Mixtral gate holds exactly
    (clamped: every beta >= 0; affine: one bias shared by every expert)."""
    model = upcycle(tiny_model(arch, seed=seed), num_experts=OWNERS)
    g = torch.Generator().manual_seed(seed + 1)
    for block in moe_blocks(model):
        for j in range(1, OWNERS + 1):
            perturb_(block.experts[j], seed=seed + j)
        with torch.no_grad():
            block.router.weight.normal_(generator=g)
            block.router.bias.uniform_(0.0 if gate_fits else -1.0, 1.0, generator=g)
    if kind == "affine":
        use_affine_routers(model)
        for block in moe_blocks(model):
            with torch.no_grad():
                block.router.bias.fill_(0.3) if gate_fits else block.router.bias.uniform_(-1.0, 1.0, generator=g)
    elif kind == "posterior":  # random integral token counts per domain: a soft posterior
        counts = torch.randint(0, 50, (OWNERS + 1, model.config.vocab_size), generator=g).float()
        use_posterior_routers(model, counts)
    elif kind in RESEARCH:
        ids = torch.randint(3, model.config.vocab_size, (4, 16), generator=g)
        stats = mlp_input_moments(model, ids, covariance=True)
        offsets = 0.1 * torch.randn(OWNERS + 1, stats.mean.shape[-1], generator=g)  # a soft posterior
        means = [stats.mean + offsets[c] for c in range(OWNERS + 1)]
        build = research.lda_mixture_router if kind == "posterior-mix" else research.prefix_lda_router
        build(model, means[0], means[1:], stats.covariance, shrinkage=0.5)
    return model.eval()


def lm_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def reference_logits(router, x: torch.Tensor) -> torch.Tensor:
    """Each kind's formula, in float64, from its tensors."""
    x, W, b = x.double(), router.weight.double(), router.bias.double()
    if router.kind in ("clamped", "posterior"):  # min(beta_j, 0), and 0 for the public expert
        b = torch.cat([b.new_zeros(1), b[1:].clamp(max=0.0)])
    own = x @ W.T + b
    if router.kind in ("clamped", "affine"):
        return own
    if router.kind == "posterior":  # gates: public + the most probable owner, by the owners' own pairs
        post = router.posterior.probs.double()
        s = torch.sigmoid(own[:, 1:] - own[:, :1])
        d = post[:, 1:].argmax(-1)
        gates = torch.zeros_like(own)
        gates[:, 0] = post[:, 0] + (post[:, 1:] * (1 - s)).sum(-1)
        rows = torch.arange(x.shape[0])
        gates[rows, d + 1] = post[rows, d + 1] * s[rows, d]
        return gates
    if router.kind == "posterior-mix":
        post = torch.softmax(x @ router.lda_weight.double().T + router.lda_bias.double(), -1)
        pair = torch.softmax(torch.stack([own[:, :1].expand_as(own[:, 1:]), own[:, 1:]], -1), -1)
        public = post[:, :1] + (post[:, 1:] * pair[..., 0]).sum(-1, keepdim=True)
        return torch.cat([public, post[:, 1:] * pair[..., 1]], -1).log()
    keep = torch.zeros_like(own, dtype=torch.bool)
    keep[:, 0] = True
    keep[torch.arange(x.shape[0]), router.state.classes] = True
    return own.masked_fill(~keep, float("-inf"))


def test_the_matrix_covers_every_router_of_the_library():
    library = {cls for cls in ROUTERS.values() if cls.__module__.startswith("flexmoe.")}
    assert library == set(LIBRARY.values())
    assert router_class("posterior-mix") is research.PosteriorMixRouter  # registered by its module
    for kind in KINDS:
        assert all(isinstance(b.router, ExpertRouter) for b in moe_blocks(model_with(kind)))


@pytest.mark.parametrize("kind", KINDS)
def test_logits_are_the_routers_formula_in_float32(kind):
    model = model_with(kind)
    g = torch.Generator().manual_seed(5)
    for block in moe_blocks(model):
        router = block.router
        x = torch.randn(20, model.config.hidden_size, generator=g)
        if kind == "prefix-lda":  # the class of every token, as the layer-0 hook would set it
            router.state.classes = torch.randint(0, OWNERS + 1, (20,), generator=g)
        if kind == "posterior":  # the posterior of 20 positions, as the decoder's pre-hook would set it
            router.posterior.advance(torch.randint(3, model.config.vocab_size, (1, 20), generator=g))
        got, want = router(x), reference_logits(router, x)
        assert got.dtype == torch.float32 and got.shape == (20, OWNERS + 1)
        if kind == "posterior-mix":  # log-gates: compare the gates, since tiny ones underflow to log 0 in the formula
            got, want = got.softmax(-1), want.exp()
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_freezing_holds_the_public_and_other_owners_rows_through_an_optimiser_step(kind, ids):
    model = model_with(kind)
    public, blocks = fingerprint(model), moe_blocks(model)
    before = [[b.router.expert_state(j) for j in range(OWNERS + 1)] for b in blocks]
    trainable = freeze_public(model, (1,))
    optimiser = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optimiser.step()
    moved = False
    for block, old in zip(blocks, before):
        for j in range(OWNERS + 1):
            new = block.router.expert_state(j)
            same = all(torch.equal(new[k], old[j][k]) for k in new)
            if j == 1:
                moved |= not same
            else:
                assert same, f"expert {j}'s router state moved"
    assert fingerprint(model) == public
    if kind != "prefix-lda":  # it trains r_1 only on tokens classed as owner 1, which may be none
        assert moved


@pytest.mark.parametrize("kind", KINDS)
def test_an_experts_router_state_opts_it_back_in_exactly(kind):
    """Router level, for every kind: drop a middle expert, append its state, restore the order."""
    for block in moe_blocks(model_with(kind)):
        router = block.router
        before = snapshot(router)
        gone = router.expert_state(2)
        router.keep_experts([0, 1, 3])
        assert router.num_experts == 3
        router.append_expert(gone)
        router.keep_experts([0, 1, 3, 2])
        assert_same_state(snapshot(router), before)


@pytest.mark.parametrize("kind", KINDS)
def test_opt_out_then_add_expert_restores_the_model_bit_for_bit(kind, ids):
    model = model_with(kind)
    before, want = snapshot(model), lm_logits(model, ids)
    unigram = moe_blocks(model)[0].router.unigram[3] if kind == "posterior" else None
    artifact = ExpertArtifact.from_model(model, owner="expert_3", expert=3, unigram=unigram)
    flexmoe.opt_out(model, "expert_3")
    if kind in LIBRARY:
        flexmoe.add_expert(model, artifact)
        assert settings(model).owners == ["public", "expert_1", "expert_2", "expert_3"]
        assert_same_state(snapshot(model), before)
        assert torch.equal(lm_logits(model, ids), want)
        return
    opted_out = snapshot(model)
    with pytest.raises(ValueError, match=r"lda\.weight.*add the expert to a model with linear routers"):
        flexmoe.add_expert(model, artifact)
    assert_same_state(snapshot(model), opted_out)  # a refused opt-in changes nothing
    assert settings(model).num_experts == OWNERS


@pytest.mark.parametrize("fmt", ["native", "flexolmo", "mixtral"])
@pytest.mark.parametrize("kind", KINDS)
def test_export_then_load_gives_the_same_logits_or_says_what_the_format_cannot_hold(kind, fmt, ids, tmp_path):
    model = model_with(kind, "llama" if fmt == "mixtral" else "olmo2", gate_fits=fmt != "native")
    error = NO_NATIVE_FORM.get(kind) if fmt == "native" else NO_LINEAR_GATE.get(kind)
    if error is not None:
        with pytest.raises(RouterFormatError, match=error):
            export(model, tmp_path / "out", fmt)
        assert not (tmp_path / "out").exists()
        return
    export(model, tmp_path / "out", fmt)
    loaded = load(tmp_path / "out")
    if fmt == "native":
        assert [type(b.router) for b in moe_blocks(loaded)] == [type(b.router) for b in moe_blocks(model)]
        assert_same_state(snapshot(loaded), snapshot(model))
        assert torch.equal(lm_logits(loaded, ids), lm_logits(model, ids))
    else:
        torch.testing.assert_close(lm_logits(loaded, ids), lm_logits(model, ids), atol=1e-4, rtol=0)


def test_auto_export_of_a_router_no_gate_can_hold_is_native(tmp_path):
    export(model_with("posterior-mix"), tmp_path / "out", "auto")
    assert detect_format(tmp_path / "out") == "native"


def test_native_export_records_each_layers_router_kind(ids, tmp_path):
    """A clamped layer next to an affine one: each reloads as its own kind (a positive beta of the
    clamped layer stays a 0, the affine layer's public bias stays free)."""
    model = model_with("clamped")
    block = moe_blocks(model)[1]
    block.router = AffineRouter.from_rows(block.router.weight, torch.tensor([0.5, 1.0, -1.0, 0.25]))
    export(model, tmp_path / "out", "native")
    assert json.loads((tmp_path / "out" / "flexmoe_config.json").read_text())["router"] == ["clamped", "affine"]
    loaded = load(tmp_path / "out")
    assert [type(b.router) for b in moe_blocks(loaded)] == [Router, AffineRouter]
    assert torch.equal(lm_logits(loaded, ids), lm_logits(model, ids))


def test_a_native_export_of_an_unknown_router_kind_says_how_to_load_it(tmp_path):
    export(model_with("clamped"), tmp_path / "out", "native")
    meta = tmp_path / "out" / "flexmoe_config.json"
    meta.write_text(json.dumps({**json.loads(meta.read_text()), "router": "causal-posterior"}))
    with pytest.raises(ValueError, match=r"unknown router kind 'causal-posterior'.*register_router"):
        load(tmp_path / "out")
