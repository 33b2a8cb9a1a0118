"""examples/matrix_factorization.py: the five factorizations of a real PPMI matrix, run small.

Gemulla et al. (KDD 2011): stratified DSGD converges like sequential SGD, while averaging
factorizations trained apart (one-shot parameter mixing) stalls; DSGD's blocks of a stratum
share no rows or columns, so processing them in parallel equals processing them in turn.
"""

from __future__ import annotations

import importlib.util
import math
import multiprocessing
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str):
    """An example script as a module (examples/ is a folder of scripts, not a package)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # DSGD's worker function is found by module name after fork
        spec.loader.exec_module(module)
    return sys.modules[name]


mf = load_example("matrix_factorization")
SMALL = {"max_docs_per_domain": 40, "vocab_size": 600, "rank": 8, "epochs": 5, "p": 3, "seed": 0}


@pytest.fixture(scope="module")
def matrix():
    tokens = mf.corpus_tokens(mf.PROSE_DOMAINS, SMALL["max_docs_per_domain"])
    return mf.ppmi_matrix(tokens, SMALL["vocab_size"]).ppmi


def test_ppmi_matrix_is_positive_pmi_of_the_corpus():
    tokens = ["a", "b", "a", "c", "a", "b", "d"]
    m = mf.ppmi_matrix(tokens, vocab_size=4, window=1, alpha=1.0)
    assert m.words == ["a", "b", "c", "d"] and m.tokens == 7
    dense = m.ppmi.toarray()
    assert (dense >= 0).all() and (dense == dense.T).all()  # a symmetric window gives a symmetric matrix
    # (b, d) co-occur once; b is in 4 (word, context) pairs, d in 1, of 12: PMI = log(1 * 12 / (4 * 1))
    assert dense[1, 3] == pytest.approx(math.log(3), rel=1e-6)
    assert dense[0, 0] == 0  # "a" never neighbours itself


def test_dsgd_converges_where_one_shot_mixing_stalls(tmp_path, capsys):
    results = mf.main(out=str(tmp_path), workers=3, **SMALL)
    final = {name: r.final for name, r in results.items()}
    assert set(final) == set(mf.METHODS)
    assert final["DSGD"] < final["one-shot mixing"]
    assert final["DSGD"] < 1.5 * final["sgd"]  # DSGD is SGD, reordered: it tracks plain SGD
    assert final["iterative mixing"] < final["one-shot mixing"]
    assert final["ALS"] < final["one-shot mixing"]
    for r in results.values():  # every method starts from the same factors and goes down
        assert r.curve[0][1] == results["sgd"].curve[0][1] > r.final
        assert r.curve[-1][0] == SMALL["epochs"]
    out = capsys.readouterr().out
    assert "max |difference| = 0.0e+00" in out  # one stratum in the pool == its blocks in turn
    assert all(name in out for name in mf.METHODS)
    assert (tmp_path / "mf_loss.png").stat().st_size > 10_000


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="the DSGD pool forks")
def test_dsgd_in_worker_processes_equals_dsgd_in_one_process(matrix):
    factors = {}
    for workers in (1, 3):
        cfg = mf.MFConfig(rank=8, epochs=2, p=3, workers=workers)
        obs = mf.Observed(matrix, cfg.lam)
        dsgd = mf.DSGD(obs, mf.init_factors(obs.shape, cfg, float(obs.vals.mean())), cfg)
        try:
            assert (dsgd.pool is None) == (workers == 1)
            curve, factors[workers] = dsgd.train()
        finally:
            dsgd.close()
        assert len(curve) == 1 + 2 * 3  # a point after every stratum (sub-epoch)
    for k in ("W", "H"):
        assert torch.equal(factors[1][k], factors[3][k])


def test_strata_are_row_and_column_disjoint_and_cover_every_block(matrix):
    obs = mf.Observed(matrix, 0.05)
    p = 4
    blocks = mf.dsgd_blocks(obs, p, seed=0)
    assert sum(len(blocks[b][c]) for b in range(p) for c in range(p)) == len(obs)
    cells = [cell for shift in range(p) for cell in mf.stratum(p, shift)]
    assert sorted(cells) == [(b, c) for b in range(p) for c in range(p)]
    for shift in range(p):
        mf.check_stratum(obs, blocks, mf.stratum(p, shift))
    with pytest.raises(AssertionError, match="shares rows or columns"):
        mf.check_stratum(obs, blocks, [(0, 0), (0, 1)])  # same row range: not interchangeable


def test_als_half_step_is_the_exact_minimiser(matrix):
    cfg = mf.MFConfig(rank=8, epochs=1)
    obs = mf.Observed(matrix, cfg.lam)
    f = mf.init_factors(obs.shape, cfg, float(obs.vals.mean()))
    f["W"] = mf._als_half(obs.csr, f["H"], obs.lam)
    W = f["W"].double().requires_grad_()
    H = f["H"].double()
    err = obs.vals.double() - (W[obs.rows] * H[obs.cols]).sum(1)
    loss = err.square().sum() + obs.lam * (W.square().sum() + H.square().sum())
    loss.backward()
    assert W.grad.abs().max() < 1e-4 * W.abs().max()  # ∂L/∂W = 0 at the solved W


def test_config_errors_say_what_to_change():
    with pytest.raises(ValueError, match="batch_size"):
        mf.MFConfig(batch_size=2, p=4)
    with pytest.raises(ValueError, match="rank"):
        mf.MFConfig(rank=0)
    with pytest.raises(ValueError, match="unknown method"):
        mf.factorize(None, mf.MFConfig(), ["adam"])
