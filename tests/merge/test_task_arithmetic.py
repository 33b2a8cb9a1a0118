"""Task vectors (Ilharco et al., 2023) and weight disentanglement (Ortiz-Jiménez et al., 2023)."""

from __future__ import annotations

import copy

import pytest
import torch

from flexmoe.merge import (
    TaskVector,
    analogy,
    disentanglement_error,
    disentanglement_grid,
    plot_disentanglement,
    task_arithmetic,
)
from flexmoe.testing import VOCAB, license_texts, perturb_, tiny_model


def _finetuned(seed, scale=0.05, arch="llama", **overrides):
    model = tiny_model(arch, **overrides)
    perturb_(model, seed=seed, scale=scale)
    return model


def _same_weights(a, b, atol=0.0):
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=atol, msg=name)


def test_tau_minus_tau_is_zero():
    tau = TaskVector.from_models(_finetuned(1), tiny_model("llama"))
    zero = tau - tau
    assert set(zero.deltas) == set(tau.deltas)
    assert all(bool((v == 0).all()) for v in zero.deltas.values())
    assert zero.norm() == 0.0 and tau.norm() > 0


def test_tau_plus_its_negation_applied_gives_the_base():
    base, ft = tiny_model("olmo2"), _finetuned(1, arch="olmo2")
    tau = TaskVector.from_models(ft, base)
    _same_weights((tau + (-tau)).apply(base), base)
    _same_weights(tau.apply(base), ft, atol=1e-7)  # θ0 + (θ − θ0) in float32
    _same_weights(tau.apply(base, scale=0.0), base)


def test_algebra():
    base = tiny_model("llama")
    a, b, c = (TaskVector.from_models(_finetuned(s), base) for s in (1, 2, 3))
    for name in a.deltas:
        x, y, z = a.deltas[name], b.deltas[name], c.deltas[name]
        torch.testing.assert_close((a + b).deltas[name], x + y)
        torch.testing.assert_close((2 * a).deltas[name], 2 * x)
        torch.testing.assert_close((a * 0.5).deltas[name], 0.5 * x)
        torch.testing.assert_close((a / 4).deltas[name], x / 4)
        torch.testing.assert_close(sum([a, b, c]).deltas[name], x + y + z)
        torch.testing.assert_close(TaskVector.sum([a, b, c]).deltas[name], x + y + z)
        torch.testing.assert_close(analogy(a, b, c, (1.0, 0.5, 2.0)).deltas[name], x + 0.5 * y - 2 * z)
    assert a.cosine(a) == pytest.approx(1.0) and a.cosine(-a) == pytest.approx(-1.0)


def test_non_floating_point_tensors_are_skipped():
    base = {"w": torch.zeros(3), "count": torch.tensor([1, 2, 3])}
    ft = {"w": torch.tensor([1.0, -2.0, 0.5]), "count": torch.tensor([9, 9, 9])}
    tau = TaskVector.from_models(ft, base)
    assert list(tau.deltas) == ["w"]
    out = (3 * tau).apply(base)
    assert torch.equal(out["w"], torch.tensor([3.0, -6.0, 1.5]))
    assert torch.equal(out["count"], base["count"])


def test_mismatched_task_vectors_are_refused():
    tau = TaskVector.from_models(_finetuned(1), tiny_model("llama"))
    other = TaskVector(dict(list(tau.deltas.items())[1:]))
    with pytest.raises(ValueError, match="different models"):
        tau + other
    with pytest.raises(ValueError, match="shape|same tensors"):
        TaskVector.from_models(tiny_model("llama", hidden_size=64), tiny_model("llama"))


def test_task_arithmetic_equals_the_sum_of_weighted_task_vectors():
    base = tiny_model("qwen2")
    fts = [_finetuned(s, arch="qwen2") for s in (1, 2, 3)]
    merged = task_arithmetic(base, fts, lam=0.7, weights=[1.0, -0.5, 2.0])
    taus = [TaskVector.from_models(f, base) for f in fts]
    expected = (1.0 * taus[0] - 0.5 * taus[1] + 2.0 * taus[2]).apply(base, scale=0.7)
    _same_weights(merged, expected, atol=1e-6)
    assert merged is not base
    # and both are θ0 + λ Σ w_i (θ_i − θ0), written out on the state dicts
    b, states = base.state_dict(), [f.state_dict() for f in fts]
    for name, t in merged.state_dict().items():
        direct = b[name] + 0.7 * sum(w * (s[name] - b[name]) for w, s in zip([1.0, -0.5, 2.0], states))
        torch.testing.assert_close(t, direct, atol=1e-6, rtol=0, msg=name)


def _text_ids(text: str, n_tokens: int = 96):
    """Real prose from the machine, as byte-level ids in the tiny vocabulary, ``[2, n/2]``."""
    ids = [3 + b % (VOCAB - 3) for b in text.encode()[:n_tokens]]
    return torch.tensor(ids).reshape(2, -1)


