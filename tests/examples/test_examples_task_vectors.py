"""examples/task_negation.py, task_addition.py and tangent_task_arithmetic.py, run small: each
test asserts the claim its example prints (docs/examples.md has the full-size numbers)."""

from __future__ import annotations

import importlib.util
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
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


SMALL = {"max_docs_per_domain": 40, "seq_len": 64, "batch_size": 8, "max_bytes": 60_000, "eval_bytes": 8192}


def test_random_vector_matches_the_task_vector_tensor_by_tensor():
    neg = load_example("task_negation")
    g = torch.Generator().manual_seed(0)
    tau = neg.TaskVector({"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g) * 7})
    r = neg.random_like(tau, seed=1)
    for name, d in tau.deltas.items():
        assert float(r.deltas[name].norm()) == pytest.approx(float(d.norm()), rel=1e-5)
    assert r.norm() == pytest.approx(tau.norm(), rel=1e-5)
    assert abs(r.cosine(tau)) < 0.5


@pytest.mark.slow
def test_negating_a_task_vector_forgets_that_task_more_than_the_control_or_a_random_vector(tmp_path, capsys):
    neg = load_example("task_negation")
    result = neg.main(out=str(tmp_path), pretrain_steps=150, finetune_steps=60, lambdas=[1.0, 2.0], **SMALL)
    out = capsys.readouterr().out
    for lam in (1.0, 2.0):
        rise = result.rise(lam)
        # the example's claim: −λτ raises the target's perplexity more than the control's, and
        # more than a random vector of the same norm raises it
        assert rise["target"] > rise["control"] > 0
        assert rise["target"] > 2 * rise["target_random"]
        assert result.verdict(lam) in out and result.verdict(lam).endswith("yes")
    # fine-tuning helped the target; negating more forgets more
    t0 = result.negated[0.0][0]
    assert result.finetuned[0] < t0 < result.negated[1.0][0] < result.negated[2.0][0]
    assert (tmp_path / "task_negation.txt").exists()


@pytest.mark.slow
def test_adding_task_vectors_keeps_more_than_any_single_model_and_more_than_ties(tmp_path, capsys):
    add = load_example("task_addition")
    result = add.main(
        out=str(tmp_path),
        tasks=["stdlib_code", "docstrings", "unicode_names"],
        base_domains=["pydoc_topics", "stdlib_code", "docstrings", "unicode_names"],
        base_steps=200,
        finetune_steps=60,
        **SMALL,
    )
    out = capsys.readouterr().out
    claims = result.claims()
    # the relations measured at full size (docs/examples.md), for every n >= 2
    assert claims["ta_beats_single"] and claims["ties_beats_single"]
    assert claims["ta_at_least_ties"]
    assert result.summary() in out and "NO" not in result.summary()
    assert set(result.rows) == {1, 2, 3}
    assert result.rows[1]["best single model"][0] == pytest.approx(1.0)  # one task: its own model


@pytest.mark.slow
def test_linearised_task_vectors_have_lower_disentanglement_error(tmp_path, capsys):
    tan = load_example("tangent_task_arithmetic")
    result = tan.main(
        out=str(tmp_path),
        pretrain_steps=150,
        finetune_steps=40,
        alphas=[-1.0, 0.0, 1.0, 2.0],
        sum_alphas=[0.5],
        xi_rows=8,
        **SMALL,
    )
    out = capsys.readouterr().out
    claims = result.claims()
    # the paper's headline on weight disentanglement, which the full-size run measured too
    # (docs/examples.md). Whether the sum of the linearised vectors also keeps more of the tasks
    # is mixed at this scale (it does at α = 1 and not at the best α full size, the reverse
    # here), so the example reports it and this test does not assert it.
    assert claims["lower_mean_xi"] and claims["lower_xi_at_1_1"]
    for name in tan.REGIMES:
        g = result.regimes[name].grid
        assert g[1, 1] == 0  # (α1, α2) = (0, 0): nothing added, nothing changes
        assert float(g.max()) <= 2
    assert result.summary() in out
