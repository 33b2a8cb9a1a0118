"""TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint mean, scale."""

from __future__ import annotations

import pytest
import torch

from flexmoe import upcycle
from flexmoe.merge import kernel, ties
from flexmoe.testing import perturb_, tiny_model

SHAPES = {"a.weight": (8, 6), "b.weight": (40,), "c.bias": (3, 5, 2), "d.weight": (1,)}


def _state(seed, scale=1.0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g) * scale for k, s in shapes.items()}


def _deltas(merged, base):
    return {k: merged[k] - base[k] for k in base}


def _reference(base, fts, density, trim, lam=1.0, sign="mass", weights=None, tie_break="zero"):
    """TIES written out densely, for comparison: explicit concatenation and sort. A tied vote
    gives 0 (``"zero"``) or the majority elected sign of the trim scope (``"majority"``)."""
    names = sorted(base)
    w = torch.tensor(weights if weights is not None else [1.0] * len(fts), dtype=torch.float64)
    trimmed = []
    for ft in fts:
        deltas = {n: (ft[n] - base[n]).double() for n in names}
        if trim == "global":
            flat = torch.cat([deltas[n].flatten() for n in names])
            keep = torch.zeros_like(flat, dtype=torch.bool)
            keep[flat.abs().argsort(descending=True, stable=True)[: round(density * flat.numel())]] = True
            parts = keep.split([deltas[n].numel() for n in names])
            trimmed.append({n: deltas[n] * p.reshape(deltas[n].shape) for n, p in zip(names, parts)})
        else:
            out = {}
            for n in names:
                flat = deltas[n].flatten()
                keep = torch.zeros_like(flat, dtype=torch.bool)
                keep[flat.abs().argsort(descending=True, stable=True)[: round(density * flat.numel())]] = True
                out[n] = deltas[n] * keep.reshape(deltas[n].shape)
            trimmed.append(out)
    elected = {}
    for n in names:
        stack = torch.stack([t[n] for t in trimmed])  # [N, ...]
        wb = w.reshape(-1, *[1] * (stack.dim() - 1))
        votes = {"mass": stack, "weighted_mass": stack * wb, "count": stack.sign()}[sign]
        elected[n] = votes.sum(0).sign()
    if tie_break == "majority":
        scopes = [names] if trim == "global" else [[n] for n in names]
        for scope in scopes:
            majority = sum(elected[n].sum() for n in scope).sign()
            for n in scope:
                elected[n] = torch.where(elected[n] == 0, majority, elected[n])
    merged = {}
    for n in names:
        stack = torch.stack([t[n] for t in trimmed])
        wb = w.reshape(-1, *[1] * (stack.dim() - 1))
        elected_n = elected[n]
        agree = (stack.sign() == elected_n) & (stack != 0)
        den = (agree * wb).sum(0)
        mean = torch.where(den > 0, (stack * agree * wb).sum(0) / den.clamp_min(1e-300), 0.0)
        merged[n] = (base[n].double() + lam * mean).float()
    return merged


@pytest.mark.parametrize("trim", ["global", "per_tensor"])
@pytest.mark.parametrize(
    "sign,weights", [("mass", None), ("mass", [1.0, 2.0, 0.5]), ("weighted_mass", [1.0, 2.0, 0.5]), ("count", None)]
)
def test_matches_the_algorithm_written_out(trim, sign, weights):
    base = _state(0)
    fts = [{k: v + d for (k, v), d in zip(base.items(), _state(s, 0.1).values())} for s in (1, 2, 3)]
    merged = ties(base, fts, density=0.3, lam=0.8, trim=trim, sign=sign, weights=weights)
    expected = _reference(base, fts, 0.3, trim, lam=0.8, sign=sign, weights=weights)
    for k in base:
        torch.testing.assert_close(merged[k], expected[k], rtol=0, atol=1e-6, msg=k)


