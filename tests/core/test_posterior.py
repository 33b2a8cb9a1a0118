"""The posterior router keeps FlexOlmo's promises exactly: a certain posterior gives the owner's own
model, opting out gives the model assembled without that owner, opting in leaves every other owner's
routing alone; it is causal, generates from the KV cache as a full recompute does without rescanning
the prefix, and a native export reloads with the same logits."""

import copy

import pytest
import torch

import flexmoe
from flexmoe.artifacts.expert import ExpertArtifact
from flexmoe.core.moe import RouterFormatError
from flexmoe.core.posterior import PosteriorRouter, use_posterior_routers
from flexmoe.core.surgery import moe_blocks, settings, upcycle
from flexmoe.data.statistics import token_statistics
from flexmoe.formats.export import export
from flexmoe.formats.load import load
from flexmoe.testing import VOCAB, perturb_, tiny_model

OWNERS = 3
# Each domain writes its own band of the vocabulary (ids 0-2 are pad, bos, eos).
BANDS = [range(3 + 20 * d, 3 + 20 * (d + 1)) for d in range(OWNERS + 1)]
NEW_BAND = range(83, VOCAB)  # the opting-in owner's, shared with nobody


def merged(owners: int = OWNERS, seed: int = 0):
    """A tiny assembled merge: public + ``owners`` perturbed experts, random rows, raw biases in
    [-1, 1] (positive ones read as 0), every layer a clamped router."""
    model = upcycle(tiny_model(seed=seed), num_experts=owners)
    g = torch.Generator().manual_seed(seed + 1)
    for block in moe_blocks(model):
        for j in range(1, owners + 1):
            perturb_(block.experts[j], seed=seed + 10 * j)
        with torch.no_grad():
            block.router.weight.normal_(generator=g)
            block.router.bias.uniform_(-1.0, 1.0, generator=g)
    return model.eval()


def counts(bands, total: float = 1e4) -> torch.Tensor:
    """Unigram counts ``[len(bands), VOCAB]``: each domain's mass spread over its band."""
    c = torch.zeros(len(bands), VOCAB)
    for d, band in enumerate(bands):
        c[d, list(band)] = total / len(band)
    return c


def tokens(band, shape=(2, 16), seed: int = 3) -> torch.Tensor:
    ids = torch.randint(0, len(band), shape, generator=torch.Generator().manual_seed(seed))
    return torch.tensor(list(band))[ids]


BUCKETS = 2**16
KINDS = ["unigram", "bigram"]


def statistics(bands, kind: str):
    """The statistics of ``kind`` for ``bands``: ``counts`` alone, or unigram and hashed bigram
    counts of the same generated text (each domain's 40 rows of its band)."""
    if kind == "unigram":
        return {"unigram": counts(bands)}
    rows = [tokens(band, (40, 25), seed=50 + d) for d, band in enumerate(bands)]
    stats = [token_statistics(r, VOCAB, BUCKETS) for r in rows]
    return {"unigram": torch.stack([t.unigram for t in stats]), "bigram": torch.stack([t.bigram for t in stats])}


def route(model, bands, kind: str = "unigram", **kwargs):
    """``use_posterior_routers`` with the statistics of ``kind`` for ``bands``."""
    stats = statistics(bands, kind)
    return use_posterior_routers(model, stats["unigram"], bigram=stats.get("bigram"), **kwargs)


def mixed_ids(seed: int = 3) -> torch.Tensor:
    """Rows from every domain's band, so the posterior is soft and moves along the row."""
    return tokens(range(3, 83), (2, 16), seed)


