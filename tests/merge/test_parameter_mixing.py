"""Iterative parameter mixing (McDonald et al. 2010; Zinkevich et al. 2010): over processes with
Lightning's own DDPStrategy(model_averaging_period=k) (post-local SGD), and the example's
comparison of parameter-mixing strategies on a convex problem."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