def tied_task_vectors(shapes, sign="mass", seed=0):
    """Three task vectors on a grid of 1/8 (exact in float32), the second the first one's mirror
    on most entries and the third abstaining on most, so that many votes are exactly tied under
    every sign rule (``weighted_mass`` with weights 1, 2, ...: the mirror at half the size)."""
    g = torch.Generator().manual_seed(seed)

    def grid(shape):
        return torch.randint(-8, 9, shape, generator=g).float() / 8

    taus = [{k: grid(s) for k, s in shapes.items()} for _ in range(3)]
    for k, t in taus[1].items():
        mirror = torch.rand(t.shape, generator=g) < 0.7
        t[mirror] = -taus[0][k][mirror]
        if sign == "weighted_mass":
            t[mirror] = t[mirror] / 2
        taus[2][k][torch.rand(t.shape, generator=g) < 0.7] = 0.0
    return taus


def _tied_case(sign):
    base = {k: t * 4 for k, t in tied_task_vectors(SHAPES, seed=1)[0].items()}  # also on the grid
    return base, [{k: base[k] + t[k] for k in base} for t in tied_task_vectors(SHAPES, sign)]


@pytest.mark.parametrize("block", [None, 7], ids=["whole_tensors", "row_blocks"])
@pytest.mark.parametrize("tie_break", ["zero", "majority"])
@pytest.mark.parametrize("trim", ["global", "per_tensor"])
@pytest.mark.parametrize("sign,weights", [("mass", None), ("weighted_mass", [1.0, 2.0, 0.5]), ("count", None)])
def test_tied_votes_match_the_algorithm_written_out(tie_break, trim, sign, weights, block, monkeypatch):
    """Many exactly tied votes (and many magnitudes tied at the trim threshold). In row blocks
    of 7 entries the majority is counted in a pass before the merge (a.weight and b.weight span
    several blocks), which must not use up the threshold's quota of tied magnitudes."""
    if block is not None:
        monkeypatch.setattr(kernel, "BLOCK_ENTRIES", block)
    base, fts = _tied_case(sign)
    merged = ties(base, fts, density=0.6, lam=0.5, trim=trim, sign=sign, weights=weights, tie_break=tie_break)
    expected = _reference(base, fts, 0.6, trim, lam=0.5, sign=sign, weights=weights, tie_break=tie_break)
    for k in base:
        torch.testing.assert_close(merged[k], expected[k], rtol=0, atol=1e-6, msg=k)


def test_tie_break_by_hand():
    """Two models, every entry kept (density 1), mass vote. Elected signs of ``w``: 0, −, +, 0,
    +, + (majority +); of ``v``: 0, − (majority −); of the whole model: + (4 − 2 ... = +1)."""
    base = {"v": torch.zeros(2), "w": torch.zeros(6)}
    fts = [
        {"w": torch.tensor([2.0, -1.0, 3.0, 1.0, 1.0, 4.0]), "v": torch.tensor([-1.0, -2.0])},
        {"w": torch.tensor([-2.0, -3.0, 1.0, -1.0, 0.5, 0.0]), "v": torch.tensor([1.0, -1.0])},
    ]
    # a tie gives 0 (algorithm 1 as printed; the default)
    zero = ties(base, fts, density=1.0)
    assert zero["w"].tolist() == [0.0, -2.0, 2.0, 0.0, 0.75, 4.0] and zero["v"].tolist() == [0.0, -1.5]
    # the whole model's majority is +: ties take the mean of the positive deltas
    glob = ties(base, fts, density=1.0, tie_break="majority")
    assert glob["w"].tolist() == [2.0, -2.0, 2.0, 1.0, 0.75, 4.0] and glob["v"].tolist() == [1.0, -1.5]
    # per tensor: w's majority is +, v's is −
    per = ties(base, fts, density=1.0, trim="per_tensor", tie_break="majority")
    assert per["w"].tolist() == [2.0, -2.0, 2.0, 1.0, 0.75, 4.0] and per["v"].tolist() == [-1.0, -1.5]
    # a tied majority leaves the tied entries at the base value
    even = ties(
        {"w": torch.zeros(3)},
        [{"w": torch.tensor([1.0, 1.0, -1.0])}, {"w": torch.tensor([-1.0, 2.0, -3.0])}],
        density=1.0,
        tie_break="majority",
        lam=2.0,
    )
    assert even["w"].tolist() == [0.0, 3.0, -4.0]
    with pytest.raises(ValueError, match="tie_break"):
        ties(base, fts, density=1.0, tie_break="minority")


