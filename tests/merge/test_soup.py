"""Model soups (Wortsman et al., 2022) and FlexOlmo's weighted-soup baseline."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flexmoe import upcycle
from flexmoe.merge import WeightedSoup, average
from flexmoe.testing import perturb_, tiny_model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _variants(n, arch="llama", scale=0.05, **overrides):
    models = [tiny_model(arch, **overrides) for _ in range(n)]
    for i, m in enumerate(models):
        perturb_(m, seed=i + 1, scale=scale)
    return models


@pytest.mark.parametrize("arch", ["olmo2", "llama", "qwen3"])
def test_uniform_soup_of_identical_models_is_the_model(arch, ids):
    model = tiny_model(arch)
    soup = average([model, tiny_model(arch), tiny_model(arch)])
    assert type(soup) is type(model) and soup is not model
    for (name, a), b in zip(model.state_dict().items(), soup.state_dict().values()):
        assert torch.equal(a, b), name
    assert torch.equal(_logits(soup, ids), _logits(model, ids))


def test_soup_of_identical_moes_is_the_moe(ids):
    moe = upcycle(tiny_model("olmo2"), num_experts=2, top_k=2)
    perturb_(moe, seed=3)
    soup = average([moe, moe])
    assert torch.equal(_logits(soup, ids), _logits(moe, ids))


def test_weighted_average_math():
    a, b = _variants(2)
    sa, sb = a.state_dict(), b.state_dict()
    soup = average([a, b], weights=[1.0, 3.0])
    for name, t in soup.state_dict().items():
        torch.testing.assert_close(t, (sa[name] + 3 * sb[name]) / 4, rtol=0, atol=1e-6)
    uniform = average([sa, sb])
    assert isinstance(uniform, dict) and set(uniform) == set(sa)
    for name, t in uniform.items():
        torch.testing.assert_close(t, (sa[name] + sb[name]) / 2, rtol=0, atol=1e-6)


def test_state_dicts_keep_integer_tensors_and_inputs_untouched():
    a = {"w": torch.tensor([1.0, 2.0]), "step": torch.tensor(7)}
    b = {"w": torch.tensor([3.0, 6.0]), "step": torch.tensor(9)}
    before = {k: v.clone() for k, v in a.items()}
    out = average([a, b], weights=[3, 1])
    assert torch.equal(out["w"], torch.tensor([1.5, 3.0]))
    assert torch.equal(out["step"], torch.tensor(7))  # not floating point: from the first model
    assert all(torch.equal(a[k], before[k]) for k in a)


def test_tied_embeddings_stay_tied():
    a, b = _variants(2, tie_word_embeddings=True)
    soup = average([a, b])
    assert soup.lm_head.weight.data_ptr() == soup.model.embed_tokens.weight.data_ptr()
    expected = (a.model.embed_tokens.weight + b.model.embed_tokens.weight) / 2
    torch.testing.assert_close(soup.lm_head.weight, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("weights", [[1.0], [1.0, -1.0], [0.0, 0.0], [1.0, float("nan")]])
def test_bad_weights_are_refused(weights):
    with pytest.raises(ValueError, match="weights"):
        average(_variants(2), weights=weights)


def test_different_architectures_are_refused():
    with pytest.raises(ValueError, match="same|shape"):
        average([tiny_model("llama"), tiny_model("llama", hidden_size=64)])


# -- WeightedSoup -------------------------------------------------------------------------------


def _prefix_loglik(model, ids, P):
    lp = torch.log_softmax(_logits(model, ids[:, :P]).double(), dim=-1)
    return lp[:, :-1].gather(-1, ids[:, 1:P, None]).squeeze(-1).sum(1)


def test_weights_are_the_softmax_of_prefix_log_likelihoods(ids):
    members = _variants(3, scale=0.3)
    soup = WeightedSoup(members, prefix_len=6)
    expected = torch.softmax(torch.stack([_prefix_loglik(m, ids, 6) for m in members], -1), -1).float()
    torch.testing.assert_close(soup.prefix_weights(ids), expected)
    warm = WeightedSoup(members, prefix_len=6, temperature=5.0)
    scores = torch.stack([_prefix_loglik(m, ids, 6) for m in members], -1)
    torch.testing.assert_close(warm.prefix_weights(ids), torch.softmax(scores / 5.0, -1).float())


def test_each_sequence_runs_with_its_own_parameter_average(ids):
    members = _variants(2, scale=0.3)
    soup = WeightedSoup(members, prefix_len=5)
    out = soup(ids, labels=ids)
    for b in range(ids.shape[0]):
        merged = average(members, weights=out.weights[b].tolist())
        torch.testing.assert_close(out.logits[b], _logits(merged, ids[b : b + 1])[0], atol=1e-5, rtol=1e-5)
    # the loss leaves out the targets inside the prefix, which chose the weights
    target = ids[:, 1:].clone()
    target[:, :4] = -100
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), target.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_weights_favour_the_model_that_knows_the_prefix():
    """A member trained to repeat a pattern wins the soup weight on that pattern."""
    base = tiny_model("llama")
    trained = tiny_model("llama")
    pattern = torch.tensor([[5, 9, 17, 33, 5, 9, 17, 33] * 3])
    opt = torch.optim.Adam(trained.parameters(), lr=3e-3)
    trained.train()
    for _ in range(25):
        opt.zero_grad()
        trained(pattern, labels=pattern).loss.backward()
        opt.step()
    trained.eval()
    w = WeightedSoup([base, trained], prefix_len=8).prefix_weights(pattern)
    assert w[0, 1] > 0.99


def test_one_member_soup_is_that_member(ids):
    model = tiny_model("olmo2")
    out = WeightedSoup([model], prefix_len=4)(ids)
    assert torch.equal(out.weights, torch.ones(ids.shape[0], 1))
    torch.testing.assert_close(out.logits, _logits(model, ids), atol=1e-6, rtol=0)


def test_soup_needs_one_architecture():
    with pytest.raises(ValueError, match="architecture"):
        WeightedSoup([tiny_model("llama"), tiny_model("llama", intermediate_size=64)])
    with pytest.raises(ValueError, match="prefix_len"):
        WeightedSoup([tiny_model("llama")], prefix_len=1)


def test_members_are_not_modified(ids):
    members = _variants(2)
    before = [{k: v.clone() for k, v in m.state_dict().items()} for m in members]
    WeightedSoup(members, prefix_len=4)(ids, labels=ids)
    for m, b in zip(members, before):
        assert all(torch.equal(v, b[k]) for k, v in m.state_dict().items())
