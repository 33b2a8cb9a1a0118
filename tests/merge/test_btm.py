"""BTMEnsemble: Branch-Train-Merge's Bayesian mixture of expert LMs (Li et al., 2022, section 4.1), its
cached (EMA) prior, top-k and generate, and BTM parameter averaging (section 4.2)."""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexmoe.data.corpus import split_module
from flexmoe.data.packing import pack_domain
from flexmoe.merge import BTMEnsemble, btm_average
from flexmoe.testing import LICENSES, VOCAB, perturb_, tiny_config, tiny_model, train_tiny_tokenizer
from flexmoe.training.pretrain import PretrainModule


def _logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(ids).logits.float(), dim=-1)


def _members(n=3):
    models = [tiny_model("olmo2", seed=0) for _ in range(n)]
    for j, m in enumerate(models[1:], start=1):
        perturb_(m, seed=j, scale=0.3)
    return models


@pytest.fixture
def ids():
    return torch.randint(3, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


def test_one_member_is_that_member(ids):
    model = tiny_model("llama")
    out = BTMEnsemble([model])(ids)
    assert torch.equal(out.logits, _logprobs(model, ids))
    assert torch.equal(out.posterior, torch.ones(2, 16, 1))


def test_identical_members_equal_either(ids):
    model = tiny_model("olmo2")
    out = BTMEnsemble([model, model], prior=[0.2, 0.8])(ids)
    torch.testing.assert_close(out.logits, _logprobs(model, ids), atol=1e-5, rtol=0)
    # equal evidence never moves the posterior away from the prior
    torch.testing.assert_close(out.posterior, torch.tensor([0.2, 0.8]).expand(2, 16, 2))


def test_mixes_probabilities_by_the_prefix_posterior(ids):
    """Position by position: w_j(t) ∝ prior_j * prod_{s<t} p_j(x_{s+1} | x_<=s), and the
    next-token distribution is sum_j w_j(t) p_j(. | x_<=t) (probabilities, not logits)."""
    members, prior = _members(3), torch.tensor([0.5, 0.3, 0.2])
    out = BTMEnsemble(members, prior=prior.tolist())(ids)
    lp = torch.stack([_logprobs(m, ids) for m in members]).double()  # [N, B, T, V]
    B, T = ids.shape
    for b in range(B):
        evidence = torch.zeros(len(members), dtype=torch.float64)
        for t in range(T):
            w = prior.double() * torch.exp(evidence - evidence.max())
            w = w / w.sum()
            expected = torch.log((w[:, None] * lp[:, b, t].exp()).sum(0))
            torch.testing.assert_close(out.posterior[b, t].double(), w, atol=1e-6, rtol=1e-5)
            torch.testing.assert_close(out.logits[b, t].double(), expected, atol=2e-5, rtol=0)
            if t + 1 < T:
                evidence += lp[:, b, t, ids[b, t + 1]]


def test_position_zero_uses_the_prior(ids):
    out = BTMEnsemble(_members(2), prior=[1.0, 3.0])(ids)
    torch.testing.assert_close(out.posterior[:, 0], torch.tensor([0.25, 0.75]).expand(2, 2))


def test_causal_future_tokens_change_nothing_before_them(ids):
    ensemble = BTMEnsemble(_members(3))
    s = 9
    changed = ids.clone()
    changed[:, s] = (changed[:, s] + 7 - 3) % (VOCAB - 3) + 3
    a, b = ensemble(ids), ensemble(changed)
    assert torch.equal(a.logits[:, :s], b.logits[:, :s])
    assert torch.equal(a.posterior[:, :s], b.posterior[:, :s])
    # position s conditions on x_s: its prediction and its weights take the new token into account
    assert not torch.allclose(a.logits[:, s], b.logits[:, s])
    assert not torch.allclose(a.posterior[:, s], b.posterior[:, s])


def test_sequence_likelihood_is_the_prior_weighted_mixture(ids):
    """The chain rule telescopes: prod_t p_mix(x_{t+1} | x_<=t) = sum_j prior_j p_j(x_1..x_T | x_0),
    so the mixture's total NLL is at most the best member's plus -log prior_best."""
    members, prior = _members(3), torch.tensor([0.6, 0.3, 0.1])
    out = BTMEnsemble(members, prior=prior.tolist())(ids, labels=ids)
    nxt = ids[:, 1:, None]
    mix = out.logits[:, :-1].gather(-1, nxt).squeeze(-1).double().sum(1)  # [B]
    each = torch.stack([_logprobs(m, ids)[:, :-1].gather(-1, nxt).squeeze(-1).double().sum(1) for m in members])
    torch.testing.assert_close(mix, torch.logsumexp(prior.double().log()[:, None] + each, 0), atol=1e-3, rtol=0)
    assert (-mix <= (-each - prior.double().log()[:, None]).min(0).values + 1e-3).all()
    # loss is the mean next-token NLL, as transformers computes it
    torch.testing.assert_close(out.loss.double(), -mix.sum() / nxt.numel(), atol=1e-5, rtol=0)


def test_posterior_concentrates_on_the_member_that_fits(public_dir):
    """On real prose, a model and a badly damaged copy of it: the posterior moves to the
    model that predicts the prefix better, and the mixture is nearly as good as that model."""
    tok = AutoTokenizer.from_pretrained(public_dir)
    text = Path(LICENSES, "GPL-3").read_text(encoding="utf-8")
    ids = torch.tensor([tok(text)["input_ids"][:64]])
    good = AutoModelForCausalLM.from_pretrained(public_dir).eval()
    bad = AutoModelForCausalLM.from_pretrained(public_dir).eval()
    perturb_(bad, seed=3, scale=0.5)
    with torch.no_grad():
        nll_good, nll_bad = good(ids, labels=ids).loss.item(), bad(ids, labels=ids).loss.item()
    assert nll_good < nll_bad  # the construction: the damaged copy fits worse
    for order in ([bad, good], [good, bad]):
        out = BTMEnsemble(order)(ids, labels=ids)
        g = order.index(good)
        torch.testing.assert_close(out.posterior[0, 0], torch.tensor([0.5, 0.5]))
        assert (out.posterior[0, 16:, g] > 0.9).all()
        nll_mix = out.loss.item()
        assert nll_mix <= nll_bad
        assert nll_mix <= nll_good + math.log(2) / (ids.shape[1] - 1) + 1e-5


def test_from_dirs_loads_each_member(tmp_path, ids):
    members = _members(2)
    for j, m in enumerate(members):
        m.save_pretrained(tmp_path / f"m{j}")
    loaded = BTMEnsemble.from_dirs([tmp_path / "m0", tmp_path / "m1"])
    torch.testing.assert_close(loaded(ids).logits, BTMEnsemble(members)(ids).logits, atol=1e-6, rtol=0)


def test_refuses_what_it_cannot_mix():
    with pytest.raises(ValueError, match="at least one"):
        BTMEnsemble([])
    with pytest.raises(ValueError, match="vocabulary"):
        BTMEnsemble([tiny_model(), tiny_model(vocab_size=VOCAB + 8)])
    with pytest.raises(ValueError, match="2 weights for 3 models"):
        BTMEnsemble(_members(3), prior=[0.5, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        BTMEnsemble(_members(2), prior=[1.5, -0.5])


def test_a_member_with_prior_zero_never_contributes(ids):
    members = _members(3)
    out = BTMEnsemble(members, prior=[0.0, 0.0, 1.0])(ids)
    torch.testing.assert_close(out.logits, _logprobs(members[2], ids), atol=1e-6, rtol=0)
    assert torch.isfinite(out.logits).all()


# -- experts trained on two far-apart domains ----------------------------------------------------

CODE_TRAIN, CODE_HELD_OUT = ["textwrap", "shlex", "heapq", "string"], ["glob", "fnmatch"]
PROSE_TRAIN, PROSE_HELD_OUT = ["GPL-2", "Apache-2.0", "MPL-2.0", "LGPL-2.1"], ["Artistic", "CC0-1.0"]


def _python_sources(names):
    """Standard-library modules as code only (docstrings and comments removed: they are prose)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return [split_module((stdlib / f"{n}.py").read_text(encoding="utf-8"))[0] for n in names]


def _licences(names):
    return [Path(LICENSES, n).read_text(encoding="utf-8") for n in names]


def _train_lm(rows, config, steps=60):
    """A tiny OLMo-2 branched from one seed (the same init for every domain), trained with Lightning."""
    pl.seed_everything(0)
    module = PretrainModule(config.to_dict(), lr=1e-2, warmup_steps=4, max_steps=steps, weight_decay=0.0)
    loader = DataLoader(
        rows,
        batch_size=8,
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
    )
    trainer.fit(module, loader)
    return module.model.eval()


@pytest.fixture(scope="module")
def domains():
    """{"code"|"prose": (model, held-out rows [8, 48])}: one expert per domain, one tokenizer. The
    held-out rows are spread over the held-out text, skipping the first (a module's imports)."""
    texts = {
        "code": (_python_sources(CODE_TRAIN), _python_sources(CODE_HELD_OUT)),
        "prose": (_licences(PROSE_TRAIN), _licences(PROSE_HELD_OUT)),
    }
    tok = train_tiny_tokenizer([t for train, _ in texts.values() for t in train])
    config = tiny_config("olmo2", vocab_size=len(tok), max_position_embeddings=128)
    out = {}
    for name, (train, held_out) in texts.items():
        model = _train_lm(pack_domain(train, tok, seq_len=64), config)
        rows = pack_domain(held_out, tok, seq_len=48)
        out[name] = (model, rows[torch.linspace(1, len(rows) - 1, 8).long()])
    return out


def test_posterior_concentrates_on_the_in_domain_expert(domains):
    (code, code_rows), (prose, prose_rows) = domains["code"], domains["prose"]
    ensemble = BTMEnsemble([code, prose])
    for j, rows in enumerate([code_rows, prose_rows]):
        out = ensemble(rows, labels=rows)
        torch.testing.assert_close(out.posterior[:, 0], torch.full((rows.shape[0], 2), 0.5))
        assert (out.posterior[:, 32:, j] > 0.9).all(), out.posterior[:, :, j].min(dim=0).values
        with torch.no_grad():
            nll_in = ensemble.members[j](rows, labels=rows).loss.item()
            nll_out = ensemble.members[1 - j](rows, labels=rows).loss.item()
        assert nll_in < nll_out  # each expert did learn its own domain
        assert out.loss.item() <= nll_in + math.log(2) / (rows.shape[1] - 1) + 1e-5


def _token_logprobs(models, rows):
    """Every member's log-probability of each next token, ``[N, S, T-1]``, computed directly."""
    with torch.no_grad():
        return torch.stack(
            [_logprobs(m, rows)[:, :-1].gather(-1, rows[:, 1:, None]).squeeze(-1).double() for m in models]
        )


def _ema(prior, evidence, alpha=0.3):
    """One refresh of the cached prior, written out: π ← (1 − α) π + α · softmax(log π + evidence)."""
    post = prior * torch.exp(evidence - evidence.max())
    return (1 - alpha) * prior + alpha * post / post.sum()


def test_ema_prior_moves_toward_the_held_out_domain(domains):
    (code, code_rows), (prose, prose_rows) = domains["code"], domains["prose"]
    for j, rows in enumerate([code_rows, prose_rows]):
        ensemble = BTMEnsemble([code, prose], held_out=rows[:4])
        prior = ensemble.prior
        assert prior[j] > 0.7, prior
        # one refresh per held-out sequence, each under the prior as it stands, from uniform
        lp = _token_logprobs([code, prose], rows[:4]).sum(-1)  # [N, S]
        expected = torch.full((2,), 0.5, dtype=torch.float64)
        for s in range(4):
            expected = _ema(expected, lp[:, s])
        torch.testing.assert_close(prior.double(), expected, atol=1e-5, rtol=0)
        assert ensemble.prior_refreshes == 4
        # more held-out sequences, or a larger alpha, move it further
        assert ensemble.fit_prior(rows)[j] > prior[j]
        assert BTMEnsemble([code, prose]).fit_prior(rows[:4], ema_alpha=0.6)[j] > prior[j]


def test_cached_prior_is_refreshed_every_n_tokens_of_the_stream(domains):
    """``update_every=N``: the held-out rows are one stream cut into blocks of N predicted tokens,
    across row boundaries (a last, shorter block counts too), and each block's posterior is taken
    under the prior as it stands. Blocks of 8 tokens carry little evidence each, so that differs
    clearly from an EMA of uniform-prior posteriors."""
    (code, code_rows), (prose, _) = domains["code"], domains["prose"]
    rows = code_rows[:3]  # 3 x 47 predicted tokens = 141 = 17 blocks of 8 and one of 5
    ensemble = BTMEnsemble([code, prose], update_every=8)
    got = ensemble.fit_prior(rows)
    stream = _token_logprobs([code, prose], rows).reshape(2, -1)  # row after row
    expected = torch.full((2,), 0.5, dtype=torch.float64)
    uniform_posteriors = expected.clone()
    for start in range(0, stream.shape[1], 8):
        evidence = stream[:, start : start + 8].sum(-1)
        expected = _ema(expected, evidence)
        uniform_posteriors = 0.7 * uniform_posteriors + 0.3 * torch.softmax(evidence, 0)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    assert ensemble.prior_refreshes == 18
    assert (got.double() - uniform_posteriors).abs().max() > 0.05  # the test tells the two apart
    with pytest.raises(ValueError, match="update_every"):
        ensemble.fit_prior(rows, update_every=0)


def test_cached_prior_tracks_the_domain_of_a_long_stream(domains):
    """Refreshed as evidence arrives, the prior follows the stream: it goes to the code expert on
    code, then, continued on prose, moves over to the prose expert."""
    (code, code_rows), (prose, prose_rows) = domains["code"], domains["prose"]
    ensemble = BTMEnsemble([code, prose], update_every=16)
    assert ensemble.fit_prior(code_rows)[0] > 0.9
    assert ensemble.update_prior(prose_rows)[1] > 0.9
    assert ensemble.update_prior(code_rows)[0] > 0.9


def test_ema_prior_weighs_recent_sequences_more(domains):
    (code, code_rows), (prose, prose_rows) = domains["code"], domains["prose"]
    ensemble = BTMEnsemble([code, prose], prior="ema")
    code_last = ensemble.fit_prior([*prose_rows[:3], *code_rows[:3]])
    prose_last = ensemble.fit_prior([*code_rows[:3], *prose_rows[:3]])
    assert code_last[0] > 0.5 > prose_last[0]


def test_the_papers_configuration_is_the_default(ids):
    """Cached EMA prior (alpha 0.3, uniform until held-out text refreshes it) and top-3."""
    members = _members(5)
    ensemble = BTMEnsemble(members)
    assert ensemble.prior_kind == "ema" and ensemble.top_k == 3 and ensemble.ema_alpha == 0.3
    torch.testing.assert_close(ensemble.prior, torch.full((5,), 0.2))
    out = ensemble(ids)
    assert ((out.posterior > 0).sum(-1) == 3).all()  # top-3 keeps three domains at every position
    full = BTMEnsemble(members, prior=None, top_k=None)(ids).posterior
    kept = full * torch.zeros_like(full).scatter(-1, full.topk(3, dim=-1).indices, 1.0)
    torch.testing.assert_close(out.posterior, kept / kept.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)


def test_prior_settings_are_checked(ids):
    with pytest.raises(ValueError, match="prior='ema'"):
        BTMEnsemble(_members(2), prior=None, held_out=ids)
    with pytest.raises(ValueError, match="ema_alpha"):
        BTMEnsemble(_members(2), prior="ema", ema_alpha=0.0)
    with pytest.raises(ValueError, match="'ema'"):
        BTMEnsemble(_members(2), prior="cached")
    with pytest.raises(ValueError, match="update_every"):
        BTMEnsemble(_members(2), update_every=-3)


# -- top-k ----------------------------------------------------------------------------------------


def test_top_1_is_the_most_probable_member_at_every_position(ids):
    members = _members(3)
    full = BTMEnsemble(members, prior=[0.5, 0.3, 0.2])(ids)
    out = BTMEnsemble(members, prior=[0.5, 0.3, 0.2], top_k=1)(ids)
    best = full.posterior.argmax(-1)  # [B, T]
    lp = torch.stack([_logprobs(m, ids) for m in members], dim=2)  # [B, T, N, V]
    expected = lp.gather(2, best[..., None, None].expand(-1, -1, 1, lp.shape[-1])).squeeze(2)
    torch.testing.assert_close(out.logits, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.posterior, torch.nn.functional.one_hot(best, 3).float())
    assert len(set(best.flatten().tolist())) > 1  # the argmax does change along the sequences


def test_top_k_renormalises_the_kept_domains(ids):
    members, prior = _members(3), [0.5, 0.3, 0.2]  # no ties at position 0
    full = BTMEnsemble(members, prior=prior)(ids)
    out = BTMEnsemble(members, prior=prior, top_k=2)(ids)
    assert ((out.posterior > 0).sum(-1) == 2).all()
    torch.testing.assert_close(out.posterior.sum(-1), torch.ones(ids.shape))
    dropped = full.posterior.argmin(-1, keepdim=True)
    kept = full.posterior.scatter(-1, dropped, 0.0)
    torch.testing.assert_close(out.posterior, kept / kept.sum(-1, keepdim=True), atol=1e-6, rtol=1e-5)
    lp = torch.stack([_logprobs(m, ids) for m in members], dim=2).double()
    expected = torch.log((out.posterior.double()[..., None] * lp.exp()).sum(2))
    torch.testing.assert_close(out.logits.double(), expected, atol=2e-5, rtol=0)
    # top_k >= the number of members is the plain ensemble
    torch.testing.assert_close(BTMEnsemble(members, prior=prior, top_k=3)(ids).logits, full.logits)
    with pytest.raises(ValueError, match="top_k"):
        BTMEnsemble(members, top_k=0)


# -- generate -------------------------------------------------------------------------------------


def test_generate_with_one_member_is_that_members_generate():
    model = tiny_model("llama")
    prompt = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    expected = model.generate(prompt, max_new_tokens=12, do_sample=False)
    assert torch.equal(BTMEnsemble([model]).generate(prompt, max_new_tokens=12), expected)


def test_generate_picks_the_mixtures_argmax_and_tracks_the_posterior(ids):
    """Greedy decoding with per-member caches agrees with a full forward pass over its output:
    every new token is the argmax of the mixture given the sequence so far."""
    for top_k in (None, 2):
        ensemble = BTMEnsemble(_members(3), prior=[0.2, 0.3, 0.5], top_k=top_k)
        prompt = ids[:, :6]
        out = ensemble.generate(prompt, max_new_tokens=10, eos_token_id=[])
        assert out.shape == (2, 16) and torch.equal(out[:, :6], prompt)
        logits = ensemble(out).logits
        assert torch.equal(logits[:, 5:-1].argmax(-1), out[:, 6:])


def test_generate_samples_reproducibly_and_stops_at_eos(ids):
    ensemble = BTMEnsemble(_members(2))
    prompt = ids[:, :4]
    a = ensemble.generate(prompt, max_new_tokens=8, do_sample=True, generator=torch.Generator().manual_seed(0))
    b = ensemble.generate(prompt, max_new_tokens=8, do_sample=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (2, 12)
    # the first sampled token declared EOS: those sequences end and are padded from then on
    eos = int(a[0, 4])
    c = ensemble.generate(
        prompt,
        max_new_tokens=8,
        do_sample=True,
        eos_token_id=eos,
        pad_token_id=0,
        generator=torch.Generator().manual_seed(0),
    )
    assert c[0, 4] == eos and (c[0, 5:] == 0).all()
    assert torch.equal(ensemble.generate(prompt, max_new_tokens=0), prompt)


# -- BTM averaging --------------------------------------------------------------------------------


def test_btm_average_weighs_parameters_by_the_posterior():
    members = _members(3)
    one_hot = btm_average(members, [0.0, 1.0, 0.0])
    for (name, p), q in zip(one_hot.state_dict().items(), members[1].state_dict().values()):
        assert torch.equal(p, q), name
    mixed = btm_average(members, torch.tensor([0.5, 0.25, 0.25]))
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = sum(w * m.state_dict()[name] for w, m in zip([0.5, 0.25, 0.25], members))
    torch.testing.assert_close(mixed.state_dict()[name], expected)
    assert members[0].state_dict()[name].data_ptr() != mixed.state_dict()[name].data_ptr()
    with pytest.raises(ValueError, match="2 weights for 3 experts"):
        btm_average(members, [0.5, 0.5])
    with pytest.raises(ValueError, match="one weight per expert"):
        btm_average(members, torch.ones(2, 3))


def test_btm_average_with_the_fitted_prior(domains):
    (code, code_rows), (prose, _) = domains["code"], domains["prose"]
    ensemble = BTMEnsemble([code, prose], prior="ema", held_out=code_rows[:4])
    averaged = btm_average(ensemble.members, ensemble.prior)
    with torch.no_grad():
        nll = {
            name: m(code_rows, labels=code_rows).loss.item()
            for name, m in [("avg", averaged), ("code", code), ("prose", prose)]
        }
    assert nll["avg"] < nll["prose"]  # weighted toward the code expert, it models code better than prose's