def test_per_tensor_trim_keeps_exactly_density_of_each_tensor():
    base = _state(0)
    ft = {k: v + d for (k, v), d in zip(base.items(), _state(1).values())}
    deltas = _deltas(ties(base, [ft], density=0.25, trim="per_tensor"), base)
    for k, d in deltas.items():
        kept = d != 0
        assert int(kept.sum()) == round(0.25 * d.numel()), k
        full = (ft[k] - base[k]).abs()
        if kept.any() and (~kept).any():
            assert full[kept].min() >= full[~kept].max()  # the largest magnitudes survive
        torch.testing.assert_close(d[kept], (ft[k] - base[k])[kept])  # one model: kept as is


def test_global_trim_keeps_exactly_density_of_the_whole_model():
    base = _state(0)
    scales = {"a.weight": 5.0, "b.weight": 0.1, "c.bias": 1.0, "d.weight": 1.0}  # a dominates the ranking
    ft = {k: v + d * scales[k] for (k, v), d in zip(base.items(), _state(1).values())}
    deltas = _deltas(ties(base, [ft], density=0.3, trim="global"), base)
    total = sum(d.numel() for d in deltas.values())
    assert sum(int((d != 0).sum()) for d in deltas.values()) == round(0.3 * total)
    kept_mags = torch.cat([(ft[k] - base[k]).abs()[d != 0] for k, d in deltas.items()])
    dropped_mags = torch.cat([(ft[k] - base[k]).abs()[d == 0] for k, d in deltas.items()])
    assert kept_mags.min() >= dropped_mags.max()
    assert int((deltas["b.weight"] != 0).sum()) == 0  # global, not per tensor: small tensors lose out
    assert int((deltas["a.weight"] != 0).sum()) > round(0.3 * 48)


@pytest.mark.parametrize("trim", ["global", "per_tensor"])
@pytest.mark.parametrize("sign", ["mass", "count"])
def test_processing_in_row_blocks_changes_nothing(trim, sign, monkeypatch):
    base = _state(0)
    fts = [{k: v + d for (k, v), d in zip(base.items(), _state(s, 0.1).values())} for s in (1, 2, 3)]
    whole = ties(base, fts, density=0.3, trim=trim, sign=sign)
    monkeypatch.setattr(kernel, "BLOCK_ENTRIES", 7)  # a.weight in 8 blocks of one row, b.weight in 6
    blocked = ties(base, fts, density=0.3, trim=trim, sign=sign)
    assert all(torch.equal(whole[k], blocked[k]) for k in base)


@pytest.mark.parametrize("block", [None, 2])
def test_entries_tied_at_the_threshold_are_kept_in_storage_order(block, monkeypatch):
    if block is not None:
        monkeypatch.setattr(kernel, "BLOCK_ENTRIES", block)
    base = {"a": torch.zeros(4), "b": torch.zeros(6)}
    ft = {"a": torch.tensor([1.0, -1.0, 1.0, -1.0]), "b": torch.tensor([1.0, 1.0, -1.0, 1.0, 1.0, 1.0])}
    per = ties(base, [ft], density=0.5, trim="per_tensor")
    assert per["a"].tolist() == [1.0, -1.0, 0.0, 0.0]
    assert per["b"].tolist() == [1.0, 1.0, -1.0, 0.0, 0.0, 0.0]
    glob = ties(base, [ft], density=0.3, trim="global")  # 3 of 10, in sorted-name, row-major order
    assert glob["a"].tolist() == [1.0, -1.0, 1.0, 0.0] and glob["b"].tolist() == [0.0] * 6