def lm_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def posterior_of(model):
    return moe_blocks(model)[0].router.posterior


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("owners, owner", [(1, 1), (OWNERS, 2)])
def test_a_certain_posterior_reproduces_the_owners_own_two_expert_model(owners, owner, kind):
    model = merged(owners)
    own = copy.deepcopy(model)  # the owner's model: public expert + its expert, row r_d and bias against r_0
    for other in [j for j in range(owners, 0, -1) if j != owner]:
        flexmoe.opt_out(own, other)
    # Every token of the row is the owner's; a high temperature makes the posterior exactly one-hot.
    route(model, BANDS[: owners + 1], kind, temperature=50.0)
    ids = tokens(BANDS[owner])
    got = lm_logits(model, ids)
    post = posterior_of(model).probs
    assert torch.equal(post[:, owner], torch.ones(ids.numel()))
    torch.testing.assert_close(got, lm_logits(own, ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_opt_out_is_bit_identical_to_the_model_converted_without_that_owner(kind):
    model = route(merged(), BANDS, kind)
    flexmoe.opt_out(model, "expert_2")
    without = merged()
    flexmoe.opt_out(without, "expert_2")
    stats = statistics(BANDS, kind)  # the same statistics, without expert_2's row
    keep = [0, 1, 3]
    use_posterior_routers(without, stats["unigram"][keep], bigram=stats["bigram"][keep] if "bigram" in stats else None)
    assert settings(model).owners == settings(without).owners == ["public", "expert_1", "expert_3"]
    assert_same_state(snapshot(model), snapshot(without))
    ids = mixed_ids()
    assert torch.equal(lm_logits(model, ids), lm_logits(without, ids))


@pytest.mark.parametrize("kind", KINDS)
def test_add_expert_leaves_every_other_owners_routing_unchanged(kind):
    full = merged()
    new = statistics([NEW_BAND], kind)  # the new owner's text, none of it in the rows below
    new_counts = new["unigram"][0] * 1e6  # much of it
    new_bigram = new["bigram"][0] * 1e6 if "bigram" in new else None
    artifact = ExpertArtifact.from_model(full, owner="expert_3", expert=3, unigram=new_counts, bigram=new_bigram)
    model = copy.deepcopy(full)
    flexmoe.opt_out(model, "expert_3")
    stats = statistics(BANDS[:3], kind)
    use_posterior_routers(model, stats["unigram"], bigram=stats.get("bigram"), temperature=1.0)
    before = [[b.router.expert_state(j) for j in range(OWNERS)] for b in moe_blocks(model)]
    ids = tokens(range(3, 63))  # public, expert_1 and expert_2 text only
    want = lm_logits(model, ids)
    chosen_before = posterior_of(model).probs[:, 1:].argmax(-1)

    flexmoe.add_expert(model, artifact)

    assert settings(model).owners[-1] == "expert_3"
    for block, old in zip(moe_blocks(model), before):
        for j in range(OWNERS):
            new = block.router.expert_state(j)
            assert all(torch.equal(new[k], old[j][k]) for k in old[j]), f"expert {j}'s router state moved"
    got = lm_logits(model, ids)
    post = posterior_of(model).probs
    assert post[:, 3].max() < 1e-6  # the new owner is never chosen on these rows ...
    assert torch.equal(post[:, 1:].argmax(-1), chosen_before)  # ... so every other choice stays
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # and the model is the one converted with that owner from the start
    direct = use_posterior_routers(
        copy.deepcopy(full),
        torch.cat([stats["unigram"], new_counts[None]]),
        bigram=torch.cat([stats["bigram"], new_bigram[None]]) if new_bigram is not None else None,
        temperature=1.0,
    )
    assert_same_state(snapshot(model), snapshot(direct))


@pytest.mark.parametrize("kind", KINDS)
def test_the_posterior_at_a_position_depends_only_on_the_tokens_up_to_it(kind):
    model = route(merged(), BANDS, kind)
    ids = mixed_ids()
    changed = ids.clone()
    changed[:, 9:] = tokens(BANDS[3], (2, 7), seed=9)
    a = lm_logits(model, ids)
    post_a = posterior_of(model).probs.reshape(2, 16, -1)
    b = lm_logits(model, changed)
    post_b = posterior_of(model).probs.reshape(2, 16, -1)
    assert torch.equal(post_a[:, :9], post_b[:, :9])
    assert not torch.equal(post_a[:, 9:], post_b[:, 9:])
    torch.testing.assert_close(a[:, :9], b[:, :9], atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_generate_with_the_cache_gives_the_full_recompute_tokens_from_running_sums(kind):
    model = route(merged(), BANDS, kind)
    ids, new = mixed_ids()[:, :10], 12
    state = posterior_of(model)
    state.scanned = 0
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    # one prefill of the prompt, then one position per new token (the last one is never fed back)
    assert state.scanned == ids.shape[1] + new - 1
    cached_sums = state.sums.clone()
    seq = ids
    for _ in range(new):
        last = lm_logits(model, seq)[:, -1]
        last[:, model.config.eos_token_id] = -float("inf")  # what min_new_tokens does
        seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)
    lm_logits(model, out[:, :-1])  # the positions the cached run read, read at once
    assert torch.equal(state.sums, cached_sums)


def test_left_padding_adds_no_evidence():
    """A left-padded row of a batch generates what the row generates alone: masked positions do
    not enter the posterior's sums."""
    model = use_posterior_routers(merged(), counts(BANDS))
    ids = mixed_ids()[:, :10]
    short = ids[1:, 3:]
    batch = torch.cat([ids[:1], torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    kw = {"max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        padded = model.generate(batch, attention_mask=mask, **kw)
        alone = model.generate(short, **kw)
    assert torch.equal(padded[1, 3:], alone[0])


def test_resetting_at_document_ends_restarts_the_posterior_from_the_prior():
    model = use_posterior_routers(merged(), counts(BANDS), reset_at_eos=True)
    first, second = tokens(BANDS[1], (1, 6)), tokens(BANDS[2], (1, 5), seed=4)
    eos = torch.tensor([[model.config.eos_token_id]])
    lm_logits(model, torch.cat([first, eos, second], 1))
    packed = posterior_of(model).probs[7:]
    lm_logits(model, second)
    assert torch.allclose(packed, posterior_of(model).probs, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_a_native_export_reloads_with_the_same_logits_and_a_gate_format_says_why_not(tmp_path, kind):
    model = route(merged(), BANDS, kind)
    export(model, tmp_path / "out", "native")
    loaded = load(tmp_path / "out")
    assert all(type(b.router) is PosteriorRouter for b in moe_blocks(loaded))
    assert posterior_of(loaded) is not None and posterior_of(loaded) is moe_blocks(loaded)[1].router.posterior
    assert settings(loaded).top_k == 2
    assert_same_state(snapshot(loaded), snapshot(model))
    ids = mixed_ids()
    assert torch.equal(lm_logits(loaded, ids), lm_logits(model, ids))
    flexmoe.opt_out(loaded, "expert_1")
    flexmoe.opt_out(model, "expert_1")
    assert torch.equal(lm_logits(loaded, ids), lm_logits(model, ids))
    with pytest.raises(RouterFormatError, match="posterior over domains"):
        export(model, tmp_path / "flexolmo", "flexolmo")


def test_conversion_refuses_counts_that_do_not_fit_the_model():
    model = merged()
    with pytest.raises(ValueError, match=r"\[4, 96\]"):
        use_posterior_routers(model, counts(BANDS[:3]))
    bad = counts(BANDS)
    bad[1, 5] = -1.0
    with pytest.raises(ValueError, match="non-negative"):
        use_posterior_routers(model, bad)


def test_bigrams_tell_apart_domains_that_share_their_words_in_another_order():
    """Two owners write the same tokens, one in rising and one in falling order: unigram counts
    cannot tell them apart, bigram counts can, and the posterior follows them from the row's second
    token on, advanced token by token as at once."""
    band = list(range(3, 23))
    rising = torch.tensor([[band[(i + s) % 20] for i in range(25)] for s in range(40)])
    falling = rising.flip(1)
    stats = [token_statistics(r, VOCAB, BUCKETS) for r in (tokens(range(23, 83), (40, 25)), rising, falling)]
    unigram = torch.stack([t.unigram for t in stats])
    assert torch.equal(unigram[1], unigram[2])
    model = use_posterior_routers(
        merged(owners=2), unigram, bigram=torch.stack([t.bigram for t in stats]), temperature=1.0
    )
    ids = rising[:1, :12]
    lm_logits(model, ids)
    post = posterior_of(model).probs
    assert post[0, 1] == post[0, 2]  # the first token has no pair yet
    assert (post[1:, 1] > 0.95).all() and (post[3:, 1] > 0.999).all()
    state = posterior_of(model)
    at_once = state.sums.clone()
    for t in range(ids.shape[1]):  # the same row fed one token at a time, carrying the last token
        state.advance(ids[:, t : t + 1], past=t)
    torch.testing.assert_close(state.sums, at_once, rtol=0, atol=1e-12)


def test_pairs_hash_into_every_bucket_in_range():
    from flexmoe.modeling.domain_posterior import bigram_bucket

    prev = torch.randint(0, 2**31 - 1, (4096,), generator=torch.Generator().manual_seed(0))
    cur = torch.randint(0, 2**31 - 1, (4096,), generator=torch.Generator().manual_seed(1))
    for buckets in (2, 2**10, 2**20, 2**24):
        got = bigram_bucket(prev, cur, buckets)
        assert got.min() >= 0 and got.max() < buckets
    spread = torch.bincount(bigram_bucket(prev, cur, 2**8), minlength=2**8)
    assert spread.min() > 0  # 4096 pairs reach every one of 256 buckets
    with pytest.raises(ValueError, match="power of two"):
        bigram_bucket(prev, cur, 3)
