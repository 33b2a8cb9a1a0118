"""Iterative parameter mixing (McDonald et al. 2010; Zinkevich et al. 2010): over processes with
Lightning's own DDPStrategy(model_averaging_period=k) (post-local SGD), and the example's
comparison of parameter-mixing strategies on a convex problem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from flexmoe.testing import LICENSES

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("ddp_ipm.py")


@pytest.mark.slow
def test_post_local_sgd_averages_the_ranks_every_period(public_dir, tmp_path):
    """Steps 0-1 (warm-up): gradients all-reduced, ranks identical. From step 2 each rank steps on
    its own data, and PeriodicModelAverager averages them at steps 2, 5, 8 (warm-up + k·period):
    identical there, different in between."""
    max_steps, warmup, period = 9, 2, 3
    cmd = [
        sys.executable,
        str(SCRIPT),
        str(public_dir),
        f"{LICENSES}/GPL-3",
        str(tmp_path),
        str(max_steps),
        str(warmup),
        str(period),
    ]
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text())["hashes"] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == max_steps
    same = [a == b for a, b in zip(*ranks)]
    averaged = {s for s in range(max_steps) if s < warmup or (s - warmup) % period == 0}
    assert same == [s in averaged for s in range(max_steps)], same
    assert len(set(ranks[0])) == max_steps  # the parameters moved at every step


def test_example_iterative_mixing_beats_one_shot_mixing(tmp_path):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import parameter_mixing
    finally:
        sys.path.remove(str(ROOT / "examples"))
    results = parameter_mixing.main(out=str(tmp_path / "pm.png"), epochs=6, seeds=2)
    final = {m: float(acc[:, -1].mean()) for m, acc in results.items()}
    assert final["iterative mixing"] > final["one-shot mixing"] + 0.005, final
    assert final["one-shot mixing"] > final["1/p data"] + 0.05, final
    assert final["iterative mixing"] >= final["all data"] - 0.02, final  # as good as training on all the data
    assert (tmp_path / "pm.png").stat().st_size > 10_000


def _example():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import parameter_mixing
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return parameter_mixing


def test_mistake_weights_are_each_shards_share_of_the_mistakes():
    """McDonald et al. (2010), section 4: μ_{i,n} = k_{i,n} / k_n."""
    pm = _example()
    assert pm.mixing_weights([3, 1, 0, 0]) == [0.75, 0.25, 0.0, 0.0]
    assert pm.mixing_weights([2, 2, 4]) == [0.25, 0.25, 0.5]
    assert pm.mixing_weights([0, 0]) == [0.5, 0.5]  # no mistakes anywhere: every model is the same
    assert pm.mixing_weights([3, 1, 0, 0], "uniform") == [0.25] * 4
    models = [np.full((2, 3), float(v)) for v in (4.0, 8.0, 100.0)]
    np.testing.assert_allclose(pm.mix(models, pm.mixing_weights([1, 3, 0])), np.full((2, 3), 7.0))
    with pytest.raises(ValueError, match="mixing"):
        pm.mixing_weights([1, 2], "errors")


def _separable(n=600, features=10, classes=4, margin=0.05, seed=0):
    """Points labelled by a random linear classifier ``U`` (Frobenius norm 1), keeping only those
    at least ``margin`` from every decision boundary: separable with margin ``γ >= margin``."""
    rng = np.random.default_rng(seed)
    U = rng.normal(size=(classes, features))
    U /= np.linalg.norm(U)
    X = rng.normal(size=(8 * n, features))
    scores = X @ U.T
    y = scores.argmax(1)
    gap = scores[np.arange(len(X)), y][:, None] - scores
    gap[np.arange(len(X)), y] = np.inf
    keep = gap.min(1) >= margin
    X, y = X[keep][:n], y[keep][:n]
    scores = X @ U.T
    gap = scores[np.arange(len(X)), y][:, None] - scores
    gap[np.arange(len(X)), y] = np.inf
    return X, y, float(gap.min())


@pytest.mark.parametrize("mixing", ["mistakes", "uniform"])
def test_iterative_mixing_separates_separable_data_within_mcdonalds_bound(mixing):
    """Theorem 3 (McDonald et al., 2010): on data separable with margin γ, iterative parameter
    mixing keeps Σ_n Σ_i μ_{i,n} k_{i,n} <= R²/γ² (R² = 2 max |x|² for the multiclass
    perceptron's feature differences), so it stops making mistakes: the mixed model then
    classifies every training example correctly."""
    pm = _example()
    X, y, gamma = _separable()
    shards = 8
    W, mistakes, weights = pm.iterative_parameter_mixing(X, y, shards, epochs=200, mixing=mixing)
    assert sum(mistakes[-1]) == 0, f"still {sum(mistakes[-1])} mistakes after {len(mistakes)} passes"
    assert ((X @ W.T).argmax(1) == y).all()
    R2 = 2 * float((X**2).sum(1).max())
    weighted = sum(sum(m * k for m, k in zip(mu, ks)) for mu, ks in zip(weights, mistakes))
    assert weighted <= R2 / gamma**2, (weighted, R2 / gamma**2)
    for mu, ks in zip(weights, mistakes):  # the weights of every round are the rule's
        assert mu == pm.mixing_weights(ks, mixing)
    if mixing == "mistakes":  # and with them the total is at most p R²/γ²
        assert sum(map(sum, mistakes)) <= shards * R2 / gamma**2
