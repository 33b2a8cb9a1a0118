"""The extraction audit (benchmarks/extraction_audit.py): exposure and verbatim extraction tell a
memorised canary from one the model never saw, and the script runs end to end on a tiny setting."""

import importlib.util
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from flexmoe.testing import tiny_model


def _script():
    spec = importlib.util.spec_from_file_location(
        "extraction_audit", Path(__file__).parents[1] / "benchmarks" / "extraction_audit.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


audit = _script()


@pytest.fixture(scope="module")
def tokenizer(public_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(public_dir)


def memorise(model, tokenizer, texts, steps=150):
    """Plain AdamW on ``texts`` alone: a model that has certainly memorised them."""
    ids = [torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    model.train()
    for _ in range(steps):
        for x in ids:
            model(input_ids=x[None], labels=x[None]).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_a_memorised_canary_has_high_exposure_and_is_extracted_and_an_unseen_one_is_not(tokenizer):
    planted, unseen = audit.make_canaries([4], per_rep=2, seed=3)
    model = memorise(tiny_model("olmo2", vocab_size=len(tokenizer)), tokenizer, [planted.text])
    rng = random.Random(0)
    candidates = [audit.random_secret(rng) for _ in range(63)]
    assert audit.exposure(model, tokenizer, planted, candidates) == pytest.approx(math.log2(64))  # ranked first
    assert audit.extracted(model, tokenizer, planted)
    assert audit.exposure(model, tokenizer, unseen, candidates) < 4  # about chance: 1 bit expected
    assert not audit.extracted(model, tokenizer, unseen)
    report = audit.audit(model, tokenizer, [planted, unseen], candidates)
    assert set(report) == {4} and report[4]["extracted"] == 0.5


def test_canaries_are_planted_as_many_times_as_asked():
    canaries = audit.make_canaries([1, 4], per_rep=2)
    assert len({c.prefix for c in canaries}) == 4 and [c.reps for c in canaries] == [1, 1, 4, 4]
    docs = audit.plant(["a", "b", "c"], canaries)
    assert len(docs) == 3 + 2 * (1 + 4) and all(docs.count(c.text) == c.reps for c in canaries)


@pytest.mark.slow
def test_the_audit_runs_end_to_end_on_a_tiny_setting(tmp_path):
    rows = audit.main(
        [
            "--work",
            str(tmp_path),
            "--docs",
            "8",
            "--pretrain-steps",
            "20",
            "--expert-steps",
            "4",
            "--expert-batch",
            "4",
            "--candidates",
            "20",
            "--per-rep",
            "1",
            "--reps",
            "1",
            "4",
            "--settings",
            "no-dp",
            "dp-eps3",
            "--eval-tokens",
            "512",
        ]
    )
    by_name = {r["setting"]: r for r in rows}
    assert by_name["dp-eps3"]["epsilon"] == pytest.approx(3, rel=0.02) and by_name["no-dp"]["epsilon"] is None
    for r in rows[1:]:
        assert set(r["audit"]) == set(r["audit_merged"]) == {1, 4}
        assert all(0 <= v["extracted"] <= 1 and v["exposure"] <= math.log2(21) for v in r["audit"].values())