def _train(model, batches, steps, lr):
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for i in range(steps):
        ids = batches[i % len(batches)]
        opt.zero_grad()
        model(ids, labels=ids).loss.backward()
        opt.step()
    return model.eval()


def _nll(model, ids):
    with torch.no_grad():
        return float(model(ids, labels=ids).loss)


def test_negating_a_task_vector_lowers_the_tasks_likelihood():
    """Forgetting by negation (Ilharco et al., section 3): θ0 − τ is worse on the task than θ0."""
    texts = license_texts()
    task = _text_ids(texts[0])
    general = [_text_ids(t[500:]) for t in texts[1:] if len(t) > 700]
    base = _train(tiny_model("llama"), general, steps=20, lr=3e-3)  # a "pre-trained" model
    ft = _train(copy.deepcopy(base), [task], steps=10, lr=1e-3)
    tau = TaskVector.from_models(ft, base)
    nll_base, nll_ft, nll_neg = _nll(base, task), _nll(tau.apply(base), task), _nll((-tau).apply(base), task)
    assert nll_ft < nll_base - 0.2  # the fine-tuning learned the text
    assert nll_neg > nll_base + 0.2  # and its negation unlearns it beyond the base


# -- weight disentanglement ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_tasks():
    base = tiny_model("llama")
    taus = [TaskVector.from_models(_finetuned(s, scale=0.2), base) for s in (1, 2)]
    g = torch.Generator().manual_seed(0)
    data = (torch.randint(3, VOCAB, (2, 10), generator=g), torch.randint(3, VOCAB, (2, 10), generator=g))
    return base, taus, data


def _preds(model, ids):
    with torch.no_grad():
        return model(ids).logits.argmax(-1)


def test_disentanglement_error_is_the_papers_definition(two_tasks):
    """ξ = Σ_t P_{x~D_t}[f(x; θ0 + α_t τ_t) ≠ f(x; θ0 + α1 τ1 + α2 τ2)], per predicted token."""
    base, (t1, t2), (d1, d2) = two_tasks

    def edited(x1, x2):  # θ0 + x1 τ1 + x2 τ2, written out on a copy of the base's weights
        model = copy.deepcopy(base)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.add_(x1 * t1.deltas[name] + x2 * t2.deltas[name])
        return model

    # (1.5, -2) interferes on nearly every token; (0.4, -0.2) on some, so a wrong sign or scale shows
    for a1, a2 in [(1.5, -2.0), (0.4, -0.2)]:
        both = edited(a1, a2)
        expected = float((_preds(edited(a1, 0.0), d1) != _preds(both, d1)).float().mean())
        expected += float((_preds(edited(0.0, a2), d2) != _preds(both, d2)).float().mean())
        assert expected > 0  # two random edits of this size interfere somewhere
        assert disentanglement_error(base, base, t1, t2, a1, a2, (d1, d2)) == pytest.approx(expected)


def test_disentanglement_error_is_zero_at_the_origin_and_symmetric_in_the_tasks(two_tasks):
    base, (t1, t2), (d1, d2) = two_tasks
    assert disentanglement_error(base, base, t1, t2, 0.0, 0.0, (d1, d2)) == 0.0
    xi = disentanglement_error(base, None, t1, t2, 2.0, -1.0, (d1, d2))
    assert xi == pytest.approx(disentanglement_error(base, None, t2, t1, -1.0, 2.0, (d2, d1)))


def test_disentanglement_error_ignores_padding(two_tasks):
    base, (t1, t2), (d1, d2) = two_tasks
    mask = torch.ones_like(d1)
    batches = ([{"input_ids": d1, "attention_mask": mask}], [d2])
    assert disentanglement_error(base, base, t1, t2, 2.0, 2.0, batches) == pytest.approx(
        disentanglement_error(base, base, t1, t2, 2.0, 2.0, (d1, d2))
    )


def test_grid_matches_pointwise_errors_and_plots(two_tasks, tmp_path):
    base, (t1, t2), data = two_tasks
    alphas = [0.0, 1.0, 2.0]
    grid = disentanglement_grid(base, base, t1, t2, data, alphas)
    assert grid.shape == (3, 3) and grid[0, 0] == 0
    for i, j in [(2, 2), (1, 2), (2, 0)]:
        expected = disentanglement_error(base, base, t1, t2, alphas[i], alphas[j], data)
        assert float(grid[i, j]) == pytest.approx(expected)
    plot_disentanglement(grid, alphas, path=tmp_path / "xi.png")
    assert (tmp_path / "xi.png").stat().st_size > 1000


def test_base_model_is_not_modified(two_tasks):
    base, (t1, t2), data = two_tasks
    before = {k: v.clone() for k, v in base.state_dict().items()}
    disentanglement_error(base, base, t1, t2, 1.0, 1.0, data)
    t1.apply(base, scale=3.0)
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
