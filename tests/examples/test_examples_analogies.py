"""examples/analogies.py: 3CosAdd vs 3CosMul on sparse and dense word vectors, then task analogies
on tiny models, run small.

Levy & Goldberg (2014) found 3CosMul at least as accurate as 3CosAdd on sparse PPMI vectors; the
example either reproduces that or says plainly that it does not.
"""

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


an = load_example("analogies")
SMALL = {
    "max_docs_per_domain": 40,
    "vocab_size": 1500,
    "rank": 8,
    "epochs": 3,
    "factorizations": ["ALS"],
    "base_steps": 6,
    "finetune_steps": 4,
    "seq_len": 64,
    "batch_size": 4,
    "max_bytes": 20_000,
    "eval_bytes": 4096,
    "lambdas": [0.5, 1.0],
}


def test_both_rules_solve_an_exact_parallelogram():
    g = torch.Generator().manual_seed(0)
    words = torch.randn(20, 16, generator=g)
    words[3] = words[2] - words[0] + words[1]  # a=0 : a*=1 :: b=2 : b*=3, exactly
    sims = an.cosines(words)
    q = [an.Question("toy", a=0, a_star=1, b=2, b_star=3)]
    for method, shift in (("3CosAdd", False), ("3CosMul", True)):
        assert an.answer(sims, q, method, shift).tolist() == [3]
    sims[2, 2] = sims[0, 0] = 10.0  # the question's own words never answer, however similar
    assert an.answer(sims, [an.Question("toy", 0, 1, 2, 2)], "3CosAdd", False).item() not in (0, 1, 2)


def test_questions_keep_only_pairs_whose_four_words_are_in_the_vocabulary():
    vocab = ["function", "functions", "file", "files", "object", "return", "returns", "read", "reads"]
    qs = an.analogy_questions(vocab)
    plural = [q for q in qs if q.relation == "noun: plural"]
    assert len(plural) == 2  # (function, functions) and (file, files); "objects" is missing
    assert {(vocab[q.a], vocab[q.b_star]) for q in plural} == {("function", "files"), ("file", "functions")}
    assert all(max(q.a, q.a_star, q.b, q.b_star) < len(vocab) for q in qs)
    assert {q.relation for q in qs} == {"noun: plural", "verb: 3rd person"}


@pytest.mark.slow
def test_example_reports_3cosmul_vs_3cosadd_honestly_and_reloads_its_models(tmp_path, capsys):
    result = an.main(out=str(tmp_path), **SMALL)
    out = capsys.readouterr().out
    words = result["words"]
    sparse = words["PPMI rows (sparse)"]
    assert set(words) == {"PPMI rows (sparse)", "ALS W, rank 8", "SVD U√S, rank 8", "SGNS, dim 100"}
    assert sum(result["counts"].values()) >= 50
    assert f"{sum(result['counts'].values())} analogy questions" in out
    add, mul = sparse["3CosAdd"]["all"], sparse["3CosMul"]["all"]
    line = next(v for v in result["verdicts"] if v.startswith("PPMI rows (sparse)"))
    assert line in out
    # The qualitative result of Levy & Goldberg, or the example says it did not hold.
    assert mul >= add or "3CosMul is NOT at least as accurate" in line
    assert ("NOT" in line) == (mul < add)
    assert add > 0.05  # the sparse vectors carry the relations at all

    first = result["models"].losses
    assert {"base", "oracle", "base + τ_A + τ_B", "base + λ(τ_A + τ_B − τ_C), λ=1"} <= set(first)
    for row in first.values():
        assert all(0 < v < 8 for v in row.values())  # nats per byte: below log(257) ≈ 5.55 + slack
    assert result["models"].summary() in out
    assert (tmp_path / "analogies.txt").read_text(encoding="utf-8").count("held-out loss") == 1

    # --base/--experts: the saved models give the same table without training anything.
    models, roles = tmp_path / "models", result["models"].roles
    corpus = an.local_corpus(
        SMALL["max_docs_per_domain"], domains=sorted({*(s.lower() for s in roles.values()), "pydoc_topics"})
    )
    again = an.model_analogy(
        corpus,
        roles,
        "pydoc_topics",
        SMALL["lambdas"],
        0,
        0,
        SMALL["seq_len"],
        SMALL["batch_size"],
        SMALL["max_bytes"],
        SMALL["eval_bytes"],
        0,
        tmp_path / "unused",
        str(models / "base"),
        [str(models / r) for r in "ABC"],
    )
    assert "oracle" not in again.losses
    for label, row in again.losses.items():
        assert row == pytest.approx(first[label], abs=1e-5)


@pytest.mark.slow
def test_google_questions_3cosadd_beats_3cosmul_on_ppmi_svd_and_sgns_of_the_pinned_corpus():
    """The relation measured on the full default corpus (docs/examples.md): on the Google
    questions the corpus covers, 3CosAdd is more accurate than 3CosMul on all three
    representations, unlike Levy & Goldberg; skip-gram vectors answer the most of them; on this
    example's own questions 3CosMul ties 3CosAdd on PPMI and loses on SGNS."""
    domains = ["docstrings", "comments", "pydoc_topics"]
    words = an.word_analogies(an.local_corpus(None, domains=domains), domains, factorizations=())
    assert sum(words.google_counts.values()) == 282
    google = {label: (acc["3CosAdd"]["all"], acc["3CosMul"]["all"]) for label, acc in words.google.items()}
    assert set(google) == {"PPMI rows (sparse)", "SVD U√S, rank 32", "SGNS, dim 100"}
    for add, mul in google.values():
        assert add > mul
    assert google["SGNS, dim 100"][0] > google["PPMI rows (sparse)"][0] > google["SVD U√S, rank 32"][0]
    own = words.own
    assert own["PPMI rows (sparse)"]["3CosMul"]["all"] >= own["PPMI rows (sparse)"]["3CosAdd"]["all"]
    assert own["SGNS, dim 100"]["3CosMul"]["all"] < own["SGNS, dim 100"]["3CosAdd"]["all"]


def test_google_questions_keep_the_covered_ones_under_their_section():
    vocab = ["athens", "greece", "baghdad", "iraq", "good", "better", "bad", "worse", "big"]
    qs = an.google_questions(vocab)
    assert {q.relation for q in qs} == {"capital-common-countries", "capital-world", "gram3-comparative"}
    q = next(q for q in qs if q.relation == "capital-common-countries")
    assert [vocab[i] for i in (q.a, q.a_star, q.b, q.b_star)] == ["athens", "greece", "baghdad", "iraq"]
    assert all(max(q.a, q.a_star, q.b, q.b_star) < len(vocab) for q in qs)


def test_sgns_vectors_are_deterministic_and_cover_every_word():
    tokens = ("the file reads a line and the file writes a line " * 50).split()
    words = ["file", "line", "reads", "writes"]
    a = an.sgns_vectors(tokens, words, dim=8, window=2, epochs=2, seed=0)
    b = an.sgns_vectors(tokens, words, dim=8, window=2, epochs=2, seed=0)
    assert a.shape == (4, 8) and torch.equal(a, b)


def test_domain_specs_in_capitals_are_upper_cased_text():
    corpus = an.local_corpus(4, domains=["comments"])
    lower, _ = an.domain_texts("comments", corpus)
    upper, _ = an.domain_texts("COMMENTS", corpus)
    assert upper == [t.upper() for t in lower] and upper != lower
    with pytest.raises(ValueError, match="unknown domain 'nope'"):
        an.domain_texts("nope", corpus)
