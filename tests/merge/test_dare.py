"""DARE (Yu et al., 2024): drop each delta entry with probability p, rescale by 1/(1-p)."""

from __future__ import annotations

import pytest
import torch

from flexmoe.merge import dare, task_arithmetic, ties
from flexmoe.testing import perturb_, tiny_model


def _state(seed, n=2000, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(n, generator=g) * scale, "v": torch.randn(4, 5, generator=g) * scale}


def _ft(base, seed, scale=0.1):
    return {k: v + d for (k, v), d in zip(base.items(), _state(seed, n=base["w"].numel(), scale=scale).values())}


def test_without_dropping_it_is_task_arithmetic_or_ties():
    base = tiny_model("llama")
    fts = [tiny_model("llama") for _ in range(3)]
    for i, m in enumerate(fts):
        perturb_(m, seed=i + 1)
    linear = dare(base, fts, drop=0.0, lam=0.5, weights=[1.0, 2.0, -1.0])
    expected = task_arithmetic(base, fts, lam=0.5, weights=[1.0, 2.0, -1.0])
    for (k, a), b in zip(linear.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(a, b), k
    sd = [m.state_dict() for m in fts]
    as_ties = dare(base.state_dict(), sd, drop=0.0, then="ties")
    expected = ties(base.state_dict(), sd, density=1.0)
    assert all(torch.equal(as_ties[k], expected[k]) for k in expected)


def test_survivors_are_rescaled_and_about_one_minus_p_survive():
    base = _state(0)
    ft = _ft(base, 1)
    p = 0.9
    delta = dare(base, [ft], drop=p, seed=3)["w"] - base["w"]
    tau = ft["w"] - base["w"]
    kept = delta != 0
    torch.testing.assert_close(delta[kept], tau[kept] / (1 - p), rtol=1e-5, atol=1e-6)
    n = tau.numel()
    assert abs(int(kept.sum()) - n * (1 - p)) < 4 * (n * p * (1 - p)) ** 0.5


def test_expectation_is_the_task_vector():
    """E[DARE(τ)] = τ: the mean over many seeds converges to τ (5 standard errors per entry)."""
    base = _state(0, n=50)
    ft = _ft(base, 1, scale=1.0)
    tau = ft["w"] - base["w"]
    seeds = 400
    mean = sum(dare(base, [ft], drop=0.5, seed=s)["w"] - base["w"] for s in range(seeds)) / seeds
    stderr = tau.abs() * (0.5 / 0.5) ** 0.5 / seeds**0.5
    assert bool(((mean - tau).abs() <= 5 * stderr + 1e-6).all())


def test_masks_depend_on_the_seed_only():
    base = _state(0)
    fts = [_ft(base, 1), _ft(base, 2)]
    a = dare(base, fts, drop=0.7, seed=11)
    b = dare(base, fts, drop=0.7, seed=11)
    c = dare(base, fts, drop=0.7, seed=12)
    assert torch.equal(a["w"], b["w"]) and not torch.equal(a["w"], c["w"])
    # the same model twice gets different masks (each model index has its own stream)
    twice = dare(base, [fts[0], fts[0]], drop=0.5, seed=0, lam=0.5)["w"] - base["w"]
    tau = fts[0]["w"] - base["w"]
    assert not torch.allclose(twice, tau)


def test_dare_then_ties_elects_signs_among_survivors():
    base = {"w": torch.zeros(1000)}
    fts = [{"w": torch.full((1000,), 1.0)}, {"w": torch.full((1000,), -0.5)}]
    merged = dare(base, fts, drop=0.5, seed=0, then="ties")["w"]
    # survivors are 2.0 and -1.0; wherever the positive one survived it wins the election
    assert set(merged.unique().tolist()) <= {0.0, 2.0, -1.0}
    assert (merged == 2.0).float().mean() == pytest.approx(0.5, abs=0.1)


@pytest.mark.parametrize(
    "kwargs,match", [({"drop": 1.0}, "drop"), ({"drop": -0.1}, "drop"), ({"drop": 0.5, "then": "magnitude"}, "then")]
)
def test_bad_settings_are_refused(kwargs, match):
    base = _state(0)
    with pytest.raises(ValueError, match=match):
        dare(base, [_ft(base, 1)], **kwargs)


def test_models_are_dropped_independently_and_rescaled_then_summed():
    """Two models at p = 0.5: every merged entry is ``Σ_i w_i m_i τ_i / (1 − p)`` for masks
    ``m_i`` in {0, 1}, and the four mask patterns each turn up about a quarter of the time."""
    base = _state(0)
    fts = [_ft(base, 1), _ft(base, 2)]
    taus = [ft["w"] - base["w"] for ft in fts]
    merged = dare(base, fts, drop=0.5, seed=5, weights=[1.0, -2.0])["w"] - base["w"]
    candidates = torch.stack([(m0 * taus[0] - 2.0 * m1 * taus[1]) / 0.5 for m0 in (0, 1) for m1 in (0, 1)])
    error, pattern = (candidates - merged).abs().min(0)
    assert error.max() < 1e-5
    counts = torch.bincount(pattern, minlength=4).float() / merged.numel()
    assert ((counts - 0.25).abs() < 0.04).all(), counts


def test_dare_ties_is_ties_on_the_sparsified_task_vectors():
    """``then="ties"``: the sign election and disjoint mean, written out here, applied to each
    model's DARE-sparsified task vector (read back with the linear merge and one weight at 1)."""
    base = _state(0)
    fts = [_ft(base, s) for s in (1, 2, 3)]
    kept = []
    for i in range(3):
        one_hot = [1.0 if j == i else 0.0 for j in range(3)]
        kept.append(dare(base, fts, drop=0.6, seed=9, weights=one_hot)["w"] - base["w"])
    stack = torch.stack(kept)
    elected = stack.sum(0).sign()
    agree = (stack.sign() == elected) & (stack != 0)
    expected = (stack * agree).sum(0) / agree.sum(0).clamp_min(1)
    merged = dare(base, fts, drop=0.6, seed=9, then="ties", lam=0.5)["w"]
    torch.testing.assert_close(merged, base["w"] + 0.5 * expected, atol=1e-5, rtol=0)


def test_dare_ties_majority_gives_tied_votes_the_whole_models_majority_sign():
    """``tie_break="majority"``: where the survivors' vote ties, the entry takes the majority of
    the elected signs over the whole model (both tensors), written out here. Deltas on a grid of
    1/8 with the second model mirroring the first, so that many votes tie after the drop."""
    g = torch.Generator().manual_seed(0)
    shapes = {"w": (300,), "v": (4, 5)}
    base = {k: torch.randint(-8, 9, s, generator=g).float() / 8 for k, s in shapes.items()}
    taus = [{k: torch.randint(-8, 9, s, generator=g).float() / 8 for k, s in shapes.items()} for _ in range(3)]
    for k in shapes:
        taus[1][k] = torch.where(torch.rand(shapes[k], generator=g) < 0.8, -taus[0][k], taus[1][k])
        taus[2][k][torch.rand(shapes[k], generator=g) < 0.8] = 0.0
    # a whole-model majority that is negative, so that it differs from what 0 or + would give
    taus[2]["w"][:150] = -1.0
    fts = [{k: base[k] + t[k] for k in shapes} for t in taus]
    kept = [
        {
            k: v - base[k]
            for k, v in dare(base, fts, drop=0.5, seed=4, weights=[float(i == j) for j in range(3)]).items()
        }
        for i in range(3)
    ]
    elected = {k: torch.stack([t[k] for t in kept]).sum(0).sign() for k in shapes}
    majority = sum(e.sum() for e in elected.values()).sign()
    assert majority == -1 and all(bool((e == 0).any()) for e in elected.values())
    merged = dare(base, fts, drop=0.5, seed=4, then="ties", tie_break="majority")
    for k in shapes:
        stack = torch.stack([t[k] for t in kept])
        sign = torch.where(elected[k] == 0, majority, elected[k])
        agree = (stack.sign() == sign) & (stack != 0)
        expected = base[k] + (stack * agree).sum(0) / agree.sum(0).clamp_min(1)
        torch.testing.assert_close(merged[k], expected, atol=0, rtol=0, msg=k)
    with pytest.raises(ValueError, match="tie_break"):
        dare(base, fts, drop=0.5, tie_break="majority")  # then="linear" has no vote to break