def test_sign_election_rules_and_disjoint_mean():
    base = {"w": torch.zeros(3)}
    fts = [
        {"w": torch.tensor([3.0, -1.0, 2.0])},
        {"w": torch.tensor([-1.0, -1.0, 2.0])},
        {"w": torch.tensor([-1.0, 4.0, -5.0])},
    ]
    # mass: signs of [1, 2, -1] -> keep only agreeing entries and average them
    assert ties(base, fts, density=1.0)["w"].tolist() == [3.0, 4.0, -5.0]
    # count: most models are negative, negative, positive
    assert ties(base, fts, density=1.0, sign="count")["w"].tolist() == [-1.0, -1.0, 2.0]
    two = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([-3.0])}]
    assert ties({"w": torch.zeros(1)}, two, density=1.0, weights=[5, 1])["w"].tolist() == [-3.0]
    assert ties({"w": torch.zeros(1)}, two, density=1.0, weights=[5, 1], sign="weighted_mass")["w"].tolist() == [1.0]
    # weighted disjoint mean over the agreeing models, then λ
    agree = [{"w": torch.tensor([1.0])}, {"w": torch.tensor([4.0])}, {"w": torch.tensor([-0.5])}]
    assert ties({"w": torch.zeros(1)}, agree, density=1.0, weights=[1, 3, 1], lam=2.0)["w"].tolist() == [6.5]


def test_merged_entries_agree_with_the_elected_sign():
    base = _state(0)
    fts = [{k: v + d for (k, v), d in zip(base.items(), _state(s, 0.1).values())} for s in (1, 2, 3, 4)]
    merged = _deltas(ties(base, fts, density=0.4, trim="per_tensor"), base)
    trimmed = [_deltas(ties(base, [f], density=0.4, trim="per_tensor"), base) for f in fts]
    for k, d in merged.items():
        elected = torch.stack([t[k] for t in trimmed]).sum(0).sign()
        assert bool(((d.sign() == elected) | (d == 0)).all()), k


def test_density_bounds_and_trivial_densities():
    base = _state(0)
    ft = {k: v + d for (k, v), d in zip(base.items(), _state(1).values())}
    full = ties(base, [ft], density=1.0, trim="per_tensor")
    none = ties(base, [ft], density=0.0)
    for k in base:
        torch.testing.assert_close(full[k], ft[k], rtol=0, atol=1e-6)
        assert torch.equal(none[k], base[k])
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match="density"):
            ties(base, [ft], density=bad)
    with pytest.raises(ValueError, match="trim"):
        ties(base, [ft], density=0.2, trim="rows")


def test_models_in_models_out_and_inputs_untouched():
    base = tiny_model("olmo2")
    fts = [tiny_model("olmo2") for _ in range(2)]
    for i, m in enumerate(fts):
        perturb_(m, seed=i + 1)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    merged = ties(base, fts, density=0.2)
    assert type(merged) is type(base) and merged is not base
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())
    moe = upcycle(tiny_model("llama"), num_experts=1)
    moe_ft = upcycle(tiny_model("llama"), num_experts=1)
    perturb_(moe_ft, seed=5)
    assert type(ties(moe, [moe_ft], density=0.5, trim="per_tensor")) is type(moe)


def test_half_precision_inputs_keep_their_dtype():
    base = {k: v.bfloat16() for k, v in _state(0).items()}
    ft = {k: (v.float() + 0.1 * d).bfloat16() for (k, v), d in zip(base.items(), _state(1).values())}
    merged = ties(base, [ft], density=0.5)
    assert all(v.dtype == torch.bfloat16 for v in merged.values())
    assert ties(base, [ft], density=0.5, dtype=torch.float32)["a.weight"].dtype == torch.float32
