"""BTMEnsemble: Branch-Train-Merge's Bayesian mixture of expert LMs (Li et al., 2022, section 4.1)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import LICENSES, VOCAB, perturb_, tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexmoe.merge import BTMEnsemble


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
