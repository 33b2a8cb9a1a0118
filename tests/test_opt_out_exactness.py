"""Opt-out under every routing recipe, with a non-zero public router row ``r_pub``: removing an
owner gives the model merged without that owner, bit for bit, where the recipe's routers depend
on each owner's own tensors only (``published``, ``posterior``); where they depend on every
owner's statistics (``lda``) the test states exactly what holds instead (docs/routing.md,
"Opt-out exactness by recipe")."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

import flexmoe
from flexmoe.artifacts.expert import ExpertArtifact
from flexmoe.assembly import merge_experts
from flexmoe.core.moe import AffineRouter, Router
from flexmoe.core.posterior import PosteriorRouter
from flexmoe.core.surgery import moe_blocks, settings, upcycle
from flexmoe.data.packing import pack_domain
from flexmoe.data.statistics import bigram_counts, unigram_counts
from flexmoe.formats.load import load_public_model
from flexmoe.routing import owner_statistics, route
from flexmoe.spec import RoutingRecipe
from flexmoe.testing import license_texts, perturb_

SEQ_LEN = 32
BUCKETS = 1024
RECIPES = {
    "published": RoutingRecipe(method="published"),
    "posterior": RoutingRecipe(method="posterior", bigram_buckets=BUCKETS),
    "lda": RoutingRecipe(method="lda", covariance="pooled", shrinkage=0.3),
}


@pytest.fixture(scope="module")
def owners(public_dir):
    """Three owners' artifacts (a, b, c), each trained (here: perturbed) beside the same non-zero
    ``r_pub`` and shipping every statistic a recipe can ask for, from its own token range."""
    public = load_public_model(public_dir)
    layers, hidden, vocab = public.config.num_hidden_layers, public.config.hidden_size, public.config.vocab_size
    r_pub = torch.randn(layers, hidden, generator=torch.Generator().manual_seed(5))
    arts = []
    for seed, name in enumerate("abc", start=1):
        model = upcycle(load_public_model(public_dir), num_experts=1, top_k=2, owners=[name]).eval()
        g = torch.Generator().manual_seed(seed)
        for L, block in enumerate(moe_blocks(model)):
            perturb_(block.experts[1], seed=seed)
            with torch.no_grad():
                block.router.weight[0].copy_(r_pub[L])
                block.router.weight[1].normal_(0.0, 0.5, generator=g)
                block.router.bias[1] = -0.3 * seed
        lo = 3 + (seed - 1) * (vocab - 3) // 3
        rows = torch.randint(lo, lo + (vocab - 3) // 3, (8, SEQ_LEN), generator=g)
        arts.append(
            ExpertArtifact.from_model(
                model,
                owner=name,
                stats=owner_statistics(model, rows, RECIPES["lda"]),
                unigram=unigram_counts(rows, vocab),
                bigram=bigram_counts(rows, BUCKETS),
            )
        )
    assert all(torch.equal(a.tensors["layers.0.router.public_embedding"], r_pub[0]) for a in arts)
    return arts


def merge(public_dir, arts, recipe):
    documents = [t[:2000] for t in license_texts()[2:6]]
    return merge_experts(
        public_dir, arts, routing=recipe, public_documents=documents, seq_len=SEQ_LEN, format="native"
    ).model


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in model.state_dict().items()}


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.fixture
def ids(public_dir):
    vocab = load_public_model(public_dir).config.vocab_size
    return torch.randint(3, vocab, (2, 24), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("recipe", ["published", "posterior"])
def test_opt_out_is_exactly_never_having_joined(recipe, owners, public_dir, ids):
    """Each owner's router row, bias (and, for the posterior, token counts and prior weight) are
    its own; the public row is the shared ``r_pub``: taking ``b`` out leaves what ``a`` and ``c``
    alone would have given."""
    merged = merge(public_dir, owners, RECIPES[recipe])
    never = merge(public_dir, [owners[0], owners[2]], RECIPES[recipe])
    kind = {"published": Router, "posterior": PosteriorRouter}[recipe]
    r_pub = owners[0].tensors["layers.1.router.public_embedding"]
    assert all(type(b.router) is kind for b in moe_blocks(merged))
    assert torch.equal(moe_blocks(merged)[1].router.weight[0], r_pub) and bool(r_pub.abs().min() > 0)
    before = logits(merged, ids)
    flexmoe.opt_out(merged, "b")
    assert settings(merged).owners == settings(never).owners == ["public", "a", "c"]
    got, want = state(merged), state(never)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name].dtype == want[name].dtype and torch.equal(got[name], want[name]), name
    assert torch.equal(logits(merged, ids), logits(never, ids))
    assert not torch.allclose(before, logits(merged, ids))  # b did route somewhere


def test_lda_opt_out_keeps_the_others_rows_and_rerouting_restores_exactness(owners, public_dir, ids):
    """The discriminant's rows ``Σ^-1 μ_c`` and biases share one covariance pooled over every
    class, ``b``'s included, so the others' rows after ``b`` opts out are not those of a merge
    without ``b``. What holds: the experts and every other tensor are exactly the merge without
    ``b``; the routers are exactly the three-owner routers with ``b``'s row and bias removed; and
    routing the opted-out model again from the remaining owners' statistics gives the merge
    without ``b`` bit for bit."""
    recipe = RECIPES["lda"]
    merged = merge(public_dir, owners, recipe)
    never = merge(public_dir, [owners[0], owners[2]], recipe)
    assert all(type(b.router) is AffineRouter for b in moe_blocks(merged))
    rows_before = [(b.router.weight.detach().clone(), b.router.bias.detach().clone()) for b in moe_blocks(merged)]
    flexmoe.opt_out(merged, "b")
    got, want = state(merged), state(never)
    assert got.keys() == want.keys()
    router = {n for n in want if ".router." in n}
    assert router and all(n.endswith((".router.weight", ".router.bias")) for n in router)
    for name in want.keys() - router:
        assert torch.equal(got[name], want[name]), name
    keep = [0, 1, 3]  # public, a, c
    for block, (weight, bias) in zip(moe_blocks(merged), rows_before):
        assert torch.equal(block.router.weight, weight[keep]) and torch.equal(block.router.bias, bias[keep])
    assert not all(torch.equal(got[n], want[n]) for n in router)  # not exact: b's covariance stays in
    assert not torch.equal(logits(merged, ids), logits(never, ids))

    tokenizer = AutoTokenizer.from_pretrained(public_dir)
    documents = [t[:2000] for t in license_texts()[2:6]]
    route(merged, [owners[0], owners[2]], pack_domain(documents, tokenizer, SEQ_LEN), recipe)
    for name, t in state(merged).items():
        assert torch.equal(t, want[name]), name
    assert torch.equal(logits(merged, ids), logits(never, ids))
